"""FP8 linear / grouped-projection kernels (dsv4_jax/kernels/fp8_linear.py) against their XLA references.

CPU: the same ``@triton.jit`` kernel runs under Triton's interpreter in a subprocess (``TRITON_INTERPRET=1`` must be
set before ``triton.jit`` decorates, so it cannot run in this process) on inputs this process makes with fixed
seeds; the outputs are compared here with the reference.

Tolerances: every product is exact in both implementations (e4m3 x e4m3 scaled by powers of two; bf16 x bf16),
only the fp32 summation order differs. Reordering a K-term fp32 sum changes it by at most ~K * 2**-24 * sum|terms|,
so the fp32 outputs are compared against ``K * 2**-24 * (|x| @ |w|.T)``; rounded to bf16 the two may then land on
neighbouring values: one bf16 ulp. The kernel's default dot is exact (bf16 copies of the e4m3 codes, fp32
accumulation); the GPU sweep still allows 2**-8 * sum|terms| on top of one bf16 ulp for the FP8 linear, the bound
of the plan option ``FP8_DOT`` (Hopper's e4m3 tensor-core dot, as the official TileLang GEMM, adds a 128-wide
block's products in an accumulator of ~14 significant bits before the fp32 promotion: up to ~32 such additions per
output and block). The sweep ran on an H200 with that dot, before the default changed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_shim  # noqa: E402

# ------------------------------------------------------------------------------------------------ cases
# (M rows, G groups, N rows per group, K, fp8 activation?); rows <= GEMV_ROWS take the GEMV kernel
CPU_CASES = [
    (1, 1, 200, 384, True),  # GEMV; N not a multiple of the 16-row tile nor of the 128 scale block; split-K 2+1 blocks
    (3, 1, 200, 384, True),
    (5, 1, 72, 128, True),  # GEMV, one K step: no split
    (17, 1, 96, 256, True),  # 17 rows: a 32-row tile, 15 masked rows
    (80, 1, 136, 256, True),  # prefill kernel (fp8_prefill): 80 rows, N past the last full tile, 2 steps per block
    (1, 2, 192, 320, False),  # wo_a grouped: K=320 not a multiple of 128, groups straddle a scale block
    (3, 2, 192, 320, False),
    (17, 2, 64, 256, False),
    (70, 2, 192, 320, False),  # wo_a prefill: K=320 (a partial scale block), groups straddling a scale block
]


def _inputs(M, G, N, K, fp8, seed):
    """Random bf16 activation (rows of varied magnitude) and an FP8 block-scaled weight, from ``seed``."""
    import jax.numpy as jnp

    from dsv4_jax.modeling.quant import Fp8Tensor, quantize_fp8_weight_np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, G, K)).astype(np.float32) * np.exp2(rng.integers(-6, 6, (M, G, 1)))
    w = rng.standard_normal((G * N, K)).astype(np.float32) * np.exp2(rng.integers(-8, 0, (G * N, 1)))
    q, s = quantize_fp8_weight_np(w)
    return jnp.asarray(x, jnp.bfloat16), Fp8Tensor(q=jnp.asarray(q), scale=jnp.asarray(s))


def _reference(x, w, fp8: bool):
    """fp32 reference output ``[M, G, N]`` and the bound's ``|x| @ |w|.T`` (fp32, same shape)."""
    import jax.numpy as jnp

    from dsv4_jax.kernels.fp8_linear import fp8_linear_reference
    from dsv4_jax.modeling.quant import dequant, quantize_act

    M, G, K = x.shape
    wf = dequant(w).reshape(G, -1, K)
    if fp8:
        qa = quantize_act(x.reshape(M, K))
        ref = fp8_linear_reference(x.reshape(M, K), w, jnp.float32, qa).reshape(M, 1, -1)
        xa = jnp.abs(qa.dequant()).reshape(M, 1, K)
    else:
        ref = jnp.einsum("mgk,gnk->mgn", x.astype(jnp.float32), wf, precision="highest")
        xa = jnp.abs(x.astype(jnp.float32))
    mag = jnp.einsum("mgk,gnk->mgn", xa, jnp.abs(wf), precision="highest")
    return np.asarray(ref), np.asarray(mag)


def _bf16_ulp(v: np.ndarray) -> np.ndarray:
    """One bf16 ulp at |v| (8 significant bits), with the bf16 minimum normal's ulp as the floor."""
    e = np.floor(np.log2(np.maximum(np.abs(v), 2.0**-126)))
    return np.exp2(e - 7)


