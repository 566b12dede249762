"""The FP4 MoE kernels (``dsv4_jax/kernels/fp4_moe.py``) against the reference expert math (``experts.py``).

CPU: the ``@triton.jit`` kernels run under Triton's interpreter in ONE subprocess (``TRITON_INTERPRET`` must be set
before ``triton.jit`` decorates, and must not leak into this process), on torch CPU tensors, at small shapes.
GPU: the jax-triton path inside ``jit`` at V4-Flash / V4-Pro shapes (skipped without a GPU or jax-triton).

Oracles and tolerances. Stage 1 (``h = bf16(wt * silu(min(g, L)) * clip(u, -L, L))``) is compared with the same
formula in JAX (``quant.linear`` per pair); stage 2 (``y = bf16(act_quant(h) @ w2.T)``) with ``quant.linear`` applied
to the kernel's own ``h``; end to end with ``experts.pairs_gathered``. Both sides sum exact products in fp32 in
different orders (~1e-6 relative), so a bf16 rounding (of g, u, h, y) can land one ulp apart: we require every
element within one bf16 ulp of the row's largest value (2**-7 relative to it) and fewer than 1% of elements
different at all. End to end, a flipped ``h`` element can also move one e4m3 step after requantization; the
normwise error bound 2e-2 is ~5x the worst such effect (one element of a 128-block moving by 1/16 of the block max).
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import dsv4_jax as d
from dsv4_jax.kernels import triton_unavailable
from dsv4_jax.modeling import experts as ex
from dsv4_jax.modeling.quant import Fp4Tensor, dequant_fp4, quantize_act, quantized_input

SEED = 1234
BF16_ULP = 2.0**-7  # one ulp of the largest value in a row (bf16 keeps 8 significant bits)


def _weights(rng, E, I, D):
    def fp4(n, k):
        return Fp4Tensor(packed=jnp.asarray(rng.integers(0, 256, (E, n, k // 2)), jnp.uint8),
                         scale=jnp.asarray(rng.integers(119, 126, (E, n, k // 32)), jnp.uint8))

    return fp4(I, D), fp4(D, I), fp4(I, D)  # w1 [E,I,D], w2 [E,D,I], w3 [E,I,D]


def _pairs(rng, T, k, E, kind):
    """Token/expert/weight triples: ``ragged`` (random, some ids of other devices' experts), ``hot`` (most pairs on one
    expert, half the experts empty)."""
    tok = np.repeat(np.arange(T), k).astype(np.int32)
    if kind == "hot":
        e = np.where(rng.random(T * k) < 0.8, 2, rng.choice([0, 5, E + 1], T * k))
    else:
        e = rng.integers(-1, E + 2, T * k)
        e[-1] = E + 1  # at least one pair of another device's expert
    return tok, e.astype(np.int32), rng.uniform(0.05, 2.0, T * k).astype(np.float32)


def _bf16(v):
    return np.asarray(v, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def _dense(w):
    return np.asarray(dequant_fp4(w))  # exact fp32 [E, N, K]


def _hidden_ref(cfg, xq, tok, e, wt, w1, w3):
    """Stage 1 oracle in numpy (float64 sums): h [R, I] (bf16 values) and the unclamped g (clamp coverage)."""
    sel = np.clip(e, 0, w1.packed.shape[0] - 1)
    xr = np.asarray(xq, np.float64)[tok]  # [R, D]
    g = _bf16(np.einsum("rd,rid->ri", xr, _dense(w1)[sel]))
    u = _bf16(np.einsum("rd,rid->ri", xr, _dense(w3)[sel]))
    lim = np.float32(cfg.swiglu_limit)
    gc = np.minimum(g, lim)
    a = gc / (np.float32(1) + np.exp(-gc)) * np.clip(u, -lim, lim)
    return _bf16(wt[:, None] * a), g


def _down_ref(h, e, w2):
    """Stage 2 oracle: the reference act_quant of the given h, float64 sums with the exact w2, bf16."""
    sel = np.clip(e, 0, w2.packed.shape[0] - 1)
    hq = np.asarray(quantized_input(jnp.asarray(h, jnp.bfloat16), True), np.float64)
    return _bf16(np.einsum("ri,rdi->rd", hq, _dense(w2)[sel]))


def _close_bf16(got, ref, what):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(got).all(), f"{what}: non-finite (unwritten) outputs"
    row_max = np.abs(ref).max(axis=-1, keepdims=True)
    err = np.abs(got - ref)
    assert (err <= BF16_ULP * row_max + 1e-30).all(), f"{what}: max err/row max {(err / row_max).max():.2e}"
    frac = float((err > 0).mean())
    assert frac < 0.01, f"{what}: {frac:.2%} of elements differ"


# ---------------------------------------------------------------------------------------------- CPU interpreter
# (tokens, expert loads, rows per block: None = the tiles() rule, 16 here, CODES); k=3, 8 local experts. BM=32
# exercises the multi-row blocks of prefill (a hot expert spanning several blocks, partly filled blocks of the others);
# CODES=1 the codes-domain dots (activation codes + block scales, weight scales on the partial products).
# "gemv" rows run the decode kernels of fp4_moe_gemv (one pair per block row, tile sizes of gemv_tiles("cpu")).
# "scaled" rows run the tl.dot_scaled kernels of fp4_moe_scaled (tests/triton_shim.py emulates the dot, which the
# interpreter lacks; stage 1 then returns h quantized: compared with the reference act_quant of the oracle's h).
# "wx" rows run the register-operand kernels of fp4_moe_wx (h quantized too, put back in column order); "wxbf" the
# same with the weights decoded through bf16 bit patterns (BFMUL=1).
CASES = [(1, "ragged", None, 0), (5, "ragged", None, 1), (40, "hot", 32, 0), (40, "hot", 32, 1),
         (1, "ragged", None, "gemv"), (5, "ragged", None, "gemv"), (40, "hot", None, "gemv"),
         (5, "ragged", None, "scaled"), (40, "hot", 32, "scaled"), (5, "ragged", None, "wx"), (40, "hot", 32, "wx"),
         (40, "hot", 32, "wxbf")]


def _interpret_main(inp: str, out: str):
    """Subprocess body: run ``launch_torch`` for every case stored in ``inp`` (npz), write h and y to ``out``."""
    import torch
    import triton_shim

    from dsv4_jax.kernels.fp4_moe import launch_torch
    from dsv4_jax.kernels.fp4_moe_gemv import launch_gemv_torch
    from dsv4_jax.kernels.fp4_moe_scaled import launch_scaled_torch
    from dsv4_jax.kernels.fp4_moe_wx import launch_wx_torch

    triton_shim.fix_interpreter()  # tl.dot_scaled

    z = np.load(inp)
    res = {}
    for c in range(int(z["n_cases"])):
        g = lambda n, c=c: torch.from_numpy(z[f"{c}_{n}"])  # noqa: E731
        t = {k: int(v) for k, v in zip(z[f"{c}_tile_keys"], z[f"{c}_tiles"])}
        w = [(g(f"w{i}p"), g(f"w{i}s")) for i in (1, 2, 3)]
        if "NG" in t:  # the GEMV kernels: the pairs as they come (bexp holds their expert ids)
            h, y = launch_gemv_torch(g("xin"), g("tok"), g("wt"), g("bexp"), *w, float(z["limit"]), t)
        elif t.get("SCALED"):  # h comes back as e4m3 and e8m0 bytes: its values, exactly
            hq, hs, y = launch_scaled_torch(g("xin"), g("xs"), g("tok"), g("wt"), g("rows"), g("bexp"), g("used"),
                                            *w, float(z["limit"]), t)
            hv = hq.numpy().view(ml_dtypes.float8_e4m3fn).astype(np.float32)
            h = torch.from_numpy(hv * np.repeat(np.exp2(hs.numpy().astype(np.float32) - 127), 128, axis=1))
        elif t.get("WX"):  # h comes back as its quantized values in the split-group order: put back in place
            hv, y = launch_wx_torch(g("xin"), g("tok"), g("wt"), g("rows"), g("bexp"), g("used"), *w,
                                    float(z["limit"]), t)
            n, I = hv.shape
            h = hv.reshape(n, I // 128, 2, 64).transpose(2, 3).reshape(n, I)
        else:
            h, y = launch_torch(g("xin"), g("xs"), g("tok"), g("wt"), g("rows"), g("bexp"), g("used"), *w,
                                float(z["limit"]), t)
        res[f"{c}_h"], res[f"{c}_y"] = h.numpy(), y.numpy()
    np.savez(out, **res)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    from dsv4_jax.kernels.fp4_moe import schedule, tiles
    from dsv4_jax.kernels.fp4_moe_gemv import gemv_tiles
    from dsv4_jax.kernels.fp4_moe_scaled import act_codes
    from dsv4_jax.kernels.fp4_moe_wx import split_groups

    rng = np.random.default_rng(SEED)
    cfg = d.Config.tiny()
    E, D, I, k = 8, 128, 128, 3
    w1, w2, w3 = _weights(rng, E, I, D)
    arrays, cases = {"limit": np.float32(cfg.swiglu_limit), "n_cases": len(CASES)}, []
    for c, (T, kind, bm, codes) in enumerate(CASES):
        x = jnp.asarray(rng.standard_normal((T, D)) * 2, jnp.float32).astype(jnp.bfloat16)
        xq = quantized_input(x, True)
        tok, e, wt = _pairs(rng, T, k, E, kind)
        if codes == "gemv":
            t = gemv_tiles("cpu", D, I, len(tok))
        elif codes == "scaled":
            t = {**tiles("cpu", len(tok), E, D, I), **({"BM": bm} if bm else {}), "SCALED": 1, "BN1": 128}
        elif codes in ("wx", "wxbf"):
            t = {**tiles("cpu", len(tok), E, D, I), **({"BM": bm} if bm else {}), "WX": 1,
                 "BFMUL": int(codes == "wxbf")}
        else:
            t = {**tiles("cpu", len(tok), E, D, I), **({"BM": bm} if bm else {}), "CODES": codes}
        if codes == 1:
            t["G"] = 4
            qa = quantize_act(x, 128)
            xin, xs = np.asarray(qa.q.astype(jnp.float32)), np.asarray(qa.scale, np.float32)
        elif codes == "gemv":
            xin, xs = np.asarray(x.astype(jnp.float32)), np.zeros(1, np.float32)  # raw: quantized by act_words
        elif codes == "scaled":
            xin, xs = map(np.asarray, act_codes(x))  # e4m3 and e8m0 bytes
        elif codes in ("wx", "wxbf"):
            xin, xs = np.asarray(split_groups(xq)), np.zeros(1, np.float32)  # the quantized values, split groups
        else:
            xin, xs = np.asarray(xq), np.zeros(1, np.float32)
        if codes == "gemv":  # block row r = pair r, its expert id as it comes
            none = np.zeros(1, np.int32)
            rows, bexp, used = none, np.asarray(e, np.int32), none
            slot = np.where((e >= 0) & (e < E), np.arange(len(e)), len(e))
        else:
            rows, bexp, used, slot = schedule(jnp.asarray(e), E, t["BM"])
        arrays[f"{c}_tile_keys"] = np.array(list(t))
        arrays.update({f"{c}_tiles": np.array(list(t.values())), f"{c}_xin": xin, f"{c}_xs": xs, f"{c}_tok": tok,
                       f"{c}_wt": wt, f"{c}_rows": np.asarray(rows), f"{c}_bexp": np.asarray(bexp),
                       f"{c}_used": np.asarray(used)})
        for i, w in zip((1, 2, 3), (w1, w2, w3)):
            arrays[f"{c}_w{i}p"], arrays[f"{c}_w{i}s"] = np.asarray(w.packed), np.asarray(w.scale)
        cases.append(dict(T=T, kind=kind, x=x, xq=xq, tok=tok, e=e, wt=wt, slot=np.asarray(slot),
                          direct=codes == "gemv", scaled=codes in ("scaled", "wx", "wxbf")))
    tmp = tmp_path_factory.mktemp("fp4_moe")
    np.savez(tmp / "in.npz", **arrays)
    env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__, str(tmp / "in.npz"), str(tmp / "out.npz")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"interpreter subprocess failed:\n{proc.stderr[-4000:]}"
    out = np.load(tmp / "out.npz")
    return cfg, (w1, w2, w3), cases, out


@pytest.mark.parametrize("c", range(len(CASES)),
                         ids=[f"T{T}-{kind}-" + (c if isinstance(c, str) else f"codes{c}")
                              for T, kind, bm, c in CASES])
def test_interpreter_matches_reference(interpreted, c):
    """Each stage and the per-pair output of the interpreted kernels against the reference, on ragged loads with
    empty experts and ids of other devices' experts (rows 1, 5) and one hot expert (40 tokens)."""
    cfg, (w1, w2, w3), cases, out = interpreted
    cs = cases[c]
    h_k, y_k = out[f"{c}_h"], out[f"{c}_y"]
    n_local, n_slots = w1.packed.shape[0], h_k.shape[0]
    valid = (cs["e"] >= 0) & (cs["e"] < n_local)
    slot = cs["slot"]
    assert (slot[valid] < n_slots).all() and (slot[~valid] == n_slots).all()
    assert len(set(slot[valid].tolist())) == valid.sum(), "two pairs share a slot"
    tok, e, wt = cs["tok"], cs["e"], cs["wt"]
    h_ref, g_raw = _hidden_ref(cfg, cs["xq"], tok[valid], e[valid], wt[valid], w1, w3)
    if cs["T"] == 40:
        assert np.abs(g_raw).max() > cfg.swiglu_limit, "inputs too small to exercise the clamp"
    hv = h_k[slot[valid]]  # [V, I]
    if cs["scaled"]:  # h quantized in the kernel: one e4m3 step (<= 32/448 of its block's max) where an h differs
        ref_q = np.asarray(quantized_input(jnp.asarray(h_ref, jnp.bfloat16), True), np.float64)
        err = np.abs(hv - ref_q)
        assert (err <= 0.08 * np.abs(ref_q).max(-1, keepdims=True) + 1e-30).all(), f"case {c} stage 1 (hq)"
        assert (err > 0).mean() < 0.01, f"case {c} stage 1 (hq): {(err > 0).mean():.2%} of elements differ"
    else:
        _close_bf16(hv, h_ref, f"case {c} stage 1 (h)")
    _close_bf16(y_k[slot[valid]], _down_ref(hv, e[valid], w2), f"case {c} stage 2 (y from the kernel's h)")
    if cs["direct"]:  # the output is the pairs' result as it stands: other devices' pairs are zeros
        assert (~valid).any() and (y_k[~valid] == 0).all(), f"case {c}: other devices' pairs not zero"
    y_pairs = np.where(valid[:, None], y_k[np.minimum(slot, n_slots - 1)], 0.0)
    args = (cs["x"], cs["xq"], *map(jnp.asarray, (tok, e, wt)), w1, w2, w3)
    ref = np.asarray(jax.jit(ex.pairs_gathered, static_argnums=0)(cfg, *args))
    assert (ref[~valid] == 0).all()
    rel = np.linalg.norm(y_pairs - ref) / np.linalg.norm(ref)
    assert rel <= 2e-2, f"case {c}: end-to-end normwise error {rel:.2e}"


