"""The FP4 routed experts at decode sizes: two GEMV kernels (no tensor cores) over the packed e2m1 weights.

At decode a touched expert sees one or a few tokens, so the tiled kernels of :mod:`fp4_moe` (a 16-row ``tl.dot``
per block, its weight operand rebuilt through shared memory) are bound by latency and per-element work, not by
the weight bytes. Here every program streams ``BN`` weight rows of one expert over the whole K range in
``[BN, NG, 16]``-byte steps, decodes each nibble once to its exact fp32 value (code bits under the exponent, times
the 1x32 e8m0 scale) and multiplies it by the ``BM`` slots' activations in fp32 (exact products), summing in fp32.
The grid is (blocks of ``BM`` slots, ``N / BN``): thousands of small programs keep enough loads in flight.

Layout: :func:`dsv4_jax.kernels.fp4_moe.schedule` (one slot per block: the pairs as they come; more: the
expert-sorted blocks of :func:`experts.group_pairs`). Stage 1 takes the raw tokens and quantizes them itself
(``QUANT``, the reference's ``act_quant`` per 128-wide block) or the already-quantized ones. Same roundings and
same order contract as :mod:`fp4_moe` (its docstring): stage 1 writes
``h = bf16(wt * silu(min(g, L)) * clip(u, -L, L))`` with ``g, u`` rounded to bf16; stage 2 quantizes ``h`` per
128-wide block as the reference's ``act_quant`` (recomputed by every program from ``h``, which is tiny) and writes
``y = bf16(hq @ w2.T)``. Only the fp32 summation order inside each dot differs from the reference. Padding slots of
a block are computed on zero activations (cheap at these sizes) and dropped by the caller.

Portable Triton (integer/fp32 arithmetic and plain loads, see :mod:`dsv4_jax.kernels.common`); tested under the
interpreter in CI and against the reference on an H200.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from dsv4_jax.kernels import triton_call
from dsv4_jax.kernels.common import act_exp, e2m1, e4m3_grid, e8m0, pow2, round_bf16


@triton.jit
def _nibbles(wp, ws, n, K: tl.constexpr, c0, NG: tl.constexpr):
    """Weight rows ``n [BN]`` (int64), columns ``[c0, c0 + 32 NG)``: exact fp32 values of the even and of the odd
    columns, ``[BN, NG, 16]`` each (byte j holds column 2j in its low nibble, 2j+1 in its high one)."""
    gi = tl.arange(0, NG)[None, :, None] * 16 + tl.arange(0, 16)[None, None, :]  # [1, NG, 16]
    p = tl.load(wp + n[:, None, None] * (K // 2) + c0 // 2 + gi).to(tl.int32)  # [BN, NG, 16] bytes
    s = e8m0(tl.load(ws + n[:, None] * (K // 32) + c0 // 32 + tl.arange(0, NG)[None, :]))[:, :, None]  # [BN, NG, 1]
    return e2m1(p & 15) * s, e2m1(p >> 4) * s


@triton.jit
def _weight_rows(bexp_ptr, b, N: tl.constexpr, BN: tl.constexpr):
    """Rows ``[BN]`` (int64) of the stacked ``[E*N, K]`` weights that program (b, program_id(1)) streams: its BN
    output columns of block b's expert."""
    ex = tl.load(bexp_ptr + b).to(tl.int64)
    return ex * N + tl.program_id(1) * BN + tl.arange(0, BN).to(tl.int64)


@triton.jit
def _dot_rows(we, wo, xe, xo):
    """sum over (NG, 16) of ``we * xe + wo * xo`` -> [BN] (``xe``/``xo`` [NG, 16])."""
    return tl.sum(tl.sum(we * xe[None, :, :] + wo * xo[None, :, :], axis=2), axis=1)


@triton.jit
def _act_quant(ve, vo, NB: tl.constexpr):
    """The reference's ``act_quant`` of NB 128-wide blocks held as even/odd columns ``[4NB, 16]`` each (group g =
    32 consecutive columns): per block the power-of-two scale of its amax, values on the e4m3 grid times it."""
    a32 = tl.maximum(tl.max(tl.abs(ve), axis=1), tl.max(tl.abs(vo), axis=1))  # [4NB] per group of 32
    e = act_exp(tl.max(tl.reshape(a32, (NB, 4)), axis=1))  # [NB] per 128-wide block
    e = tl.reshape(tl.broadcast_to(e[:, None], (NB, 4)), (4 * NB,))[:, None]  # [4NB, 1]
    return e4m3_grid(ve * pow2(-e)) * pow2(e), e4m3_grid(vo * pow2(-e)) * pow2(e)


