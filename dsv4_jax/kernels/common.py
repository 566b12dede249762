"""Device helpers shared by the Triton kernels: exact format decoding and the reference's roundings, written with
integer and fp32 arithmetic only (no inline assembly, no hardware FP8/FP4 conversions), so the same code runs on
NVIDIA, on AMD and under Triton's CPU interpreter, and gives the same bits everywhere.

* :func:`round_bf16`: fp32 -> nearest-even bf16 value, kept in fp32. :func:`rn_bf16`: the same by the hardware's
  conversion (fewer instructions where it is the bottleneck; nearest-even on NVIDIA and AMD; under the interpreter
  the tests' ``tests/triton_shim.py`` makes the cast round, as it truncates there).
* :func:`rope_rows`: the reference's RoPE of rows of values (the indexer query and the attention prep kernels).
* :func:`pow2`, :func:`e8m0`: powers of two from integer exponents / e8m0 scale bytes.
* :func:`e2m1_pair`, :func:`e2m1_nibble`, :func:`e2m1_factors`: both nibbles of a packed e2m1 byte (or any nibble
  of a packed int32 word) as fp32 values times 2**-126 (the 3 magnitude bits placed under the exponent, 3 integer
  operations each), and the two powers of two that scale them to the weights (the e8m0 scale and the 2**126).
* :func:`act_exp`, :func:`e4m3_grid`: the reference's FP8 activation quantization (``act_quant``, spec 3.1): the
  block's power-of-two scale exponent (rounded up from ``amax / 448``), and values rounded to the e4m3 grid
  (nearest even) after scaling by it.
* :func:`fp4_exp`, :func:`e2m1_codes`, :func:`fp4_quant_block`: the reference's FP4 activation quantization
  (``fp4_act_quant``, spec 3.3) as e2m1 codes (4-bit integers, sign in bit 3) and power-of-two scale exponents.
* :func:`l2_prefetch`: the one piece of inline assembly here, a CUDA cache hint (``prefetch.global.L2``) that the
  decode GEMVs issue ahead of their loads behind an opt-in plan key (``PF``), never on AMD or the interpreter; it
  changes no value.
* :func:`moe_block_pairs`, :func:`swiglu_h`: the tiled FP4 MoE kernels' block prologue (a block's slots, tokens and
  routing weights) and their stage-1 epilogue (the clamped SwiGLU with the reference's roundings);
  :func:`moe_launch_dims`, their launchers' sizes (host side).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_bf16(v):
    """fp32 -> nearest-even bf16 value, kept in fp32 (finite inputs)."""
    b = v.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def l2_prefetch(ptr):
    """Ask L2 for the cache line at each address of ``ptr`` (``prefetch.global.L2``, PTX; CUDA only): no register
    receives it and nothing waits for it, so ptxas cannot sink it next to a use as it does a register prefetch. A
    warp's prefetch is coalesced like a load (one request per line). Addresses must lie inside an allocation.
    Returns a dummy int32 (inline assembly needs an output; not pure, so it is kept)."""
    return tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptr], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def rope_rows(y, cos_ptr, sin_ptr, t, ok, BR: tl.constexpr, N: tl.constexpr, RD: tl.constexpr):
    """``layers.apply_rope`` of rows ``y [BR, N]`` (fp32 values): the pairs ``(2j, 2j + 1)`` of the last ``RD`` dims
    rotated by row ``t`` (``[BR, 1]`` int64 or a scalar) of the fp32 tables ``cos``/``sin [*, RD/2]``, ``a cos - b
    sin`` and ``a sin + b cos`` rounded to bf16 (nearest even, :func:`round_bf16`); the other dims as they are.
    ``ok [BR, 1]``: the rows whose table entries are read."""
    a, b = tl.split(tl.reshape(y, (BR, N // 2, 2)))  # [BR, N/2] the even and the odd dims of each pair
    j = tl.arange(0, N // 2)[None, :] - (N - RD) // 2  # [1, N/2] pair index within the RoPE dims (< 0: none)
    rope = j >= 0
    e = t * (RD // 2) + j  # [BR, N/2] the row's cos/sin entry
    cs = tl.load(cos_ptr + e, mask=ok & rope, other=1.0)
    sn = tl.load(sin_ptr + e, mask=ok & rope, other=0.0)
    ra = round_bf16(a * cs - b * sn)
    rb = round_bf16(a * sn + b * cs)
    return tl.reshape(tl.join(tl.where(rope, ra, a), tl.where(rope, rb, b)), (BR, N))


@triton.jit
def rn_bf16(v):
    """fp32 -> nearest-even bf16 value, kept in fp32, by the hardware's conversion (a convert and a shift per value;
    :func:`round_bf16`'s integer arithmetic takes 4 operations: on an H200 the indexer's prefill kernel took 20.9 ms
    per call with that form against 9.8 ms with this one, 2026-12-04)."""
    return v.to(tl.bfloat16).to(tl.float32)


@triton.jit
def pow2(e):
    """2**e in fp32 for integer tensors e in [-126, 127]."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def e8m0(s):
    """e8m0 bytes -> fp32 2**(s - 127) (bytes 1..254; 0 and 255 never occur in the checkpoints)."""
    return (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def e2m1_nibble(w, m: tl.constexpr):
    """Nibble ``m`` (bits ``4m .. 4m+3``) of int32 ``w`` -> its e2m1 value times 2**-126 (fp32; 0.5 lands on a
    denormal), 3 integer operations (masking and shifting sign and magnitude apart took 6, and a multiply by 2**126
    followed): the nibble is shifted to bits 28-31, arithmetically back by 6 (its sign stays at bit 31, its 3
    magnitude bits land on bits 22-24, the exponent's lowest two and the mantissa's first), and the copies of the
    sign in bits 25-30 masked off (mask 0x81C00000). A packed word holds 8 consecutive columns, nibble ``m`` is column
    ``m`` of them (byte ``k``: columns ``2k``, ``2k + 1``). Decoding is what bounds the FP4 kernels at decode sizes,
    not the bytes."""
    return (((w << (28 - 4 * m)) >> 6) & -2118123520).to(tl.float32, bitcast=True)


@triton.jit
def e2m1_pair(p):
    """Packed bytes ``p`` (int32, 0..255) -> the low and the high nibble's e2m1 values times 2**-126
    (:func:`e2m1_nibble` 0 and 1)."""
    return e2m1_nibble(p, 0), e2m1_nibble(p, 1)


@triton.jit
def e2m1_bits16(p, m: tl.constexpr):
    """Nibble ``m`` of int32 ``p`` -> the bf16 bit pattern (in the low 16 bits of an int32) of its e2m1 value times
    2**-126: :func:`e2m1_nibble`'s fp32 pattern 16 bits lower (3 integer operations; sign at bit 15, the magnitude
    bits on bits 6-8; +-0.5 lands on a bf16 subnormal). Kernels bitcast it to bf16 (``.to(tl.int16)`` keeps the
    bits) to scale it by :func:`e2m1_factors16`'s powers of two in bf16 pairs."""
    return ((p << (28 - 4 * m)) >> 22) & 0x81C0


@triton.jit
def e2m1_factors16(b):
    """:func:`e2m1_factors` as bf16 bit patterns (int32, low 16 bits): ``f1 = 2**(min(b, 128) - 1)``, ``f2 =
    2**(max(b, 128) - 128)``, both normal bf16."""
    return (tl.minimum(b, 128) + 126) << 7, (tl.maximum(b, 128) - 1) << 7


@triton.jit
def bits16_value(bits, INTERPRET: tl.constexpr):
    """bf16 bit patterns (int32, low 16 bits) -> the values: bf16 on the GPU, the same values in fp32 under the
    interpreter (whose bf16 arithmetic is not the GPU's)."""
    if INTERPRET:
        return (bits << 16).to(tl.float32, bitcast=True)
    return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def e2m1_pair16(p, g1, g2, INTERPRET: tl.constexpr):
    """Packed bytes ``p`` (int32) and their groups' :func:`e2m1_factors16` patterns ``g1``, ``g2`` (broadcastable to
    ``p``) -> the low and the high nibbles' weights, exact: bf16 scaled by bf16 pair multiplies on the GPU, the same
    values in fp32 under the interpreter (:func:`bits16_value`). ``f2`` first: the product never overflows."""
    f1, f2 = bits16_value(g1, INTERPRET), bits16_value(g2, INTERPRET)
    lo = bits16_value(e2m1_bits16(p, 0), INTERPRET)  # values times 2**-126
    hi = bits16_value(e2m1_bits16(p, 1), INTERPRET)
    return lo * f2 * f1, hi * f2 * f1


@triton.jit
def e2m1_factors(b):
    """e8m0 scale bytes ``b`` (int32) -> powers of two ``(f1, f2)`` with ``f1 * f2 = 2**(b - 127) * 2**126``: the
    factor from :func:`e2m1_pair`'s values to the weights. ``f1 = 2**(min(b, 128) - 1)``, ``f2 = 2**(max(b, 128) -
    128)``: apart, neither overflows; ``f2`` is 1 for every scale up to 2 (weights up to 12, all the checkpoints
    hold), so a kernel may apply it to a group's partial sum instead of to every weight (exact: powers of two)."""
    f1 = ((tl.minimum(b, 128) + 126) << 23).to(tl.float32, bitcast=True)
    f2 = ((tl.maximum(b, 128) - 1) << 23).to(tl.float32, bitcast=True)
    return f1, f2


@triton.jit
def act_exp(amax):
    """The reference act_quant's scale exponent for blocks with absolute maximum ``amax`` (fp32, any shape):
    ``ceil(log2(max(amax, 1e-4) * fp32(1/448)))`` as int32 (the scale is 2**result)."""
    bits = (tl.maximum(amax, 1e-4) * 0.002232142857142857).to(tl.int32, bitcast=True)
    return ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)


