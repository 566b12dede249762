"""The fused mHC ``hc_pre`` kernels (``dsv4_jax/kernels/mhc.py``) against the XLA reference (``modeling/hyper.py``).

CPU: both ``@triton.jit`` kernels under Triton's interpreter in a subprocess (``TRITON_INTERPRET=1`` must be set
before triton is imported) on torch CPU tensors; GPU: the jitted launcher (skipped without a GPU).

Tolerance. Both sides evaluate the same formula in fp32 in the same order except the two K-long sums (the mixes'
dot products and the sum of squares: split-K partials here, XLA's order there) and ``exp``/``sigmoid``
(ulp-level). The inputs are scaled like the model's (``fn`` rows of norm ~1 against RMS-normalised streams), so
the mixes are O(1) and their K-sums agree to ~sqrt(K) * 2**-24 relative (~2**-17 at K = 16K); through the sigmoids
(slope <= 1/2) and the Sinkhorn normalisations of a 4x4 matrix of entries in (0, 1] that stays below 2**-14
absolute for ``post`` and ``comb``. ``y`` is rounded once to bf16 on both sides from fp32 values that differ by
~2**-14 relative at most: one bf16 ulp, plus an absolute slack for cancellation. Where the streams nearly cancel
(``|y|`` far below ``sum_j |pre_j x_j|``, which half a million outputs of a prefill case always contain) the fp32
sums of both sides differ by their rounding and by the ~2**-20 drift of ``pre`` (measured: the excess over one ulp
stays below 2**-26 ``sum_j |x_j|`` at the V4-Flash batch-32 shape under the interpreter), so ``y`` may also be off by
``2**-18 sum_j |x_j|`` (times the norm's scale with the fused norm). A wrong stream, split, row or iteration count
is off by O(1e-2..1) of that sum.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_shim  # noqa: E402

# (name, T tokens, hc, D, sinkhorn iters, plan, fused norm)
CASES = [
    ("decode", 1, 4, 256, 20, dict(NS=4, BK=64, BT=2, BD=128, num_warps=4, warps2=4), False),
    ("batch-ragged-split", 5, 4, 200, 20, dict(NS=3, BK=64, BT=2, BD=128, num_warps=4, warps2=4), False),  # K, D tails
    ("one-split-few-iters", 3, 2, 128, 3, dict(NS=1, BK=64, BT=4, BD=64, num_warps=4, warps2=4), False),
    ("decode-norm", 2, 4, 256, 20, dict(NS=4, BK=64, BT=2, BD=256, num_warps=4, warps2=4), True),
    ("ragged-norm", 3, 4, 200, 20, dict(NS=3, BK=64, BT=2, BD=256, num_warps=4, warps2=4), True),  # masked tail
    # the GPU decode regime: many splits of one or two K steps each (K = 1024: 16 splits of 64)
    ("many-splits", 1, 4, 256, 20, dict(NS=16, BK=64, BT=4, BD=256, num_warps=4, warps2=4), True),
    # whole 128-wide blocks with a masked tail (BD > D, as V4-Pro's 7168 in 8192): the quantized row's padding
    ("padded-norm", 2, 4, 384, 20, dict(NS=2, BK=64, BT=2, BD=512, num_warps=4, warps2=4), True),
]
QROW = [i for i, c in enumerate(CASES) if c[-1] and c[3] % 128 == 0]  # cases with the quantized row (yq)
# the fused hc_post form (the previous block's output folded into the first kernel), fused norm always (as the model
# calls it): (name, T, hc, D, plan); the quantized row where D is a multiple of 128
POST_CASES = [  # the form's splits are the plan's NS / hc, each BK columns of every stream per step
    ("post-decode", 1, 4, 256, dict(NS=4, BK=64, BT=2, BD=256, num_warps=4, warps2=4)),  # 1 split, 4 steps
    ("post-ragged", 3, 4, 200, dict(NS=8, BK=64, BT=2, BD=256, num_warps=4, warps2=4)),  # 2 splits of 128, D tail
    ("post-many-splits", 2, 4, 256, dict(NS=16, BK=64, BT=4, BD=256, num_warps=4, warps2=4)),  # 4 splits of 64
    # the block output as its linear's 3 fp32 split-K partials (quant.SplitSum), summed by the kernel
    ("post-partials", 3, 4, 256, dict(NS=8, BK=64, BT=2, BD=256, num_warps=4, warps2=4)),
]
OUT_SPLITS = {"post-partials": 3}
SEED = 2718
ABS_MIX = 2.0**-14
ABS_Y = 2.0**-18  # cancellation slack of y, relative to sum_j |x_j| (module docstring)
NORM_ULPS = 2.0  # hc_pre_norm: y's bf16 rounding may differ by one ulp on either side of a tie, then the norm rounds


def _inputs(T, hc, D, seed):
    """Streams ``h [T, hc, D]`` (bf16, RMS ~1 with per-stream scales) and mHC weights shaped like the model's."""
    import jax.numpy as jnp

    from dsv4_jax.modeling.weights import HcWeights

    rng = np.random.default_rng(seed)
    nmix, K = hc * (2 + hc), hc * D
    h = jnp.asarray(rng.standard_normal((T, hc, D)) * np.exp2(rng.integers(-1, 2, (T, hc, 1))), jnp.bfloat16)
    fn = jnp.asarray(rng.standard_normal((nmix, K)) / np.sqrt(K) * 2, jnp.float32)
    base = jnp.asarray(rng.standard_normal(nmix), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 2.0, 3), jnp.float32)
    return h, HcWeights(fn=fn, base=base, scale=scale)


