"""The official reference outputs in ``shared/golden/tiny`` (README there: semantics and acceptance criteria).

What is asserted (criteria 1-4 of the README, ``numerics="reference"``):
  * Criterion 1: blocks fed the golden hc streams reproduce the next stream (rel. L2 <= 5e-2 per call, <= 3e-3 on
    average), the head on golden streams (<= 1e-2), indexer/router selections on >= 97 % of rows; the MTP block fed
    golden streams (rel. L2 <= 5e-2).
  * Criteria 2 and 4 (free running, current and initial release): every case within the gross bounds (mean |dlogit|
    <= 0.35, argmax agreement >= 0.60), the mean over all cases <= 0.20 / >= 0.78 and over the prompts of at most 50
    tokens <= 0.15 / >= 0.84. These bounds are the spread of the official code itself rerun with other equally valid
    fp32 summation orders: the model is chaotic at the bit level (one changed fp32 rounding of an mHC mix flips a
    bf16 rounding, which the FP8/FP4 snaps amplify), so end to end only a statistical match is meaningful.
  * Criterion 3: all-position prefill logits <= 0.15, MTP logits <= 0.30.
The golden run used torch on CPU, whose scalar-tail bf16 ``rsqrt`` rounds differently: ``cpu_rsqrt_tail=True``
reproduces it (see ``dsv4_jax.modeling.layers.head_rms_norm``), as the README's criteria assume.
"""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import dsv4_jax as d
from dsv4_jax.modeling.model import block, head

CASES = ["b1_len003", "b1_len009", "b1_len037", "b1_len050", "b1_len115", "b1_len130", "b1_len300", "b2_len130"]
_block = jax.jit(block, static_argnames=("cfg", "ratio"))


KERNELS = os.environ.get("DSV4_KERNELS", "reference")  # "auto" on a GPU: the same criteria with the Triton kernels


def _cfg(golden_dir, release="current"):
    return d.Config.from_pretrained(golden_dir / "ckpt", release=release, cpu_rsqrt_tail=True, kernels=KERNELS)


@pytest.fixture(scope="module")
def model(golden_dir):
    cfg = _cfg(golden_dir)
    return cfg, d.load_weights(golden_dir / "ckpt", cfg)


def run_case(cfg, w, z):
    """Prefill then 24 teacher-forced single-token steps, like the golden driver. Returns [B, 25, V] logits.

    The prompt is not padded to a shared length: a different matmul row count changes fp32 rounding, which this
    chaotic model amplifies (padding measurably moved the short cases). The calls also return the final streams
    (unused; the logits are the same bits): the batch-1 decode step is then the program of
    :func:`test_all_positions_and_mtp`, and the current release's calls are those of
    ``test_state_formats.test_golden_logits_equal_with_plain_caches``, compiled once (CPU compile time dominates).
    """
    prompt, cont = z["prompt_tokens"], z["continuation_tokens"]
    state = d.init_state(cfg, prompt.shape[0], 512)
    logits, state, _ = d.forward(w, cfg, jnp.asarray(prompt), state, return_logits="last", return_hidden=True)
    out = [np.asarray(logits)]
    for k in range(cont.shape[1]):
        logits, state, _ = d.forward(w, cfg, jnp.asarray(cont[:, k:k + 1]), state, return_logits="last",
                                     return_hidden=True)
        out.append(np.asarray(logits))
    return np.stack(out, 1)


def golden_logits(z):
    return np.concatenate([z["prefill_logits"][:, None], z["decode_logits"]], 1)


def compare(ours, gold):
    return float(np.abs(ours - gold).mean()), float((ours.argmax(-1) == gold.argmax(-1)).mean())


def bf16(a):
    return np.asarray(a).view(ml_dtypes.bfloat16)


