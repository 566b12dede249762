"""mHC's stream collapse ``hc_pre`` (spec 4) in two Triton kernels instead of ~40 XLA ones.

Public functions: :func:`hc_pre` ``h [B,S,hc,D]`` -> ``y [B,S,D]`` (act dtype), ``post [B,S,hc]``, ``comb
[B,S,hc,hc]`` (fp32), and :func:`hc_pre_norm` (what the block calls: ``y`` followed by the block's RMSNorm). The
reference is :func:`dsv4_jax.modeling.hyper.hc_pre` (the spec, the CPU path).

Why a kernel: per token the site is a 16K-long fp32 dot against 24 rows of ``fn``, a norm, three sigmoids, a 4x4
Sinkhorn of 20 iterations and a weighted sum of the streams. XLA makes that ~41 kernels per site on an H200
(``scripts/count_launches.py``: the iterations cannot fuse without multiplying the compile time), two sites per
layer; each is a few microseconds of launch for almost no bytes. Here:

1. :func:`_mix_partial_kernel`, grid ``(NS K-splits, token blocks)``: each program streams its slice of ``fn``
   ``[n_mix, K/NS]`` once and writes, per token of its block, the partial dots and the partial sum of squares of
   ``x = h.reshape(hc*D)`` in fp32 to a workspace ``[T, NS, P]`` (column ``n_mix`` holds the sum of squares). At
   batch 1 the NS programs read ``fn`` (1.5 MB for V4-Flash) with all SMs busy. The products are summed per lane
   through the K loop and reduced once at the end (a reduction per K step cost 938 sm_90a instructions, 327
   shuffles and 15 barriers per step; now 129 and 10).
2. :func:`_finish_kernel`, grid ``(T, D / BD + 1)``: each program reduces the NS partials of its token in split
   order and forms ``mixes * rsqrt(mean(x^2) + eps)``; the last program of a token computes ``post`` and the
   Sinkhorn of ``comb`` exactly as the reference orders them, the others the ``pre`` sigmoids and
   ``y = sum_i pre_i * x_i`` for their BD columns, in stream order, rounded once to the output dtype. (The Sinkhorn
   ran in every program before, after the row's work: at one token a serial chain of ~8 us per call on an H200.)

Opt-in (:data:`FUSE_POST`): :func:`hc_post_pre_norm_quant` runs a second form of the first kernel,
:func:`_post_mix_partial_kernel`, that first forms the site's streams from the previous block's output and
``post``/``comb`` (``hyper.hc_post``, bit for bit under the interpreter; the output may come as its linear's split-K
partials, :class:`dsv4_jax.modeling.quant.SplitSum`), writes them and feeds them to the mixes: 3 kernels fewer per
3-layer V4-Flash decode step at batch 1, but slower in the step on an H200 (:data:`FUSE_POST`: off).

Numerics contract: the same formula and operation order as the reference except the order of the fp32 sums over
K (the dot and the sum of squares: split-K here, XLA's own order there) and ``exp``/``sigmoid`` implementations
(ulp-level). With ``fn``-scaled mixes of order one the K-sums agree to ~2**-17 relative, hence ``post``/``comb``
to ~1e-5 absolute and ``y`` to one bf16 ulp (``tests/test_kernels_mhc.py``).

Portable Triton (fp32 arithmetic, plain masked loads), tested under the interpreter in CI and compiled for sm_90
without a GPU; its GPU test passed on an H200, and so did the golden tests of criteria 1 and 2 with it on
(``kernels="triton"``, 2026-11-30: layer-isolated, end to end, both releases), so ``"auto"`` runs it on GPUs; under
a mesh every device runs it on its own batch rows.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.config import Config
from dsv4_jax.kernels import arch, env_tiles, next_pow2, single_device, triton_call, use_triton
from dsv4_jax.kernels.on_mesh import replicated_on_mesh
from dsv4_jax.modeling import hyper
from dsv4_jax.modeling.layers import rms_norm
from dsv4_jax.modeling.quant import SplitSum, summed
from dsv4_jax.modeling.weights import HcWeights

try:  # the model imports this module; triton is optional (kernels="reference" needs none of it)
    import triton
    import triton.language as tl

    from dsv4_jax.kernels.common import act_quant_block, pow2, round_bf16
except ImportError:  # pragma: no cover - exercised only without the triton extra
    triton = tl = None


if triton is not None:

    @triton.jit
    def _mix_partial_kernel(x_ptr, fn_ptr, T, part_ptr, K: tl.constexpr, NMIX: tl.constexpr, P: tl.constexpr,
                            NS: tl.constexpr, KC: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr):
        """Program (s, tb): tokens ``[tb*BT, tb*BT+BT)``, K range ``[s*KC, s*KC+KC)``; writes
        ``part[t, s, :NMIX] = x[t, k] . fn[:, k]`` and ``part[t, s, NMIX] = sum_k x[t, k]**2`` (fp32)."""
        s = tl.program_id(0)
        tok = tl.program_id(1) * BT + tl.arange(0, BT)  # [BT]
        live = tok < T
        rows = tl.arange(0, P)  # [P] fn rows (NMIX real ones)
        acc = tl.zeros((BT, P, BK), tl.float32)  # per-lane partial sums, reduced once after the K loop
        sq = tl.zeros((BT, BK), tl.float32)
        for kk in range(0, KC, BK):
            k = s * KC + kk + tl.arange(0, BK)  # [BK]
            km = k < K
            f = tl.load(fn_ptr + rows[:, None] * K + k[None, :], mask=(rows[:, None] < NMIX) & km[None, :],
                        other=0.0)  # [P, BK]
            x = tl.load(x_ptr + tok[:, None].to(tl.int64) * K + k[None, :], mask=live[:, None] & km[None, :],
                        other=0.0).to(tl.float32)  # [BT, BK]
            acc += x[:, None, :] * f[None, :, :]
            sq += x * x
        acc = tl.where(rows[None, :] == NMIX, tl.sum(sq, axis=1)[:, None], tl.sum(acc, axis=2))
        dst = part_ptr + (tok[:, None].to(tl.int64) * NS + s) * P + rows[None, :]
        tl.store(dst, acc, mask=live[:, None])

    @triton.jit
    def _post_mix_partial_kernel(out_ptr, hr_ptr, post_ptr, comb_ptr, fn_ptr, T, part_ptr, h_ptr, D: tl.constexpr,
                                 HC: tl.constexpr, NMIX: tl.constexpr, P: tl.constexpr, NS: tl.constexpr,
                                 DCS: tl.constexpr, BKP: tl.constexpr, BT: tl.constexpr, H_BF16: tl.constexpr,
                                 OS: tl.constexpr = 1, OSP: tl.constexpr = 1):
        """:func:`_mix_partial_kernel` over streams it first forms: the previous block's ``hc_post``
        (:func:`dsv4_jax.modeling.hyper.hc_post`), ``h[t, k, d] = post[t, k] * out[t, d] + sum_j comb[t, j, k] *
        hr[t, j, d]`` in fp32 (j in order), rounded once to ``h``'s dtype (bf16 when ``H_BF16``), written to ``h [T,
        HC*D]`` and fed to the mixes (the XLA fusion that formed it was a launch of its own per site). Program (s, tb):
        columns ``d`` in ``[s*DCS, s*DCS+DCS)`` of every stream (each writes its own columns of ``h`` once), ``BKP``
        at a time; the partials' layout is :func:`_mix_partial_kernel`'s (any split of K sums the same terms).
        ``OS > 1``: ``out`` is its linear's fp32 split-K partials ``[OS, T, D]`` (:class:`quant.SplitSum`; ``OSP``:
        ``OS`` to a power of two), summed here in a fixed order (sequential under the interpreter, a reduction tree on
        GPUs; XLA's sum has its own) and rounded as ``h`` (the XLA sum of the partials was a launch of its own)."""
        s = tl.program_id(0)
        tok = tl.program_id(1) * BT + tl.arange(0, BT)  # [BT]
        live = tok < T
        t64 = tok.to(tl.int64)
        K: tl.constexpr = HC * D
        rows = tl.arange(0, P)  # [P] fn rows (NMIX real ones)
        ks = tl.arange(0, HC)  # [HC] streams
        acc = tl.zeros((BT, P, BKP), tl.float32)  # per-lane partial sums, reduced once after the loop
        sq = tl.zeros((BT, BKP), tl.float32)
        lv3 = live[:, None, None]
        pk = tl.load(post_ptr + t64[:, None] * HC + ks[None, :], mask=live[:, None], other=0.0)[:, :, None]  # [BT,HC,1]
        for dd in range(0, DCS, BKP):
            # every load of the step before its store (the store could alias them: loads after it would wait)
            d = s * DCS + dd + tl.arange(0, BKP)  # [BKP]
            dm = d < D
            m2 = live[:, None] & dm[None, :]
            m3 = lv3 & dm[None, None, :]
            kd = ks[None, :, None] * D + d[None, None, :]  # [1, HC, BKP] columns of h / fn
            f = tl.load(fn_ptr + rows[:, None, None] * K + kd, mask=(rows[:, None, None] < NMIX) & dm[None, None, :],
                        other=0.0)  # [P, HC, BKP]
            if OS > 1:  # all splits in one tile, summed in a fixed order (one load's latency, not OS of them)
                sp = tl.arange(0, OSP)[:, None, None]
                o = tl.sum(tl.load(out_ptr + (sp * T + t64[None, :, None]) * D + d[None, None, :],
                                   mask=(sp < OS) & m2[None, :, :], other=0.0), axis=0)  # [BT, BKP]
                if H_BF16:
                    o = round_bf16(o)
            else:
                o = tl.load(out_ptr + t64[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)  # [BT, BKP]
            mixed = tl.zeros((BT, HC, BKP), tl.float32)
            for j in tl.static_range(HC):  # sum over j in order, as hyper.hc_post
                cj = tl.load(comb_ptr + t64[:, None] * (HC * HC) + j * HC + ks[None, :], mask=live[:, None],
                             other=0.0)[:, :, None]  # [BT, HC, 1]: comb[t, j, k]
                hj = tl.load(hr_ptr + t64[:, None] * K + j * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
                if j == 0:
                    mixed = cj * hj[:, None, :]
                else:
                    mixed = mixed + cj * hj[:, None, :]
            hn = pk * o[:, None, :] + mixed  # [BT, HC, BKP]
            if H_BF16:
                hn = round_bf16(hn)
            tl.store(h_ptr + t64[:, None, None] * K + kd, hn.to(h_ptr.dtype.element_ty), mask=m3)
            hn = tl.where(m3, hn, 0.0)
            acc += tl.sum(hn[:, None, :, :] * f[None, :, :, :], axis=2)
            sq += tl.sum(hn * hn, axis=1)
        acc = tl.where(rows[None, :] == NMIX, tl.sum(sq, axis=1)[:, None], tl.sum(acc, axis=2))
        dst = part_ptr + (t64[:, None] * NS + s) * P + rows[None, :]
        tl.store(dst, acc, mask=live[:, None])

    @triton.jit
    def _finish_kernel(part_ptr, x_ptr, scale_ptr, base_ptr, nw_ptr, y_ptr, post_ptr, comb_ptr, yq_ptr,
                       D: tl.constexpr, HC: tl.constexpr, NS: tl.constexpr, NSP: tl.constexpr, P: tl.constexpr,
                       NORM_EPS: tl.constexpr, HC_EPS: tl.constexpr, ITERS: tl.constexpr, BD: tl.constexpr,
                       NORM: tl.constexpr, Y_BF16: tl.constexpr, QY: tl.constexpr = False):
        """Program (t, j) for ``j < ND = cdiv(D, BD)``: token t's ``pre`` mixes and sigmoids, then ``y[t, j*BD :
        j*BD+BD]``; program (t, ND): token t's ``post`` and the Sinkhorn of ``comb``. The two halves run side by
        side (at one token the Sinkhorn's 19 dependent iterations used to follow the whole row's work in one
        program). With ``NORM`` (``BD >= D``: one y program per token) ``y`` is
        followed by the block's RMSNorm with weight ``nw [D]``: ``y`` rounded to the activation dtype (bf16 when
        ``Y_BF16``), then ``nw * (y * rsqrt(mean(y**2) + eps))`` in fp32, as ``layers.rms_norm`` computes it.
        ``QY`` (with ``NORM``): also ``yq [T, D]``, the values of the FP8 activation quantization of the normed row
        as stored (``quant.quantize_act`` per 1x128 block, exact in bf16): what the block's FP8 linears consume."""
        t = tl.program_id(0).to(tl.int64)
        K: tl.constexpr = HC * D
        NMIX: tl.constexpr = HC * (2 + HC)
        ND: tl.constexpr = (D + BD - 1) // BD
        ns = tl.arange(0, NSP)
        nsm = ns < NS
        i = tl.arange(0, HC)
        row = part_ptr + t * NS * P
        sq = tl.sum(tl.load(row + ns * P + NMIX, mask=nsm, other=0.0), axis=0)
        r = 1.0 / tl.sqrt(sq / K + NORM_EPS)
        if tl.program_id(1) == ND:
            m_post = tl.sum(tl.load(row + ns[:, None] * P + HC + i[None, :], mask=nsm[:, None], other=0.0),
                            axis=0) * r
            cidx = i[:, None] * HC + i[None, :]  # [HC, HC]
            m_comb = tl.sum(tl.load(row + ns[:, None, None] * P + 2 * HC + cidx[None, :, :],
                                    mask=nsm[:, None, None], other=0.0), axis=0) * r
            post = 2.0 * tl.sigmoid(m_post * tl.load(scale_ptr + 1) + tl.load(base_ptr + HC + i))
            c = m_comb * tl.load(scale_ptr + 2) + tl.load(base_ptr + 2 * HC + cidx)  # [HC, HC]
            c = tl.exp(c - tl.max(c, axis=1)[:, None])  # Sinkhorn, as hyper.sinkhorn orders it
            c = c / tl.sum(c, axis=1)[:, None] + HC_EPS
            c = c / (tl.sum(c, axis=0)[None, :] + HC_EPS)
            for _ in range(ITERS - 1):
                c = c / (tl.sum(c, axis=1)[:, None] + HC_EPS)
                c = c / (tl.sum(c, axis=0)[None, :] + HC_EPS)
            tl.store(post_ptr + t * HC + i, post)
            tl.store(comb_ptr + t * HC * HC + cidx, c)
        else:
            _finish_y(row, x_ptr, scale_ptr, base_ptr, nw_ptr, y_ptr, yq_ptr, t, r, ns, nsm, i, D, HC, P, NORM_EPS,
                      HC_EPS, BD, NORM, Y_BF16, QY)

    @triton.jit
    def _finish_y(row, x_ptr, scale_ptr, base_ptr, nw_ptr, y_ptr, yq_ptr, t, r, ns, nsm, i, D: tl.constexpr,
                  HC: tl.constexpr, P: tl.constexpr, NORM_EPS: tl.constexpr, HC_EPS: tl.constexpr, BD: tl.constexpr,
                  NORM: tl.constexpr, Y_BF16: tl.constexpr, QY: tl.constexpr):
        """The y half of :func:`_finish_kernel`: ``pre`` from its mixes, ``y = sum_i pre_i * x_i`` for this program's
        columns in stream order, and with ``NORM`` the norm (and with ``QY`` the quantized row)."""
        K: tl.constexpr = HC * D
        m_pre = tl.sum(tl.load(row + ns[:, None] * P + i[None, :], mask=nsm[:, None], other=0.0), axis=0) * r
        pre = tl.sigmoid(m_pre * tl.load(scale_ptr) + tl.load(base_ptr + i)) + HC_EPS  # [HC]
        d = tl.program_id(1) * BD + tl.arange(0, BD)
        dm = d < D
        y = tl.zeros((BD,), tl.float32)
        for j in tl.static_range(HC):  # stream order, as the reference sums
            pj = tl.sum(tl.where(i == j, pre, 0.0), axis=0)
            xj = tl.load(x_ptr + t * K + j * D + d, mask=dm, other=0.0).to(tl.float32)
            if j == 0:
                y = pj * xj
            else:
                y = y + pj * xj
        if NORM:
            if Y_BF16:
                y = round_bf16(y)  # hc_pre's output as the reference rounds it
            y = tl.where(dm, y, 0.0)
            rr = 1.0 / tl.sqrt(tl.sum(y * y, axis=0) / D + NORM_EPS)
            y = tl.load(nw_ptr + d, mask=dm, other=0.0).to(tl.float32) * (y * rr)
            if QY:  # the stored row (rounded to the activation dtype), quantized per 128-wide block
                yb = tl.reshape(round_bf16(y) if Y_BF16 else y, (BD // 128, 128))
                q, e = act_quant_block(tl.where(tl.reshape(dm, (BD // 128, 128)), yb, 0.0))
                tl.store(yq_ptr + t * D + d, tl.reshape(q * pow2(e)[:, None], (BD,)).to(yq_ptr.dtype.element_ty),
                         mask=dm)
        tl.store(y_ptr + t * D + d, y.to(y_ptr.dtype.element_ty), mask=dm)


# ---------------------------------------------------------------------------------------------- plan
# The GPU plan's rules (module constants so that a benchmark variant can change them, scripts/bench_common.variant):
# K steps each split keeps at least, and the finishing kernel's warps for rows wider than 2,048. Candidates from the
# sm_90a builds (docs/performance.md, "Small decode kernels"): MIN_K_STEPS 1 (256 splits of one step at one token) and
# 4 warps (the Sinkhorn loop without a barrier). The 3-layer V4-Flash decode step at batch 1 on an H100 (2026-12-05,
# bench_decode.py --variants): 2.156 -> 1.871 ms per call (the earlier 2 and 8), the same in a loop.
MIN_K_STEPS = 1
WIDE_FINISH_WARPS = 4


def plan(T: int, hc: int, D: int, target: str | None = None, norm: bool = False, sms: int = 132) -> dict:
    """K splits ``NS`` (enough programs for ~1-2 per SM at decode, none at large T), the K step ``BK``, tokens per
    program ``BT``, the y columns per program ``BD`` (a whole row with the fused norm) and launch options: the one
    place they are chosen. At one token (V4-Flash, K = 16K) the splits were 32 programs of 8 K steps each: 9.5 us
    per call on an H200 for 1.5 MB of ``fn`` (2026-11-30 profile: latency, each step waiting for its loads); now
    256 programs of 1 step (:data:`MIN_K_STEPS`; 32 tokens: 64 splits of 4 steps instead of 32 of 8)."""
    K = hc * D
    if target == "cpu":  # the interpreter pays per program and per op: whole rows
        return dict(NS=2, BK=64, BT=2, BD=next_pow2(D) if norm else min(next_pow2(D), 1024), num_warps=4, warps2=4)
    BT, BK = 4, 64
    blocks = math.ceil(T / BT)
    NS = 1  # each split keeps >= MIN_K_STEPS K steps of BK (the fn loads feed no tl.dot: a step waits for its loads)
    while NS < 256 and NS * blocks < 2 * sms and K >= MIN_K_STEPS * (2 * NS) * BK:
        NS *= 2
    BD = next_pow2(D) if norm else 1024
    p = dict(NS=NS, BK=BK, BT=BT, BD=BD, num_warps=4, warps2=WIDE_FINISH_WARPS if BD > 2048 else 4)
    return {**p, **tile_override()}


TILE_KEYS = ("NS", "BK", "BT", "num_warps", "warps2")


def tile_override() -> dict:
    """Plan entries from the ``DSV4_MHC_TILE`` environment variable (``"NS=256"``; empty: none), for every GPU launch
    traced after it is set: a benchmark knob (the splits change only the fp32 order of the mixes' sums)."""
    return env_tiles("DSV4_MHC_TILE", TILE_KEYS)


def _check(h: jax.Array, w: HcWeights, norm_w) -> None:
    B, S, hc, D = h.shape
    K, nmix = hc * D, hc * (2 + hc)
    if w.fn.shape != (nmix, K) or w.base.shape != (nmix,) or w.scale.shape != (3,):
        raise ValueError(f"hc_pre: mHC weights fn {w.fn.shape}, base {w.base.shape}, scale {w.scale.shape} do not "
                         f"match hc_mult={hc}, dim={D} (expected ({nmix}, {K}), ({nmix},), (3,))")
    if norm_w is not None and norm_w.shape != (D,):
        raise ValueError(f"hc_pre: norm weight has shape {norm_w.shape}, expected ({D},)")
    if hc & (hc - 1):
        raise ValueError(f"hc_pre: the kernel needs a power-of-two hc_mult, got {hc}")


def _kernel_args(T: int, hc: int, D: int, p: dict, norm: bool, y_bf16: bool, norm_eps: float, hc_eps: float,
                 iters: int, qy: bool = False, post: bool = False):
    """Grids and metaparameters of both kernels, ``((grid1, meta1), (grid2, meta2))``, and the workspace width
    ``P``: the one place the jax and the torch launchers take them from. ``post``: the first kernel is
    :func:`_post_mix_partial_kernel` (``y_bf16`` also says the streams it forms are bf16)."""
    K, nmix = hc * D, hc * (2 + hc)
    P = next_pow2(nmix + 1)
    KC = math.ceil(math.ceil(K / p["NS"]) / p["BK"]) * p["BK"]
    meta1 = dict(K=K, NMIX=nmix, P=P, NS=p["NS"], KC=KC, BK=p["BK"], BT=p["BT"], num_warps=p["num_warps"])
    meta2 = dict(D=D, HC=hc, NS=p["NS"], NSP=next_pow2(p["NS"]), P=P, NORM_EPS=float(np.float32(norm_eps)),
                 HC_EPS=float(np.float32(hc_eps)), ITERS=iters, BD=p["BD"], NORM=norm, Y_BF16=y_bf16, QY=qy,
                 num_warps=p["warps2"])
    if post:  # the fused hc_post form: BK / hc columns of every stream per step (the plain form's K elements)
        bkp = max(1, p["BK"] // hc)
        meta1 = dict(D=D, HC=hc, NMIX=nmix, P=P, NS=p["NS"], DCS=math.ceil(math.ceil(D / p["NS"]) / bkp) * bkp,
                     BKP=bkp, BT=p["BT"], H_BF16=y_bf16, OS=1, OSP=1, num_warps=p["num_warps"])
    return ((p["NS"], math.ceil(T / p["BT"])), meta1), ((T, math.ceil(D / p["BD"]) + 1), meta2), P


def _launch(cfg: Config, h: jax.Array, w: HcWeights, norm_w, p: dict | None, qy: bool = False, prev=None):
    """Both kernels; returns ``y, post, comb``, with ``qy`` (needs the norm) ``yq`` (else ``None``), and the streams
    ``h`` the mixes read. ``prev``: the previous block's ``(out [B,S,D], post [B,S,hc], comb [B,S,hc,hc])``, whose
    ``hc_post`` over the residual streams ``h`` the first kernel forms (:func:`_post_mix_partial_kernel`)."""
    B, S, hc, D = h.shape
    _check(h, w, norm_w)
    T = B * S
    p = p or plan(T, hc, D, arch(), norm=norm_w is not None)
    if norm_w is not None and p["BD"] < D:
        raise ValueError(f"hc_pre: the fused norm needs a whole row per program, BD={p['BD']} < dim={D}")
    qy = qy and norm_w is not None
    (g1, m1), (g2, m2), P = _kernel_args(T, hc, D, p, norm_w is not None, cfg.act_dtype == jnp.bfloat16,
                                         cfg.norm_eps, cfg.hc_eps, cfg.hc_sinkhorn_iters, qy, prev is not None)
    x = h.reshape(T, hc * D)
    fn = w.fn.astype(jnp.float32)
    part_t = jax.ShapeDtypeStruct((T, m2["NS"], P), jnp.float32)  # the splits (fewer in the hc_post form)
    if prev is None:
        part = triton_call(x, fn, T, kernel=_mix_partial_kernel, out_shape=part_t, grid=g1, **m1)
    else:
        out, post0, comb0 = prev
        os_ = out.parts.shape[0] if isinstance(out, SplitSum) else 1
        if os_ > 1:
            _check_prev(h, out.parts.shape[1:], post0, comb0)
            out = out.parts.reshape(os_, T, D)
        else:
            _check_prev(h, out.shape, post0, comb0)
            out = out.reshape(T, D)
        m1 = {**m1, "OS": os_, "OSP": next_pow2(os_)}
        part, x = triton_call(out, x, post0.reshape(T, hc).astype(jnp.float32),
                              comb0.reshape(T, hc * hc).astype(jnp.float32), fn, T, kernel=_post_mix_partial_kernel,
                              out_shape=(part_t, jax.ShapeDtypeStruct((T, hc * D), cfg.act_dtype)), grid=g1, **m1)
    nw = jnp.zeros((1,), jnp.float32) if norm_w is None else norm_w
    y, post, comb, yq = triton_call(
        part, x, w.scale.astype(jnp.float32), w.base.astype(jnp.float32), nw, kernel=_finish_kernel,
        out_shape=(jax.ShapeDtypeStruct((T, D), cfg.act_dtype), jax.ShapeDtypeStruct((T, hc), jnp.float32),
                   jax.ShapeDtypeStruct((T, hc, hc), jnp.float32),
                   jax.ShapeDtypeStruct((T, D) if qy else (1,), jnp.bfloat16)), grid=g2, **m2)
    yq = yq.reshape(B, S, D) if qy else None
    return y.reshape(B, S, D), post.reshape(B, S, hc), comb.reshape(B, S, hc, hc), yq, x.reshape(B, S, hc, D)


def _check_prev(h: jax.Array, out_shape: tuple, post: jax.Array, comb: jax.Array) -> None:
    """The previous block's output (``out_shape``: one split's, for partials), ``post`` and ``comb`` fit ``h``."""
    B, S, hc, D = h.shape
    want = ((B, S, D), (B, S, hc), (B, S, hc, hc))
    if (tuple(out_shape), post.shape, comb.shape) != want:
        raise ValueError(f"hc_post: block output {tuple(out_shape)}, post {post.shape}, comb {comb.shape} do not "
                         f"match the streams {h.shape} (expected {want[0]}, {want[1]}, {want[2]})")


def hc_pre_triton(cfg: Config, h: jax.Array, w: HcWeights, p: dict | None = None):
    """The Triton path of :func:`hc_pre` (same returns)."""
    return _launch(cfg, h, w, None, p)[:3]


def hc_pre_norm_triton(cfg: Config, h: jax.Array, w: HcWeights, norm_w: jax.Array, p: dict | None = None):
    """The Triton path of :func:`hc_pre_norm` (same returns)."""
    return _launch(cfg, h, w, norm_w, p)[:3]


def hc_pre_norm_quant_triton(cfg: Config, h: jax.Array, w: HcWeights, norm_w: jax.Array, p: dict | None = None):
    """The Triton path of :func:`hc_pre_norm_quant`: ``y, post, comb, yq``."""
    return _launch(cfg, h, w, norm_w, p, True)[:4]


def hc_post_pre_norm_quant_triton(cfg: Config, out: jax.Array, h: jax.Array, post: jax.Array, comb: jax.Array,
                                  w: HcWeights, norm_w: jax.Array, p: dict | None = None):
    """The Triton path of :func:`hc_post_pre_norm_quant`: ``h_new, y, yq, post, comb`` (``yq`` ``None`` without
    the activation simulation or with a dim not a multiple of 128)."""
    y, post2, comb2, yq, h_new = _launch(cfg, h, w, norm_w, p, _quantized_row(cfg), prev=(out, post, comb))
    return h_new, y, yq, post2, comb2


def _triton_ok(cfg: Config, h: jax.Array) -> bool:
    return use_triton(cfg) and h.shape[0] * h.shape[1] > 0


def _quantized_row(cfg: Config) -> bool:
    """Whether the finish kernel also writes the normed row's FP8 quantization (the block's FP8 linears take it)."""
    return cfg.simulate and cfg.dim % 128 == 0


def hc_pre(cfg: Config, h: jax.Array, w: HcWeights):
    """Collapse the hc streams for a block: ``y [B,S,D]`` (act dtype), ``post [B,S,hc]``, ``comb [B,S,hc,hc]``
    (see :func:`dsv4_jax.modeling.hyper.hc_pre`). The two kernels run where :func:`dsv4_jax.kernels.use_triton`
    says so (``"auto"`` on GPUs); under a mesh each device runs them on its batch rows
    (:func:`dsv4_jax.kernels.on_mesh.replicated_on_mesh`)."""
    if _triton_ok(cfg, h):
        return replicated_on_mesh(lambda h, w: hc_pre_triton(cfg, h, w), (h,), w)
    return hyper.hc_pre(cfg, h, w)


def hc_pre_norm(cfg: Config, h: jax.Array, w: HcWeights, norm_w: jax.Array):
    """:func:`hc_pre` followed by the block's RMSNorm: ``rms_norm(y, norm_w) [B,S,D]`` (act dtype), ``post``,
    ``comb``. The kernel path computes the norm in the second kernel (one program per token), one launch less per
    site; same dispatch as :func:`hc_pre`."""
    if _triton_ok(cfg, h):
        return replicated_on_mesh(lambda h, p: hc_pre_norm_triton(cfg, h, *p), (h,), (w, norm_w))
    y, post, comb = hyper.hc_pre(cfg, h, w)
    return rms_norm(y, norm_w, cfg.norm_eps, cfg.act_dtype), post, comb


def hc_pre_norm_quant(cfg: Config, h: jax.Array, w: HcWeights, norm_w: jax.Array):
    """:func:`hc_pre_norm`, plus the FP8 activation quantization of its output as the block's FP8 linears consume
    it: ``(y, yq, post, comb)``, ``yq [B,S,D]`` bf16 the values of ``quant.quantize_act(y)`` (exact) from the
    kernel path, where the finish kernel holds the normed row anyway (one XLA reduce and one elementwise kernel
    less per site and step); ``None`` on the reference path and without the activation simulation (the linears then
    quantize ``y`` themselves)."""
    if _triton_ok(cfg, h) and _quantized_row(cfg):
        y, post, comb, yq = replicated_on_mesh(lambda h, p: hc_pre_norm_quant_triton(cfg, h, *p), (h,), (w, norm_w))
        return y, yq, post, comb
    y, post, comb = hc_pre_norm(cfg, h, w, norm_w)
    return y, None, post, comb


# The fused hc_post form on the kernel path: opt-in, measured slower. Its first form (one stream at a time, each
# stream's loads after the previous stream's store, 1/hc the programs) passed its GPU test and the golden criteria
# on an H100 but made the 3-layer V4-Flash loop slower: 0.985 against 0.970 ms at batch 1, 4.685 against 4.669 at
# batch 32 (2026-12-06, docs/performance.md), although the step had 3 kernels fewer at batch 1 (wo_b's split-K sum
# and both hc_post fusions) and 2 at batch 32. The current form (all streams in one tile, every load before the
# store, the plain form's program count) passed its GPU test and the golden criteria on an H200 and was slower too:
# 4.694 ms (4.678 and 4.658 with the bf16 projections kernel also on) against 4.613 / 4.603 at batch 32, 0.889
# against 0.861 / 0.880 at batch 1 (2026-12-06, runs alternated with the defaults). ``DSV4_MHC_FUSE_POST=1`` turns
# it on for a process (GPU test runs).
FUSE_POST = os.environ.get("DSV4_MHC_FUSE_POST", "0") == "1"


def hc_post_pre_norm_quant(cfg: Config, out: jax.Array, h: jax.Array, post: jax.Array, comb: jax.Array,
                           w: HcWeights, norm_w: jax.Array):
    """The previous block's ``hc_post`` (its output ``out [B,S,D]`` into the residual streams ``h [B,S,hc,D]`` with
    its ``post``/``comb``, :func:`dsv4_jax.modeling.hyper.hc_post`), then :func:`hc_pre_norm_quant` of the new
    streams: ``(h_new, y, yq, post, comb)``. The kernel path forms the streams inside the mixes' first kernel
    (:func:`_post_mix_partial_kernel`), which writes them for the next site: XLA's fusion of ``hc_post`` was a
    launch of its own at every site. Same dispatch as :func:`hc_pre`; the reference path is ``hyper.hc_post``
    followed by :func:`hc_pre_norm_quant`. ``out`` may be a :class:`quant.SplitSum` (its linear's partials), which
    the kernel sums."""
    if FUSE_POST and _triton_ok(cfg, h):
        if not single_device():  # (the linears hand partials over on one device only)
            out = summed(out)
        return replicated_on_mesh(lambda *a: hc_post_pre_norm_quant_triton(cfg, *a[:4], *a[4]),
                                  (out, h, post, comb), (w, norm_w))
    h = hyper.hc_post(cfg, summed(out), h, post, comb)
    return (h, *hc_pre_norm_quant(cfg, h, w, norm_w))


# ---------------------------------------------------------------------------------------------- torch launcher
def run_torch(h, fn, scale, base, hc_eps: float, norm_eps: float, iters: int, p: dict, norm_w=None,
              y_bf16: bool = True, qy: bool = False, prev=None):
    """Both kernels on torch tensors (CI: under ``TRITON_INTERPRET=1``): ``h [T, hc, D]`` -> y ``[T, D]`` fp32
    (normed by ``norm_w [D]`` when given, after rounding y to bf16 if ``y_bf16``), post ``[T, hc]``, comb
    ``[T, hc, hc]``; with ``qy`` (and ``norm_w``) also ``yq [T, D]`` fp32 (the quantized values of y as stored).
    ``prev``: ``(out [T, D], post [T, hc], comb [T, hc, hc])`` of the previous block (``out`` may be fp32 split-K
    partials ``[OS, T, D]``), ``h`` then being the residual streams (:func:`_post_mix_partial_kernel`); the streams
    it formed (``[T, hc, D]``, ``h``'s dtype) come last."""
    import torch

    T, hc, D = h.shape
    qy = qy and norm_w is not None
    (g1, m1), (g2, m2), P = _kernel_args(T, hc, D, p, norm_w is not None, y_bf16, norm_eps, hc_eps, iters, qy,
                                         prev is not None)
    x = h.reshape(T, hc * D).contiguous()
    nan = lambda *s: torch.full(s, float("nan"), dtype=torch.float32, device=h.device)  # noqa: E731
    part = nan(T, m2["NS"], P)
    if prev is None:
        _mix_partial_kernel[g1](x, fn, T, part, **m1)
    else:
        hn = torch.full((T, hc * D), float("nan"), dtype=h.dtype, device=h.device)
        os_ = prev[0].shape[0] if prev[0].dim() == 3 else 1
        _post_mix_partial_kernel[g1](prev[0].contiguous(), x, prev[1].contiguous(), prev[2].contiguous(), fn, T, part,
                                     hn, **{**m1, "OS": os_, "OSP": next_pow2(os_)})
        x = hn
    y, post, comb, yq = nan(T, D), nan(T, hc), nan(T, hc, hc), nan(T, D) if qy else nan(1)
    nw = torch.zeros(1, dtype=torch.float32, device=h.device) if norm_w is None else norm_w
    _finish_kernel[g2](part, x, scale, base, nw, y, post, comb, yq, **m2)
    res = (y, post, comb, yq) if qy else (y, post, comb)
    return res if prev is None else (*res, x.view(T, hc, D))