def _post_inputs(T, hc, D, seed, splits=0):
    """The previous block's output ``out [T, D]`` (bf16, RMS ~1; with ``splits``: fp32 partials ``[splits, T, D]``),
    its value (bf16), its ``post [T, hc]`` in (0, 2) and a positive ``comb [T, hc, hc]`` with rows summing to ~1 (as
    ``hc_pre`` makes them), fp32."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed + 7)
    out = jnp.asarray(rng.standard_normal((T, D)), jnp.bfloat16)
    if splits:  # fp32 partials [splits, T, D] and their value: summed in split order, rounded once
        out = rng.standard_normal((splits, T, D)).astype(np.float32)
        val = out[0]
        for s in range(1, splits):
            val = val + out[s]
        return out, jnp.asarray(val, jnp.bfloat16), *_post_rest(rng, T, hc)
    return out, out, *_post_rest(rng, T, hc)


def _post_rest(rng, T, hc):
    import jax.numpy as jnp

    post = jnp.asarray(rng.uniform(0.0, 2.0, (T, hc)), jnp.float32)
    c = rng.uniform(0.05, 1.0, (T, hc, hc))
    comb = jnp.asarray(c / c.sum(-1, keepdims=True), jnp.float32)
    return post, comb


def _cfg(hc, D, iters):
    from dsv4_jax.config import Config

    return Config.tiny(hc_mult=hc, dim=D, hc_sinkhorn_iters=iters)


def _norm_weight(D, seed):
    import jax.numpy as jnp

    return jnp.asarray(np.random.default_rng(seed + 99).uniform(0.5, 1.5, D), jnp.bfloat16)


def _reference(cfg, h, w, nw=None):
    """``hyper.hc_pre`` (then ``rms_norm`` with ``nw``, as ``hc_pre_norm``'s reference) -> fp32 numpy arrays
    ``y, post, comb`` and ``mag [T, D]``: the size of y's terms, ``sum_j |x_j|`` (times ``nw * rsqrt(mean(y**2) +
    eps)`` with the norm), the scale of its cancellation slack."""
    from dsv4_jax.kernels.mhc import hc_pre_norm
    from dsv4_jax.modeling import hyper

    y, post, comb = hyper.hc_pre(cfg, h[:, None], w)
    mag = np.abs(np.asarray(h, np.float32)).sum(1)
    if nw is not None:
        y0 = np.asarray(y[:, 0].astype(np.float32))
        mag *= np.asarray(nw, np.float32) / np.sqrt((y0 * y0).mean(-1, keepdims=True) + cfg.norm_eps)
        y, post, comb = hc_pre_norm(cfg.with_(kernels="reference"), h[:, None], w, nw)
    return np.asarray(y[:, 0].astype(np.float32)), np.asarray(post[:, 0]), np.asarray(comb[:, 0]), mag


def _check(got, ref, what, ulps=1.0):
    (y, post, comb), (ry, rpost, rcomb, mag) = got, ref
    for name, a in (("y", y), ("post", post), ("comb", comb)):
        assert np.isfinite(a).all(), f"{what}: non-finite {name}"
    np.testing.assert_allclose(post, rpost, rtol=0, atol=ABS_MIX, err_msg=f"{what}: post")
    np.testing.assert_allclose(comb, rcomb, rtol=0, atol=ABS_MIX, err_msg=f"{what}: comb")
    ulp = np.exp2(np.floor(np.log2(np.maximum(np.abs(ry), 2.0**-126))) - 7)  # one bf16 ulp of the reference
    err = np.abs(y - ry) - ABS_Y * mag  # beyond the cancellation slack
    assert (err <= ulps * ulp).all(), (f"{what}: y off by {np.max(err / ulp):.2f} bf16 ulps beyond "
                                       f"{ABS_Y:.1e} sum|x| (allowed {ulps})")


def _interpret_main(path: str) -> None:
    """Subprocess body: both kernels under the interpreter on every case stored in ``path``."""
    import torch

    from dsv4_jax.kernels.mhc import run_torch

    z = dict(np.load(path))
    res = {}
    for i, (_, _, _, _, iters, p, norm) in enumerate(CASES):
        t = lambda k, i=i: torch.from_numpy(z[f"{k}{i}"].copy())  # noqa: E731
        y, post, comb, *yq = run_torch(t("h").view(torch.bfloat16), t("fn"), t("scale"), t("base"),
                                       float(z["hc_eps"]), float(z["norm_eps"]), iters, p,
                                       t("nw").view(torch.bfloat16) if norm else None, qy=i in QROW)
        res.update({f"y{i}": y.numpy(), f"post{i}": post.numpy(), f"comb{i}": comb.numpy()})
        if yq:  # the fused norm's cases also write the quantized row
            res[f"yq{i}"] = yq[0].numpy()
    for i, (_, _, _, D, p) in enumerate(POST_CASES):
        t = lambda k, i=i: torch.from_numpy(z[f"P{k}{i}"].copy())  # noqa: E731
        o = t("out")
        prev = (o if o.dtype == torch.float32 else o.view(torch.bfloat16), t("post"), t("comb"))
        y, post, comb, *yq, hn = run_torch(t("h").view(torch.bfloat16), t("fn"), t("scale"), t("base"),
                                           float(z["hc_eps"]), float(z["norm_eps"]), 20, p,
                                           t("nw").view(torch.bfloat16), qy=D % 128 == 0, prev=prev)
        res.update({f"Py{i}": y.numpy(), f"Ppost{i}": post.numpy(), f"Pcomb{i}": comb.numpy(),
                    f"Ph{i}": hn.view(torch.int16).numpy()})
        if yq:
            res[f"Pyq{i}"] = yq[0].numpy()
    np.savez(path + ".out.npz", **res)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    arrays, refs = {}, []
    for i, (_, T, hc, D, iters, _, norm) in enumerate(CASES):
        cfg = _cfg(hc, D, iters)
        h, w = _inputs(T, hc, D, SEED + i)
        nw = _norm_weight(D, SEED + i)
        arrays.update({f"h{i}": np.asarray(h).view(np.uint16), f"fn{i}": np.asarray(w.fn),
                       f"scale{i}": np.asarray(w.scale), f"base{i}": np.asarray(w.base),
                       f"nw{i}": np.asarray(nw).view(np.uint16)})
        refs.append(_reference(cfg, h, w, nw if norm else None))
    for i, (_, T, hc, D, _) in enumerate(POST_CASES):
        h, w = _inputs(T, hc, D, SEED + 50 + i)
        out, _, post, comb = _post_inputs(T, hc, D, SEED + 50 + i, OUT_SPLITS.get(POST_CASES[i][0], 0))
        out = np.asarray(out) if out.dtype == np.float32 else np.asarray(out).view(np.uint16)  # partials / bf16
        arrays.update({f"Ph{i}": np.asarray(h).view(np.uint16), f"Pfn{i}": np.asarray(w.fn),
                       f"Pscale{i}": np.asarray(w.scale), f"Pbase{i}": np.asarray(w.base),
                       f"Pnw{i}": np.asarray(_norm_weight(D, SEED + 50 + i)).view(np.uint16),
                       f"Pout{i}": out, f"Ppost{i}": np.asarray(post),
                       f"Pcomb{i}": np.asarray(comb)})
    arrays.update(hc_eps=np.float32(cfg.hc_eps), norm_eps=np.float32(cfg.norm_eps))
    return refs, triton_shim.interpret(__file__, arrays, tmp_path_factory.mktemp("mhc"))


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_interpreter_matches_reference(interpreted, i):
    refs, out = interpreted
    _check((out[f"y{i}"], out[f"post{i}"], out[f"comb{i}"]), refs[i], CASES[i][0], NORM_ULPS if CASES[i][-1] else 1)


def _quantized_values(y) -> np.ndarray:
    """``quant.quantize_act`` of the rows ``y`` as the model stores them (bf16), as fp32 values: the oracle of the
    finish kernel's ``yq``, bit for bit."""
    import jax.numpy as jnp

    from dsv4_jax.modeling.quant import quantize_act

    return np.asarray(quantize_act(jnp.asarray(y, jnp.float32).astype(jnp.bfloat16)).dequant(), np.float32)


