"""Sharded forward on 8 simulated CPU devices equals one device (float32 numerics, 1e-5 relative).

``tests/conftest.py`` starts JAX with ``--xla_force_host_platform_device_count=8``. Differences between meshes are
only fp32 summation orders (the MoE's cross-device psum, the partitioned head and output-projection sums).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_weights
from jax.sharding import PartitionSpec as P

import dsv4_jax as d
from dsv4_jax import sharding as sh
from dsv4_jax.modeling import weights as wm

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
TOL = 1e-5
SEED = 4242  # fixed: a failure reproduces with the same weights and tokens


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _small_cfg():
    # head, group, index-head and expert counts divide every mesh of 8 devices; two layers (CSA with hash routing,
    # HCA: every kind of layer state; a window-only layer is the CSA layer minus its compressor) keep the compile time
    # of 4 placements x (prefill, decode, generate loop) programs low
    return d.Config.tiny(numerics="float32", n_heads=8, o_groups=8, o_lora_rank=128, index_n_heads=8, vocab_size=512,
                         window_size=8, index_topk=4, n_layers=2, compress_ratios=(4, 128, 0), n_hash_layers=1)


@pytest.fixture(scope="module")
def model():
    cfg = _small_cfg()
    seed = SEED
    return cfg, random_weights(cfg, seed), np.random.default_rng(seed), seed


@pytest.mark.parametrize("shape", [(1, 8), (8, 1)])  # the mixed 2 x 4 mesh: the generation test below (CI time)
def test_mesh_equals_single_device(model, shape):
    cfg, w, rng, seed = model
    B, S = 8, 40
    toks = rng.integers(0, cfg.vocab_size, (B, S + 2))
    ref, st = d.forward(w, cfg, jnp.asarray(toks[:, :S]), d.init_state(cfg, B, 64))
    ref_dec, _ = d.forward(w, cfg, jnp.asarray(toks[:, S:S + 1]), st, return_logits="last")
    mesh = sh.make_mesh(*shape)
    ws = sh.shard_weights(w, cfg, mesh)
    out, st = d.forward(ws, cfg, jnp.asarray(toks[:, :S]), sh.shard_state(d.init_state(cfg, B, 64), mesh))
    dec, st = d.forward(ws, cfg, jnp.asarray(toks[:, S:S + 1]), st, return_logits="last")
    assert _rel(out, ref) <= TOL, f"seed {seed} mesh {shape}: prefill rel {_rel(out, ref):.2e}"
    assert _rel(dec, ref_dec) <= TOL, f"seed {seed} mesh {shape}: decode rel {_rel(dec, ref_dec):.2e}"


def test_each_device_holds_its_share_of_experts(model):
    cfg, w, _, _ = model
    mesh = sh.make_mesh(2, 4)
    ws = sh.shard_weights(w, cfg, mesh)
    for layer in ws.layers:
        for t in (layer.ffn.w1, layer.ffn.w2, layer.ffn.w3):
            per_dev = sh.expert_bytes_per_device(t)
            total = t.packed.nbytes + t.scale.nbytes
            assert len(per_dev) == 8 and set(per_dev.values()) == {total // 8}
            # device k holds experts [k*E/8, (k+1)*E/8): exactly one expert each here
            for shard in t.packed.addressable_shards:
                assert shard.data.shape[0] == cfg.n_routed_experts // 8
    # attention heads split over the model axis, the shared KV head replicated
    wq_b = ws.layers[1].attn.wq_b.q
    assert wq_b.addressable_shards[0].data.shape[0] == wq_b.shape[0] // 4
    assert ws.layers[1].attn.wkv.q.addressable_shards[0].data.shape == ws.layers[1].attn.wkv.q.shape


def test_mesh_that_does_not_divide_is_a_clear_error():
    cfg = d.Config.tiny()  # golden tiny: 4 heads, 2 output groups, 8 experts
    with pytest.raises(ValueError, match=r"o_groups=2 is not divisible by the model axis \(8\)"):
        sh.weight_shardings(cfg, sh.make_mesh(1, 8))
    with pytest.raises(ValueError, match="batch size 3 is not divisible"):
        sh.state_shardings(d.init_state(cfg, 3, 16), sh.make_mesh(2, 4))


def _retype(node, key: str, **changes):
    """The declaration tree ``node`` with the :class:`Decl` of checkpoint name ``key`` changed."""
    if isinstance(node, wm.Decl):
        return dataclasses.replace(node, **changes) if node.key == key else node
    if isinstance(node, tuple) and len(node) == 2 and isinstance(node[0], type):
        return node[0], {k: _retype(v, key, **changes) for k, v in node[1].items()}
    if isinstance(node, tuple):
        return tuple(_retype(n, key, **changes) for n in node)
    return node


def test_misspelled_logical_axis_is_refused(monkeypatch):
    """A typo in a weight's logical axes is an error naming the axis, the tensor and the known names (it used to
    replicate that tensor silently)."""
    cfg = _small_cfg()
    sh.weight_shardings(cfg, sh.make_mesh(2, 4))  # the real declarations are accepted
    decls = wm.weight_decls
    monkeypatch.setattr(wm, "weight_decls", lambda c: _retype(decls(c), "layers.1.attn.wq_b", axes=("q_head", None)))
    with pytest.raises(ValueError) as err:
        sh.weight_shardings(cfg, sh.make_mesh(2, 4))
    msg = str(err.value)
    for part in ("'q_head'", "'layers.1.attn.wq_b'", "weights.layers[1].attn.wq_b.q", "'q_heads'", "'embed'"):
        assert part in msg, (part, msg)
    with pytest.raises(ValueError, match="unknown logical axis 'vocb'"):
        sh.spec_for(("vocb", "embed"))


@pytest.mark.parametrize("preset", ["v4_flash", "v4_pro"])
def test_every_declared_axis_is_known(preset):
    """Full-size V4-Flash / V4-Pro (abstract weights, no memory): every logical axis is a known name, every
    replicated-on-purpose name is used, and the shardings of the whole tree build on an 8-device mesh.
    ``abstract_weights`` is the tree of ``jax.eval_shape(init_weights, ...)`` (pinned at full size by
    tests/test_config_weights.py) without the 15 s trace."""
    cfg = getattr(d.Config, preset)()
    abstract = d.abstract_weights(cfg)
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)  # noqa: E731
    axes, axes_def = jax.tree_util.tree_flatten(d.logical_axes(cfg), is_leaf=is_axes)
    leaves, leaves_def = jax.tree_util.tree_flatten(abstract)
    assert axes_def == leaves_def and all(len(a) == x.ndim for a, x in zip(axes, leaves))
    names = {a for ax in axes for a in ax if a is not None}
    assert names <= sh.KNOWN_AXES, names - sh.KNOWN_AXES
    assert sh.REPLICATED <= names, sh.REPLICATED - names
    shardings = sh.weight_shardings(cfg, sh.make_mesh(2, 4))
    assert jax.tree_util.tree_structure(shardings) == leaves_def
    assert shardings.layers[0].ffn.w1.packed.spec[0] == sh.EXPERT_AXES
    assert shardings.layers[0].attn.wq_b.q.spec == P(sh.MODEL, None) and shardings.embed.spec == P(sh.MODEL, None)


def test_golden_checkpoint_on_a_mesh(golden_dir):
    """The golden tiny checkpoint loaded straight onto a (4 x 2) mesh gives the single-device logits."""
    cfg = d.Config.from_pretrained(golden_dir / "ckpt", numerics="float32")
    z = np.load(golden_dir / "cases" / "b2_len130.npz")
    toks = np.concatenate([z["prompt_tokens"]] * 2)  # batch 4: divisible by the data axis
    w = d.load_weights(golden_dir / "ckpt", cfg)
    ref, _ = d.forward(w, cfg, jnp.asarray(toks), d.init_state(cfg, 4, 160), return_logits="last")
    mesh = sh.make_mesh(4, 2)
    ws = d.load_weights(golden_dir / "ckpt", cfg, mesh=mesh)
    assert ws.layers[0].ffn.w1.packed.sharding.spec[0] == sh.EXPERT_AXES
    out, _ = d.forward(ws, cfg, jnp.asarray(toks), sh.shard_state(d.init_state(cfg, 4, 160), mesh),
                       return_logits="last")
    assert _rel(out, ref) <= TOL


@pytest.fixture(scope="module")
def generated(model):
    """Prompts of uneven lengths (8 rows: every data axis divides them) and their single-device generation."""
    cfg, w, rng, _ = model
    prompts = [[int(t) for t in rng.integers(2, cfg.vocab_size, n)] for n in (5, 17, 9, 30, 3, 12, 22, 8)]
    return cfg, w, prompts, d.generate(w, cfg, prompts, 5, d.SamplingConfig(), seed=7, stop_tokens=())


@pytest.mark.parametrize("shape", [(2, 4)])
def test_generate_on_mesh_equals_single_device(model, generated, shape):
    """Sampled generation (prefill chunks + on-device decode loop) on a mixed 2 x 4 mesh gives the single-device
    tokens (the 1 x 8 and 8 x 1 meshes: the forward test above, at the logits; CI time)."""
    seed = model[3]
    cfg, w, prompts, ref = generated
    ws = sh.shard_weights(w, cfg, sh.make_mesh(*shape))
    got = d.generate(ws, cfg, prompts, 5, d.SamplingConfig(), seed=7, stop_tokens=())
    assert got == ref, f"seed {seed} mesh {shape}"


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("shape", [(1, 2), (2, 4)])
def test_embedding_lookup_on_a_mesh_is_bit_exact(shape, dtype):
    """The vocab-parallel lookup (each device its own rows, summed over ``model`` as integers) returns exactly the
    rows a plain gather returns: signed zeros, NaN payloads and clipped out-of-range ids included."""
    from dsv4_jax.modeling.model import embed

    V, D, B, S = 64, 16, 2, 5
    rng = np.random.default_rng(3)
    table = rng.standard_normal((V, D)).astype(np.float32)
    table[5, :4] = -0.0  # -0 would become +0 in a float sum of zeros
    table[9, 0] = np.nan
    table = jnp.asarray(table).astype(dtype)
    ids = jnp.asarray(rng.integers(-3, V + 3, (B, S)), jnp.int32).at[0, :2].set(jnp.array([5, 9]))
    want = np.asarray(table[jnp.clip(ids, 0, V - 1)])
    mesh = sh.make_mesh(*shape, devices=jax.devices()[: shape[0] * shape[1]])
    with jax.set_mesh(mesh):
        t = jax.device_put(table, jax.sharding.NamedSharding(mesh, P(sh.MODEL, None)))
        got = np.asarray(jax.jit(embed, static_argnums=2)(t, ids, V))
    bits = np.uint16 if dtype == jnp.bfloat16 else np.uint32
    np.testing.assert_array_equal(got.view(bits), want.view(bits))


def test_indexer_needs_no_collective_on_a_mesh(model):
    """The indexer's heads are replicated (``sharding.REPLICATED``): on a 1 x 2 mesh the compiled step has no
    collective coming from the indexer (split over heads, its sum over heads was an all-reduce per CSA layer), and the
    indexer's weights are whole on every device."""
    import re

    cfg, w, _, _ = model
    mesh = sh.make_mesh(1, 2, devices=jax.devices()[:2])
    ws = sh.shard_weights(w, cfg, mesh)
    st = sh.shard_state(d.init_state(cfg, 2, 64), mesh)
    toks = jnp.zeros((2, 1), jnp.int32)
    from dsv4_jax.modeling.model import forward_jit

    step = jax.jit(lambda w, t, s: forward_jit(w, cfg, t, s, return_logits="last"))
    with jax.set_mesh(mesh):
        hlo = step.lower(ws, toks, st).compile().as_text()
    coll = [ln for ln in hlo.splitlines() if re.search(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all)", ln)]
    assert coll, "expected the attention / MoE collectives in the step"  # the check can see collectives at all
    assert not [ln for ln in coll if "/indexer/" in ln], [ln[:200] for ln in coll if "/indexer/" in ln]
    idx = ws.layers[0].attn.indexer
    assert idx.wq_b.q.sharding.is_fully_replicated and idx.weights_proj.sharding.is_fully_replicated
