"""The tiled FP4 routed experts with the weight as the tensor cores' register operand (``tiles()["WX"] = 1`` in
:mod:`fp4_moe`): the prefill form of :mod:`fp8_prefill`'s design for the packed e2m1 experts.

Each program computes ``acc[BN, BM] = deq(W)[BN, K] @ x[BM, K].T`` for one block of ``BM`` slots of one expert
(:func:`experts.group_pairs`) and ``BN`` weight rows. Per 32-column scale group the packed bytes ``[BN, 16]`` are
decoded in registers (:func:`common.e2m1_pair`: 3 integer operations per weight, then the group's two powers of two)
into the bf16 A operands of two ``k = 16`` dots: the low nibbles (even columns) and the high nibbles (odd columns).
The activations are the B operands, bf16 *values* stored so that each 32-column group's even columns come first and
its odd columns after them (:func:`split_groups`): every B tile is then a plain ``[BM, 16]`` load of 32 contiguous
bytes per row, which Triton's pipeliner copies into shared memory ahead of use, untouched.

Why (sm_90a SASS compiled on the CPU, 2026-12-03): Triton's rewrite of ``tl.dot_scaled`` on Hopper
(:mod:`fp4_moe_scaled`, the sm90 default before) upcasts *both* operands in every program, the e4m3 activation tile
through registers and back to shared memory (``LDS``/``F2F``/``STS``) and the e2m1 tile through byte-permute tables:
~2,360 instructions per 128-column K step of the gate/up kernel (BN 128, BM 64, 4 warps), ~9 per weight element.
Here the activations are never touched in the K loop and the weight decode is ours: ~2,030 per step (the two powers
of two of a group cost an fp32 multiply each: one product of them would overflow for scales above 2). With 32-column
steps (``k = 16`` dots) Triton passed the decoded tile through shared memory instead of registers (703 instructions
per 32 columns); 128-column steps keep it in registers (``tests/test_kernels_sm90.py::test_moe_wx_plans_fit``).

Measured (H200, ``scripts/bench_moe.py --models flash --impls triton``, wall per MoE call, 2026-12-03): 64 tokens
1,982 vs 2,551 us with the scaled dot, 2K tokens 4,610 vs 6,291 us (134 vs 98 TFLOP/s), 8K tokens 14,247 vs 20,377
us (174 vs 121 TFLOP/s); a 128K-token prefill of 2 V4-Flash layers 131,568 tokens/s per layer (118,929 before, the
indexer's scores still from XLA). The
decode GEMV kernels stay faster up to 32 tokens (1,189 vs 1,390 us at 32, :func:`fp4_moe.use_gemv`).

``BFMUL`` (plan key, 1 in sm90's plan; ``DSV4_MOE_TILE=BFMUL=0`` turns it off): each nibble decoded straight to the
bf16 bit pattern of its value times 2**-126 (:func:`common.e2m1_bits16`, the same 3 integer operations) and the
group's two powers of two applied by bf16 pair multiplies (``HMUL2.BF16``: one instruction per two weights and
factor) instead of two fp32 multiplies per weight and the fp32 -> bf16 packs. Exact as well: products of powers of
two, +-0.5 passing through a bf16 subnormal, which PTX's ``mul.bf16x2`` keeps (no ``.ftz`` form exists for bf16).
sm_90a SASS compiled on the CPU (2026-12-04): the gate/up loop 2,019 -> 1,629 instructions per 128-column step at 8K
tokens (7.9 -> 6.4 per weight), the down loop 1,008 -> 816; with 128-pair blocks 1,030 -> 838 and 547 -> 451.
Measured (H200, ``bench_moe.py --tokens 8192,65536 --variants BFMUL=1``, 2026-12-05): 8K tokens 14.22 -> 13.26 ms,
64K tokens 90.95 -> 82.85 ms; its GPU cases of ``tests/test_kernels_fp4_moe.py`` passed. Other targets keep the fp32
decode (not measured; bf16 arithmetic on subnormal patterns is not known to be exact there). The interpreter checks
the bit patterns (``tests/test_kernels_common.py``) and the kernels' ``wxbf`` case.

Numerics: the same exact products as every other FP4 path (e2m1 value x e8m0 scale is exact in bf16, as are the
reference's FP8-quantized activation values), summed in fp32 inside the dots. Stage 1 writes ``h`` already quantized
as the reference's ``act_quant`` per 1x128 block (a program's 128 columns are one block: :func:`common.act_quant_block`
in the epilogue), as bf16 values in the split-group order stage 2 reads. Same roundings and order contract as
:mod:`fp4_moe`.

Portability: plain loads, integer/fp32 arithmetic and ``tl.dot`` on bf16 (A from registers is MFMA's native form on
AMD). Under the CPU interpreter the dots take fp32 copies of the same bf16-exact values (Triton 3.6's interpreter
multiplies bf16 dot operands as raw integers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from dsv4_jax.kernels import triton_call
from dsv4_jax.kernels.common import (
    act_quant_block,
    e2m1_factors,
    e2m1_factors16,
    e2m1_pair,
    e2m1_pair16,
    moe_block_pairs,
    moe_launch_dims,
    pow2,
    round_bf16,
    swiglu_h,
)
from dsv4_jax.modeling.quant import Fp4Tensor


def split_groups(v: jax.Array) -> jax.Array:
    """``v [R, K]`` -> the same values with each 128-column block's even columns first, then its odd ones (column
    ``128 g + 2 i + j`` goes to ``128 g + 64 j + i``): the B-operand layout of the kernels here."""
    R, K = v.shape
    return v.reshape(R, K // 128, 64, 2).swapaxes(-1, -2).reshape(R, K)


@triton.jit
def _per_byte(v):
    """A step's per-group values ``[BN, 4]`` -> per packed byte ``[BN, 64]`` (byte j's group: j // 16)."""
    BN: tl.constexpr = v.shape[0]
    return tl.reshape(tl.broadcast_to(v[:, :, None], (BN, 4, 16)), (BN, 64))


