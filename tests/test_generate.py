"""Generation: greedy == teacher-forced argmax, uneven batches == rows alone, done rows frozen, while_loop == stream,
bounded compiled programs, errors before compute, the golden first token, the CLI and the notebook.

The model is the built-in tiny random model (``demo_model``: window 8, ratio-4 and ratio-128 layers, float32), weights
and prompts from the fixed seed ``SEED`` (so a CI failure reproduces; ``DSV4_TEST_SEED`` picks another one). All
tests use the same shapes (batch 1 or 3, max_len 256, prefill chunks 16 and 64, 7 steps per stream call) so the
compiled programs are shared. Oracles: the teacher-forced ``forward``
for greedy tokens, the same row generated alone for batches, the while_loop for the stream.
In float32 the batch / chunk shapes only change fp32 summation orders (~1e-6 relative), so tokens agree exactly
unless two logits tie within that; the teacher-forced check tolerates a single such near-tie per row.
"""

import contextlib
import io
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

import dsv4_jax as d
from dsv4_jax.generate import (
    PAD,
    bucket_len,
    chunk_plan,
    compiled_programs,
    decode,
    demo_model,
    max_programs,
    prefill,
    tokens,
)
from dsv4_jax.sampling import SamplingConfig

REPO = Path(__file__).resolve().parents[1]
CHUNKS = (64,)  # one prefill program per batch size (the notebook and CLI defaults give the same plans here)
MAX_LEN = 256
LENS = (3, 21, 100)  # prefill plan 64+64 (batch) | 64 | 64 | 64+64: prompts end mid-chunk, in different chunks
NEW = 40  # crosses window slots, many ratio-4 blocks, and position 128 (first ratio-128 entry) for the 100 row
STEPS = 7
ORACLE_S = 160
GREEDY = SamplingConfig.greedy()
SEED = int(os.environ.get("DSV4_TEST_SEED", "20261129"))


@pytest.fixture(scope="module")
def model():
    seed = SEED
    cfg, w = demo_model(seed=seed)
    rng = np.random.default_rng(seed)
    prompts = [[cfg.bos_token_id] + rng.integers(2, cfg.vocab_size, n - 1).tolist() for n in LENS]
    return cfg, w, prompts, seed


def gen(model, prompts, new=NEW, sampling=GREEDY, **kw):
    cfg, w, _, _ = model
    kw = {"max_len": MAX_LEN, "stop_tokens": (), "prefill_chunks": CHUNKS, **kw}
    return d.generate(w, cfg, prompts, new, sampling, **kw)


@pytest.fixture(scope="module")
def alone(model):
    """Every prompt generated on its own (batch 1), greedy, no early stop."""
    return [gen(model, [p])[0] for p in model[2]]


def test_greedy_equals_teacher_forced_argmax(model, alone):
    cfg, w, prompts, seed = model
    for b, (p, g) in enumerate(zip(prompts, alone)):
        assert len(g) == NEW
        seq = p + g
        toks = np.zeros((1, ORACLE_S), np.int32)
        toks[0, :len(seq)] = seq
        logits, _ = d.forward(w, cfg, toks, d.init_state(cfg, 1, ORACLE_S), lengths=np.array([len(seq)]))
        lg = np.asarray(logits[0, len(p) - 1:len(seq) - 1])  # [NEW, V]: the predictions of g
        bad = np.flatnonzero(lg.argmax(-1) != np.array(g))
        gaps = [float(lg[t].max() - lg[t, g[t]]) for t in bad]
        assert len(bad) <= 1 and all(gap <= 1e-4 * np.abs(lg[t]).max() for t, gap in zip(bad, gaps)), (
            f"seed {seed}: row {b} (prompt {len(p)}) differs from the teacher-forced argmax at steps {bad.tolist()} "
            f"(logit gaps {gaps})")


def test_uneven_batch_equals_rows_alone(model, alone):
    cfg, w, prompts, seed = model
    assert gen(model, prompts) == alone, f"seed {seed}"
    # sampling too: per-row seeds make each row's stream independent of the batch
    sampling = SamplingConfig(temperature=0.9, top_p=0.95)
    seeds = [seed + b for b in range(len(prompts))]
    batch = gen(model, prompts, sampling=sampling, seed=seeds)
    for b, p in enumerate(prompts):
        assert batch[b] == gen(model, [p], sampling=sampling, seed=[seeds[b]])[0], f"seed {seed}: row {b}"


