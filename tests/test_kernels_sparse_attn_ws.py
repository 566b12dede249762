"""The warp-specialised Gluon sparse-attention kernel (:mod:`dsv4_jax.kernels.sparse_attention_ws`).

CPU: its sm_90a build (Gluon has no interpreter): the partitions' register budgets hold without spills, the gathers
are ``cp.async`` copies, the dots wgmma. GPU (sm_90, torch launch): its output against the XLA reference on the
cases of ``tests/test_kernels_sparse_attn.py`` (windows not full, -1 holes, rows at different positions, a list that
is not a multiple of the block), with that file's error bound.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_kernels_sm90 import _compile  # noqa: E402
from test_kernels_sparse_attn import _POS32, SEED, _close, _inputs, _reference  # noqa: E402

ws = pytest.importorskip("dsv4_jax.kernels.sparse_attention_ws")


_OFF = {"LACC": 0, "MX": 0, "IDREG": 0}  # the plan before the barrier and instruction cuts became defaults
# 8 decoder warps (DEC_REGS 80 at a 128 cap; without IDREG it spills 24 bytes since the gathers' ids come in four
# layouts) and 64-entry tiles with them (session 39's fastest)
_W8 = {"DEC_WARPS": 8, "DEC_REGS": 80, "MAXNREG": 128, "ACC_N": 128, "EC": 8}
PLANS = [{}, _OFF, {"BK": 64, "SC": 16, "EC": 8}, {"NST": 3}, {"EC": 8, "DEC_REGS": 96}, _W8]
PLAN_IDS = ["default", "without-lacc-mx-idreg", "64-entry-tiles", "3-stages", "8-entry-decode", "8-warp-decoder"]
GPU_PLANS = PLANS + [_W8 | {"BK": 64, "SC": 16}, {"MX": 0, "IDREG": 0}, {"LACC": 0, "IDREG": 0},
                     {"LACC": 0, "MX": 0}]
GPU_PLAN_IDS = PLAN_IDS + ["64-entry-tiles-8-warp-decoder", "lacc", "mx", "idreg"]


@pytest.mark.parametrize("over", PLANS, ids=PLAN_IDS)
def test_sm90_build_fits_without_spills(over):
    """Each plan's sm_90a build (12 warps under a 168-register cap, or 16 under 128): no spill anywhere (the
    decoders' budget below ~88 registers spills at 4 decoder warps) and ptxas keeps the partitions' budgets, the
    shared memory within an sm_90 block's 227 KB (64-entry tiles take 232,292 B of it), the decoders' gathers
    ``cp.async`` (LDGSTS) and the dots wgmma (HGMMA)."""
    if ws.gluon is None:
        pytest.skip("this triton has no Gluon")
    p = ws.plan(32, 64, 8320, 132, over)
    meta = ws._meta((32, 1, 64, 512), 128, 8192, 8320, 448, 512**-0.5, p, 7)
    ptrs = dict(q_ptr="*bf16", idx_ptr="*i32", rc="*fp8e4nv", rs="*u8", rr="*bf16", cc="*fp8e4nv", cs="*u8",
                cr="*bf16", kc="*fp8e4nv", ks="*u8", kr="*bf16", o_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32")
    sass = []
    opts = dict(num_warps=ws.num_warps(p), maxnreg=p["MAXNREG"])
    shared, spills = _compile(ws._sparse_attn_ws_kernel, ptrs, meta, opts, sass, gluon=True)
    assert spills == 0 and shared <= 232448, (spills, shared)
    code = "\n".join(sass)
    assert "LDGSTS" in code and "HGMMA" in code and "USETMAXREG" in code


def _loops(sass: list) -> list[tuple[int, int, int]]:
    """The SASS listing's loops (a branch back to a label): (instructions, BAR instructions, HGMMA instructions)."""
    body, labels, out = [], {}, []
    for line in sass:
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(body)
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s*(.*?)\s*;", line)
        if m:
            body.append(m.group(1))
            b = re.search(r"BRA\s+`\((\.L_x_\d+)\)", m.group(1))
            if b and labels.get(b.group(1), len(body)) < len(body) - 1:
                loop = body[labels[b.group(1)]:]
                ops = [re.sub(r"^@!?U?P\w+\s+", "", x).split(" ")[0].split(".")[0] for x in loop]
                out.append((len(loop), ops.count("BAR"), ops.count("HGMMA")))
    return out


