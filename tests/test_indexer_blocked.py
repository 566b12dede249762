"""The blocked indexer (issue 12): scores merged block by block into a running top-k equal the full-score reference.

What is asserted (``dsv4_jax.kernels.indexer``; module docstring there for why they are equal):
  * on FP4-snapped queries and keys (what reference numerics feed the indexer) of several shapes, the chosen ids of
    :func:`indexer_topk_blocked` equal :func:`indexer_topk_reference` bit for bit: Nc not a multiple of the block
    (clamped last block), Nc < k (fewer ids), block 1, block = Nc and > Nc, V4's 64 heads, rows of a batch at
    different positions, rows that see no block (-1 everywhere), a call where no row sees any block (no block
    visited), plain and FP4-coded keys, bf16 and float32 act dtypes; query rows in blocks (the last one padded);
  * exact ties (periodic or equal keys, zero queries): equal totals come lowest id first, across block boundaries,
    checked against explicit expected ids, not only against the reference;
  * the model uses the blocked op: a random model (uneven chunked prefill, decode) gives the same logits, bit for bit,
    with the reference op and with the blocked op at a 5-entry block in 16-row blocks;
  * :func:`row_block` keeps entry blocks of 1,024 entries for long chunks; :func:`block_size` keeps a block's
    ``[B,S,Hi,block]`` fp32 transient within the budget, and for one V4-Flash layer (8192-row chunk, 131072-token
    cache) XLA's memory analysis of the compiled blocked op stays under 1 GiB of temporaries where the reference
    needs 128 GiB.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_weights

import dsv4_jax as d
import dsv4_jax.modeling.indexer as modeling_indexer
from dsv4_jax.kernels.indexer import (
    BUDGET,
    _totals,
    block_size,
    indexer_topk,
    indexer_topk_blocked,
    indexer_topk_reference,
    row_block,
    scale_head_weights,
)
from dsv4_jax.modeling.quant import Fp4Tensor, cache_values, encode_fp4_cache, fp4_simulate

SEED = 20261130
_ref = jax.jit(indexer_topk_reference, static_argnames=("k",))
_blk = jax.jit(indexer_topk_blocked, static_argnames=("k", "block", "rows"))


# The snaps in one program per shape (run op by op they compiled ~100 small programs per test case: CI time)
_snap = jax.jit(lambda q, keys: (fp4_simulate(q, 32), encode_fp4_cache(keys)))
_values = jax.jit(cache_values, static_argnums=1)


def snapped_inputs(rng, B, S, Hi, Nc, dt=jnp.bfloat16, Di=128):
    """Queries ``[B,S,Hi,Di]`` FP4-snapped, head weights ``[B,S,Hi]``, keys ``[B,Nc,Di]`` as FP4 codes (Fp4Tensor)."""
    q = jnp.asarray(rng.standard_normal((B, S, Hi, Di)), dt)
    hw = jnp.asarray(rng.standard_normal((B, S, Hi)) * 0.1, dt)
    q, keys = _snap(q, jnp.asarray(rng.standard_normal((B, Nc, Di)), dt))
    return q, hw, keys


def positions(starts, S):
    """Absolute query positions ``[B,S]``: row ``b`` holds ``starts[b] .. starts[b]+S-1``."""
    return jnp.asarray(np.asarray(starts)[:, None] + np.arange(S)[None, :], jnp.int32)


# B, S, Hi, Nc, k, block, row starts (a row at 0 sees no block on its first 3 positions)
SHAPES = [
    (2, 5, 4, 37, 8, 8, [0, 90]),  # Nc = 4 blocks + 5: clamped last block; second row sees up to 23 entries
    (2, 4, 4, 5, 8, None, [0, 400]),  # Nc < k: 5 ids per row
    (3, 6, 8, 100, 16, 1, [3, 150, 1000]),  # block of one entry
    (2, 5, 4, 40, 8, 40, [17, 160]),  # block = Nc
    (2, 5, 4, 40, 8, 64, [17, 160]),  # block > Nc
    (2, 3, 64, 300, 64, 32, [500, 1200]),  # V4's 64 heads, k > block
    (1, 3, 4, 20, 4, 4, [0]),  # no row sees any block: nothing visited, all -1
    (2, 7, 4, 200, 4, 16, [40, 777]),  # k < block
    (3, 1, 64, 512, 64, None, [7, 1000, 4000]),  # decode rows: one block over the cache
    (2, 1, 4, 512, 8, 16, [100, 1500]),  # decode rows, blocks beyond the furthest visible entry not visited
]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{s[0]}S{s[1]}H{s[2]}Nc{s[3]}k{s[4]}blk{s[5]}" for s in SHAPES])
def test_blocked_equals_reference(shape):
    B, S, Hi, Nc, k, block, starts = shape
    rng = np.random.default_rng([SEED, Nc, k])
    q, hw, keys = snapped_inputs(rng, B, S, Hi, Nc)
    t = positions(starts, S)
    want = np.asarray(_ref(q, hw, keys, t, k=k))
    assert want.shape == (B, S, min(k, Nc))
    for kv in (keys, _values(keys, jnp.bfloat16)):  # FP4 codes decoded per block, and a plain bf16 cache
        got = np.asarray(_blk(q, hw, kv, t, k=k, block=block))
        np.testing.assert_array_equal(got, want)
    visible = np.minimum((np.asarray(t) + 1) // 4, Nc)  # [B,S]
    np.testing.assert_array_equal((want >= 0).sum(-1), np.minimum(visible, min(k, Nc)))  # -1 exactly where unseen


def test_blocked_equals_reference_float32():
    """The float32 oracle's act dtype (no bf16 rounding) with snapped values, so the dots stay exact."""
    rng = np.random.default_rng(SEED)
    q, hw, keys = snapped_inputs(rng, 2, 4, 8, 61, dt=jnp.float32)
    kv = _values(keys, jnp.float32)
    t = positions([2, 230], 4)
    np.testing.assert_array_equal(np.asarray(_blk(q, hw, kv, t, k=12, block=8)),
                                  np.asarray(_ref(q, hw, kv, t, k=12)))


