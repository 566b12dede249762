"""The FP4 routed experts at decode sizes: two GEMV kernels (no tensor cores) over the packed e2m1 weights.

At decode a touched expert sees one or a few tokens, so the tiled kernels of :mod:`fp4_moe` (a 16-row ``tl.dot`` per
block, its weight operand rebuilt through shared memory) are bound by latency and per-element work, not by the
weight bytes. Here every program streams ``BN`` weight rows of one expert over the whole K range in ``[BN, NG,
16]``-byte steps, decodes each nibble once to its e2m1 value times 2**-126 (code bits under the exponent in three
integer operations: :func:`common.e2m1_pair`) and multiplies it by the ``BM`` slots' activation codes times 2**24
(:func:`_act_codes`) in fp32: exact, normal products, summed in fp32 per 32-column group, whose weight scale and
activation scale (powers of two) multiply the group's sum once (:func:`_dot_groups`). The grid is (blocks of ``BM``
slots, ``N / BN``): thousands of small programs keep enough loads in flight.

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
from dsv4_jax.kernels.common import act_exp, e2m1_factors, e2m1_pair, e4m3_grid, pow2, round_bf16


@triton.jit
def _nibbles(wp, ws, n, K: tl.constexpr, c0, NG: tl.constexpr):
    """Weight rows ``n [BN]`` (int64), columns ``[c0, c0 + 32 NG)``: the even and the odd columns' e2m1 values times
    2**-126, ``[BN, NG, 16]`` fp32 each (byte j holds column 2j in its low nibble, 2j+1 in its high one; 3 integer
    operations per weight, :func:`common.e2m1_pair`), and the two per-group powers of two ``f1, f2 [BN, NG, 1]``
    (:func:`common.e2m1_factors`) that scale them to the weights: :func:`_dot_groups` applies both to each group's
    partial sum, not to every weight."""
    gi = tl.arange(0, NG)[None, :, None] * 16 + tl.arange(0, 16)[None, None, :]  # [1, NG, 16]
    p = tl.load(wp + n[:, None, None] * (K // 2) + c0 // 2 + gi).to(tl.int32)  # [BN, NG, 16] bytes
    b = tl.load(ws + n[:, None] * (K // 32) + c0 // 32 + tl.arange(0, NG)[None, :]).to(tl.int32)  # [BN, NG]
    f1, f2 = e2m1_factors(b)
    lo, hi = e2m1_pair(p)
    return lo, hi, f1[:, :, None], f2[:, :, None]


@triton.jit
def _columns(row_ptr, c0, NG: tl.constexpr, live):
    """Activation columns ``[c0, c0 + 32 NG)`` of one row as fp32 even and odd columns ``[NG, 16]`` each. (Loading
    them contiguously and splitting in registers, or in the weights' 3-d shape, made Triton convert the weight tiles'
    layout in every K step instead: ptxas, sm_90a.)"""
    c = c0 + 2 * (tl.arange(0, NG)[:, None] * 16 + tl.arange(0, 16)[None, :])  # [NG, 16] even columns
    ve = tl.load(row_ptr + c, mask=live, other=0.0).to(tl.float32)
    vo = tl.load(row_ptr + c + 1, mask=live, other=0.0).to(tl.float32)
    return ve, vo


@triton.jit
def _weight_rows(bexp_ptr, b, N: tl.constexpr, BN: tl.constexpr):
    """Rows ``[BN]`` (int64) of the stacked ``[E*N, K]`` weights that program (b, program_id(1)) streams: its BN
    output columns of block b's expert."""
    ex = tl.load(bexp_ptr + b).to(tl.int64)
    return ex * N + tl.program_id(1) * BN + tl.arange(0, BN).to(tl.int64)


@triton.jit
def _dot_groups(we, wo, f1, f2, xe, xo, fx):
    """Per 32-column group, ``sum(we * xe + wo * xo)`` over its 16 bytes, times the group's weight factors ``f1, f2``
    and activation factor ``fx [NG, 1]`` -> ``[BN, NG, 1]``. The operands are scaled copies (:func:`_nibbles`: weights
    times 2**-126; :func:`_act_codes`: activations divided by their block's power of two, times 2**24), so every
    product is exact and a normal fp32 number, and the sum equals the sum of the true products times one power of two
    (the same fp32 roundings); the factors then restore it exactly. One multiply per group of 32 weights instead of one
    per weight. The 16 bytes of a group are one thread's 16-byte load, so this sum stays in registers; the kernels add
    these partials across K steps and reduce over the groups once, after the K loop (no cross-thread reduction per
    step)."""
    # [BN, NG, 1]: the weight tiles' layout, so the K loop carries the accumulators without converting them
    return tl.sum(we * xe[None, :, :] + wo * xo[None, :, :], axis=2, keep_dims=True) * (f1 * fx[None, :, :]) * f2


