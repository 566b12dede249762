"""Shared cases, references and checks of the compressor decode-step kernel tests (``test_kernels_compressor.py``:
the attention variant; ``test_kernels_compressor_indexer.py``: the indexer variant). Their docstrings state the
cases and the tolerances; :func:`_check` and :func:`_check_fp4` implement them."""

from __future__ import annotations

import numpy as np

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
    z = dict(
        kv_new=(rng.standard_normal((B, c * d)) * 1.5 * tiny).astype(np.float32),
        sc_new=(rng.standard_normal((B, c * d)) * 2.0).astype(np.float32),
        kv_buf=kv_buf, sc_buf=sc_buf, pos=pos, n_new=np.array([n for _, n in rows], np.int32),
        codes=codes, scales=rng.integers(110, 135, (B, n_entries, dn // 64), dtype=np.uint8),
        rope=rng.standard_normal((B, n_entries, 64)).astype(ml_dtypes.bfloat16).astype(np.float32),
        norm=(1.0 + 0.25 * rng.standard_normal(d)).astype(ml_dtypes.bfloat16).astype(np.float32))
    z["ape"] = (rng.standard_normal((m, c * d)) * 0.5).astype(np.float32)  # added to sc_new by both paths
    return z


def _weights(z: dict):
    """The weights the decode step reads (the norm and ``ape``; the projections are already made)."""
    import jax.numpy as jnp

    from dsv4_jax.modeling.weights import CompressorWeights

    return CompressorWeights(ape=jnp.asarray(z["ape"]), wkv=None, wgate=None, norm=jnp.asarray(z["norm"], jnp.bfloat16))


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
    cache, kvb, scb = fn(_weights(z), jnp.asarray(z["kv_new"]), jnp.asarray(z["sc_new"]), _cache(z),
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
    res = fn(_weights(z), jnp.asarray(z["kv_new"]), jnp.asarray(z["sc_new"]), _fp4_cache(z),
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
