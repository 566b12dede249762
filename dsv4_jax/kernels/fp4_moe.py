"""FP4 routed experts as two grouped GEMMs that read the packed e2m1 weights in place (spec 9, 12.1).

Public function :func:`fp4_moe_pairs` (same contract as ``experts.pairs_gathered``: one fp32 row per (token, expert)
pair, zeros for pairs whose expert is not local); :func:`fp4_moe_pairs_reference` is the XLA code (the spec, the CPU
path, bit for bit today's results). ``moe.routed_experts`` calls it per device inside the expert-parallel
``shard_map``, so each device computes only the pairs routed to its own experts.

Layout (``experts.group_pairs``, built in JAX): pairs sorted by expert into blocks of ``BM`` slots that each belong
to one expert; empty experts get no block; the grid has a static bound of blocks and programs past ``used_blocks``
return at once. So a step reads only the touched experts' bytes (decode: 6 experts of 256).
Decode sizes (:func:`use_gemv`: up to as many pairs as experts) take the GEMV kernels of
:mod:`dsv4_jax.kernels.fp4_moe_gemv` instead (one pair per block row, the pairs as they come, no sort).

Two kernels, both with fp32 accumulation of exact products and the reference's rounding points:

1. :func:`_gate_up_kernel`, grid (block, I/BN1): ``g = bf16(x @ w1.T)``, ``u = bf16(x @ w3.T)`` in one pass over
   K, then ``u = clip(u, -L, L)``, ``g = min(g, L)``, ``a = bf16(wt * silu(g) * u)`` (routing weight in fp32) ->
   ``h [slots, I]`` bf16.
2. :func:`_down_kernel`, grid (block, D/BN2): for each 128-wide K block of ``h`` the reference's ``act_quant``
   (pow2 scale rounded up, e4m3 round-to-nearest-even, computed arithmetically so the interpreter agrees), then
   ``y = bf16(hq @ w2.T)`` -> ``y [slots, D]``.

The weights' e2m1 codes become fp32 by placing the 3 magnitude bits under the exponent (``0.5`` lands on an fp32
denormal, scaled back by ``2**126`` folded with the 1x32 e8m0 scale: :func:`common.e2m1_pair`): exact, as are bf16
copies of them and of the FP8-quantized activations, so a bf16 ``tl.dot`` with fp32 accumulation sums exactly the
reference's products, in another order. e8m0 bytes 0 and 255 (2**-127 and NaN) are not decoded (0 and inf):
checkpoints do not use them.

Two dot variants (``tiles()["CODES"]``): 0 (default, verified on an H200) dots the scaled values as bf16 and
accumulates each 1x32 group into one fp32 accumulator; 1 dots the raw codes as fp16 (e2m1 code bits placed under the
fp16 exponent, e4m3 activation codes from ``quantize_act``) and applies the weight scale to each group's partial
product and the activation scale to each 128-block's: the same exact products, 20-25% fewer instructions per weight
byte in the decode loop (sm_90 SASS: 1122 vs 1471 per gate/up iteration, 1156 vs 1358 down), yet 4 % slower on an
H200 at 32 tokens (2,209 vs 2,115 us per call, 2026-11-30, ``docs/performance.md``): variant 0 stays the default. Decode
is bound by those instructions (~9-11 per FP4 weight element at BM=16, against ~4.5 that the issue rate allows at
the copy bandwidth), not by the dots.

Order contract: each pair's output row is its own dot (no cross-pair sums); :func:`experts.combine` then adds each
token's pairs in ascending expert id in fp32, exactly as the reference; on a mesh the gather strategy's ``psum``
adds the per-device partial sums (as the reference path does). So the kernel path differs from the reference only
in the fp32 summation order inside each dot (relative ~1e-6 before the bf16 roundings of g, u, a and y; a rounding
boundary crossed there moves that element by one bf16 ulp, and the FP8 requantization can amplify it to one e4m3
step of one element of ``h``).

Portability: plain ``tl.load``/``tl.dot``/integer ops, no inline assembly; the tile sizes per architecture come
from :func:`tiles` (one place). ROCm: the same kernels are expected to compile for CDNA (Triton's AMD backend);
the tiled path on gfx950 is ``tl.dot_scaled`` (native MXFP4: :mod:`fp4_moe_scaled`, ``tiles()["SCALED"]``), on sm90
the register-operand kernels of :mod:`fp4_moe_wx` (``tiles()["WX"]``: 1.3-1.4x faster than Triton's bf16 rewrite of
the scaled dot there); these register-dequantizing kernels serve the other targets.
Nothing here has been run on ROCm. CI runs the same ``@triton.jit`` kernels under ``TRITON_INTERPRET=1`` with
torch CPU tensors (:func:`launch_torch`; the interpreter's bf16 dot and conversions are not faithful, so there
the kernels dot fp32 copies of the same bf16-exact values).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from dsv4_jax.kernels import arch, check_prefetch, env_tiles, triton_call, use_triton
from dsv4_jax.kernels.common import (
    act_exp,
    e2m1_factors,
    e2m1_pair,
    e4m3_grid,
    e8m0,
    moe_block_pairs,
    moe_launch_dims,
    pow2,
    round_bf16,
    swiglu_h,
)
from dsv4_jax.kernels.fp4_moe_gemv import check_gemv_shapes, gemv_tiles, launch_gemv_jax
from dsv4_jax.kernels.fp4_moe_mma import launch_mma_jax, mma_tiles
from dsv4_jax.kernels.fp4_moe_scaled import act_codes, check_scaled_shapes, launch_scaled_jax
from dsv4_jax.kernels.fp4_moe_wx import check_wx_shapes, launch_wx_jax, split_groups
from dsv4_jax.modeling.experts import block_rows, group_pairs, n_blocks_bound, pairs_gathered, pairs_grouped
from dsv4_jax.modeling.quant import Fp4Tensor, quantize_act


# ---------------------------------------------------------------------------------------------- device helpers
@triton.jit
def _fp4_group(acc, wp_ptr, ws_ptr, n, kk, K2, K32, xe, xo, DOT: tl.constexpr):
    """acc [BN, BM] += W[n, kk:kk+32] @ x[:, kk:kk+32].T for one 1x32 scale group; ``xe``/``xo`` [16, BM] are the
    even/odd columns (the low/high nibbles of the 16 packed bytes)."""
    i = tl.arange(0, 16)
    p = tl.load(wp_ptr + n[:, None] * K2 + (kk // 2 + i)[None, :]).to(tl.int32)  # [BN, 16] bytes
    f1, f2 = e2m1_factors(tl.load(ws_ptr + n * K32 + kk // 32).to(tl.int32))  # [BN] each
    lo, hi = e2m1_pair(p)  # 3 integer operations per weight (common.e2m1_pair)
    acc = tl.dot((lo * f1[:, None] * f2[:, None]).to(DOT), xe, acc)
    return tl.dot((hi * f1[:, None] * f2[:, None]).to(DOT), xo, acc)


@triton.jit
def _e2m1_code(code, DOT: tl.constexpr):
    """Nibble codes (int16, 0..15) -> the e2m1 value times 2**-14 as fp16 bits (exact; 0.5 lands on a subnormal)."""
    bits = ((code & 7) << 9) | ((code & 8) << 12)
    return bits.to(tl.float16, bitcast=True).to(DOT)


@triton.jit
def _fp4_group_codes(acc, wp_ptr, ws_ptr, n, kk, K2, K32, xe, xo, DOT: tl.constexpr):
    """Like :func:`_fp4_group` in the codes domain: ``xe``/``xo`` hold activation CODES (their block scale is applied
    by the caller once per 128 columns) and the weights' 1x32 scale multiplies the [BN, BM] partial product instead of
    every weight: fewer instructions per weight byte (decode is bound by them, not by the dot)."""
    i = tl.arange(0, 16)
    p = tl.load(wp_ptr + n[:, None] * K2 + (kk // 2 + i)[None, :]).to(tl.int16)  # [BN, 16] bytes
    s = e8m0(tl.load(ws_ptr + n * K32 + kk // 32)) * 16384.0  # [BN]: 2**(e - 127) * 2**14
    part = tl.dot(_e2m1_code(p & 15, DOT), xe)
    part = tl.dot(_e2m1_code(p >> 4, DOT), xo, part)
    return acc + part * s[:, None]


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _gate_up_kernel(x_ptr, xs_ptr, tok_ptr, wt_ptr, rows_ptr, bexp_ptr, used_ptr, w1p_ptr, w1s_ptr, w3p_ptr, w3s_ptr,
                    h_ptr, R: tl.constexpr, D: tl.constexpr, I: tl.constexpr, LIMIT: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, G: tl.constexpr, DOT: tl.constexpr, CODES: tl.constexpr):
    """h[slot, n] = bf16(wt * silu(min(g, L)) * clip(u, -L, L)) for the BM slots of one block and BN columns.

    ``CODES`` 0: ``x`` holds the FP8-quantized values (``xs`` unused); 1: ``x`` holds the e4m3 codes and ``xs [T,
    D/128]`` their scales (needs ``G == 4``: one activation block per K step)."""
    b = tl.program_id(0)
    if b >= tl.load(used_ptr):
        return
    ex = tl.load(bexp_ptr + b).to(tl.int64)
    slot, live, tok, wt = moe_block_pairs(rows_ptr, tok_ptr, wt_ptr, b, BM, R)  # [BM] each
    n = tl.program_id(1) * BN + tl.arange(0, BN)  # [BN]
    w1p, w3p = w1p_ptr + ex * (I * D // 2), w3p_ptr + ex * (I * D // 2)
    w1s, w3s = w1s_ptr + ex * (I * D // 32), w3s_ptr + ex * (I * D // 32)
    i2 = 2 * tl.arange(0, 16)
    acc_g = tl.zeros((BN, BM), tl.float32)
    acc_u = tl.zeros((BN, BM), tl.float32)
    for k0 in range(0, D, 32 * G):
        if CODES:
            blk_g = tl.zeros((BN, BM), tl.float32)
            blk_u = tl.zeros((BN, BM), tl.float32)
        for j in tl.static_range(G):
            kk = k0 + 32 * j
            xp = x_ptr + tok[None, :] * D + (kk + i2)[:, None]  # [16, BM]: x[tok, kk + 2i]
            xe = tl.load(xp, mask=live[None, :], other=0.0).to(DOT)
            xo = tl.load(xp + 1, mask=live[None, :], other=0.0).to(DOT)
            if CODES:
                blk_g = _fp4_group_codes(blk_g, w1p, w1s, n, kk, D // 2, D // 32, xe, xo, DOT)
                blk_u = _fp4_group_codes(blk_u, w3p, w3s, n, kk, D // 2, D // 32, xe, xo, DOT)
            else:
                acc_g = _fp4_group(acc_g, w1p, w1s, n, kk, D // 2, D // 32, xe, xo, DOT)
                acc_u = _fp4_group(acc_u, w3p, w3s, n, kk, D // 2, D // 32, xe, xo, DOT)
        if CODES:
            xs = tl.load(xs_ptr + tok * (D // 128) + k0 // 128, mask=live, other=0.0)  # [BM]
            acc_g += blk_g * xs[None, :]
            acc_u += blk_u * xs[None, :]
    a = swiglu_h(acc_g, acc_u, wt, LIMIT)
    tl.store(h_ptr + slot[None, :].to(tl.int64) * I + n[:, None], a.to(h_ptr.dtype.element_ty))


@triton.jit
def _quant_scale(h_ptr, slot, k0, I: tl.constexpr):
    """The reference act_quant's scale of h[slot, k0:k0+128]: 2**ceil(log2(max(amax, 1e-4) * fp32(1/448)))."""
    i = tl.arange(0, 128)
    t = tl.load(h_ptr + slot[None, :].to(tl.int64) * I + (k0 + i)[:, None]).to(tl.float32)  # [128, BM]
    return act_exp(tl.max(tl.abs(t), axis=0))  # [BM] exponent


