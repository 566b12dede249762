"""Sparse attention over index lists (spec 6, the official ``sparse_attn``), reading the caches in place.

Public function :func:`sparse_attention`: each query row ``(b, s)`` attends to the entries its index list names in
``[ring (W) | chunk (S) | compressed (Nc)]`` (-1 = masked), with a per-head sink logit in the denominator only.
:func:`sparse_attention_reference` is the XLA code the model always ran (the CPU path): it concatenates the three
buffers, gathers, and rounds P to bf16 relative to each row's final maximum.

The Triton kernel (:func:`_sparse_attn_kernel`) follows the official kernel's loop instead: blocks of ``BK`` (64)
indices in list order, online softmax (running max ``m``, ``alpha = exp(m - m_new)``), P rounded to bf16 relative to
the running max for the P.V product only, the sink added to the denominator at the end. It reads each gathered
entry straight from the buffer it lives in (one load per element: the three sources share one layout, so a
per-entry pointer select picks the source; no concatenated copy) and decodes FP8-snapped entries in registers
(e4m3 code x its 1x64 e8m0 scale, exact in bf16; RoPE dims bf16). Grid ``(B*S, H/BH, Dh/DC)``: a program holds
``BH`` heads (all 64 of V4 by default) of one row and ``DC`` (64) of the output dims: it computes the full scores
(q.k over all of Dh, in 64-dim chunks) and P.V for its own dims only. So every entry's bytes are read once per
output chunk (8x at Dh 512; after the first from L2), in exchange for small register tiles: the variant holding a
row's whole ``[64 heads, 512]`` fp32 accumulator and ``[64, 512]`` gathered tile spilled 1.7-2.8 KB per thread
(ptxas for sm_90a, every tile choice tried). A block whose entries are all masked leaves ``m``, ``l`` and ``acc``
unchanged (the official kernel relies on the first block holding a valid index; our window lists put the masked
slots first, so the kernel guards ``-inf - -inf``).

Numerics contract (tested): kernel and reference form the same exact bf16 x bf16 products; they differ in the fp32
summation order and in the point P is rounded at (running vs final max: each P element carries one bf16 rounding
either way), so outputs agree within ``2**-8`` of ``sum_j p_j |v_j| / l`` plus one bf16 ulp.

Portability: plain ``tl.load``/``tl.dot``/integer ops (see :mod:`dsv4_jax.kernels.common`); not yet run on a GPU
(no device time was left in the session that wrote it), hence opt-in (``kernels="triton"``) while ``"auto"`` keeps
the reference: CI runs it under ``TRITON_INTERPRET=1`` (kernel tests, and golden criterion 1 with the model's own
launches); the GPU test (``tests/test_kernels_sparse_attn.py -k gpu``) and ``scripts/bench_attention.py`` are the
next step.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.kernels import triton_call, use_opt_in_triton
from dsv4_jax.modeling.quant import Fp8Cache, cache_values, dot_f32

try:  # the model imports this module; triton is optional (kernels="reference" needs none of it)
    import triton
    import triton.language as tl

    from dsv4_jax.kernels.common import e8m0, round_bf16
except ImportError:  # pragma: no cover - exercised only without the triton extra
    triton = tl = None


# ---------------------------------------------------------------------------------------------- reference
def sparse_attention_reference(q: jax.Array, ring, chunk, comp, idx: jax.Array, sink: jax.Array, scale: float,
                               p_dtype) -> jax.Array:
    """Attention over gathered index lists, XLA.

    q ``[B,S,H,Dh]``; ring ``[B,W,Dh]``, chunk ``[B,S,Dh]``, comp ``[B,Nc,Dh]`` or None (plain arrays or
    :class:`Fp8Cache`; the gathered entries are decoded to ``q.dtype``); idx ``[B,S,K]`` into their concatenation
    (-1 = masked); sink ``[H]`` fp32. Scores and sums in fp32; the probabilities are rounded to ``p_dtype`` for the
    P.V product only. Returns ``[B,S,H,Dh]`` in ``q.dtype``.
    """
    bufs = [ring, chunk] + ([comp] if comp is not None else [])
    kv = jax.tree_util.tree_map(lambda *b: jnp.concatenate(b, axis=1), *bufs)  # [B, W+S+Nc, Dh], stored layout
    valid = idx >= 0
    take = jnp.clip(idx, 0)[..., None]  # [B,S,K,1]
    g = jax.tree_util.tree_map(lambda a: jnp.take_along_axis(a[:, None], take, axis=2), kv)  # leaves [B,S,K,.]
    g = cache_values(g, q.dtype)  # [B,S,K,Dh]
    g = jnp.where(valid[..., None], g, jnp.zeros((), g.dtype))
    s = dot_f32(q, g.astype(q.dtype), "bshd,bskd->bshk") * np.float32(scale)
    s = jnp.where(valid[:, :, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)  # over the scores only: P is rounded relative to it
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # a fully masked row (never the case: a query sees itself)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True) + jnp.exp(sink[:, None] - m)
    acc = dot_f32(p.astype(p_dtype), g.astype(p_dtype), "bshk,bskd->bshd")
    return (acc / denom).astype(q.dtype)


# ---------------------------------------------------------------------------------------------- kernel
if triton is not None:
    @triton.jit
    def _chunk(codes, scales, rope, ok, c0, DN: tl.constexpr, DC: tl.constexpr, FP8: tl.constexpr):
        """Dims ``[c0, c0 + DC)`` of the gathered entries, ``[BK, DC]`` fp32 (bf16-exact; masked entries 0).
        ``codes/scales/rope``: ``[BK]`` row pointers already into the right source. FP8 layout: dims below DN are
        e4m3 codes times their 1x64 e8m0 scale (a chunk lies in one scale group), the rest bf16 RoPE dims; plain
        layout: ``codes`` holds the values."""
        i = tl.arange(0, DC)[None, :]
        if FP8:
            if c0 < DN:
                c = tl.load(codes[:, None] + c0 + i, mask=ok[:, None], other=0.0).to(tl.float32)
                sc = e8m0(tl.load(scales + c0 // 64, mask=ok, other=127))  # [BK]
                v = c * sc[:, None]
            else:
                v = tl.load(rope[:, None] + (c0 - DN) + i, mask=ok[:, None], other=0.0).to(tl.float32)
        else:
            v = tl.load(codes[:, None] + c0 + i, mask=ok[:, None], other=0.0).to(tl.float32)
        return v

    @triton.jit
    def _sparse_attn_kernel(q_ptr, idx_ptr, sink_ptr, rc, rs, rr, cc, cs, cr, kc, ks, kr, o_ptr,
                            S: tl.constexpr, K: tl.constexpr, W: tl.constexpr, NC: tl.constexpr, H: tl.constexpr,
                            BH: tl.constexpr, DN: tl.constexpr, DR: tl.constexpr, FP8: tl.constexpr,
                            SCALE: tl.constexpr, BK: tl.constexpr, DC: tl.constexpr,
                            INTERPRET: tl.constexpr = False):
        """o[b, s, h, oc*DC:(oc+1)*DC] for BH heads of one query row and output chunk ``oc = program_id(2)``;
        ``rc/rs/rr`` (ring), ``cc/cs/cr`` (chunk), ``kc/ks/kr`` (compressed) are each source's codes / scales /
        RoPE arrays (FP8), or its values and two unused pointers. Every program computes the full scores (all
        ``DH / DC`` chunks of q.k) and accumulates P.V for its own output chunk only: registers stay at
        ``[BH, DC]`` accumulators and ``[BK, DC]`` tiles."""
        row = tl.program_id(0)  # b * S + s
        b = row // S
        h = tl.program_id(1) * BH + tl.arange(0, BH)  # [BH]
        oc = tl.program_id(2) * DC  # first output dim of this program
        DH: tl.constexpr = DN + DR
        NS: tl.constexpr = DN // 64
        DV: tl.constexpr = DN if FP8 else DH  # row length of the codes / values array
        i = tl.arange(0, DC)[None, :]
        q_rows = q_ptr + (row * H + h).to(tl.int64)[:, None] * DH  # [BH, 1]
        m = tl.full((BH,), float("-inf"), tl.float32)
        l = tl.zeros((BH,), tl.float32)
        acc = tl.zeros((BH, DC), tl.float32)
        for j0 in range(0, K, BK):
            jj = j0 + tl.arange(0, BK)
            ids = tl.load(idx_ptr + row.to(tl.int64) * K + jj, mask=jj < K, other=-1)  # [BK]
            valid = ids >= 0
            in_r = ids < W
            in_c = (ids >= W) & (ids < W + S)
            r = tl.where(in_r, b * W + ids, tl.where(in_c, b * S + ids - W, b * NC + ids - W - S)).to(tl.int64)
            codes = tl.where(in_r, rc, tl.where(in_c, cc, kc)) + r * DV  # [BK] row pointers, per source
            scales = tl.where(in_r, rs, tl.where(in_c, cs, ks)) + r * NS
            rope = tl.where(in_r, rr, tl.where(in_c, cr, kr)) + r * DR
            s = tl.zeros((BH, BK), tl.float32)
            for c in range(DH // DC):  # a loop, not unrolled: one chunk's tiles live at a time
                kv = _chunk(codes, scales, rope, valid, c * DC, DN, DC, FP8)  # [BK, DC]
                qc = tl.load(q_rows + c * DC + i)  # [BH, DC] bf16
                if INTERPRET:  # the interpreter's bf16 dots are not faithful: the same exact products in fp32
                    s += tl.dot(qc.to(tl.float32), tl.trans(kv), input_precision="ieee")
                else:
                    s += tl.dot(qc, tl.trans(kv.to(tl.bfloat16)))  # [BH, BK] fp32
            s = tl.where(valid[None, :], s * SCALE, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: p = alpha = 0, no NaN
            alpha = tl.exp(m - m_ref)
            p = tl.exp(s - m_ref[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            pb = round_bf16(p)  # P rounded (nearest even, by arithmetic: the interpreter's cast truncates)
            kv = _chunk(codes, scales, rope, valid, oc, DN, DC, FP8)  # [BK, DC] this program's output dims
            if INTERPRET:
                pv = tl.dot(pb, kv, input_precision="ieee")
            else:
                pv = tl.dot(pb.to(tl.bfloat16), kv.to(tl.bfloat16))  # exact casts
            acc = acc * alpha[:, None] + pv
            m = m_new
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        l = l + tl.exp(tl.load(sink_ptr + h) - m_ref)
        o = acc / l[:, None]
        o_rows = o_ptr + (row * H + h).to(tl.int64)[:, None] * DH
        tl.store(o_rows + oc + i, o.to(o_ptr.dtype.element_ty))


def plan(H: int, Dh: int, target: str | None = None) -> dict:
    """Heads per program ``BH``, indices per online-softmax block ``BK`` (64: the official kernel's block, which
    fixes where P is rounded), output dims per program ``DC`` and launch options (the one place they are chosen)."""
    if target == "cpu":
        return dict(BH=H, BK=64, DC=64, num_warps=4, num_stages=1)
    return dict(BH=min(H, 32), BK=64, DC=64, num_warps=8, num_stages=2)  # ptxas sm_90a: 8 B spills at H 64


def _parts(c, Dh: int):
    """A source's (codes, scales, rope) arrays (FP8 layout) or (values, dummy, dummy) (plain layout)."""
    if isinstance(c, Fp8Cache):
        return c.codes, c.scales, c.rope
    dummy = jnp.zeros((1,), jnp.uint8)
    return c, dummy, dummy


