"""The attention's fused input projections (``dsv4_jax/kernels/attn_proj.py``: ``wq_a`` + ``wkv`` in one GEMV launch,
then one epilogue for the split-K sum, both RMSNorms and ``qr``'s FP8 quantization) against the unfused reference.

Tolerances: the kernels form the reference's exact products but sum them in another fp32 order (per chunk, per split,
then splits in order). Reordering a K-term fp32 sum moves it by at most ~K * 2**-24 * sum|terms| (``mag``), and the
bf16 rounding may then land on the neighbouring value: one bf16 ulp (``tests/test_kernels_fp8.py``'s bound). After
the norm (``y * w * r``, r from the whole row, which reordering moves by fp32 rounding only) the same bound holds
scaled by ``|w| * r``, plus one ulp of the normed value's own rounding. Nearly all elements (>= 97 %) must also be
the same bits. ``qr_values`` must be, bit for bit, ``quantize_act`` of the kernel's own ``qr`` (one quantizer).

CPU: the ``@triton.jit`` kernels under Triton's interpreter in a subprocess (torch CPU tensors), at small shapes with
K split, N not a multiple of the tile, and a q width that is not a power of two. GPU: the jitted dispatcher at V4-Flash
and V4-Pro shapes, 1 and 4 rows (skipped without a GPU).
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

SEED = 47
EPS = 1e-6
# (rows M, K, N1 = q_lora width, N2 = kv width)
CPU_CASES = [(1, 512, 384, 128), (3, 640, 256, 136)]  # K of 5 blocks: a half-masked last step


def _inputs(M: int, K: int, N1: int, N2: int, seed: int):
    """x's quantized values [M, K] (fp32, exact in bf16), two FP8 block-scaled weights, two norm weights (bf16)."""
    import jax.numpy as jnp

    from dsv4_jax.modeling.quant import quantize_act, quantize_fp8_weight_np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K)) * np.exp2(rng.integers(-3, 4, (M, 1)))
    xv = np.asarray(quantize_act(jnp.asarray(x, jnp.bfloat16)).dequant(), np.float32)
    out = {"xv": xv}
    for name, n in (("wq", N1), ("wkv", N2)):
        w = rng.standard_normal((n, K)).astype(np.float32) * np.exp2(rng.integers(-6, 1, (n, 1))) * 0.05
        out[f"{name}_q"], out[f"{name}_s"] = quantize_fp8_weight_np(w)
    out["qn"] = np.asarray(jnp.asarray(rng.uniform(0.5, 1.5, N1), jnp.bfloat16).astype(jnp.float32))
    out["kvn"] = np.asarray(jnp.asarray(rng.uniform(0.5, 1.5, N2), jnp.bfloat16).astype(jnp.float32))
    return out


def _weights(z):
    import jax.numpy as jnp

    from dsv4_jax.modeling.quant import Fp8Tensor

    wq = Fp8Tensor(q=jnp.asarray(z["wq_q"]), scale=jnp.asarray(z["wq_s"]))
    wkv = Fp8Tensor(q=jnp.asarray(z["wkv_q"]), scale=jnp.asarray(z["wkv_s"]))
    return wq, wkv, jnp.asarray(z["qn"], jnp.bfloat16), jnp.asarray(z["kvn"], jnp.bfloat16)


def _linear(z, name: str):
    """The reference FP8 linear of x by weight ``name`` -> its bf16 output (as fp32) and ``mag = |x| @ |w|.T``."""
    import jax.numpy as jnp

    from dsv4_jax.kernels.fp8_linear import fp8_linear_reference
    from dsv4_jax.modeling.quant import Fp8Tensor, dequant

    w = Fp8Tensor(q=jnp.asarray(z[f"{name}_q"]), scale=jnp.asarray(z[f"{name}_s"]))
    xv = jnp.asarray(z["xv"])
    y = fp8_linear_reference(xv.astype(jnp.bfloat16), w, jnp.bfloat16, xv)
    mag = jnp.einsum("mk,nk->mn", jnp.abs(xv), jnp.abs(dequant(w)), precision="highest")
    return np.asarray(y.astype(jnp.float32)), np.asarray(mag)


