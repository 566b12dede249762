"""The FP8 decode GEMV kernels of :mod:`dsv4_jax.kernels.fp8_linear` (rows up to its ``GEMV_ROWS``): no tensor cores,
each e4m3 weight element decoded once in registers and multiplied by every row's bf16 activation in fp32.

* :func:`fp8_gemv_kernel`: one weight ``[G*N, K]`` (G groups; the FP8 linear and ``wo_a``'s grouped projection);
* :func:`fp8_gemv2_kernel`: two weights of one input in one launch (the attention's ``wq_a`` + ``wkv``, the shared
  expert's ``w1`` + ``w3``), fp32 split-K partials of both;
* :func:`_gemv_tile`: their common body, one ``BLOCK_N`` tile over one K range.

A module of their own so that :mod:`fp8_linear` holds the tiled kernel, the plans, the grids and every launcher
(jax and torch, these kernels' included) and the numerics contract (exact products, fp32 sums, power-of-two block
scales), which these kernels keep. Imported there only where triton is installed (the model runs without it).
"""

from __future__ import annotations

import triton
import triton.language as tl

from dsv4_jax.kernels.common import e8m0, l2_prefetch


@triton.jit
def fp8_gemv_kernel(x_ptr, w_ptr, sw_ptr, out_ptr, M: tl.constexpr, MP: tl.constexpr, N: tl.constexpr,
                    K: tl.constexpr, G: tl.constexpr, SWK: tl.constexpr,
                    SPLIT: tl.constexpr, KPS: tl.constexpr, NB: tl.constexpr, BLOCK_N: tl.constexpr,
                    CW: tl.constexpr = 128, PF: tl.constexpr = 0, XL: tl.constexpr = 0, RA: tl.constexpr = 0):
    """Decode rows (few ``M``): ``BLOCK_N`` weight rows of group ``g`` over this program's K range, all M rows.

    No tensor cores: each weight element is decoded once (e4m3 -> fp32, exact) and multiplied by every row's
    activation in fp32 (exact products); each ``CW``-column sum is scaled by its 128x128 block's power-of-two
    scale (exact) and summed in fp32. x ``[M, G, K]`` bf16 is used as it is: the FP8 linear passes the values of
    ``quantize_act`` (exact in bf16, made once per activation: by XLA, or by the mHC kernel that holds the row),
    ``wo_a`` its bf16 input. (Issuing the next step's loads before this step's arithmetic, a register double
    buffer, measured 0-24 % slower at V4-Flash's weights: H200, 2026-12-02; ptxas had sunk those loads next to
    their register copies. Two steps per trip with the loads kept 100-300 instructions ahead of their use,
    ptxas's register cap raised to 96-128: 10-20 % slower at one row, ``wo_b`` 18.9 vs 17.1 us, ``wq_b`` 16.3
    vs 14.1, ``wo_a`` 20.0 vs 17.6; H200, 2026-12-03.) (The activation
    used to be quantized here, in every program and K step: that amax, with shuffles, shared memory and a barrier
    in the K loop, made ``wo_b`` 24.6 us per call against 17.2 us now; H200, 2026-12-01,
    ``scripts/probe_kernels.py --op fp8``.) Each step covers ``NB`` 128-wide K blocks (a
    ``[BLOCK_N, NB*128/CW, CW]`` weight tile, 16-byte loads along K). out ``[M, G, N]`` (``SPLIT == 1``) or
    fp32 partials ``[SPLIT, M, G, N]``. ``PF`` > 0 (CUDA only, opt-in): each step asks L2 for the weight bytes
    ``PF`` steps ahead (:func:`common.l2_prefetch`). ``XL`` (default with ``RA``): each thread loads the activations
    of its own weights (L1 hits) instead of one ``[NC, CW]`` load broadcast over the rows, whose relayout through
    shared memory took 2 barriers a step at one row (sm_90a: 0 with ``XL``, 2 more instructions; 4 rows: 16 -> 8);
    the same products and sums. ``RA`` (default at rows 2-8, with ``CW`` 16): one chunk-sum accumulator per row in
    the weight tile's layout, the chunks summed after the loop, as the one-row form does: with ``XL`` no barrier in
    the K loop at any row count (4 rows: 514 instructions and 16 barriers a step -> 458 and 0, sm_90a), and every
    row's output the one-row call's bit for bit (another fp32 order than ``RA=0``'s, within the same bound)."""
    _gemv_tile(x_ptr, w_ptr, sw_ptr, out_ptr, tl.program_id(0), tl.program_id(1), tl.program_id(2), M, MP, N, K,
               G, SWK, KPS, NB, BLOCK_N, CW, N, 0, SPLIT, False, PF, XL, RA)