def rel_l2(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------------------------------ criterion 1
@pytest.mark.parametrize("case", ["b1_len037", "b1_len130"])
def test_layer_isolated(model, golden_dir, case):
    """Each block fed the golden hc streams (prefill + 24 decode calls, own caches) reproduces the next stream."""
    cfg, w = model
    lw = np.load(golden_dir / "cases" / f"{case}_layerwise.npz")
    traces = np.load(golden_dir / "cases" / f"{case}.npz")
    hp, hd = bf16(lw["hc_streams_prefill_bf16bits"]), bf16(lw["hc_streams_decode_bf16bits"])
    prompt, cont = lw["prompt_tokens"], lw["continuation_tokens"]
    L = prompt.shape[1]
    state = d.init_state(cfg, 1, 512)
    errs, agree = [], {}
    for i in range(cfg.n_layers):
        ls = state.layers[i]
        calls = [(hp[i], prompt, 0, L, hp[i + 1], "prefill", slice(None))]
        calls += [(hd[i][:, k:k + 1], cont[:, k:k + 1], L + k, 1, hd[i + 1][:, k:k + 1], "decode", k)
                  for k in range(cont.shape[1])]
        for h_in, ids, pos, n, h_ref, phase, sl in calls:
            h, ls, aux = _block(cfg, w.layers[i], cfg.ratio(i), jnp.asarray(h_in), jnp.asarray(ids), ls,
                                jnp.array([pos], jnp.int32), jnp.array([n], jnp.int32))
            err = rel_l2(h, h_ref)
            assert err <= 5e-2, f"layer {i} {phase} call at position {pos}: rel L2 {err:.3e} > 5e-2"
            errs.append(err)
            for kind, key in (("indexer", f"trace_indexer_L{i}_{phase}"), ("router", f"trace_router_L{i}_{phase}")):
                if aux[kind] is None or key not in traces:
                    continue
                ref = traces[key][:, sl] if phase == "decode" else traces[key]
                ours = np.asarray(aux[kind]).reshape(ref.shape)
                same = np.all(np.sort(ours, -1) == np.sort(ref, -1), axis=-1)  # same set of choices per row
                agree.setdefault(kind, []).extend(same.ravel().tolist())
    mean = float(np.mean(errs))
    assert mean <= 3e-3, f"mean rel L2 over blocks and calls {mean:.3e} > 3e-3"
    for kind, rows in agree.items():
        assert np.mean(rows) >= 0.97, f"{kind} selections equal the traces on {np.mean(rows):.3f} of rows < 0.97"
    assert "indexer" in agree and "router" in agree


def test_head_on_golden_streams(model, golden_dir):
    cfg, w = model
    lw = np.load(golden_dir / "cases" / "b1_len037_layerwise.npz")
    ext = np.load(golden_dir / "cases" / "b1_len037_extended.npz")
    logits = head(cfg, w.head, w.hc_head, w.norm, jnp.asarray(bf16(lw["hc_streams_prefill_bf16bits"])[-1]))
    assert rel_l2(logits, ext["prefill_logits_all_positions"]) <= 1e-2
    logits = head(cfg, w.head, w.hc_head, w.norm, jnp.asarray(bf16(lw["hc_streams_decode_bf16bits"])[-1]))
    assert rel_l2(logits, ext["decode_logits"]) <= 1e-2


# ------------------------------------------------------------------------------------------ criteria 2 and 4
SHORT = [c for c in CASES if int(c.split("_len")[1]) <= 50]  # prompts of at most 50 tokens (criterion 2)


@pytest.mark.parametrize("release", ["current", "initial"])
def test_end_to_end(golden_dir, release):
    """Free-running prefill + 24 decode steps of every case (batch-2 case as a batch), criterion 2 (criterion 4 for
    the initial release): each case within the gross bounds, the pooled means over all cases and over the short
    prompts within the official code's own spread. One test per release so the pools need no second run."""
    cfg = _cfg(golden_dir, release)
    w = _weights(golden_dir)
    base = golden_dir / ("cases" if release == "current" else "initial_release/cases")
    res = {}
    for case in CASES:
        z = np.load(base / f"{case}.npz")
        res[case] = compare(run_case(cfg, w, z), golden_logits(z))
    table = ", ".join(f"{c} {m:.3f}/{a:.2f}" for c, (m, a) in res.items())
    gross = [c for c, (m, a) in res.items() if m > 0.35 or a < 0.60]
    assert not gross, f"{release}: cases {gross} outside mean |dlogit| <= 0.35 / argmax >= 0.60 ({table})"
    for name, cases, max_mean, min_agree in (("all", CASES, 0.20, 0.78), ("short", SHORT, 0.15, 0.84)):
        m = float(np.mean([res[c][0] for c in cases]))
        a = float(np.mean([res[c][1] for c in cases]))
        print(f"{release} pool {name}: mean |dlogit| {m:.3f}, argmax agreement {a:.3f}")
        assert m <= max_mean and a >= min_agree, (
            f"{release} pool '{name}': mean |dlogit| {m:.3f} (bound {max_mean}), argmax agreement {a:.3f} "
            f"(bound {min_agree}); per case: {table}")


_W = {}


def _weights(golden_dir):
    if "w" not in _W:  # the weights do not depend on the release switch
        _W["w"] = d.load_weights(golden_dir / "ckpt", _cfg(golden_dir))
    return _W["w"]


# ------------------------------------------------------------------------------------------ criterion 3
def test_all_positions_and_mtp(model, golden_dir):
    """All-position prefill logits within mean |dlogit| 0.15; MTP logits (prefill positions and the 24 decode
    steps, each fed the model's own chaotic final streams) within 0.30."""
    cfg, w = model
    z = np.load(golden_dir / "cases" / "b1_len037_extended.npz")
    state = d.init_state(cfg, 1, 512)
    logits, state, hidden = d.forward(w, cfg, jnp.asarray(z["prompt_tokens"]), state, return_hidden=True)
    all_mean, all_agree = compare(np.asarray(logits), z["prefill_logits_all_positions"])
    mtp, state = d.mtp_forward(w, cfg, hidden, jnp.asarray(z["mtp_input_ids_prefill"]), state)
    mtp_pre, _ = compare(np.asarray(mtp), z["mtp_prefill_logits_all_positions"])
    cont, nxt = z["continuation_tokens"], z["mtp_decode_input_ids"]
    mtp_dec = []
    for k in range(cont.shape[1]):
        _, state, hidden = d.forward(w, cfg, jnp.asarray(cont[:, k:k + 1]), state, return_logits="last",
                                     return_hidden=True)  # run_case's decode program (logits unused here)
        logits, state = d.mtp_forward(w, cfg, hidden, jnp.asarray(nxt[:, k:k + 1]), state, return_logits="last")
        mtp_dec.append(np.asarray(logits))
    mtp_dec_mean, _ = compare(np.stack(mtp_dec, 1), z["mtp_decode_logits"])
    print(f"all positions {all_mean:.4f} ({all_agree:.2f}), MTP prefill {mtp_pre:.4f}, MTP decode {mtp_dec_mean:.4f}")
    assert all_mean <= 0.15, f"all-position prefill logits: mean |dlogit| {all_mean:.4f} > 0.15"
    assert mtp_pre <= 0.30 and mtp_dec_mean <= 0.30, f"MTP logits: prefill {mtp_pre:.4f}, decode {mtp_dec_mean:.4f}"


def test_mtp_layer_isolated(model, golden_dir):
    """The MTP block fed the golden final streams of the main model: close to the golden MTP logits."""
    cfg, w = model
    lw = np.load(golden_dir / "cases" / "b1_len037_layerwise.npz")
    z = np.load(golden_dir / "cases" / "b1_len037_extended.npz")
    state = d.init_state(cfg, 1, 512)
    h = jnp.asarray(bf16(lw["hc_streams_prefill_bf16bits"])[-1])
    logits, state = d.mtp_forward(w, cfg, h, jnp.asarray(z["mtp_input_ids_prefill"]), state)
    assert rel_l2(logits, z["mtp_prefill_logits_all_positions"]) <= 5e-2
    hd = bf16(lw["hc_streams_decode_bf16bits"])[-1]
    out = []
    for k in range(hd.shape[1]):
        logits, state = d.mtp_forward(w, cfg, jnp.asarray(hd[:, k:k + 1]), jnp.asarray(
            z["mtp_decode_input_ids"][:, k:k + 1]), state, return_logits="last")
        out.append(np.asarray(logits))
    assert rel_l2(np.stack(out, 1), z["mtp_decode_logits"]) <= 5e-2
