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

The two are equal bit for bit, ties included, wherever each total is a function of its query and key alone:

* both compute the totals with :func:`_totals`: bf16 score from a dot over ``Di`` accumulated in fp32, relu, times the
  head weight rounded to bf16, summed over heads in fp32, rounded to bf16. Only the number of key columns of the
  dot differs (``block`` vs ``Nc``). In reference numerics q and keys are FP4-snapped (e2m1 times a power of two
  per 32 dims), so every product and partial sum of the 128-term dot is exact in fp32 (unless the four 32-dim
  groups' scale exponents differ by more than ~9) and the dot's order cannot matter. In the float32 oracle mode the
  inputs are not snapped and an XLA CPU dot's last bits depend on its column count (measured: 128 vs 1500 columns),
  so there the two can differ in the last bit of a total, and so can the reference run at two cache lengths;
* the roundings are ``reduce_precision`` ops (:func:`_rounded`), not ``astype`` pairs: XLA CPU's YNNPACK fusion
  dropped the product's bf16 rounding for some shapes, so the former code's totals depended on ``Nc``. (This
  changed the former code's CPU results slightly: on the golden layer-isolated cases its indexer choices now equal
  the official traces on all 430 rows, 429 before.)
* ``jax.lax.top_k`` returns equal values lowest position first. The merge is ``top_k(concat([running, block]))``:
  the running entries come first and are themselves sorted (value descending, id ascending), and every id they hold
  is below every id of the new block, so among equal values position order is id order and the merge picks the
  first ``k`` of (running | block) in (value desc, id asc) order. By induction the running list is the first ``k``
  of all entries seen, which is what the reference's one ``top_k`` returns. (This holds for whatever strict weak
  order ``top_k`` uses on floats, -0/+0 and NaN included, since both sides use the same ``top_k``.)
* masked (invisible) entries are -inf and come back as -1, as in the reference, whose -inf ids are never reported.
  The running list starts as k sentinels (-inf, id -1). The last block is the range ``[Nc - block, Nc)`` (the
  static slice is clamped instead of padded, so the cache is not copied); its entries already seen in the previous
  block are masked to -inf: they are -1 either way, and they cannot displace a finite value.
* one block (decode rows, the budget allowing): the reference itself, without the loop. Its trip count is data
  dependent (blocks holding a visible entry), which on a GPU costs a device-to-host copy and a host sync per
  condition check (``scripts/count_launches.py``).

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
    env_tiles,
    indexer_prefill,
    next_pow2,
    single_device,
    topk,
    triton_call,
    use_opt_in_triton,
    use_triton,
)
from dsv4_jax.modeling.quant import Fp4Tensor, cache_values, dot_f32

try:  # the model imports this module; triton is optional (kernels="reference" needs none of it)
    import triton
    import triton.language as tl

    from dsv4_jax.kernels.common import e2m1_factors, e2m1_factors16, e2m1_pair, e2m1_pair16, rn_bf16
except ImportError:  # pragma: no cover - exercised only without the triton extra
    triton = tl = None

BUDGET = 256 * 2**20  # bytes for one block's transient: fp32 scores and products [B,S,Hi,block] (CPU)
# Accelerators: each block costs one top-k merge over [B,S,k+block] rows, and an 8192-row chunk at 128K context on an
# H200 grew by 22.5 ms per 8K of context with 64-entry blocks (512 merges per chunk at the end; docs/performance.md);
# 2 GiB gives 512-entry blocks there (8x fewer merges) at 2 GiB of a 141 GB card.
BUDGET_ACCEL = 2 * 2**30
MIN_BLOCK = 1024  # entries per block the row blocks keep (row_block): merges over [rows, k + 1024], k <= 1024


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


def _rounded(x: jax.Array, dt) -> jax.Array:
    """fp32 ``x`` rounded to ``dt`` (nearest even) and kept in fp32: ``x.astype(dt).astype(float32)`` as one
    ``reduce_precision`` op, which XLA cannot drop. (XLA CPU's YNNPACK fusion of the dot, relu, product and head sum
    skipped the product's bf16 rounding in the ``astype`` spelling, for some key counts and not others, so the
    totals of the same query and key depended on ``Nc``.)"""
    if dt == jnp.float32:
        return x
    fi = jnp.finfo(dt)
    return jax.lax.reduce_precision(x, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)