def expected_ids(total, t, k):
    """Independent oracle: per row, visible entries sorted by (total desc, id asc), first k, padded with -1."""
    total = np.asarray(total)  # [B,S,Nc]
    B, S, Nc = total.shape
    out = np.full((B, S, min(k, Nc)), -1, np.int32)
    for b in range(B):
        for s in range(S):
            n = min((int(t[b, s]) + 1) // 4, Nc)
            order = np.lexsort((np.arange(n), -total[b, s, :n]))[:k]  # last key first: total desc, then id asc
            out[b, s, :len(order)] = order
    return out


def test_ties_lowest_id_first():
    """Keys repeating with period 3: entries 3m, 3m+1, 3m+2 tie with every other entry of their class, across the
    4-entry blocks. Each row's top 7 must be one class's lowest ids (then the next class's), lowest first."""
    B, S, Hi, Nc, k = 2, 3, 4, 23, 7
    rng = np.random.default_rng(SEED + 1)
    q, hw, base = snapped_inputs(rng, B, S, Hi, 3)
    codes = jax.tree_util.tree_map(lambda a: a[:, np.arange(Nc) % 3], base)  # [B,Nc,...]: entry j = base[j % 3]
    t = positions([60, 200], S)  # 15..16 entries visible in row 0, all 23 in row 1
    want = expected_ids(_totals(q, hw, cache_values(codes, jnp.bfloat16)), np.asarray(t), k)
    for s_ in range(S):  # the fixture really ties: each row's choice is one residue class, ids increasing
        ids = want[0, s_]
        assert len(set(ids[:5] % 3)) == 1 and np.all(np.diff(ids[:5]) == 3)
    np.testing.assert_array_equal(np.asarray(_ref(q, hw, codes, t, k=k)), want)
    for block in (1, 4, 5, None):
        np.testing.assert_array_equal(np.asarray(_blk(q, hw, codes, t, k=k, block=block)), want)


def test_all_equal_totals():
    """Zero queries (every total is 0) and equal keys (every total equal): ids 0, 1, 2, ... then -1."""
    B, S, Hi, Nc, k = 2, 4, 4, 30, 6
    rng = np.random.default_rng(SEED + 2)
    q, hw, keys = snapped_inputs(rng, B, S, Hi, Nc)
    t = positions([5, 13], S)  # visible entries 1, 1, 2, 2 and 3, 3, 4, 4
    n = (np.asarray(t) + 1) // 4
    want = np.where(np.arange(k)[None, None, :] < n[..., None], np.arange(k)[None, None, :], -1)
    same_keys = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a[:, :1], a.shape), keys)
    for qq, kv in ((jnp.zeros_like(q), keys), (q, same_keys)):
        np.testing.assert_array_equal(np.asarray(_ref(qq, hw, kv, t, k=k)), want)
        for block in (1, 4, 7):
            np.testing.assert_array_equal(np.asarray(_blk(qq, hw, kv, t, k=k, block=block)), want)


