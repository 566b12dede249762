"""The attention's two input projections at decode rows, ``wq_a`` and ``wkv``, with their norms: two launches.

Public function :func:`q_kv_lora` ``x [B, S, D] -> (qr [B, S, q_lora], qr_values, kv [B, S, head_dim])``:

* ``qr = rms_norm(x @ wq_a.T, q_norm)`` and ``kv = rms_norm(x @ wkv.T, kv_norm)``, each linear with the FP8
  activation quantization of spec 3.4 and rounded to the activation dtype before its norm, as the model always
  computed them (:func:`q_kv_lora_reference`: the two :func:`dsv4_jax.modeling.quant.linear` calls and the two
  :func:`dsv4_jax.modeling.layers.rms_norm` calls, the spec and the CPU path);
* ``qr_values``: the values of ``qr``'s FP8 quantization (exact in bf16), which ``wq_b``'s GEMV consumes (the
  attention's, and in CSA layers the indexer's: both quantize the same ``qr``), or ``None`` where the caller
  quantizes.

Why: in a batch-1 decode step the two projections were two GEMV launches (both latency-bound: 4.2 and 2.1 MB of
FP8), and XLA added five small kernels after them (two split-K sums fused with a reduction each, two norms, the
quantization of ``qr``): seven launches per layer at ~2 us each. Here :func:`fp8_gemv2_kernel` streams both weights
in one launch (fp32 split-K partials of both, side by side) and :func:`_lora_norm_kernel`, one program per row, sums
the partials in split order, rounds, normalises both and quantizes ``qr``.

Numerics: the products and per-block sums are :func:`dsv4_jax.kernels.fp8_linear.fp8_gemv_kernel`'s (the same tile
code); the split partials are added in split order (XLA's sum of the unfused path may order them otherwise: results
agree to fp32 rounding before the bf16 rounding); the norm is ``layers.rms_norm``'s formula on the bf16-rounded
linear output, the quantization ``quant.quantize_act``'s (``common.act_quant_block``, bit for bit).

Used for decode rows (``M <= fp8_linear.GEMV_ROWS``) with the kernels on and bf16 activations; prefill rows and the
float32 oracle take the unfused path. Under a multi-device mesh both weights and norms are replicated (logical axes
``(None, "embed")``), so every device runs the two kernels on its own batch rows
(:func:`dsv4_jax.kernels.on_mesh.replicated_on_mesh`): what one device computes for them (not yet run on a GPU
mesh; checked on a CPU mesh with the kernels stood in by their reference). Portable Triton, no inline assembly.

Status: in ``"auto"`` on GPUs. Its GPU test passed on an H200 (2026-12-01: V4-Flash and V4-Pro widths, 1 and 4
rows), and so did the golden tests with ``"auto"`` (layer-isolated, end to end); the 3 epilogue launches of a 3-layer
V4-Flash batch-1 step took 11.3 us (``docs/performance.md``, eleventh session).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.kernels import next_pow2, triton_call
from dsv4_jax.kernels.fp8_linear import QBLOCK, _check, gemv2_meta, gemv2_ok, gemv2_plan, gemv_values, launch_gemv2
from dsv4_jax.kernels.on_mesh import replicated_on_mesh
from dsv4_jax.modeling.layers import rms_norm
from dsv4_jax.modeling.quant import Fp8Tensor, QuantAct, linear

try:  # the model imports this module; triton is optional (kernels="reference" needs none of it)
    import triton
    import triton.language as tl

    from dsv4_jax.kernels.common import act_quant_block, pow2, round_bf16
    from dsv4_jax.kernels.fp8_gemv import fp8_gemv2_kernel
except ImportError:  # pragma: no cover - exercised only without the triton extra
    triton = tl = None


def q_kv_lora_reference(x: jax.Array, xq, wq_a, wkv, q_norm: jax.Array, kv_norm: jax.Array, eps: float, dt,
                        simulate: bool, kernels: str = "reference"):
    """The unfused path: two linears (through :func:`dsv4_jax.modeling.quant.linear`, which runs the FP8 kernels
    where ``kernels`` says so) and two norms. Returns ``(qr, None, kv)``."""
    qr = rms_norm(linear(x, wq_a, dt, simulate, xq, kernels=kernels, parallel="none"), q_norm, eps, dt)
    kv = rms_norm(linear(x, wkv, dt, simulate, xq, kernels=kernels, parallel="none"), kv_norm, eps, dt)
    return qr, None, kv


if triton is not None:

    @triton.jit
    def _norm_row(part_ptr, w_ptr, out_ptr, q_ptr, m, M, COL0: tl.constexpr, NT: tl.constexpr, N: tl.constexpr,
                  BN: tl.constexpr, SPLIT: tl.constexpr, EPS: tl.constexpr, QUANT: tl.constexpr):
        """Row ``m``, columns ``COL0 .. COL0+N`` of the partials ``[SPLIT, M, NT]``: the split sum (in split order),
        rounded to bf16, ``rms_norm`` with weight ``w [N]``, rounded and stored to ``out [M, N]``; with ``QUANT`` also
        the values of its FP8 quantization per 128 columns to ``q [M, N]``."""
        c = tl.arange(0, BN)
        ok = c < N
        row = part_ptr + m.to(tl.int64) * NT + COL0 + c
        y = tl.load(row, mask=ok, other=0.0)
        for s in tl.static_range(1, SPLIT):
            y = y + tl.load(row + s * M * NT, mask=ok, other=0.0)
        y = tl.where(ok, round_bf16(y), 0.0)  # the linear's output, rounded to the activation dtype
        rr = 1.0 / tl.sqrt(tl.sum(y * y, axis=0) / N + EPS)
        y = round_bf16(tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32) * (y * rr))  # rms_norm, rounded
        tl.store(out_ptr + m.to(tl.int64) * N + c, y.to(out_ptr.dtype.element_ty), mask=ok)
        if QUANT:  # quant.quantize_act of the stored row, per 128-wide block: its values (exact in bf16)
            qv, e = act_quant_block(tl.reshape(tl.where(ok, y, 0.0), (BN // 128, 128)))
            qv = tl.reshape(qv * pow2(e)[:, None], (BN,))
            tl.store(q_ptr + m.to(tl.int64) * N + c, qv.to(q_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _lora_norm_kernel(part_ptr, qw_ptr, kvw_ptr, M, qr_ptr, qrq_ptr, kv_ptr,  # jax-triton: outputs follow inputs
                          N1: tl.constexpr, N2: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr,
                          SPLIT: tl.constexpr, EPS: tl.constexpr):
        """Program ``m``: row ``m`` of ``qr`` (columns ``[0, N1)`` of the partials, with its quantized values) and of
        ``kv`` (columns ``[N1, N1+N2)``)."""
        m = tl.program_id(0)
        _norm_row(part_ptr, qw_ptr, qr_ptr, qrq_ptr, m, M, 0, N1 + N2, N1, B1, SPLIT, EPS, True)
        _norm_row(part_ptr, kvw_ptr, kv_ptr, kv_ptr, m, M, N1, N1 + N2, N2, B2, SPLIT, EPS, False)


def plan(M: int, N1: int, N2: int, K: int, target: str | None = None) -> dict:
    """The pair GEMV's plan (:func:`dsv4_jax.kernels.fp8_linear.gemv2_plan`)."""
    return gemv2_plan(M, N1, N2, K, target)


