"""The FP4 GEMV path's activation kernel (``fp4_moe_gemv._act_words_kernel``) against its XLA form
(``fp4_moe_gemv.act_words``: ``quant.fp8_act_quant`` per 1x128, codes times 2**24 permuted within each K step, and
the groups' factors): bit for bit. Both sides quantize with the same exact operations (a power-of-two scale from the
block's amax bits, one correctly rounded ``x / s``, nearest-even rounding on the e4m3 grid), so any difference is a
bug: a wrong permutation, block, scale exponent, rounding or sign of zero.

Inputs: mixed magnitudes (``normal * 10**uniform(-6, 3)`` per element, times a per-block factor down to 1e-8 so that
some blocks sit under the scale's floor 1e-4), bf16 (what the model passes) and fp32, plus hand-made blocks: a row
and a block of zeros (``-0.0`` among them), a block of negative values, exact e4m3 rounding ties (normal and
subnormal), bf16 subnormals, a block under the floor, amax exactly 448 and its bf16 neighbours (the scale's rounding
up), and infinities (the reference's scale is ``inf`` there, its codes ``+-0`` and NaN). NaN has no reference to
match: XLA's CPU max reduction drops or keeps a NaN depending on the shape, so the kernel's defined behaviour (the
scale of a NaN-propagating amax, as XLA gives at most shapes) is checked on its own.

CPU: the ``@triton.jit`` kernel under Triton's interpreter in a subprocess, on torch CPU tensors, with the GPU plan
(one 128-wide block per program) and the interpreter's (up to 8). GPU: the jax launcher at V4-Flash and V4-Pro
widths (skipped without a GPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton_shim  # noqa: E402

SEED = 97
# (rows, K, NG, plan target: "gpu" one block per program, "cpu" up to 8; input dtype)
CASES = [(1, 256, 4, "gpu", "bf16"), (1, 4096, 8, "gpu", "bf16"), (3, 256, 8, "gpu", "f32"),
         (3, 2048, 8, "cpu", "bf16"), (3, 2048, 4, "gpu", "f32"), (8, 4096, 8, "cpu", "bf16"),
         (8, 4096, 4, "cpu", "f32"), (8, 256, 4, "cpu", "bf16")]
NAN_CASE = (2, 512, 8, "gpu", "bf16")  # row 0, block 1 holds NaNs


def _ties(e0: int) -> np.ndarray:
    """128 values whose ``x / 2**e0`` are exact midpoints of the e4m3 grid (subnormal ones ``(2n + 1) * 2**-10``,
    normal ones ``2**k * (1 + (2n + 1) / 16)``, none above 448: the block's scale is ``2**e0``), both signs, zeros
    after them. Each has at most 5 significant bits: exact in bf16."""
    sub = [(2 * n + 1) * 2.0**-10 for n in range(8)]
    nrm = [2.0**k * (1 + (2 * n + 1) / 16) for k in (-6, -1, 0, 3, 8) for n in range(8 if k < 8 else 6)]
    v = np.array(sub + nrm, np.float64)
    out = np.zeros(128)
    out[:2 * len(v)] = np.concatenate([v, -v])
    return out * 2.0**e0


def _input(rows: int, K: int, seed: int, dtype: str) -> np.ndarray:
    """Random rows (see the module docstring) with the hand-made blocks where there is room (3 rows, 16 blocks), as
    fp32 values of ``dtype`` (``"bf16"``: rounded to bf16)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, K)) * 10 ** rng.uniform(-6, 3, (rows, K))
    x *= np.repeat(10 ** rng.uniform(-8, 2, (rows, K // 128)), 128, axis=1)
    if rows >= 3 and K >= 2048:
        blk = lambda r, b: (r, slice(128 * b, 128 * (b + 1)))  # noqa: E731
        x[1] = 0.0
        x[1, ::3] = -0.0
        x[blk(0, 1)] = np.where(rng.random(128) < 0.5, -0.0, 0.0)
        x[blk(0, 2)] = -np.abs(x[blk(0, 2)])
        x[blk(0, 3)] = _ties(-3)
        x[blk(0, 4)] = rng.permutation(_ties(-3))
        x[blk(0, 5)] = rng.choice([-1, 1], 128) * rng.integers(1, 128, 128) * 2.0**-133  # bf16 subnormals
        x[blk(0, 6)] = rng.standard_normal(128) * 1e-6  # amax under the floor 1e-4
        x[blk(0, 7)] = rng.standard_normal(128)
        x[0, 128 * 7 + np.array([3, 50])] = np.inf
        x[0, 128 * 7 + 51] = -np.inf
        x[blk(0, 8)] = rng.standard_normal(128)
        x[0, 128 * 8 + 9] = -np.inf
        x[0, 128 * 8 + 10] = 0.0
        for b, top in ((9, 448.0), (10, 450.0), (11, 446.0), (12, 2.0**-20 * 448)):  # 448 and its bf16 neighbours
            x[blk(2, b)] = rng.uniform(-1, 1, 128) * top
            x[2, 128 * b + 17] = -top  # the block's amax, exactly
        x[blk(2, 13)] = _ties(7)
    x = x.astype(np.float32)
    return x.astype(ml_dtypes.bfloat16).astype(np.float32) if dtype == "bf16" else x


def _nan_input() -> np.ndarray:
    rows, K, _, _, _ = NAN_CASE
    x = _input(rows, K, SEED, "bf16")
    x[0, 128:256] = x[0, :128]
    x[0, 128 + np.array([0, 7])] = np.nan
    x[0, 128 + np.array([1, 8])] = 0.0
    x[0, 128 + 2] = -0.0
    x[0, 128 + 3] = np.inf
    return x


def _reference(x: np.ndarray, ng: int, bf16: bool):
    import jax
    import jax.numpy as jnp

    from dsv4_jax.kernels.fp4_moe_gemv import act_words

    xa, xf = jax.jit(act_words, static_argnums=1)(jnp.asarray(x, jnp.bfloat16 if bf16 else jnp.float32), ng)
    return np.asarray(xa), np.asarray(xf)


def _bits(a: np.ndarray) -> np.ndarray:
    """uint32 view with every NaN as one pattern (the payload is no contract)."""
    a = np.array(a, np.float32)
    a[np.isnan(a)] = np.nan
    return a.view(np.uint32)


def _assert_bits(got, ref, what):
    for g, r, name in zip(got, ref, ("xa", "xf")):
        assert not np.isnan(g).all(), f"{what}: {name} unwritten"
        np.testing.assert_array_equal(_bits(g), _bits(r), err_msg=f"{what}: {name}")


def _check_nan_block(got, x, ng, what):
    """The kernel's NaN rule on row 0, block 1 of ``x`` (the scale the reference derives from a NaN amax, ``-0.0``:
    codes ``x / -0.0`` clipped, NaN for NaN and zeros), and the reference's bits everywhere else."""
    xa, xf = got
    ref_a, ref_f = _reference(np.where(np.isnan(x), 0.0, x).astype(np.float32), ng, True)  # the other blocks
    S = 32 * ng
    c = np.arange(x.shape[1])
    perm = c - c % S + (c % 8) * (4 * ng) + (c % S) // 8  # column -> place in xa
    blk = slice(128, 256)
    v = x[0, blk]
    want = np.where(np.isnan(v) | (v == 0), np.nan, np.where(v > 0, -448.0, 448.0) * 2.0**24).astype(np.float32)
    np.testing.assert_array_equal(_bits(xa[0, perm[blk]]), _bits(want), err_msg=f"{what}: NaN block codes")
    assert (_bits(xf[0, 4:8]) == 0x80000000).all(), f"{what}: NaN block factors {xf[0, 4:8]}"
    keep = np.ones_like(xa, bool)
    keep[0, perm[blk]] = False
    np.testing.assert_array_equal(_bits(xa[keep]), _bits(ref_a[keep]), err_msg=f"{what}: xa outside the NaN block")
    keep_f = np.ones_like(xf, bool)
    keep_f[0, 4:8] = False
    np.testing.assert_array_equal(_bits(xf[keep_f]), _bits(ref_f[keep_f]), err_msg=f"{what}: xf outside")


def _interpret_main(path: str) -> None:
    """Subprocess body: the kernel on every stored case (the torch launcher, each case's plan)."""
    import torch

    from dsv4_jax.kernels.fp4_moe_gemv import act_plan, act_words_torch

    z = dict(np.load(path))
    out = {}
    for i, (_, K, ng, target, dtype) in enumerate([*CASES, NAN_CASE]):
        x = z[f"x{i}"]
        if dtype == "bf16":  # bf16 travels as its bit pattern
            t = torch.from_numpy(x.astype(ml_dtypes.bfloat16).view(np.uint16).copy()).view(torch.bfloat16)
        else:
            t = torch.from_numpy(x.copy())
        xa, xf = act_words_torch(t, ng, act_plan(target, K))
        out[f"a{i}"], out[f"f{i}"] = xa.numpy(), xf.numpy()
    np.savez(path + ".out.npz", **out)


def test_interpreter_matches_reference_bits(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    xs = {f"x{i}": _input(r, K, SEED + i, dt) for i, (r, K, _, _, dt) in enumerate(CASES)}
    xs[f"x{len(CASES)}"] = _nan_input()
    out = triton_shim.interpret(__file__, xs, tmp_path)
    for i, (r, K, ng, target, dt) in enumerate(CASES):
        what = f"rows={r} K={K} NG={ng} plan={target} {dt}"
        _assert_bits((out[f"a{i}"], out[f"f{i}"]), _reference(xs[f"x{i}"], ng, dt == "bf16"), what)
    i = len(CASES)
    _check_nan_block((out[f"a{i}"], out[f"f{i}"]), xs[f"x{i}"], NAN_CASE[2], "NaN case")


def test_ties_are_ties():
    """The tie blocks hold what they claim: every nonzero ``x / 2**e0`` lies halfway between two e4m3 values."""
    import jax.numpy as jnp

    v = _ties(-3)[_ties(-3) != 0] * 2.0**3
    lo = np.asarray(jnp.asarray(v, jnp.float32).astype(jnp.float8_e4m3fn).astype(jnp.float32), np.float64)
    step = np.where(np.abs(v) < 2.0**-6, 2.0**-9, 2.0 ** (np.floor(np.log2(np.abs(v))) - 3))
    np.testing.assert_array_equal(np.abs(np.abs(v) - np.abs(lo)), step / 2)


def test_bad_width_refused():
    """Widths the kernel cannot tile are refused before any launch."""
    import jax.numpy as jnp

    from dsv4_jax.kernels.fp4_moe_gemv import act_words_triton

    with pytest.raises(ValueError, match="not tiled"):
        act_words_triton(jnp.zeros((1, 192), jnp.bfloat16), 4)
    with pytest.raises(ValueError, match="not tiled"):
        act_words_triton(jnp.zeros((1, 384), jnp.bfloat16), 8)  # 128-wide blocks, but not 256-wide K steps


GPU_CASES = [(model, rows) for model in ("flash", "pro") for rows in (1, 4, 32)]


@pytest.mark.parametrize("model,rows", GPU_CASES, ids=[f"{m}-R{r}" for m, r in GPU_CASES])
def test_gpu_matches_reference_bits(model, rows):
    """The jax launcher at the model's widths (D for the tokens, I for ``h``) with the GEMV plan's NG, bf16 rows as
    the GEMV path passes them, bit for bit against ``act_words`` on the GPU; the NaN rule on its own."""
    from dsv4_jax.kernels import triton_unavailable

    why = triton_unavailable()
    if why is not None:
        pytest.skip(f"act_words GPU test: {why}")
    import jax
    import jax.numpy as jnp

    import dsv4_jax as d
    from dsv4_jax.kernels.fp4_moe_gemv import act_words, act_words_triton, gemv_tiles

    cfg = d.Config.v4_flash() if model == "flash" else d.Config.v4_pro()
    D, I = cfg.dim, cfg.moe_inter_dim
    ng = gemv_tiles("sm90", D, I, rows * cfg.n_activated_experts)["NG"]
    for K in (D, I):
        x = jnp.asarray(_input(rows, K, SEED + rows, "bf16"), jnp.bfloat16)
        got = jax.jit(act_words_triton, static_argnums=1)(x, ng)
        ref = jax.jit(act_words, static_argnums=1)(x, ng)
        _assert_bits([np.asarray(a) for a in got], [np.asarray(a) for a in ref], f"{model} R={rows} K={K}")
    x = _nan_input()
    got = jax.jit(act_words_triton, static_argnums=1)(jnp.asarray(x, jnp.bfloat16), NAN_CASE[2])
    _check_nan_block([np.asarray(a) for a in got], x, NAN_CASE[2], f"{model} NaN case")


if __name__ == "__main__":  # the interpreter subprocess
    _interpret_main(sys.argv[1])