@pytest.mark.parametrize("shape,rows", [(SHAPES[0], 2), (SHAPES[2], 4), (SHAPES[7], 3), (SHAPES[7], 1)],
                         ids=["S5-rows2", "S6-rows4-block1", "S7-rows3", "S7-rows1"])
def test_row_blocks_equal_reference(shape, rows):
    """Query rows in blocks (the last one padded with rows that see nothing): the reference's ids, bit for bit."""
    B, S, Hi, Nc, k, block, starts = shape
    rng = np.random.default_rng([SEED, Nc, k, rows])
    q, hw, keys = snapped_inputs(rng, B, S, Hi, Nc)
    t = positions(starts, S)
    np.testing.assert_array_equal(np.asarray(_blk(q, hw, keys, t, k=k, block=block, rows=rows)),
                                  np.asarray(_ref(q, hw, keys, t, k=k)))


def test_row_block_keeps_entry_blocks_large():
    """Long chunks get row blocks whose entry blocks hold MIN_BLOCK entries (the top-k merges stay a fraction of the
    work) within the budget; short chunks and decode rows stay one block."""
    from dsv4_jax.kernels.indexer import BUDGET_ACCEL, MIN_BLOCK

    assert row_block(1, 65536, 64, 16384, BUDGET_ACCEL) == 4096  # V4-Flash 64K chunk at 64K context, accelerator
    assert block_size(1, 4096, 64, 16384, BUDGET_ACCEL) == MIN_BLOCK
    assert row_block(1, 1, 64, 262144, BUDGET_ACCEL) == 1
    assert row_block(1, 300, 64, 500, BUDGET_ACCEL) == 300  # small cache: its blocks are whole
    for B, S, Hi, Nc in ((1, 8192, 64, 32768), (2, 3000, 64, 8192), (1, 65536, 64, 2**18), (1, 777, 4, 2**20)):
        R = row_block(B, S, Hi, Nc)
        assert 1 <= R <= S and (R == S or block_size(B, R, Hi, Nc) >= min(Nc, MIN_BLOCK))
        assert B * R * Hi * block_size(B, R, Hi, Nc) * 8 <= BUDGET


def test_block_size_bounds_the_transient():
    assert block_size(1, 8192, 64, 32768) == 64  # one V4-Flash 8192-row chunk
    assert block_size(1, 1, 64, 262144) == 262144  # a decode row: the whole cache in one block
    assert block_size(1, 4, 64, 100) == 100
    assert block_size(64, 8192, 64, 32768) == 1  # past the budget: one entry at a time, never 0
    for B, S, Hi in ((1, 8192, 64), (2, 3000, 64), (8, 1, 64), (1, 65536, 64), (1, 777, 4)):
        blk = block_size(B, S, Hi, 2**20)
        assert B * S * Hi * blk * 8 <= BUDGET < B * S * Hi * (2 * blk) * 8


def test_block_size_default_on_accelerators(monkeypatch):
    """Off the CPU the default budget is BUDGET_ACCEL (fewer top-k merges per long chunk): 512-entry blocks for an
    8192-row V4-Flash chunk, still within the budget."""
    from dsv4_jax.kernels.indexer import BUDGET_ACCEL

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert block_size(1, 8192, 64, 32768) == 512
    for B, S, Hi in ((1, 8192, 64), (1, 65536, 64), (4, 2048, 64)):
        blk = block_size(B, S, Hi, 2**20)
        assert B * S * Hi * blk * 8 <= BUDGET_ACCEL < B * S * Hi * (2 * blk) * 8


