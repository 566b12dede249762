"""Device functions of :func:`dsv4_jax.kernels.sparse_attention._sparse_attn_kernel`: how one program finds,
loads and decodes its share of the caches, and its dots. A module of their own so that :mod:`sparse_attention`
holds the kernels, the plan and the launchers (its docstring gives the layout and the measurements behind these
loads).

* :func:`_ids`: a block of one row's index list; :func:`_rows`: the ids' row pointers into the source each entry
  lives in (``[ring (W) | chunk (S) | compressed (Nc)]``, one shared layout, so a per-entry select picks it);
* :func:`_vtile`: the gathered entries' dims as an exact bf16 tile, FP8-snapped entries decoded in registers (e4m3
  code x its 1x64 e8m0 scale; the RoPE dims bf16), loaded in 64-dim groups (one scale byte per group and thread,
  or one 8-byte vector per entry with the ``S8`` plan);
* :func:`_c0`, :func:`_hload`, :func:`_dot`: the q.k chunk walk, the (padded) head tiles of q, and the dots of
  bf16-exact operands with fp32 accumulation (fp32 products under the interpreter).

Imported by :mod:`sparse_attention` only where triton is installed (the model runs without it).
"""

from __future__ import annotations

import triton
import triton.language as tl

from dsv4_jax.kernels.common import e8m0


@triton.jit
def _vtile(codes, scales, rope, ok, c0, DN: tl.constexpr, DR: tl.constexpr, DW: tl.constexpr, FP8: tl.constexpr,
           ROPE: tl.constexpr = True, S8: tl.constexpr = False):
    """Dims ``[c0, c0 + DW)`` of the gathered entries, ``[BK, DW]`` bf16 (exact; masked entries 0).
    ``codes/scales/rope``: ``[BK]`` row pointers already into the right source. FP8 layout: e4m3 code x its 1x64
    e8m0 scale below DN, the bf16 RoPE dims above; plain layout: ``codes`` holds the values. The bytes load as
    ``[BK, DW/64, 64]`` groups: ``c0`` and DN are multiples of 64, so a group lies in one scale group and is all
    codes or all RoPE, and every mask and scale is per group (one scale byte per group and thread).
    ``ROPE = False``: the tile holds no RoPE dims. ``S8`` (scale rows padded to at least ``c0 / 64 + DW / 64``
    bytes, the ``S8`` plan): an entry's scale bytes load as one vector (a ``[BK, DW/64]`` tile masked per entry
    only) instead of one byte per group and thread, so Triton's pipeliner can copy them ahead like the codes (a
    byte load cannot be a ``cp.async``); the RoPE group reads a padding byte, unused."""
    gd = c0 + 64 * tl.arange(0, DW // 64)[None, :, None]  # [1, NG, 1] each group's first dim
    d = gd + tl.arange(0, 64)[None, None, :]  # [1, NG, 64]
    ok3 = ok[:, None, None]
    if FP8:
        c = tl.load(codes[:, None, None] + d, mask=ok3 & (gd < DN), other=0.0)
        if S8:
            g8 = c0 // 64 + tl.arange(0, DW // 64)[None, :]  # [1, NG]
            sc = tl.load(scales[:, None] + g8, mask=ok[:, None], other=127)[:, :, None]  # [BK, NG, 1]
        else:
            sc = tl.load(scales[:, None, None] + gd // 64, mask=ok3 & (gd < DN), other=127)
        if not ROPE:
            v = c.to(tl.float32) * e8m0(sc)
        else:
            if DR == 64:  # one RoPE group: [BK, 1, 64] (if the tile holds it), spread by the where
                i = tl.arange(0, 64)[None, None, :]
                r = tl.load(rope[:, None, None] + i, mask=ok3 & (c0 <= DN) & (DN < c0 + DW), other=0.0)
            else:
                r = tl.load(rope[:, None, None] + (d - DN), mask=ok3 & (gd >= DN), other=0.0)
            v = tl.where(c0 + 64 * tl.arange(0, DW // 64)[None, :, None] < DN, c.to(tl.float32) * e8m0(sc),
                         r.to(tl.float32))
    else:
        v = tl.load(codes[:, None, None] + d, mask=ok3, other=0.0).to(tl.float32)
    return tl.reshape(v, (v.shape[0], DW)).to(tl.bfloat16)


@triton.jit
def _ids(idx_ptr, row, j0, live, K: tl.constexpr, BK: tl.constexpr):
    """Index block ``[j0, j0 + BK)`` of a row's list, ``[BK]`` (-1 past K, and everywhere unless ``live``)."""
    jj = j0 + tl.arange(0, BK)
    return tl.load(idx_ptr + row.to(tl.int64) * K + jj, mask=(jj < K) & live, other=-1)


@triton.jit
def _rows(ids, b, rc, rs, rr, cc, cs, cr, kc, ks, kr, S: tl.constexpr, W: tl.constexpr, NC: tl.constexpr,
          DN: tl.constexpr, DR: tl.constexpr, FP8: tl.constexpr, SST: tl.constexpr):
    """Ids -> ``(valid, codes, scales, rope)``: ``[BK]`` row pointers into each entry's source (the FP8 layout's
    three arrays, or the values and two unused pointers)."""
    DV: tl.constexpr = DN if FP8 else DN + DR  # row length of the codes / values array
    in_r = ids < W
    in_c = (ids >= W) & (ids < W + S)
    r = tl.where(in_r, b * W + ids, tl.where(in_c, b * S + ids - W, b * NC + ids - W - S)).to(tl.int64)
    codes = tl.where(in_r, rc, tl.where(in_c, cc, kc)) + r * DV  # [BK] row pointers, per source
    scales = tl.where(in_r, rs, tl.where(in_c, cs, ks)) + r * SST  # scale rows: DN // 64 bytes, or padded
    rope = tl.where(in_r, rr, tl.where(in_c, cr, kr)) + r * DR
    return ids >= 0, codes, scales, rope


@triton.jit
def _c0(c, oc, DC: tl.constexpr):
    """First dim of the 64-dim chunk at offset ``c`` of the dims outside the own dims ``[oc, oc + DC)``."""
    return c + DC * (c >= oc).to(tl.int32)


@triton.jit
def _hload(ptrs, hm, PADH: tl.constexpr):
    """A ``[BH, n]`` tile of q; rows of padded heads (``hm`` False) read as 0 where the head block is padded."""
    if PADH:
        return tl.load(ptrs, mask=hm[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _dot(a, b, INTERPRET: tl.constexpr):
    """``a @ b`` of bf16-exact operands, fp32 accumulation (the interpreter's bf16 dots are not faithful: the
    same exact products in fp32 there)."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))  # exact casts
