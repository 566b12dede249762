"""The Triton kernels compiled for an H200 (sm_90) on the CPU, at the plans the GPU path picks for V4 shapes: each
must fit the card's shared memory (227 KB per block) and not spill registers. No GPU needed: Triton's frontend and
its bundled ptxas compile for a named target. Why: a plan that asks for more shared memory than the card has fails
only at launch on the GPU (the split sparse-attention plan with 2 pipeline stages asked for 246,016 bytes: it failed
on an H200 on 2026-11-30, after passing every interpreter test), and spills cost bandwidth silently."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest

SMEM_SM90 = 232448  # bytes of shared memory one block may use on an H100/H200 (227 KB)


def _compile(fn, pointers: dict, constexprs: dict, options: dict, sass: list | None = None):
    """Compile ``fn`` for sm_90 with 16-byte-aligned pointers (as jax-triton and the XLA route declare them; other
    entries of ``pointers`` are runtime scalars) -> (shared memory bytes, ptxas spill-store bytes). ``sass``: a list
    that receives the sm_90a SASS lines (disassembled with the nvdisasm bundled with Triton)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {a: pointers[a] if a in pointers else "constexpr" for a in fn.arg_names}
    missing = [a for a in fn.arg_names if a not in pointers and a not in constexprs]
    assert not missing, f"{fn.__name__}: arguments {missing} neither pointers nor constexprs"
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in pointers.items() if t.startswith("*")}
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=options)
    except RuntimeError as e:  # pragma: no cover - a triton build without the NVIDIA backend
        pytest.skip(f"no sm_90 compile here: {e}")
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        out = subprocess.run([os.path.join(tools, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o", cubin],
                             capture_output=True, text=True, timeout=120).stderr
        if sass is not None:
            sass += subprocess.run([os.path.join(tools, "nvdisasm"), "-c", cubin], capture_output=True, text=True,
                                   timeout=120).stdout.splitlines()
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", out)]
    assert spills, f"ptxas printed no register report:\n{out[-2000:]}"
    return k.metadata.shared, max(spills)


def _loop_barriers(sass: list) -> int:
    """``BAR.SYNC`` instructions inside the longest backward-branch loop of a kernel's SASS (its K loop)."""
    labels = {line.rstrip(":"): i for i, line in enumerate(sass) if re.match(r"^\.L_x_\d+:", line)}
    best: list = []
    for i, line in enumerate(sass):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > len(best):
            best = sass[labels[m.group(1)]:i + 1]
    assert best, "no loop found in the SASS"
    return sum("BAR.SYNC" in line for line in best)


@pytest.mark.parametrize("rows,K", [(1, 640), (32, 640), (1, 8320), (32, 8320), (256, 640)],
                         ids=["decode-csa", "batch32-csa", "decode-hca-1M", "batch32-hca-1M", "prefill"])
def test_sparse_attention_plans_fit(rows, K):
    """V4-Flash attention (64 heads, head_dim 512 = 448 FP8 + 64 bf16 dims, window 128) at decode, batch 32 and
    prefill row counts, CSA (K = 640) and HCA at 1M context (K = 8320): the GPU plan fits the shared memory, no
    spills."""
    pytest.importorskip("triton")
    from dsv4_jax.kernels import sparse_attention as sa

    p = sa.plan(64, 512, "sm90", rows=rows, K=K)
    meta = sa._meta((rows, 1, 64, 512), 128, K, K, True, 448, 512**-0.5, p)
    options = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
    out_t = "*fp32" if p["SPLIT"] > 1 else "*bf16"
    pointers = dict(q_ptr="*bf16", idx_ptr="*i32", sink_ptr="*fp32", rc="*fp8e4nv", rs="*u8", rr="*bf16",
                    cc="*fp8e4nv", cs="*u8", cr="*bf16", kc="*fp8e4nv", ks="*u8", kr="*bf16")
    pointers.update({a: out_t for a in sa._sparse_attn_kernel.arg_names if a not in pointers and a not in meta
                     and a != "INTERPRET"})
    smem, spill = _compile(sa._sparse_attn_kernel, pointers, {**meta, "INTERPRET": False}, options)
    assert smem <= SMEM_SM90, f"sparse attention {p}: {smem} bytes of shared memory > {SMEM_SM90}"
    assert spill == 0, f"sparse attention {p}: {spill} bytes of register spills"


@pytest.mark.parametrize("model,n_pairs", [("flash", 6), ("flash", 192), ("pro", 6), ("pro", 192)])
def test_moe_gemv_plans_fit(model, n_pairs):
    """The FP4 MoE decode GEMV kernels (one pair per block row) at V4-Flash / V4-Pro expert shapes, with the rows per
    program of one token (6 pairs) and of 32 tokens (192 pairs)."""
    pytest.importorskip("triton")
    from dsv4_jax.config import Config
    from dsv4_jax.kernels import fp4_moe_gemv as g

    cfg = Config.v4_flash() if model == "flash" else Config.v4_pro()
    D, I, E = cfg.dim, cfg.moe_inter_dim, cfg.n_routed_experts
    t = g.gemv_tiles("sm90", D, I, n_pairs)
    options = dict(num_warps=t["num_warps"], num_stages=t["num_stages"])
    meta = {k: v for k, v in g._kw(t, E).items() if not k.startswith("num_")}
    p1 = dict(xa_ptr="*fp32", xf_ptr="*fp32", tok_ptr="*i32", wt_ptr="*fp32", e_ptr="*i32", w1p="*u8", w1s="*u8",
              w3p="*u8", w3s="*u8", h_ptr="*bf16")
    p2 = dict(ha_ptr="*fp32", hf_ptr="*fp32", e_ptr="*i32", w2p="*u8", w2s="*u8", y_ptr="*bf16")
    for fn, ptrs, meta_k in ((g._gate_up_gemv, p1, dict(D=D, I=I, LIMIT=10.0, **meta)),
                             (g._down_gemv, p2, dict(D=D, I=I, **meta))):
        sass: list = []
        smem, spill = _compile(fn, ptrs, meta_k, options, sass)
        assert smem <= SMEM_SM90 and spill == 0, f"{fn.__name__} {t}: {smem} B shared, {spill} B spills"
        # the design's point: every load lands in the weights' register layout, no shared-memory round trip per K
        # step (a layout mismatch, e.g. an activation factor indexed per 128-block, brought 4-8 barriers back)
        assert _loop_barriers(sass) == 0, f"{fn.__name__} {t}: barriers in the K loop (a layout conversion)"


@pytest.mark.parametrize("K,dtype", [(4096, "bf16"), (7168, "fp32"), (2048, "bf16")])
def test_act_words_plan_fits(K, dtype):
    """The MoE GEMV's activation kernel (one warp per 128-wide block) at V4 widths: no spills, no block barrier."""
    pytest.importorskip("triton")
    from dsv4_jax.kernels import fp4_moe_gemv as g

    p = g.act_plan("sm90", K)
    sass: list = []
    smem, spill = _compile(g._act_words_kernel, dict(x_ptr=f"*{dtype}", xa_ptr="*fp32", xf_ptr="*fp32"),
                           dict(K=K, NG=8, NB=p["NB"]), dict(num_warps=p["num_warps"], num_stages=1), sass)
    assert smem <= SMEM_SM90 and spill == 0, f"act_words K={K}: {smem} B shared, {spill} B spills"
    assert not any("BAR.SYNC" in line for line in sass), f"act_words K={K}: a block barrier"


@pytest.mark.parametrize("M,N,K", [(1, 32768, 1024), (1, 4096, 8192), (4, 4096, 8192), (8, 1024, 4096)],
                         ids=["wq_b-1", "wo_b-1", "wo_b-4", "wq_a-8"])
def test_fp8_gemv_plans_fit(M, N, K):
    """The FP8 GEMV kernel at V4-Flash projection shapes and decode row counts (one row: 16-column chunks with
    per-chunk accumulators; several rows: 128-wide blocks)."""
    pytest.importorskip("triton")
    from dsv4_jax.kernels import fp8_linear as f
    from dsv4_jax.kernels import next_pow2

    p = f.gemv_plan(M, N, K, 1, f.SM_COUNT["sm90"])
    options = dict(num_warps=p["num_warps"], num_stages=p["num_stages"])
    meta = dict(M=M, MP=next_pow2(M), N=N, K=K, G=1, SWK=(K + 127) // 128,
                **{k: v for k, v in p.items() if k not in ("GEMV", "num_warps", "num_stages")})
    pointers = dict(x_ptr="*bf16", w_ptr="*fp8e4nv", sw_ptr="*u8", out_ptr="*fp32" if p["SPLIT"] > 1 else "*bf16")
    smem, spill = _compile(f.fp8_gemv_kernel, pointers, meta, options)
    assert smem <= SMEM_SM90 and spill == 0, f"FP8 GEMV {p}: {smem} B shared, {spill} B spills"


@pytest.mark.parametrize("T,D", [(1, 4096), (32, 4096), (512, 4096), (1, 7168)],
                         ids=["flash-decode", "flash-batch32", "flash-prefill", "pro-decode"])
def test_mhc_plans_fit(T, D):
    """The mHC kernels (split-K mixes with per-lane partial sums, then the per-token finish with the fused norm and
    the quantized row) at the plans of V4-Flash / V4-Pro decode, batch 32 and prefill rows."""
    pytest.importorskip("triton")
    from dsv4_jax.kernels import mhc

    p = mhc.plan(T, 4, D, "sm90", norm=True)
    (_, m1), (_, m2), _ = mhc._kernel_args(T, 4, D, p, True, True, 1e-6, 1e-6, 20, True)  # with the quantized row
    for fn, meta, pointers in (
            (mhc._mix_partial_kernel, m1, dict(x_ptr="*bf16", fn_ptr="*fp32", part_ptr="*fp32")),
            (mhc._finish_kernel, m2, dict(part_ptr="*fp32", x_ptr="*bf16", scale_ptr="*fp32", base_ptr="*fp32",
                                          nw_ptr="*fp32", y_ptr="*bf16", post_ptr="*fp32", comb_ptr="*fp32",
                                          yq_ptr="*bf16"))):
        meta = dict(meta)
        options = dict(num_warps=meta.pop("num_warps"), num_stages=1)
        if "T" in fn.arg_names:  # the runtime token count: an int32 scalar, not a constexpr
            pointers = {**pointers, "T": "i32"}
        smem, spill = _compile(fn, pointers, meta, options)
        assert smem <= SMEM_SM90 and spill == 0, f"mHC {fn.__name__} {p}: {smem} B shared, {spill} B spills"


def test_hadamard_plan_fits():
    """The indexer's Hadamard kernel (128-dim rows, 32 rows per program) for sm_90."""
    pytest.importorskip("triton")
    import jax.numpy as jnp

    from dsv4_jax.kernels import hadamard as h

    meta = h._meta(128, jnp.bfloat16, h.plan(128))
    options = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
    smem, spill = _compile(h._hadamard_kernel, dict(x_ptr="*bf16", y_ptr="*bf16", R="i32"), meta, options)
    assert smem <= SMEM_SM90 and spill == 0, f"Hadamard: {smem} B shared, {spill} B spills"


@pytest.mark.parametrize("fp4", [True, False], ids=["fp4", "plain"])
def test_indexer_query_plan_fits(fp4):
    """The indexer query kernel (RoPE + Hadamard + FP4 snap; V4-Flash: 64 heads of 128 dims, 64 RoPE dims)."""
    pytest.importorskip("triton")
    from dsv4_jax.kernels import hadamard as h

    meta = h._query_meta(128, 64, 64, fp4, h.plan(128))
    options = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
    pointers = dict(x_ptr="*bf16", cos_ptr="*fp32", sin_ptr="*fp32", y_ptr="*bf16", R="i32")
    smem, spill = _compile(h._query_kernel, pointers, meta, options)
    assert smem <= SMEM_SM90 and spill == 0, f"indexer query (fp4={fp4}): {smem} B shared, {spill} B spills"


@pytest.mark.parametrize("M,K,N1,N2", [(1, 4096, 1024, 512), (4, 7168, 1536, 512)], ids=["flash-1", "pro-4"])
def test_attn_proj_plans_fit(M, K, N1, N2):
    """The attention's fused input projections: the two-weight GEMV (wq_a + wkv) and the norm epilogue, at V4-Flash
    and V4-Pro widths."""
    pytest.importorskip("triton")
    from dsv4_jax.kernels import attn_proj as a
    from dsv4_jax.kernels import fp8_linear as f

    p = a.plan(M, N1, N2, K, "sm90")
    (_, m1), (_, m2) = f.gemv2_meta(M, N1, N2, K, p), a._norm_meta(M, N1, N2, p, 1e-6)
    for fn, meta, pointers in (
            (f.fp8_gemv2_kernel, m1, dict(x_ptr="*bf16", w_ptr="*fp8e4nv", sw_ptr="*u8", w2_ptr="*fp8e4nv",
                                          sw2_ptr="*u8", out_ptr="*fp32")),
            (a._lora_norm_kernel, m2, dict(part_ptr="*fp32", qw_ptr="*bf16", kvw_ptr="*bf16", M="i32",
                                           qr_ptr="*bf16", qrq_ptr="*bf16", kv_ptr="*bf16"))):
        meta = dict(meta)
        options = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages", 1))
        smem, spill = _compile(fn, pointers, meta, options)
        assert smem <= SMEM_SM90 and spill == 0, f"{fn.__name__} M={M} K={K}: {smem} B shared, {spill} B spills"


@pytest.mark.parametrize("model,n_pairs", [("flash", 192), ("flash", 12288), ("pro", 12288)],
                         ids=["flash-32tok", "flash-prefill", "pro-prefill"])
def test_moe_scaled_plans_fit(model, n_pairs):
    """The FP4 MoE's ``tl.dot_scaled`` kernels (``fp4_moe_scaled``; on Hopper Triton rewrites the scaled dot into
    bf16 upcasts and a bf16 dot) at the tiled plans of 32 tokens and a 2K-token prefill, V4-Flash and V4-Pro."""
    pytest.importorskip("triton")
    from dsv4_jax.config import Config
    from dsv4_jax.kernels import fp4_moe as m
    from dsv4_jax.kernels import fp4_moe_scaled as s

    cfg = Config.v4_flash() if model == "flash" else Config.v4_pro()
    D, I, E = cfg.dim, cfg.moe_inter_dim, cfg.n_routed_experts
    t = {**m.tiles("sm90", n_pairs, E, D, I), "SCALED": 1, "BN1": 128}
    options = dict(num_warps=t["num_warps"], num_stages=t["num_stages"])
    p1 = dict(xq_ptr="*u8", xs_ptr="*u8", tok_ptr="*i32", wt_ptr="*fp32", rows_ptr="*i32", bexp_ptr="*i32",
              used_ptr="*i32", w1p_ptr="*u8", w1s_ptr="*u8", w3p_ptr="*u8", w3s_ptr="*u8", hq_ptr="*u8", hs_ptr="*u8")
    p2 = dict(hq_ptr="*u8", hs_ptr="*u8", bexp_ptr="*i32", used_ptr="*i32", w2p_ptr="*u8", w2s_ptr="*u8",
              y_ptr="*bf16")
    for fn, ptrs, meta in ((s._gate_up_scaled, p1, dict(R=n_pairs, D=D, I=I, LIMIT=10.0, BM=t["BM"])),
                           (s._down_scaled, p2, dict(D=D, I=I, BM=t["BM"], BN=t["BN2"]))):
        smem, spill = _compile(fn, ptrs, meta, options)
        assert smem <= SMEM_SM90 and spill == 0, f"{fn.__name__} {t}: {smem} B shared, {spill} B spills"


@pytest.mark.parametrize("heads", [64, 16])
def test_indexer_score_plan_fits(heads):
    """The indexer's decode scoring kernel at V4-Flash's indexer (64 heads of 128 dims) and a narrower one."""
    pytest.importorskip("triton")
    from dsv4_jax.kernels import indexer as ix

    p = ix.score_plan(heads)
    pointers = dict(q_ptr="*bf16", hw_ptr="*bf16", kp_ptr="*u8", ks_ptr="*u8", lim_ptr="*i32", out_ptr="*fp32")
    meta = dict(S=1, HI=heads, HP=p["HP"], DI=128, NC=262144, BLK=p["BLK"])
    smem, spill = _compile(ix._indexer_score_kernel, pointers, meta, dict(num_warps=p["num_warps"], num_stages=1))
    assert smem <= SMEM_SM90 and spill == 0, f"indexer score {p}: {smem} B shared, {spill} B spills"