def _temp_bytes(fn, *args):
    stats = jax.jit(fn, static_argnums=4).lower(*args).compile().memory_analysis()
    if stats is None:
        pytest.skip("this backend gives no memory analysis")
    return stats.temp_size_in_bytes


def test_v4_flash_prefill_chunk_memory():
    """One V4-Flash layer's indexer, an 8192-row prefill chunk over a 131072-token cache (Nc = 32768), compiled
    from shapes only. Blocked (row blocks of 512 rows x 1024 entries): within the 256 MiB budget per block plus
    q and the running top-k; reference: the
    [1, 8192, 64, 32768] fp32 scores and products (128 GiB)."""
    B, S, Hi, Di, Nc, k = 1, 8192, 64, 128, 32768, 512
    sd = jax.ShapeDtypeStruct
    args = (sd((B, S, Hi, Di), jnp.bfloat16), sd((B, S, Hi), jnp.bfloat16),
            Fp4Tensor(packed=sd((B, Nc, Di // 2), jnp.uint8), scale=sd((B, Nc, Di // 32), jnp.uint8)),
            sd((B, S), jnp.int32), k)
    assert _temp_bytes(indexer_topk, *args) < 2**30
    assert _temp_bytes(indexer_topk_reference, *args) >= 64 * 2**30


def test_model_uses_blocked_op(monkeypatch):
    """A random one-layer model (reference numerics, a CSA layer selecting top-4 of up to 30 blocks): logits with the
    reference op equal those with the blocked op at a 5-entry block in 16-row blocks, bit for bit, over an uneven
    chunked prefill (rows at different positions; the second row ends at 90, so its last queries see 22 blocks, the
    first row's 30)."""
    assert modeling_indexer.indexer_topk is indexer_topk
    cfg = d.Config.tiny(window_size=8, index_topk=4, index_n_heads=8, vocab_size=256, n_layers=1,
                        compress_ratios=(4, 0), n_hash_layers=1)
    w = random_weights(cfg, SEED)
    toks = np.random.default_rng(SEED).integers(0, cfg.vocab_size, (2, 122))
    calls = [(toks[:, :61], [61, 29]), (toks[:, 61:], [61, 61])]  # one shape: one compile per op

    def run(op):
        def stand_in(q, hw, *args, kernels, hw_scale=None):  # the model's call; these ops are the XLA paths
            return op(q, scale_head_weights(hw, hw_scale), *args)

        monkeypatch.setattr(modeling_indexer, "indexer_topk", stand_in)
        jax.clear_caches()  # the jitted forward must retrace with this op
        state = d.init_state(cfg, 2, 128)
        out = []
        for chunk, lengths in calls:
            logits, state = d.forward(w, cfg, jnp.asarray(chunk), state, return_logits="last",
                                      lengths=jnp.asarray(lengths))
            out.append(np.asarray(logits))
        return np.stack(out, 1)

    want = run(indexer_topk_reference)
    got = run(functools.partial(indexer_topk_blocked, block=5, rows=16))  # 61-row chunks: 4 row blocks
    jax.clear_caches()
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("n,k,block", [(10000, 64, 1024), (3 * 4096 + 17, 512, 4096), (3000, 16, 512)])
def test_top_k_two_level_equals_top_k(n, k, block):
    """The decode path's two-level selection (:func:`top_k_two_level`: top-k per block of entries, then over the
    candidates) returns ``jax.lax.top_k``'s values and ids bit for bit: integer-valued totals (ties everywhere,
    across block boundaries), -inf columns (invisible entries), a row with fewer finite totals than k (its -inf picks
    must be the lowest ids, never the padding past the row's end), n not a multiple of the block."""
    from dsv4_jax.kernels.indexer import top_k_two_level

    rng = np.random.default_rng(n + k)
    x = rng.integers(-8, 8, size=(3, 2, n)).astype(np.float32)
    x[..., rng.random(n) < 0.3] = -np.inf
    x[1, 0, k // 2:] = -np.inf  # k // 2 finite totals
    assert block >= k and n > 2 * block  # the two-level path, not its one-top_k fallback
    want_v, want_i = jax.lax.top_k(jnp.asarray(x), k)
    got_v, got_i = jax.jit(top_k_two_level, static_argnums=(1, 2))(jnp.asarray(x), k, block)
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
    assert (np.asarray(got_i) < n).all()
