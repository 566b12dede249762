"""The side-stream branches (``dsv4_jax/kernels/streams.py``).

CPU: the switch itself (unknown branch names fail with the name; on the CPU every branch runs inline, so a model
step is the same with them named), and the region's HLO where a GPU is pretended: the branch is one call annotated
with the side stream and nothing nested in it carries the annotation (XLA rejects nested stream regions).

GPU (skipped without one): one V4-Flash CSA layer (real shapes, random weights) with ``kernels="auto"``: a
short prefill, then decode steps at batch 1 and 4 with the branches on and off: logits and every leaf of the new
state bit for bit equal (the same kernels on the same inputs; only their order on the GPU differs).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import dsv4_jax as d
from dsv4_jax.kernels import streams


def test_unknown_branch_names_fail(monkeypatch):
    with pytest.raises(ValueError, match="unknown branch 'expert'"):
        streams.enabled("expert")
    monkeypatch.setattr(streams, "BRANCHES", "shared,indexr")
    with pytest.raises(ValueError, match="indexr"):
        streams.enabled("shared")


def test_cpu_runs_inline(monkeypatch):
    """On the CPU the branches run inline: a tiny model's decode logits are the same bits with them named."""
    import jax
    import jax.numpy as jnp

    cfg = d.Config.tiny()
    w = d.init_weights(cfg, jax.random.key(3))
    toks = jnp.asarray(np.random.default_rng(5).integers(1, cfg.vocab_size, (2, 6)), jnp.int32)

    def run():
        jax.clear_caches()
        st = d.init_state(cfg, 2, 32)
        _, st = d.forward(w, cfg, toks, st, return_logits="none")
        lg, _ = d.forward(w, cfg, toks[:, :1], st, return_logits="last")
        return np.asarray(lg)

    base = run()
    monkeypatch.setattr(streams, "BRANCHES", ("shared", "indexer"))
    assert not streams.enabled("shared"), "the CPU must run the branches inline"
    np.testing.assert_array_equal(run(), base)


def test_region_annotation_not_nested(monkeypatch):
    """With a GPU pretended, the branch lowers to one call with the stream annotation; its body (which calls jitted
    jnp functions, e.g. ``floor_divide``) carries none."""
    import jax
    import jax.numpy as jnp

    monkeypatch.setattr(streams, "arch", lambda: "sm90")
    monkeypatch.setattr(streams, "BRANCHES", "indexer")

    def body(x):
        return jnp.floor_divide(x, 3) + jnp.sum(x)

    text = jax.jit(lambda x: streams.side("indexer", body, x) * 2).lower(jnp.arange(8)).as_text()
    ann = re.findall(r"_xla_stream_annotation\s*=\s*\"(\d+)\"", text)
    assert ann == [str(streams.STREAM)], f"expected one annotated call, found {ann}"


def _flash1(kernels: str):
    full = d.Config.v4_flash()  # its layer 2: CSA (the indexer branch), and every layer has the shared expert
    return full.with_(n_layers=1, compress_ratios=full.compress_ratios[2:3] + (0,), n_hash_layers=1,
                      kernels=kernels)


@pytest.mark.parametrize("batch", [1, 4])
def test_gpu_streams_bit_for_bit(monkeypatch, batch):
    from dsv4_jax.kernels import triton_unavailable

    why = triton_unavailable()
    if why is not None:
        pytest.skip(f"side-stream GPU test: {why}")
    import jax
    import jax.numpy as jnp

    cfg = _flash1("auto")
    w = jax.jit(lambda k: d.init_weights(cfg, k))(jax.random.key(11))
    rng = np.random.default_rng(7 + batch)
    prompt = jnp.asarray(rng.integers(1, cfg.vocab_size, (batch, 40)), jnp.int32)
    steps = jnp.asarray(rng.integers(1, cfg.vocab_size, (2, batch, 1)), jnp.int32)

    def run(branches):
        monkeypatch.setattr(streams, "BRANCHES", branches)
        jax.clear_caches()
        st = d.init_state(cfg, batch, 256)
        _, st = d.forward(w, cfg, prompt, st, return_logits="none")
        out = []
        for t in steps:
            lg, st = d.forward(w, cfg, t, st, return_logits="last")
            out.append(np.asarray(lg))
        return out, [np.asarray(x) for x in jax.tree.leaves(st)]

    (l0, s0), (l1, s1) = run(()), run(("shared", "indexer"))
    for i, (a, b) in enumerate(zip(l0, l1)):
        np.testing.assert_array_equal(b, a, err_msg=f"batch {batch}: decode step {i}'s logits differ")
    for j, (a, b) in enumerate(zip(s0, s1)):
        np.testing.assert_array_equal(b, a, err_msg=f"batch {batch}: state leaf {j} differs")