@triton.jit
def e4m3_grid(v):
    """fp32 values (already divided by their block scale) -> clipped to +-448 and rounded to the e4m3 grid, nearest
    even; subnormals (step 2**-9) included. Exact arithmetic: the 1.5 * 2**23 trick rounds to an integer step."""
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    ve = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6) - 3  # log2 of the e4m3 step
    r = (v * pow2(-ve) + 12582912.0) - 12582912.0
    return r * pow2(ve)


@triton.jit
def act_quant_block(x):
    """The reference ``act_quant`` of fp32 blocks ``x [NB, 128]`` -> ``(q [NB, 128], e [NB])``: codes on the e4m3
    grid (fp32) and each block's scale exponent (the scale is ``2**e``), bit for bit ``quant.fp8_act_quant``,
    special values included: ``-0.0`` codes keep their sign (``e4m3_grid`` returns ``+0``); a block with an infinity
    has the scale ``+inf`` (exponent 128) and ``x / inf`` is ``x * 0`` (NaN for the infinities); NaN codes stay NaN;
    a NaN in a block gives the scale the reference derives from a NaN amax (exponent 129 from its bits: ``-0.0``,
    ``x / -0.0`` is ``x * -inf``). ``tl.max`` drops NaNs, hence the amax over the integer bits of ``|x|``, where NaNs
    sort above ``inf``. The values are ``q * pow2(e)`` (exact)."""
    abits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)  # [NB] bits of the blocks' amax (NaN > inf)
    e = tl.where(abits > 0x7F800000, 129, act_exp(abits.to(tl.float32, bitcast=True)))  # [NB] scale exponents
    inv = tl.where(e < 128, pow2(-e), tl.where(e == 128, 0.0, float("-inf")))  # [NB] 1 / scale, exact
    v = x * inv[:, None]  # x / s of the reference, the same rounding
    sign = v.to(tl.int32, bitcast=True) & -2147483648
    q = (e4m3_grid(v).to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)  # [NB, 128] e4m3 codes
    return tl.where(v != v, v, q), e