def _sm90_loops(over: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    """(instructions, barriers) of the sm_90a build's consumer loop (the one with the dots, innermost) and decoder loop
    (the innermost loop with the most instructions among those without dots) under plan ``over``."""
    p = ws.plan(32, 64, 8320, 132, over)
    meta = ws._meta((32, 1, 64, 512), 128, 8192, 8320, 448, 512**-0.5, p, 7)
    ptrs = dict(q_ptr="*bf16", idx_ptr="*i32", rc="*fp8e4nv", rs="*u8", rr="*bf16", cc="*fp8e4nv", cs="*u8",
                cr="*bf16", kc="*fp8e4nv", ks="*u8", kr="*bf16", o_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32")
    sass = []
    _compile(ws._sparse_attn_ws_kernel, ptrs, meta, dict(num_warps=ws.num_warps(p), maxnreg=p["MAXNREG"]), sass,
             gluon=True)
    loops = _loops(sass)
    consumer = min((x for x in loops if x[2]), key=lambda x: x[0])
    decoder = min((x for x in loops if not x[2] and x[0] > 100), key=lambda x: x[0])
    return consumer[:2], decoder[:2]


def test_sm90_knobs_cut_barriers_and_instructions():
    """What the default knobs are for, in the sm_90a build (Triton 3.6): ``LACC`` + ``MX`` take the consumers' loop
    from 9 barriers a block to at most 4 (the row sum's and the row maximum's cross-warpgroup reductions) and fewer
    instructions, ``IDREG`` the decoders' loop to fewer instructions with its barriers unchanged."""
    if ws.gluon is None:
        pytest.skip("this triton has no Gluon")
    (ci, cb), (di, db) = _sm90_loops(_OFF)
    (ki, kb), (ki2, kb2) = _sm90_loops({})
    assert kb <= 4 < cb and ki < ci, ((ci, cb), (ki, kb))
    assert ki2 < di and kb2 == db, ((di, db), (ki2, kb2))


def test_plan_rejects_mx_at_64_entry_tiles():
    """``MX``'s exchange buffer does not fit beside 64-entry tiles: refused when the launch is built, by name."""
    p = ws.plan(32, 64, 8320, 132, {"BK": 64, "SC": 16, "EC": 8, "MX": 1})
    with pytest.raises(ValueError, match="MX=1 with BK=64"):
        ws._meta((32, 1, 64, 512), 128, 8192, 8320, 448, 512**-0.5, p, 7)


def test_plan_splits_like_the_portable_kernel():
    """One program per SM (one wave), no empty split, every list slot in exactly one split."""
    for rows, H, K in ((32, 64, 8320), (1, 64, 640), (4, 128, 8320), (64, 64, 640)):
        p = ws.plan(rows, H, K, 132)
        assert rows * (H // 64) * p["SPLIT"] <= max(132, rows * (H // 64))
        assert (p["SPLIT"] - 1) * p["BPS"] * p["BK"] < K <= p["SPLIT"] * p["BPS"] * p["BK"]


GPU_CASES = [  # (name, B, H, Nc, n_comp, positions[, hole]): V4 layout, head_dim 512 (448 FP8 + 64 RoPE), window 128;
    # hole: list slots set to -1 (here whole 32-entry blocks)
    ("flash-decode", 4, 64, 1024, 512, [3, 130, 4000, 4095]),
    ("masked-blocks", 2, 64, 2048, 512, [3000, 9000], (160, 256)),
    ("csa-decode-b1", 1, 64, 2048, 512, [8000]),
    ("csa-decode-b32", 32, 64, 2048, 512, _POS32),
    ("long-list-ragged", 2, 64, 2048, 1200, [5000, 8000]),
    ("hca-1m-decode-b32", 32, 64, 8192, 8192, _POS32),
    ("pro-heads-128", 2, 128, 2048, 512, [100, 9000]),
]


def _torch(a):
    import torch

    a = np.asarray(a)
    if a.dtype.itemsize == 2 and a.dtype.kind not in "iu":  # bf16
        return torch.from_numpy(a.view(np.int16).copy()).cuda().view(torch.bfloat16)
    if a.dtype.itemsize == 1 and a.dtype.kind not in "iu":  # e4m3
        return torch.from_numpy(a.view(np.uint8).copy()).cuda().view(torch.float8_e4m3fn)
    return torch.from_numpy(a.copy()).cuda()


def _check_on_gpu(name, B, S, H, Nc, n_comp, positions, hole, over, seed):
    """The kernel (torch launch, plan ``over``) on fresh inputs of ``B`` sequences of ``S`` queries against the XLA
    reference, with the portable kernel's error bound (sm_90 GPU with Gluon, else skipped)."""
    torch = pytest.importorskip("torch")
    if ws.gluon is None or not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the warp-specialised kernel needs an sm_90 GPU (Hopper) and Gluon")
    q, caches, idx, sink = _inputs(B, S, H, 512, 128, Nc, n_comp, positions, True, seed, hole)
    ref, mag = _reference(q, caches, idx, sink, Nc)
    sources = [tuple(_torch(x) for x in (c.codes, c.scales, c.rope)) for c in caches]
    p = ws.plan(B * S, H, idx.shape[-1], torch.cuda.get_device_properties(0).multi_processor_count, over)
    got = ws.run_torch(_torch(q), sources, _torch(idx), _torch(sink), 128, Nc, 512**-0.5, p)
    torch.cuda.synchronize()
    got = got.to(torch.bfloat16).float().cpu().numpy()  # the model's output dtype
    _close(got, ref, mag, name, ulps=1.0)


@pytest.mark.parametrize("over", GPU_PLANS, ids=GPU_PLAN_IDS)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c[0])
def test_gpu_matches_reference(case, over):
    name, B, H, Nc, n_comp, positions, *hole = case
    _check_on_gpu(name, B, 1, H, Nc, n_comp, positions, hole[0] if hole else None, over, SEED)


@pytest.mark.parametrize("S", [2, 4])
def test_gpu_several_queries_per_sequence(S):
    """Rows of ``S`` queries per sequence (a speculative verify step: the chunk's own entries in the lists, ids in
    ``[W, W + S)``), 8 sequences of V4-Flash CSA shape at different positions: the bound of the one-query cases (such
    rows take this kernel by default from ``sparse_attention.WS_MIN_ROWS`` rows on)."""
    _check_on_gpu(f"verify-s{S}", 8, S, 64, 2048, 512, [5, 120, 127, 128, 700, 3000, 7000, 8000], None, None,
                  SEED + S)


@pytest.mark.parametrize("case", [c for c in GPU_CASES if c[0] in ("csa-decode-b32", "masked-blocks")],
                         ids=lambda c: c[0])
def test_gpu_jax_route_matches_reference(monkeypatch, case):
    """``sparse_attention.WS`` on: the model's launcher (inside ``jit``, jax-triton with the Gluon build route)
    takes the kernel and meets the same bound."""
    from dsv4_jax.kernels import triton_unavailable

    why = triton_unavailable()
    if why is not None or ws.gluon is None:
        pytest.skip(f"the Gluon kernel's jax route: {why or 'no Gluon'}")
    import jax
    import jax.numpy as jnp

    from dsv4_jax.kernels import sparse_attention as sa

    if sa.arch() != "sm90":
        pytest.skip("the warp-specialised kernel needs an sm_90 GPU")
    monkeypatch.setattr(sa, "WS", True)
    name, B, H, Nc, n_comp, positions, *hole = case
    q, caches, idx, sink = _inputs(B, 1, H, 512, 128, Nc, n_comp, positions, True, SEED, hole[0] if hole else None)
    calls = []
    real = ws.launch_jax
    monkeypatch.setattr(ws, "launch_jax", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = jax.jit(lambda *a: sa.sparse_attention_triton(*a, 512**-0.5))(q, *caches, idx, sink)
    assert calls, f"{name}: the Gluon kernel did not run"
    ref, mag = _reference(q, caches, idx, sink, Nc)
    _close(np.asarray(got.astype(jnp.float32)), ref, mag, name, ulps=1.0)


def test_plan_rejects_unsupported_stage_counts():
    """The decoder is written for 3 or 4 staging chunks: any other count is refused when the launch is built."""
    p = ws.plan(32, 64, 8320, 132, {"NST": 5})
    with pytest.raises(ValueError, match="NST=5"):
        ws._meta((32, 1, 64, 512), 128, 8192, 8320, 448, 512**-0.5, p, 7)
    assert ws._meta((32, 1, 64, 512), 128, 8192, 8320, 448, 512**-0.5, ws.plan(32, 64, 8320, 132), 7)["NST"] == 4


def test_gluon_route_install(monkeypatch):
    """``gluon_route.install`` wraps jax-triton's kernel builder once (a second call changes nothing), hands every
    non-Gluon kernel to the original builder with its arguments as they were, and refuses a Gluon kernel for a
    platform other than CUDA by name."""
    jtl = pytest.importorskip("jax_triton.triton_lib")
    from dsv4_jax.kernels import gluon_route

    calls = []

    def base(*args, **kw):
        calls.append((args, kw))
        return "built", {}

    monkeypatch.setattr(jtl, "get_or_create_triton_kernel", base)
    monkeypatch.setattr(jtl, "_dsv4_gluon_route", False, raising=False)
    gluon_route.install()
    patched = jtl.get_or_create_triton_kernel
    assert patched is not base
    gluon_route.install()
    assert jtl.get_or_create_triton_kernel is patched, "a second install wrapped the builder again"
    kw = dict(num_warps=4, num_stages=2, num_ctas=1, compute_capability=90, enable_fp_fusion=True,
              metaparams={"BLOCK": 16}, dump=False)
    assert patched("init", "cuda", "a-triton-fn", ["*fp32"], [], **kw) == ("built", {})
    assert calls == [(("init", "cuda", "a-triton-fn", ["*fp32"], []), kw)]
    if ws.gluon is not None:
        with pytest.raises(ValueError, match="_sparse_attn_ws_kernel"):
            patched("init", "rocm", ws._sparse_attn_ws_kernel, ["*bf16"], [], **kw)


def test_ws_gate(monkeypatch):
    """``sparse_attention.WS`` sends only what the kernel handles there: sm_90 on the jax-triton route, decode row
    counts, V4's FP8 layout with a multiple of 64 heads; by default (None) from ``WS_MIN_ROWS`` query rows on."""
    import jax.numpy as jnp

    from dsv4_jax.kernels import sparse_attention as sa
    from dsv4_jax.modeling.quant import Fp8Cache

    ring = Fp8Cache(codes=jnp.zeros((1, 8, 448), jnp.float8_e4m3fn), scales=jnp.zeros((1, 8, 7), jnp.uint8),
                    rope=jnp.zeros((1, 8, 64), jnp.bfloat16))
    monkeypatch.setattr(sa, "arch", lambda: "sm90")
    monkeypatch.setattr(sa, "route_for", lambda tiled=False: "jax-triton")
    monkeypatch.setattr(sa, "WS", None)
    assert sa._use_ws(sa.WS_MIN_ROWS, 64, 512, ring) == (ws.gluon is not None)
    assert not sa._use_ws(sa.WS_MIN_ROWS - 1, 64, 512, ring), "auto below WS_MIN_ROWS"
    monkeypatch.setattr(sa, "WS", False)
    assert not sa._use_ws(32, 64, 512, ring), "on with WS False"
    monkeypatch.setattr(sa, "WS", True)
    assert sa._use_ws(1, 64, 512, ring) == (ws.gluon is not None)
    assert sa._use_ws(32, 64, 512, ring) == (ws.gluon is not None)
    assert not sa._use_ws(sa.AUTO_MAX_ROWS + 1, 64, 512, ring), "prefill rows"
    assert not sa._use_ws(32, 32, 512, ring), "32 heads"
    assert not sa._use_ws(32, 64, 512, jnp.zeros((1, 8, 512), jnp.bfloat16)), "plain layout"
    monkeypatch.setattr(sa, "route_for", lambda tiled=False: "xla")
    assert not sa._use_ws(32, 64, 512, ring), "XLA route"
    monkeypatch.setattr(sa, "route_for", lambda tiled=False: "jax-triton")
    monkeypatch.setattr(sa, "arch", lambda: "gfx950")
    assert not sa._use_ws(32, 64, 512, ring), "not sm_90"
