"""The window ring's write of a decode step (spec 6: the KV entries of each row's last ``W`` tokens), in place.

Public function :func:`ring_write` ``(ring, kv, pos, n_new) -> ring``: a chunk's KV entries ``kv [B, S, ...]``
written into the ring ``[B, W, ...]`` at slot ``t % W`` of each token ``t`` among the row's last ``W`` valid ones
(``pos`` the chunk's first position per row, ``n_new`` its valid tokens). :func:`ring_write_reference` is the XLA
code the model always ran (the spec, the CPU path): at decode (``S == 1``) a select over the whole ring per leaf
(a one-row scatter became a slice, a select and an update per leaf: twice the kernels, the same result), otherwise a
scatter with the out-of-window tokens dropped.

Why a kernel: the FP8-snapped ring (:class:`~dsv4_jax.modeling.quant.Fp8Cache`) has three leaves of different
shapes (e4m3 codes, e8m0 scale bytes, bf16 RoPE dims), so XLA's decode write is three fusions per layer (one per
leaf; ``scripts/count_launches.py`` on an sm_90 build), each passing over its whole leaf. :func:`_ring_write_kernel`
writes the three leaves of each row's one slot in one launch (one program per row; the 583 bytes of the entry, the
other slots untouched: the ring is updated in place through ``input_output_aliases``, like the compressor's caches
in :mod:`dsv4_jax.kernels.compressor_step`). Byte copies: the result is the reference's bit for bit.

Used for decode chunks (``S == 1``) of an ``Fp8Cache`` ring where :func:`dsv4_jax.kernels.use_triton` says so
(``"auto"`` on GPUs); under a mesh each device writes its own batch rows
(:func:`dsv4_jax.kernels.on_mesh.replicated_on_mesh`: the ring is replicated over ``model``). Plain rings
(``init_state(..., snapped=False)``, float32 numerics) and longer chunks keep the reference. Portable Triton (byte
loads and stores), no inline assembly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.kernels import next_pow2, triton_call, use_triton
from dsv4_jax.kernels.on_mesh import replicated_on_mesh
from dsv4_jax.modeling.quant import Fp8Cache

try:  # the model imports this module; triton is optional (kernels="reference" needs none of it)
    import triton
    import triton.language as tl
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
    def _ring_write_kernel(codes_ptr, scales_ptr, rope_ptr, pos_ptr, nnew_ptr,
                           rc_in, rs_in, rr_in,  # the ring's leaves, aliased by the outputs below
                           rc_ptr, rs_ptr, rr_ptr,
                           W: tl.constexpr, DN: tl.constexpr, NS: tl.constexpr, RD: tl.constexpr,
                           DNP: tl.constexpr, NSP: tl.constexpr, RDP: tl.constexpr):
        """Program ``row``: if the row brings a token (``nnew > 0``), its entry (``codes [B, DN]`` e4m3 moved as
        bytes, ``scales [B, NS]`` bytes, ``rope [B, RD]`` bf16) into ring slot ``pos % W`` of ``rc [B, W, DN]``,
        ``rs [B, W, NS]``, ``rr [B, W, RD]``, in place (the ``*_in`` pointers are the outputs' buffers, unused)."""
        row = tl.program_id(0).to(tl.int64)
        n = tl.load(nnew_ptr + row)
        if n > 0:
            slot = row * W + (tl.load(pos_ptr + row) % W).to(tl.int64)
            dc = tl.arange(0, DNP)
            src = codes_ptr.to(tl.pointer_type(tl.uint8))  # e4m3 codes as bytes: no FP8 type involved
            dst = rc_ptr.to(tl.pointer_type(tl.uint8))
            tl.store(dst + slot * DN + dc, tl.load(src + row * DN + dc, mask=dc < DN), mask=dc < DN)
            ds = tl.arange(0, NSP)
            tl.store(rs_ptr + slot * NS + ds, tl.load(scales_ptr + row * NS + ds, mask=ds < NS), mask=ds < NS)
            dr = tl.arange(0, RDP)
            tl.store(rr_ptr + slot * RD + dr, tl.load(rope_ptr + row * RD + dr, mask=dr < RD), mask=dr < RD)


def _meta(ring: Fp8Cache) -> dict:
    W, dn = ring.codes.shape[1:]
    ns, rd = ring.scales.shape[-1], ring.rope.shape[-1]
    return dict(W=W, DN=dn, NS=ns, RD=rd, DNP=next_pow2(dn), NSP=next_pow2(ns), RDP=next_pow2(rd), num_warps=1,
                num_stages=1)


def ring_write_triton(ring: Fp8Cache, kv: Fp8Cache, pos: jax.Array, n_new: jax.Array) -> Fp8Cache:
    """The kernel on one device's rows: a decode chunk (``kv`` leaves ``[B, 1, ...]``) into an ``Fp8Cache`` ring."""
    B, W = ring.codes.shape[:2]
    for name, r, v in (("codes", ring.codes, kv.codes), ("scales", ring.scales, kv.scales),
                       ("rope", ring.rope, kv.rope)):
        if r.ndim != 3 or r.shape[0] != B or v.shape != (B, 1, r.shape[2]) or v.dtype != r.dtype:
            raise ValueError(f"ring_write: kv.{name} is {v.dtype} {tuple(v.shape)}, expected {r.dtype} "
                             f"{(B, 1, *r.shape[2:])} for the ring's {name} {tuple(r.shape)}")
    if pos.shape != (B,) or n_new.shape != (B,):
        raise ValueError(f"ring_write: pos {pos.shape} and n_new {n_new.shape} must be ({B},)")
    leaves = (ring.codes, ring.scales, ring.rope)
    ins = (kv.codes.reshape(B, -1), kv.scales.reshape(B, -1), kv.rope.reshape(B, -1), pos.astype(jnp.int32),
           n_new.astype(jnp.int32), *leaves)
    shapes = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves)
    outs = triton_call(*ins, kernel=_ring_write_kernel, out_shape=shapes, grid=(B,),
                       input_output_aliases={5 + i: i for i in range(3)}, **_meta(ring))
    return Fp8Cache(codes=outs[0], scales=outs[1], rope=outs[2])


USE_KERNEL = True  # a benchmark switch (scripts/bench_common.variant): False keeps the reference everywhere


def ring_write(ring, kv, pos: jax.Array, n_new: jax.Array, *, kernels: str = "auto"):
    """The ring after a chunk's write (see :func:`ring_write_reference`): the kernel for decode chunks of an
    ``Fp8Cache`` ring where :func:`dsv4_jax.kernels.use_triton` says so, the reference otherwise; the same bits."""
    if (USE_KERNEL and isinstance(ring, Fp8Cache) and isinstance(kv, Fp8Cache) and kv.codes.shape[1] == 1
            and kv.codes.shape[0] > 0 and use_triton(kernels)):
        def local(rc, rs, rr, kc, ks, kr, p, n, _):
            return ring_write_triton(Fp8Cache(codes=rc, scales=rs, rope=rr), Fp8Cache(codes=kc, scales=ks, rope=kr),
                                     p, n)

        return replicated_on_mesh(local, (ring.codes, ring.scales, ring.rope, kv.codes, kv.scales, kv.rope, pos,
                                          n_new), ())
    return ring_write_reference(ring, kv, pos, n_new)
