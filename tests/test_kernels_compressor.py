"""The compressor's decode-step kernel (``dsv4_jax/kernels/compressor_step.py``) against the XLA reference
(``modeling/compressor.py::compress_projected``, what ``compress`` computes for a one-token chunk).

CPU: the ``@triton.jit`` kernel under Triton's interpreter in a subprocess (``TRITON_INTERPRET=1`` must be set
before triton is imported) on torch CPU tensors, and the jax launcher (``input_output_aliases``, the byte view of
the e4m3 codes, the dispatch in ``compress``) through ``tests/triton_shim.py``; GPU: the jitted launcher at V4-Flash
shapes (skipped without a GPU); sm_90: the kernel compiled for an H200 without a GPU (no spills). This module: the
attention compressor's variant (FP8, ``Fp8Cache``), the CPU dispatch and the bad-shape checks of both variants, and
both variants' sm_90 compile; ``test_kernels_compressor_indexer.py``: the indexer's variant (Hadamard and FP4,
``Fp4Tensor``). Cases, references and checks shared by both: ``tests/compressor_cases.py``.

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
from compressor_cases import (  # noqa: E402
    CPU_CASES,
    GPU_ENTRIES,
    N_ENTRIES,
    SEED,
    _as_numpy,
    _cache,
    _cfg,
    _check,
    _cos_sin,
    _fp4_cache,
    _gpu_rows,
    _idx_numpy,
    _idx_state,
    _idx_x_reference,
    _reference,
    _state,
    _weights,
    _written,
    _x_case,
    _x_reference,
    _x_weights,
)


# ---------------------------------------------------------------------------------------------- interpreter
def _interpret_main(path: str) -> None:
    """Subprocess body: (1) the kernel through ``run_torch`` on every CPU case; (2) the jax launcher under the shim
    through ``compress`` (``kernels="triton"``) on the first chunk of the ``x`` cases."""
    import torch

    import dsv4_jax.kernels.compressor_step as cs
    import dsv4_jax.modeling.compressor as comp

    z = dict(np.load(path))
    out = {}
    for i, (m, _) in enumerate(CPU_CASES):
        a = {k[len(f"{i}_"):]: v for k, v in z.items() if k.startswith(f"{i}_")}
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in a.items()}
        d = a["norm"].shape[0]
        cfg = _cfg(d, 64)
        rope = t["rope"].to(torch.bfloat16)
        codes = t["codes"].view(torch.float8_e4m3fn)  # the same memory, typed as the cache's codes
        cs.run_torch(cfg, t["norm"].to(torch.bfloat16), t["kv_new"], t["sc_new"], codes, t["scales"], rope,
                     t["kv_buf"], t["sc_buf"], t["pos"], t["n_new"], m, t["cos"], t["sin"], t["ape"])
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
    kv, sc = _project(w, x, jnp.asarray(z["pos"]), m, "reference", with_ape=False)  # compress_decode adds it
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


def test_tensor_core_projection(monkeypatch):
    """Prefill chunks (``TC_MIN_ROWS`` rows and more) of bf16 activations take the compressor projection as a bf16 dot
    with fp32 accumulation off the CPU; never with ``kernels="reference"``, for decode or speculative-verify rows, in
    float32 numerics or on a CPU backend. Both forms are fp32 sums of the same exact products (a bf16 x bf16 product
    is exact in fp32), so each must lie within the fp32 dot's error bound ``K * 2**-24 * sum |x_k w_k|`` of the
    float64 value (one run forces the rule's backend check, so the CPU runs the tensor-core form's XLA program)."""
    import types

    import jax
    import jax.numpy as jnp

    from dsv4_jax.modeling import compressor as cm

    rng = np.random.default_rng(SEED)
    K, N, S, m = 512, 96, cm.TC_MIN_ROWS, 4
    w = types.SimpleNamespace(wkv=jnp.asarray(rng.standard_normal((N, K)) * 0.05, jnp.bfloat16),
                              wgate=jnp.asarray(rng.standard_normal((N, K)) * 0.05, jnp.bfloat16),
                              ape=jnp.asarray(rng.standard_normal((m, N)), jnp.float32))
    x = jnp.asarray(rng.standard_normal((2, S, K)) * np.exp2(rng.integers(-4, 4, (2, S, 1))), jnp.bfloat16)
    pos = jnp.asarray([0, 37], jnp.int32)
    assert not cm.tensor_core_project("auto", w, x) or jax.default_backend() != "cpu"
    monkeypatch.setattr(cm.jax, "default_backend", lambda: "gpu")
    assert cm.tensor_core_project("auto", w, x) and cm.tensor_core_project("triton", w, x)
    assert not cm.tensor_core_project("reference", w, x)
    assert not cm.tensor_core_project("auto", w, x[:, :cm.TC_MIN_ROWS - 1])  # decode and verify rows
    assert not cm.tensor_core_project("auto", w, x.astype(jnp.float32))  # float32 numerics
    xd, wd = np.asarray(x, np.float64), np.asarray(w.wkv, np.float64)
    want, bound = xd @ wd.T, np.abs(xd) @ np.abs(wd).T * K * 2.0**-24
    for kernels in ("auto", "reference"):
        kv, sc = jax.jit(lambda x, p, k=kernels: cm._project(w, x, p, m, k))(x, pos)
        err = np.abs(np.asarray(kv, np.float64) - want)
        assert (err <= bound).all(), f"{kernels}: projection beyond the fp32 dot's bound ({(err / bound).max():.2f})"
        assert sc.shape == kv.shape and np.isfinite(np.asarray(sc)).all()


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
                ratio=m, cos=jnp.asarray(cos), sin=jnp.asarray(sin), ape=jnp.asarray(z["ape"]))
    bad = [("kv_new", dict(kv_new=args["kv_new"][:, :128])), ("score_buf", dict(score_buf=args["score_buf"][:, :4])),
           ("kv_buf", dict(kv_buf=args["kv_buf"].astype(jnp.bfloat16))), ("n_new", dict(n_new=args["n_new"][:3])),
           ("ratio", dict(ratio=8)), ("power of two", dict(norm=jnp.ones((96,), jnp.bfloat16))),
           ("ape", dict(ape=args["ape"][:2]))]
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


# ---------------------------------------------------------------------------------------------- GPU
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
    w = _weights(z)

    @jax.jit
    def kern(kvn, scn, cache, kvb, scb, pos, nn):
        cos, sin = rope_cos_sin(freqs, (pos // m) * m)
        return compress_decode_triton(cfg, w.norm, kvn, scn, cache, kvb, scb, pos, nn, m, cos, sin, w.ape)

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
    f32 = ("kvn_ptr", "scn_ptr", "ape_ptr", "cs_ptr", "kvb_in", "scb_in", "kvb_ptr", "scb_ptr")
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