@triton.jit
def fp8_gemv2_kernel(x_ptr, w_ptr, sw_ptr, w2_ptr, sw2_ptr, out_ptr, M: tl.constexpr, MP: tl.constexpr,
                     N: tl.constexpr, N2: tl.constexpr, K: tl.constexpr, SWK: tl.constexpr, SPLIT: tl.constexpr,
                     KPS: tl.constexpr, NB: tl.constexpr, BLOCK_N: tl.constexpr, CW: tl.constexpr = 128,
                     PF: tl.constexpr = 0, XL: tl.constexpr = 0, RA: tl.constexpr = 0):
    """Two weights sharing the input ``x [M, K]`` in one launch: ``w [N, K]`` and ``w2 [N2, K]`` (e4m3, 128x128
    e8m0 scales ``sw``/``sw2``), each program one ``BLOCK_N`` tile of one weight (the first ``cdiv(N, BLOCK_N)``
    tiles are ``w``'s). Writes fp32 partials ``[SPLIT, M, N + N2]`` (``w``'s columns first), always: its
    consumer (:mod:`dsv4_jax.kernels.attn_proj`) sums them with its epilogue. The same tile code and order as
    :func:`fp8_gemv_kernel`."""
    pid_n = tl.program_id(0)
    NT: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    if pid_n < NT:
        _gemv_tile(x_ptr, w_ptr, sw_ptr, out_ptr, pid_n, tl.program_id(1), 0, M, MP, N, K, 1, SWK, KPS, NB,
                   BLOCK_N, CW, N + N2, 0, SPLIT, True, PF, XL, RA)
    else:
        _gemv_tile(x_ptr, w2_ptr, sw2_ptr, out_ptr, pid_n - NT, tl.program_id(1), 0, M, MP, N2, K, 1, SWK, KPS,
                   NB, BLOCK_N, CW, N + N2, N, SPLIT, True, PF, XL, RA)