@triton.jit
def _wdec(wp, ws, n, k0, K: tl.constexpr, INTERPRET: tl.constexpr, BFMUL: tl.constexpr = 0):
    """Rows ``n [BN]`` (int64) of one expert's packed ``[N, K/2]`` weights, columns ``[k0, k0 + 128)`` -> the even
    and the odd columns' weights ``[BN, 64]`` each, bf16 (fp32 under the interpreter), exact. ``BFMUL``: decode each
    nibble straight to bf16 bits and scale pairs of them by bf16 multiplies (``HMUL2.BF16``) instead of two fp32
    multiplies per weight and a conversion (module docstring)."""
    p = tl.load(wp + n[:, None] * (K // 2) + (k0 // 2 + tl.arange(0, 64))[None, :]).to(tl.int32)  # [BN, 64] bytes
    sc = tl.load(ws + n[:, None] * (K // 32) + (k0 // 32 + tl.arange(0, 4))[None, :]).to(tl.int32)  # [BN, 4]
    if BFMUL:
        g1, g2 = e2m1_factors16(sc)  # [BN, 4] bf16 bit patterns each
        return e2m1_pair16(p, _per_byte(g1), _per_byte(g2), INTERPRET)  # [BN, 64] each
    f1, f2 = e2m1_factors(sc)  # [BN, 4] each
    f1, f2 = _per_byte(f1), _per_byte(f2)
    lo, hi = e2m1_pair(p)
    dt = tl.float32 if INTERPRET else tl.bfloat16
    return (lo * f2 * f1).to(dt), (hi * f2 * f1).to(dt)  # f2 first: never overflows (module docstring)


@triton.jit
def _xtile(x_rows, k0, live, INTERPRET: tl.constexpr):
    """The B operands of columns ``[k0, k0 + 128)``: rows ``x_rows [BM]`` (pointers) of a :func:`split_groups` array
    -> even and odd columns ``[64, BM]`` (transposed views of ``[BM, 64]`` loads)."""
    i = tl.arange(0, 64)
    xe = tl.load(x_rows[:, None] + (k0 + i)[None, :], mask=live[:, None], other=0.0)  # [BM, 64]
    xo = tl.load(x_rows[:, None] + (k0 + 64 + i)[None, :], mask=live[:, None], other=0.0)
    if INTERPRET:
        xe, xo = xe.to(tl.float32), xo.to(tl.float32)
    return tl.trans(xe), tl.trans(xo)


@triton.jit
def _dot(a, b, acc, INTERPRET: tl.constexpr):
    if INTERPRET:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _gate_up_wx(xv_ptr, tok_ptr, wt_ptr, rows_ptr, bexp_ptr, used_ptr, w1p_ptr, w1s_ptr, w3p_ptr, w3s_ptr, hv_ptr,
                R: tl.constexpr, D: tl.constexpr, I: tl.constexpr, LIMIT: tl.constexpr, BM: tl.constexpr,
                INTERPRET: tl.constexpr = False, BFMUL: tl.constexpr = 0):
    """hv[slot, 128 columns] = the values of act_quant(bf16(wt * silu(min(g, L)) * clip(u, -L, L))) for the BM slots
    of one block and the 128 columns ``128 * program_id(1) + [0, 128)`` of ``h`` (one quantization block), stored in
    the :func:`split_groups` order; ``xv [T, D]``: the tokens' FP8-quantized values, in that order too."""
    b = tl.program_id(0)
    if b >= tl.load(used_ptr):
        return
    ex = tl.load(bexp_ptr + b).to(tl.int64)
    slot, live, tok, wt = moe_block_pairs(rows_ptr, tok_ptr, wt_ptr, b, BM, R)  # [BM] each
    n = ex * I + tl.program_id(1) * 128 + tl.arange(0, 128).to(tl.int64)  # [128] rows of the [E*I, D] stacks
    x_rows = xv_ptr + tok * D  # [BM]
    acc_g = tl.zeros((128, BM), tl.float32)
    acc_u = tl.zeros((128, BM), tl.float32)
    for kk in range(0, D, 128):
        xe, xo = _xtile(x_rows, kk, live, INTERPRET)  # [64, BM] each
        g_lo, g_hi = _wdec(w1p_ptr, w1s_ptr, n, kk, D, INTERPRET, BFMUL)  # [128, 64] each
        acc_g = _dot(g_hi, xo, _dot(g_lo, xe, acc_g, INTERPRET), INTERPRET)
        u_lo, u_hi = _wdec(w3p_ptr, w3s_ptr, n, kk, D, INTERPRET, BFMUL)
        acc_u = _dot(u_hi, xo, _dot(u_lo, xe, acc_u, INTERPRET), INTERPRET)
    a = swiglu_h(acc_g, acc_u, wt, LIMIT)  # [128, BM] h (bf16 values)
    q, e = act_quant_block(tl.trans(a))  # [BM, 128] e4m3 codes, [BM] scale exponents
    c = tl.arange(0, 128)
    col = tl.program_id(1) * 128 + (c % 2) * 64 + c // 2  # [128] split-group positions
    hv = q * tl.where(e < 128, pow2(tl.minimum(e, 127)), float("inf"))[:, None]  # exact values (inf scale: NaN row)
    tl.store(hv_ptr + slot[:, None].to(tl.int64) * I + col[None, :], hv.to(hv_ptr.dtype.element_ty))


@triton.jit
def _down_wx(hv_ptr, bexp_ptr, used_ptr, w2p_ptr, w2s_ptr, y_ptr, D: tl.constexpr, I: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, INTERPRET: tl.constexpr = False, BFMUL: tl.constexpr = 0):
    """y[slot, n] = bf16(hq[slot] @ w2[n].T) for the BM slots of one block and BN output columns; ``hv``: stage 1's
    output (quantized values, split-group order)."""
    b = tl.program_id(0)
    if b >= tl.load(used_ptr):
        return
    ex = tl.load(bexp_ptr + b).to(tl.int64)
    slot = (b * BM + tl.arange(0, BM)).to(tl.int64)
    n = ex * D + tl.program_id(1) * BN + tl.arange(0, BN).to(tl.int64)  # [BN] rows of the [E*D, I] stack
    h_rows = hv_ptr + slot * I
    live = slot >= 0  # every slot of a used block was written by stage 1 (padding slots hold zeros)
    acc = tl.zeros((BN, BM), tl.float32)
    for kk in range(0, I, 128):
        he, ho = _xtile(h_rows, kk, live, INTERPRET)
        w_lo, w_hi = _wdec(w2p_ptr, w2s_ptr, n, kk, I, INTERPRET, BFMUL)
        acc = _dot(w_hi, ho, _dot(w_lo, he, acc, INTERPRET), INTERPRET)
    col = tl.program_id(1) * BN + tl.arange(0, BN)
    tl.store(y_ptr + slot[None, :] * D + col[:, None], round_bf16(acc).to(y_ptr.dtype.element_ty))


def check_wx_shapes(D: int, I: int, t: dict) -> None:
    """Refuse expert shapes the kernels do not tile (128-column K steps in both stages, h's 128-column blocks,
    BN2 | D)."""
    if D % 128 or I % 128 or D % t["BN2"]:
        raise ValueError(f"fp4_moe (WX): expert shape D={D}, I={I} is not tiled by {t} (need D and I multiples of "
                         f"128 and D of BN2={t['BN2']})")


def launch_wx_jax(xv, tok, wt, rows, bexp, used, w1: Fp4Tensor, w2: Fp4Tensor, w3: Fp4Tensor, limit: float,
                  t: dict) -> jax.Array:
    """Both stages through :func:`triton_call`: ``xv [T, D]`` bf16 the tokens' FP8-quantized values (the reference's
    ``act_quant`` per 1x128, exact in bf16) in :func:`split_groups` order, ``tok``/``wt`` per pair, the
    ``group_pairs`` layout -> ``y [slots, D]`` bf16 (rows of unused blocks undefined)."""
    I, D, R, n_blocks, n_slots, kw = moe_launch_dims(w1.packed.shape, tok, bexp, t)
    hv = triton_call(xv, tok, wt, rows, bexp, used, w1.packed, w1.scale, w3.packed, w3.scale, kernel=_gate_up_wx,
                     tiled=True, grid=(n_blocks, I // 128), out_shape=jax.ShapeDtypeStruct((n_slots, I), jnp.bfloat16),
                     R=R, D=D, I=I, LIMIT=limit, BM=t["BM"], BFMUL=t.get("BFMUL", 0), **kw)
    return triton_call(hv, bexp, used, w2.packed, w2.scale, kernel=_down_wx, tiled=True,
                       out_shape=jax.ShapeDtypeStruct((n_slots, D), jnp.bfloat16), grid=(n_blocks, D // t["BN2"]),
                       D=D, I=I, BM=t["BM"], BN=t["BN2"], BFMUL=t.get("BFMUL", 0), **kw)


def launch_wx_torch(xv, tok, wt, rows, bexp, used, w1, w2, w3, limit: float, t: dict):
    """The same kernels on torch tensors (the interpreter tests): ``xv`` a float tensor (the same values),
    ``w*`` ``(packed, scale)`` uint8 tensors. Returns ``(hv [slots, I], y [slots, D])`` fp32 (unwritten rows keep the
    poison ``nan``)."""
    import torch

    I, D, R, n_blocks, n_slots, kw = moe_launch_dims(w1[0].shape, tok, bexp, t)
    hv = torch.full((n_slots, I), float("nan"), dtype=torch.float32)
    y = torch.full((n_slots, D), float("nan"), dtype=torch.float32)
    bf = t.get("BFMUL", 0)
    _gate_up_wx[(n_blocks, I // 128)](xv, tok, wt, rows, bexp, used, *w1, *w3, hv, R=R, D=D, I=I, LIMIT=limit,
                                      BM=t["BM"], INTERPRET=True, BFMUL=bf, **kw)
    _down_wx[(n_blocks, D // t["BN2"])](hv, bexp, used, *w2, y, D=D, I=I, BM=t["BM"], BN=t["BN2"], INTERPRET=True,
                                        BFMUL=bf, **kw)
    return hv, y
