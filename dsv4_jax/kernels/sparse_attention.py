"""Sparse attention over index lists (spec 6, the official ``sparse_attn``), reading the caches in place.

Public function :func:`sparse_attention`: each query row ``(b, s)`` attends to the entries its index list names in
``[ring (W) | chunk (S) | compressed (Nc)]`` (-1 = masked), with a per-head sink logit in the denominator only.
:func:`sparse_attention_reference` (its own module beside this one, :mod:`sparse_attention_ref`, re-exported here)
is the XLA code the model always ran (the CPU path): it concatenates the three buffers, gathers, and rounds P to
bf16 relative to each row's final maximum.

The Triton kernel (:func:`_sparse_attn_kernel`) follows the official kernel's loop instead: blocks of ``BK`` (64)
indices in list order, online softmax (running max ``m``, ``alpha = exp(m - m_new)``), P rounded to bf16 relative to
the running max for the P.V product only, the sink added to the denominator at the end. It reads each gathered
entry straight from the buffer it lives in (the three sources share one layout, so a per-entry pointer select picks
the source; no concatenated copy) and decodes FP8-snapped entries in registers (e4m3 code x its 1x64 e8m0 scale,
exact in bf16; RoPE dims bf16).

Work split (:func:`plan`, one flat grid of ``rows x SPLIT x (H/BH) x (Dh/DC)`` programs). A program holds ``BH``
heads of one row, ``DC`` output dims and one range of the index list:

* output dims: the program loads its own ``[BK, DC]`` tile once per block and uses it for both its share of q.k and
  its P.V; the other ``Dh - DC`` dims of q.k come in 64-dim chunks. The GPU plan takes ``DC = Dh`` (q.k once per
  block); ``DC = Dh / 2`` (the plan until 2026-12-03) computed the scores twice per head group and took twice as long
  at long context; the first version (``DC = 64``) recomputed all of q.k for each of V4's 8 output chunks.
* index list ("flash-decoding"): decode rows alone cannot fill the card, so the list's ``ceil(K / BK)`` blocks are cut
  into ``SPLIT`` ranges of ``BPS`` blocks (a constant trip count; the last range's blocks past K are all masked:
  no memory traffic). Each program runs the online softmax over its range and writes its partial ``(m, l, acc)`` in
  fp32 to a workspace; :func:`_combine_kernel` merges the splits in fp32 (a fixed reduction order: deterministic),
  adds the sink, divides and rounds to bf16. ``SPLIT = 1`` (prefill: rows fill the card) writes the output
  directly, no workspace, one launch.

A block whose entries are all masked leaves ``m``, ``l`` and ``acc`` unchanged (the official kernel relies on the
first block holding a valid index; our window lists put the masked slots first, so the kernel guards
``-inf - -inf``); a split whose whole range is masked writes ``m = -inf, l = 0, acc = 0`` and weighs 0 in the merge.

Numerics contract (tested): kernel and reference form the same exact bf16 x bf16 products; they differ in the fp32
summation order and in the point P is rounded at (running max of the block's split, vs the row's final max: each P
element carries one bf16 rounding either way; the merge rescales by ``exp(m_split - m_row)`` in fp32), so outputs
agree within ``2**-8`` of ``sum_j p_j |v_j| / l`` plus one bf16 ulp, split or not. With ``DC < Dh`` the split path
takes ``m`` and ``l`` from the first dim group; the others' scores may differ from it in the last fp32 bits
(summation order), ~1e-6 relative on their ``acc``, inside the same fp32 slack.

Loads: a tile's dims come as ``[BK, DW/64, 64]`` groups (DN and tile starts are multiples of 64, so a group lies in
one scale group and is all codes or all RoPE): masks and scales are per group, one scale byte per group and thread
(the per-element form moved a byte per element through shared memory: 1,504 -> 1,282 SASS instructions per block
on sm_90a, 36 -> 8 byte loads).

GPU plan (:func:`plan`, sm90): BH 64 (16 to 64 heads; fewer are padded and masked) x the whole head (DC = Dh), one
pipeline stage, 8 warps; BK 128 for index lists longer than :data:`LONG_LIST` (1,024) entries, else 32. The fp32
accumulator of 64 heads x 512 dims is 128 of the 255 registers per thread: the BK 128 build spills ~180 bytes and
was still the fastest on long lists (``tests/test_kernels_sm90.py`` compiles every plan for sm_90a without a GPU and
allows that spill only there). On an H200 (2026-12-03, ``scripts/probe_kernels.py --op attn``, the kernel alone):
batch 32, HCA at 1M (155 MB) 205 us with BK 128, 233 with BK 64, 273 with BK 32, 455 with the earlier half-head
plan; 2 pipeline stages, 16 warps, or 16-32 heads per program were all slower (``docs/performance.md``).

That is 0.76 TB/s, 18 % of the copy bandwidth (issue 12 asks for 60 %). Per block a program runs one dependent chain
(index load -> gather -> dequantize -> shared memory -> q.k wgmma -> softmax -> P.V wgmma), one 8-warp program per
SM: latency, not bytes or flops. At batch 32 an entry is 584 bytes for 4 x 64 x 512 flops (224 per byte, the H200's
ridge), so 60 % of the copy bandwidth needs ~500 TFLOP/s of bf16 dots on gathered operands: a warp-specialised
design (producer warps gathering and dequantizing, consumer warpgroups on wgmma), not a tuning of this one.

Opt-in ``S8`` plan (a benchmark knob): with each entry's scale row padded to 8 bytes (the state stores 7;
``probe_kernels.py --scale-stride 8`` builds such caches), whole-head tiles read an entry's scales as one 8-byte
vector (:func:`_vtile`). The stored rows make every scale a byte load, which ``cp.async`` cannot do, so a pipelined
build (``num_stages`` > 1) still waits on memory once per block; with ``S8`` and 3 stages the sm_90a build copies
every gathered operand ahead and keeps no byte load in the loop (``tests/test_kernels_sm90.py``). Timed on an H200
(2026-12-03, ``docs/performance.md``): the 2-3 stage plans 15-17 % slower than the default, the one-stage ``S8``
plan within 1.5 % of it, so the state keeps its 7-byte rows: the chain, not the wait for memory, bounds the kernel.

Launch route: XLA's Triton route builds this kernel 1.5-3.6x slower than Triton's own compiler does (2026-12-03:
XLA's bundled Triton keeps a third shared-memory buffer and spills 6.6x more), so the kernel launches as a tiled one
(``triton_call(..., tiled=True)``: jax-triton where installed, see :func:`dsv4_jax.kernels.launch_route`), and on the
XLA route the plan keeps 32-entry blocks.

Status: ``tests/test_kernels_sparse_attn.py -k gpu`` passes on an H200 with this plan (2026-12-03), and so does the
golden all-position test with ``kernels="triton"``. ``"auto"`` takes it, launched through jax-triton, for long index
lists at decode row counts and for every prefill row (:func:`use_kernel`); since 2026-12-05 every decode list too
(:data:`AUTO_MIN_LIST` 0: the CSA lists of 640 entries included).

Portability: plain ``tl.load``/``tl.dot``/integer ops (see :mod:`dsv4_jax.kernels.common`), no inline assembly:
meant for ROCm as well (untried there).

Beside this module: :mod:`sparse_attention_tiles` (the kernel's device functions: index blocks, row pointers into
the sources, the gathered tiles' loads and decoding, the dots) and :mod:`sparse_attention_torch` (the torch
launchers of the interpreter tests and the probes).

Warp-specialised form (:mod:`sparse_attention_ws`, Gluon, sm_90 only): a decoder partition gathers and dequantizes
while the consumer warpgroups run the dots; it writes this kernel's workspace and shares its merge. It takes decode
calls of :data:`WS_MIN_ROWS` rows or more (:data:`WS`): on an H100 (2026-12-07) 9-20 % faster than this kernel at 8
and 32 rows, 20 % slower at one row (``docs/performance.md``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.kernels import (
    SM_COUNT,
    arch,
    next_pow2,
    route_for,
    single_device,
    sparse_attention_ws,
    triton_call,
    use_opt_in_triton,
    use_triton,
)
from dsv4_jax.kernels.sparse_attention_ref import BUDGET, rows_per_block, sparse_attention_reference  # noqa: F401
from dsv4_jax.modeling.layers import apply_rope
from dsv4_jax.modeling.quant import Fp8Cache

try:  # the model imports this module; triton is optional (kernels="reference" needs none of it)
    import triton
    import triton.language as tl

    from dsv4_jax.kernels.common import round_bf16
    from dsv4_jax.kernels.sparse_attention_tiles import _c0, _dot, _hload, _ids, _rows, _vtile
except ImportError:  # pragma: no cover - exercised only without the triton extra
    triton = tl = None


# ---------------------------------------------------------------------------------------------- kernels
if triton is not None:
    @triton.jit
    def _sparse_attn_kernel(q_ptr, idx_ptr, sink_ptr, rc, rs, rr, cc, cs, cr, kc, ks, kr, o_ptr, m_ptr, l_ptr,
                            S: tl.constexpr, K: tl.constexpr, W: tl.constexpr, NC: tl.constexpr, H: tl.constexpr,
                            BH: tl.constexpr, DN: tl.constexpr, DR: tl.constexpr, FP8: tl.constexpr,
                            SCALE: tl.constexpr, BK: tl.constexpr, DC: tl.constexpr, SPLIT: tl.constexpr,
                            BPS: tl.constexpr, SST: tl.constexpr, S8: tl.constexpr = False,
                            INTERPRET: tl.constexpr = False):
        """One program: ``BH`` heads x ``DC`` output dims of one query row over index blocks
        ``[sp * BPS, (sp + 1) * BPS)``. ``rc/rs/rr`` (ring), ``cc/cs/cr`` (chunk), ``kc/ks/kr`` (compressed) are
        each source's codes / scales / RoPE arrays (FP8), or its values and two unused pointers. ``SPLIT == 1``:
        ``o_ptr`` is the output ``[B*S, H, DH]`` bf16 (``m_ptr/l_ptr`` unused); else the fp32 workspace
        ``acc [B*S, SPLIT, H, DH]`` with ``m``, ``l`` ``[B*S, SPLIT, H]``. ``SST``: bytes per scale row (``DN //
        64``, or 8 when padded); ``S8``: whole-head tiles with their scales as one vector per entry
        (:func:`_vtile`)."""
        DH: tl.constexpr = DN + DR
        DG: tl.constexpr = DH // DC
        G: tl.constexpr = ((H + BH - 1) // BH) * DG
        PADH: tl.constexpr = H % BH != 0  # the last head block is padded (H < 16 on GPUs): masked loads and stores
        pid = tl.program_id(0)  # ((row * SPLIT + sp) * G + g): a row's splits and groups are neighbours (L2)
        g = pid % G
        sp = (pid // G) % SPLIT
        row = pid // (G * SPLIT)  # b * S + s
        b = row // S
        h = (g // DG) * BH + tl.arange(0, BH)  # [BH]
        hm = h < H
        oc = (g % DG) * DC  # first output dim of this program
        i = tl.arange(0, 64)[None, :]
        io = tl.arange(0, DC)[None, :]
        q_rows = q_ptr + (row * H + h).to(tl.int64)[:, None] * DH  # [BH, 1]
        m = tl.full((BH,), float("-inf"), tl.float32)
        l = tl.zeros((BH,), tl.float32)
        acc = tl.zeros((BH, DC), tl.float32)
        NJ: tl.constexpr = (K + BK - 1) // BK if SPLIT == 1 else BPS  # blocks per program (the whole list, or BPS)
        j0 = sp * (BPS * BK)  # the program's first list slot
        for jb in range(NJ):  # a constant trip count: the last split's blocks past K are all masked (no-ops)
            valid, codes, scales, rope = _rows(_ids(idx_ptr, row, j0 + jb * BK, True, K, BK), b, rc, rs, rr, cc, cs,
                                               cr, kc, ks, kr, S, W, NC, DN, DR, FP8, SST)
            kv = _vtile(codes, scales, rope, valid, oc, DN, DR, DC, FP8, S8=S8)  # [BK, DC] own dims, exact
            s = _dot(_hload(q_rows + oc + io, hm, PADH), tl.trans(kv), INTERPRET)  # [BH, BK] fp32, own dims
            for c in range(0, DH - DC, 64):  # the other dims of q.k, 64 at a time
                c0 = _c0(c, oc, DC)
                kc64 = _vtile(codes, scales, rope, valid, c0, DN, DR, 64, FP8)  # [BK, 64]
                s += _dot(_hload(q_rows + c0 + i, hm, PADH), tl.trans(kc64), INTERPRET)
            s = tl.where(valid[None, :], s * SCALE, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: p = alpha = 0, no NaN
            alpha = tl.exp(m - m_ref)
            p = tl.exp(s - m_ref[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            pb = round_bf16(p)  # P rounded (nearest even, by arithmetic: the interpreter's cast truncates)
            acc = acc * alpha[:, None] + _dot(pb, kv, INTERPRET)
            m = m_new
        if SPLIT == 1:
            m_ref = tl.where(m == float("-inf"), 0.0, m)
            l = l + tl.exp(tl.load(sink_ptr + h, mask=hm, other=0.0) - m_ref)
            o_rows = o_ptr + (row * H + h).to(tl.int64)[:, None] * DH
            tl.store(o_rows + oc + io, (acc / l[:, None]).to(o_ptr.dtype.element_ty), mask=hm[:, None])
        else:
            ws = (row * SPLIT + sp) * H + h  # [BH] workspace rows
            tl.store(o_ptr + ws.to(tl.int64)[:, None] * DH + oc + io, acc, mask=hm[:, None])
            if oc == 0:
                tl.store(m_ptr + ws, m, mask=hm)
                tl.store(l_ptr + ws, l, mask=hm)

    @triton.jit
    def _combine_kernel(acc_ptr, m_ptr, l_ptr, sink_ptr, cs_ptr, sn_ptr, o_ptr, H: tl.constexpr, DH: tl.constexpr,
                        SPLIT: tl.constexpr, SP2: tl.constexpr, DCC: tl.constexpr, RD: tl.constexpr = 0):
        """o[row, h, dims of this program] from the workspace of :func:`_sparse_attn_kernel`: weights
        ``w_s = exp(m_s - max_s m_s)`` per split, ``l = sum_s w_s l_s + exp(sink - max)``,
        ``o = bf16(sum_s w_s acc_s / l)`` (fp32; a fixed reduction tree: deterministic). One program per (row, head,
        ``DCC`` dims): all splits in one ``[SP2, DCC]`` tile. ``RD > 0``: then the inverse RoPE of the last ``RD``
        dims with the row's ``cos``/``sin [B*S, RD/2]`` (``layers.apply_rope(o, cos, sin, inverse=True)`` of the
        bf16 output: ``a cos + b sin`` and ``b cos - a sin`` in fp32, rounded to bf16; ``DCC >= RD``)."""
        pid = tl.program_id(0)  # (row * H + h) * (DH // DCC) + dim chunk
        d = (pid % (DH // DCC)) * DCC + tl.arange(0, DCC)  # [DCC]
        rh = pid // (DH // DCC)
        row = rh // H
        h = rh % H
        s = tl.arange(0, SP2)  # [SP2]
        ws = (row * SPLIT + s) * H + h  # [SP2] workspace rows
        m = tl.load(m_ptr + ws, mask=s < SPLIT, other=float("-inf"))
        mx = tl.max(m, axis=0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)  # every split fully masked (never the case in the model)
        w = tl.exp(m - mx)  # [SP2], 0 for masked splits and the padding
        l = tl.sum(w * tl.load(l_ptr + ws, mask=s < SPLIT, other=0.0), axis=0) + tl.exp(tl.load(sink_ptr + h) - mx)
        a = tl.load(acc_ptr + ws.to(tl.int64)[:, None] * DH + d[None, :], mask=(s < SPLIT)[:, None], other=0.0)
        o = tl.sum(w[:, None] * a, axis=0) / l  # [DCC]
        if RD > 0:  # the output as the model rounds it, then its inverse RoPE (only the last chunk has RoPE dims)
            o = round_bf16(o)
            pa, pb = tl.split(tl.reshape(o, (DCC // 2, 2)))  # [DCC/2] the even and the odd dims of each pair
            j = (pid % (DH // DCC)) * (DCC // 2) + tl.arange(0, DCC // 2) - (DH - RD) // 2  # pair within RoPE dims
            rope = j >= 0
            cs = tl.load(cs_ptr + row * (RD // 2) + j, mask=rope, other=1.0)
            sn = tl.load(sn_ptr + row * (RD // 2) + j, mask=rope, other=0.0)
            ra = round_bf16(pa * cs + pb * sn)
            rb = round_bf16(pb * cs - pa * sn)
            o = tl.reshape(tl.join(tl.where(rope, ra, pa), tl.where(rope, rb, pb)), (DCC,))
        tl.store(o_ptr + rh.to(tl.int64) * DH + d, o.to(o_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------- planning
LONG_LIST = 1024  # sm90: index lists longer than this take 128-entry blocks, shorter ones 32 (measured, docstring)
PER_SM = 1  # decode: split the index list until about this many programs per SM (one is resident at a time)


def plan(H: int, Dh: int, target: str | None = None, rows: int | None = None, K: int | None = None,
         bps: int | None = None, per_sm: int = PER_SM, tiles: dict | None = None) -> dict:
    """Heads ``BH`` and output dims ``DC`` per program, indices per online-softmax block ``BK`` (the official kernel
    takes 64), the index-list split (``SPLIT`` ranges of ``BPS`` blocks, no empty range), the merge's tile (``DCC``
    dims x ``SP2`` splits) and launch options: the one place they are chosen.

    ``rows`` (``B*S``) and ``K`` (index-list length) size the split: ``SPLIT`` grows while the programs still fit
    ``PER_SM`` per SM (one wave), ``SPLIT = 1`` when the rows fill the card (or ``rows``/``K`` not given); ``bps``
    forces the blocks per split (tests); ``tiles`` overrides the tile and launch entries (``BH``, ``BK``, ``DC``,
    ``num_warps``, ``num_stages``, and ``per_sm``: benchmarks) before the split is sized for them. GPU tiles (module
    docstring): sm90 BH 64 (16 to 64 heads, padded) x DC = Dh, one stage, 8 warps, BK 128 for long lists on the
    jax-triton route, else 32; gfx950 4 waves of 64, DC Dh/2, BK 64, 2 stages (the plan that compiles there without
    spills; never timed, no AMD GPU is lent to the project). At 255 registers x 256
    threads one program is resident per SM, so more than ``PER_SM = 1`` would only add waves; a split costs an fp32
    workspace of ``H * Dh * 4`` bytes per row and split (written and read back, mostly in L2)."""
    target = target or arch()
    if target == "cpu":
        p = dict(BH=H, BK=64, DC=64, num_warps=4, num_stages=1)
    elif target == "gfx950":  # wave64, never timed: the sm90 plan of 2026-11-30 (64 heads x half the dims, 64-entry
        # blocks) with 4 waves x 2 stages, the plan that compiles there without spills (512 VGPRs each, accumulators
        # in AGPRs; 8 waves x 3 stages spill, and so does the whole head per program: 16-84 registers at 4 waves)
        dc = Dh // 2 if Dh >= 128 and Dh & (Dh - 1) == 0 else 64  # a tile's dims must be a power of two
        p = dict(BH=min(max(next_pow2(H), 16), 64), BK=64, DC=dc, num_warps=4, num_stages=2)
    else:  # measured on an H200 (module docstring): 64 heads x all dims (q.k once per block), 1 stage
        pow2 = Dh & (Dh - 1) == 0
        dc = Dh if pow2 and Dh <= 512 else (Dh // 2 if pow2 else 64)  # a tile's dims must be a power of two
        # long lists: fewer, larger blocks (Triton's own build); XLA's build of BK 64 spills heavily and its third
        # shared-memory buffer would not fit BK 128 (docstring)
        bk = 128 if (K or 0) > LONG_LIST and route_for(tiled=_tiled(K or 0)) == "jax-triton" else 32
        # heads: a power of two from 16 (tl.dot's tensor-core tile; fewer heads are padded and masked) to 64
        p = dict(BH=min(max(next_pow2(H), 16), 64), BK=bk, DC=dc, num_warps=8, num_stages=1)
    p.update(tiles or {})
    per_sm = p.pop("per_sm", per_sm)  # a benchmark override: programs per SM the split is sized for
    nb = math.ceil((K or 1) / p["BK"])
    groups = -(-H // p["BH"]) * (Dh // p["DC"])
    if bps is None:
        split = 1 if rows is None else max(1, min(nb, per_sm * SM_COUNT[target] // (rows * groups)))  # one wave
        bps = math.ceil(nb / split)
    p.update(BPS=bps, SPLIT=math.ceil(nb / bps))
    return p | merge_tile(p["SPLIT"], Dh)


def merge_tile(split: int, Dh: int) -> dict:
    """The merge's tile for ``split`` splits: all splits (``SP2``, padded to a power of two) x ``DCC`` dims."""
    sp2 = next_pow2(split)
    dcc = 64
    while dcc * 2 <= min(Dh, 4096 // sp2) and Dh % (dcc * 2) == 0:
        dcc *= 2
    return dict(SP2=sp2, DCC=dcc)


def _meta(q_shape, W: int, NC: int, K: int, fp8: bool, DN: int, scale: float, p: dict, sst: int | None = None) -> dict:
    """The main kernel's metaparameters (shared by the jax and torch launchers). ``sst``: bytes per scale row of the
    FP8 layout (``DN // 64`` as the state stores them; 8 for rows padded to 8 bytes, which the ``S8`` plan needs)."""
    B, S, H, Dh = q_shape
    sst = DN // 64 if sst is None else sst
    s8 = bool(p.get("S8", 0))
    if s8 and not (fp8 and p["DC"] == Dh and Dh - DN == 64 and Dh & (Dh - 1) == 0 and sst >= Dh // 64):
        raise ValueError(f"sparse_attention: the S8 plan needs FP8 entries with 64 RoPE dims, whole-head tiles (DC = "
                         f"head_dim, a power of two) and scale rows of at least head_dim / 64 bytes; got fp8={fp8}, "
                         f"DC={p['DC']}, head_dim={Dh}, nope dims {DN}, scale rows of {sst} bytes")
    return dict(S=S, K=K, W=W, NC=NC, H=H, BH=p["BH"], DN=DN, DR=Dh - DN, FP8=fp8, SCALE=float(np.float32(scale)),
                BK=p["BK"], DC=p["DC"], SPLIT=p["SPLIT"], BPS=p["BPS"], SST=sst, S8=s8, num_warps=p["num_warps"],
                num_stages=p["num_stages"])


def _grid(q_shape, p: dict) -> tuple[int, int]:
    """(main kernel programs, merge programs)."""
    B, S, H, Dh = q_shape
    return B * S * p["SPLIT"] * -(-H // p["BH"]) * (Dh // p["DC"]), _merge_grid(q_shape, p["DCC"])


def _merge_grid(q_shape, dcc: int) -> int:
    """Merge programs: one per (row, head, ``dcc`` output dims)."""
    B, S, H, Dh = q_shape
    return B * S * H * (Dh // dcc)


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


def sparse_attention_triton(q, ring, chunk, comp, idx, sink, scale: float, p: dict | None = None,
                            out_rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """The Triton path of :func:`sparse_attention` (bf16 q, bf16 P): the main kernel, plus the merge when the plan
    splits the index lists; ``out_rope``: the output's inverse RoPE, in the merge's epilogue (else by XLA after the
    unsplit kernel, or without :data:`MERGE_ROPE`)."""
    if out_rope is not None and not MERGE_ROPE:  # XLA rotates the kernel's output (a launch of its own)
        o = sparse_attention_triton(q, ring, chunk, comp, idx, sink, scale, p)
        return _rotate_back(o, out_rope)
    _check(q, ring, chunk, comp, idx)
    B, S, H, Dh = q.shape
    W, K = ring.shape[1], idx.shape[-1]
    if comp is None:  # HCA/window-only layers: no compressed source (a 1-row dummy, never indexed)
        comp = jax.tree_util.tree_map(lambda a: a[:, :1], ring)
    fp8 = isinstance(ring, Fp8Cache)
    ws_plan = None
    if p is None and _use_ws(B * S, H, Dh, ring):
        ws_plan = sparse_attention_ws.plan(B * S, H, K, SM_COUNT[arch()])
    p = p or plan(H, Dh, rows=B * S, K=K)
    if ws_plan is not None and ws_plan["SPLIT"] == 1:
        ws_plan = None  # rows that fill the card: the portable kernel writes the output directly
    sink = sink.astype(jnp.float32)
    parts = [a for c in (ring, chunk, comp) for a in _parts(c, Dh)]  # each source's arrays, ring first
    args = [q.astype(jnp.bfloat16), idx.astype(jnp.int32), sink, *parts]
    meta = _meta(q.shape, W, comp.shape[1], K, fp8, ring.codes.shape[-1] if fp8 else Dh, scale, p,
                 ring.scales.shape[-1] if fp8 else None)
    n_main, n_merge = _grid(q.shape, p)
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    if p["SPLIT"] == 1:  # the output directly (m, l: unused one-element outputs, the kernel's pointers after o)
        out = [jax.ShapeDtypeStruct(q.shape, jnp.bfloat16), f32(1), f32(1)]
        o = triton_call(*args, kernel=_sparse_attn_kernel, out_shape=out, grid=(n_main,), tiled=_tiled(K), **meta)[0]
        return o if out_rope is None else _rotate_back(o, out_rope)
    R, sp = B * S, p["SPLIT"]
    if ws_plan is not None:  # the warp-specialised Gluon kernel writes the same workspace
        acc, m, l = sparse_attention_ws.launch_jax(args[0], args[1], parts, W, comp.shape[1], scale, ws_plan,
                                                   ring.scales.shape[-1])
        sp = ws_plan["SPLIT"]
        p = p | merge_tile(sp, Dh)
    else:
        acc, m, l = triton_call(*args, kernel=_sparse_attn_kernel, tiled=_tiled(K), grid=(n_main,),
                                out_shape=[f32(R, sp, H, Dh), f32(R, sp, H), f32(R, sp, H)], **meta)
    rd = 0 if out_rope is None else 2 * out_rope[0].shape[-1]
    if rd > p["DCC"]:
        raise ValueError(f"sparse_attention: {rd} RoPE dims do not fit the merge's {p['DCC']}-dim chunks")
    cs, sn = ((f32_rows(c, R) for c in out_rope) if rd else (jnp.zeros((1,), jnp.float32),) * 2)
    return triton_call(acc, m, l, sink, cs, sn, kernel=_combine_kernel,
                       out_shape=jax.ShapeDtypeStruct(q.shape, jnp.bfloat16), grid=(n_merge,), H=H, DH=Dh, SPLIT=sp,
                       SP2=p["SP2"], DCC=p["DCC"], RD=rd, num_warps=4, num_stages=1)


def _rotate_back(o: jax.Array, out_rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """XLA's inverse RoPE of the attention output ``o [B, S, H, Dh]`` with the rows' ``(cos, sin) [B, S, rd/2]``."""
    cos, sin = out_rope
    return apply_rope(o, cos[:, :, None], sin[:, :, None], inverse=True)


def f32_rows(c: jax.Array, R: int) -> jax.Array:
    """``cos`` or ``sin [B, S, rd/2]`` as the kernels read them: fp32 ``[B*S, rd/2]``."""
    return c.reshape(R, -1).astype(jnp.float32)


# The merge applies the output's inverse RoPE (``out_rope``) in its epilogue: bit for bit XLA's rotation under the
# interpreter (tests/test_kernels_sparse_attn.py); its GPU test and the golden criteria passed with it on an H100
# (2026-12-06), and the 3-layer V4-Flash batch-1 loop took 1.046 ms with it, 1.071 without (docs/performance.md).
# False (a benchmark variant): XLA rotates the kernel's output, a launch of its own per layer.
MERGE_ROPE = True
AUTO_MIN_LIST = 0  # "auto": index lists at least this long take the kernel (0: every list, CSA ones too) ...
AUTO_MAX_ROWS = 64  # ... at decode-sized row counts (B * S); more rows than this are prefill rows ...
PREFILL_AUTO = True  # ... which take it whatever their lists' length (measured faster, use_kernel's docstring)
# Index lists up to this many entries launch through XLA's Triton route instead of jax-triton (0: none). At decode
# the lists are short until the context is long (4K context: 160 entries on HCA layers, 640 on CSA ones), where the
# two builds differ least (32-entry blocks either way), and the kernel then sits inside the step's CUDA graph: a
# 3-layer batch-1 step compiled for sm_90 has 1 host launch instead of 7 (scripts/count_launches.py). A benchmark
# knob (bench_decode.py --variants): measured slower on an H100 (2026-12-07, batch-1 step in a loop 1.035 / 1.001 ms
# against 1.003 / 0.985, alternated; per call 1.77 / 1.60 vs 1.41 / 1.39 ms; docs/performance.md), so 0.
XLA_ROUTE_MAX_LIST = 0


# Decode rows over V4's FP8 caches on sm_90 run the warp-specialised Gluon kernel of :mod:`sparse_attention_ws`
# (launched through jax-triton) instead of the portable one: None = from WS_MIN_ROWS query rows on (_use_ws),
# True / False: always / never
WS: bool | None = None
WS_MIN_ROWS = 8  # WS None ("auto"): decode calls of at least this many rows take the Gluon kernel


def _use_ws(rows: int, H: int, Dh: int, ring) -> bool:
    """Whether the Gluon kernel (:mod:`sparse_attention_ws`) takes these decode rows (sequences x queries per
    sequence; several queries in a speculative verify step, GPU-tested on an H100, 2026-12-07): :data:`WS` True
    (every decode row count), None (auto: from :data:`WS_MIN_ROWS` rows on; on an H100, 2026-12-07, it was 9-20 %
    faster than this kernel at 8 and 32 rows over 128K-1M-token contexts, 20 % slower at one row) or False (never);
    and sm_90, the FP8 layout the kernel handles, jax-triton."""
    wanted = WS if WS is not None else rows >= WS_MIN_ROWS
    return (wanted and arch() == "sm90" and rows <= AUTO_MAX_ROWS and isinstance(ring, Fp8Cache)
            and sparse_attention_ws.supported(H, ring.codes.shape[-1], Dh - ring.codes.shape[-1], True)
            and route_for(tiled=True) == "jax-triton")


def _tiled(K: int) -> bool:
    """Whether a launch over ``K``-entry lists takes the tiled kernels' route (jax-triton where installed):
    all but the lists of at most :data:`XLA_ROUTE_MAX_LIST` entries."""
    return K > XLA_ROUTE_MAX_LIST


def use_kernel(kernels: str, rows: int, K: int) -> bool:
    """Whether :func:`sparse_attention` runs the Triton kernel for ``rows`` (``B*S``) query rows over ``K``-entry
    index lists: always with ``kernels="triton"`` (where :func:`use_opt_in_triton` allows); with ``"auto"`` on one
    GPU device only where the kernel launches through jax-triton (Triton's own build; XLA's build of it is slower
    than the reference, module docstring), and there for

    * decode row counts (at most :data:`AUTO_MAX_ROWS`) over long lists: measured on an H200 (2026-12-03,
      ``bench_attention.py --mode decode``, per call with dispatch) HCA at 1M (8,320 entries) batch 32 356 vs 634
      us, batch 1 85 vs 123 us; CSA (640 entries) a tie (103 vs 110, 69 vs 69 us) alone, but in the 3-layer
      V4-Flash decode step at batch 1 (H100, 2026-12-05, ``bench_decode.py --variants``) the kernel on every list
      took the step from 2.156 to 1.572 ms per call (the reference's gathers and fusions are launches of their
      own), the same in a loop: every list takes it (:data:`AUTO_MIN_LIST` 0; 4,096 before);
    * prefill rows (more than :data:`AUTO_MAX_ROWS`, if :data:`PREFILL_AUTO`): a 128K-token prompt in 8K chunks, 2
      V4-Flash layers, went from 166,212 to 195,051 tokens/s per layer and its last chunk from 108.3 to 93.7 ms
      (H200, 2026-12-04, ``bench_attention.py --mode prefill``; the XLA reference had taken 24.6 ms of that chunk)."""
    if kernels == "auto":
        wanted = K >= AUTO_MIN_LIST if rows <= AUTO_MAX_ROWS else PREFILL_AUTO
        return wanted and use_triton(kernels) and single_device() and (route_for(tiled=True) == "jax-triton"
                                                                       or not _tiled(K))
    return use_opt_in_triton(kernels)


def sparse_attention(q, ring, chunk, comp, idx, sink, scale: float, p_dtype, *, kernels: str = "auto",
                     out_rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Attention of queries ``q [B,S,H,Dh]`` over index lists ``idx [B,S,K]`` into ``[ring | chunk | comp]`` (see
    :func:`sparse_attention_reference`). The Triton kernel runs (bf16 queries with bf16 P, ``Dh`` a multiple of 64)
    where :func:`use_kernel` says so; everywhere else the XLA reference. ``out_rope``: the rows' ``(cos, sin)``
    ``[B, S, rd/2]``, whose inverse RoPE the output then gets (``layers.apply_rope(o, cos, sin, inverse=True)``, the
    attention's last step in the spec): in the kernel's merge when it runs split (a launch less per layer at decode),
    else by XLA."""
    B, S, _, Dh = q.shape
    if (q.dtype == jnp.bfloat16 and p_dtype == jnp.bfloat16 and Dh % 64 == 0
            and use_kernel(kernels, B * S, idx.shape[-1])):
        return sparse_attention_triton(q, ring, chunk, comp, idx, sink, scale, out_rope=out_rope)
    o = sparse_attention_reference(q, ring, chunk, comp, idx, sink, scale, p_dtype)
    return o if out_rope is None else _rotate_back(o, out_rope)
