"""Prefill / chunked prefill / decode / uneven batches are one computation (float32 numerics, random weights).

In float32 numerics the only differences between these call patterns are fp32 summation orders (matmuls of M=1 vs
M=S rows), so logits agree to ~1e-6 relative; 1e-4 leaves room for that while any misplaced token, window slot,
compressor buffer or position would show up at O(1). The config crosses every boundary: window 8, ratio-4 blocks
with the indexer selecting (index_topk 4 < blocks), a ratio-128 block, hash and learned routing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_weights

import dsv4_jax as d

TOL = 1e-4
SEED = 20261129  # fixed: a failure reproduces with the same weights and tokens
# The batch-1 states of the decode tests all hold this many positions (more than any of them reaches), so their
# single-token decode calls share one compiled program (CPU compile time dominates; a larger cache changes nothing)
MAX_LEN = 135
CHUNKS = [37, 1, 50, 1, 50]  # the chunked-prefill test's calls (batch 2)


def _cfg(**kw):
    # CSA (hash routed), HCA, window-only: every layer kind in three layers (compile time matters on CI's 2 cores)
    base = dict(numerics="float32", window_size=8, index_topk=4, index_n_heads=16, vocab_size=512, n_layers=3,
                compress_ratios=(4, 128, 0, 0), n_hash_layers=1)
    base.update(kw)
    return d.Config.tiny(**base)


@pytest.fixture(scope="module")
def setup():
    cfg = _cfg()
    seed = SEED
    return cfg, random_weights(cfg, seed), np.random.default_rng(seed), seed


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)))


def test_prefill_then_decode_equals_longer_prefill(setup):
    cfg, w, rng, seed = setup
    n, k = 126, 6  # decode steps cross position 127 (first ratio-128 block) and several ratio-4 blocks
    toks = rng.integers(0, cfg.vocab_size, (1, n + k))
    full, _ = d.forward(w, cfg, jnp.asarray(toks), d.init_state(cfg, 1, MAX_LEN))
    logits, state = d.forward(w, cfg, jnp.asarray(toks[:, :n]), d.init_state(cfg, 1, MAX_LEN), return_logits="last")
    steps = [np.asarray(logits)]
    for j in range(k - 1):
        logits, state = d.forward(w, cfg, jnp.asarray(toks[:, n + j:n + j + 1]), state, return_logits="last")
        steps.append(np.asarray(logits))
    err = _rel(np.stack(steps, 1), np.asarray(full)[:, n - 1:n + k - 1])
    assert err <= TOL, f"seed {seed}: decode vs prefill rel error {err:.2e}"
    assert int(state.pos[0]) == n + k - 1


def test_chunked_prefill_equals_one_prefill(setup):
    cfg, w, rng, seed = setup
    # uneven, crossing window / ratio-4 / ratio-128 boundaries mid-chunk (a 1-token chunk at a ratio-4 block start,
    # the last chunk across 128); three chunk sizes, so three compiled programs (CPU compile time dominates)
    chunks = CHUNKS
    total = sum(chunks)
    toks = rng.integers(0, cfg.vocab_size, (2, total))
    full, full_state = d.forward(w, cfg, jnp.asarray(toks), d.init_state(cfg, 2, total + 4))
    state, parts, p = d.init_state(cfg, 2, total + 4), [], 0
    for c in chunks:  # the 1-token chunks pass their (full) lengths: the zero-length test's program
        n = jnp.full((2,), c, jnp.int32) if c == 1 else None
        logits, state = d.forward(w, cfg, jnp.asarray(toks[:, p:p + c]), state, lengths=n)
        parts.append(np.asarray(logits))
        p += c
    err = _rel(np.concatenate(parts, 1), full)
    assert err <= TOL, f"seed {seed}: chunked vs single prefill rel error {err:.2e}"
    # the states agree too (caches, compressor buffers incl. their canonical empty slots, positions)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(full_state)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.array_equal(np.isinf(a), np.isinf(b))
        fin = np.isfinite(b)
        np.testing.assert_allclose(a[fin], b[fin], rtol=1e-4, atol=1e-5)


def test_uneven_batch_equals_rows_alone(setup):
    cfg, w, rng, seed = setup
    lens = [9, 61, 126]  # the longest row completes its first ratio-128 block in the batched decode steps
    steps = 5
    B, S = len(lens), max(lens)
    assert S + steps <= MAX_LEN
    toks = np.zeros((B, S), np.int64)
    for b, n in enumerate(lens):
        toks[b, :n] = rng.integers(0, cfg.vocab_size, n)
    cont = rng.integers(0, cfg.vocab_size, (B, steps))
    # batched: one right-padded prefill with per-row lengths, then decode all rows together (rows at other positions)
    state = d.init_state(cfg, B, S + steps)
    logits, state = d.forward(w, cfg, jnp.asarray(toks), state, return_logits="last", lengths=jnp.asarray(lens))
    got = [np.asarray(logits)]
    for j in range(steps):
        logits, state = d.forward(w, cfg, jnp.asarray(cont[:, j:j + 1]), state, return_logits="last")
        got.append(np.asarray(logits))
    got = np.stack(got, 1)
    assert np.asarray(state.pos).tolist() == [n + steps for n in lens]
    for b, n in enumerate(lens):
        st = d.init_state(cfg, 1, MAX_LEN)  # one cache length for every row alone: one decode program
        logits, st = d.forward(w, cfg, jnp.asarray(toks[b:b + 1, :n]), st, return_logits="last")
        alone = [np.asarray(logits)]
        for j in range(steps):
            logits, st = d.forward(w, cfg, jnp.asarray(cont[b:b + 1, j:j + 1]), st, return_logits="last")
            alone.append(np.asarray(logits))
        err = _rel(got[b], np.concatenate(alone, 0))
        assert err <= TOL, f"seed {seed}: row {b} (length {n}) batched vs alone rel error {err:.2e}"


def test_zero_length_rows_do_not_change(setup):
    cfg, w, rng, _ = setup
    n = CHUNKS[0]  # the chunked test's first two calls (same shapes: its compiled programs)
    toks = rng.integers(0, cfg.vocab_size, (2, n + 1))
    _, state = d.forward(w, cfg, jnp.asarray(toks[:, :n]), d.init_state(cfg, 2, sum(CHUNKS) + 4))
    _, state2 = d.forward(w, cfg, jnp.asarray(toks[:, n:]), state, lengths=jnp.asarray([1, 0], jnp.int32))
    for a, b in zip(jax.tree_util.tree_leaves(state.layers), jax.tree_util.tree_leaves(state2.layers)):
        np.testing.assert_array_equal(np.asarray(a)[1], np.asarray(b)[1])
    assert np.asarray(state2.pos).tolist() == [n + 1, n]


def test_prompt_longer_than_cache_is_a_clear_error(setup):
    cfg, w, rng, _ = setup
    with pytest.raises(ValueError, match="max_len=16"):
        d.forward(w, cfg, jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 17))), d.init_state(cfg, 1, 16))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        d.forward(w, cfg, jnp.asarray([[cfg.vocab_size]]), d.init_state(cfg, 1, 16))
    with pytest.raises(ValueError, match="batch 2"):
        d.forward(w, cfg, jnp.zeros((2, 3), jnp.int32), d.init_state(cfg, 1, 16))
