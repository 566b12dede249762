"""Sampling: the drawn distribution (chi-square against a numpy oracle), greedy rows, reproducibility, config.

Every distribution test draws N samples of one row from random logits over a tiny vocabulary and compares the
counts with the oracle distribution (temperature, then top-k, then top-p on the renormalised rest, computed
independently in numpy). Seeds are fixed (one per case, listed with the cases), so a failure reproduces. Tokens the
oracle excludes must never be drawn. The p-value threshold 1e-4 would make a false failure about 1 in 10,000 per
seed drawn at random (the fixed seeds pass), while a wrong temperature, order of filters or noise gives p ~ 0; a
negative control checks that the same test rejects a slightly wrong distribution.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.sampling import SamplingConfig, row_keys, sample, step_keys

V, N = 8, 40_000
B = 6  # batch of the row-level tests
P_MIN = 1e-4
_sample = jax.jit(sample, static_argnames="method")


def oracle(logits: np.ndarray, t: float, k: int, p: float) -> np.ndarray:
    """Reference probabilities in float64: softmax(logits / t), keep top-k, then the smallest top-p set."""
    z = logits.astype(np.float64) / t
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    keep[order[: (k or len(z))]] = True
    q = np.where(keep, np.exp(z - z.max()), 0.0)
    q /= q.sum()
    before = np.cumsum(q[order]) - q[order]  # mass of the more likely tokens
    keep[order[before >= p]] = False
    q = np.where(keep, q, 0.0)
    return q / q.sum()


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Upper tail of the chi-square statistic over the tokens with probability > 0 (df = their number - 1)."""
    m = probs > 0
    exp = probs[m] * counts.sum()
    stat = float(((counts[m] - exp) ** 2 / exp).sum())
    df = int(m.sum()) - 1
    if df == 0:
        return 1.0
    return float(jax.scipy.special.gammaincc(df / 2, stat / 2))


def draw(logits: np.ndarray, cfg: SamplingConfig, seed: int) -> np.ndarray:
    keys = step_keys(row_keys(seed, N), jnp.int32(0))
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (N, V))
    toks = _sample(batch, keys, *cfg.row_params(N), method=cfg.method)
    return np.bincount(np.asarray(toks), minlength=V)


def _logits(rng, t, k, p):
    """Random logits whose top-p cut is not within 1e-3 of a cumulative-mass boundary (no fp32 ambiguity)."""
    while True:
        x = rng.normal(0, 1.2, V)
        q = np.sort(oracle(x, t, k, 1.0))[::-1]
        if p == 1.0 or np.min(np.abs(np.cumsum(q)[:-1] - p)) > 1e-3:
            return x


CASES = [
    SamplingConfig(),  # the release defaults: Gumbel-max at T = 1
    SamplingConfig(temperature=0.5),
    SamplingConfig(temperature=2.0, top_k=3),
    SamplingConfig(temperature=1.0, top_p=0.7),
    SamplingConfig(temperature=0.8, top_k=5, top_p=0.9),
    SamplingConfig(temperature=1.3, method="categorical"),
    SamplingConfig(temperature=0.7, top_k=4, top_p=0.8, method="categorical"),
]


SEEDS = [101, 102, 103, 104, 105, 106, 107]  # one fixed seed per case (logits and sampling keys)


@pytest.mark.parametrize("cfg,seed", list(zip(CASES, SEEDS, strict=True)),
                         ids=[f"T{c.temperature}-k{c.top_k}-p{c.top_p}-{c.method}" for c in CASES])
def test_distribution_chi_square(cfg, seed):
    rng = np.random.default_rng(seed)
    logits = _logits(rng, cfg.temperature, cfg.top_k, cfg.top_p)
    probs = oracle(logits, cfg.temperature, cfg.top_k, cfg.top_p)
    counts = draw(logits, cfg, seed)
    assert counts[probs == 0].sum() == 0, f"seed {seed}: drew excluded tokens {counts} vs {probs}"
    if cfg.top_k:
        assert (probs > 0).sum() <= cfg.top_k
    pv = chi2_pvalue(counts, probs)
    assert pv > P_MIN, f"seed {seed}: chi-square p={pv:.2e}, counts {counts.tolist()} vs expected {probs * N}"


def test_chi_square_rejects_a_wrong_distribution():
    """Negative control: samples at T=1 are rejected against the T=0.8 distribution (the test has power)."""
    seed = 201
    logits = np.random.default_rng(seed).normal(0, 1.2, V)
    counts = draw(logits, SamplingConfig(temperature=1.0), seed)
    assert chi2_pvalue(counts, oracle(logits, 0.8, 0, 1.0)) < 1e-6, f"seed {seed}"
    assert chi2_pvalue(counts, oracle(logits, 1.0, 0, 1.0)) > P_MIN, f"seed {seed}"


