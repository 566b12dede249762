"""The FP4 decode GEMV with its weights copied ahead by ``cp.async`` (:mod:`dsv4_jax.kernels.fp4_moe_gemv_async`).

CPU: its plans and their errors, and its sm_90a builds (Gluon has no interpreter): no spills, the weight words
copied by 16-byte ``cp.async`` (LDGSTS), shared memory small enough for many programs per SM. GPU (sm_90, torch
launch and jax-triton inside ``jit``): bit for bit the portable GEMV kernels' output where both step through K alike
(the same arithmetic in the same order), and within ``tests/test_kernels_fp4_moe.py``'s bounds of the reference
schedule with the default plans, at V4-Flash and V4-Pro expert shapes, pairs of other devices' experts included.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_kernels_fp4_moe import SEED, _assert_close, _weights  # noqa: E402
from test_kernels_sm90 import _compile  # noqa: E402

import dsv4_jax as d  # noqa: E402

ga = pytest.importorskip("dsv4_jax.kernels.fp4_moe_gemv_async")

MODELS = {"flash": d.Config.v4_flash, "pro": d.Config.v4_pro}


def test_plans_and_their_errors():
    """Default plans (4 warps; gate/up 512-column steps of 8 rows, down 256-column steps of 16 rows), overrides per
    stage, and errors naming the stage, the shape and the plan."""
    p1, p2 = ga.plans(4096, 2048, 6)
    assert (p1["NG"], ga.rows(p1), p2["NG"], ga.rows(p2)) == (16, 8, 8, 16)
    p1, p2 = ga.plans(4096, 2048, 6, {"NG2": 16, "NS": 4})
    assert (p1["NS"], p2["NS"], p2["NG"], ga.rows(p2)) == (4, 4, 16, 8)
    p1, p2 = ga.plans(4096, 2048, 6, {"GT": 2})
    assert (ga.rows(p1), ga.rows(p2)) == (16, 32)
    with pytest.raises(ValueError, match=r"GT 1 or 2"):
        ga.check_plan("down", 2048, 4096, {**p2, "GT": 4})
    with pytest.raises(ValueError, match=r"tile keys \['BN'\] do not apply"):
        ga.plans(4096, 2048, 6, {"BN": 8})
    with pytest.raises(ValueError, match=r"\(down\): K=2000, N=4096"):
        ga.check_plan("down", 2000, 4096, p2)
    with pytest.raises(ValueError, match=r"\(gate_up\): K=4096, N=2044"):
        ga.check_plan("gate_up", 4096, 2044, p1)


@pytest.mark.parametrize("model", ["flash", "pro"])
@pytest.mark.parametrize("over", [{}, {"NS": 4, "NG2": 16}], ids=["default", "4-stages-512-column-down"])
def test_sm90_builds(model, over):
    """Both kernels' sm_90a builds at the model's expert shape: no spills, 16-byte ``cp.async`` copies of the
    weights, at most 20 KB of shared memory a program (11+ programs of 4 warps fit an SM's 227 KB)."""
    if ga.gluon is None:
        pytest.skip("this triton has no Gluon")
    cfg = MODELS[model]()
    D, I, E = cfg.dim, cfg.moe_inter_dim, cfg.n_routed_experts
    p1, p2 = ga.plans(D, I, 6, over)
    cases = [(ga._gate_up_kernel, dict(xa_ptr="*fp32", xf_ptr="*fp32", tok_ptr="*i32", wt_ptr="*fp32", e_ptr="*i32",
                                       w1p="*u8", w1s="*u8", w3p="*u8", w3s="*u8", h_ptr="*bf16"),
              dict(D=D, I=I, LIMIT=10.0, **ga._grid_meta(p1, E)), p1),
             (ga._down_kernel, dict(ha_ptr="*fp32", hf_ptr="*fp32", e_ptr="*i32", w2p="*u8", w2s="*u8", y_ptr="*bf16"),
              dict(D=D, I=I, **ga._grid_meta(p2, E)), p2)]
    for fn, ptrs, meta, p in cases:
        sass = []
        shared, spills = _compile(fn, ptrs, meta, dict(num_warps=p["num_warps"]), sass, gluon=True)
        assert spills == 0 and shared <= 20480, (fn.__name__, p, shared, spills)
        assert "LDGSTS.E.BYPASS.128" in "\n".join(sass), fn.__name__


def _gpu():
    torch = pytest.importorskip("torch")
    if ga.gluon is None or not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs an sm_90 GPU (Gluon cp.async kernels, tested on Hopper)")
    return torch


def _case(model, T, seed):
    """A 32-expert slice of the model's stack, ``T`` tokens of 6 pairs each, a quarter of the ids past the slice
    (other devices' experts)."""
    cfg = MODELS[model]()
    rng = np.random.default_rng(seed)
    E, D, I, k = 32, cfg.dim, cfg.moe_inter_dim, cfg.n_activated_experts
    w1, w2, w3 = _weights(rng, E, I, D)
    x = rng.standard_normal((T, D)).astype(np.float32)
    tok = np.repeat(np.arange(T, dtype=np.int32), k)
    e = rng.integers(0, E + E // 4, T * k).astype(np.int32)
    wt = rng.uniform(0.05, 2.0, T * k).astype(np.float32)
    return cfg, (w1, w2, w3), x, tok, e, wt


@pytest.mark.parametrize("model", ["flash", "pro"])
@pytest.mark.parametrize("T", [1, 4], ids=["T1", "T4"])
def test_gpu_bit_for_bit_with_the_portable_gemv(model, T):
    """With the portable kernels' K step in both stages (``NG2 = 16``), ``h`` and ``y`` equal theirs bit for bit
    (the same products and sums in the same order); other devices' pairs: ``h`` unwritten, ``y`` zeros in both."""
    torch = _gpu()
    from dsv4_jax.kernels import fp4_moe_gemv

    cfg, ws, x, tok, e, wt = _case(model, T, SEED + T)
    D, I = cfg.dim, cfg.moe_inter_dim
    cu = lambda a: torch.from_numpy(np.asarray(a)).cuda()  # noqa: E731
    w1, w2, w3 = [(cu(w.packed), cu(w.scale)) for w in ws]
    xt = cu(x).to(torch.bfloat16)
    args = (xt, cu(tok), cu(wt), cu(e), w1, w2, w3, float(cfg.swiglu_limit))
    t = fp4_moe_gemv.gemv_tiles("sm90", D, I, T * 6)
    assert t["NG"] == 16
    h0, y0 = fp4_moe_gemv.launch_gemv_torch(*args, t)
    p1, p2 = ga.plans(D, I, T * 6, {"NG2": 16})
    h1, y1 = ga.launch_torch(*args, p1, p2)
    mine = torch.from_numpy(e < 32).cuda()
    assert torch.equal(h1[mine], h0[mine]) and torch.equal(y1, y0)
    assert torch.isnan(h1[~mine]).all() and (y1[~mine] == 0).all()


@pytest.mark.parametrize("model", ["flash", "pro"])
@pytest.mark.parametrize("T", [1, 4, 16], ids=["T1", "T4", "T16"])
def test_gpu_jax_route_matches_reference(model, T):
    """``fp4_moe_pairs_triton`` with ``GEMV=4`` (the default plans, jax-triton through :mod:`gluon_route`) inside
    ``jit`` against the reference schedule: the GPU tests' bounds of ``tests/test_kernels_fp4_moe.py``."""
    _gpu()
    import jax
    import jax.numpy as jnp

    from dsv4_jax.kernels.fp4_moe import fp4_moe_pairs_triton
    from dsv4_jax.modeling import experts as ex
    from dsv4_jax.modeling.quant import quantized_input

    cfg, (w1, w2, w3), x, tok, e, wt = _case(model, T, SEED + 10 * T)
    x = jnp.asarray(x, jnp.bfloat16)
    xq = quantized_input(x, True)
    tok, e, wt = jnp.asarray(tok), jnp.asarray(e), jnp.asarray(wt)
    got = jax.jit(functools.partial(fp4_moe_pairs_triton, cfg, tile={"GEMV": 4}))(x, xq, tok, e, wt, w1, w2, w3)
    ref = jax.jit(ex.pairs_gathered, static_argnums=0)(cfg, x, xq, tok, e, wt, w1, w2, w3)
    got = _assert_close(got, ref, f"{model} T={T} GEMV=4")
    assert (got[~(np.asarray(e) < 32)] == 0).all()


def test_route_refuses_bad_input_before_launching():
    """``fp4_moe_pairs_triton(..., tile={"GEMV": 4})`` names a plan key that does not apply and a token width that
    does not match the experts before anything is launched (so it fails the same way without a GPU)."""
    import jax.numpy as jnp

    from dsv4_jax.kernels.fp4_moe import fp4_moe_pairs_triton

    cfg = d.Config.v4_flash(dim=256, moe_inter_dim=256, n_routed_experts=8, n_activated_experts=2)
    w1, w2, w3 = _weights(np.random.default_rng(SEED), 8, 256, 256)
    tok = e = jnp.zeros((2,), jnp.int32)
    wt = jnp.ones((2,), jnp.float32)
    x = jnp.zeros((1, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"tile keys \['BM'\] do not apply"):
        fp4_moe_pairs_triton(cfg, x, x, tok, e, wt, w1, w2, w3, tile={"GEMV": 4, "BM": 16})
    x = jnp.zeros((1, 512), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"x has 512 features, the experts take 256"):
        fp4_moe_pairs_triton(cfg, x, x, tok, e, wt, w1, w2, w3, tile={"GEMV": 4})
