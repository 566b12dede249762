"""The window ring's write of a decode step (spec 6: the KV entries of each row's last ``W`` tokens), in place.

Public function :func:`ring_write` ``(ring, kv, pos, n_new, values=None) -> ring``: a chunk's KV entries ``kv [B, S,
...]`` written into the ring ``[B, W, ...]`` at slot ``t % W`` of each token ``t`` among the row's last ``W`` valid
ones (``pos`` the chunk's first position per row, ``n_new`` its valid tokens). :func:`ring_write_reference` is the
XLA code the model always ran (the spec, the CPU path): at decode (``S == 1``) a select over the whole ring per leaf
(a one-row scatter became a slice, a select and an update per leaf: twice the kernels, the same result), otherwise a
scatter with the out-of-window tokens dropped.

Why a kernel: the FP8-snapped ring (:class:`~dsv4_jax.modeling.quant.Fp8Cache`) has three leaves of different
shapes (e4m3 codes, e8m0 scale bytes, bf16 RoPE dims), so XLA's decode write is three fusions per layer (one per
leaf, each with the snap of the new entry inside; ``scripts/count_launches.py`` on an sm_90 build), each passing over
its whole leaf. :func:`_ring_write_kernel` takes the entry's bf16 values, snaps them as
:func:`~dsv4_jax.modeling.quant.encode_fp8_cache` does (:func:`common.act_quant_block`, the reference's codes and
scales bit for bit) and writes the three leaves of the row's one slot in one launch (one program per row; the other
slots untouched: the ring is updated in place through ``input_output_aliases``, like the compressor's caches in
:mod:`dsv4_jax.kernels.compressor_step`). A first form copied the already snapped leaves: XLA then materialised
them in three more fusions (and the RoPE tables in two): 111 -> 115 kernels for a 2-layer V4-Flash batch-1 step,
where this form gives 109 (``count_launches.py``, 2026-12-05).

Used for decode chunks (``S == 1``) of an ``Fp8Cache`` ring with ``kernels="triton"`` or ``"auto"`` on GPUs (its GPU
test and the golden criteria passed with it on an H100, 2026-12-05: :data:`AUTO`); under a mesh each device writes
its own batch rows (:func:`dsv4_jax.kernels.on_mesh.replicated_on_mesh`: the ring is replicated over ``model``).
Plain rings (``init_state(..., snapped=False)``, float32 numerics) and longer chunks keep the reference. Portable Triton
(fp32 and integer arithmetic, byte stores), no inline assembly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.kernels import triton_call, use_switched_triton
from dsv4_jax.kernels.on_mesh import replicated_on_mesh
from dsv4_jax.modeling.quant import Fp8Cache

try:  # the model imports this module; triton is optional (kernels="reference" needs none of it)
    import triton
    import triton.language as tl

    from dsv4_jax.kernels.common import act_quant_block, e4m3_bits
except ImportError:  # pragma: no cover - exercised only without the triton extra
    triton = tl = None


# ---------------------------------------------------------------------------------------------- reference
def ring_write_reference(ring, kv, pos: jax.Array, n_new: jax.Array):
    """``ring`` (an array ``[B, W, ...]`` or a pytree of them, e.g. an ``Fp8Cache``) with the chunk's entries ``kv``
    (same structure, ``[B, S, ...]``) of the row's last ``W`` valid tokens written at slot ``t % W``; ``pos [B]``
    the chunk's first position, ``n_new [B]`` its valid tokens per row."""
    leaf = jax.tree_util.tree_leaves(ring)[0]
    B, W = leaf.shape[:2]
    S = jax.tree_util.tree_leaves(kv)[0].shape[1]
    t = pos[:, None] + jnp.arange(S)[None, :]  # [B,S] absolute positions
    end = pos + n_new
    keep = (t < end[:, None]) & (t >= end[:, None] - W)  # the last W valid tokens: unique slots
    slot = jnp.where(keep, t % W, W)
    if S == 1:  # decode: a select over the whole (small) ring; XLA made the one-row scatter a slice + select
        hit = jnp.arange(W)[None, :] == slot  # [B,W]     + update per leaf, twice the kernels (same result)
        return jax.tree_util.tree_map(lambda c, v: jnp.where(hit.reshape(B, W, *([1] * (c.ndim - 2))), v, c), ring, kv)
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], slot.shape)
    return jax.tree_util.tree_map(lambda c, v: c.at[rows, slot].set(v, mode="drop"), ring, kv)


