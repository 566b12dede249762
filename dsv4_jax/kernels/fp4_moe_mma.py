"""The FP4 routed experts at decode sizes on the tensor cores: a GEMV written as a dot (opt-in: ``GEMV=2`` with fp16
dots, ``GEMV=3`` with e4m3 dots).

Why (issue 11): the decode GEMV kernels of :mod:`fp4_moe_gemv` are instruction-bound (Nsight Compute on an H200:
issue slots 77-82 % busy, DRAM 18 %), at ~4.8 sm_90a instructions per weight element, 3 of them decoding the e2m1
nibble and 1 the fp32 multiply-add. Here the multiply-adds go to the tensor cores and the decode handles two (fp16)
or four (e4m3) nibbles per integer operation: the K loop spends 2.8-3.2 (fp16) or 1.7-1.9 (e4m3) instructions per
weight element (sm_90a SASS compiled without a GPU, ``tests/test_kernels_sm90.py``). Same pairs, grid and contract
as :mod:`fp4_moe_gemv` (one (token, expert) pair per block row, the pairs as they come, ids outside ``[0, E)`` are
another device's).

The product, for one pair and ``BN`` weight rows, one K step of ``8 NW8`` columns (``NW8`` int32 words per row,
``NW8 / 4`` scale groups of 32):

* weights, fp16 dots: :func:`_pair16` turns each word into 4 words of two fp16 each (nibble ``m`` in the low half,
  ``m + 4`` in the high half), the e2m1 value times 2**-14 (the magnitude bits under the fp16 exponent; 0.5 is an
  fp16 denormal: exact), 2 shifts and 2 masks per two values; 4 dots per step of ``K = 2 NW8``. e4m3 dots:
  :func:`_quad8` makes 2 words of four e4m3 bytes (the low nibbles, the high nibbles), the value times 2**-6 (0.5 an
  e4m3 denormal), 3-4 operations per four values; 2 dots of ``K = 4 NW8``. Either way a 32-bit word of the decode
  is one register of the dot's A operand as it is (no permutes).
* activation: the FP8 codes of the 1x128 quantization (``quant.fp8_act_quant``, the reference's ``act_quant``) as
  fp16 or e4m3 (exact), permuted by :func:`act_codes` into the dots' K order. The B operand is block-diagonal:
  ``B[r, g] = x[r]`` where K row ``r`` lies in scale group ``g``, else 0, so one dot ``[BN, K] @ [K, NCOL]`` gives
  every group's partial sum ``P[n, g]`` in its own column (``NCOL = max(16, NW8 / 4)``: Triton's smallest N; the
  tensor cores do ``NCOL`` times the useful multiply-adds, which they have the rate for at decode).
* scales: ``acc[n, g] += P[n, g] * 2**(s_w[n, g] - 127) * 2**(e_x[g] + 14 or + 6)`` (exact powers of two); the row's
  result is ``sum_g acc[n, g]`` after the K loop.

Numerics. fp16 dots: every product (e2m1 x e4m3 x 2**-14) is exact and summed in fp32: only the fp32 summation order
differs from the reference, as in the other FP4 kernels. e4m3 dots: Hopper sums e4m3 products in a narrower
accumulator (~14 bits, not IEEE fp32); a column's 32 products of a scale group meet in 2 of a step's k32
instructions (16 each), the other instructions add zeros to it, and the group's sum is promoted to fp32 by the scale
multiply-add: as the reference's FP4 GEMM (spec 3.4: the 32-product group sums promoted with ``sx * sW``), but with
the hardware's rounding inside a group. ``ACC`` > 0 makes Triton promote every ``ACC`` products instead (32: one
more fp32 add per instruction, 0.5-0.7 instructions per element). Whether the golden criteria hold with e4m3 dots is
for the GPU to show (``DSV4_MOE_TILE=GEMV=3``, :func:`fp4_moe.tile_override`); the interpreter sums exactly.

Stage 1 writes ``h = bf16(wt * silu(min(g, L)) * clip(u, -L, L))`` (``g, u`` rounded to bf16; the gate and up
weights share each step's activation operand), stage 2 ``y = bf16(act_quant(h) @ w2.T)``: the roundings and order
contract of :mod:`fp4_moe`. The activations are quantized and permuted before each stage by one launch
(:func:`act_codes_triton`, bit for bit :func:`act_codes`).

Status: opt-in (``fp4_moe_pairs_triton(..., tile={"GEMV": 2 or 3})``), and staying so. Measured on an H200
(2026-12-02, ``docs/performance.md``, the 4 launches of a V4-Flash MoE call as a CUDA graph): ``GEMV=2`` 64-69 us at
batch 1 and 1,064-1,169 us at batch 32, 12-20 % slower than the FMA GEMV (57 / 955 us), with the same golden logits;
``GEMV=3`` (2-3 pipeline stages) 52 us / 761-784 us, 8-20 % faster, but the tensor cores' narrow e4m3 sums flip a
bf16 ulp in 4-5 % of the outputs (normwise 1.5e-4 to 6.6e-4) and the golden all-position test fails (mean abs
dlogit 0.186 against the bound 0.15; the default 0.020), with ``ACC=32`` as well (0.159). Both pass their GPU kernel
tests at V4-Flash, V4-Pro and the golden shapes. Needs D and I multiples of 128 and of the K step (512 columns, or
the whole K below that: the golden model's 256 works). Portable Triton: integer ops, fp16 / e4m3 ``tl.dot`` (e4m3
dots need sm_89+ or gfx950), no inline assembly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from dsv4_jax.kernels import triton_call
from dsv4_jax.kernels.common import act_quant_block, e4m3_bits, pow2, round_bf16, swiglu_act
from dsv4_jax.modeling.quant import fp8_act_quant


# ---------------------------------------------------------------------------------------------- activations
def act_codes(x: jax.Array, nw8: int, f8: bool = False) -> tuple[jax.Array, jax.Array]:
    """Rows ``x [R, K]`` -> ``(xc [R, K], xs [R, K/32] fp32)``: the reference ``act_quant`` (1x128) codes in fp16 (or,
    with ``f8``, as e4m3), and each 32-column group's factor ``2**(e + 14)`` (``f8``: ``2**(e + 6)``; ``e``: its
    128-block's scale exponent; the power undoes the weights' decode factor). Within each K step of ``8 nw8`` columns
    the codes are stored in the kernels' K order: fp16, column ``8 i + m + 4 j`` (word ``i``, nibble ``m < 4``, half
    ``j``) at ``2 nw8 m + 2 i + j``; e4m3, column ``8 i + 2 b + d`` (byte ``b``, nibble ``d``) at ``4 nw8 d + 4 i +
    b``."""
    R, K = x.shape
    q, s = fp8_act_quant(x, 128)  # [R, K/128, 128] codes on the e4m3 grid, [R, K/128, 1] powers of two
    if f8:
        xc = q.reshape(R, K // (8 * nw8), nw8, 4, 2).transpose(0, 1, 4, 2, 3).reshape(R, K).astype(jnp.float8_e4m3fn)
    else:
        xc = q.reshape(R, K // (8 * nw8), nw8, 2, 4).transpose(0, 1, 4, 2, 3).reshape(R, K).astype(jnp.float16)
    xs = jnp.repeat(s[..., 0] * np.float32(2.0**6 if f8 else 2.0**14), 4, axis=-1)  # [R, K/32]
    return xc, xs


@triton.jit
def _act_codes_kernel(x_ptr, xc_ptr, xs_ptr, K: tl.constexpr, NW8: tl.constexpr, NB: tl.constexpr, F8: tl.constexpr):
    """:func:`act_codes` of ``NB`` 128-wide blocks of one row: row ``program_id(0)`` of ``x [R, K]`` (bf16 or fp32),
    blocks ``[NB * program_id(1), + NB)`` -> their codes at their permuted places in ``xc [R, K]`` and the factors (4
    per block) in ``xs [R, K/32]``; the reference's special values kept (:func:`common.act_quant_block`)."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1) * NB + tl.arange(0, NB)  # [NB] the row's 128-wide blocks
    c = blk[:, None] * 128 + tl.arange(0, 128)[None, :]  # [NB, 128] columns
    q, e = act_quant_block(tl.load(x_ptr + row * K + c).to(tl.float32))  # [NB, 128] e4m3 codes, [NB] exponents
    cl = c % (8 * NW8)  # the column within its K step
    if F8:  # column 8 i + 2 b + d of a step goes to 4 NW8 d + 4 i + b
        xb = xc_ptr.to(tl.pointer_type(tl.uint8))  # the codes' bits, computed (NaN kept: 0x7F)
        dst = c - cl + (cl % 2) * (4 * NW8) + (cl // 8) * 4 + (cl % 8) // 2
        tl.store(xb + row * K + dst, e4m3_bits(q).to(tl.uint8))
        f = pow2(e) * 64.0  # 2**e * 2**6 (inf, -0.0 as the reference)
    else:  # column 8 i + 4 j + m goes to 2 NW8 m + 2 i + j
        tl.store(xc_ptr + row * K + c - cl + (cl % 4) * (2 * NW8) + (cl // 8) * 2 + (cl // 4) % 2, q.to(tl.float16))
        f = pow2(e) * 16384.0  # 2**e * 2**14
    tl.store(xs_ptr + row * (K // 32) + blk[:, None] * 4 + tl.arange(0, 4)[None, :],
             tl.broadcast_to(f[:, None], (NB, 4)))


def act_codes_triton(x: jax.Array, nw8: int, f8: bool = False, nb: int = 1) -> tuple[jax.Array, jax.Array]:
    """:func:`act_codes` (the same arrays, bit for bit) in one launch: ``x [R, K]`` bf16 or fp32; ``nb`` 128-wide
    blocks per one-warp-per-block program (1 on GPUs: the most programs for the least latency)."""
    R, K = x.shape
    _check_act(K, nw8, nb)
    out = (jax.ShapeDtypeStruct((R, K), jnp.float8_e4m3fn if f8 else jnp.float16),
           jax.ShapeDtypeStruct((R, K // 32), jnp.float32))
    if R == 0:
        return jnp.zeros(out[0].shape, out[0].dtype), jnp.zeros(out[1].shape, jnp.float32)
    return triton_call(x, kernel=_act_codes_kernel, out_shape=out, grid=(R, K // (128 * nb)), K=K, NW8=nw8, NB=nb,
                       F8=int(f8), num_warps=nb, num_stages=1)


def _check_act(K: int, nw8: int, nb: int) -> None:
    if K % 128 or K % (8 * nw8) or (K // 128) % nb:
        raise ValueError(f"act_codes: K={K} is not tiled by 128-wide blocks ({nb} per program) and K steps of "
                         f"8*NW8={8 * nw8} columns")


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _pair16(w, m: tl.constexpr):
    """int32 words (8 nibbles, column ``8 i + k`` in bits ``4k..4k+3``) -> int32 words holding two fp16: nibble ``m``
    (low half) and ``m + 4`` (high half), each the e2m1 value times 2**-14. The sign moves to bit 15 (31), the
    magnitude bits to 9..11 (25..27): fp16's two lowest exponent bits and first mantissa bit."""
    if m == 3:
        s = w
        mag = w >> 3
    else:
        s = w << (12 - 4 * m)
        mag = w << (9 - 4 * m)
    return (s & -2147450880) | (mag & 0x0E000E00)  # 0x80008000: the signs; 0x0E000E00: the magnitudes


@triton.jit
def _quad8(w, d: tl.constexpr):
    """int32 words -> int32 words of four e4m3 bytes: byte ``b`` is nibble ``2b + d`` (``d`` 0: the low nibbles, 1:
    the high ones) as its e2m1 value times 2**-6 (the magnitude under e4m3's two lowest exponent bits and first
    mantissa bit; 0.5 lands on an e4m3 denormal): 3-4 integer operations per four values."""
    if d == 0:
        z = ((w << 2) & 0x1C1C1C1C) | ((w << 4) & -2139062144)  # 0x80808080: the signs
    else:
        z = ((w >> 2) & 0x1C1C1C1C) | (w & -2139062144)
    return z


@triton.jit
def _operand(w, m: tl.constexpr, BN: tl.constexpr, NW8: tl.constexpr, F8: tl.constexpr):
    """Dot ``m``'s A operand from the words ``w [BN, NW8]``: fp16 ``[BN, 2 NW8]`` (column ``2i + j``: nibble
    ``m + 4j`` of word ``i``) or, with ``F8``, e4m3 ``[BN, 4 NW8]`` (column ``4i + b``: nibble ``2b + m``). The halves
    or bytes of a 32-bit word are the operand's register as it is."""
    if F8:
        z = _quad8(w, m)
        b0, b1, b2, b3 = z.to(tl.int8), (z >> 8).to(tl.int8), (z >> 16).to(tl.int8), (z >> 24).to(tl.int8)
        q = tl.join(tl.join(b0, b2), tl.join(b1, b3))  # [BN, NW8, 2, 2]: flat index 2 * j + s holds byte 2 * j + s
        a = tl.reshape(q, (BN, 4 * NW8)).to(tl.float8e4nv, bitcast=True)
    else:
        t = _pair16(w, m)
        lo = t.to(tl.int16).to(tl.float16, bitcast=True)
        hi = (t >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        a = tl.reshape(tl.join(lo, hi), (BN, 2 * NW8))
    return a


@triton.jit
def _dot(a, b, acc, F8: tl.constexpr, ACC: tl.constexpr, INTERPRET: tl.constexpr):
    if INTERPRET:  # the interpreter's fp16/e4m3 dots are not fp32-accumulating ones: the same exact values in fp32
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif F8 and ACC > 0:  # e4m3 x e4m3: promote the tensor cores' narrower sum to fp32 every ACC products
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=ACC)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _words(wp, n, K: tl.constexpr, c0, NW8: tl.constexpr):
    """One K step's int32 words ``[BN, NW8]`` of rows ``n [BN]`` (int64) of a packed ``[*, K/2]`` stack."""
    return tl.load(wp.to(tl.pointer_type(tl.int32)) + n[:, None] * (K // 8) + c0 // 8 + tl.arange(0, NW8)[None, :])


@triton.jit
def _partials(wa, wb, xb0, BN: tl.constexpr, NW8: tl.constexpr, NCOL: tl.constexpr, TWO: tl.constexpr,
              F8: tl.constexpr, ACC: tl.constexpr, INTERPRET: tl.constexpr):
    """One K step of one weight matrix (words ``wa``) or two (``TWO``: ``wb`` too, on the same activation operand)
    against the activation codes at ``xb0`` (:func:`act_codes` layout, this step) -> ``P [BN, NCOL]`` per matrix: the
    sum of products of each of the step's ``NW8 / 4`` scale groups in its own column (times 2**-14 or 2**-6, before
    the scales; columns past the groups are 0)."""
    KD: tl.constexpr = (4 if F8 else 2) * NW8  # K of one dot: 2 dots (F8) or 4 per step
    r = tl.arange(0, KD)
    mine = (r // (KD // (NW8 // 4)))[None, :] == tl.arange(0, NCOL)[:, None]  # [NCOL, KD]: row r's scale group
    pa = tl.zeros((BN, NCOL), tl.float32)
    pb = tl.zeros((BN, NCOL), tl.float32)
    for m in tl.static_range(2 if F8 else 4):
        if F8:  # the codes' bytes, placed without a conversion
            x = tl.load(xb0.to(tl.pointer_type(tl.uint8)) + KD * m + r)[None, :]  # [1, KD]
            b = tl.trans(tl.where(mine, x, 0).to(tl.uint8).to(tl.float8e4nv, bitcast=True))  # [KD, NCOL]
        else:
            b = tl.trans(tl.load(xb0 + KD * m + r)[None, :] * mine.to(tl.float16))  # [KD, NCOL] block-diagonal
        pa = _dot(_operand(wa, m, BN, NW8, F8), b, pa, F8, ACC, INTERPRET)
        if TWO:
            pb = _dot(_operand(wb, m, BN, NW8, F8), b, pb, F8, ACC, INTERPRET)
    return pa, pb


@triton.jit
def _factors(ws, n, K: tl.constexpr, c0, xs, NG: tl.constexpr, NCOL: tl.constexpr):
    """The step's scale factors ``[BN, NCOL]``: 2**(s_w - 127) (e8m0 bytes 1..254) times the activation's; 0 past
    the ``NG`` groups."""
    g = tl.arange(0, NCOL)
    sw = tl.load(ws + n[:, None] * (K // 32) + c0 // 32 + g[None, :], mask=(g < NG)[None, :], other=0).to(tl.int32)
    return (sw << 23).to(tl.float32, bitcast=True) * tl.load(xs + c0 // 32 + g, mask=g < NG, other=0.0)[None, :]


@triton.jit
def _row_sums(wpa, wsa, wpb, wsb, n, K: tl.constexpr, xc, xs, BN: tl.constexpr, NW8: tl.constexpr,
              TWO: tl.constexpr, F8: tl.constexpr, ACC: tl.constexpr, INTERPRET: tl.constexpr):
    """``[BN]`` fp32 per matrix: rows ``n`` of one weight matrix (``wpa/wsa``) or two (``TWO``) times the activation
    row ``xc/xs`` over all of K (the second result is 0 without ``TWO``)."""
    NCOL: tl.constexpr = max(16, NW8 // 4)  # the dot's N: the step's scale groups, at least Triton's 16
    acc_a = tl.zeros((BN, NCOL), tl.float32)
    acc_b = tl.zeros((BN, NCOL), tl.float32)
    for c0 in range(0, K, 8 * NW8):
        wa = _words(wpa, n, K, c0, NW8)
        if TWO:
            wb = _words(wpb, n, K, c0, NW8)
        else:  # unused: _partials reads the second words only with TWO
            wb = wa
        pa, pb = _partials(wa, wb, xc + c0, BN, NW8, NCOL, TWO, F8, ACC, INTERPRET)
        acc_a += pa * _factors(wsa, n, K, c0, xs, NW8 // 4, NCOL)
        if TWO:
            acc_b += pb * _factors(wsb, n, K, c0, xs, NW8 // 4, NCOL)
    return tl.sum(acc_a, axis=1), tl.sum(acc_b, axis=1)


@triton.jit
def _gate_up_mma(xc_ptr, xs_ptr, tok_ptr, wt_ptr, e_ptr, w1p, w1s, w3p, w3s, h_ptr, D: tl.constexpr,
                 I: tl.constexpr, LIMIT: tl.constexpr, BN: tl.constexpr, NW8: tl.constexpr, E: tl.constexpr,
                 F8: tl.constexpr, ACC: tl.constexpr, INTERPRET: tl.constexpr):
    """h[b, n] for pair ``b = program_id(0)`` and its BN columns n; ``xc/xs`` the tokens (:func:`act_codes`)."""
    b = tl.program_id(0)
    ex = tl.load(e_ptr + b)
    if ex < 0 or ex >= E:  # another device's expert: no work (stage 2 writes its zeros)
        return
    n = ex.to(tl.int64) * I + tl.program_id(1) * BN + tl.arange(0, BN).to(tl.int64)  # [BN] rows of the [E*I, D]
    tok = tl.load(tok_ptr + b).to(tl.int64)
    xc, xs = xc_ptr + tok * D, xs_ptr + tok * (D // 32)
    g, u = _row_sums(w1p, w1s, w3p, w3s, n, D, xc, xs, BN, NW8, True, F8, ACC, INTERPRET)  # [BN] each
    a = swiglu_act(g, u, tl.load(wt_ptr + b), LIMIT)
    col = tl.program_id(1) * BN + tl.arange(0, BN)
    tl.store(h_ptr + b.to(tl.int64) * I + col, a.to(h_ptr.dtype.element_ty))


@triton.jit
def _down_mma(hc_ptr, hs_ptr, e_ptr, w2p, w2s, y_ptr, D: tl.constexpr, I: tl.constexpr, BN: tl.constexpr,
              NW8: tl.constexpr, E: tl.constexpr, F8: tl.constexpr, ACC: tl.constexpr, INTERPRET: tl.constexpr):
    """y[b, n] = bf16(act_quant(h[b]) @ w2[n].T) for pair b and BN output columns; ``hc/hs``: stage 1's h
    (:func:`act_codes`). Another device's pair gets zeros."""
    b = tl.program_id(0)
    col = tl.program_id(1) * BN + tl.arange(0, BN)
    ex = tl.load(e_ptr + b)
    if ex < 0 or ex >= E:
        tl.store(y_ptr + b.to(tl.int64) * D + col, tl.zeros((BN,), tl.float32).to(y_ptr.dtype.element_ty))
        return
    n = ex.to(tl.int64) * D + col.to(tl.int64)  # [BN] rows of the [E*D, I] stack
    hc, hs = hc_ptr + b.to(tl.int64) * I, hs_ptr + b.to(tl.int64) * (I // 32)
    y, _ = _row_sums(w2p, w2s, w2p, w2s, n, I, hc, hs, BN, NW8, False, F8, ACC, INTERPRET)
    y = round_bf16(y)  # [BN]
    tl.store(y_ptr + b.to(tl.int64) * D + col, y.to(y_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------- plans, launchers
def mma_tiles(target: str, D: int, I: int, f8: bool = False) -> dict:
    """Tile sizes (one place): ``BN = 64`` weight rows (one warpgroup: the wgmma M), ``NW1``/``NW2`` int32 words per
    row and K step of stage 1 (K = D) and stage 2 (K = I): 64 (512 columns, 16 scale groups: the dot's N) where K
    allows, else K / 8 (one step; the dot then has 16 columns, the groups' and zeros); 4 warps; ``F8`` the e4m3 dots
    (``GEMV=3``) and ``ACC`` their promotion interval (32 products: the reference's). The same on every target
    (untimed)."""
    nw = lambda K: 64 if K % 512 == 0 else K // 8  # noqa: E731
    return dict(BN=64, NW1=nw(D), NW2=nw(I), F8=int(f8), ACC=0, num_warps=4, num_stages=1)


def check_mma_shapes(D: int, I: int, t: dict) -> None:
    for name, K, nw in (("D", D, t["NW1"]), ("I", I, t["NW2"])):
        if K % (8 * nw) or K % 128 or nw < 8 or nw & (nw - 1):
            raise ValueError(f"fp4_moe (tensor-core GEMV): {name}={K} is not tiled by K steps of 8*NW={8 * nw} "
                             f"columns (plan {t}: need {name} a multiple of 128 and of 8*NW, NW a power of two >= 8)")
    if D % t["BN"] or I % t["BN"]:
        raise ValueError(f"fp4_moe (tensor-core GEMV): expert shape D={D}, I={I} is not tiled by BN={t['BN']} rows")


def _kw(t: dict, E: int, nw: int, interpret: bool) -> dict:
    return dict(BN=t["BN"], NW8=nw, E=E, F8=t["F8"], ACC=t["ACC"], INTERPRET=interpret, num_warps=t["num_warps"],
                num_stages=t["num_stages"])


def launch_mma_jax(x, tok, wt, e, w1, w2, w3, limit: float, t: dict) -> jax.Array:
    """Both kernels: ``x [T, D]`` the raw tokens, ``tok/wt/e [R]`` the pairs -> ``y [R, D]`` bf16 (zeros for other
    devices' pairs). The activations are quantized and permuted before each stage by one launch
    (:func:`act_codes_triton`)."""
    E, I, D2 = w1.packed.shape
    D, R = 2 * D2, tok.shape[0]
    check_mma_shapes(D, I, t)
    xc, xs = act_codes_triton(x, t["NW1"], bool(t["F8"]))
    h = triton_call(xc, xs, tok, wt, e, w1.packed, w1.scale, w3.packed, w3.scale, kernel=_gate_up_mma,
                    out_shape=jax.ShapeDtypeStruct((R, I), jnp.bfloat16), grid=(R, I // t["BN"]), D=D, I=I,
                    LIMIT=limit, **_kw(t, E, t["NW1"], False))
    hc, hs = act_codes_triton(h, t["NW2"], bool(t["F8"]))  # rows of other devices' pairs: unwritten, never read
    return triton_call(hc, hs, e, w2.packed, w2.scale, kernel=_down_mma,
                       out_shape=jax.ShapeDtypeStruct((R, D), jnp.bfloat16), grid=(R, D // t["BN"]), D=D, I=I,
                       **_kw(t, E, t["NW2"], False))


def codes_torch(v, nw8: int, f8: bool = False, nb: int = 1):
    """:func:`_act_codes_kernel` on a torch tensor ``v [R, K]`` -> ``(xc, xs)`` on ``v``'s device (``xc`` fp16, or
    e4m3 bytes as uint8 with ``f8``)."""
    import torch

    R, K = v.shape
    _check_act(K, nw8, nb)
    if f8:
        xc = torch.full((R, K), 0xFF, dtype=torch.uint8, device=v.device).view(torch.float8_e4m3fn)
    else:
        xc = torch.full((R, K), float("nan"), dtype=torch.float16, device=v.device)
    xs = torch.full((R, K // 32), float("nan"), dtype=torch.float32, device=v.device)
    _act_codes_kernel[(R, K // (128 * nb))](v, xc, xs, K=K, NW8=nw8, NB=nb, F8=int(f8), num_warps=nb, num_stages=1)
    return xc, xs


def launch_mma_torch(x, tok, wt, e, w1, w2, w3, limit: float, t: dict, interpret: bool = True):
    """The same kernels on torch tensors (the interpreter tests, ``probe_kernels.py``): ``x [T, D]`` (any float
    dtype), ``w*`` ``(packed, scale)`` uint8 tensors; the activations through :func:`codes_torch` (the jax path's
    kernel). Returns ``(h [R, I], y [R, D])`` fp32; other devices' pairs keep ``nan`` in ``h``, zeros in ``y``."""
    import torch

    E, I, D2 = w1[0].shape
    D, R = 2 * D2, tok.shape[0]
    check_mma_shapes(D, I, t)
    h = torch.full((R, I), float("nan"), dtype=torch.float32, device=x.device)
    y = torch.full((R, D), float("nan"), dtype=torch.float32, device=x.device)
    xc, xs = codes_torch(x, t["NW1"], bool(t["F8"]))
    _gate_up_mma[(R, I // t["BN"])](xc, xs, tok, wt, e, *w1, *w3, h, D=D, I=I, LIMIT=limit,
                                    **_kw(t, E, t["NW1"], interpret))
    hc, hs = codes_torch(torch.nan_to_num(h), t["NW2"], bool(t["F8"]))
    _down_mma[(R, D // t["BN"])](hc, hs, e, *w2, y, D=D, I=I, **_kw(t, E, t["NW2"], interpret))
    return h, y
