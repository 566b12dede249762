"""Sparse attention at decode on Hopper (sm_90) with warp specialisation, in Gluon: a kernel beside the portable one
of :mod:`sparse_attention`, which takes decode calls of ``sparse_attention.WS_MIN_ROWS`` query rows or more there.

Why (issue 12): the portable kernel runs one dependent chain per 64-entry block (index load -> gather -> dequantize
-> shared memory -> q.k wgmma -> softmax -> P.V wgmma) in one 8-warp program per SM, so the gathers, the CUDA-core
decode and the tensor cores take turns: 18 % of the copy bandwidth at batch 32 and 1M tokens (H200, 2026-12-03).
Triton 3.6 does not warp-specialise a gather + dot loop on sm_90 (``docs/performance.md``); Gluon, Triton's
lower-level language, lets a kernel say which warps do what. Here one program (a query row's 64 heads over one
range of its index list, as the portable kernel's split plan) has two partitions:

* a decoder partition (4 warps, 112 registers): per 32-entry block, in list order, it copies the entries' e4m3 codes
  and bf16 RoPE dims from the source they live in (ring, chunk or compressed) with ``cp.async`` three blocks ahead
  into four staging buffers (a masked id's copy is zero-filled: its values read as 0; a thread copies several 16-byte
  pieces of one entry from one row address, whose arithmetic was most of the decoders' instructions when each piece
  computed its own), loads the 7-byte scale rows (``cp.async`` copies 4 bytes at least, aligned), then decodes codes
  x 2**(s - 127) (exact in bf16) into one of two ``[BK, 512]`` tiles, copies the RoPE dims into their columns and
  signals ``full``; ``empty`` tells it a tile is free again.
* the consumers (the default partition, 8 warps = 2 warpgroups): per block ``S = Q K^T`` (wgmma, Q ``[64, 512]``
  resident in shared memory, each warpgroup half of the block's entries), the online softmax of the portable kernel
  (running max, ``alpha = exp(m - m_new)``, P rounded to bf16 relative to the running max for P.V only), ``acc += P
  V`` (wgmma, P from registers, each warpgroup 256 of the 512 output dims), then ``empty``.

Plan knobs (:func:`plan`, benchmarks): ``DEC_WARPS=8`` (with ``MAXNREG=128``, ``DEC_REGS=80``, ``ACC_N=128``)
doubles the decoders: 16 warps leave ptxas 128 registers per instruction, so the accumulator's wgmma instructions
are 128 wide instead of 256; ``BK=64`` with ``SC=16`` (staging chunks of 16 entries, so that two 64-entry tiles, Q
and the staging fit 227 KB) halves the consumers' Q reads and softmax steps per entry; ``PROBE=1`` / ``PROBE=2``
time the decoders or the consumers alone (the output is then wrong); ``NST=3`` stages three staging chunks (two
ahead) instead of four; ``EC`` entries decoded at a time; ``LACC``, ``MX`` (consumers) and ``IDREG`` (decoders):
fewer barriers and instructions a block, on by default since timed (the constants below). The variants measured and
removed (sessions 38-41: whole-S warpgroups, maxima and P exchanged under mbarriers, the next q.k issued early,
select-free addresses, an integer-move decode, lazy rescaling, head-dim-split consumers) are in
``docs/performance.md`` with their numbers.

Register budgets (sm_90a builds, ``tests/test_kernels_sparse_attn_ws.py``): ptxas checks each instruction against
the kernel's average (65,536 / threads) whatever the ``setmaxnreg`` regions allow, and a 64 x 256 wgmma with an fp32
accumulator needs 158: hence 12 warps under a 168 cap (Triton sizes the partitions' ``setmaxnreg`` from the cap,
which a warp-specialised kernel must be given), or 16 with 128-wide instructions. The decoder decoding 8 entries at
a time spills below ~88 registers, a whole 32-entry chunk (the default: 5 barriers a chunk instead of 9, decoders
alone 9 % faster) fits 112.

Same arithmetic as the portable kernel (exact bf16 x bf16 products, fp32 sums in the tensor cores' order; ``LACC``
sums the softmax denominator in another fp32 order), the same workspace ``(acc, m, l)`` per split, merged by
:func:`sparse_attention._combine_kernel` (sink, division, the output's inverse RoPE): so the numerics contract of
:mod:`sparse_attention` holds as it is.

Scope: sm_90 only (wgmma, mbarriers, ``setmaxnreg``), no interpreter (Gluon has none): tested on the GPU against the
XLA reference and compiled for sm_90a without a GPU in CI. V4's layout only: 64 heads per program (a multiple of 64
heads), 448 FP8 dims with 1x64 scales + 64 bf16 RoPE dims. Launched from torch (:func:`run_torch`) or inside ``jit``
(:func:`launch_jax`: jax-triton, whose kernel builder :mod:`gluon_route` extends to Gluon functions), where
``sparse_attention.WS`` (default: the rule above) sends decode rows.
"""

