"""The split-K sum + FP8 activation quantization kernel (``dsv4_jax/kernels/act_quant.py``) against XLA's form.

CPU: ``_sum_quant_kernel`` under Triton's interpreter (subprocess, torch CPU tensors) against
``sum_quant_reference``. The partials are multiples of 2**-8 below 2**12 in magnitude, times a power of two per row,
so that every fp32 sum of them is exact in any order: the rounded rows and their quantized values must then be the
reference's bits. Cases: 3 splits over 5 blocks (the last program three quarters masked) with an all-zero block, one
unsplit bf16 output, the SwiGLU with and without its clamp. The SwiGLU's sigmoid may differ from XLA's in the last
fp32 bit, so its rows are allowed one bf16 ulp (and must be >= 97 % the same bits); the quantized values must be,
bit for bit, ``quantize_act`` of the kernel's own rows (one quantizer).

GPU (skipped without one): the two public functions at V4-Flash and V4-Pro shapes, 1 and 4 rows, with the kernel on
(``AUTO`` patched), against the unfused path of the same GPU (``grouped_proj`` / ``linear_pair`` and XLA's
SwiGLU): rows within one bf16 ulp of it (``wo_a``'s split partials summed in another order; the SwiGLU up to 4 ulps:
both of its inputs may move by one), the values again bit for bit the quantization of the kernel's rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton_shim  # noqa: E402
from test_kernels_fp8 import _bf16_ulp  # noqa: E402

SEED = 91
# (splits, rows, columns N, SwiGLU, clamp limit, bf16 partials)
CASES = [(3, 2, 640, False, 0.0, False), (1, 3, 256, False, 0.0, True), (2, 2, 384, True, 10.0, False),
         (2, 1, 128, True, 0.0, False)]


def _partials(split: int, M: int, N: int, swiglu: bool, bf16: bool, seed: int) -> np.ndarray:
    """``[split, M, NT]`` partials whose sums are exact in fp32 (module docstring); row 0's second block is zero."""
    rng = np.random.default_rng(seed)
    NT = 2 * N if swiglu else N
    p = rng.integers(-2**12, 2**12, (split, M, NT)).astype(np.float32) * np.float32(2.0**-8)
    p *= np.exp2(rng.integers(-6, 3, (1, M, 1))).astype(np.float32)
    if N > 128:
        p[:, 0, 128:256] = 0.0
    if bf16:  # the unsplit GEMV's bf16 output: values exact in bf16
        import ml_dtypes

        p = p.astype(ml_dtypes.bfloat16).astype(np.float32)
    return p


def _reference(p: np.ndarray, N: int, swiglu: bool, limit: float):
    import jax.numpy as jnp

    from dsv4_jax.kernels.act_quant import sum_quant_reference

    y, q = sum_quant_reference(jnp.asarray(p), N, swiglu, limit)
    return np.asarray(y.astype(jnp.float32)), np.asarray(q.astype(jnp.float32))


def _quantized(y: np.ndarray) -> np.ndarray:
    import jax.numpy as jnp

    from dsv4_jax.modeling.quant import quantize_act

    return np.asarray(quantize_act(jnp.asarray(y, jnp.bfloat16)).dequant(), np.float32)


def _check(y, q, ref_y, ulps: float, what: str, same_min: float = 0.97):
    assert np.isfinite(y).all() and np.isfinite(q).all(), f"{what}: unwritten (NaN) elements"
    if ulps == 0:
        np.testing.assert_array_equal(y.view(np.uint32), ref_y.view(np.uint32), err_msg=f"{what}: rows")
    else:
        err = np.abs(y - ref_y)
        allow = ulps * _bf16_ulp(ref_y) + 2.0**-133
        assert (err <= allow).all(), f"{what}: rows off by {np.max(err / allow):.3g}x the allowance"
        same = np.mean(y.view(np.uint32) == ref_y.view(np.uint32))
        assert same >= same_min, f"{what}: only {same:.3f} of the rows bit-equal to the reference"
    np.testing.assert_array_equal(q.view(np.uint32), _quantized(y).view(np.uint32), err_msg=f"{what}: values")


def _interpret_main(path: str) -> None:
    """Subprocess body: the kernel on every stored case."""
    import torch

    from dsv4_jax.kernels.act_quant import run_torch

    z = dict(np.load(path))
    out = {}
    for i, (_, _, N, swiglu, limit, bf16) in enumerate(CASES):
        p = torch.from_numpy(z[f"p{i}"].copy())
        y, q = run_torch(p.to(torch.bfloat16) if bf16 else p, N, swiglu, limit)
        out[f"y{i}"], out[f"q{i}"] = y.numpy(), q.numpy()
    np.savez(path + ".out.npz", **out)


