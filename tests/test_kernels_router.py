"""The router kernels (``dsv4_jax/kernels/router.py``) against the XLA reference (``route_reference``).

CPU: both ``@triton.jit`` kernels under Triton's interpreter in a subprocess (``TRITON_INTERPRET=1`` must be set
before triton is imported) on torch CPU tensors; GPU: the jitted launcher (skipped without a GPU).

Tolerance. Both sides compute the same formula in fp32; the D-long dot and the k-long weight sum are added in other
orders and ``exp``/``log``/``sqrt`` differ by ulps. With O(1) logits (gate rows and tokens scaled like the
model's) the logits agree to ~sqrt(D) * 2**-24 * sum|x*g| ~ 1e-6 absolute, the scores to a few fp32 ulps more, and
the normalised weights to ``RTOL = 2e-5`` relative. The selections must be EQUAL: the inputs keep distinct biased
scores apart by far more than that, and the exact ties are built to be exact on both sides (identical gate rows
and biases): two tied experts both selected (the lower id first) and a tie at the k-th place (only the lower id).
The hash case uses logits down to -40, where ``log1p`` must not lose the weight (``log(1 + y)`` alone gives 0).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_shim  # noqa: E402

# (name, T, E, D, k, hash routing, plan overrides: the prefill forms' dots over 16 x 64 tiles, fp32 and bf16
# operands, ragged T and D)
CASES = [("learned-flash", 3, 256, 320, 6, False, {}), ("learned-pro-ragged", 2, 384, 200, 6, False, {}),
         ("hash-tiny-logits", 4, 64, 128, 6, True, {}),
         ("learned-dot", 21, 256, 200, 6, False, {"DOT": 1, "BT": 16, "BE": 64, "BK": 32}),
         ("hash-dot", 18, 64, 128, 6, True, {"DOT": 1, "BT": 16, "BE": 32, "BK": 32}),
         ("learned-bf16-dot", 21, 256, 200, 6, False, {"DOT": 2, "BT": 16, "BE": 64, "BK": 32}),
         ("hash-bf16-dot", 18, 64, 128, 6, True, {"DOT": 2, "BT": 16, "BE": 32, "BK": 32})]
SEED = 1618
RTOL = 2e-5
PREFILL_DOT = {"DOT": 1, "BT": 64, "BE": 64, "BK": 32}  # the prepared prefill plan (router.plan's docstring)


def _inputs(T, E, D, k, hashed, seed):
    """Tokens, gate (bf16), bias with built-in exact ties, or a hash map; see the module docstring."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, D))
    g = rng.standard_normal((E, D)) / np.sqrt(D)
    ids = rng.integers(0, 50, T).astype(np.int32)
    if hashed:
        g[: E // 2] *= 40 * -np.sign(x[0] @ g[: E // 2].T)[:, None]  # half the logits far negative for token 0
        tid2eid = np.stack([rng.permutation(E)[:k] for _ in range(50)]).astype(np.int32)
        tid2eid[ids[0]] = np.arange(k)  # token 0 reads the far-negative experts
        if ids[-1] != ids[0]:  # a row naming one expert twice: the ranks keep such ties in position order
            tid2eid[ids[-1], :2] = tid2eid[ids[-1], 1]
        bias = None
    else:
        g[7], g[12] = g[3], g[11]  # identical rows: exactly tied scores
        bias = np.full(E, -10.0)
        bias[[3, 7]] = 10.0  # both tied experts first, the lower id first
        bias[[20, 40, 60]] = 5.0 + np.arange(3)
        bias[[11, 12]] = 2.0  # tied at the k-th place: only 11
        bias = jnp.asarray(bias, jnp.float32)
        tid2eid = None
    return (jnp.asarray(x, jnp.bfloat16), jnp.asarray(g, jnp.bfloat16), bias,
            None if tid2eid is None else jnp.asarray(tid2eid), jnp.asarray(ids))


def _cfg(E, k):
    from dsv4_jax.config import Config

    return Config.tiny(n_routed_experts=E, n_activated_experts=k, route_scale=2.5)


def _check(got, ref, what):
    (idx, wts), (ridx, rwts) = got, ref
    np.testing.assert_array_equal(idx, ridx, err_msg=f"{what}: selections")
    assert np.isfinite(wts).all() and (wts > 0).all(), f"{what}: weights {wts}"
    np.testing.assert_allclose(wts, rwts, rtol=RTOL, atol=0, err_msg=f"{what}: weights")


def _reference(cfg, x, g, bias, tid2eid, ids):
    from dsv4_jax.kernels.router import route_reference

    idx, wts = route_reference(cfg, g, bias, tid2eid, x, ids)
    return np.asarray(idx), np.asarray(wts)


def _interpret_main(path: str) -> None:
    triton_shim.fix_interpreter()  # the interpreter's bf16 dot (the DOT=2 cases) and roundings
    import torch

    from dsv4_jax.kernels.router import plan, run_torch

    z = dict(np.load(path))
    res = {}
    for i, (_, T, E, D, k, hashed, over) in enumerate(CASES):
        t = lambda n, i=i: torch.from_numpy(z[f"{n}{i}"].copy())  # noqa: E731
        idx, wts, _, rank = run_torch(t("x").view(torch.bfloat16), t("g").view(torch.bfloat16),
                                      None if hashed else t("b"), t("map") if hashed else None,
                                      t("ids") if hashed else None, k, 2.5, {**plan(T, E, D, "cpu"), **over},
                                      ranks=True)
        res[f"idx{i}"], res[f"wts{i}"], res[f"rank{i}"] = idx.numpy(), wts.numpy(), rank.numpy()
    np.savez(path + ".out.npz", **res)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    arrays, refs = {}, []
    for i, (_, T, E, D, k, hashed, _) in enumerate(CASES):
        x, g, bias, tid2eid, ids = _inputs(T, E, D, k, hashed, SEED + i)
        arrays.update({f"x{i}": np.asarray(x).view(np.uint16), f"g{i}": np.asarray(g).view(np.uint16),
                       f"ids{i}": np.asarray(ids)})
        if hashed:
            arrays[f"map{i}"] = np.asarray(tid2eid)
        else:
            arrays[f"b{i}"] = np.asarray(bias)
        refs.append(_reference(_cfg(E, k), x, g, bias, tid2eid, ids))
    return refs, triton_shim.interpret(__file__, arrays, tmp_path_factory.mktemp("router"))


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_interpreter_matches_reference(interpreted, i):
    refs, out = interpreted
    _check((out[f"idx{i}"], out[f"wts{i}"]), refs[i], CASES[i][0])
    from dsv4_jax.modeling.experts import choice_ranks

    want = np.asarray(choice_ranks(np.asarray(out[f"idx{i}"])))  # the MoE's combine order of these choices
    assert (out[f"rank{i}"] == want).all(), f"{CASES[i][0]}: ranks differ from experts.choice_ranks"


def test_inputs_exercise_ties_and_tiny_scores():
    """The built-in ties decide the order (3 before 7, 11 in and 12 out) and the hash case has weights that
    ``log(1 + exp(l))`` would round to zero: the interpreter test would catch a wrong tie-break or a naive log1p."""
    _, T, E, D, k, _, _ = CASES[0]
    x, g, bias, _, ids = _inputs(T, E, D, k, False, SEED)
    idx, _ = _reference(_cfg(E, k), x, g, bias, None, ids)
    assert (idx[:, :2] == [3, 7]).all() and (idx == 11).any(axis=1).all() and not (idx == 12).any()
    _, T, E, D, k, _, _ = CASES[2]
    x, g, _, tid2eid, ids = _inputs(T, E, D, k, True, SEED + 2)
    logits = np.asarray(x, np.float32) @ np.asarray(g, np.float32).T
    sel = logits[0, np.asarray(tid2eid)[int(ids[0])]]
    assert (sel < -17).any() and (np.log(np.float32(1) + np.exp(sel.astype(np.float32))) == 0).any()


def test_dispatch_keeps_reference_with_auto():
    """On the CPU backend ``kernels="auto"`` runs the reference, bit for bit (the model's MoE goes through
    :func:`route`)."""
    from dsv4_jax.kernels.router import route

    _, T, E, D, k, _, _ = CASES[1]
    x, g, bias, _, ids = _inputs(T, E, D, k, False, 5)
    cfg = _cfg(E, k)
    a, b = route(cfg, g, bias, None, x, ids), _reference(cfg, x, g, bias, None, ids)
    np.testing.assert_array_equal(np.asarray(a[0]), b[0])
    np.testing.assert_array_equal(np.asarray(a[1]), b[1])


def test_bad_shapes_are_named():
    import jax.numpy as jnp

    from dsv4_jax.kernels.router import route_triton

    _, T, E, D, k, _, _ = CASES[0]
    x, g, bias, _, ids = _inputs(T, E, D, k, False, 3)
    with pytest.raises(ValueError, match="bias of shape"):
        route_triton(_cfg(E, k), g, jnp.zeros((E - 1,)), None, x, ids)
    with pytest.raises(ValueError, match="gate has shape"):
        route_triton(_cfg(E, k), g[:, :-1], bias, None, x, ids)


def test_tile_override_is_checked(monkeypatch):
    """``DSV4_ROUTER_TILE`` reaches the plan, and a wrong entry is refused with the variable named."""
    from dsv4_jax.kernels.router import SELECT_WARPS, plan

    monkeypatch.setenv("DSV4_ROUTER_TILE", "DOT=1,BT=64,BE=64,BK=32")
    sw = {"SW": SELECT_WARPS} if SELECT_WARPS else {}  # the decode size's selection warps stay (not overridden)
    assert plan(32, 256, 4096, "sm90") == dict(BE=64, BT=64, BK=32, DOT=1, num_warps=4, **sw)
    monkeypatch.setenv("DSV4_ROUTER_TILE", "DOT=yes")
    with pytest.raises(ValueError, match="DSV4_ROUTER_TILE='DOT=yes'"):
        plan(1, 256, 4096, "sm90")


def test_gpu_plan_takes_the_dot_form_from_prefill_sizes(monkeypatch):
    """Decode sizes keep the decode form, prefill chunks from ``DOT_MIN_TOKENS`` tokens take the ``DOT`` form (the
    measured one, ``plan``'s docstring)."""
    from dsv4_jax.kernels import router

    monkeypatch.delenv("DSV4_ROUTER_TILE", raising=False)
    n = router.DOT_MIN_TOKENS
    assert [router.plan(T, 256, 4096, "sm90")["DOT"] for T in (1, 32, n - 1, n, 8192)] == [0, 0, 0, 1, 1]
    assert router.plan(8192, 256, 4096, "sm90") == {"BE": 64, "BT": 64, "BK": 32, "DOT": 1, "num_warps": 4}
    m = router.BF16_DOT_MIN_TOKENS
    bf16 = [router.plan(T, 256, 4096, "sm90", bf16=True)["DOT"] for T in (1, 32, m - 1, m, n, 8192)]
    assert bf16 == [0, 0, 0, 2, 2, 2]  # bf16 tokens and gate: their own dot (router.BF16_DOT, measured)
    assert router.plan(m, 256, 4096, "sm90", bf16=True) == {"BE": 32, "BT": 64, "BK": 64, "DOT": 2, "num_warps": 4}
    assert router.plan(8192, 256, 4096, "sm90", bf16=True) == {"BE": 64, "BT": 128, "BK": 64, "DOT": 2, "num_warps": 4}
    assert router.plan(8192, 256, 4096, "cpu", bf16=True)["DOT"] == 0  # the interpreter keeps its few-program form
    one = router.plan(1, 256, 4096, "sm90", bf16=True)  # one token: the whole row per program, a 1-warp selection
    assert (one["BE"], one["BK"], one.get("SW")) == (1, 4096, router.SELECT_WARPS or None), one


def test_bf16_dot_needs_bf16_operands():
    """The ``DOT=2`` plan multiplies the operands as they are: fp32 tokens (float32 numerics) are refused, named."""
    import jax.numpy as jnp

    from dsv4_jax.kernels.router import route_triton

    x, g, bias, tid2eid, ids = _inputs(4, 64, 128, 6, False, SEED)
    with pytest.raises(ValueError, match="DOT=2 plan needs bf16 tokens and gate, got float32"):
        route_triton(_cfg(64, 6), g, bias, tid2eid, x.astype(jnp.float32), ids, p={"DOT": 2})


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.parametrize("case", [("flash-decode", 1, 256, 4096, 6, False), ("flash-batch32", 32, 256, 4096, 6, False),
                                  ("pro-decode", 1, 384, 7168, 6, False), ("flash-hash", 8, 256, 4096, 6, True),
                                  ("flash-prefill", 1024, 256, 4096, 6, False),
                                  ("flash-prefill-256", 256, 256, 4096, 6, False),
                                  ("flash-prefill-dot", 8192, 256, 4096, 6, False, PREFILL_DOT),
                                  ("flash-prefill-bf16-dot", 8192, 256, 4096, 6, False,
                                   {"DOT": 2, "BT": 64, "BE": 64, "BK": 64}),
                                  ("pro-prefill-plan", 8192, 384, 7168, 6, False)], ids=lambda c: c[0])
def test_gpu_matches_reference(case):
    """V4-Flash / V4-Pro router shapes inside jit, in the plans ``plan`` picks for bf16 inputs: the decode form up to
    1,024 tokens, the ``DOT`` form at 8K; and both ``DOT`` forms at 8K by name (fp32 ``ieee``, bf16 operands)."""
    from dsv4_jax.kernels import triton_unavailable

    why = triton_unavailable()
    if why is not None:
        pytest.skip(f"router GPU test: {why}")
    import jax

    from dsv4_jax.kernels import arch
    from dsv4_jax.kernels.router import plan, route_triton_ranked
    from dsv4_jax.modeling.experts import choice_ranks

    name, T, E, D, k, hashed, *over = case
    x, g, bias, tid2eid, ids = _inputs(T, E, D, k, hashed, SEED)
    cfg = _cfg(E, k)
    p = {**plan(T, E, D, arch(), bf16=True), **(over[0] if over else {})}
    idx, wts, rank = jax.jit(lambda *a: route_triton_ranked(cfg, *a, p=p))(g, bias, tid2eid, x, ids)
    _check((np.asarray(idx), np.asarray(wts)), _reference(cfg, x, g, bias, tid2eid, ids), name)
    assert (np.asarray(rank) == np.asarray(choice_ranks(idx))).all(), f"{name}: ranks differ from choice_ranks"


if __name__ == "__main__":  # the interpreter subprocess of `interpreted`
    _interpret_main(sys.argv[1])