from __future__ import annotations

import math

import numpy as np

try:  # Gluon ships with triton >= 3.5; the model never needs it
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        async_copy,
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.runtime.jit import constexpr_function
except ImportError:  # pragma: no cover - a triton without Gluon
    gluon = gl = None

BK = 32  # entries per block
NBUF = 2  # bf16 tiles between the decoder and the consumers
HEADS = 64  # heads per program (wgmma's M)
DEC_WARPS = 4
DEC_REGS = 112  # registers per decoder thread (setmaxnreg; a whole 32-entry chunk decoded at once)
MAXNREG = 168  # the kernel's register cap: 12 warps x 168 fit the 64K registers; the consumers get the rest
EC = 32  # entries a decoder decodes at a time (at most the chunk: one pass, fewer barriers)
NST = 4  # staging chunks (NST - 1 in flight ahead of the one decoded: 6 % faster than 3 at HCA 1M batch 32, H100)
# Consumer loop 9 -> 4 barriers and 425 -> 402 instructions a block with LACC and MX, decoder loop 678 -> 636
# instructions a chunk with IDREG (sm_90a): together 165.7 -> 152.3 us at HCA 1M batch 32, 2-5 % at CSA 128K b32,
# HCA 128K b32 and HCA 1M b8 (H100, 2026-12-08). LACC and MX apply where they fit (:func:`plan`).
LACC = 1  # l kept per score column, summed after the last block (:func:`_online`)
MX = 1  # the row maxima exchanged between the consumer warpgroups under one barrier (:func:`_row_max`)
IDREG = 1  # a chunk's ids carried in registers from its issue to its decode (:func:`_decoder`)