def _check(out32, out16, ref, mag, K, extra_rel=0.0, what=""):
    assert np.isfinite(out16).all(), f"{what}: non-finite output (unwritten poison?)"
    bound = (K * 2.0**-24 + extra_rel) * mag + 1e-30
    if out32 is not None:
        assert np.isfinite(out32).all(), f"{what}: non-finite fp32 output (unwritten poison?)"
        err = np.abs(out32 - ref)
        assert (err <= bound).all(), f"{what}: fp32 error {np.max(err / bound):.3g}x the reordering bound"
    ref16 = ref.astype(np.float32)
    ulp = _bf16_ulp(ref16) + bound  # one ulp, plus the fp32 reordering where the sum cancels below its terms
    err16 = np.abs(out16 - ref16)
    assert (err16 <= ulp).all(), f"{what}: bf16 output off by {np.max(err16 / ulp):.3g} ulp"


# ------------------------------------------------------------------------------------------------ CPU interpreter
def _interpret_main(path: str) -> None:
    """Subprocess body: run the kernel under the interpreter on the arrays in ``path`` (npz), write outputs back."""
    import torch

    from dsv4_jax.kernels import SM_COUNT, fp8_prefill
    from dsv4_jax.kernels.fp8_linear import gemv_plan, plan, run_gemv_torch, run_torch

    data = dict(np.load(path))
    out = {}
    for i, (M, G, N, K, fp8) in enumerate(CPU_CASES):
        x = torch.from_numpy(data[f"x{i}"])
        if fp8:
            x = x.view(torch.float8_e4m3fn)
        else:
            x = x.view(torch.bfloat16)
        sx = torch.from_numpy(data[f"sx{i}"])
        wq = torch.from_numpy(data[f"wq{i}"]).view(torch.float8_e4m3fn)
        ws = torch.from_numpy(data[f"ws{i}"])
        p = plan(M, N, K, G, target="cpu")
        out[f"p{i}"] = np.array([p.get("SPLIT", 1), 0 if p.get("GEMV") else -1 if p.get("WX") else p["BLOCK_M"]])
        xr = torch.from_numpy(data[f"xgemv{i}"]).view(torch.bfloat16)  # the quantized values or wo_a's raw input
        if p.get("GEMV"):  # bf16 values: the quantized activation (exact in bf16) or wo_a's raw input
            out[f"y32_{i}"] = run_gemv_torch(xr, wq, ws, G, torch.float32, p).numpy()  # several rows: RA + XL
            old = gemv_plan(M, N, K, G, SM_COUNT["cpu"], block_n=p["BLOCK_N"], xl=0, ra=0)  # before RA, XL defaults
            out[f"o32_{i}"] = run_gemv_torch(xr, wq, ws, G, torch.float32, old).numpy()
            out[f"xl32_{i}"] = run_gemv_torch(xr, wq, ws, G, torch.float32, old | {"XL": 1}).numpy()
            if M > 1:  # RA without XL (16-column chunks), and each row alone (the one-row plan)
                out[f"ra32_{i}"] = run_gemv_torch(xr, wq, ws, G, torch.float32, old | {"RA": 1, "CW": 16}).numpy()
                p1 = plan(1, N, K, G, target="cpu")
                out[f"rows32_{i}"] = np.concatenate(
                    [run_gemv_torch(xr[m:m + 1], wq, ws, G, torch.float32, p1).numpy() for m in range(M)])
            out[f"y16_{i}"] = run_gemv_torch(xr, wq, ws, G, torch.bfloat16, p).float().numpy()
        elif p.get("WX"):  # prefill: the same bf16 values
            out[f"y32_{i}"] = fp8_prefill.run_torch(xr, wq, ws, G, torch.float32, p).numpy()
            out[f"y16_{i}"] = fp8_prefill.run_torch(xr, wq, ws, G, torch.bfloat16, p).float().numpy()
        else:
            out[f"y32_{i}"] = run_torch(x, sx, wq, ws, G, torch.float32, fp8, p).numpy()
            out[f"y16_{i}"] = run_torch(x, sx, wq, ws, G, torch.bfloat16, fp8, p).float().numpy()
        if M > 8:  # the prefill kernel split over K (its few-rows plan, forced to split on a pretend 4-SM chip)
            sp = fp8_prefill.split_plan(M, N, K, G, sms=4, block_n=64, per_sm=8, num_warps=4, num_stages=1)
            out[f"s32_{i}"] = fp8_prefill.run_torch(xr, wq, ws, G, torch.float32, sp).numpy()
            out[f"ssplit_{i}"] = np.array(sp["SPLIT"])
    np.savez(path + ".out.npz", **out)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Inputs (fixed seeds), references, and the interpreter's outputs for every CPU case."""
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    import jax.numpy as jnp

    from dsv4_jax.modeling.quant import quantize_act

    arrays, cases = {}, []
    for i, (M, G, N, K, fp8) in enumerate(CPU_CASES):
        x, w = _inputs(M, G, N, K, fp8, seed=100 + i)
        if fp8:
            qa = quantize_act(x.reshape(M, K))
            arrays[f"x{i}"] = np.asarray(qa.q).view(np.uint8).reshape(M, 1, K)
            arrays[f"sx{i}"] = np.asarray(qa.scale, np.float32).reshape(M, 1, K // 128)
            xv = np.asarray(qa.dequant().astype(jnp.bfloat16)).reshape(M, 1, K)  # what fp8_linear's GEMV gets
            assert (xv.astype(np.float32) == np.asarray(qa.dequant()).reshape(M, 1, K)).all()  # exact in bf16
            arrays[f"xgemv{i}"] = xv.view(np.uint16)
        else:
            arrays[f"x{i}"] = np.asarray(x).view(np.uint16)
            arrays[f"sx{i}"] = np.zeros((1,), np.float32)
            arrays[f"xgemv{i}"] = np.asarray(x).view(np.uint16)
        arrays[f"wq{i}"] = np.asarray(w.q).view(np.uint8)
        arrays[f"ws{i}"] = np.asarray(w.scale)
        cases.append((x, w))
    return cases, triton_shim.interpret(__file__, arrays, tmp_path_factory.mktemp("fp8k"))


@pytest.mark.parametrize("i", range(len(CPU_CASES)), ids=[f"M{c[0]}-G{c[1]}-N{c[2]}-K{c[3]}" for c in CPU_CASES])
def test_interpreter_matches_reference(interpreted, i):
    cases, out = interpreted
    M, G, N, K, fp8 = CPU_CASES[i]
    x, w = cases[i]
    ref, mag = _reference(x, w, fp8)
    _check(out[f"y32_{i}"], out[f"y16_{i}"], ref, mag, K, what=f"case {CPU_CASES[i]}")


@pytest.mark.parametrize("i", [i for i, c in enumerate(CPU_CASES) if c[0] > 8],
                         ids=[f"M{c[0]}-G{c[1]}-N{c[2]}-K{c[3]}" for c in CPU_CASES if c[0] > 8])
def test_interpreter_prefill_kernel_split(interpreted, i):
    """The prefill kernel with K split into chunks of whole scale blocks (fp32 partials summed after), the last chunk
    partial where K is not a multiple of the chunk (K=320 in chunks of 128): within the fp32 reordering bound."""
    cases, out = interpreted
    M, G, N, K, fp8 = CPU_CASES[i]
    ref, mag = _reference(*cases[i], fp8)
    assert int(out[f"ssplit_{i}"]) > 1
    assert np.isfinite(out[f"s32_{i}"]).all()
    bound = K * 2.0**-24 * mag + 1e-30
    err = np.abs(out[f"s32_{i}"] - ref)
    assert (err <= bound).all(), f"case {CPU_CASES[i]}: split error {np.max(err / bound):.3g}x the reordering bound"


@pytest.mark.parametrize("i", [i for i, c in enumerate(CPU_CASES) if c[0] <= 8],
                         ids=[f"M{c[0]}-G{c[1]}-N{c[2]}-K{c[3]}" for c in CPU_CASES if c[0] <= 8])
def test_interpreter_gemv_xl_same_bits(interpreted, i):
    """The GEMV with ``XL`` (each thread loading the activations of its own weights) gives the plan without it the
    same fp32 outputs bit for bit: the same products summed in the same order, only where the activations come
    from differs."""
    _, out = interpreted
    assert np.isfinite(out[f"o32_{i}"]).all()
    assert np.array_equal(out[f"xl32_{i}"], out[f"o32_{i}"]), f"case {CPU_CASES[i]}: XL changed the outputs"


@pytest.mark.parametrize("i", [i for i, c in enumerate(CPU_CASES) if 1 < c[0] <= 8],
                         ids=[f"M{c[0]}-G{c[1]}-N{c[2]}-K{c[3]}" for c in CPU_CASES if 1 < c[0] <= 8])
def test_interpreter_gemv_ra_rows_as_one_row(interpreted, i):
    """``RA`` (one accumulator per row), without and with ``XL`` (the several-row default): within the fp32
    reordering bound of the reference, and every row of the several-row call equal to that row computed alone (the
    one-row plan) bit for bit: the same chunk sums in the same order, whatever the row count."""
    cases, out = interpreted
    M, G, N, K, fp8 = CPU_CASES[i]
    ref, mag = _reference(*cases[i], fp8)
    bound = K * 2.0**-24 * mag + 1e-30
    for key in ("ra32", "y32"):
        got = out[f"{key}_{i}"]
        assert np.isfinite(got).all()
        assert (np.abs(got - ref) <= bound).all(), f"case {CPU_CASES[i]} {key}: RA outside the reordering bound"
        assert np.array_equal(got, out[f"rows32_{i}"].reshape(got.shape)), f"case {CPU_CASES[i]} {key}: rows differ"


def test_cpu_plans_cover_split_and_prefill(interpreted):
    """The CPU cases exercise the GEMV plan (rows <= GEMV_ROWS) split and unsplit, the tensor-core decode tile and the
    prefill kernel (plan code -1), the latter with several K steps per scale block."""
    from dsv4_jax.kernels.fp8_prefill import prefill_plan

    _, out = interpreted
    plans = {(int(out[f"p{i}"][0]) > 1, int(out[f"p{i}"][1])) for i in range(len(CPU_CASES))}
    assert {(True, 0), (False, 0), (False, -1)} <= plans and any(0 < t < 128 for _, t in plans), plans
    assert prefill_plan(80, 136, 256, 1, "cpu")["BK"] < 128


def test_sm90_decode_batches_take_the_split_weight_stationary_plan():
    """On sm90, 9-64 rows of an ungrouped FP8 linear take the K-split form of the weight-stationary kernel (faster at
    16/32 rows on 8 of 10 V4-Flash shapes); the grouped ``wo_a`` keeps the e4m3-dot tiles (slower split). Each split
    chunk is whole scale blocks and together they cover K exactly."""
    from dsv4_jax.kernels.fp8_linear import GEMV_ROWS, plan
    from dsv4_jax.kernels.fp8_prefill import PREFILL_MIN_ROWS

    for M in (GEMV_ROWS + 1, 16, 32, PREFILL_MIN_ROWS - 1):
        for N, K in ((1024, 4096), (32768, 1024), (4096, 8192)):
            p = plan(M, N, K, 1, target="sm90")
            assert p.get("WX") and p["KCH"] % 128 == 0 and (p["SPLIT"] - 1) * p["KCH"] < K <= p["SPLIT"] * p["KCH"], p
        assert not plan(M, 1024, 4096, 8, target="sm90").get("WX")
        assert not plan(M, 1024, 4096, 1, target="gfx950").get("WX")
    assert plan(GEMV_ROWS, 1024, 4096, 1, target="sm90").get("GEMV")


def test_quant_act_matches_fp8_act_quant():
    """QuantAct is the reference's act_quant: codes x scales == quantized_input, bit for bit."""
    import jax
    import jax.numpy as jnp

    from dsv4_jax.modeling.quant import fp8_act_quant, quantize_act

    x = (jax.random.normal(jax.random.key(3), (5, 512)) * jnp.exp2(jnp.arange(-20, 20, 8.0))[:, None])
    x = x.astype(jnp.bfloat16)
    qa = quantize_act(x)
    q, s = fp8_act_quant(x, 128)
    assert qa.q.dtype == jnp.float8_e4m3fn and qa.scale.shape == (5, 4)
    np.testing.assert_array_equal(np.asarray(qa.dequant()), np.asarray((q * s).reshape(x.shape)))


def test_reference_mode_is_bit_identical():
    """``linear(..., kernels=...)`` on CPU is the old reference linear bit for bit, for every mode that runs here."""
    import jax.numpy as jnp

    from dsv4_jax.modeling.quant import linear, linear_reference, quantize_act

    x, w = _inputs(3, 1, 200, 384, True, seed=7)
    x = x.reshape(3, 384)
    want = np.asarray(linear_reference(x, w, jnp.bfloat16, True))
    for mode in ("reference", "auto"):
        for xq in (None, quantize_act(x)):
            got = np.asarray(linear(x, w, jnp.bfloat16, True, xq, kernels=mode))
            np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_triton_mode_refused_on_cpu():
    import jax

    from dsv4_jax.kernels import use_triton

    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU refusal")
    with pytest.raises(RuntimeError, match="kernels='triton' needs a GPU backend"):
        use_triton("triton")
    assert use_triton("auto") is False and use_triton("reference") is False


# ------------------------------------------------------------------------------------------------ GPU sweep
def _gpu_or_skip():
    from dsv4_jax.kernels import triton_unavailable

    why = triton_unavailable()
    if why is not None:
        pytest.skip(f"GPU sweep: {why}")


def gpu_shapes():
    """(name, G, N per group, K) of every FP8 GEMM of V4-Flash and V4-Pro, from the weight declarations."""
    from dsv4_jax.config import Config

    out = []
    for tag, cfg in (("flash", Config.v4_flash()), ("pro", Config.v4_pro())):
        D, H, Dh, G = cfg.dim, cfg.n_heads, cfg.head_dim, cfg.o_groups
        out += [(f"{tag}.wq_a", 1, cfg.q_lora_rank, D), (f"{tag}.wq_b", 1, H * Dh, cfg.q_lora_rank),
                (f"{tag}.wkv", 1, Dh, D), (f"{tag}.wo_b", 1, D, G * cfg.o_lora_rank),
                (f"{tag}.shared_w1", 1, cfg.moe_inter_dim, D), (f"{tag}.shared_w2", 1, D, cfg.moe_inter_dim),
                (f"{tag}.index_wq_b", 1, cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank),
                (f"{tag}.wo_a", G, cfg.o_lora_rank, H * Dh // G)]
    return out


@pytest.mark.parametrize("j", range(len(gpu_shapes())), ids=lambda j: gpu_shapes()[j][0])  # -k "pro.wo_a"
@pytest.mark.parametrize("rows", [1, 4, 16, 64, 333, 2048], ids=lambda r: f"r{r:04d}")  # -k "r0001 or r0004"
def test_gpu_sweep(rows, j):
    _gpu_or_skip()
    import jax.numpy as jnp

    from dsv4_jax.kernels.fp8_linear import fp8_linear, grouped_proj

    name, G, N, K = gpu_shapes()[j]
    x, w = _inputs(rows, G, N, K, G == 1, seed=1000 * rows + j)
    ref, mag = _reference(x, w, G == 1)
    if G == 1:
        y16 = fp8_linear(x.reshape(rows, K), w, jnp.bfloat16, kernels="triton").reshape(rows, 1, N)
    else:
        y16 = grouped_proj(x, w, jnp.bfloat16, kernels="triton")
    y16 = np.asarray(y16.astype(jnp.float32))
    # bf16 outputs only (one compile per shape; the fp32 outputs are pinned by the interpreter tests)
    extra = 2.0**-8 if G == 1 else 0.0
    worst = np.max(np.abs(y16 - ref) / (_bf16_ulp(ref) + (K * 2.0**-24 + extra) * mag))
    print(f"{name} rows={rows}: worst error {worst:.3f} of the allowance")
    _check(None, y16, ref, mag, K, extra_rel=extra, what=f"{name} rows={rows}")


@pytest.mark.parametrize("knob", ["PF=1", "PF=2", "XL=1", "PF=2,XL=1"])  # RA: test_gpu_ra_rows_as_one_row
@pytest.mark.parametrize("rows", [1, 4])
def test_gpu_prefetch_and_xl_change_no_bit(monkeypatch, rows, knob):
    """``PF`` (the GEMV's L2 prefetches, CUDA only, opt-in: ``DSV4_FP8_GEMV_TILE=PF=n``) asks for lines and changes
    nothing else, ``XL`` moves where the activations are loaded: V4-Flash's GEMV shapes (one weight, the grouped
    ``wo_a``) equal the outputs of the plan without them (``RA=0``: at several rows the default takes ``RA`` with
    ``XL``, whose rows :func:`test_gpu_ra_rows_as_one_row` checks) bit for bit."""
    _gpu_or_skip()
    import jax.numpy as jnp

    from dsv4_jax.kernels import arch
    from dsv4_jax.kernels.fp8_linear import fp8_linear, grouped_proj

    if "PF" in knob and not arch().startswith("sm"):
        pytest.skip("PF is PTX: NVIDIA GPUs only")
    for j, (name, G, N, K) in enumerate(gpu_shapes()[:8]):
        x, w = _inputs(rows, G, N, K, G == 1, seed=77 * rows + j)

        def run(x=x, w=w, G=G, K=K):
            if G == 1:
                return np.asarray(fp8_linear(x.reshape(rows, K), w, jnp.bfloat16, kernels="triton"))
            return np.asarray(grouped_proj(x, w, jnp.bfloat16, kernels="triton"))

        monkeypatch.setenv("DSV4_FP8_GEMV_TILE", "RA=0")  # XL's and PF's own effect (RA + XL: the RA tests)
        base = run()
        monkeypatch.setenv("DSV4_FP8_GEMV_TILE", f"RA=0,{knob}")
        got = run()
        assert np.isfinite(base.astype(np.float32)).all(), name
        assert np.array_equal(got, base), f"{name} rows={rows} {knob}: outputs differ"


@pytest.mark.parametrize("knob", ["RA=1", "RA=1,XL=1", "RA=1,XL=1,PF=2"])
@pytest.mark.parametrize("rows", [2, 4, 8])
def test_gpu_ra_rows_as_one_row(monkeypatch, rows, knob):
    """``RA`` on the GPU (V4-Flash's GEMV shapes): the kernel's fp32 outputs (split-K partials as written, before
    XLA sums them) for each row equal the one-row plan's on that row alone, bit for bit (the same chunk sums in the
    same order and layout), and their sum stays within the fp32 reordering bound of the reference."""
    _gpu_or_skip()
    import jax.numpy as jnp

    from dsv4_jax.kernels import SM_COUNT, arch
    from dsv4_jax.kernels.fp8_linear import gemv_partials, gemv_plan
    from dsv4_jax.modeling.quant import quantize_act

    if "PF" in knob and not arch().startswith("sm"):
        pytest.skip("PF is PTX: NVIDIA GPUs only")
    monkeypatch.delenv("DSV4_FP8_GEMV_TILE", raising=False)
    kw = {"xl": 0} | {k.lower(): int(v) for k, v in (e.split("=") for e in knob.split(","))}
    for j, (name, G, N, K) in enumerate(gpu_shapes()[:8]):
        x, w = _inputs(rows, G, N, K, G == 1, seed=91 * rows + j)
        xv = quantize_act(x.reshape(rows, K)).dequant().astype(jnp.bfloat16).reshape(rows, 1, K) if G == 1 else x
        p = gemv_plan(rows, N, K, G, SM_COUNT[arch()], **kw)
        p1 = gemv_plan(1, N, K, G, SM_COUNT[arch()], pf=kw.get("pf", 0), xl=kw.get("xl", 0))
        assert (p["SPLIT"], p["CW"]) == (p1["SPLIT"], p1["CW"])
        got = np.asarray(gemv_partials(xv, w, rows, N, K, G, jnp.float32, p))  # [SPLIT, rows, G, N] or [rows, G, N]
        ax = 1 if p["SPLIT"] > 1 else 0
        alone = np.concatenate([np.asarray(gemv_partials(xv[m:m + 1], w, 1, N, K, G, jnp.float32, p1))
                                for m in range(rows)], axis=ax)
        assert np.array_equal(got, alone), f"{name} rows={rows} {knob}: a row differs from the one-row call"
        total = got.sum(0) if ax else got
        ref, mag = _reference(x, w, G == 1)
        bound = K * 2.0**-24 * mag + 1e-30
        assert (np.abs(total - ref) <= bound).all(), f"{name} rows={rows} {knob}: outside the reordering bound"


def test_prefetch_refused_off_nvidia(monkeypatch):
    """``PF`` is PTX inline assembly: the GEMV plans of other targets (the interpreter, AMD) refuse it by name."""
    from dsv4_jax.kernels import fp8_linear as f

    monkeypatch.setenv("DSV4_FP8_GEMV_TILE", "PF=2")
    for target in ("cpu", "gfx950"):
        with pytest.raises(ValueError, match=f"PF=2 .*not {target}"):
            f.plan(1, 4096, 8192, target=target)
        with pytest.raises(ValueError, match=f"PF=2 .*not {target}"):
            f.gemv2_plan(1, 1024, 512, 4096, target=target)
    assert f.plan(1, 4096, 8192, target="sm90")["PF"] == 2


if __name__ == "__main__":  # the interpreter subprocess of `interpreted`
    _interpret_main(sys.argv[1])
