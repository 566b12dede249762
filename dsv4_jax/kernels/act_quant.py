"""The FP8 activation quantization between two decode GEMVs, with the first one's split-K sum, in one launch.

Public functions (decode rows, bf16 activations, FP8 weights):

* :func:`grouped_proj_quant` ``o [..., G, d] -> (z [..., G, R], z_values | None)``: ``wo_a``'s grouped projection
  (:func:`dsv4_jax.kernels.fp8_linear.grouped_proj`) and the values of ``z``'s FP8 quantization per 1x128
  (:func:`dsv4_jax.modeling.quant.quantize_act` of ``z`` flattened to ``[..., G * R]``, exact in bf16), which
  ``wo_b``'s GEMV reads;
* :func:`swiglu_pair` ``x [..., D] -> (a [..., I], a_values | None)``: the shared expert's
  ``a = bf16(silu(min(g, L)) * clip(u, -L, L))`` with ``g``/``u`` its ``w1``/``w3`` linears rounded to bf16
  (:func:`dsv4_jax.modeling.experts.swiglu`'s math), and the values of ``a``'s quantization, which ``w2``'s GEMV
  reads.

``None`` in place of the values: the caller quantizes (the reference path).

Why: at decode rows both GEMVs before these points split K over programs (fp32 partials ``[SPLIT, M, N]``), and
XLA made two kernels of the sum and the quantization (a reduction for the blocks' amax, then the quantize fusion,
each re-summing the partials): two launches per site, two sites per layer (``scripts/count_launches.py --names``:
``o_proj``'s ``input_reduce_fusion`` + ``loop_convert_fusion``, ``shared_expert``'s the same). Here
:func:`_sum_quant_kernel` does both in one launch, one program per row and ``NBLK`` 128-wide blocks: it sums the
partials in split order, rounds to bf16 (the first linear's output), applies the SwiGLU where asked, and writes
the row and its quantized values (:func:`dsv4_jax.kernels.common.act_quant_block`, the reference's codes and
scales bit for bit). (The consumer GEMV quantizing its own input in every program cost more than this launch:
``fp8_linear.fp8_gemv_kernel``'s docstring.)

Numerics: the split partials are added in split order (XLA's sum may order them otherwise: fp32 rounding before
the bf16 rounding, as in :mod:`dsv4_jax.kernels.attn_proj`); the SwiGLU is the reference's formula in fp32
(``g * sigmoid(g) * u``), whose exponential may differ from XLA's in the last fp32 bit before the bf16 rounding
(as in the FP4 MoE kernels). The quantization is exact.

Status: in ``"auto"`` on one GPU (``AUTO``; ``kernels="triton"`` too). Its GPU test passed on an H100 and so did the
golden all-position and layer-isolated criteria with it on (2026-12-06, with :mod:`dsv4_jax.kernels.attn_prep` and
the indexer query kernel); in the 3-layer V4-Flash decode step at batch 1 the three together took the jitted loop
from 1.081 to 1.043 ms per step (``docs/performance.md``, thirty-third session). ``AUTO = False`` (a benchmark
variant) makes it opt-in again. Under a mesh the callers keep XLA's form. Portable Triton (integer/fp32 arithmetic,
plain loads), tested under the interpreter in CI.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.kernels import sum_splits, triton_call, use_switched_triton
from dsv4_jax.kernels.fp8_linear import (
    GEMV_ROWS,
    QBLOCK,
    _check,
    gemv2_ok,
    gemv2_plan,
    gemv_partials,
    gemv_values,
    grouped_proj,
    launch_gemv2,
    plan,
)
from dsv4_jax.modeling.quant import Fp8Tensor, QuantAct, linear_pair, quantize_act

try:  # the model imports this module; triton is optional (kernels="reference" needs none of it)
    import triton
    import triton.language as tl

    from dsv4_jax.kernels.common import act_quant_block, pow2, round_bf16
except ImportError:  # pragma: no cover - exercised only without the triton extra
    triton = tl = None

AUTO = True  # the kernel in "auto" (GPUs): its GPU test and the golden criteria passed with it (Status above)
NBLK = 4  # 128-wide blocks per program


if triton is not None:

    @triton.jit
    def _sum_quant_kernel(part_ptr, M, y_ptr, q_ptr,  # jax-triton: the outputs follow the inputs
                          N: tl.constexpr, NT: tl.constexpr, SPLIT: tl.constexpr, NBLK: tl.constexpr,
                          SWIGLU: tl.constexpr, LIMIT: tl.constexpr):
        """Row ``program_id(0)``, blocks ``[NBLK * program_id(1), + NBLK)`` of ``N`` columns: the partials
        ``part [SPLIT, M, NT]`` (fp32, or the unsplit output in bf16) summed in split order and rounded to bf16;
        with ``SWIGLU`` columns ``c`` (``g``) and ``N + c`` (``u``) give ``bf16(silu(min(g, L)) * clip(u, -L, L))``
        (``LIMIT`` 0: no clamp). Stores the row to ``y [M, N]`` and its FP8 quantization's values per 128 columns to
        ``q [M, N]`` (bf16, exact)."""
        m = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1) * NBLK + tl.arange(0, NBLK)  # [NBLK] the row's 128-wide blocks
        c = blk[:, None] * 128 + tl.arange(0, 128)[None, :]  # [NBLK, 128] columns
        ok = c < N
        row = part_ptr + m * NT + c
        g = tl.load(row, mask=ok, other=0.0).to(tl.float32)
        for s in tl.static_range(1, SPLIT):
            g = g + tl.load(row + s * M * NT, mask=ok, other=0.0).to(tl.float32)
        g = round_bf16(g)  # the linear's output, rounded to the activation dtype
        if SWIGLU:
            u = tl.load(row + N, mask=ok, other=0.0).to(tl.float32)
            for s in tl.static_range(1, SPLIT):
                u = u + tl.load(row + N + s * M * NT, mask=ok, other=0.0).to(tl.float32)
            u = round_bf16(u)
            if LIMIT > 0:
                u = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
                g = tl.minimum(g, LIMIT)
            g = round_bf16(g * tl.sigmoid(g) * u)
        tl.store(y_ptr + m * N + c, g.to(y_ptr.dtype.element_ty), mask=ok)
        qv, e = act_quant_block(tl.where(ok, g, 0.0))  # quant.quantize_act per 128 columns
        tl.store(q_ptr + m * N + c, (qv * pow2(e)[:, None]).to(q_ptr.dtype.element_ty), mask=ok)


def _meta(M: int, N: int, NT: int, split: int, swiglu: bool, limit: float) -> tuple[tuple[int, int], dict]:
    """Grid and metaparameters of :func:`_sum_quant_kernel` (the jax and the torch launchers take them from here)."""
    if N % QBLOCK:
        raise ValueError(f"act_quant: {N} columns are not whole {QBLOCK}-wide quantization blocks")
    return (M, math.ceil(N / (QBLOCK * NBLK))), dict(N=N, NT=NT, SPLIT=split, NBLK=NBLK, SWIGLU=swiglu,
                                                      LIMIT=float(np.float32(limit)), num_warps=4, num_stages=1)


def sum_quant_triton(part: jax.Array, N: int, swiglu: bool = False, limit: float = 0.0):
    """:func:`_sum_quant_kernel` on ``part [SPLIT, M, NT]`` -> ``(y [M, N], values [M, N])`` bf16."""
    split, M, NT = part.shape
    g, meta = _meta(M, N, NT, split, swiglu, limit)
    out = jax.ShapeDtypeStruct((M, N), jnp.bfloat16)
    y, q = triton_call(part, M, kernel=_sum_quant_kernel, grid=g, out_shape=[out, out], **meta)
    return y, q


def sum_quant_reference(part: jax.Array, N: int, swiglu: bool = False, limit: float = 0.0):
    """XLA's form of :func:`sum_quant_triton` (the tests' oracle): the partials summed (:func:`sum_splits`) and rounded,
    :func:`dsv4_jax.modeling.experts.swiglu`'s math where asked, :func:`quantize_act`'s values."""
    split = part.shape[0]
    y = sum_splits(part, split, jnp.bfloat16) if split > 1 else part[0].astype(jnp.bfloat16)
    y = swiglu_f32(y[:, :N], y[:, N:2 * N], limit).astype(jnp.bfloat16) if swiglu else y[:, :N]
    return y, quantize_act(y).dequant().astype(jnp.bfloat16)


def swiglu_f32(g: jax.Array, u: jax.Array, limit: float) -> jax.Array:
    """The SwiGLU of the gate and up linears' outputs in fp32: ``silu(min(g, L)) * clip(u, -L, L)`` (``limit`` L 0:
    no clamp), the one XLA form (:func:`dsv4_jax.modeling.experts.swiglu` and the paths here)."""
    g, u = g.astype(jnp.float32), u.astype(jnp.float32)
    if limit > 0:
        lim = np.float32(limit)
        u = jnp.clip(u, -lim, lim)
        g = jnp.minimum(g, lim)
    return jax.nn.silu(g) * u


def _wanted(kernels: str) -> bool:
    return use_switched_triton(kernels, AUTO, one_device=True)


# ---------------------------------------------------------------------------------------------- public
def grouped_proj_quant(o: jax.Array, w, out_dtype, *, kernels: str = "auto") -> tuple[jax.Array, jax.Array | None]:
    """``(grouped_proj(o, w), its quantization's values)`` for ``o [..., G, d]``, ``w`` = ``wo_a`` ``[G*R, d]``:
    with the kernel (decode rows, an FP8 weight, bf16) the GEMV's partials go through :func:`_sum_quant_kernel`;
    otherwise :func:`grouped_proj` and ``None`` (the caller's linear quantizes)."""
    *lead, G, d = o.shape
    M = math.prod(lead)
    if not (isinstance(w, Fp8Tensor) and o.dtype == out_dtype == jnp.bfloat16 and 0 < M <= GEMV_ROWS
            and _wanted(kernels)):
        return grouped_proj(o, w, out_dtype, kernels=kernels), None
    R = w.q.shape[0] // G
    _check(w, "grouped_proj_quant (wo_a)", d, G * R)
    p = plan(M, R, d, G)  # the GEMV plan at these rows
    part = gemv_partials(o.reshape(M, G, d).astype(jnp.bfloat16), w, M, R, d, G, jnp.bfloat16, p)
    y, q = sum_quant_triton(part.reshape(-1, M, G * R), G * R)  # [SPLIT, M, G*R] (SPLIT 1: the bf16 output)
    return y.reshape(*lead, G, R), q.reshape(*lead, G * R)


def swiglu_pair(x: jax.Array, w1, w3, xq: QuantAct | jax.Array | None, limit: float, out_dtype, simulate: bool, *,
                kernels: str = "auto", parallel: str | None = None) -> tuple[jax.Array, jax.Array | None]:
    """``(a, a's quantization's values)`` of one expert's gate and up linears over ``x [..., D]`` (``limit`` 0: no
    clamp): with the kernel (decode rows, FP8 weights, bf16) :func:`fp8_linear.fp8_gemv2_kernel`'s partials of
    both go through :func:`_sum_quant_kernel`; otherwise :func:`linear_pair` (``parallel`` as there), XLA's SwiGLU
    and ``None``."""
    *lead, D = x.shape
    M = math.prod(lead)
    if (simulate and out_dtype == jnp.bfloat16 and isinstance(w1, Fp8Tensor) and isinstance(w3, Fp8Tensor)
            and w1.q.shape == w3.q.shape and gemv2_ok(M, D, kernels) and _wanted(kernels)):
        I = w1.q.shape[0]
        _check(w1, "swiglu_pair (w1)", D, I)
        _check(w3, "swiglu_pair (w3)", D, I)
        part = launch_gemv2(gemv_values(x, xq).reshape(M, D), w1, w3, gemv2_plan(M, I, I, D))  # [SPLIT, M, 2I]
        a, q = sum_quant_triton(part, I, swiglu=True, limit=limit)
        return a.reshape(*lead, I), q.reshape(*lead, I)
    g, u = linear_pair(x, w1, w3, out_dtype, simulate, xq, kernels=kernels, parallel=parallel)
    return swiglu_f32(g, u, limit).astype(out_dtype), None


def run_torch(part, N: int, swiglu: bool, limit: float):
    """:func:`_sum_quant_kernel` on torch tensors (CI: under ``TRITON_INTERPRET=1``): ``part [SPLIT, M, NT]`` ->
    ``(y, values)`` fp32 ``[M, N]`` (bf16 values)."""
    import torch

    split, M, NT = part.shape
    g, meta = _meta(M, N, NT, split, swiglu, limit)
    y, q = (torch.full((M, N), float("nan"), dtype=torch.float32) for _ in range(2))
    _sum_quant_kernel[g](part, M, y, q, **meta)
    return y, q
