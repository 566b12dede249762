"""The indexer's Hadamard rotation (spec 8, 3.3) as one Triton kernel, bit for bit the reference's butterflies.

Public function :func:`hadamard` ``x [..., n] -> [..., n]`` (``n`` a power of two): the orthonormal Hadamard
transform in Sylvester order, fp32 butterflies with strides 1, 2, 4, ... (the reference kernel's stage order), times
``n**-0.5``, rounded once to the output dtype. The reference is :func:`dsv4_jax.modeling.layers.hadamard` (the spec,
the CPU path).

Why a kernel: XLA fuses the butterfly stages of the indexer's queries and keys with slices that recompute their
inputs (each fused stage doubles them); on an H200 the 8 resulting fusions of a 3-layer V4-Flash batch-1 decode step
took 49.8 us (6.2 us each for 64 x 128 values; ``docs/performance.md``, ninth session). Here a program holds ``BR``
whole rows in registers and runs the ``log2 n`` stages on them: each stage is the same fp32 ``a + b`` and ``a - b``
as the reference's, so the result is the reference's bits (tested under the interpreter; the GPU test asks for the
same).

Status: in ``"auto"`` on GPUs. Its GPU test passed on an H200 (bit for bit, queries at decode and prefill rows,
compressed keys), and in the batch-1 profile of a 3-layer V4-Flash step its 4 launches took 8.6 us where the 8 XLA
fusions took 49.7 us (2026-12-01, ``docs/performance.md``). Under a mesh every device transforms its own batch rows
(:func:`dsv4_jax.kernels.on_mesh.replicated_on_mesh`: the indexer's queries and keys are replicated over ``model``).
Portable Triton (reshape/permute/split/join and fp32 adds), no inline assembly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.kernels import next_pow2, triton_call, use_switched_triton, use_triton
from dsv4_jax.kernels.fp8_linear import QBLOCK, gemv2_ok, gemv_partials, gemv_values
from dsv4_jax.kernels.fp8_linear import plan as fp8_plan
from dsv4_jax.kernels.on_mesh import replicated_on_mesh
from dsv4_jax.modeling.layers import apply_rope
from dsv4_jax.modeling.layers import hadamard as hadamard_reference
from dsv4_jax.modeling.quant import Fp8Tensor, fp4_simulate, linear

try:  # the model imports this module; triton is optional (kernels="reference" needs none of it)
    import triton
    import triton.language as tl

    from dsv4_jax.kernels.common import e2m1_nibble, fp4_quant_block, pow2, rope_rows, round_bf16
except ImportError:  # pragma: no cover - exercised only without the triton extra
    triton = tl = None


if triton is not None:

    @triton.jit
    def butterflies(y, BR: tl.constexpr, N: tl.constexpr, LOG: tl.constexpr):
        """The ``LOG`` butterfly stages of fp32 rows ``y [BR, N]`` (``N = 2**LOG``), unscaled: stage ``s`` pairs
        elements ``2**s`` apart within blocks of ``2**(s+1)`` (the reference's reshape to ``[.., N/2h, 2, h]``)
        into ``a + b`` and ``a - b``. Shared with the indexer compressor's decode kernel
        (:mod:`dsv4_jax.kernels.compressor_step`)."""
        for s in tl.static_range(LOG):  # h = 2**s
            t = tl.permute(tl.reshape(y, (BR, N >> (s + 1), 2, 1 << s)), (0, 1, 3, 2))  # [BR, N/2h, h, 2]
            a, b = tl.split(t)  # the first and the second half of each block
            y = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (BR, N))
        return y

    @triton.jit
    def _hadamard_kernel(x_ptr, R, y_ptr,  # jax-triton: the outputs follow the inputs
                         N: tl.constexpr, LOG: tl.constexpr, BR: tl.constexpr, SCALE: tl.constexpr, BF16: tl.constexpr):
        """Rows ``[program_id * BR, + BR)`` of ``x [R, N]`` -> ``y``: the ``LOG`` butterfly stages
        (:func:`butterflies`), the scale, one rounding (``BF16``: to the nearest-even bf16 value, by arithmetic: the
        interpreter's cast truncates)."""
        r = tl.program_id(0) * BR + tl.arange(0, BR)  # [BR]
        c = tl.arange(0, N)
        ok = (r < R)[:, None]
        y = tl.load(x_ptr + r.to(tl.int64)[:, None] * N + c[None, :], mask=ok, other=0.0).to(tl.float32)  # [BR, N]
        y = butterflies(y, BR, N, LOG) * SCALE
        if BF16:
            y = round_bf16(y)
        tl.store(y_ptr + r.to(tl.int64)[:, None] * N + c[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _query_kernel(x_ptr, cos_ptr, sin_ptr, R, y_ptr,  # jax-triton: the outputs follow the inputs
                      N: tl.constexpr, LOG: tl.constexpr, BR: tl.constexpr, SCALE: tl.constexpr, RD: tl.constexpr,
                      HEADS: tl.constexpr, FP4: tl.constexpr, SPLIT: tl.constexpr = 0):
        """:func:`indexer_query` on rows ``[program_id * BR, + BR)`` of the bf16 queries ``x [R, N]`` (``R`` =
        tokens x ``HEADS``; ``cos``/``sin [R / HEADS, RD / 2]`` fp32 per token): RoPE of the last ``RD`` dims
        (``layers.apply_rope``: pairs ``(2j, 2j + 1)``, ``a cos - b sin`` and ``a sin + b cos`` in fp32, rounded to
        bf16), the butterflies times ``SCALE`` rounded to bf16 (:func:`_hadamard_kernel`), then with ``FP4`` the
        FP4 snap per 32 dims (``quant.fp4_simulate``: :func:`common.fp4_quant_block`'s codes times their scale,
        exact in bf16). Rounding by arithmetic (nearest even: the interpreter's cast truncates). ``SPLIT >= 1``: ``x``
        is the ``wq_b`` GEMV's output as it leaves the kernel, ``[SPLIT, R, N]`` fp32 partials (bf16 when 1), summed
        here in split order and rounded to bf16 first (the linear's output)."""
        r = tl.program_id(0) * BR + tl.arange(0, BR)  # [BR] rows (token * HEADS + head)
        c = tl.arange(0, N)
        ok = (r < R)[:, None]
        rows = x_ptr + r.to(tl.int64)[:, None] * N + c[None, :]
        y = tl.load(rows, mask=ok, other=0.0).to(tl.float32)  # [BR, N]
        if SPLIT > 0:
            for s in tl.static_range(1, SPLIT):
                y = y + tl.load(rows + s * R * N, mask=ok, other=0.0).to(tl.float32)
            y = round_bf16(y)
        y = rope_rows(y, cos_ptr, sin_ptr, (r // HEADS).to(tl.int64)[:, None], ok, BR, N, RD)  # the token's RoPE
        y = round_bf16(butterflies(y, BR, N, LOG) * SCALE)
        if FP4:  # codes x 2**126 x 2**e: e2m1_nibble's values are the e2m1 values times 2**-126
            codes, e = fp4_quant_block(tl.reshape(y, (BR * N // 32, 32)))  # [BR*N/32, 32], [BR*N/32]
            v = e2m1_nibble(codes, 0) * 8.507059173023462e37 * pow2(e)[:, None]
            y = tl.reshape(v, (BR, N))
        tl.store(y_ptr + r.to(tl.int64)[:, None] * N + c[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


QUERY_AUTO = True  # the query kernel in "auto" (GPUs): its GPU tests and the golden criteria passed with it


def plan(n: int) -> dict:
    """Rows per program (about 4K values, a power of two) and warps: the one place they are chosen."""
    return dict(BR=next_pow2(max(1, 4096 // n)), num_warps=4)


def _meta(n: int, out_dtype, p: dict) -> dict:
    return dict(N=n, LOG=int(math.log2(n)), BR=p["BR"], SCALE=float(np.float32(n**-0.5)),
                BF16=jnp.dtype(out_dtype) == jnp.bfloat16, num_warps=p["num_warps"], num_stages=1)


def hadamard_triton(x: jax.Array, out_dtype) -> jax.Array:
    """The Triton path of :func:`hadamard`."""
    n = x.shape[-1]
    if n & (n - 1) or n < 2:
        raise ValueError(f"hadamard: the last axis must be a power of two >= 2, got {x.shape}")
    R = math.prod(x.shape[:-1])
    p = plan(n)
    y = triton_call(x.reshape(R, n), R, kernel=_hadamard_kernel, out_shape=jax.ShapeDtypeStruct((R, n), out_dtype),
                    grid=(-(-R // p["BR"]),), **_meta(n, out_dtype, p))
    return y.reshape(x.shape)


def hadamard(x: jax.Array, out_dtype, *, kernels: str = "auto") -> jax.Array:
    """Orthonormal Hadamard transform over the last axis of ``x`` (see the module docstring), rounded to
    ``out_dtype``. The kernel runs where :func:`dsv4_jax.kernels.use_triton` says so (``"auto"`` on GPUs) for fp32
    or bf16 outputs; the result is the reference's bits either way."""
    if (use_triton(kernels) and x.size > 0
            and jnp.dtype(out_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))):
        return replicated_on_mesh(lambda a, _: hadamard_triton(a, out_dtype), (x,), ())
    return hadamard_reference(x, out_dtype)


def indexer_query_reference(q: jax.Array, cos: jax.Array, sin: jax.Array, out_dtype, fp4: bool,
                            kernels: str = "reference") -> jax.Array:
    """The indexer query's preparation as the model always ran it: RoPE of the last ``2 * cos.shape[-1]`` dims of
    ``q [B, S, Hi, Di]`` (``cos``/``sin [B, S, rd/2]``), :func:`hadamard` (its own dispatch: ``kernels``), the FP4
    snap per 32 when ``fp4``."""
    q = hadamard(apply_rope(q, cos[:, :, None], sin[:, :, None]), out_dtype, kernels=kernels)
    return fp4_simulate(q, 32) if fp4 else q


def _query_meta(n: int, rd: int, heads: int, fp4: bool, p: dict, split: int = 0) -> dict:
    return dict(N=n, LOG=int(math.log2(n)), BR=p["BR"], SCALE=float(np.float32(n**-0.5)), RD=rd, HEADS=heads,
                FP4=fp4, SPLIT=split, num_warps=p["num_warps"], num_stages=1)


def _check_query(q_shape: tuple, cos, sin) -> None:
    """ValueError unless queries of shape ``q_shape`` and the tables fit :func:`_query_kernel`."""
    n, rd = q_shape[-1], 2 * cos.shape[-1]
    if len(q_shape) != 4 or n & (n - 1) or n < 32 or not 0 < rd <= n or cos.shape != tuple(q_shape[:2]) + (rd // 2,) \
            or sin.shape != cos.shape:
        raise ValueError(f"indexer_query: q {tuple(q_shape)} (B, S, heads, a power of two >= 32), cos {cos.shape} and "
                         f"sin {sin.shape} (B, S, rope_dims/2 <= head_dim/2) do not fit")


def indexer_query_triton(q: jax.Array, cos: jax.Array, sin: jax.Array, fp4: bool) -> jax.Array:
    """:func:`indexer_query` in one launch (bf16 in and out; ``cos``/``sin`` fp32)."""
    _check_query(q.shape, cos, sin)
    B, S, Hi, n = q.shape
    R = B * S * Hi
    p = plan(n)
    y = triton_call(q.reshape(R, n), cos.reshape(B * S, -1).astype(jnp.float32),
                    sin.reshape(B * S, -1).astype(jnp.float32), R, kernel=_query_kernel,
                    out_shape=jax.ShapeDtypeStruct((R, n), jnp.bfloat16), grid=(-(-R // p["BR"]),),
                    **_query_meta(n, 2 * cos.shape[-1], Hi, fp4, p))
    return y.reshape(q.shape)


def indexer_query(q: jax.Array, cos: jax.Array, sin: jax.Array, out_dtype, fp4: bool, *,
                  kernels: str = "auto") -> jax.Array:
    """The indexer's queries ``q [B, S, Hi, Di]`` (the ``wq_b`` output) -> RoPE'd, Hadamard-rotated and (``fp4``)
    FP4-snapped queries in ``out_dtype`` (spec 8). ``cos``/``sin [B, S, rd/2]``: the query positions' RoPE.

    With bf16 activations on GPUs (``"auto"`` while ``QUERY_AUTO``, and ``"triton"``): :func:`_query_kernel`, one
    launch for what XLA runs as a RoPE fusion, the Hadamard launch and the snap's reduce and quantize fusions. It is
    the reference's operations in its order; only the RoPE products may contract into FMAs on a GPU (as XLA's may),
    which can move a rotated value by one bf16 ulp and a snapped code by one step. Its GPU tests passed on an H100
    (against this reference and, fed ``wq_b``'s split partials, against the unfused path) and so did the golden
    all-position and layer-isolated criteria with it (2026-12-06); on its own it had timed no faster in a decode step
    (2026-12-02, README), with ``wq_b``'s split sum folded in it is one of the three kernels that took the 3-layer
    batch-1 loop from 1.081 to 1.043 ms (``docs/performance.md``, thirty-third session). Elsewhere
    :func:`indexer_query_reference` (whose Hadamard is the kernel above on GPUs)."""
    if (use_switched_triton(kernels, QUERY_AUTO) and q.size > 0 and q.dtype == jnp.bfloat16
            and jnp.dtype(out_dtype) == jnp.dtype(jnp.bfloat16)):
        return replicated_on_mesh(lambda a, c, s, _: indexer_query_triton(a, c, s, fp4), (q, cos, sin), ())
    return indexer_query_reference(q, cos, sin, out_dtype, fp4, kernels)


def indexer_query_linear(qr: jax.Array, qrq: jax.Array | None, wq_b, heads: int, cos: jax.Array, sin: jax.Array,
                         out_dtype, simulate: bool, fp4: bool, *, kernels: str = "auto") -> jax.Array:
    """The indexer's queries from the q LoRA ``qr [B, S, q_lora]``: ``wq_b``'s linear (``qrq``: ``qr``'s FP8
    quantization's values when the caller has them) reshaped to ``[B, S, heads, Di]``, then :func:`indexer_query`.

    With the query kernel on (as :func:`indexer_query`: ``QUERY_AUTO`` or ``kernels="triton"``), at decode rows on one
    device with an FP8 ``wq_b``: the GEMV's split-K partials go straight into :func:`_query_kernel` (``SPLIT``),
    which sums them in split order and rounds before the RoPE: two launches for the GEMV, its sum, the RoPE, the
    Hadamard and the snap."""
    B, S, K = qr.shape
    M, N = B * S, wq_b.shape[0] if isinstance(wq_b, jax.Array) else wq_b.q.shape[0]
    if (use_switched_triton(kernels, QUERY_AUTO, one_device=True) and simulate and isinstance(wq_b, Fp8Tensor)
            and qr.dtype == jnp.bfloat16 and N % heads == 0 and jnp.dtype(out_dtype) == jnp.dtype(jnp.bfloat16)
            and K % QBLOCK == 0 and gemv2_ok(M, K, kernels)):
        R, n = M * heads, N // heads
        _check_query((B, S, heads, n), cos, sin)
        p = fp8_plan(M, N, K)  # the GEMV plan at these rows
        part = gemv_partials(gemv_values(qr, qrq).reshape(M, 1, K), wq_b, M, N, K, 1, jnp.bfloat16, p)
        pq = plan(n)
        y = triton_call(part, cos.reshape(M, -1).astype(jnp.float32), sin.reshape(M, -1).astype(jnp.float32), R,
                        kernel=_query_kernel, out_shape=jax.ShapeDtypeStruct((R, n), jnp.bfloat16),
                        grid=(-(-R // pq["BR"]),), **_query_meta(n, 2 * cos.shape[-1], heads, fp4, pq, p["SPLIT"]))
        return y.reshape(B, S, heads, n)
    q = linear(qr, wq_b, out_dtype, simulate, qrq, kernels=kernels, parallel="none").reshape(B, S, heads, -1)
    return indexer_query(q, cos, sin, out_dtype, fp4, kernels=kernels)


def run_query_torch(q, cos, sin, fp4: bool, split: int = 0):
    """:func:`_query_kernel` on torch tensors (CI: under ``TRITON_INTERPRET=1``): ``q [T, Hi, n]`` bf16 values
    (``split >= 1``: ``wq_b``'s partials ``[split, T, Hi, n]``, fp32 or bf16), ``cos``/``sin [T, rd/2]`` fp32 -> fp32
    ``[T, Hi, n]`` (bf16 values)."""
    import torch

    T, Hi, n = q.shape[-3:]
    R = T * Hi
    p = plan(n)
    y = torch.full((R, n), float("nan"), dtype=torch.float32)
    _query_kernel[(-(-R // p["BR"]),)](q.reshape(-1, n), cos, sin, R, y,
                                       **_query_meta(n, 2 * cos.shape[-1], Hi, fp4, p, split))
    return y.reshape(T, Hi, n)


def run_torch(x, out_dtype_bf16: bool):
    """Launch the kernel on a torch tensor ``x [R, n]`` (CI: under ``TRITON_INTERPRET=1``) -> fp32 ``[R, n]`` (bf16
    values when ``out_dtype_bf16``)."""
    import torch

    R, n = x.shape
    p = plan(n)
    y = torch.full((R, n), float("nan"), dtype=torch.float32)
    meta = _meta(n, jnp.bfloat16 if out_dtype_bf16 else jnp.float32, p)
    _hadamard_kernel[(-(-R // p["BR"]),)](x, R, y, **meta)
    return y