def test_done_rows_stop_changing(model, alone):
    """Row 0 stops on a stop token while the others go on: its tokens, position and caches stay as when it stopped
    (equal to the same row run alone with the same stop token); unused output slots stay PAD."""
    cfg, w, prompts, seed = model
    stop = alone[0][4]
    want = [g[:g.index(stop) + 1] if stop in g else g for g in alone]  # greedy: stopping = cutting the sequence
    kw = dict(max_len=MAX_LEN, stop_tokens=(stop,), prefill_chunks=CHUNKS)
    carry = decode(w, cfg, prefill(w, cfg, prompts, NEW, GREEDY, **kw))
    assert tokens(carry) == want, f"seed {seed}"
    out, n_out = np.asarray(carry.out), np.asarray(carry.n_out)
    assert all((out[b, n:] == PAD).all() for b, n in enumerate(n_out))
    assert np.asarray(carry.state.pos).tolist() == [len(p) + len(g) - 1 for p, g in zip(prompts, want)]
    solo = decode(w, cfg, prefill(w, cfg, prompts[:1], NEW, GREEDY, **kw))
    assert tokens(solo) == want[:1]
    for a, s in zip(jax.tree_util.tree_leaves(carry.state.layers), jax.tree_util.tree_leaves(solo.state.layers)):
        a, s = np.asarray(a[0], np.float32), np.asarray(s[0], np.float32)
        assert np.array_equal(np.isinf(a), np.isinf(s))
        fin = np.isfinite(s)
        np.testing.assert_allclose(a[fin], s[fin], rtol=1e-4, atol=1e-5, err_msg=f"seed {seed}")


@pytest.mark.parametrize("sampling", [GREEDY, SamplingConfig()], ids=["greedy", "gumbel"])
def test_stream_equals_while_loop(model, alone, sampling):
    cfg, w, prompts, seed = model
    kw = dict(max_len=MAX_LEN, stop_tokens=(cfg.eos_token_id, alone[0][6]), prefill_chunks=CHUNKS, seed=seed)
    full = d.generate(w, cfg, prompts, NEW, sampling, **kw)
    items = list(d.generate_stream(w, cfg, prompts, NEW, sampling, steps_per_call=STEPS, **kw))
    assert [len(r) for r in items[0]] == [1, 1, 1]  # token 0 right after prefill
    assert all(len(r) <= STEPS for item in items[1:] for r in item)
    assert [sum((item[b] for item in items), []) for b in range(len(prompts))] == full, f"seed {seed}"
    # reproducible from the seed
    assert d.generate(w, cfg, prompts, NEW, sampling, **kw) == full


def test_compiled_programs_bounded_over_prompt_lengths(model):
    """Prompts of many lengths (1 to 80 tokens: one and two chunks, each side of the chunk size) compile at most one
    program per chunk size, plus state, start and the loop (and test_chunk_plan shows that plans only use the given
    sizes). A program that depended on the prompt length would compile again for each of the 14 lengths."""
    cfg, w, _, seed = model
    rng = np.random.default_rng(seed)
    gen(model, [[0]], new=2)  # warm (whatever this worker compiled before)
    before = compiled_programs()
    for n in (1, 2, 3, 7, 16, 31, 33, 62, 63, 64, 65, 66, 79, 80):
        out = gen(model, [rng.integers(0, cfg.vocab_size, n).tolist()], new=2)
        assert len(out[0]) == 2
    new = {k: v - before.get(k, 0) for k, v in compiled_programs().items()}
    assert new.get("prefill", 0) <= len(CHUNKS) and sum(new.values()) <= max_programs(len(CHUNKS)), new
    # the default cache length is bucketed: few distinct state shapes for any request size
    sizes = {bucket_len(n) for n in range(1, 200_000)}
    assert len(sizes) <= 7 + 200_000 // 8192 + 1 and all(bucket_len(n) >= n for n in (1, 127, 128, 129, 8193, 199_999))