@triton.jit
def e4m3_bits(q):
    """fp32 values on the e4m3 grid (:func:`act_quant_block`'s codes: ``|q| <= 448``, signed zeros, NaN) -> their
    e4m3fn bit patterns as int32 (0..255): sign in bit 7; from 2**-6 up the biased exponent (``+7``) in bits 3-6
    and the top 3 mantissa bits; below, the subnormal's multiple of 2**-9; NaN 0x7F. Integer arithmetic only (no
    hardware FP8 conversion: the interpreter and every target agree)."""
    b = q.to(tl.int32, bitcast=True)
    a = (b & 0x7FFFFFFF).to(tl.float32, bitcast=True)
    ex = ((b >> 23) & 0xFF) - 127
    code = tl.where(ex >= -6, ((ex + 7) << 3) | ((b >> 20) & 7), (a * 512.0).to(tl.int32))
    code = tl.where(a != a, 0x7F, code)
    return code | ((b >> 24) & 0x80)


@triton.jit
def fp4_exp(amax):
    """The reference FP4 scale exponent for blocks with absolute maximum ``amax`` (fp32, any shape):
    ``ceil(log2(max(amax, 6 * 2**-126) * fp32(1/6)))`` as int32 (``quant.pow2_scale``; the scale is 2**result)."""
    bits = (tl.maximum(amax, 7.052966104933725e-38) * 0.16666666666666666).to(tl.int32, bitcast=True)  # 6*2**-126
    return ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)


