"""The compressor's decode-step kernel (``dsv4_jax/kernels/compressor_step.py``) against the XLA reference
(``modeling/compressor.py::compress_projected``, what ``compress`` computes for a one-token chunk).

CPU: the ``@triton.jit`` kernel under Triton's interpreter in a subprocess (``TRITON_INTERPRET=1`` must be set
before triton is imported) on torch CPU tensors, and the jax launcher (``input_output_aliases``, the byte view of
the e4m3 codes, the dispatch in ``compress``) through ``tests/triton_shim.py``; GPU: the jitted launcher at V4-Flash
shapes (skipped without a GPU); sm_90: the kernel compiled for an H200 without a GPU (no spills). Both variants:
the attention compressor's (FP8, ``Fp8Cache``) and the indexer's (Hadamard and FP4, ``Fp4Tensor``: ``_check_fp4``
states its tolerance; bit for bit on the CPU, and the check fails on a swapped nibble order).

The states are canonical (``modeling/state.py``: empty slots hold kv 0 / score -inf; the kernel's precondition), with
random tokens in the occupied slots (a fifth of the channels scaled by 2**-8 .. 2**-17, so that entries hold e4m3
subnormal and zero codes) and random bytes in the cache, and the batch mixes rows that complete a window (the first
one, whose previous-window slots hold junk that must be ignored, and later ones), rows that do not, rows with
``n_new = 0``, a row completing the last entry of the cache and one whose entry lies past it (dropped).

Exact: the buffers and every cache entry not written (bit for bit). Tolerance, for the written entries: the kernel
follows the reference's formula and order, but ``exp`` differs by implementation (numpy's or the GPU's against
XLA's, a few ulps) and the two reductions whose order XLA does not specify (the softmax denominator, the norm's sum
of squares) may add in another order. The pooled fp32 values then differ by a few ulps, which moves a bf16 rounding
of the pooled vector, of the norm's output or of the RoPE output by one ulp in rare places. One bf16 ulp (2**-8
relative) moves an e4m3 code by at most one step (2**-3 of the value, or 2**-9 of the scale below the normals), or a
block's power-of-two scale when its maximum sits on a boundary (then the block's codes by about one step at the
larger scale). Hence per nope dim ``|got - ref| <= 2**-3 max(|got|, |ref|) + 2**-9 max(scales)``, per RoPE pair (two
bf16 inputs of ~1 ulp each, one rotation, one rounding) ``|got - ref| <= 2**-5 |pair|``, and at least
``MIN_EXACT`` of the codes and RoPE values and all but ``max(1, 3%)`` of the scales bit for bit (a wrong slot,
channel, window or position is off by O(1) almost everywhere). On the CPU everything must match bit for bit: the
kernel's order is the reference's up to the denominator's and the norm's sums and ``exp``, whose few-ulp fp32
differences reach a bf16 rounding with a probability of ~2**-14 per value, and the CPU cases (fixed seeds,
deterministic on both sides) were measured exact; a jax or numpy upgrade that moves ``exp`` could make a single value
differ, which the tolerance check above would then show as an ulp-level drift, not a bug.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton_shim  # noqa: E402

SEED = 4242
N_ENTRIES = 8  # cache entries per row in the CPU cases
GPU_ENTRIES = 32  # and in the GPU cases
MIN_EXACT = 0.97  # fraction of the written entries' codes / scales / RoPE values that must match bit for bit
# (m, [(pos, n_new), ...]): one batch per ratio (module docstring)
CPU_CASES = [
    (4, [(3, 1), (7, 1), (5, 1), (6, 0), (1, 1), (0, 1), (31, 1), (35, 1), (11, 0), (22, 1)]),
    (128, [(127, 1), (255, 1), (300, 1), (383, 0), (0, 1), (1023, 1)]),
]


def _cfg(d: int, rd: int, kernels: str = "reference"):
    from dsv4_jax.config import Config

    return Config.tiny(head_dim=d, rope_head_dim=rd, kernels=kernels)


def _state(m: int, rows, d: int, n_entries: int, seed: int) -> dict:
    """A canonical decode state for the ``rows`` (pos, n_new) and the new token's projections, as numpy arrays."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    c = 2 if m == 4 else 1
    B = len(rows)
    pos = np.array([p for p, _ in rows], np.int32)
    kv_buf = np.zeros((B, c * m, c * d), np.float32)
    sc_buf = np.full((B, c * m, c * d), -np.inf, np.float32)
    for b, p in enumerate(pos):
        P = m if c == 2 else 0
        occupied = list(range(P, P + p % m)) + (list(range(m)) if c == 2 and p >= m else [])
        if c == 2 and p == m - 1:  # completing the first window: junk where the previous window would be
            occupied += list(range(m))
        for s in occupied:
            kv_buf[b, s] = rng.standard_normal(c * d) * np.exp2(rng.integers(-2, 3))
            sc_buf[b, s] = rng.standard_normal(c * d) * 2.0
    tiny = np.where(rng.random(c * d) < 0.2, np.exp2(-rng.integers(8, 18, c * d)), 1.0)  # [c*d] channel scales:
    kv_buf *= tiny.astype(np.float32)  # entries with e4m3 subnormal and zero codes (their own encoding path)
    dn = d - 64
    codes = rng.integers(0, 0x7F, (B, n_entries, dn), dtype=np.uint8) | (rng.integers(0, 2, (B, n_entries, dn),
                                                                                     dtype=np.uint8) << 7)
    return dict(
        kv_new=(rng.standard_normal((B, c * d)) * 1.5 * tiny).astype(np.float32),
        sc_new=(rng.standard_normal((B, c * d)) * 2.0).astype(np.float32),
        kv_buf=kv_buf, sc_buf=sc_buf, pos=pos, n_new=np.array([n for _, n in rows], np.int32),
        codes=codes, scales=rng.integers(110, 135, (B, n_entries, dn // 64), dtype=np.uint8),
        rope=rng.standard_normal((B, n_entries, 64)).astype(ml_dtypes.bfloat16).astype(np.float32),
        norm=(1.0 + 0.25 * rng.standard_normal(d)).astype(ml_dtypes.bfloat16).astype(np.float32))


def _weights(norm):
    import jax.numpy as jnp

    from dsv4_jax.modeling.weights import CompressorWeights

    return CompressorWeights(ape=None, wkv=None, wgate=None, norm=jnp.asarray(norm, jnp.bfloat16))


def _cache(z: dict):
    import jax.numpy as jnp

    from dsv4_jax.modeling.quant import Fp8Cache

    codes = jnp.asarray(z["codes"]).view(jnp.float8_e4m3fn)
    return Fp8Cache(codes=codes, scales=jnp.asarray(z["scales"]), rope=jnp.asarray(z["rope"], jnp.bfloat16))


def _cos_sin(cfg, m: int, pos: np.ndarray):
    """cos/sin ``[B, rd/2]`` at each row's entry position, as the launcher computes them."""
    import jax.numpy as jnp

    from dsv4_jax.modeling.layers import rope_cos_sin, rope_freqs

    cos, sin = rope_cos_sin(rope_freqs(cfg, m), (jnp.asarray(pos) // m) * m)
    return np.asarray(cos, np.float32), np.asarray(sin, np.float32)


def _reference(cfg, m: int, z: dict) -> dict:
    """The XLA reference on the state ``z``: the new cache (codes as bytes) and buffers, numpy."""
    import jax
    import jax.numpy as jnp

    from dsv4_jax.kernels.compressor_step import compress_decode_reference
    from dsv4_jax.modeling.layers import rope_freqs

    fn = jax.jit(lambda *a: compress_decode_reference(cfg, *a, m, rope_freqs(cfg, m)))
    cache, kvb, scb = fn(_weights(z["norm"]), jnp.asarray(z["kv_new"]), jnp.asarray(z["sc_new"]), _cache(z),
                         jnp.asarray(z["kv_buf"]), jnp.asarray(z["sc_buf"]), jnp.asarray(z["pos"]),
                         jnp.asarray(z["n_new"]))
    return _as_numpy(cache, kvb, scb)


def _as_numpy(cache, kvb, scb) -> dict:
    import jax.numpy as jnp

    return dict(codes=np.asarray(cache.codes.view(jnp.uint8)), scales=np.asarray(cache.scales),
                rope=np.asarray(cache.rope.astype(jnp.float32)), kv_buf=np.asarray(kvb), sc_buf=np.asarray(scb))


def _e4m3(codes: np.ndarray) -> np.ndarray:
    import ml_dtypes

    return codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def _written(pos: np.ndarray, n_new: np.ndarray, m: int, n_entries: int) -> np.ndarray:
    """``[B, N]``: the cache entries a step at ``pos`` with ``n_new`` writes (complete windows inside the cache)."""
    written = np.zeros((len(pos), n_entries), bool)
    for b, (p, n) in enumerate(zip(pos, n_new)):
        if n and p % m == m - 1 and p // m < n_entries:
            written[b, p // m] = True
    return written


def _check(got: dict, ref: dict, written: np.ndarray, what: str, min_exact: float = MIN_EXACT) -> dict:
    """Buffers and the entries not ``written [B, N]`` bit for bit; the written ones within the module docstring's
    tolerance, at least ``min_exact`` of their codes and RoPE values and of their scales (less one block) bit for
    bit. Returns the exact fractions (codes, scales, rope)."""
    for k in ("kv_buf", "sc_buf"):
        np.testing.assert_array_equal(got[k].view(np.uint32), ref[k].view(np.uint32), err_msg=f"{what}: {k}")
    assert written.any(), f"{what}: no case writes an entry"
    for k in ("codes", "scales", "rope"):  # entries nobody writes: untouched (the reference keeps the input's)
        g, r = got[k][~written], ref[k][~written]
        np.testing.assert_array_equal(g.view(np.uint8), r.view(np.uint8), err_msg=f"{what}: unwritten {k}")
    gs, rs = got["scales"][written].astype(np.int32), ref["scales"][written].astype(np.int32)  # [W, Dn/64]
    gv = _e4m3(got["codes"][written]).reshape(*gs.shape, 64) * np.exp2(gs - 127.0)[..., None]
    rv = _e4m3(ref["codes"][written]).reshape(*rs.shape, 64) * np.exp2(rs - 127.0)[..., None]
    smax = np.exp2(np.maximum(gs, rs) - 127.0)[..., None]
    bad = np.abs(gv - rv) > 2.0**-3 * np.maximum(np.abs(gv), np.abs(rv)) + 2.0**-9 * smax
    assert not bad.any(), f"{what}: {bad.sum()} nope values off by more than one e4m3 step, e.g. " \
                          f"{gv[bad][:4]} vs {rv[bad][:4]}"
    gr, rr = got["rope"][written].reshape(-1, 2), ref["rope"][written].reshape(-1, 2)
    tol = 2.0**-5 * np.linalg.norm(rr, axis=1, keepdims=True)
    assert np.all(np.abs(gr - rr) <= tol), f"{what}: RoPE dims off by more than 2**-5 |pair|"
    frac = {k: float(np.mean(got[k][written].view(np.uint8) == ref[k][written].view(np.uint8)))
            for k in ("codes", "scales", "rope")}
    scale_ok = 1.0 if min_exact == 1.0 else min(min_exact, 1.0 - 1.0 / gs.size)  # one block's scale may flip
    assert frac["codes"] >= min_exact and frac["rope"] >= min_exact and frac["scales"] >= scale_ok, \
        f"{what}: bit-exact fractions {frac} below {min_exact}"
    return frac


# ---------------------------------------------------------------------------------------------- interpreter
def _interpret_main(path: str) -> None:
    """Subprocess body: (1) the kernel through ``run_torch`` on every CPU case; (2) the jax launcher under the shim
    through ``compress`` (``kernels="triton"``) on the first chunk of the ``x`` cases."""
    import torch

    import dsv4_jax.kernels.compressor_step as cs
    import dsv4_jax.modeling.compressor as comp

    z = dict(np.load(path))
    if "indexer" in z:
        return _interpret_indexer(z, path)
    out = {}
    for i, (m, _) in enumerate(CPU_CASES):
        a = {k[len(f"{i}_"):]: v for k, v in z.items() if k.startswith(f"{i}_")}
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in a.items()}
        d = a["norm"].shape[0]
        cfg = _cfg(d, 64)
        rope = t["rope"].to(torch.bfloat16)
        codes = t["codes"].view(torch.float8_e4m3fn)  # the same memory, typed as the cache's codes
        cs.run_torch(cfg, t["norm"].to(torch.bfloat16), t["kv_new"], t["sc_new"], codes, t["scales"], rope,
                     t["kv_buf"], t["sc_buf"], t["pos"], t["n_new"], m, t["cos"], t["sin"])
        out.update({f"{i}_codes": t["codes"].numpy(), f"{i}_scales": t["scales"].numpy(),
                    f"{i}_rope": rope.float().numpy(), f"{i}_kv_buf": t["kv_buf"].numpy(),
                    f"{i}_sc_buf": t["sc_buf"].numpy()})
    triton_shim.install(target="cpu")
    import jax
    import jax.numpy as jnp

    from dsv4_jax.modeling.layers import rope_freqs

    for i, (m, _) in enumerate(CPU_CASES):
        a = {k[len(f"x{i}_"):]: v for k, v in z.items() if k.startswith(f"x{i}_")}
        cfg = _cfg(a["norm"].shape[0], 64, "triton")
        w = _x_weights(a)
        n0 = len(triton_shim.LAUNCHES)
        step = jax.jit(lambda x, cache, kvb, scb, pos, nn, w=w, cfg=cfg, m=m: comp.compress(
            cfg, w, x, cache, kvb, scb, pos, nn, m, rope_freqs(cfg, m), indexer=False))
        res = step(jnp.asarray(a["x"], jnp.bfloat16), _cache(a), jnp.asarray(a["kv_buf"]), jnp.asarray(a["sc_buf"]),
                   jnp.asarray(a["pos"]), jnp.asarray(a["n_new"]))
        assert len(triton_shim.LAUNCHES) > n0, "compress did not launch the kernel"
        out.update({f"x{i}_{k}": v for k, v in _as_numpy(*res).items()})
    np.savez(path + ".out.npz", **out)


def _x_weights(a: dict):
    """Compressor weights for the ``x`` cases (projections of a bf16 token ``x [B, 1, D]``)."""
    import jax.numpy as jnp

    from dsv4_jax.modeling.weights import CompressorWeights

    return CompressorWeights(ape=jnp.asarray(a["ape"]), wkv=jnp.asarray(a["wkv"], jnp.bfloat16),
                             wgate=jnp.asarray(a["wgate"], jnp.bfloat16), norm=jnp.asarray(a["norm"], jnp.bfloat16))


def _x_case(m: int, rows, d: int, seed: int) -> dict:
    """A state plus a token ``x`` and projection weights (the full ``compress`` inputs)."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    c = 2 if m == 4 else 1
    D = 64
    z = _state(m, rows, d, N_ENTRIES, seed)
    bf = ml_dtypes.bfloat16
    z.update(x=rng.standard_normal((len(rows), 1, D)).astype(bf).astype(np.float32),
             wkv=(rng.standard_normal((c * d, D)) / 4).astype(bf).astype(np.float32),
             wgate=(rng.standard_normal((c * d, D)) / 4).astype(bf).astype(np.float32),
             ape=(rng.standard_normal((m, c * d)) * 0.5).astype(np.float32))
    return z


def _x_reference(m: int, z: dict) -> dict:
    """``compress`` with ``kernels="reference"`` (the XLA path) on the ``x`` case ``z``."""
    import jax
    import jax.numpy as jnp

    from dsv4_jax.modeling.compressor import compress
    from dsv4_jax.modeling.layers import rope_freqs

    cfg = _cfg(z["norm"].shape[0], 64, "reference")
    fn = jax.jit(lambda w, x, *a: compress(cfg, w, x, *a, m, rope_freqs(cfg, m), indexer=False))
    res = fn(_x_weights(z), jnp.asarray(z["x"], jnp.bfloat16), _cache(z), jnp.asarray(z["kv_buf"]),
             jnp.asarray(z["sc_buf"]), jnp.asarray(z["pos"]), jnp.asarray(z["n_new"]))
    return _as_numpy(*res)


def test_interpreter_matches_reference(tmp_path):
    """Both ratios at d = 128 (64 nope + 64 RoPE dims): the kernel directly, and through ``compress``."""
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    arrays, states, xs = {}, [], []
    for i, (m, rows) in enumerate(CPU_CASES):
        z = _state(m, rows, 128, N_ENTRIES, SEED + i)
        z["cos"], z["sin"] = _cos_sin(_cfg(128, 64), m, z["pos"])
        states.append(z)
        arrays.update({f"{i}_{k}": v for k, v in z.items()})
        x = _x_case(m, rows, 128, SEED + 10 + i)
        xs.append(x)
        arrays.update({f"x{i}_{k}": v for k, v in x.items()})
    out = triton_shim.interpret(__file__, arrays, tmp_path)
    for i, (m, _) in enumerate(CPU_CASES):
        z = states[i]
        got = {k: out[f"{i}_{k}"] for k in ("codes", "scales", "rope", "kv_buf", "sc_buf")}
        wr = _written(z["pos"], z["n_new"], m, N_ENTRIES)
        ref = _reference(_cfg(128, 64), m, z)
        codes = ref["codes"][wr] & 0x7F
        assert np.any((codes > 0) & (codes < 8)) and np.any(codes == 0), f"m={m}: no subnormal or zero e4m3 codes"
        frac = _check(got, ref, wr, f"run_torch m={m}", min_exact=1.0)
        print(f"m={m}: bit-exact fractions of the written entries {frac}")
        got = {k: out[f"x{i}_{k}"] for k in ("codes", "scales", "rope", "kv_buf", "sc_buf")}
        frac = _check(got, _x_reference(m, xs[i]), wr, f"compress m={m}", min_exact=1.0)
        print(f"compress m={m}: bit-exact fractions of the written entries {frac}")



def test_cpu_modes_give_the_reference():
    """On a CPU backend ``compress`` keeps the XLA path for ``"auto"`` (bit for bit ``"reference"``), and
    ``compress_decode`` (the kernel module's dispatcher) is its reference there; for both compressors."""
    import jax
    import jax.numpy as jnp

    from dsv4_jax.kernels.compressor_step import compress_decode
    from dsv4_jax.modeling.compressor import _project, compress
    from dsv4_jax.modeling.layers import rope_freqs

    m, rows = CPU_CASES[0]
    z = _x_case(m, rows, 128, SEED)
    ref = _x_reference(m, z)
    cfg, w, x = _cfg(128, 64, "auto"), _x_weights(z), jnp.asarray(z["x"], jnp.bfloat16)
    freqs = rope_freqs(cfg, m)
    args = (_cache(z), jnp.asarray(z["kv_buf"]), jnp.asarray(z["sc_buf"]), jnp.asarray(z["pos"]),
            jnp.asarray(z["n_new"]))
    auto = _as_numpy(*jax.jit(lambda x, *a: compress(cfg, w, x, *a, m, freqs, indexer=False))(x, *args))
    kv, sc = _project(w, x, jnp.asarray(z["pos"]), m)
    direct = _as_numpy(*jax.jit(lambda kv, sc, *a: compress_decode(cfg, w, kv, sc, *a, m, freqs))(
        kv[:, 0], sc[:, 0], *args))
    for k in ref:
        np.testing.assert_array_equal(auto[k].view(np.uint8), ref[k].view(np.uint8), err_msg=f"auto {k}")
        np.testing.assert_array_equal(direct[k].view(np.uint8), ref[k].view(np.uint8), err_msg=f"direct {k}")
    z.update({k: v for k, v in _idx_state(rows, 128, N_ENTRIES, SEED).items() if k in ("packed", "scale")})
    ref = _idx_x_reference(z)  # the indexer's compressor (Fp4Tensor cache): the same
    args = (_fp4_cache(z), *args[1:])
    auto = _idx_numpy(*jax.jit(lambda x, *a: compress(cfg, w, x, *a, m, freqs, indexer=True))(x, *args))
    direct = _idx_numpy(*jax.jit(lambda kv, sc, *a: compress_decode(cfg, w, kv, sc, *a, m, freqs, indexer=True))(
        kv[:, 0], sc[:, 0], *args))
    for k in ref:
        np.testing.assert_array_equal(auto[k].view(np.uint8), ref[k].view(np.uint8), err_msg=f"indexer auto {k}")
        np.testing.assert_array_equal(direct[k].view(np.uint8), ref[k].view(np.uint8), err_msg=f"indexer direct {k}")


def test_bad_shapes_are_refused():
    """The launcher names the tensor whose shape or dtype does not fit (before anything is launched), for both
    variants."""
    import jax.numpy as jnp

    from dsv4_jax.kernels.compressor_step import compress_decode_triton

    m, rows = CPU_CASES[0]
    z = _state(m, rows, 128, N_ENTRIES, SEED)
    cfg = _cfg(128, 64)
    cos, sin = _cos_sin(cfg, m, z["pos"])
    args = dict(norm=jnp.asarray(z["norm"], jnp.bfloat16), kv_new=jnp.asarray(z["kv_new"]),
                sc_new=jnp.asarray(z["sc_new"]), cache=_cache(z), kv_buf=jnp.asarray(z["kv_buf"]),
                score_buf=jnp.asarray(z["sc_buf"]), pos=jnp.asarray(z["pos"]), n_new=jnp.asarray(z["n_new"]),
                ratio=m, cos=jnp.asarray(cos), sin=jnp.asarray(sin))
    bad = [("kv_new", dict(kv_new=args["kv_new"][:, :128])), ("score_buf", dict(score_buf=args["score_buf"][:, :4])),
           ("kv_buf", dict(kv_buf=args["kv_buf"].astype(jnp.bfloat16))), ("n_new", dict(n_new=args["n_new"][:3])),
           ("ratio", dict(ratio=8)), ("power of two", dict(norm=jnp.ones((96,), jnp.bfloat16)))]
    for name, change in bad:
        with pytest.raises(ValueError, match=name):
            compress_decode_triton(cfg, **{**args, **change})
    from dsv4_jax.modeling.quant import Fp4Tensor

    zi = _idx_state(rows, 128, N_ENTRIES, SEED)
    args["cache"] = cache = _fp4_cache(zi)  # the indexer variant
    bad = [("cache.packed", dict(cache=Fp4Tensor(packed=cache.packed[..., :32], scale=cache.scale))),
           ("cache.scale", dict(cache=Fp4Tensor(packed=cache.packed, scale=cache.scale[:, :4]))),
           ("power of two", dict(norm=jnp.ones((96,), jnp.bfloat16))), ("kv_new", dict(kv_new=args["kv_new"][:, :8])),
           ("Fp4Tensor", dict(cache=args["kv_buf"]))]
    for name, change in bad:
        with pytest.raises(ValueError, match=name):
            compress_decode_triton(cfg, **{**args, **change})
    with pytest.raises(ValueError, match="act dtype"):
        compress_decode_triton(cfg.with_(numerics="float32"), **args)


# ---------------------------------------------------------------------------------------------- indexer
IDX_ROWS = CPU_CASES[0][1]  # the indexer's compressor: m = 4 with overlap; the rows of the m = 4 attention case


def _idx_state(rows, d: int, n_entries: int, seed: int) -> dict:
    """:func:`_state` (m = 4) with the indexer's cache instead of the attention one: random packed e2m1 bytes
    ``[B, N, d/2]`` and e8m0 bytes ``[B, N, d/32]``."""
    z = _state(4, rows, d, n_entries, seed)
    for k in ("codes", "scales", "rope"):
        del z[k]
    rng = np.random.default_rng(seed + 1)
    B = len(rows)
    z.update(packed=rng.integers(0, 256, (B, n_entries, d // 2), dtype=np.uint8),
             scale=rng.integers(110, 135, (B, n_entries, d // 32), dtype=np.uint8))
    return z


def _fp4_cache(z: dict):
    import jax.numpy as jnp

    from dsv4_jax.modeling.quant import Fp4Tensor

    return Fp4Tensor(packed=jnp.asarray(z["packed"]), scale=jnp.asarray(z["scale"]))


def _idx_numpy(cache, kvb, scb) -> dict:
    return dict(packed=np.asarray(cache.packed), scale=np.asarray(cache.scale), kv_buf=np.asarray(kvb),
                sc_buf=np.asarray(scb))


def _idx_reference(cfg, z: dict) -> dict:
    """The XLA reference (``compress_projected(..., indexer=True)``) on the state ``z``, numpy."""
    import jax
    import jax.numpy as jnp

    from dsv4_jax.kernels.compressor_step import compress_decode_reference
    from dsv4_jax.modeling.layers import rope_freqs

    fn = jax.jit(lambda *a: compress_decode_reference(cfg, *a, 4, rope_freqs(cfg, 4), indexer=True))
    res = fn(_weights(z["norm"]), jnp.asarray(z["kv_new"]), jnp.asarray(z["sc_new"]), _fp4_cache(z),
             jnp.asarray(z["kv_buf"]), jnp.asarray(z["sc_buf"]), jnp.asarray(z["pos"]), jnp.asarray(z["n_new"]))
    return _idx_numpy(*res)


def _idx_x_reference(z: dict) -> dict:
    """``compress(..., indexer=True)`` with ``kernels="reference"`` on the ``x`` case ``z``."""
    import jax
    import jax.numpy as jnp

    from dsv4_jax.modeling.compressor import compress
    from dsv4_jax.modeling.layers import rope_freqs

    cfg = _cfg(z["norm"].shape[0], 64, "reference")
    fn = jax.jit(lambda w, x, *a: compress(cfg, w, x, *a, 4, rope_freqs(cfg, 4), indexer=True))
    res = fn(_x_weights(z), jnp.asarray(z["x"], jnp.bfloat16), _fp4_cache(z), jnp.asarray(z["kv_buf"]),
             jnp.asarray(z["sc_buf"]), jnp.asarray(z["pos"]), jnp.asarray(z["n_new"]))
    return _idx_numpy(*res)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """Packed bytes ``[..., d/2]`` -> the e2m1 codes ``[..., d]`` (low nibble = even dim, the Fp4Tensor layout)."""
    return np.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def _fp4_values(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Written entries ``packed [W, d/2]``, ``scale [W, d/32]`` -> their values ``[W, d/32, 32]`` (exact)."""
    from dsv4_jax.modeling.quant import E2M1_VALUES

    v = E2M1_VALUES[_nibbles(packed).astype(np.int64)].reshape(*scale.shape, 32)
    return v * np.exp2(scale.astype(np.float64) - 127.0)[..., None]


def _check_fp4(got: dict, ref: dict, written: np.ndarray, what: str, min_exact: float = MIN_EXACT) -> dict:
    """The indexer variant's check. Exact: the buffers and the entries not ``written [B, N]``. The written entries:
    the kernel's arithmetic up to the RoPE output is the attention variant's (the same few-ulp freedom: ``exp``,
    the denominator's and the norm's sums, FMAs on GPUs), and after it the Hadamard butterflies, the scale, the bf16
    rounding and the FP4 snap are the reference's operations in the reference's order (exact given the same RoPE
    output). A RoPE output one bf16 ulp off moves every rotated value by ~2**-8 / sqrt(d) of its size, which moves
    some of their bf16 roundings by one ulp, and that moves an e2m1 code by at most one step (at most half the
    value, or half the scale below 1: the subnormal step 0.5) or a block's scale when its maximum sits on a
    power-of-two boundary. Hence per value ``|got - ref| <= 2**-1 max(|got|, |ref|) + 2**-1 max(scales)`` and at
    least ``min_exact`` of the codes and all but ``max(1, 3%)`` of the scales bit for bit; on the CPU everything bit
    for bit (``min_exact = 1``: as the attention variant, measured exact). A swapped nibble order, a wrong slot,
    window, position or sign breaks the exact fractions (and mostly the bound)."""
    for k in ("kv_buf", "sc_buf"):
        np.testing.assert_array_equal(got[k].view(np.uint32), ref[k].view(np.uint32), err_msg=f"{what}: {k}")
    assert written.any(), f"{what}: no case writes an entry"
    for k in ("packed", "scale"):  # entries nobody writes: untouched
        np.testing.assert_array_equal(got[k][~written], ref[k][~written], err_msg=f"{what}: unwritten {k}")
    gs, rs = got["scale"][written], ref["scale"][written]  # [W, d/32]
    gv, rv = _fp4_values(got["packed"][written], gs), _fp4_values(ref["packed"][written], rs)
    smax = np.exp2(np.maximum(gs, rs).astype(np.float64) - 127.0)[..., None]
    bad = np.abs(gv - rv) > 0.5 * np.maximum(np.abs(gv), np.abs(rv)) + 0.5 * smax
    assert not bad.any(), f"{what}: {bad.sum()} values off by more than one e2m1 step, e.g. {gv[bad][:4]} vs " \
                          f"{rv[bad][:4]}"
    frac = dict(codes=float(np.mean(_nibbles(got["packed"][written]) == _nibbles(ref["packed"][written]))),
                scales=float(np.mean(gs == rs)))
    scale_ok = 1.0 if min_exact == 1.0 else min(min_exact, 1.0 - 1.0 / gs.size)  # one block's scale may flip
    assert frac["codes"] >= min_exact and frac["scales"] >= scale_ok, \
        f"{what}: bit-exact fractions {frac} below {min_exact}"
    return frac


def _swap_nibbles(got: dict) -> dict:
    """``got`` with the two codes of every byte exchanged: the high nibble as the even dim (a wrong layout)."""
    return {**got, "packed": (got["packed"] >> 4) | ((got["packed"] & 15) << 4)}


def _interpret_indexer(z: dict, path: str) -> None:
    """Subprocess body of the indexer test: (1) the kernel through ``run_torch`` (``rope=None``); (2) the jax
    launcher under the shim through ``compress(..., indexer=True)`` (``kernels="triton"``) on the ``x`` case."""
    import torch

    import dsv4_jax.kernels.compressor_step as cs
    import dsv4_jax.modeling.compressor as comp

    a = {k[2:]: v for k, v in z.items() if k.startswith("0_")}
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in a.items()}
    cfg = _cfg(a["norm"].shape[0], 64)
    cs.run_torch(cfg, t["norm"].to(torch.bfloat16), t["kv_new"], t["sc_new"], t["packed"], t["scale"], None,
                 t["kv_buf"], t["sc_buf"], t["pos"], t["n_new"], 4, t["cos"], t["sin"])
    out = {f"0_{k}": t[k].numpy() for k in ("packed", "scale", "kv_buf", "sc_buf")}
    triton_shim.install(target="cpu")
    import jax
    import jax.numpy as jnp

    from dsv4_jax.modeling.layers import rope_freqs

    a = {k[2:]: v for k, v in z.items() if k.startswith("x_")}
    cfg = _cfg(a["norm"].shape[0], 64, "triton")
    w = _x_weights(a)
    step = jax.jit(lambda x, cache, kvb, scb, pos, nn: comp.compress(cfg, w, x, cache, kvb, scb, pos, nn, 4,
                                                                     rope_freqs(cfg, 4), indexer=True))
    res = step(jnp.asarray(a["x"], jnp.bfloat16), _fp4_cache(a), jnp.asarray(a["kv_buf"]), jnp.asarray(a["sc_buf"]),
               jnp.asarray(a["pos"]), jnp.asarray(a["n_new"]))
    names = [r["kernel"] for r in triton_shim.LAUNCHES]
    assert "_compress_step_indexer_kernel" in names, f"compress(indexer=True) did not launch the kernel: {names}"
    out.update({f"x_{k}": v for k, v in _idx_numpy(*res).items()})
    np.savez(path + ".out.npz", **out)


def test_interpreter_indexer_matches_reference(tmp_path):
    """The indexer variant (Hadamard, FP4 snap, ``Fp4Tensor`` cache) at d = 128 (64 RoPE dims), m = 4: the kernel
    directly and through ``compress``, bit for bit the XLA reference on the CPU (``_check_fp4``); the rows complete
    the first window (junk in the absent previous window's slots), later windows, the cache's last entry and one
    past it, others complete nothing or bring no token. And the check fails on a swapped nibble order."""
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    d = 128
    z = _idx_state(IDX_ROWS, d, N_ENTRIES, SEED + 20)
    z["cos"], z["sin"] = _cos_sin(_cfg(d, 64), 4, z["pos"])
    x = _x_case(4, IDX_ROWS, d, SEED + 30)
    x.update({k: v for k, v in _idx_state(IDX_ROWS, d, N_ENTRIES, SEED + 30).items() if k in ("packed", "scale")})
    for k in ("codes", "scales", "rope"):
        del x[k]
    arrays = {"indexer": np.ones(1), **{f"0_{k}": v for k, v in z.items()}, **{f"x_{k}": v for k, v in x.items()}}
    out = triton_shim.interpret(__file__, arrays, tmp_path)
    wr = _written(z["pos"], z["n_new"], 4, N_ENTRIES)
    assert wr[:, 0].any() and wr[:, -1].any() and np.any(z["pos"] // 4 >= N_ENTRIES), "cases missing"
    ref = _idx_reference(_cfg(d, 64), z)
    codes = _nibbles(ref["packed"][wr])
    assert all(np.any(np.isin(codes, c)) for c in ((0, 8), (1, 9), (7, 15), tuple(range(8, 16)))), \
        "the reference entries lack zero, subnormal, maximal or negative e2m1 codes"
    got = {k: out[f"0_{k}"] for k in ref}
    frac = _check_fp4(got, ref, wr, "run_torch indexer", min_exact=1.0)
    print(f"indexer: bit-exact fractions of the written entries {frac}")
    for min_exact in (1.0, MIN_EXACT):  # the check fails on the wrong nibble order, exact or with the GPU bounds
        with pytest.raises(AssertionError):
            _check_fp4(_swap_nibbles(got), ref, wr, "swapped nibbles", min_exact=min_exact)
    got = {k: out[f"x_{k}"] for k in ref}
    frac = _check_fp4(got, _idx_x_reference(x), wr, "compress indexer", min_exact=1.0)
    print(f"compress indexer: bit-exact fractions of the written entries {frac}")


# ---------------------------------------------------------------------------------------------- GPU
def _gpu_rows(m: int, B: int, seed: int):
    """``B`` (pos, n_new) rows: completions of the first and of later windows (one of them the cache's last entry),
    steps that complete nothing, ``n_new = 0`` rows."""
    if B == 1:
        return [(5 * m - 1, 1)]
    rng = np.random.default_rng(seed)
    rows = [(m - 1, 1), (2 * m - 1, 1), (GPU_ENTRIES * m - 1, 1), (3 * m - 1, 0), (m + 1, 1), (0, 1)]
    while len(rows) < B:
        w = int(rng.integers(0, GPU_ENTRIES))
        rows.append((w * m + int(rng.choice([m - 1, m - 1, int(rng.integers(0, m))])), int(rng.random() < 0.85)))
    return rows


@pytest.mark.parametrize("B", [1, 32])
@pytest.mark.parametrize("m", [4, 128])
def test_gpu_matches_reference(m, B):
    """V4-Flash shapes (d = 512: 448 FP8 + 64 RoPE dims), both ratios, batch 1 and 32: one step of the jitted
    launcher against the jitted XLA reference, then ``m + 2`` further steps of both on their own outputs (the
    in-place buffers carried from step to step), and the dispatcher's ``"auto"`` path equal to the launcher's."""
    from dsv4_jax.kernels import triton_unavailable

    why = triton_unavailable()
    if why is not None:
        pytest.skip(f"compressor decode kernel GPU test: {why}")
    import jax
    import jax.numpy as jnp

    from dsv4_jax.config import Config
    from dsv4_jax.kernels.compressor_step import compress_decode, compress_decode_reference, compress_decode_triton
    from dsv4_jax.modeling.layers import rope_cos_sin, rope_freqs

    cfg = Config.v4_flash(kernels="auto")
    d, freqs = cfg.head_dim, rope_freqs(cfg, m)
    z = _state(m, _gpu_rows(m, B, SEED), d, GPU_ENTRIES, SEED + m + B)
    w = _weights(z["norm"])

    @jax.jit
    def kern(kvn, scn, cache, kvb, scb, pos, nn):
        cos, sin = rope_cos_sin(freqs, (pos // m) * m)
        return compress_decode_triton(cfg, w.norm, kvn, scn, cache, kvb, scb, pos, nn, m, cos, sin)

    ref = jax.jit(lambda *a: compress_decode_reference(cfg, w, *a, m, freqs))
    auto = jax.jit(lambda *a: compress_decode(cfg, w, *a, m, freqs))
    args = (jnp.asarray(z["kv_new"]), jnp.asarray(z["sc_new"]), _cache(z), jnp.asarray(z["kv_buf"]),
            jnp.asarray(z["sc_buf"]), jnp.asarray(z["pos"]), jnp.asarray(z["n_new"]))
    got = _as_numpy(*kern(*args))
    _check(got, _as_numpy(*ref(*args)), _written(z["pos"], z["n_new"], m, GPU_ENTRIES), f"GPU m={m} B={B}")
    via_auto = _as_numpy(*auto(*args))
    for k in got:
        np.testing.assert_array_equal(via_auto[k].view(np.uint8), got[k].view(np.uint8), err_msg=f"auto {k}")

    rng = np.random.default_rng(SEED)  # m + 2 more steps: every row crosses a window end
    st_k = st_r = args[2:5]
    pos, c = jnp.asarray(z["pos"]), 2 if m == 4 else 1
    nn = jnp.ones_like(pos)
    written = np.zeros((B, GPU_ENTRIES), bool)
    for _ in range(m + 2):
        written |= _written(np.asarray(pos), np.asarray(nn), m, GPU_ENTRIES)
        kvn = jnp.asarray(rng.standard_normal((B, c * d)) * 1.5, jnp.float32)
        scn = jnp.asarray(rng.standard_normal((B, c * d)) * 2.0, jnp.float32)
        st_k = kern(kvn, scn, *st_k, pos, nn)
        st_r = ref(kvn, scn, *st_r, pos, nn)
        pos = pos + 1
    _check(_as_numpy(*st_k), _as_numpy(*st_r), written, f"GPU m={m} B={B}, {m + 2} steps")


@pytest.mark.parametrize("B", [1, 32])
def test_gpu_indexer_matches_reference(B):
    """The indexer variant at V4-Flash shapes (d = 128 = index_head_dim, 64 RoPE dims, m = 4, ``Fp4Tensor`` cache),
    batch 1 and 32: one step of the jitted launcher against the jitted XLA reference (``_check_fp4``'s bounds), then
    6 further steps of both on their own outputs, and the dispatcher's ``"auto"`` path equal to the launcher's."""
    from dsv4_jax.kernels import triton_unavailable

    why = triton_unavailable()
    if why is not None:
        pytest.skip(f"compressor decode kernel (indexer) GPU test: {why}")
    import jax
    import jax.numpy as jnp

    from dsv4_jax.config import Config
    from dsv4_jax.kernels.compressor_step import compress_decode, compress_decode_reference, compress_decode_triton
    from dsv4_jax.modeling.layers import rope_cos_sin, rope_freqs

    cfg = Config.v4_flash(kernels="auto")
    m, d, freqs = 4, cfg.index_head_dim, rope_freqs(cfg, 4)
    z = _idx_state(_gpu_rows(m, B, SEED), d, GPU_ENTRIES, SEED + 7 + B)
    w = _weights(z["norm"])

    @jax.jit
    def kern(kvn, scn, cache, kvb, scb, pos, nn):
        cos, sin = rope_cos_sin(freqs, (pos // m) * m)
        return compress_decode_triton(cfg, w.norm, kvn, scn, cache, kvb, scb, pos, nn, m, cos, sin)

    ref = jax.jit(lambda *a: compress_decode_reference(cfg, w, *a, m, freqs, indexer=True))
    auto = jax.jit(lambda *a: compress_decode(cfg, w, *a, m, freqs, indexer=True))
    args = (jnp.asarray(z["kv_new"]), jnp.asarray(z["sc_new"]), _fp4_cache(z), jnp.asarray(z["kv_buf"]),
            jnp.asarray(z["sc_buf"]), jnp.asarray(z["pos"]), jnp.asarray(z["n_new"]))
    got = _idx_numpy(*kern(*args))
    frac = _check_fp4(got, _idx_numpy(*ref(*args)), _written(z["pos"], z["n_new"], m, GPU_ENTRIES),
                      f"GPU indexer B={B}")
    print(f"GPU indexer B={B}: bit-exact fractions of the written entries {frac}")
    via_auto = _idx_numpy(*auto(*args))
    for k in got:
        np.testing.assert_array_equal(via_auto[k].view(np.uint8), got[k].view(np.uint8), err_msg=f"auto {k}")

    rng = np.random.default_rng(SEED)  # m + 2 more steps: every row crosses a window end
    st_k = st_r = args[2:5]
    pos = jnp.asarray(z["pos"])
    nn = jnp.ones_like(pos)
    written = np.zeros((B, GPU_ENTRIES), bool)
    for _ in range(m + 2):
        written |= _written(np.asarray(pos), np.asarray(nn), m, GPU_ENTRIES)
        kvn = jnp.asarray(rng.standard_normal((B, 2 * d)) * 1.5, jnp.float32)
        scn = jnp.asarray(rng.standard_normal((B, 2 * d)) * 2.0, jnp.float32)
        st_k = kern(kvn, scn, *st_k, pos, nn)
        st_r = ref(kvn, scn, *st_r, pos, nn)
        pos = pos + 1
    _check_fp4(_idx_numpy(*st_k), _idx_numpy(*st_r), written, f"GPU indexer B={B}, {m + 2} steps")


# ---------------------------------------------------------------------------------------------- sm_90
@pytest.mark.parametrize("m, indexer", [(4, False), (128, False), (4, True)])
def test_sm90_compile_fits(m, indexer):
    """The kernel at V4-Flash shapes compiled for an H200 (sm_90) without a GPU: it fits the shared memory and
    does not spill registers (``tests/test_kernels_sm90.py``'s compiler). Both ratios of the attention variant
    (d = 512) and the indexer variant (d = 128, m = 4: Hadamard and FP4 snap)."""
    pytest.importorskip("triton")
    from test_kernels_sm90 import SMEM_SM90, _compile

    from dsv4_jax.config import Config
    from dsv4_jax.kernels import compressor_step as cs

    cfg = Config.v4_flash()
    d = cfg.index_head_dim if indexer else cfg.head_dim
    meta = cs._meta(cfg, d, m, 1 << 18, cs.plan(d, m), indexer)
    options = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
    f32 = ("kvn_ptr", "scn_ptr", "cos_ptr", "sin_ptr", "kvb_in", "scb_in", "kvb_ptr", "scb_ptr")
    ptrs = {**{a: "*fp32" for a in f32}, "pos_ptr": "*i32", "nnew_ptr": "*i32", "nw_ptr": "*bf16"}
    if indexer:
        ptrs.update({a: "*u8" for a in ("packed_in", "scale_in", "packed_ptr", "scale_ptr")})
        kernel = cs._compress_step_indexer_kernel
    else:
        ptrs.update(codes_in="*fp8e4nv", scales_in="*u8", rope_in="*bf16", codes_ptr="*fp8e4nv", scales_ptr="*u8",
                    rope_ptr="*bf16")
        kernel = cs._compress_step_kernel
    smem, spill = _compile(kernel, ptrs, meta, options)
    what = "indexer" if indexer else "attention"
    assert smem <= SMEM_SM90 and spill == 0, f"compressor step ({what}) m={m}: {smem} B shared, {spill} B spills"


if __name__ == "__main__":  # the interpreter subprocess
    _interpret_main(sys.argv[1])
