"""The lightning indexer's scoring and top-k (spec 8) without materializing every score.

Public function (the model calls only this): :func:`indexer_topk` ``(q [B,S,Hi,Di], hw [B,S,Hi], keys [B,Nc,Di],
t [B,S], k) -> ids [B,S,min(k,Nc)]``, the ``min(k, Nc)`` compressed blocks of highest total score per query row, best
first, ties by lower block id, -1 where fewer are visible (a query at position ``t`` sees blocks ``w < (t+1)//4``).

* :func:`indexer_topk_reference`: the model's former code. It forms the whole fp32 score tensor ``[B,S,Hi,Nc]``
  (64 GiB for one V4-Flash layer with an 8192-token chunk over a 131072-token cache; XLA CPU also materializes the
  products: 128 GiB of temporaries), then one ``jax.lax.top_k`` over each row of ``[B,S,Nc]`` totals.
* :func:`indexer_topk_blocked`: a loop over blocks of ``block`` compressed entries (:func:`block_size`: the block's
  fp32 scores and products ``[B,S,Hi,block]`` stay within a byte budget, 256 MiB on CPUs, 2 GiB on accelerators;
  long chunks go in blocks of query rows so that entry blocks keep at least 1,024 entries, :func:`row_block`).
  Each block's totals are merged into a running top-k ``[B,S,k]`` (values + ids). Memory: ``O(B*S*(k + block))``
  plus the block's transient. Blocks beyond the furthest visible entry of any row are not visited (decode over a
  1M-token cache holding 4K tokens reads 1K entries, not 256K). Keys are decoded block by block from their stored
  layout. With the kernels on (``"triton"``, and ``"auto"`` on one device: :func:`prefill_radix_on`) the blocks'
  bf16 totals fill a ``[B,S,Nc]`` buffer instead and one radix selection (:mod:`dsv4_jax.kernels.topk`) replaces
  the merges (each a ``jax.lax.top_k`` over ``[rows, k + block]``, a sort on GPUs): 7 % more prefill tokens/s at a
  128K-token prompt on an H200. There the totals come from one kernel launch per row block
  (:func:`prefill_score_on`, :mod:`dsv4_jax.kernels.indexer_prefill`: the keys decoded once, several rows per
  program) instead of XLA's 1 GiB blocks of scores: 25 % more with the decode rows' kernel, 2.1x faster totals since.

Decode rows on a GPU (``kernels="triton"``, and ``"auto"`` on one device: :func:`score_kernel_on`): one Triton kernel,
:func:`_indexer_score_kernel`, computes every visible total of a few query rows straight from the FP4 key cache (the
XLA form is ~20 kernels per CSA layer and step: decode, dot, roundings, head sum, mask), and a top-k picks from them
as the reference does: ``jax.lax.top_k``'s result, by radix selection where :func:`dsv4_jax.kernels.topk.use_kernel`
says so (``"triton"``, and ``"auto"`` over rows of 8,192 entries or more: four passes over the row instead of a sort,
:mod:`dsv4_jax.kernels.topk`), else :func:`top_k_two_level` (``jax.lax.top_k`` in two levels for many rows); below
8,192 entries (``"triton"``, and ``"auto"`` where :data:`SHORT_AUTO` says so) one program per row sorts the whole row
(:func:`dsv4_jax.kernels.topk.top_k_sort_triton`): two launches per CSA layer in all. The totals are :func:`_totals`'
arithmetic: the keys' e2m1 codes times their power-of-two scales become bf16 exactly, the dot over ``Di`` sums exact
products in fp32 (exact in reference numerics, as above), the same three bf16 roundings; only the fp32 order of the
sum over heads may differ from XLA's, which can move a total by one bf16 ulp (and then a tie at the k-th place).
Memory: the ``[B,S,Nc]`` bf16 totals of the few decode rows (0.5 MiB per row at 1M tokens: 262,144 entries), never the
``[B,S,Hi,Nc]`` scores. Each program loads its row's queries once and scores up to 16 blocks of 32 entries (one block
per program re-read 16 KB of queries per 4.3 KB of keys: 5.4 ms per call at batch 32 and 1M tokens on an H200). At
batch 32 and a full 1M-token context a call (scores and radix top-k) reads 570 MB of keys in 1.18 ms on an H200
(``bench_attention.py --mode indexer``, 2026-12-03): the scoring kernel is latency-bound, not at the bytes' floor.
Tested under the interpreter (CI, and the golden layer-isolated test with ``kernels="triton"``), on an H200 against
the reference (``tests/test_kernels_indexer.py -k gpu``), and compiled for sm_90 and gfx950.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.kernels import (
    SM_COUNT,
    arch,
    check_prefetch,
    env_tiles,
    indexer_prefill,
    next_pow2,
    single_device,
    topk,
    triton_call,
    use_opt_in_triton,
    use_triton,
)
from dsv4_jax.kernels.indexer_ref import (  # noqa: F401 (the XLA forms, re-exported: tests and benchmarks use them here)
    BUDGET,
    BUDGET_ACCEL,
    MIN_BLOCK,
    _n_entries,
    _totals,
    block_size,
    indexer_topk_blocked,
    indexer_topk_reference,
    row_block,
    top_k_two_level,
)
from dsv4_jax.modeling.quant import Fp4Tensor

try:  # the model imports this module; triton is optional (kernels="reference" needs none of it)
    import triton
    import triton.language as tl

    from dsv4_jax.kernels.common import e2m1_factors, e2m1_factors16, e2m1_pair, e2m1_pair16, l2_prefetch, rn_bf16
except ImportError:  # pragma: no cover - exercised only without the triton extra
    triton = tl = None



MAX_KERNEL_ROWS = 256  # query rows (B * S) up to which the opt-in kernel scores (decode, speculative verify)


def scale_head_weights(hw: jax.Array, scale: float | None) -> jax.Array:
    """The head weights times their scale, rounded to their dtype (the reference's ``weights_proj(x) * scale``);
    ``scale`` None: ``hw`` as it is."""
    if scale is None:
        return hw
    return (hw.astype(jnp.float32) * np.float32(scale)).astype(hw.dtype)


def indexer_topk(q: jax.Array, hw: jax.Array, keys, t: jax.Array, k: int, *, kernels: str = "reference",
                 hw_scale: float | None = None) -> jax.Array:
    """Top-k compressed block ids ``[B,S,min(k,Nc)]`` (-1 = none) of the indexer; see the module docstring.

    Args:
      q: ``[B,S,Hi,Di]`` rotated, snapped index queries (act dtype); hw: ``[B,S,Hi]`` head weights (act dtype, scale
      folded in, or not yet where ``hw_scale`` is given: :func:`scale_head_weights`, inside the scoring kernel where
      it runs); keys: ``[B,Nc,Di]`` indexer cache (plain, or :class:`Fp4Tensor` codes); t: ``[B,S]`` absolute
      query positions; k: ``index_topk``; kernels: ``Config.kernels`` (decode rows of bf16 queries over an FP4
      cache take the scoring kernel where :func:`score_kernel_on` says so, prefill rows the radix selection where
      :func:`prefill_radix_on` does).
    """
    B, S = q.shape[:2]
    decode_rows = 0 < B * S <= MAX_KERNEL_ROWS
    if (isinstance(keys, Fp4Tensor) and q.dtype == jnp.bfloat16 and decode_rows
            and score_kernel_on(kernels, _n_entries(keys))):
        tot = indexer_totals_triton(q, hw, keys, t, hw_scale)  # [B,S,Nc] bf16
        k = min(k, tot.shape[-1])
        if tot.shape[-1] < AUTO_MIN_ENTRIES:  # a short cache: one sort per row (kernels="triton", or SHORT_AUTO)
            vals, idx = topk.top_k_sort_triton(tot, k)
        else:
            vals, idx = topk.top_k(tot, k, kernels=kernels, fallback=top_k_two_level)
        return jnp.where(vals == -jnp.inf, -1, idx).astype(jnp.int32)
    hw = scale_head_weights(hw, hw_scale)
    radix = q.dtype == jnp.bfloat16 and prefill_radix_on(kernels)
    # The prefill kernel scores 2 rows of one batch row over 2,048 entries per program: decode rows would leave it a
    # handful of programs (a 4K-token cache at batch 1: one, 39 us per call on an H200, 2026-12-04), so decode rows
    # over short caches keep XLA's single block (_topk_blocks)
    return indexer_topk_blocked(q, hw, keys, t, k, radix=radix, kernel=radix and isinstance(keys, Fp4Tensor)
                                and not decode_rows and prefill_score_on(kernels))


# "auto" takes the radix selection for prefill rows: an H200, 2 V4-Flash layers, 128K-token prompt in 8K chunks
# (2026-12-03): 118,929 tokens/s per layer against 110,863 with the per-block merges, the last chunk 169 vs 189 ms
PREFILL_RADIX_AUTO = True


def prefill_radix_on(kernels: str) -> bool:
    """Whether the blocked path (prefill rows) selects by radix (:func:`indexer_topk_blocked`'s ``radix``) instead of
    merging a running top-k per block: with ``kernels="triton"`` (where :func:`use_opt_in_triton` allows), and with
    ``"auto"`` where Triton runs on one device if :data:`PREFILL_RADIX_AUTO` (on: measured faster; same ids as the
    reference on an H200, ``tests/test_kernels_topk.py``)."""
    if kernels == "auto":
        return PREFILL_RADIX_AUTO and use_triton(kernels) and single_device()
    return use_opt_in_triton(kernels)


# "auto" scores prefill rows (with the radix selection) by the scoring kernel rather than XLA's blocks of totals
PREFILL_SCORE_AUTO = True


def prefill_score_on(kernels: str) -> bool:
    """Whether prefill rows that take the radix selection (:func:`prefill_radix_on`) get their totals from a kernel
    (:func:`dsv4_jax.kernels.indexer_prefill.prefill_totals_triton`) instead of XLA's blocks of ``[rows, heads, block]``
    scores: ``"triton"``, and ``"auto"`` if :data:`PREFILL_SCORE_AUTO`. Measured on an H200 (2026-12-03, 2 V4-Flash
    layers, a 128K-token prompt in 8K chunks, ``bench_attention.py --mode prefill --profile``): XLA's blocks took
    71.6 of the last chunk's 152.3 ms of device time (the fp32 scores of 8,192 rows x 64 heads x 512 entries, 1 GiB
    per block, written and read back); with the kernel the prefill ran at 164,579 tokens/s per layer against
    131,568, the last chunk 108.8 ms against 155.4, with the decode rows' kernel of the time (same ids as the reference
    on the GPU:
    ``tests/test_kernels_topk.py::test_gpu_prefill_rows_match_reference[radix-kernel]``)."""
    if kernels == "auto":
        return PREFILL_SCORE_AUTO
    return use_opt_in_triton(kernels)


AUTO_MIN_ENTRIES = 8192  # compressed entries (32K tokens of context) from which kernels="auto" takes the kernel


def score_kernel_on(kernels: str, n_c: int) -> bool:
    """Whether the decode rows' totals come from :func:`_indexer_score_kernel`: with ``kernels="triton"``, and with
    ``"auto"`` over caches of at least :data:`AUTO_MIN_ENTRIES` entries (and shorter ones while :data:`SHORT_AUTO`
    is on: then with the one-program sort), on one device where Triton runs. Measured on an H200 (2026-12-02,
    ``scripts/bench_attention.py --mode indexer``, V4-Flash's indexer, per call with the top-k): batch 32 at 128K
    tokens 334 vs 930 us for the XLA path, at 1M 2.2 vs 8.1 ms; batch 1 at 1M 206-210 vs 327-342 us; at 4K (1,024
    entries) a tie per call with the radix top-k (58-67 vs 60-67 us); with the sort, faster in the decode loop
    (:data:`SHORT_AUTO`)."""
    if use_opt_in_triton(kernels):
        return True
    long_or_short = n_c >= AUTO_MIN_ENTRIES or SHORT_AUTO
    return kernels == "auto" and long_or_short and use_triton(kernels) and single_device()


# "auto" on caches shorter than AUTO_MIN_ENTRIES: the scoring kernel and one sort per row (topk.top_k_sort_triton,
# 2 launches) instead of XLA's decode, dot, roundings, head sum, mask and sort (7 launches per CSA layer and step).
# 3 V4-Flash layers (H100, bench_decode.py --variants, 2026-12-06), ms per step in a jitted loop, XLA path -> this:
# 4K context batch 1 1.048 -> 1.032-1.047, batch 32 4.761 -> 4.681-4.738; 16K context batch 1 1.113 -> 1.052,
# batch 32 4.970 -> 4.766 (the XLA path's work grows with the cache)
SHORT_AUTO = True


# ---------------------------------------------------------------------------------------------- Triton (decode rows)
if triton is not None:

    @triton.jit
    def _prefetch_keys(kp_ptr, rb, j0, lim, NC: tl.constexpr, BLK: tl.constexpr, DI: tl.constexpr):
        """``PF``: ask L2 for the packed key bytes of entries ``[j0, j0 + BLK)`` (one 16-byte piece per address,
        ``[BLK, DI/32]``), clamped to the visible entries and the cache (no address outside it; nothing past ``lim``
        is read)."""
        j = tl.minimum(j0 + tl.arange(0, BLK), tl.maximum(tl.minimum(lim, NC) - 1, 0))  # [BLK]
        l2_prefetch(kp_ptr + (rb + j)[:, None] * (DI // 2) + tl.arange(0, DI // 32)[None, :] * 16)

    @triton.jit
    def _indexer_score_kernel(q_ptr, hw_ptr, kp_ptr, ks_ptr, lim_ptr, out_ptr, S: tl.constexpr, HI: tl.constexpr,
                              HP: tl.constexpr, DI: tl.constexpr, NC: tl.constexpr, BLK: tl.constexpr,
                              NB: tl.constexpr = 1, BF: tl.constexpr = 0, HWS: tl.constexpr = 0.0,
                              INTERPRET: tl.constexpr = False, PF: tl.constexpr = 0):
        """Totals of query row ``r = program_id(0)`` (batch row ``r // S``) over the ``NB`` entry blocks ``[BLK *
        (NB * program_id(1) + b), + BLK)``: :func:`_totals` on the FP4 keys (``kp [B, NC, DI/2]`` e2m1 pairs, ``ks
        [B, NC, DI/32]`` e8m0), -inf for entries at or past ``lim[r]`` (the visible count). ``q [B*S, HI, DI]`` and
        ``hw [B*S, HI]`` bf16, loaded once per program; the heads padded to ``HP`` (a dot needs 16 rows) add -0.0 to
        the head sum, which changes no sum. ``HWS`` (non-zero): ``hw`` is the head weights before their scale, each
        becomes ``bf16(hw * HWS)`` here (the model's XLA multiply, a kernel of its own before). A block with nothing
        visible reads no key. ``BF`` (sm90's plan): the keys
        decoded straight to bf16 bit patterns and scaled by bf16 pair multiplies (the same values; as the FP4
        experts' ``BFMUL``, :mod:`dsv4_jax.kernels.fp4_moe_wx`; under the interpreter, whose bf16 arithmetic is not
        the GPU's, the same bit patterns scaled in fp32). ``PF`` > 0 (CUDA only, opt-in): each block also asks L2
        for the key bytes ``PF`` blocks ahead (:func:`common.l2_prefetch`; the kernel waits on load latency, not on
        bytes or instructions: Nsight Compute, H200, 2026-12-03)."""
        r = tl.program_id(0)
        lim = tl.load(lim_ptr + r)
        h = tl.arange(0, HP)
        i = tl.arange(0, DI // 2)  # packed bytes: dims 2i (low nibble) and 2i + 1
        g3 = tl.arange(0, DI // 32)[None, :, None]  # [1, DI/32, 1] scale groups
        i3 = g3 * 16 + tl.arange(0, 16)[None, None, :]  # [1, DI/32, 16] their bytes
        hm = h < HI
        qrow = q_ptr + r.to(tl.int64) * (HI * DI) + h[:, None] * DI + 2 * i[None, :]  # [HP, DI/2] even dims
        qe = tl.load(qrow, mask=hm[:, None], other=0.0)
        qo = tl.load(qrow + 1, mask=hm[:, None], other=0.0)
        w = tl.load(hw_ptr + r.to(tl.int64) * HI + h, mask=hm, other=0.0).to(tl.float32)  # [HP]
        if HWS != 0.0:
            w = rn_bf16(w * HWS)
        rb = (r // S).to(tl.int64) * NC  # the batch row's first cache row
        if PF > 0:  # the first blocks' key bytes (the loop asks PF blocks ahead of each block it loads)
            for pb in tl.static_range(1, PF):
                _prefetch_keys(kp_ptr, rb, (tl.program_id(1) * NB + pb) * BLK, lim, NC, BLK, DI)
        for b in range(NB):
            j0 = (tl.program_id(1) * NB + b) * BLK
            if PF > 0:
                _prefetch_keys(kp_ptr, rb, j0 + PF * BLK, lim, NC, BLK, DI)
            j = j0 + tl.arange(0, BLK)  # [BLK] entry ids
            out = out_ptr + r.to(tl.int64) * NC + j
            jm = j < NC
            if j0 >= lim:  # nothing visible in this block
                tl.store(out, tl.full((BLK,), float("-inf"), tl.float32).to(out_ptr.dtype.element_ty), mask=jm)
            else:
                e = (r // S).to(tl.int64) * NC + j  # [BLK] cache rows
                # [BLK, DI/32, 16]: each 32-dim scale group's 16 bytes; its scale loaded and decoded once per group
                jm3 = jm[:, None, None]
                kp = tl.load(kp_ptr + e[:, None, None] * (DI // 2) + i3, mask=jm3, other=0).to(tl.int32)
                sb = tl.load(ks_ptr + e[:, None, None] * (DI // 32) + g3, mask=jm3, other=127).to(tl.int32)
                if BF:  # bf16 bit patterns, bf16 pair multiplies (exact: powers of two)
                    g1, g2 = e2m1_factors16(sb)  # [BLK, DI/32, 1]
                    lo, hi = e2m1_pair16(kp, g1, g2, INTERPRET)
                    ke = tl.reshape(lo, (BLK, DI // 2)).to(tl.bfloat16)  # (a no-op on the GPU)
                    ko = tl.reshape(hi, (BLK, DI // 2)).to(tl.bfloat16)
                else:
                    f1, f2 = e2m1_factors(sb)  # [BLK, DI/32, 1] group scales
                    lo, hi = e2m1_pair(kp)  # values times 2**-126 (exact)
                    ke = tl.reshape(lo * f1 * f2, (BLK, DI // 2)).to(tl.bfloat16)  # [BLK, DI/2] exact key values
                    ko = tl.reshape(hi * f1 * f2, (BLK, DI // 2)).to(tl.bfloat16)  # (e2m1 times a power of two)
                sc = tl.dot(qe, tl.trans(ke))
                sc = tl.dot(qo, tl.trans(ko), sc)  # [HP, BLK] fp32 scores (exact sums of exact products if snapped)
                prod = rn_bf16(tl.maximum(rn_bf16(sc), 0.0) * w[:, None])  # [HP, BLK]
                if HP != HI:  # padded heads add -0.0
                    prod = tl.where(hm[:, None], prod, -0.0)
                tot = rn_bf16(tl.sum(prod, axis=0))  # [BLK]
                tl.store(out, tl.where(j < lim, tot, float("-inf")).to(out_ptr.dtype.element_ty), mask=jm)  # exact


def score_plan(n_heads: int, rows: int = 1, n_c: int = 1, target: str | None = None) -> dict:
    """Entries per block and blocks per program, warps (the one place they are chosen): 32-entry blocks (an H200 at
    batch 32, 2026-12-03: 1,184 us per call at 1M tokens and 194 us at 128K, against 1,415 and 275 us with 64-entry
    blocks and 1,404 / 269 us with 16), heads padded to a power of two of at least 16 (the dot's rows). Blocks per
    program ``NB``: up to 16 while the grid keeps ~2 programs per SM (each program loads its row's queries once: with
    one block per program, an H200 at batch 32 and 1M tokens re-read 16 KB of queries per 4.3 KB of keys); 2 on CPUs
    (the interpreter: the loop covered). ``DSV4_INDEX_TILE`` overrides entries (:func:`tile_override`)."""
    target = target or arch()
    over = tile_override()
    blk = over.get("BLK", 32)
    blocks = -(-n_c // blk)
    nb = 2 if target == "cpu" else max(1, min(16, rows * blocks // (2 * SM_COUNT[target])))
    # BF (keys decoded through bf16 bit patterns, bf16 pair multiplies) on sm90: batch 32 at 128K / 1M tokens 214 /
    # 1,066 us per call against 231 / 1,142 (H200, bench_attention.py --mode indexer, 2026-12-05); elsewhere the fp32
    # decode (bf16 arithmetic on subnormal bit patterns is not known to be exact there)
    p = dict(BLK=blk, NB=nb, HP=max(16, next_pow2(n_heads)), BF=int(target == "sm90"), PF=0, num_warps=4,
             num_stages=1)
    p.update(over)
    check_prefetch(p["PF"], target, "indexer kernel")
    return p


SCORE_TILE_KEYS = ("BLK", "NB", "BF", "PF", "num_warps", "maxnreg", "tiled")


def tile_override() -> dict:
    """Score-plan entries from the ``DSV4_INDEX_TILE`` environment variable (``"BLK=128,num_warps=8"``,
    ``"maxnreg=80"``: ptxas's register cap, XLA launch route only; ``"tiled=1"``: launch as a tiled kernel, i.e.
    through jax-triton where installed; empty: none), for every launch traced after it is set: a benchmark knob
    (every plan computes the same totals). XLA's build of the kernel takes 114 registers and spills under a cap of
    80 (156 bytes), the ``triton`` wheel's takes 79 (``count_launches.py --builds``, 2026-12-03). Measured
    on an H200 (2026-12-03, batch 32 at 1M tokens, with the radix top-k): the plan 1,510 us per call, 128-entry
    blocks with 8 warps 2,082 us; scores laid out ``[entries, heads]`` (the decoded keys as the dot's register
    operand, 10 % fewer sm_90a instructions per block) 1,579 us, with 8 warps 3,534 us: not kept."""
    return env_tiles("DSV4_INDEX_TILE", SCORE_TILE_KEYS)


def _check_score(q, hw, keys: Fp4Tensor) -> tuple[int, int, int, int, int]:
    return indexer_prefill.check_shapes(q, hw, keys, "indexer kernel")


def indexer_totals_triton(q: jax.Array, hw: jax.Array, keys: Fp4Tensor, t: jax.Array,
                          hw_scale: float | None = None) -> jax.Array:
    """Every entry's total ``[B,S,Nc]`` bf16 (-inf where invisible; the totals are bf16 values, stored as such: half
    the bytes of fp32 for the top-k to read) for query rows ``q [B,S,Hi,Di]`` bf16 with head weights ``hw [B,S,Hi]``
    (times ``hw_scale`` first where given, :func:`scale_head_weights`) over the FP4 cache ``keys``, in one kernel
    launch."""
    B, S, Hi, Di, Nc = _check_score(q, hw, keys)
    p = score_plan(Hi, B * S, Nc)
    lim = ((t.astype(jnp.int32) + 1) // 4).reshape(B * S)  # visible entries per row
    out = triton_call(q.reshape(B * S, Hi, Di), hw.astype(jnp.bfloat16).reshape(B * S, Hi), keys.packed, keys.scale,
                      lim, kernel=_indexer_score_kernel, out_shape=jax.ShapeDtypeStruct((B * S, Nc), jnp.bfloat16),
                      grid=(B * S, -(-Nc // (p["BLK"] * p["NB"]))), S=S, HI=Hi, HP=p["HP"], DI=Di, NC=Nc,
                      BLK=p["BLK"], NB=p["NB"], BF=p.get("BF", 0), HWS=_hws(hw_scale), PF=p["PF"],
                      num_warps=p["num_warps"],
                      num_stages=p["num_stages"], maxnreg=p.get("maxnreg"),
                      tiled=bool(p.get("tiled", 0)))  # speed knobs, never a result's
    return out.reshape(B, S, Nc)


def _hws(hw_scale: float | None) -> float:
    """The kernel's ``HWS``: the scale as the fp32 value the XLA form multiplies by (0.0: none)."""
    if hw_scale is not None and not hw_scale:
        raise ValueError("indexer kernel: hw_scale 0 would zero every head weight; pass None for no scale")
    return 0.0 if hw_scale is None else float(np.float32(hw_scale))


def totals_torch(q, hw, packed, scale, lim, S: int, tiles: dict | None = None, hw_scale: float | None = None):
    """:func:`_indexer_score_kernel` on torch tensors (the interpreter tests): ``q [R, Hi, Di]`` and ``hw [R, Hi]``
    bf16, ``packed``/``scale`` uint8 ``[B, Nc, *]``, ``lim [R]`` int32 -> totals ``[R, Nc]`` fp32; ``tiles``
    overrides plan entries."""
    import torch

    R, Hi, Di = q.shape
    Nc = packed.shape[1]
    p = {**score_plan(Hi, R, Nc, "cpu" if q.device.type == "cpu" else None), **(tiles or {})}
    out = torch.full((R, Nc), float("nan"), dtype=torch.float32, device=q.device)
    _indexer_score_kernel[(R, -(-Nc // (p["BLK"] * p["NB"])))](q, hw, packed, scale, lim, out, S=S, HI=Hi,
                                                               HP=p["HP"], DI=Di, NC=Nc, BLK=p["BLK"], NB=p["NB"],
                                                               BF=p.get("BF", 0), HWS=_hws(hw_scale),
                                                               PF=p.get("PF", 0), INTERPRET=q.device.type == "cpu",
                                                               num_warps=p["num_warps"], num_stages=p["num_stages"])
    return out