@pytest.mark.parametrize("i", QROW, ids=[CASES[i][0] for i in QROW])
def test_interpreter_quantized_row(interpreted, i):
    """The fused norm's quantized output: ``quantize_act`` of the kernel's own normed row (rounded to bf16), bit for
    bit (the row itself is checked against the reference above)."""
    _, out = interpreted
    got, want = out[f"yq{i}"], _quantized_values(out[f"y{i}"])
    assert np.isfinite(got).all(), f"{CASES[i][0]}: unwritten yq"
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=CASES[i][0])


@pytest.mark.parametrize("i", range(len(POST_CASES)), ids=[c[0] for c in POST_CASES])
def test_interpreter_post_matches_reference(interpreted, i):
    """The fused ``hc_post`` form: the streams it writes equal ``hyper.hc_post``'s bit for bit (the same fp32
    operations in the same order, one rounding); ``y``, ``post``, ``comb`` match the reference ``hc_pre_norm`` of
    those streams within the tolerances above, and the quantized row is ``quantize_act`` of ``y`` bit for bit."""
    import jax.numpy as jnp

    from dsv4_jax.modeling import hyper

    _, out = interpreted
    name, T, hc, D, _ = POST_CASES[i]
    cfg = _cfg(hc, D, 20)
    h, w = _inputs(T, hc, D, SEED + 50 + i)
    _, o, post, comb = _post_inputs(T, hc, D, SEED + 50 + i, OUT_SPLITS.get(name, 0))
    want = hyper.hc_post(cfg, o[:, None], h[:, None], post[:, None], comb[:, None])[:, 0]  # [T, hc, D] bf16
    got = out[f"Ph{i}"].view(np.uint16)
    np.testing.assert_array_equal(got, np.asarray(want).view(np.uint16), err_msg=f"{name}: streams")
    ref = _reference(cfg, jnp.asarray(want), w, _norm_weight(D, SEED + 50 + i))
    _check((out[f"Py{i}"], out[f"Ppost{i}"], out[f"Pcomb{i}"]), ref, name, NORM_ULPS)
    if D % 128 == 0:
        yq = out[f"Pyq{i}"]
        np.testing.assert_array_equal(yq.view(np.uint32), _quantized_values(out[f"Py{i}"]).view(np.uint32),
                                      err_msg=f"{name}: yq")