if gluon is not None:

    @constexpr_function
    def _layout3(num_warps):
        """The decoder's ``[entries, 8, 64]`` layout (groups of 64 dims, 16 bytes a thread)."""
        return gl.BlockedLayout([1, 1, 16], [1, 8, 4], [num_warps, 1, 1], [2, 1, 0])

    @constexpr_function
    def _layout_il(num_warps, n):
        """The gathers' ``[n, 8, 64]`` layout in which a thread copies ``te`` of an entry's eight 64-byte
        groups (every ``8 // te``-th, 16 bytes each; ``te`` entries per warp and pass, up to 4) from one row address,
        so that the address arithmetic (id, source select, 64-bit row offset) is done once per ``te`` copies instead
        of once per copy; each warp instruction still covers all 32 banks (``te`` entries x groups of both parities
        x four 16-byte columns)."""
        te = min(4, max(1, n // num_warps))
        return gl.BlockedLayout([1, 1, 16], [te, 8 // te, 4], [num_warps, 1, 1], [2, 1, 0])

    @constexpr_function
    def _layout_rope(num_warps, n):
        """The RoPE rows' ``[n, 64]`` bf16 layout, one pass per chunk: ``te`` entries per warp, a thread
        copying ``2 te`` consecutive dims (one row address per thread)."""
        te = min(8, max(1, n // num_warps))
        return gl.BlockedLayout([1, 2 * te], [te, 32 // te], [num_warps, 1], [1, 0])

    @constexpr_function
    def _layout_sc(num_warps):
        """The scale rows' ``[n, 8]`` layout: a thread loads one entry's bytes from one row address."""
        return gl.BlockedLayout([1, 8], [32, 1], [num_warps, 1], [1, 0])

    @gluon.jit
    def _x3(v):
        """``[n]`` -> ``[n, 1, 1]``."""
        return gl.expand_dims(gl.expand_dims(v, 1), 2)

    @gluon.jit
    def _load_ids(idx_ptr, row, t, j0, K: gl.constexpr, BK: gl.constexpr, NB: gl.constexpr,
                  L: gl.constexpr = None):
        """Block ``t``'s ids ``[BK]`` (-1 past K and past the program's range), in layout ``L`` (default: the
        decoder's entries)."""
        LL: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, _layout3(gl.num_warps()))) if L is None else L
        jj = j0 + t * BK + gl.arange(0, BK, layout=LL)
        return gl.load(idx_ptr + row * K + jj, mask=(jj < K) & (t < NB), other=-1)

    @gluon.jit
    def _chunk_ids(idx_ptr, row, t, j0, K: gl.constexpr, SC: gl.constexpr, NB: gl.constexpr):
        """Chunk ``t``'s ids in each layout its gathers and decode use (read from global memory, cached, rather than
        passed through shared memory: that took a barrier a chunk)."""
        return (_load_ids(idx_ptr, row, t, j0, K, SC, NB),
                _load_ids(idx_ptr, row, t, j0, K, SC, NB,
                          gl.SliceLayout(1, gl.SliceLayout(2, _layout_il(gl.num_warps(), SC)))),
                _load_ids(idx_ptr, row, t, j0, K, SC, NB, gl.SliceLayout(1, _layout_rope(gl.num_warps(), SC))),
                _load_ids(idx_ptr, row, t, j0, K, SC, NB, gl.SliceLayout(1, _layout_sc(gl.num_warps()))))

    @gluon.jit
    def _rows(ids, b, S: gl.constexpr, W: gl.constexpr, NC: gl.constexpr):
        """Ids -> (in ring, in chunk, row in its source)."""
        in_r = ids < W
        in_c = (ids >= W) & (ids < W + S)
        r = gl.where(in_r, b * W + ids, gl.where(in_c, b * S + ids - W, b * NC + ids - W - S)).to(gl.int64)
        return in_r, in_c, r

    @gluon.jit
    def _src(ids, pr, pc, pk, D: gl.constexpr, b, S: gl.constexpr, W: gl.constexpr, NC: gl.constexpr):
        """Ids -> pointers to their rows (``D`` elements a row) in the ring ``pr``, the chunk ``pc`` or the compressed
        cache ``pk``."""
        in_r, in_c, r = _rows(ids, b, S, W, NC)
        return gl.where(in_r, pr, gl.where(in_c, pc, pk)) + r * D

    @gluon.jit
    def _issue(ids, ei, er, es, rc, rs, rr, cc, cs, cr, kc, ks, kr, rawc, rawr, idst, b, S: gl.constexpr,
               W: gl.constexpr, NC: gl.constexpr, DN: gl.constexpr, DR: gl.constexpr, SST: gl.constexpr,
               BK: gl.constexpr, IDREG: gl.constexpr = 0):
        """Start a chunk's gathers into one stage (its ids in the layouts of :func:`_chunk_ids`): its ids to ``idst``
        (for the tile's id row, read after the chunk has landed), its code bytes (``[BK, 8, 64]``) and RoPE
        dims (``[BK, 64]`` bf16) by ``cp.async``, each in one pass with one row address per thread and entry
        (:func:`_layout_il`, :func:`_layout_rope`: the address arithmetic was most of the decoders' instructions when
        every 16-byte copy computed its own); returns its scale bytes ``[BK, 8]`` (plain loads, in flight:
        ``cp.async`` cannot copy a 7-byte row). ``IDREG``: the ids stay in the caller's registers instead."""
        if not IDREG:
            idst.store(ids)
        LI: gl.constexpr = _layout_il(gl.num_warps(), BK)
        gi = gl.expand_dims(gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, LI))), 0), 2)
        ii = gl.expand_dims(gl.expand_dims(gl.arange(0, 64, layout=gl.SliceLayout(0, gl.SliceLayout(1, LI))), 0), 1)
        async_copy.async_copy_global_to_shared(rawc, _x3(_src(ei, rc, cc, kc, DN, b, S, W, NC)) + gi * 64 + ii,
                                               mask=_x3(ei >= 0) & (gi * 64 < DN))
        LRo: gl.constexpr = _layout_rope(gl.num_warps(), BK)
        dr = gl.expand_dims(gl.arange(0, 64, layout=gl.SliceLayout(0, LRo)), 0)  # [1, 64]
        async_copy.async_copy_global_to_shared(rawr, gl.expand_dims(_src(er, rr, cr, kr, DR, b, S, W, NC), 1) + dr,
                                               mask=gl.expand_dims(er >= 0, 1))
        async_copy.commit_group()
        LS: gl.constexpr = _layout_sc(gl.num_warps())
        gs = gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, LS)), 0)  # [1, 8]
        return gl.load(gl.expand_dims(_src(es, rs, cs, ks, SST, b, S, W, NC), 1) + gs,
                       mask=gl.expand_dims(es >= 0, 1) & (gs * 64 < DN), other=127)

    @gluon.jit
    def _decoder(idx_ptr, rc, rs, rr, cc, cs, cr, kc, ks, kr, kbufs, idbufs, rawcs, rawrs, idsts, scst, full, empty,
                 row, b, j0, S: gl.constexpr, K: gl.constexpr, W: gl.constexpr, NC: gl.constexpr, DN: gl.constexpr,
                 DR: gl.constexpr, SST: gl.constexpr, BK: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr,
                 EC: gl.constexpr, SC: gl.constexpr, NST: gl.constexpr, IDREG: gl.constexpr = 0):
        """The program's ``NB`` blocks, in order, into the ``NBUF`` tile buffers, in chunks of ``SC`` entries (``SC``
        divides ``BK``): each chunk gathered by ``cp.async`` ``NST - 1`` chunks ahead into one of ``NST`` (3 or 4)
        staging buffers, then decoded (e4m3 code x its e8m0 scale, RoPE dims as they are; exact in bf16) into its
        rows of a tile ``[BK, 512]``, entry ``e``'s dims at row ``e`` (masked ids: zeros); the tile is signalled full
        after its last chunk. (Chunks smaller than the tile keep the staging within shared memory at 64-entry
        tiles.) ``IDREG``: a chunk's ids for the tile's id row travel in registers (one a lane, in the scale rows'
        layout, rotated with them) from its issue to its decode instead of through a per-stage shared buffer."""
        L3: gl.constexpr = _layout3(gl.num_warps())
        LRR: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])  # [SC, 64] RoPE dims
        CPB: gl.constexpr = BK // SC  # chunks per block
        NCH: gl.constexpr = NB * CPB
        i0, i1, i2, i3 = _chunk_ids(idx_ptr, row, 0, j0, K, SC, NCH)
        sc0 = _issue(i0, i1, i2, i3, rc, rs, rr, cc, cs, cr, kc, ks, kr, rawcs.index(0), rawrs.index(0),
                     idsts.index(0), b, S, W, NC, DN, DR, SST, SC, IDREG)
        d0 = i3  # IDREG: the chunks' ids in flight, rotated like their scale rows
        i0, i1, i2, i3 = _chunk_ids(idx_ptr, row, 1, j0, K, SC, NCH)
        sc1 = _issue(i0, i1, i2, i3, rc, rs, rr, cc, cs, cr, kc, ks, kr, rawcs.index(1), rawrs.index(1),
                     idsts.index(1), b, S, W, NC, DN, DR, SST, SC, IDREG)
        d1 = i3
        if NST == 4:
            i0, i1, i2, i3 = _chunk_ids(idx_ptr, row, 2, j0, K, SC, NCH)
            sc2 = _issue(i0, i1, i2, i3, rc, rs, rr, cc, cs, cr, kc, ks, kr, rawcs.index(2), rawrs.index(2),
                         idsts.index(2), b, S, W, NC, DN, DR, SST, SC, IDREG)
            d2 = i3
        else:
            sc2 = sc1  # unused
            d2 = d1
        i0, i1, i2, i3 = _chunk_ids(idx_ptr, row, NST - 1, j0, K, SC, NCH)
        for n in range(NB):
            tb = n % NBUF
            kblk = kbufs.index(tb)
            for j in gl.static_range(CPB):
                ch = n * CPB + j  # the chunk
                st = ch % NST
                sn = (ch + NST - 1) % NST
                new = _issue(i0, i1, i2, i3, rc, rs, rr, cc, cs, cr, kc, ks, kr, rawcs.index(sn), rawrs.index(sn),
                             idsts.index(sn), b, S, W, NC, DN, DR, SST, SC, IDREG)
                dnew = i3
                i0, i1, i2, i3 = _chunk_ids(idx_ptr, row, ch + NST, j0, K, SC, NCH)
                scst.store(sc0)
                async_copy.wait_group(NST - 1)  # chunk ch's copies (this thread's) have landed ...
                gl.thread_barrier()  # ... and every decoder thread's
                if j == 0:
                    mbarrier.wait(empty.index(tb), ((n // NBUF) & 1) ^ 1)  # the consumers are done with the tile
                kbuf = kblk.slice(j * SC, SC, dim=0)
                rawc = rawcs.index(st)
                for c in gl.static_range(SC // EC):  # codes x scales; a masked entry's bytes were zero-filled (0)
                    cv = rawc.slice(c * EC, EC, dim=0).load(L3)  # [EC, 8, 64] code bytes (group 7: zeros)
                    f = (scst.slice(c * EC, EC, dim=0).load(gl.SliceLayout(2, L3)).to(gl.int32) << 23).to(
                        gl.float32, bitcast=True)  # [EC, 8] 2**(s - 127)
                    v = cv.to(gl.float8e4nv, bitcast=True).to(gl.float32) * gl.expand_dims(f, 2)
                    kbuf.slice(c * EC, EC, dim=0).store(gl.reshape(v.to(gl.bfloat16), [EC, 512]))
                gl.thread_barrier()  # the codes' tile rows are written before the RoPE dims overwrite their group 7
                kbuf.slice(DN, DR, dim=1).store(rawrs.index(st).load(LRR))  # [SC, 64] bf16 (masked entries: zeros)
                if IDREG:
                    idbufs.index(tb).slice(j * SC, SC, dim=0).store(d0)
                else:
                    idbufs.index(tb).slice(j * SC, SC, dim=0).store(
                        idsts.index(st).load(gl.SliceLayout(1, gl.SliceLayout(2, L3))))
                if j == CPB - 1:
                    fence_async_shared()
                    mbarrier.arrive(full.index(tb), count=1)
                gl.thread_barrier()  # every thread is done with this stage before it is refilled
                sc0 = sc1
                d0 = d1
                if NST == 4:
                    sc1 = sc2
                    sc2 = new
                    d1 = d2
                    d2 = dnew
                else:
                    sc1 = new
                    d1 = dnew

    @gluon.jit
    def _feeder(idx_ptr, idbufs, full, empty, row, j0, K: gl.constexpr, BK: gl.constexpr, NB: gl.constexpr,
                NBUF: gl.constexpr):
        """``PROBE = 2`` (timing only: the output is wrong): a decoder partition that hands the consumers each block's
        ids and the tiles as they are, without gathering or decoding, so that a run times the consumers alone."""
        for n in range(NB):
            tb = n % NBUF
            ids = _load_ids(idx_ptr, row, n, j0, K, BK, NB)
            mbarrier.wait(empty.index(tb), ((n // NBUF) & 1) ^ 1)
            idbufs.index(tb).store(ids)
            fence_async_shared()
            mbarrier.arrive(full.index(tb), count=1)

    @gluon.jit
    def _row_max(s, xb, t, BK: gl.constexpr):
        """``MX``: the row maxima of ``s [64, BK]`` (each consumer warpgroup holding half of the columns) with one
        barrier: each warpgroup reduces its own half within its warps (shuffles), writes it to the block's half of
        ``xb [2, 128]`` (blocks alternate, so a later block never overwrites what a slower warp still reads),
        and every thread reads both halves. Exact (a maximum), so nothing changes numerically."""
        pm = gl.max(gl.reshape(s, [64, 2, BK // 2]), axis=2)  # [64, 2]: warpgroup w's maximum in column w
        buf = xb.index(t % 2)  # [128]: warpgroup w's maxima at [64 w, 64 w + 64)
        buf.reshape([2, 64]).permute((1, 0)).store(pm)
        gl.thread_barrier()
        rl: gl.constexpr = gl.SliceLayout(1, s.type.layout)
        return gl.maximum(buf.slice(0, 64).load(rl), buf.slice(64, 64).load(rl))

    @gluon.jit
    def _online(s, ids, m, l, xb, t, SCALE: gl.constexpr, BK: gl.constexpr, LACC: gl.constexpr, MX: gl.constexpr):
        """One block of the portable kernel's online softmax: raw scores ``s [64, BK]``, the block's ids, the running
        ``m``, ``l`` -> ``(p, alpha, m_new, l_new)``. ``LACC``: ``l`` is kept per score column (``[64, BK]``,
        rescaled by ``alpha``, the block's ``p`` added) and summed over a row's columns (a reduction across both
        consumer warpgroups) once after the last block instead of every block: the same terms in another fp32
        order. ``MX``: the row maxima through :func:`_row_max` (one barrier instead of Gluon's three)."""
        s = gl.where(gl.expand_dims(ids >= 0, 0), s * SCALE, float("-inf"))
        if MX:
            m_new = gl.maximum(m, _row_max(s, xb, t, BK))
        else:
            m_new = gl.maximum(m, gl.max(s, axis=1))
        m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: p = alpha = 0, no NaN
        alpha = gl.exp(m - m_ref)
        p = gl.exp(s - gl.expand_dims(m_ref, 1))
        if LACC:
            l = l * gl.expand_dims(alpha, 1) + p
        else:
            l = l * alpha + gl.sum(p, axis=1)
        return p, alpha, m_new, l

    @gluon.jit
    def _attend(q_smem, kbufs, idbufs, xb, full, empty, acc_l: gl.constexpr, s_l: gl.constexpr,
                SCALE: gl.constexpr, DH: gl.constexpr, BK: gl.constexpr, NB: gl.constexpr, NBUF: gl.constexpr,
                LACC: gl.constexpr, MX: gl.constexpr):
        """The consumers' loop over the program's ``NB`` blocks, in the layouts ``acc_l`` (``acc``) and ``s_l``
        (scores): q.k, the online softmax, P.V -> ``(acc [64, DH], m [64], l [64])`` fp32; each tile is released
        (``empty``) once both dots are done. ``LACC``: ``l`` accumulated per score column and summed after the last
        block, ``MX``: the row maxima exchanged under one barrier (:func:`_online`)."""
        p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
        acc = gl.zeros([64, DH], gl.float32, acc_l)
        m = gl.full([64], float("-inf"), gl.float32, gl.SliceLayout(1, s_l))
        s0 = gl.zeros([64, BK], gl.float32, s_l)
        if LACC:
            l = gl.zeros([64, BK], gl.float32, s_l)
        else:
            l = gl.zeros([64], gl.float32, gl.SliceLayout(1, s_l))
        for t in range(NB):
            d = t % NBUF
            mbarrier.wait(full.index(d), (t // NBUF) & 1)
            kb = kbufs.index(d)
            s = warpgroup_mma(q_smem, kb.permute((1, 0)), s0, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            ids = idbufs.index(d).load(gl.SliceLayout(0, s_l))
            p, alpha, m_new, l = _online(s, ids, m, l, xb, t, SCALE, BK, LACC, MX)
            pb = gl.convert_layout(p.to(gl.bfloat16), p_l)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, acc_l)), 1)
            acc = warpgroup_mma(pb, kb, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(empty.index(d), count=1)
            m = m_new
        if LACC:
            return acc, m, gl.sum(l, axis=1)
        else:
            return acc, m, l

    @gluon.jit
    def _idle(full, empty, acc_l: gl.constexpr, s_l: gl.constexpr, DH: gl.constexpr, NB: gl.constexpr,
              NBUF: gl.constexpr):
        """``PROBE = 1`` (timing only: the output is wrong): consumers that only take and release the tiles, so
        that a run times the decoders alone."""
        for t in range(NB):
            mbarrier.wait(full.index(t % NBUF), (t // NBUF) & 1)
            mbarrier.arrive(empty.index(t % NBUF), count=1)
        return (gl.zeros([64, DH], gl.float32, acc_l), gl.zeros([64], gl.float32, gl.SliceLayout(1, s_l)),
                gl.zeros([64], gl.float32, gl.SliceLayout(1, s_l)))

    @gluon.jit
    def _store_ws(o_ptr, m_ptr, l_ptr, ws, acc, m, l, acc_l: gl.constexpr, DH: gl.constexpr):
        """Workspace rows ``[ws, ws + 64)``: ``acc``, ``m`` and ``l``."""
        ha = gl.arange(0, 64, layout=gl.SliceLayout(1, acc_l))
        da = gl.arange(0, DH, layout=gl.SliceLayout(0, acc_l))
        gl.store(o_ptr + gl.expand_dims((ws + ha).to(gl.int64), 1) * DH + gl.expand_dims(da, 0), acc)
        hm = gl.arange(0, 64, layout=m.type.layout)
        gl.store(m_ptr + ws + hm, m)
        gl.store(l_ptr + ws + hm, l)

    @gluon.jit
    def _consumer(q_smem, kbufs, idbufs, xb, full, empty, SCALE: gl.constexpr, DH: gl.constexpr, BK: gl.constexpr,
                  NB: gl.constexpr, NBUF: gl.constexpr, ACC_N: gl.constexpr, PROBE: gl.constexpr, LACC: gl.constexpr,
                  MX: gl.constexpr):
        """The 8 consumer warps (the default partition): each warpgroup half of a block's scores and half the output
        dims -> ``(acc [64, DH], m [64], l [64])`` fp32."""
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                        instr_shape=[16, ACC_N, 16])
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                      instr_shape=[16, BK // 2, 16])
        if PROBE == 1:
            return _idle(full, empty, acc_l, s_l, DH, NB, NBUF)
        else:
            return _attend(q_smem, kbufs, idbufs, xb, full, empty, acc_l, s_l, SCALE, DH, BK, NB, NBUF, LACC, MX)

    @gluon.jit
    def _sparse_attn_ws_kernel(q_ptr, idx_ptr, rc, rs, rr, cc, cs, cr, kc, ks, kr, o_ptr, m_ptr, l_ptr,
                               S: gl.constexpr, K: gl.constexpr, W: gl.constexpr, NC: gl.constexpr, H: gl.constexpr,
                               DN: gl.constexpr, DR: gl.constexpr, SCALE: gl.constexpr, BK: gl.constexpr,
                               SPLIT: gl.constexpr, BPS: gl.constexpr, SST: gl.constexpr, NBUF: gl.constexpr,
                               DEC_WARPS: gl.constexpr, DEC_REGS: gl.constexpr, EC: gl.constexpr,
                               ACC_N: gl.constexpr = 256, MAXNREG: gl.constexpr = 168, SC: gl.constexpr = 32,
                               PROBE: gl.constexpr = 0, NST: gl.constexpr = 3, LACC: gl.constexpr = 0,
                               MX: gl.constexpr = 0, IDREG: gl.constexpr = 0):
        """Program ``(row * SPLIT + sp) * (H / 64) + g``: heads ``[64 g, 64 g + 64)`` of query row ``row`` over
        blocks ``[sp * BPS, (sp + 1) * BPS)`` of its list -> the workspace ``acc [B*S, SPLIT, H, DH]``, ``m``,
        ``l [B*S, SPLIT, H]`` (fp32), as :func:`sparse_attention._sparse_attn_kernel` writes it."""
        DH: gl.constexpr = DN + DR
        G: gl.constexpr = H // 64
        pid = gl.program_id(0)
        g = pid % G
        sp = (pid // G) % SPLIT
        row = pid // (G * SPLIT)
        b = row // S
        # Q [64, DH] of this row's head group, resident in shared memory for every block's q.k
        ql: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
        h = gl.arange(0, 64, layout=gl.SliceLayout(1, ql))
        dq = gl.arange(0, DH, layout=gl.SliceLayout(0, ql))
        qrows = (row * H + g * 64 + h).to(gl.int64)
        qv = gl.load(q_ptr + gl.expand_dims(qrows, 1) * DH + gl.expand_dims(dq, 0))
        q_smem = gl.allocate_shared_memory(gl.bfloat16, [64, DH],
                                           gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2))
        q_smem.store(qv)
        kbufs = gl.allocate_shared_memory(gl.bfloat16, [NBUF, BK, DH],
                                          gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2))
        idbufs = gl.allocate_shared_memory(gl.int32, [NBUF, BK], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
        rawcs = gl.allocate_shared_memory(gl.uint8, [NST, SC, 8, 64],
                                          gl.SwizzledSharedLayout(1, 1, 1, order=[2, 1, 0]))
        rawrs = gl.allocate_shared_memory(gl.bfloat16, [NST, SC, 64], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
        idsts = gl.allocate_shared_memory(gl.int32, [NST, SC], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
        scst = gl.allocate_shared_memory(gl.uint8, [SC, 8], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
        xl: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])  # rank 1: indexed per block
        if MX:  # the row maxima's exchange: [block parity, warpgroup * 64 + row]
            xb = gl.allocate_shared_memory(gl.float32, [2, 128], xl)
        else:
            xb = gl.allocate_shared_memory(gl.float32, [2, 1], xl)  # unused
        full = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NBUF):
            mbarrier.init(full.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        fence_async_shared()
        j0 = sp * (BPS * BK)
        ws = (row * SPLIT + sp) * H + g * 64  # the program's first workspace row
        if PROBE == 2:
            acc, m, l = gl.warp_specialize([
                (_consumer, (q_smem, kbufs, idbufs, xb, full, empty, SCALE, DH, BK, BPS, NBUF, ACC_N, PROBE, LACC,
                             MX)),
                (_feeder, (idx_ptr, idbufs, full, empty, row, j0, K, BK, BPS, NBUF))],
                [DEC_WARPS], [DEC_REGS])
        else:
            acc, m, l = gl.warp_specialize([
                (_consumer, (q_smem, kbufs, idbufs, xb, full, empty, SCALE, DH, BK, BPS, NBUF, ACC_N, PROBE, LACC,
                             MX)),
                (_decoder, (idx_ptr, rc, rs, rr, cc, cs, cr, kc, ks, kr, kbufs, idbufs, rawcs, rawrs, idsts, scst,
                            full, empty, row, b, j0, S, K, W, NC, DN, DR, SST, BK, BPS, NBUF, EC, SC, NST, IDREG))],
                [DEC_WARPS], [DEC_REGS])
            acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                            instr_shape=[16, ACC_N, 16])
            _store_ws(o_ptr, m_ptr, l_ptr, ws, acc, m, l, acc_l, DH)

def supported(H: int, DN: int, DR: int, fp8: bool) -> bool:
    """Whether the kernel handles this layout: Gluon present, FP8 entries of V4's 448 + 64 dims, 64 heads a group."""
    return gluon is not None and fp8 and H % HEADS == 0 and DN == 448 and DR == 64


def plan(rows: int, H: int, K: int, sms: int, tiles: dict | None = None) -> dict:
    """Blocks per program and splits: as :func:`sparse_attention.plan`'s decode split (one program per SM, one
    wave), over ``BK``-entry blocks (:data:`BK`, or ``tiles``' value); ``tiles``: plan knobs that override the
    defaults (benchmarks, tests)."""
    t = dict(tiles or {})
    bk = t.get("BK", BK)
    nb = math.ceil(K / bk)
    split = max(1, min(nb, sms // (rows * (H // HEADS))))
    bps = math.ceil(nb / split)
    cuts = bk == 32 and t.get("MAXNREG", MAXNREG) > 128  # LACC and MX spill at 64-entry tiles or a 128-register cap
    return dict(BK=bk, BPS=bps, SPLIT=math.ceil(nb / bps), NBUF=NBUF, DEC_WARPS=DEC_WARPS, DEC_REGS=DEC_REGS, EC=EC,
                MAXNREG=MAXNREG, NST=NST if bk == 32 else 3,  # 64-entry tiles: 4 stages do not fit 227 KB
                LACC=LACC if cuts else 0, MX=MX if cuts else 0, IDREG=IDREG) | t


def num_warps(p: dict) -> int:
    """The kernel's ``num_warps`` (its default partition): the 8 consumer warps."""
    return 8


def _meta(q_shape, W: int, NC: int, K: int, DN: int, scale: float, p: dict, sst: int) -> dict:
    """The kernel's constexprs for queries of ``q_shape`` over ``K``-entry lists under plan ``p`` (``sst``: bytes per
    scale row)."""
    B, S, H, Dh = q_shape
    if p["NST"] not in (3, 4):  # the decoder carries the in-flight chunks' scale rows for 3 or 4 stages only
        raise ValueError(f"sparse_attention_ws plan: NST={p['NST']}, expected 3 or 4 staging chunks")
    if p.get("MX") and p["BK"] > 32:  # sm_90a build: 233,124 B of shared memory (and 8 B spilled) with BK=64, SC=16
        raise ValueError(f"sparse_attention_ws plan: MX=1 with BK={p['BK']} needs more than an sm_90 block's 227 KB "
                         "of shared memory; use 32-entry tiles")
    return dict(S=S, K=K, W=W, NC=NC, H=H, DN=DN, DR=Dh - DN, SCALE=float(np.float32(scale)), BK=p["BK"],
                SPLIT=p["SPLIT"], BPS=p["BPS"], SST=sst, NBUF=p["NBUF"], DEC_WARPS=p["DEC_WARPS"],
                DEC_REGS=p["DEC_REGS"], EC=min(p["EC"], p.get("SC", p["BK"])), ACC_N=p.get("ACC_N", 256),
                MAXNREG=p["MAXNREG"], SC=p.get("SC", p["BK"]), PROBE=int(p.get("PROBE", 0)), NST=p["NST"],
                LACC=int(p.get("LACC", 0)), MX=int(p.get("MX", 0)), IDREG=int(p.get("IDREG", 0)))


def run_torch(q, sources: list, idx, sink, W: int, NC: int, scale: float, p: dict, rope=None):
    """Launch on torch tensors (CUDA, sm_90): the Gluon kernel into the workspace, then the portable merge.
    ``sources``: three (codes, scales, rope) tuples (ring, chunk, compressed); ``p``: a :func:`plan`. Returns o
    ``[B, S, H, Dh]`` fp32."""
    import torch

    from dsv4_jax.kernels.sparse_attention import merge_tile
    from dsv4_jax.kernels.sparse_attention_torch import merge_torch

    B, S, H, Dh = q.shape
    K = idx.shape[-1]
    flat = [t for src in sources for t in src]
    DN = sources[0][0].shape[-1]
    meta = _meta(q.shape, W, NC, K, DN, scale, p, sources[0][1].shape[-1])
    R, sp = B * S, p["SPLIT"]
    nan = lambda *s: torch.full(s, float("nan"), dtype=torch.float32, device=q.device)  # noqa: E731
    acc, m, l = nan(R, sp, H, Dh), nan(R, sp, H), nan(R, sp, H)
    _sparse_attn_ws_kernel[(R * sp * (H // HEADS),)](q, idx, *flat, acc, m, l, num_warps=num_warps(p),
                                                     maxnreg=p["MAXNREG"], **meta)
    return merge_torch(acc, m, l, sink, q.shape, merge_tile(sp, Dh), rope)


# ---------------------------------------------------------------------------------------------- jax launcher
def launch_jax(q, idx, parts: list, W: int, NC: int, scale: float, p: dict, sst: int):
    """The kernel inside ``jit`` (jax-triton, through :func:`gluon_route.install`): ``q [B, S, H, Dh]`` bf16,
    ``idx [B, S, K]`` int32, ``parts``: the ring's, chunk's and compressed cache's (codes, scales, rope) -> the
    workspace ``(acc [B*S, SPLIT, H, Dh], m, l [B*S, SPLIT, H])`` fp32 for :func:`sparse_attention._combine_kernel`."""
    import jax
    import jax.numpy as jnp
    import jax_triton as jt

    from dsv4_jax.kernels import gluon_route

    gluon_route.install()
    B, S, H, Dh = q.shape
    K = idx.shape[-1]
    meta = _meta(q.shape, W, NC, K, parts[0].shape[-1], scale, p, sst)
    R, sp = B * S, p["SPLIT"]
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    return jt.triton_call(q, idx, *parts, kernel=_sparse_attn_ws_kernel, grid=(R * sp * (H // HEADS),),
                          out_shape=[f32(R, sp, H, Dh), f32(R, sp, H), f32(R, sp, H)], num_warps=num_warps(p),
                          num_stages=1,
                          **meta)