def test_wide_blocks_from_full_experts():
    """sm90's WX kernels take 128-pair blocks with 8 warps only where the mean load per local expert reaches
    ``WX_WIDE_PAIRS`` (64K-token chunks of V4-Flash; measured, ``tiles``' comment); an 8K-token chunk keeps 64."""
    from dsv4_jax.kernels.fp4_moe import WX_WIDE_PAIRS, tiles

    D, I, E = 4096, 2048, 256
    assert {k: tiles("sm90", 8192 * 6, E, D, I)[k] for k in ("BM", "num_warps", "WX")} == dict(BM=64, num_warps=4, WX=1)
    assert {k: tiles("sm90", 65536 * 6, E, D, I)[k] for k in ("BM", "num_warps")} == dict(BM=128, num_warps=8)
    assert tiles("sm90", WX_WIDE_PAIRS * 8 - 1, 8, D, I)["BM"] == 64  # by the mean over the local experts
    assert tiles("sm90", WX_WIDE_PAIRS * 8, 8, D, I)["BM"] == 128
    assert tiles("gfx950", 65536 * 6, E, D, I)["BM"] == 64  # the native scaled dots: not measured wide


def test_bf16_weight_decode_only_where_measured():
    """The WX kernels' bf16 decode (``BFMUL``) is sm90's plan (timed and GPU-checked there); every other target keeps
    the fp32 decode (no WX kernels by default, and ``BFMUL`` 0 where a plan override asks for them)."""
    from dsv4_jax.kernels.fp4_moe import tiles

    D, I, E = 4096, 2048, 256
    assert tiles("sm90", 8192 * 6, E, D, I)["BFMUL"] == 1
    for target in ("sm80", "gfx950", "gfx9"):
        assert tiles(target, 8192 * 6, E, D, I).get("BFMUL", 0) == 0, target


