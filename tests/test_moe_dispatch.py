"""Routed-expert schedules and mesh dispatch strategies agree with each other and with one device.

Float32 numerics: the schedules differ only in matmul shapes and (gather strategy) the cross-device psum order, so
1e-5 relative (fp32 rounding of sums of a few hundred terms) bounds every comparison. Random inputs from a fixed seed
(``SEED``), so a failure reproduces; the seed is in the failure message.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_weights

import dsv4_jax as d
from dsv4_jax import sharding as sh
from dsv4_jax.kernels import triton_unavailable
from dsv4_jax.modeling import experts as ex
from dsv4_jax.modeling.moe import dispatch_strategy, moe
from dsv4_jax.modeling.quant import quantized_input

TOL = 1e-5
SEED = 1729


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def setup():
    seed = SEED
    cfg = d.Config.tiny(numerics="float32", n_layers=2, compress_ratios=(0, 0, 0), n_hash_layers=1, n_heads=8,
                        o_groups=8, index_n_heads=8, n_routed_experts=16, n_activated_experts=3)
    w = random_weights(cfg, seed)
    return cfg, w, np.random.default_rng(seed), seed


def test_grouped_equals_gathered(setup):
    """The block-grouped schedule equals the per-pair gather on random pairs, including pairs for other devices'
    experts (ids outside the local stack give zeros) and block sizes that split experts over several blocks."""
    cfg, w, rng, seed = setup
    ffn = w.layers[1].ffn
    T, R = 24, 70
    x = jnp.asarray(rng.standard_normal((T, cfg.dim)), jnp.float32)
    tok = jnp.asarray(rng.integers(0, T, R), jnp.int32)
    e = jnp.asarray(rng.integers(-2, cfg.n_routed_experts + 3, R), jnp.int32)
    wt = jnp.asarray(rng.uniform(0.1, 1.0, R), jnp.float32)
    xq = quantized_input(x, cfg.simulate)
    ref = ex.pairs_gathered(cfg, x, xq, tok, e, wt, ffn.w1, ffn.w2, ffn.w3)
    outside = (np.asarray(e) < 0) | (np.asarray(e) >= cfg.n_routed_experts)
    assert outside.any() and np.all(np.asarray(ref)[outside] == 0)
    for block in (None, 8, 16):
        got = ex.pairs_grouped(cfg, x, xq, tok, e, wt, ffn.w1, ffn.w2, ffn.w3, block=block)
        assert _rel(got, ref) <= TOL, f"seed {seed} block {block}: rel {_rel(got, ref):.2e}"


def test_dispatch_rule():
    cfg = d.Config.v4_flash()  # 256 experts, 6 per token
    assert dispatch_strategy(cfg, 4096, 1) == "local"
    assert dispatch_strategy(cfg, 4096, 2) == "gather"  # n <= k: the gather moves fewer bytes
    assert dispatch_strategy(cfg, 4096, 8) == "all_to_all"
    assert dispatch_strategy(cfg, 8, 8) == "gather"  # decode: latency-bound
    assert dispatch_strategy(cfg.with_(moe_dispatch="all_to_all"), 1, 2) == "all_to_all"
    with pytest.raises(ValueError, match="moe_dispatch='ragged'"):
        cfg.with_(moe_dispatch="ragged")


@pytest.mark.parametrize("shape", [(1, 8), (2, 4), (8, 1)])
def test_mesh_strategies_equal_one_device(setup, shape):
    """The MoE block (router, hash routing, shared expert) on a mesh, with either strategy and with a token count
    the mesh does not divide (padding tokens), equals one device; each strategy's choices are the same."""
    cfg, w, rng, seed = setup
    B, S = 2, 13  # 26 tokens: not a multiple of 8
    x = jnp.asarray(rng.standard_normal((B, S, cfg.dim)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, S)), jnp.int32)
    mesh = sh.make_mesh(*shape)
    ws = sh.shard_weights(w, cfg, mesh)
    for layer in (0, 1):  # hash-routed, then score-routed
        ref, ref_idx = jax.jit(moe, static_argnums=0)(cfg, w.layers[layer].ffn, x, ids)
        for strategy in ("gather", "all_to_all"):
            c = cfg.with_(moe_dispatch=strategy)
            with jax.set_mesh(mesh):
                got, idx = jax.jit(moe, static_argnums=0)(c, ws.layers[layer].ffn, x, ids)
            np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
            assert _rel(got, ref) <= TOL, f"seed {seed} mesh {shape} layer {layer} {strategy}: {_rel(got, ref):.2e}"


