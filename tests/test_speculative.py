"""Speculative decoding with the MTP block (issue 13): the same tokens and the same state as plain decoding.

Oracle: plain greedy decoding, one token per ``forward`` call, with the MTP block run after every token on the
main model's final streams and the next token (``reference_prefill`` / ``reference_decode``); it records the whole
state after every token. The speculative state must equal the recorded one leaf by leaf, bit for bit (reference
numerics), at each row's own position, and the tokens must be identical. What is run:

* ``test_state_equals_plain_decoding_every_step``: a random config with window 8 and one layer of each kind, k=4,
  prompts ending early or just before position 128, so drafts cross window wraps and ratio-4 and ratio-128
  boundaries at every offset; checked after every loop iteration. One batch mixes a row drafting with the (random,
  hence useless) MTP block, a row whose draft is forced to agree with plain decoding and rows forced to disagree at
  a cycling draft position: the rows accept different counts in the same iteration and every rejection point is
  hit; the counts themselves are checked (agree: k+1 per step; disagree at draft j: j).
* ``test_rollback_equals_feeding_only_the_kept_tokens``: another shape (window 4 = the k=3 verify chunk, two CSA
  layers around an HCA one, narrower), the rollback alone for every kept count at every window phase around 128.
* ``test_golden_greedy_equals_plain``: the golden checkpoint through the public ``prefill`` / ``decode`` (the
  ``while_loop``), MTP drafts, k=1, a row stopping on a stop token; tokens and final state.
* ``test_sampling_distribution``: chi-square of the first four tokens' joint distribution against the exact one
  plain sampling draws from.
* argument errors before any compute.
Bit-for-bit equality with single-token decoding needs the model to compute a token the same way in a (k+1)-token
call as in a 1-token call; XLA does here (measured), but not for every shape, see the rollback test. Fixed seeds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv4_jax as d
from dsv4_jax import speculative as spec
from dsv4_jax.convert.synthetic import hf_config_dict, write_random_checkpoint
from dsv4_jax.errors import UserInputError
from dsv4_jax.generate import compiled_programs, decode, prefill, tokens
from dsv4_jax.sampling import SamplingConfig

SEED = 20261201
GREEDY = SamplingConfig.greedy()
CHUNKS = (64,)


def random_model(tmp_path_factory, seed: int, numerics: str = "reference", **fields):
    """A random checkpoint in the official format for ``hf_config_dict(**fields)``, loaded as the model loads one."""
    path = tmp_path_factory.mktemp("spec_ckpt")
    write_random_checkpoint(path, hf_config_dict(**fields), seed=seed)
    cfg = d.Config.from_pretrained(path, numerics=numerics)
    return cfg, d.load_weights(path, cfg)


def host(tree):
    """Every leaf of a pytree as a numpy array (the raw bits are compared)."""
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def bits(a: np.ndarray) -> np.ndarray:
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize]) if a.dtype.kind != "b" else a


def reference_prefill(cfg, w, prompts, max_len: int):
    """The prompts prefilled as ``generate`` does (chunks of ``CHUNKS``), the MTP block run over each chunk with the
    next prompt tokens and over the last prompt position with the greedy token 0: ``(state, token 0 [B])``."""
    from dsv4_jax.generate import chunk_plan

    B = len(prompts)
    lens = np.array([len(p) for p in prompts])
    state = d.init_state(cfg, B, max_len)
    first = np.zeros((B, cfg.vocab_size), np.float32)
    last_h = [None] * B
    start = 0
    for c in chunk_plan(int(lens.max()), CHUNKS):
        toks = np.zeros((B, c + 1), np.int32)
        for b, p in enumerate(prompts):
            seg = p[start:start + c + 1]
            toks[b, :len(seg)] = seg
        n = np.clip(lens - start, 0, c)
        logits, state, h = d.forward(w, cfg, jnp.asarray(toks[:, :c]), state, return_logits="last", lengths=n,
                                     return_hidden=True)
        _, state = d.mtp_forward(w, cfg, h, jnp.asarray(toks[:, 1:]), state, lengths=np.clip(lens - 1 - start, 0, c))
        for b in np.flatnonzero((lens > start) & (lens <= start + c)):
            first[b], last_h[b] = np.asarray(logits[b]), h[b, lens[b] - start - 1]
        start += c
    tok0 = first.argmax(-1).astype(np.int32)
    _, state = d.mtp_forward(w, cfg, jnp.stack(last_h)[:, None], jnp.asarray(tok0[:, None]), state,
                             return_logits="last")
    return state, tok0


def reference_decode(cfg, w, state, tok0, n_steps: int):
    """Plain greedy decoding from ``state`` (every row's next input ``tok0 [B]``): one token per ``forward`` call,
    each followed by the MTP block on the call's final streams and the greedy next token. Returns the tokens (token
    0 first, ``n_steps + 1`` per row) and the reference: ``(start positions, states)``, ``states[t]`` the host leaves
    after ``t`` steps (row ``b`` at position ``start_b + t``, ``pos == mtp_pos``)."""
    gen = [[int(t)] for t in np.asarray(tok0)]
    start, states = np.asarray(state.pos), [host(state)]
    for _ in range(n_steps):
        logits, state, h = d.forward(w, cfg, jnp.asarray([g[-1:] for g in gen]), state, return_logits="last",
                                     return_hidden=True)
        for g, t in zip(gen, np.asarray(jnp.argmax(logits, -1))):
            g.append(int(t))
        _, state = d.mtp_forward(w, cfg, h, jnp.asarray([g[-1:] for g in gen]), state, return_logits="last")
        states.append(host(state))
    return gen, (start, states)


def assert_rows_match(state, ref, what: str):
    """Every row of ``state`` equals, leaf by leaf and bit for bit, the reference state at that row's position
    (``ref`` = ``(start positions, states)`` of :func:`reference_decode`)."""
    start, ref_states = ref
    pos, mtp_pos = np.asarray(state.pos), np.asarray(state.mtp_pos)
    assert (pos == mtp_pos).all(), f"{what}: pos {pos} != mtp_pos {mtp_pos}"
    leaves = host(state)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    for b, p in enumerate(pos):
        for name, a, r in zip(paths, leaves, ref_states[p - start[b]]):
            assert np.array_equal(bits(a[b]), bits(r[b])), f"{what}: row {b} at position {p}: {name} differs"


# ------------------------------------------------------------------------------------------ exactness
# window 8, one layer of each kind (the demo model's), 4 drafts: verify chunks of 5 tokens
W8 = dict(num_hidden_layers=3, compress_ratios=[0, 4, 128], num_hash_layers=1, sliding_window=8, index_topk=4,
          vocab_size=64)
# window 4 = a 3-draft verify chunk, two CSA layers around an HCA one, a narrower model
W4 = dict(num_hidden_layers=3, compress_ratios=[4, 128, 4], num_hash_layers=0, sliding_window=4, index_topk=2,
          vocab_size=48, hidden_size=128, num_attention_heads=2, o_groups=2)
LENS = (5, 118, 123, 126, 127)  # rows: early positions, and drafts crossing 128 at every offset
NEW = 24
MISS = (-2, -1, 0, 1, 2)  # per row: MTP draft, forced agreement, forced disagreement cycling from offset 0, 1, 2


def test_state_equals_plain_decoding_every_step(tmp_path_factory):
    """k=4, window 8: after every speculative iteration, every row's state (main layers, MTP layer, positions)
    equals plain decoding's state at that row's position, bit for bit; the tokens are plain greedy decoding's; the
    rows accept the counts their drafts imply (forced agreement: k+1; disagreement at draft j: j), different ones
    in the same iteration."""
    k = 4
    cfg, w = random_model(tmp_path_factory, SEED, **W8)
    rng = np.random.default_rng(SEED)
    prompts = [[0] + rng.integers(2, cfg.vocab_size, n - 1).tolist() for n in LENS]
    max_len = 160
    state, tok0 = reference_prefill(cfg, w, prompts, max_len)
    want, ref = reference_decode(cfg, w, state, tok0, NEW - 1 + k)

    carry = prefill(w, cfg, prompts, NEW, GREEDY, max_len=max_len, stop_tokens=(), prefill_chunks=CHUNKS,
                    speculative=k)
    table = np.zeros((len(prompts), max_len), np.int32)
    for b, g in enumerate(want):
        table[b, :len(g)] = g
    carry = carry.replace(forced=spec.ForcedDraft(tokens=jnp.asarray(table), miss=jnp.asarray(MISS, jnp.int32)))
    assert_rows_match(carry.base.state, ref, "after prefill")
    got = [[] for _ in prompts]
    differ = 0
    while not bool(np.all(np.asarray(carry.base.done))):
        s = int(carry.base.step)
        active, n_acc = np.asarray(~carry.base.done), np.asarray(carry.n_accepted)
        carry, toks = spec.decode_scan(w, cfg, carry, n_steps=1)
        for b, row in enumerate(np.asarray(toks)):
            got[b] += [int(t) for t in row if t >= 0]
        assert_rows_match(carry.base.state, ref, f"iteration {s}")
        acc = np.asarray(carry.n_accepted) - n_acc  # accepted drafts + 1 per row in this iteration
        exp = {-1: k + 1, **{m: (s + m) % (k + 1) + 1 for m in MISS if m >= 0}}
        for b, m in enumerate(MISS):
            if active[b] and m in exp:
                assert acc[b] == exp[m], f"iteration {s}: row {b} (miss {m}) accepted {acc[b]}, expected {exp[m]}"
        differ += len(set(acc[active].tolist())) > 1
    assert differ >= 3, "the rows seldom accepted different counts in one iteration"
    out = tokens(carry)
    assert out == [g[:NEW] for g in want]
    assert [t[:1] + g for t, g in zip(out, got)] == out  # the stream gave the same tokens


def test_rollback_equals_feeding_only_the_kept_tokens(tmp_path_factory):
    """The rollback itself, k=3 on a window of 4 (a verify chunk rewrites the whole ring): from states at positions
    2 and 124..131 (every phase of the ratio-4 windows, chunks reaching or crossing 128), a verify chunk of 4 tokens
    rolled back to ``keep`` = 0..4 tokens (different per row) equals, leaf by leaf and bit for bit, the same call
    fed only the ``keep`` tokens (``lengths``). Compared with the same call, not with single-token calls: which
    rounding XLA picks for an fp32 product can depend on the number of tokens in the call (measured on this config:
    a one-ulp difference in an mHC output of a 4-token vs a 1-token forward, from ``forward`` alone), and that is
    the model's, not the rollback's."""
    from dsv4_jax.modeling.model import forward_layers
    from dsv4_jax.modeling.rollback import rollback, snapshot

    cfg, w = random_model(tmp_path_factory, SEED + 1, **W4)
    S, W = 4, cfg.window_size
    lens = np.array([2, 124, 125, 126, 127, 128, 129, 130, 131])
    B = len(lens)
    rng = np.random.default_rng(SEED + 1)
    toks = rng.integers(0, cfg.vocab_size, (B, 136)).astype(np.int32)
    state = d.init_state(cfg, B, 160)
    _, state = d.forward(w, cfg, jnp.asarray(toks), state, return_logits="none", lengths=lens)

    @jax.jit
    def verify_rollback(w, state, chunk, keep):
        logs = [snapshot(ls, state.pos, S, cfg.ratio(i), W) for i, ls in enumerate(state.layers)]
        _, new, xs = forward_layers(w, cfg, chunk, state, jnp.full_like(keep, S))
        layers = tuple(rollback(wl.attn, ls, log, x, state.pos, keep, cfg.ratio(i), W, cfg.kernels)
                       for i, (wl, ls, log, x) in enumerate(zip(w.layers, new.layers, logs, xs)))
        return new.replace(pos=state.pos + keep, layers=layers)

    kept = jax.jit(lambda w, state, chunk, keep: forward_layers(w, cfg, chunk, state, keep)[1])
    for shift in range(S + 1):
        keep = jnp.asarray((np.arange(B) + shift) % (S + 1), jnp.int32)
        chunk = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, S)), jnp.int32)
        got, want = host(verify_rollback(w, state, chunk, keep)), host(kept(w, state, chunk, keep))
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
        for name, a, r in zip(paths, got, want):
            assert np.array_equal(bits(a), bits(r)), f"keep {np.asarray(keep).tolist()}: {name} differs"


def test_golden_greedy_equals_plain(golden_dir):
    """The golden checkpoint, MTP drafts, k=1, the public ``prefill`` + ``decode`` (one ``while_loop``): the tokens
    of plain greedy decoding from the same prefill and, at the end, its state at each row's position, bit for bit.
    Row 0 meets a stop token (its 7th token) and stops there, the others run on (one crosses position 128)."""
    cfg = d.Config.from_pretrained(golden_dir / "ckpt")
    w = d.load_weights(golden_dir / "ckpt", cfg)
    prompts = [np.load(golden_dir / "cases" / f"b1_len{n:03d}.npz")["prompt_tokens"][0].tolist()
               for n in (115, 9, 37, 3)]
    new = 24
    carry = prefill(w, cfg, prompts, new, GREEDY, max_len=160, stop_tokens=(), prefill_chunks=CHUNKS, speculative=1)
    want, ref = reference_decode(cfg, w, carry.base.state, carry.base.last, new - 1)
    stop = want[0][6]
    assert stop not in [g[0] for g in want] and stop not in want[0][:6]
    want = [g[:g.index(stop) + 1] if stop in g else g for g in want]  # greedy: stopping = cutting the sequence
    stops = np.full(carry.base.stop.shape, -1, np.int32)
    stops[0] = stop
    carry = decode(w, cfg, carry.replace(base=carry.base.replace(stop=jnp.asarray(stops))))
    assert tokens(carry) == want
    assert np.asarray(carry.base.state.pos).tolist() == [len(p) + len(g) - 1 for p, g in zip(prompts, want)]
    assert_rows_match(carry.base.state, ref, "golden, end")
    st = spec.stats(carry)
    assert st["k"] == 1 and 1.0 <= st["mean_accepted_length"] <= 2.0 and sum(st["verify_steps"]) >= new - 1


# ------------------------------------------------------------------------------------------ sampling
def _chi2(counts: np.ndarray, probs: np.ndarray) -> tuple[float, float, int]:
    """Pearson's chi-square of ``counts`` against ``probs`` (same shape), the cells expected below 5 pooled into one:
    ``(statistic, p-value, cells)``. A sample in a cell of probability 0 fails outright (returns p = 0)."""
    n = counts.sum()
    c, e = counts.ravel(), probs.ravel() * n
    if c[probs.ravel() == 0].sum():
        return np.inf, 0.0, 0
    big = e >= 5
    obs, exp = np.append(c[big], c[~big].sum()), np.append(e[big], e[~big].sum())
    stat = float(((obs - exp) ** 2 / exp).sum())
    return stat, float(jax.scipy.special.gammaincc((len(obs) - 1) / 2, stat / 2)), len(obs)  # chi2 survival


def test_sampling_distribution(tmp_path_factory):
    """Speculative sampling (k=2, MTP drafts) draws the first four tokens from exactly plain sampling's distribution.

    A one-layer random model with 8 tokens; 4096 rows of one prompt, each with its own seed, give 4096 independent
    samples of ``(t0, t1, t2, t3)``: token 0 from the prefill, then draft/verify iterations. At T 1 the random
    MTP's drafts are accepted about a fifth of the time (~1.3 tokens per iteration), so acceptance, rejection with
    the residual draw and the bonus token after two acceptances all occur; with the filters only ~2 % are. The
    exact joint distribution of plain sampling is the product of the model's conditionals, from one teacher-forced
    forward over all 512 prefixes ``(t0, t1, t2)``, through :func:`dsv4_jax.sampling.distribution` (temperature,
    top-k, top-p as in sampling).

    Pearson's chi-square over the 4096 cells (those expected below 5 pooled: ~120 cells) must have p >= 1e-3:
    the seeds are fixed, so the test is deterministic, and a correct implementation would fail it for only 0.1 % of
    seed choices. Power: the same samples against the temperature-1.15 distribution give p < 1e-20 (asserted
    below), and drawing the corrected token from p instead of ``max(p - q, 0)`` (a classic bug) gave p ~ 1e-130.
    Run twice: the release's sampling (T 1, no filter) and T 0.8 with top-k 6 and top-p 0.9.
    """
    from dsv4_jax.sampling import distribution

    V, N, k = 8, 4096, 2
    cfg, w = random_model(tmp_path_factory, 5, numerics="float32", num_hidden_layers=1, compress_ratios=[0],
                          num_hash_layers=0, sliding_window=8, vocab_size=V)
    prompt = [0, 3, 5, 2, 7, 4]
    L = len(prompt)
    grid = np.stack(np.meshgrid(*[np.arange(V)] * 3, indexing="ij"), -1).reshape(-1, 3)  # [512, 3] = (t0, t1, t2)
    seqs = np.concatenate([np.tile(prompt, (len(grid), 1)), grid], 1).astype(np.int32)
    logits, _ = d.forward(w, cfg, jnp.asarray(seqs), d.init_state(cfg, len(grid), 16))
    logits = np.asarray(logits)  # [512, L+3, V]

    def joint(t, top_k, top_p):
        def p(x):
            return np.asarray(distribution(jnp.asarray(x.reshape(-1, V)), t, top_k, top_p)).reshape(x.shape)

        p0, p1 = p(logits[0, L - 1]), p(logits[::V * V, L])  # [V], [V(t0), V]
        p2, p3 = p(logits[::V, L + 1]).reshape(V, V, V), p(logits[:, L + 2]).reshape(V, V, V, V)
        return p0[:, None, None, None] * p1[:, :, None, None] * p2[..., None] * p3

    for t, top_k, top_p, acc in ((1.0, 0, 1.0, 1.15), (0.8, 6, 0.9, 1.01)):
        st: dict = {}
        out = d.generate(w, cfg, [prompt] * N, 4, SamplingConfig(temperature=t, top_k=top_k, top_p=top_p),
                         seed=list(range(N)), max_len=16, stop_tokens=(), prefill_chunks=(8,), speculative=k, stats=st)
        counts = np.zeros((V,) * 4)
        np.add.at(counts, tuple(np.asarray(out).T), 1)
        stat, pval, cells = _chi2(counts, joint(t, top_k, top_p))
        assert pval >= 1e-3, f"T={t} top-k {top_k} top-p {top_p}: chi2 {stat:.1f} over {cells} cells, p={pval:.2g}"
        assert acc <= st["mean_accepted_length"] <= 2.5, st["mean_accepted_length"]  # some drafts were accepted
        if t == 1.0:
            assert _chi2(counts, joint(1.15, 0, 1.0))[1] < 1e-20  # the test can tell a 15 % temperature change


# ------------------------------------------------------------------------------------------ errors
def test_errors_before_compute(tmp_path_factory):
    cfg, w = random_model(tmp_path_factory, SEED, numerics="float32", **W4)
    before = compiled_programs()
    cases = [
        (dict(speculative=5), "speculative=5 must be an int in 1..4"),
        (dict(speculative=-1), "speculative=-1 must be an int in 1..4"),
        (dict(speculative=True), "speculative=True must be an int"),
        (dict(speculative=2.0), "speculative=2.0 must be an int"),
        (dict(speculative=4), "verifies 5 tokens at once, more than the window .window_size=4."),
        (dict(speculative=3, max_len=30), r"row 0 needs 20 prompt \+ 9 new tokens \+ 2 positions that speculative "
                                          r"decoding verifies past them = 31 > max_len=30; lower max_new_tokens to 8"),
    ]
    for kw, msg in cases:
        with pytest.raises(UserInputError, match=msg):
            d.generate(w, cfg, [[0] * 20], 9, GREEDY, **{"max_len": 64, **kw})
    with pytest.raises(UserInputError, match="speculative=7"):
        next(d.generate_stream(w, cfg, [[0] * 20], 9, GREEDY, speculative=7))
    no_mtp = cfg.with_(n_mtp_layers=0, compress_ratios=cfg.compress_ratios[:-1])
    with pytest.raises(UserInputError, match="drafts with the MTP block, but this model has none"):
        d.generate(w, no_mtp, [[0] * 20], 9, GREEDY, speculative=1)
    assert compiled_programs() == before  # nothing compiled


def test_cli(tmp_path_factory, capsys, monkeypatch):
    """``scripts/generate.py --speculative K``: range and fit errors before anything is loaded (exit 2, naming the
    argument), and the mean accepted length printed after the run (generation itself faked: nothing compiles)."""
    import importlib.util
    from pathlib import Path

    spec_ = importlib.util.spec_from_file_location("dsv4_generate_cli_spec", Path(__file__).parents[1] / "scripts"
                                                   / "generate.py")
    cli = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(cli)
    ckpt = tmp_path_factory.mktemp("cli") / "w4"
    write_random_checkpoint(ckpt, hf_config_dict(**W4), seed=0)

    def run(*argv):
        try:
            code = cli.main([str(a) for a in argv], setup_cache=False)
        except SystemExit as e:  # argparse
            code = e.code
        return code, capsys.readouterr()

    code, out = run("--ckpt", ckpt, "--speculative", "5")
    assert code == 2 and "--speculative must be an int in 0..4 (0 = off)" in out.err
    code, out = run("--ckpt", ckpt, "--speculative", "4", "--prompt", "0 1 2")
    assert code == 2 and "more than the window (window_size=4)" in out.err
    code, out = run("--ckpt", ckpt, "--speculative", "3", "--prompt", "0 1 2", "--max-new-tokens", "10",
                    "--max-len", "14")
    assert code == 2 and ("--prompt: 3 prompt tokens + --max-new-tokens 10 + 2 positions --speculative 3 verifies "
                          "past them = 15 exceeds --max-len 14; lower --max-new-tokens to 9") in out.err, out.err

    def fake(weights, cfg, prompts, n, sampling, *, speculative, stats, **kw):
        assert speculative == 3 and kw["max_len"] >= len(prompts[0]) + n + 2
        yield [[5] for _ in prompts]
        yield [[6, 7, 8] for _ in prompts]
        stats.update(k=3, mean_accepted_length=2.5, verify_steps=[2])

    monkeypatch.setattr(cli.d, "generate_stream", fake)
    code, out = run("--ckpt", ckpt, "--speculative", "3", "--prompt", "0 1 2", "--max-new-tokens", "4")
    assert code == 0 and "5 6 7 8" in out.out
    assert "speculative 3: mean accepted length 2.50 tokens per verify step (accepted drafts + 1, at most 4) over 2 " \
           "steps" in out.err, out.err