def _reference(z):
    """The unfused XLA path on the same quantized input values: ``(qr, kv)`` (bf16 values as fp32) and the error
    allowance of each (module docstring)."""
    import jax.numpy as jnp

    from dsv4_jax.kernels.attn_proj import q_kv_lora_reference

    wq, wkv, qn, kvn = _weights(z)
    xv = jnp.asarray(z["xv"])
    qr, _, kv = q_kv_lora_reference(xv.astype(jnp.bfloat16), xv, wq, wkv, qn, kvn, EPS, jnp.bfloat16, True)
    out = []
    for val, name, nw in ((qr, "wq", z["qn"]), (kv, "wkv", z["kvn"])):
        ref = np.asarray(val.astype(jnp.float32))
        y, mag = _linear(z, name)
        r = 1.0 / np.sqrt(np.mean(y * y, axis=-1, keepdims=True) + EPS)
        bound = np.abs(nw) * r * (_bf16_ulp(y) + z["xv"].shape[-1] * 2.0**-24 * mag)
        out.append((ref, bound + _bf16_ulp(ref)))
    return out


def _check(got_qr, got_qrq, got_kv, refs, what: str):
    import jax.numpy as jnp

    from dsv4_jax.modeling.quant import quantize_act

    for name, got, (ref, bound) in (("qr", got_qr, refs[0]), ("kv", got_kv, refs[1])):
        assert np.isfinite(got).all(), f"{what}: {name} has unwritten (NaN) elements"
        err = np.abs(got - ref)
        assert (err <= bound).all(), f"{what}: {name} off by {np.max(err / bound):.3g}x the allowance"
        same = np.mean(got.view(np.uint32) == ref.view(np.uint32))
        assert same >= 0.97, f"{what}: only {same:.3f} of {name} bit-equal to the reference"
    want = np.asarray(quantize_act(jnp.asarray(got_qr, jnp.bfloat16)).dequant(), np.float32)
    np.testing.assert_array_equal(got_qrq.view(np.uint32), want.view(np.uint32), err_msg=f"{what}: qr_values")


def _interpret_main(path: str) -> None:
    """Subprocess body: both kernels on every stored case (the interpreter's plan)."""
    import torch

    from dsv4_jax.kernels.attn_proj import plan, run_torch

    z = dict(np.load(path))
    out = {}
    for i, (M, K, N1, N2) in enumerate(CPU_CASES):
        t = lambda k, i=i: torch.from_numpy(z[f"{k}{i}"].copy())  # noqa: E731
        p = plan(M, N1, N2, K, "cpu")
        assert p["SPLIT"] > 1, p  # the cases cover the split-K sum
        qr, qrq, kv = run_torch(t("xv").to(torch.bfloat16), t("wq_q").view(torch.float8_e4m3fn), t("wq_s"),
                                t("wkv_q").view(torch.float8_e4m3fn), t("wkv_s"), t("qn"), t("kvn"), EPS, p)
        out[f"qr{i}"], out[f"qrq{i}"], out[f"kv{i}"] = (a.float().numpy() for a in (qr, qrq, kv))
    np.savez(path + ".out.npz", **out)