def _check(q, ring, chunk, comp, idx):
    B, S, H, Dh = q.shape
    kinds = {type(x).__name__ for x in (ring, chunk, comp) if x is not None}
    if len(kinds) != 1:
        raise ValueError(f"sparse_attention: the ring, chunk and compressed caches must share one layout, got {kinds}")
    for name, x, n in (("ring", ring, None), ("chunk", chunk, S), ("compressed", comp, None)):
        if x is not None and (x.shape[0] != B or x.shape[-1] != Dh or (n is not None and x.shape[1] != n)):
            raise ValueError(f"sparse_attention: {name} cache has shape {x.shape}, expected [{B}, *, {Dh}]")
    if idx.shape[:2] != (B, S):
        raise ValueError(f"sparse_attention: index lists have shape {idx.shape}, expected [{B}, {S}, K]")
    if Dh % 64:
        raise ValueError(f"sparse_attention: head_dim={Dh} must be a multiple of 64 for the kernel")


def sparse_attention_triton(q, ring, chunk, comp, idx, sink, scale: float, p: dict | None = None) -> jax.Array:
    """The Triton path of :func:`sparse_attention` (bf16 q, bf16 P)."""
    _check(q, ring, chunk, comp, idx)
    B, S, H, Dh = q.shape
    W, K = ring.shape[1], idx.shape[-1]
    if comp is None:  # HCA/window-only layers: no compressed source (a 1-row dummy, never indexed)
        comp = jax.tree_util.tree_map(lambda a: a[:, :1], ring)
    fp8 = isinstance(ring, Fp8Cache)
    p = p or plan(H, Dh)
    args = [q.astype(jnp.bfloat16), idx.astype(jnp.int32), sink.astype(jnp.float32)]
    for c in (ring, chunk, comp):
        args += _parts(c, Dh)
    return triton_call(*args, kernel=_sparse_attn_kernel, out_shape=jax.ShapeDtypeStruct(q.shape, jnp.bfloat16),
                       grid=(B * S, H // p["BH"], Dh // p["DC"]), S=S, K=K, W=W, NC=comp.shape[1], H=H, BH=p["BH"],
                       DN=ring.codes.shape[-1] if fp8 else Dh, DR=ring.rope.shape[-1] if fp8 else 0, FP8=fp8,
                       SCALE=float(np.float32(scale)), BK=p["BK"], DC=p["DC"], num_warps=p["num_warps"],
                       num_stages=p["num_stages"])


def sparse_attention(q, ring, chunk, comp, idx, sink, scale: float, p_dtype, *, kernels: str = "auto") -> jax.Array:
    """Attention of queries ``q [B,S,H,Dh]`` over index lists ``idx [B,S,K]`` into ``[ring | chunk | comp]`` (see
    :func:`sparse_attention_reference`). The Triton kernel runs only with ``kernels="triton"`` (on one device, bf16
    queries with bf16 P): ``"auto"`` keeps the XLA reference here until the kernel has passed its GPU test and the
    golden criteria on a GPU (it has only run under the interpreter so far)."""
    if (use_opt_in_triton(kernels) and q.dtype == jnp.bfloat16
            and p_dtype == jnp.bfloat16 and q.shape[-1] % 64 == 0):
        return sparse_attention_triton(q, ring, chunk, comp, idx, sink, scale)
    return sparse_attention_reference(q, ring, chunk, comp, idx, sink, scale, p_dtype)


# ---------------------------------------------------------------------------------------------- torch launcher
def run_torch(q, sources: list, fp8: bool, idx, sink, W: int, NC: int, scale: float, p: dict):
    """Launch the kernel on torch tensors (CI: under ``TRITON_INTERPRET=1``). ``sources``: three tuples
    (codes, scales, rope) or (values, dummy, dummy) for ring, chunk, compressed. Returns o ``[B,S,H,Dh]`` fp32."""
    import torch

    B, S, H, Dh = q.shape
    o = torch.full((B, S, H, Dh), float("nan"), dtype=torch.float32)
    flat = [t for src in sources for t in src]
    DN = sources[0][0].shape[-1] if fp8 else Dh
    _sparse_attn_kernel[(B * S, H // p["BH"], Dh // p["DC"])](q, idx, sink, *flat, o, S=S, K=idx.shape[-1], W=W,
                                                               NC=NC, H=H, BH=p["BH"], DN=DN, DR=Dh - DN, FP8=fp8,
                                                               SCALE=float(np.float32(scale)), BK=p["BK"], DC=p["DC"],
                                                INTERPRET=os.environ.get("TRITON_INTERPRET") == "1",
                                                num_warps=p["num_warps"], num_stages=p["num_stages"])
    return o
