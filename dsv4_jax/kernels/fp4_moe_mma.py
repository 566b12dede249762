"""The FP4 routed experts at decode sizes on the tensor cores: a GEMV written as a dot (opt-in, ``GEMV=2``).

Why (issue 11): the decode GEMV kernels of :mod:`fp4_moe_gemv` are instruction-bound (Nsight Compute on an H200:
issue slots 77-82 % busy, DRAM 18 %), at ~4.8 sm_90a instructions per weight element, 3 of them decoding the e2m1
nibble and 1 the fp32 multiply-add. Here the multiply-adds go to the tensor cores and the decode takes two nibbles
per integer operation, so the loop spends ~3.3 instructions per element (sm_90a SASS, compiled without a GPU:
``tests/test_kernels_sm90.py``). Same pairs, grid and contract as :mod:`fp4_moe_gemv` (one (token, expert) pair per
block row, the pairs as they come, ids outside ``[0, E)`` are another device's).

The product, for one pair and ``BN`` weight rows, one K step of ``S = 8 NW8`` columns (``NW8`` int32 words per row,
``NG = NW8 / 4`` scale groups of 32):

* weights: ``[BN, NW8]`` int32 words; :func:`_pair16` turns each word into 4 words of two fp16 each (nibble ``m`` in
  the low half, nibble ``m + 4`` in the high half, ``m = 0..3``), each value the e2m1 value times 2**-14 (the 3
  magnitude bits under the fp16 exponent: 0.5 lands on an fp16 denormal, exact): 2 shifts and 2 masks per two
  values. Joined as ``[BN, 2 NW8]``, the halves are the A operand's register pairs as they are (no permutes).
* activation: the FP8 codes of the 1x128 quantization (``quant.fp8_act_quant``, the reference's ``act_quant``) in
  fp16 (exact), permuted by :func:`act_codes16` so that dot ``m``'s K order is ``(word i, half j)`` -> column
  ``8 i + m + 4 j``. The B operand is block-diagonal: ``B[r, g] = x[r]`` where ``r`` lies in scale group ``g``, else
  0, so one dot ``[BN, 2 NW8] @ [2 NW8, NG]`` gives every group's partial sum ``P[n, g]`` in its own column (the
  tensor cores do ``NG`` times the useful multiply-adds; they have the rate to spare at decode).
* scales: ``acc[n, g] += P[n, g] * 2**(s_w[n, g] - 127) * 2**(e_x[g] + 14)`` (exact powers of two); the row's
  result is ``sum_g acc[n, g]`` after the K loop. Every product (e2m1 x e4m3 x 2**-14) is exact in fp32; only the
  fp32 summation order differs from the reference, as in the other FP4 kernels.

Stage 1 writes ``h = bf16(wt * silu(min(g, L)) * clip(u, -L, L))`` (``g, u`` rounded to bf16), stage 2
``y = bf16(act_quant(h) @ w2.T)``: the roundings and order contract of :mod:`fp4_moe`. The activations are quantized
and permuted before each stage by one launch (:func:`act_codes16_triton`, bit for bit :func:`act_codes16`).

Status: opt-in (``fp4_moe_pairs_triton(..., tile={"GEMV": 2})``); tested under the interpreter (CI) and compiled for
sm_90a and gfx950 without a GPU; not yet run or timed on a GPU. Needs ``K`` (D and I) multiples of ``S = 512`` and
tensor-core dots of 16 columns (Triton's minimum). Portable Triton: integer ops, fp16 ``tl.dot``, no inline assembly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from dsv4_jax.kernels import triton_call
from dsv4_jax.kernels.common import act_quant_block, pow2, round_bf16
from dsv4_jax.modeling.quant import fp8_act_quant


# ---------------------------------------------------------------------------------------------- activations
def act_codes16(x: jax.Array, nw8: int) -> tuple[jax.Array, jax.Array]:
    """Rows ``x [R, K]`` -> ``(xc [R, K] fp16, xs [R, K/32] fp32)``: the reference ``act_quant`` (1x128) codes, and
    each 32-column group's factor ``2**(e + 14)`` (``e``: its 128-block's scale exponent; the 2**14 undoes the
    weights' 2**-14). Within each K step of ``8 nw8`` columns, column ``8 i + m + 4 j`` (word ``i``, nibble ``m <
    4``, half ``j``) is stored at ``2 nw8 m + 2 i + j``: the K order of the kernels' dot ``m``."""
    R, K = x.shape
    q, s = fp8_act_quant(x, 128)  # [R, K/128, 128] codes on the e4m3 grid, [R, K/128, 1] powers of two
    xc = q.reshape(R, K // (8 * nw8), nw8, 2, 4).transpose(0, 1, 4, 2, 3).reshape(R, K).astype(jnp.float16)
    xs = jnp.repeat(s[..., 0] * np.float32(2.0**14), 4, axis=-1)  # [R, K/32]
    return xc, xs


@triton.jit
def _act_codes16_kernel(x_ptr, xc_ptr, xs_ptr, K: tl.constexpr, NW8: tl.constexpr, NB: tl.constexpr):
    """:func:`act_codes16` of ``NB`` 128-wide blocks of one row: row ``program_id(0)`` of ``x [R, K]`` (bf16 or
    fp32), blocks ``[NB * program_id(1), + NB)`` -> their fp16 codes at their permuted places in ``xc [R, K]`` and
    the factors ``2**(e + 14)`` (4 per block) in ``xs [R, K/32]``; the reference's special values kept
    (:func:`common.act_quant_block`)."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1) * NB + tl.arange(0, NB)  # [NB] the row's 128-wide blocks
    c = blk[:, None] * 128 + tl.arange(0, 128)[None, :]  # [NB, 128] columns
    q, e = act_quant_block(tl.load(x_ptr + row * K + c).to(tl.float32))  # [NB, 128] e4m3 codes, [NB] exponents
    S: tl.constexpr = 8 * NW8  # a K step: column 8 i + 4 j + m of it goes to 2 NW8 m + 2 i + j
    cl = c % S
    tl.store(xc_ptr + row * K + c - cl + (cl % 4) * (2 * NW8) + (cl // 8) * 2 + (cl // 4) % 2, q.to(tl.float16))
    f = tl.broadcast_to((pow2(e) * 16384.0)[:, None], (NB, 4))  # [NB, 4] 2**e * 2**14 (inf, -0.0 as the reference)
    tl.store(xs_ptr + row * (K // 32) + blk[:, None] * 4 + tl.arange(0, 4)[None, :], f)


def act_codes16_triton(x: jax.Array, nw8: int, nb: int = 1) -> tuple[jax.Array, jax.Array]:
    """:func:`act_codes16` (the same arrays, bit for bit) in one launch: ``x [R, K]`` bf16 or fp32; ``nb`` 128-wide
    blocks per one-warp-per-block program (1 on GPUs: the most programs for the least latency)."""
    R, K = x.shape
    _check_act(K, nw8, nb)
    out = (jax.ShapeDtypeStruct((R, K), jnp.float16), jax.ShapeDtypeStruct((R, K // 32), jnp.float32))
    if R == 0:
        return jnp.zeros(out[0].shape, jnp.float16), jnp.zeros(out[1].shape, jnp.float32)
    return triton_call(x, kernel=_act_codes16_kernel, out_shape=out, grid=(R, K // (128 * nb)), K=K, NW8=nw8, NB=nb,
                       num_warps=nb, num_stages=1)


def _check_act(K: int, nw8: int, nb: int) -> None:
    if K % 128 or K % (8 * nw8) or (K // 128) % nb:
        raise ValueError(f"act_codes16: K={K} is not tiled by 128-wide blocks ({nb} per program) and K steps of "
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
def _operand(t, BN: tl.constexpr, NW8: tl.constexpr):
    """:func:`_pair16`'s words ``[BN, NW8]`` -> the fp16 A operand ``[BN, 2 NW8]`` (word ``i``: columns ``2i``, ``2i+1``
    are its low and high half)."""
    lo = t.to(tl.int16).to(tl.float16, bitcast=True)
    hi = (t >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return tl.reshape(tl.join(lo, hi), (BN, 2 * NW8))


@triton.jit
def _dot(a, b, acc, INTERPRET: tl.constexpr):
    if INTERPRET:  # the interpreter's fp16 dot is not an fp32-accumulating one: dot the same exact values in fp32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _partials(wp, n, K: tl.constexpr, c0, xb0, onehot, BN: tl.constexpr, NW8: tl.constexpr,
              INTERPRET: tl.constexpr):
    """One K step of one weight matrix: rows ``n [BN]`` (int64) of the packed ``[*, K/2]`` stack, columns ``[c0, c0 +
    8 NW8)`` against the activation codes at ``xb0`` (:func:`act_codes16` layout, this step) -> ``P [BN, NW8/4]``: each
    scale group's sum of products (times 2**-14, before the scales)."""
    w = tl.load(wp.to(tl.pointer_type(tl.int32)) + n[:, None] * (K // 8) + c0 // 8 + tl.arange(0, NW8)[None, :])
    r = tl.arange(0, 2 * NW8)
    p = tl.zeros((BN, NW8 // 4), tl.float32)
    for m in tl.static_range(4):
        b = tl.trans(tl.load(xb0 + 2 * NW8 * m + r)[None, :] * onehot)  # [2 NW8, NG] block-diagonal
        p = _dot(_operand(_pair16(w, m), BN, NW8), b, p, INTERPRET)
    return p


@triton.jit
def _factors(ws, n, K: tl.constexpr, c0, xs, NG: tl.constexpr):
    """The step's scale factors ``[BN, NG]``: 2**(s_w - 127) (e8m0 bytes 1..254) times the activation's."""
    g = tl.arange(0, NG)
    sw = tl.load(ws + n[:, None] * (K // 32) + c0 // 32 + g[None, :]).to(tl.int32)
    return (sw << 23).to(tl.float32, bitcast=True) * tl.load(xs + c0 // 32 + g)[None, :]


@triton.jit
def _onehot(NW8: tl.constexpr):
    """``[2 NW8, NW8/4]`` fp16: 1 where K row ``r`` (word ``r // 2``) belongs to scale group ``r // 8``."""
    r = tl.arange(0, 2 * NW8)
    return ((r // 8)[None, :] == tl.arange(0, NW8 // 4)[:, None]).to(tl.float16)


@triton.jit
def _gate_up_mma(xc_ptr, xs_ptr, tok_ptr, wt_ptr, e_ptr, w1p, w1s, w3p, w3s, h_ptr, D: tl.constexpr,
                 I: tl.constexpr, LIMIT: tl.constexpr, BN: tl.constexpr, NW8: tl.constexpr, E: tl.constexpr,
                 INTERPRET: tl.constexpr):
    """h[b, n] for pair ``b = program_id(0)`` and its BN columns n; ``xc/xs`` the tokens (:func:`act_codes16`)."""
    b = tl.program_id(0)
    ex = tl.load(e_ptr + b)
    if ex < 0 or ex >= E:  # another device's expert: no work (stage 2 writes its zeros)
        return
    n = ex.to(tl.int64) * I + tl.program_id(1) * BN + tl.arange(0, BN).to(tl.int64)  # [BN] rows of the [E*I, D]
    tok = tl.load(tok_ptr + b).to(tl.int64)
    xc, xs = xc_ptr + tok * D, xs_ptr + tok * (D // 32)
    onehot = _onehot(NW8)
    acc_g = tl.zeros((BN, NW8 // 4), tl.float32)
    acc_u = tl.zeros((BN, NW8 // 4), tl.float32)
    for c0 in range(0, D, 8 * NW8):
        acc_g += _partials(w1p, n, D, c0, xc + c0, onehot, BN, NW8, INTERPRET) * _factors(w1s, n, D, c0, xs, NW8 // 4)
        acc_u += _partials(w3p, n, D, c0, xc + c0, onehot, BN, NW8, INTERPRET) * _factors(w3s, n, D, c0, xs, NW8 // 4)
    g = round_bf16(tl.sum(acc_g, axis=1))  # [BN]
    u = round_bf16(tl.sum(acc_u, axis=1))
    if LIMIT > 0:
        u = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
        g = tl.minimum(g, LIMIT)
    a = round_bf16(tl.load(wt_ptr + b) * (g * tl.sigmoid(g) * u))
    col = tl.program_id(1) * BN + tl.arange(0, BN)
    tl.store(h_ptr + b.to(tl.int64) * I + col, a.to(h_ptr.dtype.element_ty))


@triton.jit
def _down_mma(hc_ptr, hs_ptr, e_ptr, w2p, w2s, y_ptr, D: tl.constexpr, I: tl.constexpr, BN: tl.constexpr,
              NW8: tl.constexpr, E: tl.constexpr, INTERPRET: tl.constexpr):
    """y[b, n] = bf16(act_quant(h[b]) @ w2[n].T) for pair b and BN output columns; ``hc/hs``: stage 1's h
    (:func:`act_codes16`). Another device's pair gets zeros."""
    b = tl.program_id(0)
    col = tl.program_id(1) * BN + tl.arange(0, BN)
    ex = tl.load(e_ptr + b)
    if ex < 0 or ex >= E:
        tl.store(y_ptr + b.to(tl.int64) * D + col, tl.zeros((BN,), tl.float32).to(y_ptr.dtype.element_ty))
        return
    n = ex.to(tl.int64) * D + col.to(tl.int64)  # [BN] rows of the [E*D, I] stack
    hc, hs = hc_ptr + b.to(tl.int64) * I, hs_ptr + b.to(tl.int64) * (I // 32)
    onehot = _onehot(NW8)
    acc = tl.zeros((BN, NW8 // 4), tl.float32)
    for c0 in range(0, I, 8 * NW8):
        acc += _partials(w2p, n, I, c0, hc + c0, onehot, BN, NW8, INTERPRET) * _factors(w2s, n, I, c0, hs, NW8 // 4)
    y = round_bf16(tl.sum(acc, axis=1))  # [BN]
    tl.store(y_ptr + b.to(tl.int64) * D + col, y.to(y_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------- plans, launchers
def mma_tiles(target: str, D: int, I: int) -> dict:
    """Tile sizes (one place): ``BN = 64`` weight rows (one warpgroup: the wgmma M), ``NW8 = 64`` words per row and
    K step (512 columns, 16 scale groups: the dot's N), 4 warps. The same on every target (untimed)."""
    return dict(BN=64, NW8=64, num_warps=4, num_stages=1)


def check_mma_shapes(D: int, I: int, t: dict) -> None:
    step = 8 * t["NW8"]
    if D % step or I % step or I % t["BN"] or D % t["BN"] or t["NW8"] < 64:
        raise ValueError(f"fp4_moe (tensor-core GEMV): expert shape D={D}, I={I} is not tiled by {t} (need D and I "
                         f"multiples of 8*NW8={step} and of BN={t['BN']}, and NW8 >= 64: the dot's N of NW8/4 >= 16)")


def _kw(t: dict, E: int, interpret: bool) -> dict:
    return dict(BN=t["BN"], NW8=t["NW8"], E=E, INTERPRET=interpret, num_warps=t["num_warps"],
                num_stages=t["num_stages"])


def launch_mma_jax(x, tok, wt, e, w1, w2, w3, limit: float, t: dict) -> jax.Array:
    """Both kernels: ``x [T, D]`` the raw tokens, ``tok/wt/e [R]`` the pairs -> ``y [R, D]`` bf16 (zeros for other
    devices' pairs). The activations are quantized and permuted before each stage by one launch
    (:func:`act_codes16_triton`)."""
    E, I, D2 = w1.packed.shape
    D, R = 2 * D2, tok.shape[0]
    check_mma_shapes(D, I, t)
    xc, xs = act_codes16_triton(x, t["NW8"])
    h = triton_call(xc, xs, tok, wt, e, w1.packed, w1.scale, w3.packed, w3.scale, kernel=_gate_up_mma,
                    out_shape=jax.ShapeDtypeStruct((R, I), jnp.bfloat16), grid=(R, I // t["BN"]), D=D, I=I,
                    LIMIT=limit, **_kw(t, E, False))
    hc, hs = act_codes16_triton(h, t["NW8"])  # rows of other devices' pairs are unwritten here and never read
    return triton_call(hc, hs, e, w2.packed, w2.scale, kernel=_down_mma,
                       out_shape=jax.ShapeDtypeStruct((R, D), jnp.bfloat16), grid=(R, D // t["BN"]), D=D, I=I,
                       **_kw(t, E, False))


def codes_torch(v, nw8: int, nb: int = 1):
    """:func:`_act_codes16_kernel` on a torch tensor ``v [R, K]`` -> ``(xc, xs)`` on ``v``'s device."""
    import torch

    R, K = v.shape
    _check_act(K, nw8, nb)
    xc = torch.full((R, K), float("nan"), dtype=torch.float16, device=v.device)
    xs = torch.full((R, K // 32), float("nan"), dtype=torch.float32, device=v.device)
    _act_codes16_kernel[(R, K // (128 * nb))](v, xc, xs, K=K, NW8=nw8, NB=nb, num_warps=nb, num_stages=1)
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
    xc, xs = codes_torch(x, t["NW8"])
    _gate_up_mma[(R, I // t["BN"])](xc, xs, tok, wt, e, *w1, *w3, h, D=D, I=I, LIMIT=limit, **_kw(t, E, interpret))
    hc, hs = codes_torch(torch.nan_to_num(h), t["NW8"])
    _down_mma[(R, D // t["BN"])](hc, hs, e, *w2, y, D=D, I=I, **_kw(t, E, interpret))
    return h, y