def _norm_meta(M: int, N1: int, N2: int, p: dict, eps: float):
    """Grid and metaparameters of :func:`_lora_norm_kernel`."""
    return (M, 1, 1), dict(N1=N1, N2=N2, B1=max(128, next_pow2(N1)), B2=max(128, next_pow2(N2)), SPLIT=p["SPLIT"],
                           EPS=float(np.float32(eps)), num_warps=4)


def q_kv_lora_triton(xv: jax.Array, wq_a: Fp8Tensor, wkv: Fp8Tensor, q_norm: jax.Array, kv_norm: jax.Array,
                     eps: float, p: dict | None = None):
    """Both kernels on ``xv [M, K]``, the values of ``x``'s FP8 quantization (bf16, exact). Returns ``qr [M, N1]``,
    ``qr_values [M, N1]``, ``kv [M, N2]`` (bf16)."""
    M, K = xv.shape
    N1, N2 = wq_a.q.shape[0], wkv.q.shape[0]
    _check(wq_a, "wq_a", K, N1)
    _check(wkv, "wkv", K, N2)
    if N1 % QBLOCK:
        raise ValueError(f"q_kv_lora: wq_a has {N1} rows, not a multiple of the activation quantization block {QBLOCK}")
    if q_norm.shape != (N1,) or kv_norm.shape != (N2,):
        raise ValueError(f"q_kv_lora: norm weights {q_norm.shape}, {kv_norm.shape}, expected ({N1},), ({N2},)")
    p = p or plan(M, N1, N2, K)
    part = launch_gemv2(xv.astype(jnp.bfloat16), wq_a, wkv, p)  # [SPLIT, M, N1 + N2] fp32
    grid2, m2 = _norm_meta(M, N1, N2, p, eps)
    bf = jnp.bfloat16
    qr, qrq, kv = triton_call(part, q_norm, kv_norm, M, kernel=_lora_norm_kernel, grid=grid2,
                              out_shape=[jax.ShapeDtypeStruct((M, N1), bf), jax.ShapeDtypeStruct((M, N1), bf),
                                         jax.ShapeDtypeStruct((M, N2), bf)], **m2)
    return qr, qrq, kv