def test_interpreter_matches_reference(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    parts = [_partials(s, M, N, sw, bf, SEED + i) for i, (s, M, N, sw, _, bf) in enumerate(CASES)]
    out = triton_shim.interpret(__file__, {f"p{i}": p for i, p in enumerate(parts)}, tmp_path)
    for i, (_, _, N, sw, lim, _) in enumerate(CASES):
        ref_y, ref_q = _reference(parts[i], N, sw, lim)
        _check(out[f"y{i}"], out[f"q{i}"], ref_y, 1.0 if sw else 0.0, f"interpreter case {CASES[i]}")
        if not sw:  # exact sums: the values are the reference's too
            np.testing.assert_array_equal(out[f"q{i}"].view(np.uint32), ref_q.view(np.uint32))
        assert (ref_q != ref_y).any(), "the case does not round anything in the quantization"


def test_cpu_dispatch_is_the_reference():
    """On a CPU backend both public functions take the unfused path and hand back no values."""
    import jax.numpy as jnp

    from dsv4_jax.kernels.act_quant import grouped_proj_quant, swiglu_pair
    from dsv4_jax.kernels.fp8_linear import grouped_proj
    from dsv4_jax.modeling.quant import Fp8Tensor, quantize_fp8_weight_np

    rng = np.random.default_rng(SEED)
    q, s = quantize_fp8_weight_np(rng.standard_normal((256, 128)).astype(np.float32) * 0.05)
    w = Fp8Tensor(q=jnp.asarray(q), scale=jnp.asarray(s))
    o = jnp.asarray(rng.standard_normal((1, 1, 2, 128)), jnp.bfloat16)
    z, zq = grouped_proj_quant(o, w, jnp.bfloat16, kernels="auto")
    assert zq is None
    np.testing.assert_array_equal(np.asarray(z, np.float32), np.asarray(grouped_proj(o, w, jnp.bfloat16), np.float32))
    x = jnp.asarray(rng.standard_normal((1, 1, 128)), jnp.bfloat16)
    a, aq = swiglu_pair(x, w, w, None, 10.0, jnp.bfloat16, True, kernels="auto")
    assert aq is None and a.shape == (1, 1, 256) and a.dtype == jnp.bfloat16


def _fp8(rng, n: int, k: int):
    import jax.numpy as jnp

    from dsv4_jax.modeling.quant import Fp8Tensor, quantize_fp8_weight_np

    w = rng.standard_normal((n, k)).astype(np.float32) * np.exp2(rng.integers(-6, 1, (n, 1))) * 0.05
    q, s = quantize_fp8_weight_np(w)
    return Fp8Tensor(q=jnp.asarray(q), scale=jnp.asarray(s))


def _gpu(monkeypatch):
    from dsv4_jax.kernels import triton_unavailable

    why = triton_unavailable()
    if why is not None:
        pytest.skip(f"act_quant GPU test: {why}")
    import dsv4_jax.kernels.act_quant as aq

    monkeypatch.setattr(aq, "AUTO", True)
    return aq


@pytest.mark.parametrize("M,G,d,R", [(1, 8, 4096, 1024), (4, 8, 4096, 1024), (1, 16, 4096, 1024)],
                         ids=["flash-r1", "flash-r4", "pro-r1"])
def test_gpu_grouped_proj_quant(monkeypatch, M, G, d, R):
    aq = _gpu(monkeypatch)
    import jax
    import jax.numpy as jnp

    from dsv4_jax.kernels.fp8_linear import grouped_proj

    rng = np.random.default_rng(SEED + M + G)
    w = _fp8(rng, G * R, d)
    o = jnp.asarray(rng.standard_normal((1, M, G, d)), jnp.bfloat16)
    z, zq = jax.jit(lambda a: aq.grouped_proj_quant(a, w, jnp.bfloat16, kernels="auto"))(o)
    assert zq is not None, "the dispatcher did not take the kernel on a GPU"
    ref = jax.jit(lambda a: grouped_proj(a, w, jnp.bfloat16, kernels="auto"))(o)
    f32 = lambda a: np.asarray(a.astype(jnp.float32)).reshape(M, -1)  # noqa: E731
    _check(f32(z), f32(zq), f32(ref), 1.0, f"GPU wo_a M={M} G={G}", same_min=0.9)


@pytest.mark.parametrize("M,D,I", [(1, 4096, 2048), (4, 4096, 2048), (1, 7168, 3072)],
                         ids=["flash-r1", "flash-r4", "pro-r1"])
def test_gpu_swiglu_pair(monkeypatch, M, D, I):
    aq = _gpu(monkeypatch)
    import jax
    import jax.numpy as jnp

    from dsv4_jax.modeling.quant import quantize_act

    rng = np.random.default_rng(SEED + M + D)
    w1, w3 = _fp8(rng, I, D), _fp8(rng, I, D)
    x = jnp.asarray(rng.standard_normal((1, M, D)) * 4.0, jnp.bfloat16)
    xv = quantize_act(x).dequant()
    a, av = jax.jit(lambda v: aq.swiglu_pair(x, w1, w3, v, 10.0, jnp.bfloat16, True, kernels="auto"))(xv)
    assert av is not None, "the dispatcher did not take the kernel on a GPU"
    monkeypatch.setattr(aq, "AUTO", False)
    ref, none = jax.jit(lambda v: aq.swiglu_pair(x, w1, w3, v, 10.0, jnp.bfloat16, True, kernels="auto"))(xv)
    assert none is None
    f32 = lambda t: np.asarray(t.astype(jnp.float32)).reshape(M, -1)  # noqa: E731
    _check(f32(a), f32(av), f32(ref), 4.0, f"GPU SwiGLU M={M} D={D}", same_min=0.9)


if __name__ == "__main__":  # the interpreter subprocess
    _interpret_main(sys.argv[1])