@triton.jit
def e2m1_codes(v):
    """fp32 values (already divided by their block scale) -> e2m1 codes as int32 (``quant.round_e2m1`` of the
    values clipped to +-6, then ``quant.pack_e2m1``'s code before packing): the magnitude's grid index 0..7 (grid
    0, .5, 1, 1.5, 2, 3, 4, 6; nearest, ties to even) in bits 0-2, the value's sign bit in bit 3 (so ``-0`` and
    negative values rounded to zero give code 8, as the reference's ``sign(v) * ...``). Exact arithmetic: ``|v| /
    step`` is a power-of-two scaling and the 1.5 * 2**23 trick rounds it to the nearest even integer ``r``; the
    index is ``r`` below 2 (step 0.5), ``r + 2`` below 4 (step 1), ``r + 4`` above (step 2). Finite inputs."""
    vb = v.to(tl.int32, bitcast=True)
    a = tl.minimum((vb & 0x7FFFFFFF).to(tl.float32, bitcast=True), 6.0)
    lo = a < 2.0
    mid = a < 4.0
    r = (a * tl.where(lo, 2.0, tl.where(mid, 1.0, 0.5)) + 12582912.0) - 12582912.0
    return (r.to(tl.int32) + tl.where(lo, 0, tl.where(mid, 2, 4))) | ((vb >> 28) & 8)


@triton.jit
def fp4_quant_block(x):
    """The reference ``fp4_act_quant`` of fp32 blocks ``x [NB, 32]`` (finite) -> ``(codes [NB, 32], e [NB])``:
    :func:`e2m1_codes` of ``x / 2**e`` and each block's scale exponent (:func:`fp4_exp`: in ``[-125, 126]`` for
    finite inputs, so ``2**-e`` is a normal fp32 and ``x * 2**-e`` rounds as the reference's ``x / s``). The values
    are ``e2m1(codes) * 2**e`` (exact)."""
    e = fp4_exp(tl.max(tl.abs(x), axis=1))  # [NB]
    return e2m1_codes(x * pow2(-e)[:, None]), e


@triton.jit
def moe_block_pairs(rows_ptr, tok_ptr, wt_ptr, b, BM: tl.constexpr, R: tl.constexpr):
    """The ``BM`` slots of block ``b`` of the tiled FP4 MoE kernels (``experts.group_pairs``'s layout) -> ``(slot
    [BM], live [BM], tok [BM] int64, wt [BM])``: padding slots (pair index ``R``) are not live, read token 0 and
    weight 0."""
    slot = b * BM + tl.arange(0, BM)
    pair = tl.load(rows_ptr + slot)
    live = pair < R
    tok = tl.load(tok_ptr + pair, mask=live, other=0).to(tl.int64)
    wt = tl.load(wt_ptr + pair, mask=live, other=0.0)
    return slot, live, tok, wt


@triton.jit
def swiglu_act(acc_g, acc_u, wt, LIMIT: tl.constexpr):
    """The experts' hidden activation from fp32 gate and up sums and routing weights ``wt`` (broadcast against
    them): ``bf16(wt * silu(min(g, L)) * clip(u, -L, L))`` with ``g``, ``u`` rounded to bf16 first (the reference's
    order; ``LIMIT`` 0: no clamp), as fp32 values. Elementwise, so the GEMV kernels (Gluon's too) call it as well."""
    g = round_bf16(acc_g)
    u = round_bf16(acc_u)
    if LIMIT > 0:
        u = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
        g = tl.minimum(g, LIMIT)
    return round_bf16(wt * (g * tl.sigmoid(g) * u))


@triton.jit
def swiglu_h(acc_g, acc_u, wt, LIMIT: tl.constexpr):
    """:func:`swiglu_act` of the tiled kernels' sums ``[BN, BM]`` and the slots' routing weights ``wt [BM]``."""
    return swiglu_act(acc_g, acc_u, wt[None, :], LIMIT)


def moe_launch_dims(w1_shape, tok, bexp, t: dict):
    """The sizes every tiled FP4 MoE launcher (jax or torch arrays) needs: ``w1_shape`` the packed gate stack's
    ``(E, I, D/2)``, ``tok [R]`` the pairs' tokens, ``bexp [n_blocks]`` the blocks' experts, ``t`` the tile plan ->
    ``(I, D, R, n_blocks, n_slots, launch options)``."""
    _, I, D2 = w1_shape
    n_blocks = bexp.shape[0]
    return I, 2 * D2, tok.shape[0], n_blocks, n_blocks * t["BM"], dict(num_warps=t["num_warps"],
                                                                        num_stages=t["num_stages"])