def test_fuse_post_switch():
    """The fused hc_post form is off unless ``DSV4_MHC_FUSE_POST=1`` (a GPU test run turns it on for a process)."""
    import os
    import subprocess

    code = "import dsv4_jax.kernels.mhc as m; print(m.FUSE_POST)"
    got = {}
    for value in ("", "1", "0"):
        env = {k: v for k, v in os.environ.items() if k != "DSV4_MHC_FUSE_POST"}
        if value:
            env["DSV4_MHC_FUSE_POST"] = value
        r = subprocess.run([sys.executable, "-c", code], env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        got[value] = r.stdout.strip()
    assert got == {"": "False", "1": "True", "0": "False"}, got


def test_check_catches_plausible_kernel_bugs():
    """The tolerances see the mistakes a kernel could make: one Sinkhorn iteration more (before convergence, at 3
    iterations), ``comb`` transposed, the stream weights of streams 0 and 1 swapped."""
    import jax.numpy as jnp

    _, T, hc, D, iters, _, _ = CASES[2]
    h, w = _inputs(T, hc, D, SEED)
    ref = _reference(_cfg(hc, D, iters), h, w)
    bad = {"one more iteration": _reference(_cfg(hc, D, iters + 1), h, w),
           "comb transposed": (ref[0], ref[1], np.swapaxes(ref[2], -1, -2), ref[3])}
    swap = np.arange(hc * (2 + hc))
    swap[[0, 1]] = [1, 0]
    swapped = w.replace(fn=w.fn[jnp.asarray(swap)], base=w.base[jnp.asarray(swap)])
    bad["pre weights swapped"] = _reference(_cfg(hc, D, iters), h, swapped)
    for what, got in bad.items():
        with pytest.raises(AssertionError):
            _check(got[:3], ref, what)


def test_dispatch_keeps_reference_on_cpu_and_with_auto():
    """On the CPU backend ``kernels="auto"`` runs the reference, bit for bit."""
    from dsv4_jax.kernels.mhc import hc_pre, hc_pre_norm
    from dsv4_jax.modeling import hyper
    from dsv4_jax.modeling.layers import rms_norm

    _, T, hc, D, iters, _, _ = CASES[1]
    h, w = _inputs(T, hc, D, 1)
    cfg = _cfg(hc, D, iters)
    a = hc_pre(cfg, h[:, None], w)
    b = hyper.hc_pre(cfg, h[:, None], w)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x.astype(np.float32)), np.asarray(y.astype(np.float32)))
    nw = _norm_weight(D, 1)
    a = hc_pre_norm(cfg, h[:, None], w, nw)
    b = rms_norm(hyper.hc_pre(cfg, h[:, None], w)[0], nw, cfg.norm_eps, cfg.act_dtype)
    np.testing.assert_array_equal(np.asarray(a[0].astype(np.float32)), np.asarray(b.astype(np.float32)))