# ---------------------------------------------------------------------------------------------- FP4 MoE kernels
@pytest.mark.skipif(triton_unavailable() is not None, reason=f"FP4 MoE kernels: {triton_unavailable()}")
@pytest.mark.parametrize("strategy", ["gather", "all_to_all"])
def test_kernel_moe_equals_reference(setup, strategy):
    """The MoE block with ``kernels="triton"`` (each device runs the FP4 kernels on its own experts' pairs) equals
    ``kernels="reference"`` on one device, on a mesh over every GPU with either strategy. Reference numerics (the
    kernels need them): the two differ by fp32 summation order inside each dot, which a bf16 or FP8 rounding can
    turn into one ulp / one e4m3 step of an element, so the bound is 2e-2 normwise (see test_kernels_fp4_moe.py)."""
    cfg, w, rng, seed = setup
    cfg = cfg.with_(numerics="reference")
    B, S = 2, 13
    x = jnp.asarray(rng.standard_normal((B, S, cfg.dim)), jnp.bfloat16)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, S)), jnp.int32)
    mesh = sh.make_mesh(1, len(jax.devices()))
    ws = sh.shard_weights(w, cfg, mesh)
    for layer in (0, 1):
        ref, ref_idx = jax.jit(moe, static_argnums=0)(cfg.with_(kernels="reference"), w.layers[layer].ffn, x, ids)
        c = cfg.with_(kernels="triton", moe_dispatch=strategy)
        with jax.set_mesh(mesh):
            got, idx = jax.jit(moe, static_argnums=0)(c, ws.layers[layer].ffn, x, ids)
        np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
        got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert rel <= 2e-2, f"seed {seed} {len(jax.devices())} GPUs layer {layer} {strategy}: {rel:.2e}"


def test_combine_adds_in_ascending_expert_id():
    """``experts.combine`` (ranks and selects, no sort) equals the spec's order written with a stable argsort, bit
    for bit: each token's choices added in ascending expert id, equal ids (a repeated hash-map entry, another
    device's -1) in choice order. Magnitudes spread over 2**+-20 so that any other order changes the fp32 sums."""
    rng = np.random.default_rng(SEED)

    def by_argsort(y, idx):
        T, k = idx.shape
        order = jnp.argsort(idx, axis=-1, stable=True)
        ys = jnp.take_along_axis(y.reshape(T, k, -1), order[..., None], axis=1)
        acc = ys[:, 0]
        for j in range(1, k):
            acc = acc + ys[:, j]
        return acc

    orders_differ = 0
    for trial in range(40):
        T, k, D = int(rng.integers(1, 5)), int(rng.integers(1, 8)), 16
        idx = jnp.asarray(rng.integers(-1, 6, (T, k)), jnp.int32)  # duplicates and -1 included
        y = jnp.asarray(rng.standard_normal((T * k, D)) * np.exp2(rng.integers(-20, 21, (T * k, D))), jnp.float32)
        got, want = jax.jit(ex.combine)(y, idx), jax.jit(by_argsort)(y, idx)
        np.testing.assert_array_equal(np.asarray(got).view(np.int32), np.asarray(want).view(np.int32),
                                      err_msg=f"trial {trial} ids {np.asarray(idx).tolist()} (seed {SEED})")
        plain = np.asarray(y).reshape(T, k, D).sum(1, dtype=np.float32)
        orders_differ += int((plain != np.asarray(want)).any())
    assert orders_differ > 10, "inputs too tame: the choice order and the id order give the same sums"