def test_interpreter_matches_reference(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    arrays, refs = {}, []
    for i, case in enumerate(CPU_CASES):
        z = _inputs(*case, seed=SEED + i)
        arrays.update({f"{k}{i}": (v.view(np.uint8) if v.dtype.itemsize == 1 else v) for k, v in z.items()})
        refs.append(_reference(z))
    out = triton_shim.interpret(__file__, arrays, tmp_path)
    for i, case in enumerate(CPU_CASES):
        _check(out[f"qr{i}"], out[f"qrq{i}"], out[f"kv{i}"], refs[i], what=f"interpreter {case}")


def test_cpu_dispatch_is_the_reference():
    """On a CPU backend ``"auto"`` takes the unfused path: the reference's bits, and no quantized values."""
    import jax.numpy as jnp

    from dsv4_jax.kernels.attn_proj import q_kv_lora

    z = _inputs(1, 256, 128, 128, SEED)
    wq, wkv, qn, kvn = _weights(z)
    xv = jnp.asarray(z["xv"])
    qr, qrq, kv = q_kv_lora(xv.astype(jnp.bfloat16)[None], xv[None], wq, wkv, qn, kvn, EPS, jnp.bfloat16, True)
    (ref_qr, _), (ref_kv, _) = _reference(z)
    assert qrq is None
    np.testing.assert_array_equal(np.asarray(qr[0].astype(jnp.float32)), ref_qr)
    np.testing.assert_array_equal(np.asarray(kv[0].astype(jnp.float32)), ref_kv)


@pytest.mark.parametrize("M,K,N1,N2", [(1, 4096, 1024, 512), (4, 4096, 1024, 512), (1, 7168, 1536, 512),
                                       (4, 7168, 1536, 512)],
                         ids=["flash-r1", "flash-r4", "pro-r1", "pro-r4"])
def test_gpu_matches_reference(M, K, N1, N2):
    """V4-Flash and V4-Pro widths at decode rows, through the model's dispatcher (``"auto"`` takes the kernels)."""
    from dsv4_jax.kernels import triton_unavailable

    why = triton_unavailable()
    if why is not None:
        pytest.skip(f"attention input projection GPU test: {why}")
    import jax
    import jax.numpy as jnp

    from dsv4_jax.kernels.attn_proj import q_kv_lora

    z = _inputs(M, K, N1, N2, SEED + M)
    wq, wkv, qn, kvn = _weights(z)
    xv = jnp.asarray(z["xv"])
    f = jax.jit(lambda a, b: q_kv_lora(a[None], b[None], wq, wkv, qn, kvn, EPS, jnp.bfloat16, True, kernels="auto"))
    qr, qrq, kv = f(xv.astype(jnp.bfloat16), xv)
    assert qrq is not None, "the dispatcher did not take the fused kernels on a GPU"
    f32 = lambda a: np.asarray(a[0].astype(jnp.float32))  # noqa: E731
    _check(f32(qr), f32(qrq), f32(kv), _reference(z), what=f"GPU M={M} K={K} N1={N1} N2={N2}")


@pytest.mark.parametrize("M,K,N", [(1, 4096, 2048), (4, 7168, 3072)], ids=["flash-r1", "pro-r4"])
def test_gpu_pair_linear_matches_reference(M, K, N):
    """``fp8_linear_pair`` (the shared expert's w1 and w3 in one launch) against two reference FP8 linears: each
    output within one bf16 ulp plus the fp32 reordering bound (module docstring)."""
    from dsv4_jax.kernels import triton_unavailable

    why = triton_unavailable()
    if why is not None:
        pytest.skip(f"two-weight FP8 GEMV GPU test: {why}")
    import jax
    import jax.numpy as jnp

    from dsv4_jax.kernels.fp8_linear import fp8_linear_pair

    z = _inputs(M, K, N, N, SEED + 7)
    wa, wb, _, _ = _weights(z)
    x = jnp.asarray(z["xv"], jnp.bfloat16)  # already on the e4m3 grid: quantizing it again gives the same values
    got = jax.jit(lambda a: fp8_linear_pair(a, wa, wb, jnp.bfloat16, kernels="auto"))(x)
    for g, name in zip(got, ("wq", "wkv")):
        ref, mag = _linear(z, name)
        allow = _bf16_ulp(ref) + K * 2.0**-24 * mag
        err = np.abs(np.asarray(g.astype(jnp.float32)) - ref)
        assert (err <= allow).all(), f"M={M} K={K} N={N} {name}: off by {np.max(err / allow):.3g}x the allowance"


if __name__ == "__main__":  # the interpreter subprocess
    _interpret_main(sys.argv[1])