def q_kv_lora(x: jax.Array, xq: QuantAct | jax.Array | None, wq_a, wkv, q_norm: jax.Array, kv_norm: jax.Array,
              eps: float, dt, simulate: bool, *, kernels: str = "auto"):
    """``(qr, qr_values, kv)`` for the attention's input ``x [B, S, D]`` (module docstring); ``xq``: ``x``'s FP8
    quantization when the caller has it (a :class:`QuantAct` or its values). ``qr_values`` is ``None`` on the
    unfused path."""
    *lead, K = x.shape
    M = math.prod(lead)
    fused = (simulate and dt == jnp.bfloat16 and isinstance(wq_a, Fp8Tensor) and isinstance(wkv, Fp8Tensor)
             and gemv2_ok(M, K, kernels, on_mesh=True))
    if not fused:
        return q_kv_lora_reference(x, xq, wq_a, wkv, q_norm, kv_norm, eps, dt, simulate, kernels)
    qr, qrq, kv = replicated_on_mesh(lambda xv, w: q_kv_lora_triton(xv, *w, eps), (gemv_values(x, xq).reshape(M, K),),
                                     (wq_a, wkv, q_norm, kv_norm))  # per device on its rows under a mesh
    return qr.reshape(*lead, -1), qrq.reshape(*lead, -1), kv.reshape(*lead, -1)


def run_torch(xv, wq, ws, wq2, ws2, q_norm, kv_norm, eps: float, p: dict):
    """Both kernels on torch tensors (CI: under ``TRITON_INTERPRET=1``): ``xv [M, K]`` bf16 -> ``qr``, ``qr_values``,
    ``kv`` (bf16)."""
    import torch

    M, K = xv.shape
    N1, N2 = wq.shape[0], wq2.shape[0]
    grid1, m1 = gemv2_meta(M, N1, N2, K, p)
    grid2, m2 = _norm_meta(M, N1, N2, p, eps)
    part = torch.full((p["SPLIT"], M, N1 + N2), float("nan"), dtype=torch.float32, device=xv.device)
    fp8_gemv2_kernel[grid1](xv, wq, ws, wq2, ws2, part, **m1)
    qr, qrq = (torch.full((M, N1), float("nan"), dtype=torch.bfloat16, device=xv.device) for _ in range(2))
    kv = torch.full((M, N2), float("nan"), dtype=torch.bfloat16, device=xv.device)
    _lora_norm_kernel[grid2](part, q_norm, kv_norm, M, qr, qrq, kv, **m2)
    return qr, qrq, kv