def test_bad_shapes_named():
    """Shapes the kernels cannot tile are refused with the tensor at fault named (no silent fallback)."""
    from dsv4_jax.kernels.fp4_moe import check_shapes, tiles

    rng = np.random.default_rng(SEED)
    w1, w2, w3 = _weights(rng, 2, 128, 128)
    t = tiles("sm90", 6, 2, 128, 128)
    x = jnp.zeros((1, 128), jnp.float32)
    assert check_shapes(x, w1, w2, w3, t) == (2, 128, 128)
    bad = Fp4Tensor(packed=w2.packed[:, :64], scale=w2.scale[:, :64])
    with pytest.raises(ValueError, match=r"w2\.packed has shape \(2, 64, 64\)"):
        check_shapes(x, w1, bad, w3, t)
    with pytest.raises(ValueError, match="x has 96 features"):
        check_shapes(jnp.zeros((1, 96)), w1, w2, w3, t)
    w1i, w2i, w3i = _weights(rng, 2, 96, 128)  # I = 96: not a multiple of the 128-wide FP8 block of h
    with pytest.raises(ValueError, match="I=96 is not tiled"):
        check_shapes(x, w1i, w2i, w3i, t)
    from dsv4_jax.kernels.fp4_moe_wx import check_wx_shapes

    check_wx_shapes(256, 128, {"BN2": 128})
    with pytest.raises(ValueError, match=r"\(WX\): expert shape D=160"):  # the K steps are 128 columns wide
        check_wx_shapes(160, 128, {"BN2": 32})