@triton.jit
def _e4m3(h_ptr, slot, col, e, I: tl.constexpr, CODES: tl.constexpr):
    """h[slot, col] FP8-quantized with block exponent e: clip(h / 2**e, +-448) rounded to e4m3 (nearest even) ->
    fp32 [16, BM]: the code's value (``CODES``) or times 2**e."""
    t = tl.load(h_ptr + slot[None, :].to(tl.int64) * I + col[:, None]).to(tl.float32)
    r = e4m3_grid(t * pow2(-e)[None, :])
    if CODES:
        return r
    return r * pow2(e)[None, :]


@triton.jit
def _down_kernel(h_ptr, bexp_ptr, used_ptr, w2p_ptr, w2s_ptr, y_ptr, D: tl.constexpr, I: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr, CODES: tl.constexpr):
    """y[slot, n] = bf16(act_quant(h[slot]) @ w2[n].T) for the BM slots of one block and BN output columns."""
    b = tl.program_id(0)
    if b >= tl.load(used_ptr):
        return
    ex = tl.load(bexp_ptr + b).to(tl.int64)
    slot = b * BM + tl.arange(0, BM)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    w2p, w2s = w2p_ptr + ex * (D * I // 2), w2s_ptr + ex * (D * I // 32)
    i2 = 2 * tl.arange(0, 16)
    acc = tl.zeros((BN, BM), tl.float32)
    for k0 in range(0, I, 128):
        e = _quant_scale(h_ptr, slot, k0, I)
        blk = tl.zeros((BN, BM), tl.float32)
        for j in tl.static_range(4):
            kk = k0 + 32 * j
            xe = _e4m3(h_ptr, slot, kk + i2, e, I, CODES).to(DOT)
            xo = _e4m3(h_ptr, slot, kk + 1 + i2, e, I, CODES).to(DOT)
            if CODES:
                blk = _fp4_group_codes(blk, w2p, w2s, n, kk, I // 2, I // 32, xe, xo, DOT)
            else:
                acc = _fp4_group(acc, w2p, w2s, n, kk, I // 2, I // 32, xe, xo, DOT)
        if CODES:
            acc += blk * pow2(e)[None, :]
    tl.store(y_ptr + slot[None, :].to(tl.int64) * D + n[:, None], round_bf16(acc).to(y_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------- launch plans
WX_WIDE_PAIRS = 1024  # mean pairs per local expert from which sm90's WX kernels take 128-pair blocks (tiles)


def tiles(target: str, n_pairs: int, n_local: int, D: int, I: int) -> dict:
    """Tile sizes for one call (the one place they are chosen): rows per block ``BM`` from the mean pairs per local
    expert, output tiles ``BN1`` (gate/up, over I) and ``BN2`` (down, over D), scale groups per K step ``G``, and
    ``CODES`` (1: dot the e2m1/e4m3 codes as fp16 and apply the scales to the partial products; 0: dot the scaled
    values as bf16, the variant verified on an H200), ``SCALED`` (1: the ``tl.dot_scaled`` kernels of
    :mod:`fp4_moe_scaled`, the default where the dots are native MXFP4: gfx950; ``BN1`` is then 128) and ``WX`` (1:
    the register-operand kernels of :mod:`fp4_moe_wx`, the sm90 default for tiled calls; ``BN1`` is 128) with
    ``BFMUL`` (1 on sm90: the weights decoded through bf16 bit patterns and bf16 pair multiplies; 0 elsewhere: the
    fp32 decode, for chips where bf16 arithmetic on subnormal bit patterns is not known to be exact)."""
    BM = max(16, min(64, block_rows(n_pairs, n_local)))
    if target == "cpu":  # the interpreter: its cost is per op, so few programs with whole-width tiles
        return dict(BM=BM, BN1=min(128, I), BN2=min(128, D), G=1, CODES=0, SCALED=0, num_warps=4, num_stages=1)
    decode = BM == 16
    # tl.dot_scaled (fp4_moe_scaled): native MXFP4 dots on gfx950; on Hopper Triton's bf16 rewrite of them beat the
    # register dequantization by 16-18 % (H200, V4-Flash, bench_moe.py wall per call: 64 tokens 2,560 vs 3,065 us,
    # 2K tokens 7,403 vs 8,924 us; 2026-12-01). Other targets keep the register path (not measured).
    # Prefill tiles on sm90 take 4 warps: 2K tokens of V4-Flash 6,236 vs 7,387 us with 8 (H200, bench_moe.py,
    # 2026-12-02; 6,475 vs 7,411 in the twelfth session); gfx950 keeps 8 (its compile check; untimed).
    # sm90 takes the WX kernels (fp4_moe_wx: the weight decoded in registers as the dots' A operand, the activations'
    # bf16 values streamed untouched): V4-Flash, 64 tokens (BM 16) 1,982 vs 2,551 us with dot_scaled's rewrite, 2K
    # tokens 4,610 vs 6,291 us, 8K tokens 14,247 vs 20,377 us (H200, bench_moe.py, 2026-12-03; 4 warps; 3 stages at
    # BM 16, 2 above: 4 stages lost 20-27 %, BN2 64 or 256 lost 6-10 % at 2K and 8K).
    wx = int(target == "sm90")
    scaled = int(target == "gfx950")
    # WX blocks of 128 pairs with 8 warps (each decoded weight tile feeds twice the token slots) once the experts are
    # so full that the padding of partly filled blocks is a few %: V4-Flash 64K tokens (1,536 pairs per expert)
    # 90.5 vs 97.0 ms, 8K tokens (192 per expert, 128-slot blocks a third padding) 15.6 vs 14.2 ms (H200,
    # bench_moe.py --tokens 8192,65536 --variants "BM=128,num_warps=8", 2026-12-04)
    wide = wx and n_pairs >= WX_WIDE_PAIRS * max(1, n_local)
    # BFMUL: V4-Flash 8K tokens 13.26 vs 14.22 ms, 64K tokens 82.85 vs 90.95 ms (H200, bench_moe.py --tokens
    # 8192,65536 --variants BFMUL=1, 2026-12-05; the GPU cases of test_kernels_fp4_moe.py passed with it)
    return dict(BM=128 if wide else BM, BN1=128 if scaled or wx or not decode else 64, BN2=64 if decode else 128,
                G=4 if (D // 32) % 4 == 0 else 1, CODES=0, SCALED=scaled, WX=wx, BFMUL=wx,
                num_warps=8 if wide else 4 if decode or target == "sm90" else 8, num_stages=3 if decode else 2)


def check_shapes(x, w1: Fp4Tensor, w2: Fp4Tensor, w3: Fp4Tensor, t: dict):
    """Refuse shapes the kernels do not tile, naming the tensor at fault."""
    E, I, D2 = w1.packed.shape
    D = 2 * D2
    want = {"w1.packed": (E, I, D // 2), "w3.packed": (E, I, D // 2), "w2.packed": (E, D, I // 2),
            "w1.scale": (E, I, D // 32), "w3.scale": (E, I, D // 32), "w2.scale": (E, D, I // 32)}
    got = {"w1.packed": w1.packed.shape, "w3.packed": w3.packed.shape, "w2.packed": w2.packed.shape,
           "w1.scale": w1.scale.shape, "w3.scale": w3.scale.shape, "w2.scale": w2.scale.shape}
    for name, shape in want.items():
        if tuple(got[name]) != shape:
            raise ValueError(f"fp4_moe: {name} has shape {tuple(got[name])}, expected {shape} for x [..., {D}]")
    if x.shape[-1] != D:
        raise ValueError(f"fp4_moe: x has {x.shape[-1]} features, the experts take {D}")
    if D % (32 * t["G"]) or I % 128 or I % t["BN1"] or D % t["BN2"] or (t["CODES"] and t["G"] != 4):
        raise ValueError(f"fp4_moe: expert shape D={D}, I={I} is not tiled by {t} (need D % 32G, I % 128, "
                         "I % BN1, D % BN2 == 0, and G == 4 with CODES)")
    return E, D, I


def launch_torch(x, xs, tok, wt, rows, bexp, used, w1, w2, w3, limit: float, t: dict):
    """Run both kernels on torch tensors (the interpreter tests; the same kernels as :func:`launch_jax`); ``x``,
    ``xs`` as :func:`launch_jax` (fp32 tensors).

    ``w1/w2/w3``: ``(packed, scale)`` uint8 tensors. Returns ``(h [slots, I], y [slots, D])`` fp32, each row of a
    used block written (unused blocks keep the poison ``nan``)."""
    import torch

    I, D, R, n_blocks, n_slots, kw = moe_launch_dims(w1[0].shape, tok, bexp, t)
    h = torch.full((n_slots, I), float("nan"), dtype=torch.float32)
    y = torch.full((n_slots, D), float("nan"), dtype=torch.float32)
    _gate_up_kernel[(n_blocks, I // t["BN1"])](x, xs, tok, wt, rows, bexp, used, *w1, *w3, h, R=R, D=D, I=I,
                                               LIMIT=limit, BM=t["BM"], BN=t["BN1"], G=t["G"], DOT=tl.float32,
                                               CODES=t["CODES"], **kw)
    _down_kernel[(n_blocks, D // t["BN2"])](h, bexp, used, *w2, y, D=D, I=I, BM=t["BM"], BN=t["BN2"], DOT=tl.float32,
                                            CODES=t["CODES"], **kw)
    return h, y


def launch_jax(x, xs, tok, wt, rows, bexp, used, w1: Fp4Tensor, w2: Fp4Tensor, w3: Fp4Tensor, limit: float,
               t: dict):
    """Both kernels through jax-triton on device arrays: ``x [T, D]`` the FP8-quantized tokens (``CODES`` 0: their
    values in bf16, exact; 1: their e4m3 codes in fp16, exact, with ``xs [T, D/128]`` fp32 block scales), ``tok``,
    ``wt``, the :func:`experts.group_pairs` layout -> ``y [slots, D]`` bf16 (rows of unused blocks undefined)."""
    I, D, R, n_blocks, n_slots, kw = moe_launch_dims(w1.packed.shape, tok, bexp, t)
    dot = tl.float16 if t["CODES"] else tl.bfloat16
    h = triton_call(x, xs, tok, wt, rows, bexp, used, w1.packed, w1.scale, w3.packed, w3.scale,
                       kernel=_gate_up_kernel, out_shape=jax.ShapeDtypeStruct((n_slots, I), jnp.bfloat16),
                       grid=(n_blocks, I // t["BN1"]), R=R, D=D, I=I, LIMIT=limit, BM=t["BM"], BN=t["BN1"], G=t["G"],
                       DOT=dot, CODES=t["CODES"], tiled=True, **kw)
    return triton_call(h, bexp, used, w2.packed, w2.scale, kernel=_down_kernel, tiled=True,
                          out_shape=jax.ShapeDtypeStruct((n_slots, D), jnp.bfloat16), grid=(n_blocks, D // t["BN2"]),
                          D=D, I=I, BM=t["BM"], BN=t["BN2"], DOT=dot, CODES=t["CODES"], **kw)


# ---------------------------------------------------------------------------------------------- public
def fp4_moe_pairs_reference(cfg, x, xq, tok, e, wt, w1s, w2s, w3s, grouped: bool | None = None) -> jax.Array:
    """The XLA schedules of ``experts.py`` (``grouped`` None: gathered for fewer pairs than local experts)."""
    if grouped is None:
        grouped = tok.shape[0] >= w1s.packed.shape[0]
    return (pairs_grouped if grouped else pairs_gathered)(cfg, x, xq, tok, e, wt, w1s, w2s, w3s)


TILE_KEYS = ("GEMV", "BM", "BN1", "BN2", "G", "CODES", "SCALED", "WX", "BFMUL", "BN", "NG", "NW1", "NW2", "F8", "ACC",
             "NS", "NG1", "NG2", "GT", "PF", "maxnreg", "num_warps", "num_stages")


def tile_override() -> dict:
    """Tile entries from the ``DSV4_MOE_TILE`` environment variable (``"GEMV=2,num_stages=2"``; empty: none), applied
    to every MoE call traced after it is set: a benchmark knob (``bench_decode.py --moe-tile``), e.g. to time a decode
    step with the opt-in tensor-core GEMV. Every variant computes the same contract (:func:`fp4_moe_pairs`)."""
    return env_tiles("DSV4_MOE_TILE", TILE_KEYS)


def use_gemv(n_pairs: int, n_experts: int) -> bool:
    """Whether a call takes the GEMV kernels (:mod:`fp4_moe_gemv`, one pair per block row) rather than the tiled
    ones: up to ``n_experts`` pairs (the model's experts, all devices' together: pairs per expert decide, and on a
    mesh a device's share of its pairs and of the experts shrink alike). Measured on an H200 (V4-Flash, 256
    experts, ``scripts/bench_moe.py``, wall per MoE call): 32 tokens (192 pairs) GEMV 1.70 ms vs tiled 2.10 ms
    (2026-11-30, the GEMV with per-group accumulators); 64 tokens (384 pairs) GEMV 4.11 vs tiled 3.25 ms
    (2026-11-29, before them), so the crossover lies between 192 and 384 pairs. Blocks of 2 or 4 pairs of one expert
    were slower than one pair at every size (the padding slots cost FMAs) and are gone."""
    return n_pairs <= max(1, n_experts)


def schedule(e: jax.Array, n_local: int, block: int):
    """The tiled kernels' block schedule (:func:`experts.group_pairs`) with ``used_blocks`` as a 1-element array (the
    decode GEMV kernels take the pairs as they come)."""
    rows, bexp, used, slot = group_pairs(e, n_local, block)
    assert bexp.shape[0] == n_blocks_bound(e.shape[0], n_local, block)
    return rows, bexp, used.reshape(1), slot


def fp4_moe_pairs_triton(cfg, x, xq, tok, e, wt, w1s: Fp4Tensor, w2s: Fp4Tensor, w3s: Fp4Tensor,
                         tile: dict | None = None) -> jax.Array:
    """The Triton path of :func:`fp4_moe_pairs` (``x [T, D]`` the tokens, ``xq`` their FP8-quantized fp32 values;
    ``tile`` overrides entries of :func:`tiles` or :func:`fp4_moe_gemv.gemv_tiles`, for tuning; ``GEMV=0`` forces
    the tiled kernels, ``GEMV=1`` the GEMV ones, ``GEMV=2`` the tensor-core GEMV of :mod:`fp4_moe_mma`, ``GEMV=3``
    the same with e4m3 dots (both opt-in: the fp16 form is slower than the FMA GEMV, the e4m3 one fails the golden
    criteria; see :mod:`fp4_moe_mma`), ``GEMV=4`` the FMA GEMV with its weights copied ahead by ``cp.async``
    (:mod:`fp4_moe_gemv_async`, CUDA only; ``NS``, ``NG1``, ``NG2``, ``GT``, ``num_warps`` override its plans)); ``PF``
    (FMA GEMV, CUDA only, opt-in): L2 prefetches of the weight words ``PF`` K steps ahead. Decode sizes
    (:func:`use_gemv`) take the GEMV kernels."""
    R, n_local = tok.shape[0], w1s.packed.shape[0]
    D, I = x.shape[-1], w1s.packed.shape[1]
    tile = dict(tile or {})
    # on a mesh every device sees all R pairs, ~R * n_local / E of them its own (the others cost the GEMV nothing):
    # R against all E experts (32 tokens on two GPUs: the GEMV, as on one; against the 128 local experts it was the
    # tiled kernels and their schedule's ~11 more kernels a layer)
    gemv = tile.pop("GEMV", int(use_gemv(R, max(n_local, cfg.n_routed_experts))))
    if gemv == 4:  # the GEMV kernels with their weight words in flight by cp.async (Gluon, CUDA; opt-in)
        from dsv4_jax.kernels import fp4_moe_gemv_async as ga

        p1, p2 = ga.plans(D, I, R, tile)
        check_shapes(x, w1s, w2s, w3s, dict(G=1, BN1=ga.rows(p1), BN2=ga.rows(p2), CODES=0))
        y = ga.launch_jax(x.astype(jnp.bfloat16), tok.astype(jnp.int32), wt.astype(jnp.float32), e.astype(jnp.int32),
                          w1s, w2s, w3s, float(cfg.swiglu_limit), p1, p2)
        return y.astype(jnp.float32)  # [R, D]
    if gemv:  # decode: one pair per block row, the pairs as they come
        # Sorting by expert buys nothing with one pair per block row (repeated experts meet in L2: the grid walks
        # all pairs of one weight tile together), while group_pairs' sort, scatters and cumsums and the gather back
        # were ~12 of the ~70 kernels of a decode layer on an H200 (scripts/count_launches.py). Same bits per pair.
        mma = gemv in (2, 3)  # the tensor-core GEMV (3: its e4m3 dots; it checks its own tiling), else the FMA one
        t = {**(mma_tiles(arch(), D, I, f8=gemv == 3) if mma else gemv_tiles(arch(), D, I, R)), **tile}
        check_shapes(x, w1s, w2s, w3s, dict(G=1, BN1=t["BN"], BN2=t["BN"], CODES=0))
        if not mma:
            check_gemv_shapes(D, I, t)
            check_prefetch(t.get("PF", 0), arch(), "fp4_moe (GEMV)")
        launch = launch_mma_jax if mma else launch_gemv_jax
        y = launch(x.astype(jnp.bfloat16), tok.astype(jnp.int32), wt.astype(jnp.float32), e.astype(jnp.int32), w1s,
                   w2s, w3s, float(cfg.swiglu_limit), t)
        return y.astype(jnp.float32)  # [R, D]
    t = {**tiles(arch(), R, n_local, D, I), **tile}
    if ("SCALED" in tile or "CODES" in tile) and "WX" not in tile:  # asking for another tiled kernel
        t["WX"] = 0
    if t["BM"] < 16:
        raise ValueError(f"fp4_moe: the tiled kernels need BM >= 16 rows per block (tl.dot), got {t['BM']}")
    check_shapes(x, w1s, w2s, w3s, t)
    rows, bexp, used, slot = schedule(e, n_local, t["BM"])
    if t["SCALED"] and t["CODES"]:
        raise ValueError("fp4_moe: CODES=1 is a variant of the register-dequantizing kernels; it needs SCALED=0")
    pairs = (tok.astype(jnp.int32), wt.astype(jnp.float32), rows, bexp, used, w1s, w2s, w3s, float(cfg.swiglu_limit), t)
    if t.get("WX"):  # the weight as the register operand of bf16 dots (fp4_moe_wx)
        check_wx_shapes(D, I, t)
        y = launch_wx_jax(split_groups(xq.astype(jnp.bfloat16)), *pairs)  # [slots, D] bf16
    elif t["SCALED"]:  # tl.dot_scaled on the stored codes and scales (fp4_moe_scaled)
        check_scaled_shapes(D, I, t)
        y = launch_scaled_jax(*act_codes(x), *pairs)
    else:
        if t["CODES"]:
            qa = quantize_act(x, 128)  # the same codes and scales as xq = qa.dequant()
            xin, xs = qa.q.astype(jnp.float16), qa.scale.astype(jnp.float32)
        else:
            xin, xs = xq.astype(jnp.bfloat16), jnp.zeros((1,), jnp.float32)
        y = launch_jax(xin, xs, *pairs)
    has = slot < y.shape[0]
    return jnp.where(has[:, None], y[jnp.minimum(slot, y.shape[0] - 1)].astype(jnp.float32), 0.0)


def fp4_moe_pairs(cfg, x, xq, tok, e, wt, w1s, w2s, w3s, grouped: bool | None = None) -> jax.Array:
    """Pairs ``(x[tok[r]], local expert e[r], routing weight wt[r])`` -> fp32 ``[R, D]`` (zeros where ``e`` is outside
    the local stack): the clamped SwiGLU expert with the reference's roundings. Triton where :func:`use_triton`
    says so; the Triton path needs the reference numerics (its dots take bf16 copies of the FP8-quantized input,
    which are exact only then), so ``numerics="float32"`` runs the reference (and ``kernels="triton"`` refuses it).
    """
    if use_triton(cfg):
        if not cfg.simulate:
            if cfg.kernels == "triton":
                raise ValueError("fp4_moe: kernels='triton' needs numerics='reference' (the kernels dot bf16 copies "
                                 "of the FP8-quantized activations); use kernels='auto' or 'reference'")
            return fp4_moe_pairs_reference(cfg, x, xq, tok, e, wt, w1s, w2s, w3s, grouped)
        return fp4_moe_pairs_triton(cfg, x, xq, tok, e, wt, w1s, w2s, w3s, tile_override())
    return fp4_moe_pairs_reference(cfg, x, xq, tok, e, wt, w1s, w2s, w3s, grouped)