@triton.jit
def _act_codes(ve, vo, NB: tl.constexpr, ROUND: tl.constexpr):
    """NB 128-wide blocks held as even/odd columns ``[4NB, 16]`` each (group g = 32 consecutive columns) -> the
    values divided by their block's power of two ``2**e`` (``ROUND``: the reference's ``act_quant``, e from the
    block's amax and the quotient rounded to the e4m3 grid; else already-quantized values, only divided, exactly)
    times ``2**24``, and the factor ``2**(e - 24) [4NB, 1]`` per group that gives the values back. With quotients in
    ``[2**-9, 896]`` and decoded nibbles in ``[0.5, 6] * 2**-126``, every product lies in ``[2**-112, 2**-89]``:
    normal fp32, exact."""
    a32 = tl.maximum(tl.max(tl.abs(ve), axis=1), tl.max(tl.abs(vo), axis=1))  # [4NB] per group of 32
    e = act_exp(tl.max(tl.reshape(a32, (NB, 4)), axis=1))  # [NB] per 128-wide block
    e = tl.reshape(tl.broadcast_to(e[:, None], (NB, 4)), (4 * NB,))[:, None]  # [4NB, 1]
    if ROUND:
        ce, co = e4m3_grid(ve * pow2(-e)), e4m3_grid(vo * pow2(-e))
    else:
        ce, co = ve * pow2(-e), vo * pow2(-e)
    return ce * 16777216.0, co * 16777216.0, pow2(e - 24)


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
    if BM == 1:  # per-group partial sums, reduced over NG after the K loop
        acc_g = tl.zeros((BN, NG, 1), tl.float32)
        acc_u = tl.zeros((BN, NG, 1), tl.float32)
    else:
        acc_g = tl.zeros((BM, BN, NG), tl.float32)
        acc_u = tl.zeros((BM, BN, NG), tl.float32)
    for c0 in range(0, D, 32 * NG):
        ge, go, g1, g2 = _nibbles(w1p, w1s, n, D, c0, NG)
        ue, uo, u1, u2 = _nibbles(w3p, w3s, n, D, c0, NG)
        for m in tl.static_range(BM):
            if DIRECT:
                pair = b
            else:
                pair = tl.load(rows_ptr + b * BM + m)
            live = pair < R
            tok = tl.load(tok_ptr + pair, mask=live, other=0).to(tl.int64)
            xe, xo = _columns(x_ptr + tok * D, c0, NG, live)  # [NG, 16] each
            xe, xo, fx = _act_codes(xe, xo, NG // 4, QUANT)
            if BM == 1:
                acc_g += _dot_groups(ge, go, g1, g2, xe, xo, fx)
                acc_u += _dot_groups(ue, uo, u1, u2, xe, xo, fx)
            else:
                sel = (mrow == m)[:, None, None]
                acc_g = tl.where(sel, acc_g + tl.reshape(_dot_groups(ge, go, g1, g2, xe, xo, fx), (1, BN, NG)),
                                 acc_g)
                acc_u = tl.where(sel, acc_u + tl.reshape(_dot_groups(ue, uo, u1, u2, xe, xo, fx), (1, BN, NG)),
                                 acc_u)
    if BM == 1:
        acc_g = tl.reshape(acc_g, (1, BN, NG))
        acc_u = tl.reshape(acc_u, (1, BN, NG))
    slot = b * BM + mrow  # [BM]
    if DIRECT:
        pair = slot
    else:
        pair = tl.load(rows_ptr + slot)
    wt = tl.load(wt_ptr + pair, mask=pair < R, other=0.0)  # [BM]
    g = round_bf16(tl.sum(acc_g, axis=2))  # [BM, BN]
    u = round_bf16(tl.sum(acc_u, axis=2))
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
    if BM == 1:  # per-group partial sums, reduced after the K loop
        acc = tl.zeros((BN, 4 * NB, 1), tl.float32)
    else:
        acc = tl.zeros((BM, BN, 4 * NB), tl.float32)
    for c0 in range(0, I, 128 * NB):
        we, wo, w1f, w2f = _nibbles(w2p, w2s, n, I, c0, 4 * NB)
        for m in tl.static_range(BM):
            he, ho = _columns(h_ptr + (b * BM + m).to(tl.int64) * I, c0, 4 * NB, True)  # [4NB, 16] each
            qe, qo, fq = _act_codes(he, ho, NB, True)
            if BM == 1:
                acc += _dot_groups(we, wo, w1f, w2f, qe, qo, fq)
            else:
                acc = tl.where((mrow == m)[:, None, None],
                               acc + tl.reshape(_dot_groups(we, wo, w1f, w2f, qe, qo, fq), (1, BN, 4 * NB)), acc)
    if BM == 1:
        acc = tl.reshape(acc, (1, BN, 4 * NB))
    slot = b * BM + mrow
    y = round_bf16(tl.sum(acc, axis=2))  # [BM, BN]
    tl.store(y_ptr + slot[:, None].to(tl.int64) * D + col[None, :], y.to(y_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------- plans, launchers
def gemv_tiles(target: str, D: int, I: int, BM: int, n_pairs: int = 1) -> dict:
    """Tile sizes of the GEMV kernels (one place): ``BN1``/``NG`` (stage 1: rows per program, 32-column groups per
    step) and ``BN2``/``NB`` (stage 2: rows per program, 128-column blocks per step); ``QUANT``: stage 1 quantizes
    the raw tokens itself. ``n_pairs``: the call's (token, expert) pairs, which choose the rows per program."""
    if target == "cpu":  # the interpreter: few, wide programs
        return dict(BM=BM, BN1=min(64, I), NG=4, BN2=min(64, D), NB=1, num_warps=4, num_stages=1, QUANT=1)
    # Rows per program, V4-Flash MoE call on an H200 (scripts/bench_moe.py --variants, docs/performance.md): one
    # token (6 pairs) 95 us with 16 rows vs 104 with 32 and 99 with 64 (few pairs need many programs); 32 tokens
    # (192 pairs) 1.83 ms with 16, 1.63 with 32, 1.76 with 64 (the activations' quantization, recomputed per
    # program, is shared by more rows). 32 from 32 pairs on: between the two points, not measured.
    bn = 32 if n_pairs >= 32 else 16
    return dict(BM=BM, BN1=bn, NG=8, BN2=bn, NB=2, num_warps=4, num_stages=3, QUANT=1)


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