def test_chunk_plan():
    for chunks in (CHUNKS, (16, 64, 256, 1024), (7,)):
        for n in range(1, 3000):
            plan = chunk_plan(n, chunks)
            assert set(plan) <= set(chunks) and sum(plan[:-1]) < n <= sum(plan)  # no empty chunk, all covered
            assert sum(plan) <= max(2 * n, min(chunks) + n - 1)  # padding at most doubles the work
            assert len(plan) <= n // max(chunks) + 2 * len(chunks)
    assert chunk_plan(300, (16, 64, 256, 1024)) == [256, 64] and chunk_plan(1000, (16, 64, 256, 1024)) == [1024]


def test_errors_before_compute(model):
    cfg, w, _, _ = model
    before = compiled_programs()
    V = cfg.vocab_size
    cases = [
        ([[0] * 300], 1, "row 0 has a 300-token prompt, longer than the cache .max_len=256."),
        ([[0, 5], [0] * 250], 10, "row 1 needs 250 prompt . 10 new tokens = 260 > max_len=256"),
        ([[0], []], 4, "row 1 has an empty prompt"),
        ([[0, 3], [0, V]], 4, f"row 1 has token id {V} at position 1, outside the vocabulary"),
        ([[-1]], 4, "row 0 has token id -1"),
        ([], 4, "non-empty list"),
        ([1, 2, 3], 4, "row 0 is 1"),
        ([[0]], 0, "max_new_tokens=0"),
    ]
    for prompts, new, msg in cases:
        with pytest.raises(ValueError, match=msg):
            d.generate(w, cfg, prompts, new, GREEDY, max_len=MAX_LEN)
    with pytest.raises(ValueError, match="steps_per_call"):
        next(d.generate_stream(w, cfg, [[0]], 4, steps_per_call=0))
    with pytest.raises(ValueError, match="sampling must be a SamplingConfig"):
        d.generate(w, cfg, [[0]], 4, {"temperature": 0})
    assert compiled_programs() == before


def test_golden_first_token(golden_dir):
    """The official checkpoint's first generated token (greedy) against the golden prefill logits, with the golden
    README's recalibrated criteria (the model is chaotic at the bit level: an fp32 summation order that differs by
    CPU, XLA version or padding moves end-to-end logits by up to ~0.35 per case even in the official code itself).

    * every token's golden logit is within 0.7 of the golden maximum: if each logit moved by at most the per-case
      gross bound 0.35, the chosen token can trail the true maximum by at most twice that;
    * where the golden top-2 gap is at least 0.1 (5 of the 7 cases), the token is the golden argmax in at least 4:
      the pooled argmax-agreement bound 0.78 applied to these 5 cases (0.78 x 5 = 3.9).
    """
    cfg = d.Config.from_pretrained(golden_dir / "ckpt", cpu_rsqrt_tail=True)
    w = d.load_weights(golden_dir / "ckpt", cfg)
    n_exact, n_clear = 0, 0
    for f in sorted((golden_dir / "cases").glob("b1_len???.npz")):
        z = np.load(f)
        gold = z["prefill_logits"][0]
        top2 = np.sort(gold)[-2:]
        out = d.generate(w, cfg, z["prompt_tokens"].tolist(), 1, GREEDY, max_len=512, prefill_chunks=(64,))
        assert len(out) == 1 and len(out[0]) == 1
        tok = out[0][0]
        assert gold.max() - gold[tok] <= 0.7, f"{f.name}: token {tok} trails the golden max by {gold.max() - gold[tok]}"
        if top2[1] - top2[0] >= 0.1:
            n_clear += 1
            n_exact += tok == int(z["prefill_argmax"][0])
    assert n_clear == 5 and n_exact >= 4, f"golden argmax on {n_exact} of {n_clear} clear cases"


def test_notebook_runs():
    """Execute ``examples/notebook.ipynb`` cell by cell in one namespace (its cells assert what they show)."""
    nb = json.loads((REPO / "examples" / "notebook.ipynb").read_text())
    ns: dict = {"__name__": "__notebook__"}
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 4
    for i, cell in enumerate(cells):
        src = "".join(cell["source"])
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(src, f"notebook cell {i}", "exec"), ns)