@triton.jit
def _gate_up_gemv(x_ptr, tok_ptr, wt_ptr, rows_ptr, bexp_ptr, used_ptr, w1p, w1s, w3p, w3s, h_ptr,
                  R: tl.constexpr, D: tl.constexpr, I: tl.constexpr, LIMIT: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, NG: tl.constexpr, E: tl.constexpr, QUANT: tl.constexpr, DIRECT: tl.constexpr):
    """h[slot, n] for the BM slots of block ``program_id(0)`` and BN columns n; ``x [T, D]`` holds the tokens
    (bf16): already FP8-quantized (exact in bf16), or raw with ``QUANT``, quantized here per 128-wide block as the
    reference's ``act_quant`` (recomputed by every program: a token row is 8 KB against the program's weight rows,
    and it saves the two XLA kernels of a separate quantization). ``DIRECT``: one slot per block, block b is pair b
    and ``bexp`` holds the pairs' local expert ids as they are (outside ``[0, E)``: another device's, no work)."""
    b = tl.program_id(0)
    if DIRECT:
        ex = tl.load(bexp_ptr + b)
        if ex < 0 or ex >= E:
            return
    elif b >= tl.load(used_ptr) or tl.load(bexp_ptr + b) >= E:  # unused, or another device's expert: no work
        return
    n = _weight_rows(bexp_ptr, b, I, BN)  # [BN] rows of the [E*I, D] stacks
    mrow = tl.arange(0, BM)
    gi = 2 * (tl.arange(0, NG)[:, None] * 16 + tl.arange(0, 16)[None, :])  # [NG, 16] even columns of a step
    acc_g = tl.zeros((BM, BN), tl.float32)
    acc_u = tl.zeros((BM, BN), tl.float32)
    for c0 in range(0, D, 32 * NG):
        ge, go = _nibbles(w1p, w1s, n, D, c0, NG)
        ue, uo = _nibbles(w3p, w3s, n, D, c0, NG)
        for m in tl.static_range(BM):
            if DIRECT:
                pair = b
            else:
                pair = tl.load(rows_ptr + b * BM + m)
            live = pair < R
            tok = tl.load(tok_ptr + pair, mask=live, other=0).to(tl.int64)
            xe = tl.load(x_ptr + tok * D + c0 + gi, mask=live, other=0.0).to(tl.float32)  # [NG, 16]
            xo = tl.load(x_ptr + tok * D + c0 + 1 + gi, mask=live, other=0.0).to(tl.float32)
            if QUANT:
                xe, xo = _act_quant(xe, xo, NG // 4)
            sel = mrow[:, None] == m
            acc_g = tl.where(sel, acc_g + _dot_rows(ge, go, xe, xo)[None, :], acc_g)
            acc_u = tl.where(sel, acc_u + _dot_rows(ue, uo, xe, xo)[None, :], acc_u)
    slot = b * BM + mrow  # [BM]
    if DIRECT:
        pair = slot
    else:
        pair = tl.load(rows_ptr + slot)
    wt = tl.load(wt_ptr + pair, mask=pair < R, other=0.0)  # [BM]
    g = round_bf16(acc_g)
    u = round_bf16(acc_u)
    if LIMIT > 0:
        u = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
        g = tl.minimum(g, LIMIT)
    a = round_bf16(wt[:, None] * (g * tl.sigmoid(g) * u))
    col = tl.program_id(1) * BN + tl.arange(0, BN)
    tl.store(h_ptr + slot[:, None].to(tl.int64) * I + col[None, :], a.to(h_ptr.dtype.element_ty))


@triton.jit
def _down_gemv(h_ptr, bexp_ptr, used_ptr, w2p, w2s, y_ptr, D: tl.constexpr, I: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr, NB: tl.constexpr, E: tl.constexpr, DIRECT: tl.constexpr):
    """y[slot, n] = bf16(act_quant(h[slot]) @ w2[n].T) for the BM slots of one block and BN output columns; each step
    covers NB 128-wide blocks of h (4 NB scale groups of 32). ``DIRECT`` (see stage 1): another device's pair gets
    zeros, so the output is the pairs' result as it stands."""
    b = tl.program_id(0)
    col = tl.program_id(1) * BN + tl.arange(0, BN)
    if DIRECT:
        ex = tl.load(bexp_ptr + b)
        if ex < 0 or ex >= E:
            tl.store(y_ptr + b.to(tl.int64) * D + col, tl.zeros((BN,), tl.float32).to(y_ptr.dtype.element_ty))
            return
    elif b >= tl.load(used_ptr) or tl.load(bexp_ptr + b) >= E:
        return
    n = _weight_rows(bexp_ptr, b, D, BN)  # [BN] rows of the [E*D, I] stack
    mrow = tl.arange(0, BM)
    gi = 2 * (tl.arange(0, 4 * NB)[:, None] * 16 + tl.arange(0, 16)[None, :])  # [4NB, 16]
    acc = tl.zeros((BM, BN), tl.float32)
    for c0 in range(0, I, 128 * NB):
        we, wo = _nibbles(w2p, w2s, n, I, c0, 4 * NB)
        for m in tl.static_range(BM):
            hrow = h_ptr + (b * BM + m).to(tl.int64) * I + c0
            he = tl.load(hrow + gi).to(tl.float32)  # [4NB, 16]
            ho = tl.load(hrow + 1 + gi).to(tl.float32)
            qe, qo = _act_quant(he, ho, NB)
            acc = tl.where(mrow[:, None] == m, acc + _dot_rows(we, wo, qe, qo)[None, :], acc)
    slot = b * BM + mrow
    tl.store(y_ptr + slot[:, None].to(tl.int64) * D + col[None, :], round_bf16(acc).to(y_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------- plans, launchers
def gemv_tiles(target: str, D: int, I: int, BM: int) -> dict:
    """Tile sizes of the GEMV kernels (one place): ``BN1``/``NG`` (stage 1: rows per program, 32-column groups per
    step) and ``BN2``/``NB`` (stage 2: rows per program, 128-column blocks per step); ``QUANT``: stage 1 quantizes
    the raw tokens itself."""
    if target == "cpu":  # the interpreter: few, wide programs
        return dict(BM=BM, BN1=min(64, I), NG=4, BN2=min(64, D), NB=1, num_warps=4, num_stages=1, QUANT=1)
    return dict(BM=BM, BN1=16, NG=8, BN2=16, NB=2, num_warps=4, num_stages=3, QUANT=1)


def check_gemv_shapes(D: int, I: int, t: dict) -> None:
    if D % (32 * t["NG"]) or I % (128 * t["NB"]) or I % t["BN1"] or D % t["BN2"]:
        raise ValueError(f"fp4_moe (GEMV): expert shape D={D}, I={I} is not tiled by {t} (need D % 32*NG, "
                         "I % 128*NB, I % BN1, D % BN2 == 0)")
    if t.get("QUANT") and t["NG"] % 4:
        raise ValueError(f"fp4_moe (GEMV): quantizing in stage 1 needs whole 128-wide blocks per step, NG={t['NG']}")


def _kw(t: dict, which: int, E: int) -> dict:
    common = dict(BM=t["BM"], E=E, DIRECT=bool(t.get("DIRECT", 0)), num_warps=t["num_warps"],
                  num_stages=t["num_stages"])
    if which == 1:
        return {**common, "BN": t["BN1"], "NG": t["NG"], "QUANT": bool(t.get("QUANT", 0))}
    return {**common, "BN": t["BN2"], "NB": t["NB"]}


def launch_gemv_jax(x, tok, wt, rows, bexp, used, w1, w2, w3, limit: float, t: dict):
    """Both GEMV kernels: ``x [T, D]`` the tokens in bf16 (raw with ``t["QUANT"]``, else already FP8-quantized,
    exact in bf16), ``tok``, ``wt`` and the block layout of :func:`dsv4_jax.kernels.fp4_moe.schedule` with
    ``t["BM"]`` slots per block -> ``y [slots, D]`` bf16 (rows of unused blocks undefined). With ``t["DIRECT"]``
    (one slot per block) ``bexp`` is the pairs' local expert ids ``e [R]`` as they come, ``rows``/``used`` are not
    read, and ``y [R, D]`` is every pair's result (zeros for ids outside ``[0, E)``)."""
    E, I, D2 = w1.packed.shape
    D, R, n_blocks = 2 * D2, tok.shape[0], bexp.shape[0]
    n_slots = n_blocks * t["BM"]
    h = triton_call(x, tok, wt, rows, bexp, used, w1.packed, w1.scale, w3.packed, w3.scale,
                       kernel=_gate_up_gemv, out_shape=jax.ShapeDtypeStruct((n_slots, I), jnp.bfloat16),
                       grid=(n_blocks, I // t["BN1"]), R=R, D=D, I=I, LIMIT=limit, **_kw(t, 1, E))
    return triton_call(h, bexp, used, w2.packed, w2.scale, kernel=_down_gemv,
                          out_shape=jax.ShapeDtypeStruct((n_slots, D), jnp.bfloat16), grid=(n_blocks, D // t["BN2"]),
                          D=D, I=I, **_kw(t, 2, E))


def launch_gemv_torch(x, tok, wt, rows, bexp, used, w1, w2, w3, limit: float, t: dict):
    """The same kernels on torch tensors (the interpreter tests); ``w*`` are ``(packed, scale)`` uint8 tensors.
    Returns ``(h [slots, I], y [slots, D])`` fp32; rows of unused blocks keep the poison ``nan``."""
    import torch

    E, I, D2 = w1[0].shape
    D, R, n_blocks = 2 * D2, tok.shape[0], bexp.shape[0]
    n_slots = n_blocks * t["BM"]
    h = torch.full((n_slots, I), float("nan"), dtype=torch.float32)
    y = torch.full((n_slots, D), float("nan"), dtype=torch.float32)
    _gate_up_gemv[(n_blocks, I // t["BN1"])](x, tok, wt, rows, bexp, used, *w1, *w3, h, R=R, D=D, I=I, LIMIT=limit,
                                             **_kw(t, 1, E))
    _down_gemv[(n_blocks, D // t["BN2"])](h, bexp, used, *w2, y, D=D, I=I, **_kw(t, 2, E))
    return h, y