# ---------------------------------------------------------------------------------------------- GPU (jax-triton)
gpu = pytest.mark.skipif(triton_unavailable() is not None, reason=f"FP4 MoE kernels: {triton_unavailable()}")


# (tokens, routing, tile overrides): the default plan (32 local experts: the GEMV kernels up to 32 pairs, the tiled
# kernels above, on an H200 the tl.dot_scaled ones), the GEMV kernels forced at 16 and 64 tokens (one hot expert: many
# pairs on one weight tile; 32 rows per program), the tiled kernels forced at decode sizes, and the register-
# dequantizing tiled kernels (SCALED=0) in both dot variants (CODES), and the tensor-core GEMV (GEMV=2, and GEMV=3
# with its e4m3 dots; opt-in), and the FMA GEMV with 512-column steps at 16 tokens (its one-token plan, NG 16, on a
# hot expert) and with 256-column ones at one token (the plan before 2026-12-03) under a register cap; the WX kernels
# with the fp32 weight decode (BFMUL=0: other targets' form; sm90's plan decodes through bf16 bit patterns).
GPU_CASES = ([(T, kind, {}) for T, kind in [(1, "route"), (4, "route"), (16, "route"), (64, "route"), (64, "hot"),
                                            (2048, "route")]]
             + [(16, "hot", {"GEMV": 1}), (64, "route", {"GEMV": 1}), (4, "route", {"GEMV": 0})]
             + [(64, "hot", {"SCALED": 0}), (2048, "route", {"SCALED": 0})]
             + [(1, "route", {"GEMV": 0, "SCALED": 0, "CODES": 1}), (64, "hot", {"SCALED": 0, "CODES": 1}),
                (2048, "route", {"SCALED": 0, "CODES": 1})]
             + [(T, kind, {"GEMV": g}) for g in (2, 3) for T, kind in [(1, "route"), (16, "route"), (32, "route"),
                                                                         (16, "hot")]]
             + [(64, "hot", {"WX": 1}), (2048, "route", {"WX": 1}), (2048, "hot", {"WX": 1, "BM": 128, "num_warps": 8})]
             + [(64, "hot", {"WX": 1, "BFMUL": 0}), (2048, "route", {"WX": 1, "BFMUL": 0})]
             + [(16, "hot", {"GEMV": 1, "NG": 16, "num_warps": 8}),
                (1, "route", {"GEMV": 1, "NG": 8, "num_warps": 4, "maxnreg": 96})])