def test_tile_override_is_checked(monkeypatch):
    """``DSV4_MHC_TILE`` reaches the GPU plan (not the interpreter's), and a wrong entry is refused, named."""
    from dsv4_jax.kernels.mhc import plan

    base = plan(1, 4, 4096, "sm90", norm=True)
    monkeypatch.setenv("DSV4_MHC_TILE", "NS=256,BK=32")
    assert plan(1, 4, 4096, "sm90", norm=True) == {**base, "NS": 256, "BK": 32}
    assert plan(1, 4, 4096, "cpu", norm=True)["NS"] == 2
    monkeypatch.setenv("DSV4_MHC_TILE", "BD=512")
    with pytest.raises(ValueError, match="DSV4_MHC_TILE='BD=512'"):
        plan(1, 4, 4096, "sm90")


def test_bad_weights_are_named():
    """Weights of another hc_mult/dim are refused naming the shapes."""
    import jax.numpy as jnp

    from dsv4_jax.kernels.mhc import hc_pre_triton

    _, T, hc, D, iters, _, _ = CASES[0]
    h, w = _inputs(T, hc, D, 3)
    w = w.replace(fn=jnp.zeros((5, hc * D), jnp.float32))
    with pytest.raises(ValueError, match="mHC weights fn"):
        hc_pre_triton(_cfg(hc, D, iters), h[:, None], w)


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.parametrize("norm", [False, True], ids=["hc_pre", "hc_pre_norm"])
@pytest.mark.parametrize("case", [("flash-decode", 1, 4, 4096), ("flash-batch32", 32, 4, 4096),
                                  ("pro-decode", 1, 4, 7168), ("flash-prefill", 512, 4, 4096)], ids=lambda c: c[0])