def test_greedy_rows_and_per_row_parameters():
    """Temperature 0 is the argmax (first index on ties); rows of one batch can mix greedy and sampled."""
    seed = 301
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (B, 50)).astype(np.float32)
    logits[5, [7, 9]] = logits[5].max() + 1  # a tie: argmax takes the first
    temp = np.array([0, 0, 1.0, 0, 0.5, 0], np.float32)
    keys = step_keys(row_keys(seed, B), jnp.int32(3))
    got = np.asarray(_sample(jnp.asarray(logits), keys, temp, np.zeros(B, np.int32), np.ones(B, np.float32)))
    greedy = temp == 0
    np.testing.assert_array_equal(got[greedy], logits.argmax(-1)[greedy])
    assert got[5] == 7
    # top_k=1 or a tiny top_p make any temperature greedy
    for k, p in ((1, 1.0), (0, 1e-6)):
        got = _sample(jnp.asarray(logits), keys, np.full(B, 2.0, np.float32), np.full(B, k, np.int32),
                      np.full(B, p, np.float32))
        np.testing.assert_array_equal(np.asarray(got)[:5], logits.argmax(-1)[:5])


def test_reproducible_and_independent_of_the_batch():
    """Same keys -> same tokens; a row's draw depends on its own key and logits only, not on the other rows."""
    seed = 401
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1, (B, 50)).astype(np.float32)
    args = (np.ones(B, np.float32), np.zeros(B, np.int32), np.full(B, 0.95, np.float32))
    for method in ("gumbel", "categorical"):
        seeds = [seed + b for b in range(B)]
        keys = step_keys(row_keys(seeds, B), jnp.int32(5))
        a = np.asarray(_sample(logits, keys, *args, method=method))
        np.testing.assert_array_equal(a, _sample(logits, keys, *args, method=method))
        # row 2 moved to row 0 of a batch with other neighbours draws the same token
        other = rng.normal(0, 1, (B, 50)).astype(np.float32)
        other[0] = logits[2]
        keys2 = step_keys(row_keys([seeds[2]] + [seed + 100 + b for b in range(B - 1)], B), jnp.int32(5))
        assert int(_sample(other, keys2, *args, method=method)[0]) == a[2], f"seed {seed}"
        steps = [np.stack([_sample(logits, step_keys(row_keys(sd, B), jnp.int32(s)), *args, method=method)
                           for s in range(4)]) for sd in (seed, seed + 1)]
        assert not np.array_equal(*steps), f"seed {seed}: the seed does not change the draws"


def test_row_keys():
    a = row_keys(7, 3)
    np.testing.assert_array_equal(jax.random.key_data(a[1]),
                                  jax.random.key_data(jax.random.fold_in(jax.random.key(7), 1)))
    b = row_keys([7, 8, 9], 3)
    np.testing.assert_array_equal(jax.random.key_data(b[2]), jax.random.key_data(jax.random.key(9)))
    with pytest.raises(ValueError, match="2 per-row seeds for 3 rows"):
        row_keys([1, 2], 3)


def test_sampling_config(tmp_path, golden_dir):
    g = SamplingConfig.from_generation_config(golden_dir / "ckpt")  # bos 0, eos 1, T 1.0, top_p 1.0, do_sample
    assert g == SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, method="gumbel") == SamplingConfig()
    f = tmp_path / "generation_config.json"
    f.write_text(json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 20}))
    assert SamplingConfig.from_generation_config(tmp_path) == SamplingConfig(0.6, 20, 0.95)
    assert SamplingConfig.from_generation_config(f, top_p=0.5, top_k=None).top_p == 0.5  # overrides win, None kept
    f.write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert SamplingConfig.from_generation_config(f).is_greedy
    assert SamplingConfig.from_generation_config(tmp_path / "missing") == SamplingConfig()
    assert SamplingConfig.greedy().is_greedy and hash(SamplingConfig()) == hash(SamplingConfig())
    for bad in (dict(temperature=-1), dict(top_k=-2), dict(top_k=1.5), dict(top_p=0), dict(top_p=1.5),
                dict(method="beam")):
        with pytest.raises(ValueError, match="SamplingConfig"):
            SamplingConfig(**bad)
    f.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SamplingConfig.from_generation_config(f)