@triton.jit
def _prefetch_step(pf_rows, pid_k, i, KPS: tl.constexpr, NB: tl.constexpr, K: tl.constexpr, CW: tl.constexpr):
    """Ask L2 for step ``i``'s weight bytes of this program's rows ``pf_rows [BN]`` (pointers to rows inside the
    weight), one address per ``CW`` columns (a 16-byte vector's start; coalesced per warp like the loads), columns
    past K clamped to the row's last vector (no address outside the weight)."""
    NC: tl.constexpr = NB * (128 // CW)
    k = tl.minimum((pid_k * KPS + i) * NB * 128 + tl.arange(0, NC) * CW, K - 16)  # [NC]
    l2_prefetch(pf_rows[:, None] + k[None, :])


@triton.jit
def _place(a, r: tl.constexpr, mrow):
    """``RA``: row ``r``'s chunk sums ``a [BN, NC, 1]`` summed -> ``[MP, BN]``, them at row ``r``, zeros elsewhere."""
    return tl.where((mrow == r)[:, None], tl.reshape(tl.sum(tl.sum(a, axis=2), axis=1), (1, a.shape[0])), 0.0)


@triton.jit
def _gemv_tile(x_ptr, w_ptr, sw_ptr, out_ptr, pid_n, pid_k, g, M: tl.constexpr, MP: tl.constexpr,
               N: tl.constexpr, K: tl.constexpr, G: tl.constexpr, SWK: tl.constexpr, KPS: tl.constexpr,
               NB: tl.constexpr, BLOCK_N: tl.constexpr, CW: tl.constexpr, OUT_N: tl.constexpr,
               COL0: tl.constexpr, SPLIT: tl.constexpr, F32_OUT: tl.constexpr, PF: tl.constexpr = 0,
               XL: tl.constexpr = 0, RA: tl.constexpr = 0):
    """The body of :func:`fp8_gemv_kernel` for tile ``(pid_n, pid_k, g)`` of a weight with ``N`` rows (per
    group), written at columns ``COL0 + n`` of output rows ``OUT_N`` wide (``F32_OUT``: fp32 partials even
    without a split)."""

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_ok = offs_n < N
    wrow = g * N + offs_n
    w_rows = w_ptr + wrow.to(tl.int64) * K  # [BN]
    sw_rows = sw_ptr + (wrow // 128) * SWK  # [BN]
    # a step's K range as NC chunks of CW columns. One row (CW 16): one 16-byte load per thread and chunk, so the
    # 16-column sums stay in registers and per-chunk partial sums cross the K loop, reduced once at the end (no
    # cross-lane reduction per step). Several rows (CW 128, 128-wide blocks), each step's partial reduced at once:
    # ptxas sm_90a at 4 rows, wo_b: 96 registers, no spills; 16-column chunks there took 164 registers with
    # per-row chunk sums held as one [MP, ...] tensor, 96 and 8 B of spills without. RA: one [BN, NC, 1] accumulator
    # per row instead (separate tensors in the tile's layout: no layout conversion, no spill at 8 rows).
    CPB: tl.constexpr = 128 // CW  # chunks per 128-wide K block
    NC: tl.constexpr = NB * CPB
    ch = tl.arange(0, NC)  # [NC] chunk c covers K block c // CPB, columns (c % CPB) * CW ...
    cc = tl.arange(0, CW)
    mrow = tl.arange(0, MP)
    if M == 1:  # [BN, NC, 1]: the weight tile's layout, so the loop carries it without conversions
        acc = tl.zeros((BLOCK_N, NC, 1), tl.float32)
    elif RA:  # per-row chunk sums [BN, NC, 1] in the weight tile's layout (rows 0-7), the chunks summed after the loop
        tl.static_assert(M <= 8, "RA keeps one accumulator per row: at most 8 rows")
        acc = tl.zeros((BLOCK_N, NC, 1), tl.float32)
        a1, a2, a3, a4, a5, a6, a7 = acc, acc, acc, acc, acc, acc, acc
    else:  # several rows: [MP, BN], each step's partial reduced at once (per-chunk sums per row cost registers)
        acc = tl.zeros((MP, BLOCK_N), tl.float32)
    pf_rows = w_ptr + (g * N + tl.minimum(offs_n, N - 1)).to(tl.int64) * K  # [BN] rows past N: the last one
    if PF > 0:  # the first steps' lines (the loop asks PF steps ahead of each step it loads)
        for j in tl.static_range(1, PF):
            _prefetch_step(pf_rows, pid_k, min(j, KPS - 1), KPS, NB, K, CW)
    for i in range(KPS):
        if PF > 0:
            _prefetch_step(pf_rows, pid_k, tl.minimum(i + PF, KPS - 1), KPS, NB, K, CW)
        kb0 = (pid_k * KPS + i) * NB  # first 128-wide K block of this step
        k = (kb0 + ch // CPB)[:, None] * 128 + ((ch % CPB) * CW)[:, None] + cc[None, :]  # [NC, CW]
        k_ok = k < K
        w = tl.load(w_rows[:, None, None] + k[None, :, :], mask=n_ok[:, None, None] & k_ok[None, :, :],
                    other=0.0).to(tl.float32)  # [BN, NC, CW]
        kb = kb0 + ch // CPB  # [NC]
        sw = e8m0(tl.load(sw_rows[:, None] + kb[None, :], mask=n_ok[:, None] & (kb * 128 < K)[None, :],
                          other=127))  # [BN, NC]: the weight block's scale, per chunk
        for m in tl.static_range(M):
            if XL:  # [BN, NC, CW]: each thread loads the activations of its own weights (L1 hits), no relayout
                xr = tl.load(x_ptr + (m * G + g) * K + k[None, :, :] + tl.zeros((BLOCK_N, 1, 1), tl.int32),
                             mask=k_ok[None, :, :], other=0.0).to(tl.float32)
            else:
                xr = tl.load(x_ptr + (m * G + g) * K + k, mask=k_ok, other=0.0).to(tl.float32)[None, :, :]  # [NC, CW]
            # [BN, NC, 1]: exact products summed per chunk, scaled by the block's power of two
            part = tl.sum(w * xr, axis=2, keep_dims=True) * sw[:, :, None]
            if M == 1:
                acc += part
            elif RA:
                if m == 0:
                    acc += part
                elif m == 1:
                    a1 += part
                elif m == 2:
                    a2 += part
                elif m == 3:
                    a3 += part
                elif m == 4:
                    a4 += part
                elif m == 5:
                    a5 += part
                elif m == 6:
                    a6 += part
                else:
                    a7 += part
            else:
                acc = tl.where((mrow == m)[:, None], acc + tl.sum(tl.sum(part, axis=2), axis=1)[None, :], acc)
    if M == 1:
        acc = tl.reshape(tl.sum(tl.sum(acc, axis=2), axis=1), (1, BLOCK_N))  # [1, BN]
    elif RA:  # [MP, BN]: row m's chunk sums summed, placed at row m
        acc = _place(acc, 0, mrow) + _place(a1, 1, mrow) + _place(a2, 2, mrow) + _place(a3, 3, mrow)
        if M > 4:
            acc += _place(a4, 4, mrow) + _place(a5, 5, mrow) + _place(a6, 6, mrow) + _place(a7, 7, mrow)
    out_rows = (mrow.to(tl.int64) * G + g) * OUT_N + COL0  # [MP]
    mask = (mrow < M)[:, None] & n_ok[None, :]
    if SPLIT == 1 and not F32_OUT:
        tl.store(out_ptr + out_rows[:, None] + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        part = pid_k.to(tl.int64) * M * G * OUT_N
        tl.store(out_ptr + part + out_rows[:, None] + offs_n[None, :], acc, mask=mask)