# ---------------------------------------------------------------------------------------------- kernel
if triton is not None:

    @triton.jit
    def _ring_write_kernel(kv_ptr, pos_ptr, nnew_ptr,
                           rc_in, rs_in, rr_in,  # the ring's leaves, aliased by the outputs below
                           rc_ptr, rs_ptr, rr_ptr,
                           W: tl.constexpr, D: tl.constexpr, DN: tl.constexpr):
        """Program ``row``: if the row brings a token (``nnew > 0``), its entry ``kv [B, D]`` (bf16 values, RoPE
        applied) snapped as :func:`~dsv4_jax.modeling.quant.encode_fp8_cache` snaps it (the first ``DN`` dims per
        block of 64: :func:`common.act_quant_block`'s codes and power-of-two scales, the codes as e4m3 bytes by
        :func:`common.e4m3_bits`; the last ``D - DN`` dims kept) into ring slot ``pos % W`` of ``rc [B, W, DN]``,
        ``rs [B, W, DN/64]``, ``rr [B, W, D - DN]``, in place (the ``*_in`` pointers are the outputs' buffers,
        unused). ``D`` a power of two, ``DN`` a multiple of 64."""
        row = tl.program_id(0).to(tl.int64)
        n = tl.load(nnew_ptr + row)
        if n > 0:
            slot = row * W + (tl.load(pos_ptr + row) % W).to(tl.int64)
            blk = tl.arange(0, D // 64)
            dd = blk[:, None] * 64 + tl.arange(0, 64)[None, :]  # [D/64, 64]
            y = tl.load(kv_ptr + row * D + dd).to(tl.float32)
            q, e = act_quant_block(y)  # [D/64, 64] e4m3 grid values, [D/64] scale exponents
            dst = rc_ptr.to(tl.pointer_type(tl.uint8))  # the e4m3 codes as bytes: no FP8 type involved
            tl.store(dst + slot * DN + dd, e4m3_bits(q).to(tl.uint8), mask=dd < DN)
            tl.store(rs_ptr + slot * (DN // 64) + blk, (e + 127).to(tl.uint8), mask=blk < DN // 64)
            tl.store(rr_ptr + slot * (D - DN) + (dd - DN), y.to(rr_ptr.dtype.element_ty), mask=dd >= DN)


def _check(ring: Fp8Cache, values: jax.Array, pos: jax.Array, n_new: jax.Array) -> None:
    """ValueError naming what does not fit the kernel."""
    B, W, dn = ring.codes.shape
    rd = ring.rope.shape[-1]
    D = dn + rd
    if D & (D - 1) or dn % 64 or ring.scales.shape != (B, W, dn // 64) or ring.rope.shape != (B, W, rd):
        raise ValueError(f"ring_write: ring codes {ring.codes.shape}, scales {ring.scales.shape}, rope "
                         f"{ring.rope.shape}: the kernel needs nope dims in blocks of 64 and a power-of-two entry")
    if values.shape != (B, 1, D) or values.dtype != ring.rope.dtype:
        raise ValueError(f"ring_write: values are {values.dtype} {tuple(values.shape)}, expected {ring.rope.dtype} "
                         f"{(B, 1, D)} (one decode token per row)")
    if pos.shape != (B,) or n_new.shape != (B,):
        raise ValueError(f"ring_write: pos {pos.shape} and n_new {n_new.shape} must be ({B},)")


def ring_write_triton(ring: Fp8Cache, values: jax.Array, pos: jax.Array, n_new: jax.Array) -> Fp8Cache:
    """The kernel on one device's rows: a decode token's KV ``values [B, 1, Dh]`` (bf16, before the snap) snapped
    into an ``Fp8Cache`` ring."""
    _check(ring, values, pos, n_new)
    B, W, dn = ring.codes.shape
    leaves = (ring.codes, ring.scales, ring.rope)
    shapes = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves)
    outs = triton_call(values.reshape(B, -1), pos.astype(jnp.int32), n_new.astype(jnp.int32), *leaves,
                       kernel=_ring_write_kernel, out_shape=shapes, grid=(B,),
                       input_output_aliases={3 + i: i for i in range(3)}, W=W, D=values.shape[-1], DN=dn,
                       num_warps=1, num_stages=1)
    return Fp8Cache(codes=outs[0], scales=outs[1], rope=outs[2])


# "auto" takes the kernel: its GPU tests (batch 1 and 32, bit for bit) and the golden all-position and layer-isolated
# criteria passed with it on an H100 (2026-12-05, docs/performance.md); AUTO=False (a benchmark variant,
# scripts/bench_common.variant) makes it opt-in again (kernels="triton") for a timing without it
AUTO = True


def ring_write(ring, kv, pos: jax.Array, n_new: jax.Array, values: jax.Array | None = None, *,
               kernels: str = "auto"):
    """The ring after a chunk's write (see :func:`ring_write_reference`; ``kv`` the entries in the ring's layout).
    With ``values`` (the entries' bf16 values before the FP8 snap, ``kv == encode_fp8_cache(values)``), a decode
    chunk of an ``Fp8Cache`` ring takes the kernel (``kernels="triton"``, or ``"auto"`` on GPUs with :data:`AUTO`):
    it snaps the values itself, so XLA need not materialise the snapped leaves for it (their fusion stays inside the
    attention's reads). The same bits either way."""
    if (use_switched_triton(kernels, AUTO) and values is not None and isinstance(ring, Fp8Cache)
            and values.shape[1] == 1 and values.shape[0] > 0 and values.dtype == jnp.bfloat16):
        def local(rc, rs, rr, v, p, n, _):
            return ring_write_triton(Fp8Cache(codes=rc, scales=rs, rope=rr), v, p, n)

        return replicated_on_mesh(local, (ring.codes, ring.scales, ring.rope, values, pos, n_new), ())
    return ring_write_reference(ring, kv, pos, n_new)
