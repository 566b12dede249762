"""The XLA forms of the lightning indexer's scoring and top-k (spec 8): :func:`indexer_topk_reference` (the spec:
the whole score tensor at once) and :func:`indexer_topk_blocked` (blocks of compressed entries merged into a running
top-k, or one radix selection over the blocks' totals), beside the dispatcher and the decode kernel of
:mod:`dsv4_jax.kernels.indexer` (which re-exports everything here; its docstring says when each runs).

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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.kernels import indexer_prefill, topk
from dsv4_jax.modeling.quant import cache_values, dot_f32

BUDGET = 256 * 2**20  # bytes for one block's transient: fp32 scores and products [B,S,Hi,block] (CPU)
# Accelerators: each block costs one top-k merge over [B,S,k+block] rows, and an 8192-row chunk at 128K context on an
# H200 grew by 22.5 ms per 8K of context with 64-entry blocks (512 merges per chunk at the end; docs/performance.md);
# 2 GiB gives 512-entry blocks there (8x fewer merges) at 2 GiB of a 141 GB card.
BUDGET_ACCEL = 2 * 2**30
MIN_BLOCK = 1024  # entries per block the row blocks keep (row_block): merges over [rows, k + 1024], k <= 1024


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