def _totals(q: jax.Array, hw: jax.Array, kv: jax.Array) -> jax.Array:
    """Per-query totals ``[B,S,T]`` (act-dtype values in fp32) of queries ``q [B,S,Hi,Di]`` with head weights
    ``hw [B,S,Hi]`` over ``T`` keys ``kv [B,T,Di]`` (all in the act dtype): the spec's arithmetic, shared by both
    implementations so that they cannot drift apart. bf16 score from a dot accumulated in fp32, relu, times the head
    weight rounded to bf16, summed over heads in fp32, rounded to bf16. The dot is :func:`dot_f32`: fp32 HIGHEST on
    CPUs; on accelerators bf16 operands stay bf16 (tensor cores, fp32 accumulation): the same exact products, and in
    reference numerics (FP4-snapped q and keys) every partial sum is exact too, so the same scores."""
    dt = q.dtype
    f32 = jnp.float32
    score = _rounded(dot_f32(q, kv.astype(dt), "bshd,btd->bsht"), dt)  # [B,S,Hi,T]
    prod = _rounded(jax.nn.relu(score) * hw.astype(f32)[..., None], dt)  # [B,S,Hi,T]
    return _rounded(jnp.sum(prod, axis=2), dt)  # [B,S,T]


def _n_entries(keys) -> int:
    """``Nc``, the number of cache entries (axis 1) of a plain or FP4 cache."""
    return jax.tree_util.tree_leaves(keys)[0].shape[1]


def indexer_topk_reference(q: jax.Array, hw: jax.Array, keys, t: jax.Array, k: int, top_k=jax.lax.top_k) -> jax.Array:
    """:func:`indexer_topk` over the whole ``[B,S,Hi,Nc]`` score tensor at once (the spec; the model's former code).
    ``top_k``: the selection (default ``jax.lax.top_k``; :func:`top_k_two_level` gives the same result)."""
    dt = q.dtype
    kv = cache_values(keys, dt)  # [B,Nc,Di]
    total = _totals(q, hw, kv)  # [B,S,Nc]
    n_c = kv.shape[1]
    visible = jnp.arange(n_c)[None, None, :] < ((t + 1) // 4)[..., None]
    total = jnp.where(visible, total, -jnp.inf)
    vals, idx = top_k(total, min(k, n_c))
    return jnp.where(vals == -jnp.inf, -1, idx).astype(jnp.int32)


TOPK_BLOCK = 4096  # entries per first-level block of top_k_two_level on accelerators (0: one top_k over the row)
TOPK_MIN_ROWS = 8  # rows from which top_k_two_level takes two levels by default


def top_k_two_level(x: jax.Array, k: int, block: int | None = None) -> tuple[jax.Array, jax.Array]:
    """``jax.lax.top_k(x, k)`` over the last axis, bit for bit, in two levels: the top ``k`` of each ``block``
    entries (the last block padded with -inf after the row's end), then the top ``k`` of those candidates in block
    order. Why: 32 decode rows of the indexer at 1M tokens hold 262,144 totals each; with two levels of 4,096 the
    call (scoring kernel + selection) took 2.2 instead of 3.5 ms on an H200 (docs/performance.md; one row measured
    no faster). Exact, ties included: an entry among the row's first ``k`` in (value desc, position asc) order is
    among its block's first ``k``, and in the candidates (blocks in order, each sorted by value desc, position asc)
    equal values stand in position order, which ``top_k`` keeps; padding sits after every real entry, so it is never
    chosen while ``k <= n``. ``block``: default :data:`TOPK_BLOCK` on accelerators from :data:`TOPK_MIN_ROWS` rows
    on; rows of at most ``2 * block`` entries (and ``block < k``, CPUs, 0) take one ``top_k``."""
    n = x.shape[-1]
    if block is None:  # measured: one row (batch-1 decode) is no faster in two levels, 32 rows are (1M: 1.6x)
        block = 0 if jax.default_backend() == "cpu" or x.size // max(n, 1) < TOPK_MIN_ROWS else TOPK_BLOCK
    if not block or block < k or n <= 2 * block:
        return jax.lax.top_k(x, k)
    nb = -(-n // block)
    xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * block - n)], constant_values=-jnp.inf)
    v1, i1 = jax.lax.top_k(xp.reshape(*x.shape[:-1], nb, block), k)  # [..., nb, k]
    i1 = i1 + (jnp.arange(nb, dtype=i1.dtype) * block)[:, None]
    v2, p2 = jax.lax.top_k(v1.reshape(*x.shape[:-1], nb * k), k)
    return v2, jnp.take_along_axis(i1.reshape(*x.shape[:-1], nb * k), p2, axis=-1)