def test_gpu_matches_reference(case, norm):
    """V4-Flash / V4-Pro shapes (hc 4, D 4096 / 7168, 20 Sinkhorn iterations) inside jit, with the plan of the
    card; with and without the fused RMSNorm."""
    from dsv4_jax.kernels import triton_unavailable

    why = triton_unavailable()
    if why is not None:
        pytest.skip(f"mHC GPU test: {why}")
    import jax

    from dsv4_jax.kernels.mhc import hc_pre_norm_triton, hc_pre_triton

    name, T, hc, D = case
    cfg = _cfg(hc, D, 20)
    h, w = _inputs(T, hc, D, SEED)
    nw = _norm_weight(D, SEED)
    if norm:
        y, post, comb = jax.jit(hc_pre_norm_triton, static_argnums=0)(cfg, h[:, None], w, nw)
    else:
        y, post, comb = jax.jit(hc_pre_triton, static_argnums=0)(cfg, h[:, None], w)
    got = (np.asarray(y[:, 0].astype(np.float32)), np.asarray(post[:, 0]), np.asarray(comb[:, 0]))
    _check(got, _reference(cfg, h, w, nw if norm else None), name, NORM_ULPS if norm else 1)
    if norm:  # the quantized row the block's FP8 linears take (kernel path of hc_pre_norm_quant), bit for bit
        from dsv4_jax.kernels.mhc import hc_pre_norm_quant

        y2, yq, _, _ = jax.jit(hc_pre_norm_quant, static_argnums=0)(cfg.with_(kernels="triton"), h[:, None], w, nw)
        np.testing.assert_array_equal(np.asarray(y2.astype(np.float32)), np.asarray(y.astype(np.float32)))
        want = _quantized_values(np.asarray(y[:, 0].astype(np.float32)))
        np.testing.assert_array_equal(np.asarray(yq[:, 0].astype(np.float32)).view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("case", [("flash-decode", 1, 4, 4096, 0), ("flash-decode-partials", 1, 4, 4096, 5),
                                  ("flash-batch32", 32, 4, 4096, 0), ("pro-decode-partials", 1, 4, 7168, 7),
                                  ("flash-prefill", 512, 4, 4096, 0)], ids=lambda c: c[0])
def test_gpu_post_matches_reference(case):
    """The fused ``hc_post`` form at V4 shapes inside jit with the card's plan: the streams it writes within one bf16
    ulp of XLA's ``hyper.hc_post`` (both compilers may contract a product and a sum into one fma differently; the
    interpreter test checks the formula bit for bit) and equal to them nearly everywhere, also from split-K partials
    of the block output (wo_b's, 5 splits at V4-Flash's decode plan); ``y``/``post``/``comb``
    against the reference ``hc_pre_norm`` of the kernel's own streams, the quantized row bit for bit."""
    from dsv4_jax.kernels import triton_unavailable

    why = triton_unavailable()
    if why is not None:
        pytest.skip(f"mHC GPU test: {why}")
    import jax
    import jax.numpy as jnp

    from dsv4_jax.kernels.mhc import hc_post_pre_norm_quant_triton
    from dsv4_jax.modeling import hyper
    from dsv4_jax.modeling.quant import SplitSum

    name, T, hc, D, splits = case
    cfg = _cfg(hc, D, 20)
    h, w = _inputs(T, hc, D, SEED + 3)
    raw, o, post, comb = _post_inputs(T, hc, D, SEED + 3, splits)
    nw = _norm_weight(D, SEED + 3)
    args = (o[:, None], h[:, None], post[:, None], comb[:, None], w, nw)
    if splits:  # the block output as its linear's split-K partials, which the kernel sums
        kargs = (SplitSum(jnp.asarray(raw)[:, :, None], jnp.bfloat16), *args[1:])
    else:
        kargs = args
    hn, y, yq, p2, c2 = jax.jit(hc_post_pre_norm_quant_triton, static_argnums=0)(cfg, *kargs)
    want = np.asarray(jax.jit(hyper.hc_post, static_argnums=0)(cfg, *args[:4])[:, 0].astype(jnp.float32))
    got = np.asarray(hn[:, 0].astype(jnp.float32))
    ulp = np.exp2(np.floor(np.log2(np.maximum(np.abs(want), 2.0**-126))) - 7)
    assert (np.abs(got - want) <= ulp).all(), f"{name}: streams off by {np.max(np.abs(got - want) / ulp):.1f} ulps"
    assert np.mean(got != want) < 1e-2, f"{name}: {np.mean(got != want):.3%} of the streams differ"
    ref = _reference(cfg, hn[:, 0], w, nw)
    _check((np.asarray(y[:, 0].astype(jnp.float32)), np.asarray(p2[:, 0]), np.asarray(c2[:, 0])), ref, name,
           NORM_ULPS)
    want_q = _quantized_values(np.asarray(y[:, 0].astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(yq[:, 0].astype(jnp.float32)).view(np.uint32), want_q.view(np.uint32))


if __name__ == "__main__":  # the interpreter subprocess of `interpreted`
    _interpret_main(sys.argv[1])
