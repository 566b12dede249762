"""The per-device layers on a mesh (``modeling.attention``'s and ``modeling.moe``'s ``shard_map``s): each device its
heads, experts and shared-expert columns, one device's code inside, so the kernels run there as on one GPU.

Before them, a multi-device mesh kept every attention op on its XLA reference (the dispatchers refuse kernels where
XLA partitions the program). CPU checks (8 simulated devices, ``tests/conftest.py``):

* inside the layers, the dispatchers see one device (``kernels.single_device()``), the sparse attention gets one
  device's heads and sinks, the shared expert its columns; a mesh whose ``model`` axis would cut a scale block keeps
  XLA's partitioning;
* with the reference numerics (bf16 activations, the FP8 simulations) a decode step's logits on 1 x 2 and 2 x 2
  meshes equal one device's within bf16 rounding: the two differ only in fp32 summation orders (``wo_b``'s partial
  sums added over the mesh, the MoE's psum), each rounded to bf16 once, i.e. one bf16 ulp (2**-8 relative) where a
  sum lands near a rounding boundary, carried through two layers: the bound, 2e-2 of the largest logit, is ~5 such
  ulps; a wrong split (a device attending with the other's queries or sinks, a missing psum) is off by O(1).

The same comparison with the Triton kernels on (``kernels="auto"``) runs on a machine with two GPUs. (Triton's CPU
interpreter cannot stand in here: its ``pure_callback`` launches deadlock in XLA's CPU runtime when two simulated
devices run them at once.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_weights
from jax.sharding import PartitionSpec as P

import dsv4_jax as d
from dsv4_jax import sharding as sh
from dsv4_jax.kernels import single_device, triton_unavailable

SEED = 2026
TOL = 2e-2  # of the largest logit: ~5 bf16 ulps (module docstring)


def _cfg(kernels: str = "reference") -> d.Config:
    # o_lora_rank 128: wo_a's and wo_b's 128-wide scale blocks split whole over 2 devices (the golden tiny model's 64
    # would cut them: XLA's partitioning there)
    return d.Config.tiny(kernels=kernels, n_layers=2, compress_ratios=(4, 128), o_lora_rank=128, window_size=8,
                         n_mtp_layers=0, n_hash_layers=1)


@pytest.fixture(scope="module")
def model():
    cfg = _cfg()
    return cfg, random_weights(cfg, SEED)


def _mesh(shape):
    if jax.device_count() < shape[0] * shape[1]:
        pytest.skip(f"needs {shape[0] * shape[1]} devices")
    return sh.make_mesh(*shape, devices=jax.devices()[: shape[0] * shape[1]])


def _decode_logits(cfg, w, mesh=None, batch: int = 2):
    """A 6-token prompt then two decode steps -> the three calls' last logits ``[3, B, V]`` fp32."""
    toks = np.random.default_rng(SEED).integers(0, cfg.vocab_size, (batch, 8))
    state = d.init_state(cfg, batch, 32)
    if mesh is not None:
        w, state = sh.shard_weights(w, cfg, mesh), sh.shard_state(state, mesh)
    logits, state = d.forward(w, cfg, jnp.asarray(toks[:, :6]), state, return_logits="last")
    outs = [logits]
    for k in (6, 7):
        logits, state = d.forward(w, cfg, jnp.asarray(toks[:, k:k + 1]), state, return_logits="last")
        outs.append(logits)
    return np.stack([np.asarray(o, np.float32) for o in outs])


def _check_equal(one, two, what):
    rel = np.abs(two - one).max(axis=(1, 2)) / np.abs(one).max(axis=(1, 2))
    assert np.all(rel <= TOL), f"seed {SEED} {what}: max |dlogit| / max |logit| per call {rel}"
    assert np.array_equal(two.argmax(-1), one.argmax(-1)), f"seed {SEED} {what}: argmax differs"


def test_layers_run_per_device(model, monkeypatch):
    """On a 1 x 2 mesh the sparse attention and the MoE's shared expert are traced inside the per-device
    ``shard_map``s: one device's view for the dispatchers, half of the heads and sinks, half of the shared expert's
    width."""
    import dsv4_jax.modeling.attention as attn
    import dsv4_jax.modeling.moe as moe

    cfg, w = model
    mesh = _mesh((1, 2))
    seen, shared = [], []
    real_attn, real_swiglu = attn.sparse_attention, moe.swiglu

    def spy(q, ring, chunk, comp, idx, sink, *args, **kwargs):
        seen.append((single_device(), q.shape[2], sink.shape[0]))
        return real_attn(q, ring, chunk, comp, idx, sink, *args, **kwargs)

    def spy_swiglu(c, x, xq, w1, *args, **kwargs):
        shared.append((single_device(), w1.q.shape[0]))
        return real_swiglu(c, x, xq, w1, *args, **kwargs)

    monkeypatch.setattr(attn, "sparse_attention", spy)
    monkeypatch.setattr(moe, "swiglu", spy_swiglu)
    _decode_logits(cfg, w, mesh, batch=1)
    half = cfg.n_heads // 2
    assert seen and all(s == (True, half, half) for s in seen), seen
    assert shared and all(s == (True, cfg.moe_inter_dim // 2) for s in shared), shared


def test_a_split_that_cuts_a_scale_block_stays_partitioned():
    """The golden tiny model's output LoRA (2 groups x 64) is one 128-row scale block: split over 2 devices it would
    be cut, so the layer keeps XLA's partitioning (``attention_specs`` None); 1 x 1 and data-only meshes always run
    per device."""
    tiny = d.Config.tiny()
    assert sh.attention_specs(tiny, _mesh((1, 2)), 4) is None
    assert sh.attention_specs(tiny, _mesh((2, 1)), 4) is not None
    specs = sh.attention_specs(_cfg(), _mesh((1, 2)), 4)
    assert specs.wq_b.q == specs.wq_b.scale == P(sh.MODEL, None) and specs.wo_b.q == P(None, sh.MODEL)
    assert specs.indexer.wq_b.q == P(None, None)  # the indexer's heads: whole on every device


@pytest.fixture(scope="module")
def one_device(model):
    return _decode_logits(*model)


@pytest.mark.parametrize("shape", [(1, 2), (2, 2)])
def test_reference_numerics_on_a_mesh_equal_one_device(model, one_device, shape):
    _check_equal(one_device, _decode_logits(*model, _mesh(shape)), f"mesh {shape}")


def test_gpu_kernels_on_two_gpus_equal_one_gpu():
    """The same comparison with the kernels on (``"auto"``) on two GPUs."""
    why = triton_unavailable()
    if why is not None or jax.device_count() < 2:
        pytest.skip(f"needs two GPUs with the kernels ({why or f'{jax.device_count()} device(s)'})")
    cfg = _cfg("auto")
    w = random_weights(cfg, SEED)
    _check_equal(_decode_logits(cfg, w), _decode_logits(cfg, w, _mesh((1, 2))), "two GPUs, kernels auto")