def _budget(budget: int | None) -> int:
    """``budget``, or the backend's default: :data:`BUDGET` on CPUs, :data:`BUDGET_ACCEL` elsewhere."""
    if budget is not None:
        return budget
    return BUDGET if jax.default_backend() == "cpu" else BUDGET_ACCEL


def block_size(batch: int, rows: int, heads: int, n_c: int, budget: int | None = None) -> int:
    """Entries per block: the largest power of two (at least 1, at most ``n_c``) whose per-block transient fits
    ``budget`` bytes (default :data:`BUDGET` on CPUs, :data:`BUDGET_ACCEL` elsewhere; the block size never changes
    the result). The transient is counted as two fp32 ``[batch, rows, heads, block]`` tensors, the dot's scores and
    the rounded products (XLA CPU materializes both; a GPU fusion may keep the second in registers). Decode rows get
    one block over the whole cache; an 8192-row V4-Flash chunk (64 heads, 4 MiB per entry) gets 64 on a CPU, 512 on
    an accelerator."""
    fit = max(1, _budget(budget) // (batch * rows * heads * 8))
    return min(1 << (fit.bit_length() - 1), n_c)


def row_block(batch: int, rows: int, heads: int, n_c: int, budget: int | None = None) -> int:
    """Query rows per row block of :func:`indexer_topk_blocked`: all ``rows`` while :func:`block_size` still gives
    them blocks of at least ``min(n_c, MIN_BLOCK)`` entries, else as many as fit the budget with ``MIN_BLOCK``-entry
    blocks. Why: every entry block costs one top-k merge over ``[rows, k + block]``; with blocks much smaller than k
    the merges, not the scores, are the work (a 65,536-row V4-Flash chunk at 64K context got 64-entry blocks: 513
    merges over ``[65536, 576]``, 2.1 of its 2.7 s on an H200; docs/performance.md). Rows are independent, so the
    row blocks never change the result."""
    budget = _budget(budget)
    want = min(n_c, MIN_BLOCK)
    if block_size(batch, rows, heads, n_c, budget) >= want:
        return rows
    return max(1, min(rows, budget // (batch * heads * want * 8)))


def indexer_topk_blocked(q: jax.Array, hw: jax.Array, keys, t: jax.Array, k: int, block: int | None = None,
                         rows: int | None = None, radix: bool = False, kernel: bool = False) -> jax.Array:
    """:func:`indexer_topk` as a loop over blocks of ``block`` entries (default :func:`block_size`) merged into a
    running top-k, for blocks of ``rows`` query rows at a time (default :func:`row_block`; a ``jax.lax.map``, the
    last block padded with rows that see nothing); equal to :func:`indexer_topk_reference` bit for bit (module
    docstring). ``radix`` (bf16 queries; the Triton kernels of :mod:`dsv4_jax.kernels.topk`): the blocks' totals
    fill a ``[B, rows, Nc]`` bf16 buffer (row blocks sized so that it fits the budget too) and one radix selection
    replaces the merges, ``jax.lax.top_k`` of the whole row: the same ids. ``kernel`` (with ``radix``, an FP4 cache):
    the totals come from :func:`dsv4_jax.kernels.indexer_prefill.prefill_totals_triton` in one launch per row block,
    over the keys decoded to bf16 once for all row blocks (the same arithmetic; the fp32 sum over heads in another
    order, as for decode rows)."""
    B, S, Hi, _ = q.shape
    fit = max(1, _budget(None) // (2 * B * _n_entries(keys)))  # rows whose totals buffer (bf16) fits the budget
    R = rows or (fit if radix and kernel else row_block(B, S, Hi, _n_entries(keys)))  # kernel: no XLA score blocks
    if radix:
        R = min(R, fit)
    if radix and kernel:
        kv = cache_values(keys, jnp.bfloat16)  # [B, Nc, Di]: decoded once for every row block

        def one(q, hw, t):  # one block of query rows
            tot = indexer_prefill.prefill_totals_triton(q, hw, keys, t, kv)  # [B,R,Nc]
            vals, ids = topk.top_k_triton(tot, min(k, tot.shape[-1]))
            return jnp.where(vals == -jnp.inf, -1, ids).astype(jnp.int32)  # [B,R,k]
    else:
        def one(q, hw, t):
            return _topk_blocks(q, hw, keys, t, k, block, radix)
    if R >= S:
        return one(q, hw, t)
    n = -(-S // R)
    pad = n * R - S

    def split(a, fill):  # [B,S,...] -> [n,B,R,...]
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
        return a.reshape(B, n, R, *a.shape[2:]).swapaxes(0, 1)

    out = jax.lax.map(lambda a: one(*a), (split(q, 0), split(hw, 0), split(t, -1)))  # [n,B,R,k]
    # padded rows: t = -1, nothing visible
    return out.swapaxes(0, 1).reshape(B, n * R, -1)[:, :S]


def _topk_blocks(q: jax.Array, hw: jax.Array, keys, t: jax.Array, k: int, block: int | None,
                 radix: bool = False) -> jax.Array:
    """:func:`indexer_topk_blocked` for one block of query rows without the prefill kernel: the loop over entry
    blocks."""
    B, S, Hi, _ = q.shape
    n_c = _n_entries(keys)
    k = min(k, n_c)
    blk = min(block or block_size(B, S, Hi, n_c), n_c)
    n_blocks = -(-n_c // blk)
    if n_blocks == 1:  # decode rows: one block over the whole cache. No loop: a loop whose trip count is data-
        return indexer_topk_reference(q, hw, keys, t, k, top_k_two_level)  # dependent costs two host round trips
    limit = (t + 1) // 4  # [B,S] visible entries per query
    n_visit = jnp.minimum((jnp.max(limit) + blk - 1) // blk, n_blocks)  # blocks holding any visible entry
    if radix:
        return _radix_blocks(q, hw, keys, limit, k, blk, n_visit)

    def merge(i, carry):
        vals, ids = carry  # [B,S,k] fp32 sorted (value desc, id asc), int32
        j, tot = _block_totals(q, hw, keys, i, blk)
        fresh = (j >= i * blk)[None, None, :] & (j[None, None, :] < limit[..., None])  # unseen and visible
        tot = jnp.where(fresh, tot, -jnp.inf)
        cand_v = jnp.concatenate([vals, tot], axis=-1)  # [B,S,k+blk], running entries first
        cand_i = jnp.concatenate([ids, jnp.broadcast_to(j, tot.shape)], axis=-1)
        vals, pos = jax.lax.top_k(cand_v, k)
        return vals, jnp.take_along_axis(cand_i, pos, axis=-1)

    init = (jnp.full((B, S, k), -jnp.inf, jnp.float32), jnp.full((B, S, k), -1, jnp.int32))
    vals, ids = jax.lax.fori_loop(0, n_visit, merge, init)
    return jnp.where(vals == -jnp.inf, -1, ids).astype(jnp.int32)


def _block_totals(q: jax.Array, hw: jax.Array, keys, i, blk: int) -> tuple[jax.Array, jax.Array]:
    """Entry block ``i`` of ``blk`` entries: its entry ids ``[blk]`` and totals ``[B,S,blk]`` (:func:`_totals` on
    the keys decoded from their stored layout). The last block is clamped into range (``[Nc - blk, Nc)``), not
    padded, so the cache is never copied; it overlaps the block before it."""
    start = jnp.minimum(i * blk, _n_entries(keys) - blk)
    kb = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, blk, axis=1), keys)
    return start + jnp.arange(blk, dtype=jnp.int32), _totals(q, hw, cache_values(kb, q.dtype))


def _radix_blocks(q: jax.Array, hw: jax.Array, keys, limit: jax.Array, k: int, blk: int, n_visit) -> jax.Array:
    """:func:`_topk_blocks` with ``radix``: the visited blocks' totals (bf16 values, -inf where invisible) written
    into a ``[B,S,Nc]`` bf16 buffer that starts at -inf (blocks never visited hold nothing visible), then one
    :func:`dsv4_jax.kernels.topk.top_k_triton`. The clamped last block rewrites entries of the one before it with the
    same totals."""
    B, S = q.shape[:2]
    n_c = _n_entries(keys)

    def fill(i, buf):
        j, tot = _block_totals(q, hw, keys, i, blk)
        tot = jnp.where(j[None, None, :] < limit[..., None], tot, -jnp.inf)
        return jax.lax.dynamic_update_slice_in_dim(buf, tot.astype(jnp.bfloat16), j[0], axis=2)

    buf = jax.lax.fori_loop(0, n_visit, fill, jnp.full((B, S, n_c), -jnp.inf, jnp.bfloat16))
    vals, ids = topk.top_k_triton(buf, k)
    return jnp.where(vals == -jnp.inf, -1, ids).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------- Triton (decode rows)
if triton is not None:

    @triton.jit
    def _indexer_score_kernel(q_ptr, hw_ptr, kp_ptr, ks_ptr, lim_ptr, out_ptr, S: tl.constexpr, HI: tl.constexpr,
                              HP: tl.constexpr, DI: tl.constexpr, NC: tl.constexpr, BLK: tl.constexpr,
                              NB: tl.constexpr = 1, BF: tl.constexpr = 0, HWS: tl.constexpr = 0.0,
                              INTERPRET: tl.constexpr = False):
        """Totals of query row ``r = program_id(0)`` (batch row ``r // S``) over the ``NB`` entry blocks ``[BLK *
        (NB * program_id(1) + b), + BLK)``: :func:`_totals` on the FP4 keys (``kp [B, NC, DI/2]`` e2m1 pairs, ``ks
        [B, NC, DI/32]`` e8m0), -inf for entries at or past ``lim[r]`` (the visible count). ``q [B*S, HI, DI]`` and
        ``hw [B*S, HI]`` bf16, loaded once per program; the heads padded to ``HP`` (a dot needs 16 rows) add -0.0 to
        the head sum, which changes no sum. ``HWS`` (non-zero): ``hw`` is the head weights before their scale, each
        becomes ``bf16(hw * HWS)`` here (the model's XLA multiply, a kernel of its own before). A block with nothing
        visible reads no key. ``BF`` (sm90's plan): the keys
        decoded straight to bf16 bit patterns and scaled by bf16 pair multiplies (the same values; as the FP4
        experts' ``BFMUL``, :mod:`dsv4_jax.kernels.fp4_moe_wx`; under the interpreter, whose bf16 arithmetic is not
        the GPU's, the same bit patterns scaled in fp32)."""
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
        for b in range(NB):
            j0 = (tl.program_id(1) * NB + b) * BLK
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
    p = dict(BLK=blk, NB=nb, HP=max(16, next_pow2(n_heads)), BF=int(target == "sm90"), num_warps=4, num_stages=1)
    p.update(over)
    return p


SCORE_TILE_KEYS = ("BLK", "NB", "BF", "num_warps", "maxnreg", "tiled")


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
                      BLK=p["BLK"], NB=p["NB"], BF=p.get("BF", 0), HWS=_hws(hw_scale), num_warps=p["num_warps"],
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
                                                               INTERPRET=q.device.type == "cpu",
                                                               num_warps=p["num_warps"], num_stages=p["num_stages"])
    return out
