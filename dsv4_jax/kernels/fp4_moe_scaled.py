"""The tiled FP4 routed experts on ``tl.dot_scaled``: the MXFP4 weights and MXFP8 activations handed to the dot as
they are stored, codes plus e8m0 scales (``tiles()["SCALED"] = 1`` in :mod:`fp4_moe`).

Where a chip has scaled MX dots (AMD gfx950 / MI355X: ``v_mfma_scale``; NVIDIA sm_100) Triton issues them natively;
elsewhere (Hopper, the CPU interpreter) it rewrites the dot into an upcast of both operands to bf16, the scales
applied as powers of two, and a bf16 dot with fp32 accumulation. Either way every product is exact (e2m1 times e4m3
times two powers of two) and sums in fp32: the same numbers as :mod:`fp4_moe`'s register-dequantizing kernels, in
another summation order inside a dot. So one kernel source serves both families; the GPU tests run it on an H200
(the rewritten form) against the reference.

Layout and stages (the :func:`experts.group_pairs` blocks of ``BM`` slots of one expert, as :mod:`fp4_moe`):

1. :func:`_gate_up_scaled`, grid (block, I / 128): the tokens as e4m3 codes ``xq [T, D]`` and e8m0 bytes
   ``xs [T, D/128]`` (``quant.quantize_act``, the reference's ``act_quant``), K steps of 128 columns (one
   activation scale, four weight scales per row); ``g = bf16(x @ w1.T)``, ``u = bf16(x @ w3.T)``, the clamped
   SwiGLU times the routing weight rounded to bf16 (``h``), then ``h``'s FP8 quantization per 1x128 block in the
   epilogue (a program's 128 columns are one block: :func:`common.act_quant_block`, bit for bit the reference's
   ``act_quant``), written as e4m3 bytes ``hq [slots, I]`` and e8m0 bytes ``hs [slots, I/128]``.
2. :func:`_down_scaled`, grid (block, D / BN2): ``y = bf16(hq @ w2.T)`` -> ``y [slots, D]`` bf16.

Against the register-dequantizing kernels: no per-element decode code of ours (Triton's upcast, or none on gfx950)
and ``h`` leaves stage 1 quantized (1 byte per element instead of 2, no per-program requantization in stage 2).
Special values: the activation scale bytes 255 (an infinite or NaN block) make the dot NaN for that row, as the
reference's ``x / inf`` rows are NaN or zero; e8m0 weight bytes 0 and 255 are not in the checkpoints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from dsv4_jax.kernels import triton_call
from dsv4_jax.kernels.common import act_quant_block, e4m3_bits, moe_block_pairs, moe_launch_dims, round_bf16, swiglu_h
from dsv4_jax.modeling.quant import Fp4Tensor, e8m0_bytes, quantize_act

_BK = 128  # K columns per step: one activation scale block, four weight scale groups
BK = tl.constexpr(_BK)  # (a kernel may read a global only as a constexpr)


@triton.jit
def _gate_up_scaled(xq_ptr, xs_ptr, tok_ptr, wt_ptr, rows_ptr, bexp_ptr, used_ptr, w1p_ptr, w1s_ptr, w3p_ptr,
                    w3s_ptr, hq_ptr, hs_ptr, R: tl.constexpr, D: tl.constexpr, I: tl.constexpr, LIMIT: tl.constexpr,
                    BM: tl.constexpr):
    """hq/hs[slot, 128 columns] = act_quant(bf16(wt * silu(min(g, L)) * clip(u, -L, L))) for the BM slots of one
    block and the 128 columns ``128 * program_id(1) + [0, 128)`` of ``h``."""
    b = tl.program_id(0)
    if b >= tl.load(used_ptr):
        return
    ex = tl.load(bexp_ptr + b).to(tl.int64)
    slot, live, tok, wt = moe_block_pairs(rows_ptr, tok_ptr, wt_ptr, b, BM, R)  # [BM] each
    n = tl.program_id(1) * 128 + tl.arange(0, 128)  # [128] rows of the expert's [I, D] weights
    w1p, w3p = w1p_ptr + ex * (I * D // 2), w3p_ptr + ex * (I * D // 2)
    w1s, w3s = w1s_ptr + ex * (I * D // 32), w3s_ptr + ex * (I * D // 32)
    kb = tl.arange(0, BK // 2)  # packed bytes of a step
    kg = tl.arange(0, BK // 32)  # scale groups of a step
    acc_g = tl.zeros((128, BM), tl.float32)
    acc_u = tl.zeros((128, BM), tl.float32)
    for k0 in range(0, D, BK):
        woff = n[:, None] * (D // 2) + (k0 // 2 + kb)[None, :]  # [128, BK/2]
        soff = n[:, None] * (D // 32) + (k0 // 32 + kg)[None, :]  # [128, BK/32]
        x = tl.load(xq_ptr + tok[None, :] * D + (k0 + tl.arange(0, BK))[:, None], mask=live[None, :], other=0)
        xs = tl.load(xs_ptr + tok[:, None] * (D // 128) + k0 // 128 + 0 * kg[None, :], mask=live[:, None],
                     other=127)  # [BM, BK/32]: the block's scale byte for each of its four groups
        acc_g = tl.dot_scaled(tl.load(w1p + woff), tl.load(w1s + soff), "e2m1", x, xs, "e4m3", acc_g)
        acc_u = tl.dot_scaled(tl.load(w3p + woff), tl.load(w3s + soff), "e2m1", x, xs, "e4m3", acc_u)
    a = swiglu_h(acc_g, acc_u, wt, LIMIT)  # [128, BM] h (bf16 values)
    q, e = act_quant_block(tl.trans(a))  # [BM, 128] e4m3 codes, [BM] scale exponents
    tl.store(hq_ptr + slot[:, None].to(tl.int64) * I + n[None, :], e4m3_bits(q).to(tl.uint8))
    tl.store(hs_ptr + slot.to(tl.int64) * (I // 128) + tl.program_id(1), tl.minimum(e + 127, 255).to(tl.uint8))


@triton.jit
def _down_scaled(hq_ptr, hs_ptr, bexp_ptr, used_ptr, w2p_ptr, w2s_ptr, y_ptr, D: tl.constexpr, I: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr):
    """y[slot, n] = bf16(hq[slot] @ w2[n].T) for the BM slots of one block and BN output columns."""
    b = tl.program_id(0)
    if b >= tl.load(used_ptr):
        return
    ex = tl.load(bexp_ptr + b).to(tl.int64)
    slot = (b * BM + tl.arange(0, BM)).to(tl.int64)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    w2p, w2s = w2p_ptr + ex * (D * I // 2), w2s_ptr + ex * (D * I // 32)
    kb = tl.arange(0, BK // 2)
    kg = tl.arange(0, BK // 32)
    acc = tl.zeros((BN, BM), tl.float32)
    for k0 in range(0, I, BK):
        w = tl.load(w2p + n[:, None] * (I // 2) + (k0 // 2 + kb)[None, :])  # [BN, BK/2]
        ws = tl.load(w2s + n[:, None] * (I // 32) + (k0 // 32 + kg)[None, :])  # [BN, BK/32]
        h = tl.load(hq_ptr + slot[None, :] * I + (k0 + tl.arange(0, BK))[:, None])  # [BK, BM] e4m3 bytes
        hs = tl.load(hs_ptr + slot[:, None] * (I // 128) + k0 // 128 + 0 * kg[None, :])  # [BM, BK/32]
        acc = tl.dot_scaled(w, ws, "e2m1", h, hs, "e4m3", acc)
    tl.store(y_ptr + slot[None, :] * D + n[:, None], round_bf16(acc).to(y_ptr.dtype.element_ty))


def check_scaled_shapes(D: int, I: int, t: dict) -> None:
    """Refuse expert shapes the scaled kernels do not tile (K steps of 128, h's 128-column blocks, BN2 | D)."""
    if D % _BK or I % 128 or D % t["BN2"]:
        raise ValueError(f"fp4_moe (dot_scaled): expert shape D={D}, I={I} is not tiled by {t} (need D and I "
                         f"multiples of 128 and D of BN2={t['BN2']})")


def act_codes(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Tokens ``x [T, D]`` -> the reference ``act_quant`` (1x128) as e4m3 bytes ``[T, D]`` and e8m0 bytes
    ``[T, D/128]`` (uint8 both: the operands of :func:`_gate_up_scaled`)."""
    qa = quantize_act(x, 128)
    return jax.lax.bitcast_convert_type(qa.q, jnp.uint8), e8m0_bytes(qa.scale)


def launch_scaled_jax(xq, xs, tok, wt, rows, bexp, used, w1: Fp4Tensor, w2: Fp4Tensor, w3: Fp4Tensor,
                      limit: float, t: dict) -> jax.Array:
    """Both stages through :func:`triton_call`: ``xq``/``xs`` from :func:`act_codes`, ``tok``/``wt`` per pair, the
    ``group_pairs`` layout -> ``y [slots, D]`` bf16 (rows of unused blocks undefined)."""
    I, D, R, n_blocks, n_slots, kw = moe_launch_dims(w1.packed.shape, tok, bexp, t)
    hq, hs = triton_call(xq, xs, tok, wt, rows, bexp, used, w1.packed, w1.scale, w3.packed, w3.scale,
                         kernel=_gate_up_scaled, tiled=True, grid=(n_blocks, I // 128),
                         out_shape=(jax.ShapeDtypeStruct((n_slots, I), jnp.uint8),
                                    jax.ShapeDtypeStruct((n_slots, I // 128), jnp.uint8)),
                         R=R, D=D, I=I, LIMIT=limit, BM=t["BM"], **kw)
    return triton_call(hq, hs, bexp, used, w2.packed, w2.scale, kernel=_down_scaled, tiled=True,
                       out_shape=jax.ShapeDtypeStruct((n_slots, D), jnp.bfloat16), grid=(n_blocks, D // t["BN2"]),
                       D=D, I=I, BM=t["BM"], BN=t["BN2"], **kw)


def launch_scaled_torch(xq, xs, tok, wt, rows, bexp, used, w1, w2, w3, limit: float, t: dict):
    """The same kernels on torch tensors (the interpreter tests): ``xq``/``xs`` uint8 tensors (:func:`act_codes`),
    ``w*`` ``(packed, scale)`` uint8 tensors. Returns ``(hq [slots, I], hs [slots, I/128], y [slots, D])``: h's e4m3
    and e8m0 bytes (unwritten rows keep the poison 0xFF) and y in fp32 (unwritten rows ``nan``)."""
    import torch

    I, D, R, n_blocks, n_slots, kw = moe_launch_dims(w1[0].shape, tok, bexp, t)
    hq = torch.full((n_slots, I), 255, dtype=torch.uint8)
    hs = torch.full((n_slots, I // 128), 255, dtype=torch.uint8)
    y = torch.full((n_slots, D), float("nan"), dtype=torch.float32)
    _gate_up_scaled[(n_blocks, I // 128)](xq, xs, tok, wt, rows, bexp, used, *w1, *w3, hq, hs, R=R, D=D, I=I,
                                          LIMIT=limit, BM=t["BM"], **kw)
    _down_scaled[(n_blocks, D // t["BN2"])](hq, hs, bexp, used, *w2, y, D=D, I=I, BM=t["BM"], BN=t["BN2"], **kw)
    return hq, hs, y
