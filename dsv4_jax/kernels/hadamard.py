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

from dsv4_jax.kernels import next_pow2, triton_call, use_triton
from dsv4_jax.kernels.on_mesh import replicated_on_mesh
from dsv4_jax.modeling.layers import hadamard as hadamard_reference

try:  # the model imports this module; triton is optional (kernels="reference" needs none of it)
    import triton
    import triton.language as tl

    from dsv4_jax.kernels.common import round_bf16
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