@gpu
@pytest.mark.parametrize("model", ["flash", "pro"])
@pytest.mark.parametrize("T,kind,tile", GPU_CASES, ids=[f"T{T}-{k}-{'-'.join(f'{a}{b}' for a, b in t.items())}"
                                                        for T, k, t in GPU_CASES])
def test_gpu_matches_reference(model, T, kind, tile):
    """jax-triton kernels inside jit vs the reference schedules at full expert shapes (a 32-expert slice of the
    stack keeps memory small; ids past it stand for other devices' experts): GEMV and tiled kernels, both dot
    variants of the tiled ones (``CODES``)."""
    from dsv4_jax.kernels.fp4_moe import fp4_moe_pairs_triton

    cfg = d.Config.v4_flash() if model == "flash" else d.Config.v4_pro()
    rng = np.random.default_rng(SEED + T)
    E, D, I, k = 32, cfg.dim, cfg.moe_inter_dim, cfg.n_activated_experts
    w1, w2, w3 = _weights(rng, E, I, D)
    x = jnp.asarray(rng.standard_normal((T, D)), jnp.bfloat16)
    xq = quantized_input(x, True)
    tok = jnp.repeat(jnp.arange(T, dtype=jnp.int32), k)
    e = rng.integers(0, E + E // 4, T * k) if kind == "route" else np.where(rng.random(T * k) < .8, 3, 7)
    e, wt = jnp.asarray(e, jnp.int32), jnp.asarray(rng.uniform(0.05, 2.0, T * k), jnp.float32)
    got = jax.jit(functools.partial(fp4_moe_pairs_triton, cfg, tile=tile))(x, xq, tok, e, wt, w1, w2, w3)
    ref_fn = ex.pairs_grouped if T * k >= E else ex.pairs_gathered
    ref = jax.jit(ref_fn, static_argnums=0)(cfg, x, xq, tok, e, wt, w1, w2, w3)
    got = _assert_close(got, ref, f"{model} T={T} {kind} {tile}")
    assert (got[~(np.asarray(e) < E)] == 0).all()


@gpu
@pytest.mark.parametrize("model", ["flash", "pro"])
@pytest.mark.parametrize("T,pf", [(1, 1), (1, 2), (4, 2), (16, 3)], ids=["T1-PF1", "T1-PF2", "T4-PF2", "T16-PF3"])
def test_gpu_prefetch_changes_no_bit(model, T, pf):
    """``PF`` (the FMA GEMV's L2 prefetches, CUDA only, opt-in) asks for lines and changes nothing else: the outputs
    equal the same plan's without it bit for bit (other devices' pairs included: zeros)."""
    from dsv4_jax.kernels import arch
    from dsv4_jax.kernels.fp4_moe import fp4_moe_pairs_triton

    if not arch().startswith("sm"):
        pytest.skip("PF is PTX: NVIDIA GPUs only")
    cfg = d.Config.v4_flash() if model == "flash" else d.Config.v4_pro()
    rng = np.random.default_rng(SEED + 31 * T + pf)
    E, D, I, k = 32, cfg.dim, cfg.moe_inter_dim, cfg.n_activated_experts
    w1, w2, w3 = _weights(rng, E, I, D)
    x = jnp.asarray(rng.standard_normal((T, D)), jnp.bfloat16)
    xq = quantized_input(x, True)
    tok = jnp.repeat(jnp.arange(T, dtype=jnp.int32), k)
    e = jnp.asarray(rng.integers(0, E + E // 4, T * k), jnp.int32)
    wt = jnp.asarray(rng.uniform(0.05, 2.0, T * k), jnp.float32)
    run = lambda tile: np.asarray(jax.jit(functools.partial(fp4_moe_pairs_triton, cfg, tile=tile))(  # noqa: E731
        x, xq, tok, e, wt, w1, w2, w3))
    base, got = run({"GEMV": 1}), run({"GEMV": 1, "PF": pf})
    assert np.isfinite(base).all() and np.array_equal(got, base), f"{model} T={T} PF={pf}: outputs differ"


def test_prefetch_refused_off_nvidia():
    """``PF`` is PTX inline assembly: the route refuses it, by name, where the target is not an NVIDIA GPU (here the
    CPU), before anything is launched."""
    from dsv4_jax.kernels import fp4_moe

    cfg = d.Config.v4_flash(dim=256, moe_inter_dim=256, n_routed_experts=8, n_activated_experts=2)
    rng = np.random.default_rng(SEED)
    w1, w2, w3 = _weights(rng, 8, 256, 256)
    x = jnp.asarray(rng.standard_normal((1, 256)), jnp.bfloat16)
    tok, e, wt = jnp.zeros(2, jnp.int32), jnp.asarray([1, 5], jnp.int32), jnp.ones(2, jnp.float32)
    with pytest.raises(ValueError, match="PF=2 .*NVIDIA"):
        fp4_moe.fp4_moe_pairs_triton(cfg, x, quantized_input(x, True), tok, e, wt, w1, w2, w3,
                                     tile={"GEMV": 1, "PF": 2})


def _assert_close(got, ref, what: str):
    """The GPU tests' bounds (module docstring): finite, normwise error <= 2e-2, fewer than 1 % of elements beyond
    one bf16 ulp of their row's largest value. Prints the errors (``-s``); returns ``got`` as float64."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(got).all(), what
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    frac = float((np.abs(got - ref) > BF16_ULP * np.abs(ref).max(-1, keepdims=True)).mean())
    print(f"{what}: normwise {rel:.2e}, beyond one ulp of row max {frac:.2%}, differing {(got != ref).mean():.2%}")
    assert rel <= 2e-2, f"{what}: normwise error {rel:.2e}"
    assert frac < 0.01, f"{what}: {frac:.2%} of elements beyond one bf16 ulp of row max"
    return got


@gpu
@pytest.mark.parametrize("T", [1, 64])
@pytest.mark.parametrize("tile", [{"GEMV": 1}, {"GEMV": 2}, {"GEMV": 3}, {"GEMV": 3, "ACC": 32}],
                         ids=["GEMV1", "GEMV2", "GEMV3", "GEMV3-ACC32"])
def test_gpu_small_experts(T, tile):
    """The golden model's expert shape (D = I = 256: the tensor-core GEMV's one-step K loop, ``NW = K / 8``), 8
    experts, 2 per token, every GEMV kernel forced: the same bounds as :func:`test_gpu_matches_reference`; the
    errors are printed so that kernels can be compared (``-s``)."""
    from dsv4_jax.kernels.fp4_moe import fp4_moe_pairs_triton

    cfg = d.Config.v4_flash(dim=256, moe_inter_dim=256, n_routed_experts=8, n_activated_experts=2)
    rng = np.random.default_rng(SEED + 7 * T)
    E, D, I, k = 8, 256, 256, 2
    w1, w2, w3 = _weights(rng, E, I, D)
    x = jnp.asarray(rng.standard_normal((T, D)), jnp.bfloat16)
    xq = quantized_input(x, True)
    tok = jnp.repeat(jnp.arange(T, dtype=jnp.int32), k)
    e = jnp.asarray(rng.integers(0, E, T * k), jnp.int32)
    wt = jnp.asarray(rng.uniform(0.05, 2.0, T * k), jnp.float32)
    got = jax.jit(functools.partial(fp4_moe_pairs_triton, cfg, tile=tile))(x, xq, tok, e, wt, w1, w2, w3)
    ref = jax.jit(ex.pairs_gathered, static_argnums=0)(cfg, x, xq, tok, e, wt, w1, w2, w3)
    _assert_close(got, ref, f"D=I=256 T={T} {tile}")


if __name__ == "__main__":  # the interpreter subprocess of ``interpreted``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # triton_shim
    _interpret_main(sys.argv[1], sys.argv[2])
