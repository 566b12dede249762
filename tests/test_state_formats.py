"""The decode-state caches in their snapped formats (issue 12): the same numbers as bf16 caches at half the bytes.

Where the config snaps them (reference numerics), the KV ring and compressed KV are stored as e4m3 codes + one e8m0
byte per 64 nope dims + bf16 RoPE dims (``Fp8Cache``), the indexer keys as packed e2m1 + e8m0 per 32
(``Fp4Tensor``). What is asserted:
  * decoding the codes gives back the simulations' values bit for bit (``fp8_simulate`` / ``fp4_simulate``, i.e.
    what the caches held before), on edge cases: zero and -0 blocks, amax below the scale floors, saturation, ties;
  * prefill + decode (chunked, uneven rows, MTP) computes the same logits, bit for bit, with snapped caches as with
    plain bf16 caches (``init_state(..., snapped=False)``, which holds the decoded values: the layout before), on the
    golden checkpoint and on a random model; the decoded caches equal the plain ones, and re-snapping
    them changes nothing;
  * a V4-Flash state for 2**20 tokens (main and MTP layers) takes at most 3,600 bytes per token, V4-Pro 5,200.
(The logits were also compared with the pre-change code, bit for bit; that needs the old tree, so it is not here.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_weights

import dsv4_jax as d
from dsv4_jax.modeling.quant import (
    Fp4Tensor,
    Fp8Cache,
    cache_values,
    encode_fp4_cache,
    encode_fp8_cache,
    fp4_simulate,
    fp8_simulate,
)
from dsv4_jax.modeling.state import LayerState, state_bytes, state_bytes_by_leaf

SEED = 20261129
CACHES = ("kv", "ckv", "ikv")


def bits(a) -> np.ndarray:
    """The raw bits of an array (so -0 vs 0 and NaN payloads count as differences)."""
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def hard_values(rng, shape) -> jax.Array:
    """bf16 rows over 50 binades with the corner cases of the snaps in some blocks."""
    x = rng.standard_normal(shape).astype(np.float32) * np.exp2(rng.integers(-40, 12, (shape[0], 1)))
    x[0, :64] = 0.0  # all-zero block: the scale floor
    x[1, :64] = -0.0
    x[2, :] = 1e-7 * rng.standard_normal(shape[1])  # amax below the FP8 floor (1e-4)
    x[3, :] = 1e-38 * rng.standard_normal(shape[1])  # FP4 scale at its floor 2**-126: denormal products
    x[4, :64] = np.linspace(-448, 448, 64)  # saturation edge, scale 1
    x[5, :32] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4  # e2m1 midpoints (ties to even), amax 6
    x[6, :64] = np.tile([1.0625, 1.1875, -1.1875, 448.0], 16)  # e4m3 ties
    return jnp.asarray(x, jnp.bfloat16)


def test_fp8_cache_decodes_to_the_fp8_simulation():
    x = hard_values(np.random.default_rng(SEED), (64, 512))  # [N, Dh] with Dn = 448
    c = encode_fp8_cache(x, 448)
    assert (c.codes.dtype, c.codes.shape, c.scales.dtype, c.scales.shape, c.rope.shape) == (
        jnp.float8_e4m3fn, (64, 448), jnp.uint8, (64, 7), (64, 64))
    want = jnp.concatenate([fp8_simulate(x[:, :448], 64), x[:, 448:]], axis=-1)
    np.testing.assert_array_equal(bits(c.decode(jnp.bfloat16)), bits(want))
    np.testing.assert_array_equal(bits(encode_fp8_cache(want, 448).decode(jnp.bfloat16)), bits(want))  # idempotent


def test_fp4_cache_decodes_to_the_fp4_simulation():
    x = hard_values(np.random.default_rng(SEED + 1), (64, 128))
    c = encode_fp4_cache(x)
    assert (c.packed.dtype, c.packed.shape, c.scale.dtype, c.scale.shape) == (jnp.uint8, (64, 64), jnp.uint8, (64, 4))
    want = fp4_simulate(x, 32)
    np.testing.assert_array_equal(bits(cache_values(c, jnp.bfloat16)), bits(want))
    np.testing.assert_array_equal(bits(cache_values(encode_fp4_cache(want), jnp.bfloat16)), bits(want))


def test_cache_layout_follows_the_numerics():
    """Snapped where the config snaps: KV in the current release's reference numerics only (the initial release does
    not snap the KV), indexer keys in reference numerics; float32 numerics keep plain float caches."""
    kinds = {}
    for numerics, release in (("reference", "current"), ("reference", "initial"), ("float32", "current")):
        ls = d.init_state(d.Config.tiny(numerics=numerics, release=release), 1, 64).layers[1]  # a CSA layer
        kinds[numerics, release] = tuple(type(getattr(ls, f)).__name__ if not isinstance(getattr(ls, f), jax.Array)
                                         else str(getattr(ls, f).dtype) for f in CACHES)
    assert kinds == {("reference", "current"): ("Fp8Cache", "Fp8Cache", "Fp4Tensor"),
                     ("reference", "initial"): ("bfloat16", "bfloat16", "Fp4Tensor"),
                     ("float32", "current"): ("float32", "float32", "float32")}


def _run(cfg, w, prompt, cont, max_len, snapped, chunks=None, lengths=None, mtp=None):
    """Prefill (one call, or ``chunks``) then one decode call per column of ``cont``; with ``mtp`` = (prefill ids,
    decode ids) the MTP block runs after every call. Returns the stacked last-position logits and the state.

    With ``lengths`` (the first call's valid tokens per row), every later call passes its full length explicitly
    (the same ``n_new`` as ``lengths=None``): the calls of one chunk size then share one compiled program (a 1-token
    chunk and the decode steps; CPU compile time dominates these tests)."""
    state = d.init_state(cfg, prompt.shape[0], max_len, snapped=snapped)
    out = []
    mtp_pre, mtp_dec = mtp if mtp else (None, None)
    starts = np.cumsum([0, *chunks[:-1]]) if chunks else [0]

    def n_of(p, c):
        if lengths is None:
            return None
        return lengths if p == 0 else jnp.full((prompt.shape[0],), c, jnp.int32)

    calls = [(prompt[:, p:p + c], n_of(p, c), mtp_pre) for p, c in zip(starts, chunks or [prompt.shape[1]])]
    calls += [(cont[:, k:k + 1], n_of(-1, 1), None if mtp is None else mtp_dec[:, k:k + 1])
              for k in range(cont.shape[1])]
    for toks, n, nxt in calls:
        logits, state, hidden = d.forward(w, cfg, jnp.asarray(toks), state, return_logits="last", lengths=n,
                                          return_hidden=True)
        out.append(np.asarray(logits))
        if nxt is not None:
            logits, state = d.mtp_forward(w, cfg, hidden, jnp.asarray(nxt), state, return_logits="last")
            out.append(np.asarray(logits))
    return np.stack(out, 1), state


@functools.partial(jax.jit, static_argnums=(1, 2))
def _decode_resnap(c, dtype, nope_dim):
    """A snapped cache's values and the values of their re-snap (FP4 if ``nope_dim`` is None, else FP8), in one
    program (op by op they were ~250 small compiled programs per test: CI time)."""
    dec = cache_values(c, dtype)
    again = encode_fp4_cache(dec) if nope_dim is None else encode_fp8_cache(dec, nope_dim)
    return dec, cache_values(again, dtype)


def _assert_same_run(cfg, w, *args, **kw):
    """Snapped and plain caches: identical logits; decoded caches equal to the plain ones and fixed points of the
    snap; every other leaf identical."""
    got, st = _run(cfg, w, *args, snapped=True, **kw)
    want, plain = _run(cfg, w, *args, snapped=False, **kw)
    np.testing.assert_array_equal(bits(got), bits(want))
    snapped_leaves = 0
    for i, (ls, lp) in enumerate(zip(st.layers + st.mtp, plain.layers + plain.mtp)):
        for f in LayerState.__dataclass_fields__:
            a, b = getattr(ls, f), getattr(lp, f)
            if a is None:
                continue
            if isinstance(a, (Fp8Cache, Fp4Tensor)):
                snapped_leaves += 1
                dec, again = _decode_resnap(a, b.dtype, None if f == "ikv" else cfg.nope_dim)
                np.testing.assert_array_equal(bits(again), bits(dec), err_msg=f"{i}.{f}")
                a = dec
            np.testing.assert_array_equal(bits(a), bits(b), err_msg=f"layer {i} {f}")
    assert snapped_leaves > 0
    np.testing.assert_array_equal(st.pos, plain.pos)


def test_golden_logits_equal_with_plain_caches(golden_dir):
    """The golden checkpoint (current release), prefill of 130 tokens then 8 decode steps, MTP after every call:
    crosses the window ring (16), ratio-4 blocks with the indexer selecting (top-4) and the first ratio-128 entry.
    The cache holds 512 positions like ``test_golden``'s: the snapped run's prefill, decode and MTP decode calls are
    programs that test compiles too (CPU compile time dominates; ``kernels="auto"`` is the reference path on CPU)."""
    cfg = d.Config.from_pretrained(golden_dir / "ckpt", cpu_rsqrt_tail=True)
    w = d.load_weights(golden_dir / "ckpt", cfg)
    z = np.load(golden_dir / "cases" / "b1_len130.npz")
    prompt, cont = z["prompt_tokens"], z["continuation_tokens"][:, :8]
    rng = np.random.default_rng(SEED)
    mtp = (rng.integers(0, cfg.vocab_size, prompt.shape), rng.integers(0, cfg.vocab_size, cont.shape))
    _assert_same_run(cfg, w, prompt, cont, 512, mtp=mtp)


def test_random_model_logits_equal_with_plain_caches():
    """Random weights, reference numerics, current release (KV and indexer keys snapped; the initial release snaps
    only the keys, a subset of the same code): two rows of different lengths, an uneven chunked prefill, then decode
    steps past position 128 (CSA selecting, HCA, window-only layers; window 8). Every call passes ``lengths`` (the
    later ones full: one compiled program per chunk size); the chunks take two sizes, 37 and 1 (a decode step's
    program), so each cache format compiles two forward programs (CPU compile time dominates); ``lengths=None`` is
    the golden test's."""
    cfg = d.Config.tiny(window_size=8, index_topk=4, index_n_heads=16, vocab_size=512, n_layers=3,
                        compress_ratios=(4, 128, 0, 0), n_hash_layers=1)
    w = random_weights(cfg, SEED)
    toks = np.random.default_rng(SEED).integers(0, cfg.vocab_size, (2, 131))
    _assert_same_run(cfg, w, toks[:, :112], toks[:, 112:], 144, chunks=[37, 1, 37, 37],
                     lengths=jnp.asarray([37, 20]))


@pytest.mark.parametrize("preset,budget", [("v4_flash", 3600), ("v4_pro", 5200)])
def test_state_bytes_per_token_at_1m(preset, budget):
    """The whole state of one row of 2**20 tokens (every main and MTP layer, compressor buffers included)."""
    cfg = getattr(d.Config, preset)()
    n = 2**20
    st = jax.eval_shape(lambda: d.init_state(cfg, 1, n))
    per_token = state_bytes(st) / n
    table = ", ".join(f"{k} {v / n:.1f}" for k, v in sorted(state_bytes_by_leaf(st).items(), key=lambda kv: -kv[1]))
    print(f"{preset}: {per_token:.1f} bytes per token ({table})")
    assert per_token <= budget, f"{preset}: {per_token:.1f} bytes per token > {budget} ({table})"
    plain = state_bytes(jax.eval_shape(lambda: d.init_state(cfg, 1, n, snapped=False))) / n
    assert per_token < 0.52 * plain  # the caches, which dominate, shrink to 583/1024 (KV) and 68/256 (keys)
