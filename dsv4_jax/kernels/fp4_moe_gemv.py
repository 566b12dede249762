"""The FP4 routed experts at decode sizes: two GEMV kernels (no tensor cores) over the packed e2m1 weights.

At decode a touched expert sees one token, so the tiled kernels of :mod:`fp4_moe` (a 16-row ``tl.dot`` per block,
its weight operand rebuilt through shared memory) are bound by latency and per-element work, not by the weight
bytes. Here one program streams ``BN`` weight rows of one (token, expert) pair over the whole K range, ``NG``
32-column groups per step. The grid is (pairs, ``N / BN``): one pair per block row, the pairs as they come (block
``r`` is pair ``r``, its local expert id as it is: ids outside ``[0, E)`` belong to other devices and cost nothing;
stage 2 writes their rows as zeros, so the output is every pair's result as it stands).

Data layout, chosen so that the K loop has no shared memory and no barrier:

* weights: each step loads ``[BN, 4 NG]`` int32 words of the packed stack (a word is 8 nibbles, 8 consecutive
  columns: byte ``k`` holds columns ``2k`` (low nibble) and ``2k + 1``); :func:`common.e2m1_nibble` decodes nibble
  ``m`` to its e2m1 value times 2**-126 in 3 integer operations, and each group's scale byte gives the two powers
  of two (:func:`common.e2m1_factors`) that restore the weight, applied once to the group's sum.
* activations: quantized once per call, the tokens before stage 1 and ``h`` between the stages, each by one launch
  of a small kernel (:func:`act_words_triton`, one one-warp program per row and 128-wide block). Its XLA form
  :func:`act_words` (the tests' oracle) was 3 fusions per activation (reduce, broadcast, transpose): XLA's sm_90
  build of a one-token GEMV MoE call, made without a GPU (``scripts/count_launches.py``'s ``compile_for_h200``),
  has 5 kernels with this one where it had 9. On an H200 its 6 launches per 3-layer batch-1 step took 7.8 us
  (2026-12-01, ``docs/performance.md``). It is the model's one quantizer,
  ``quant.fp8_act_quant`` per 1x128 as the reference's ``act_quant``, its codes and scales bit for bit through
  :func:`common.act_quant_block` (which the mHC kernel's quantized row uses too). Stored as codes times 2**24
  and permuted within each K step so that the activations of nibble ``m`` of the step's ``4 NG`` words are
  consecutive floats: their ``[BN, 4 NG]`` loads (the same addresses in every row, L1 hits) take the weights'
  register layout. Products nibble x code are exact normal fp32 numbers (``[0.5, 6] * 2**-126`` times
  ``[2**-9, 448] * 2**24``), summed in fp32 per group; the group's weight and activation factors multiply the sum
  (exact powers of two).

The previous form quantized the activation inside every program in every K step (a cross-warp amax and a broadcast
of the codes through shared memory) and moved the scale bytes through shared memory: the sm_90a SASS of the gate/up
loop had 470 instructions and 16 barriers per step; this one has ~300 and none (``tests/test_kernels_sm90.py``
checks the plans compile without spills).

What bounds it now: instructions. Nsight Compute at 32 tokens (192 pairs, H200, 2026-12-02, ``scripts/probe_kernels.py
--op moe``): issue slots busy 77-82 %, the integer pipe 75 %, DRAM 18 %, 3.2 eligible warps per scheduler. The loop
spends ~4.8 instructions per weight element, 3 of them decoding it. Two pairs of one expert per program (each nibble
decoded once for both) measured slower (1,426 vs 1,183 us per 32-token call): it doubles the activation loads and
multiply-adds per decode. Fewer instructions need a two-nibbles-per-instruction decode (byte-permute tables), which
portable Triton does not express. At one token the bound is latency instead (Nsight Compute, H200, 2026-12-03,
the 256-column plan: gate/up 28.9 us at 1.93 TB/s, down 18.0 us at 1.51 TB/s, 0.6 issued warps per scheduler, half
the stall cycles on L1TEX scoreboards, ~22 of the 36 resident warps per SM). Triton pipelines no loads in a loop
without a dot (``num_stages`` changes nothing), and ptxas sinks a software prefetch of the next step's words next to
their use to stay near 64 registers; raising its cap kept them ahead but measured slower than simply running twice
the warps, which the decode plan now does (:func:`gemv_tiles`).

Same roundings and order contract as :mod:`fp4_moe` (its docstring): stage 1 writes
``h = bf16(wt * silu(min(g, L)) * clip(u, -L, L))`` with ``g, u`` rounded to bf16; ``h`` is quantized per 128-wide
block (:func:`act_words_triton`: the reference's codes and scales); stage 2 writes ``y = bf16(hq @ w2.T)``. Only the
fp32 summation order inside each dot differs from the reference.

Portable Triton (integer/fp32 arithmetic and plain loads, see :mod:`dsv4_jax.kernels.common`); tested under the
interpreter in CI and against the reference on an H200 (the activation kernel bit for bit at V4-Flash and V4-Pro
widths, ``tests/test_kernels_act_words.py``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from dsv4_jax.kernels import triton_call
from dsv4_jax.kernels.common import (
    act_quant_block,
    e2m1_factors,
    e2m1_nibble,
    l2_prefetch,
    pow2,
    round_bf16,
    swiglu_act,
)
from dsv4_jax.modeling.quant import fp8_act_quant


# ---------------------------------------------------------------------------------------------- activations
def act_words(x: jax.Array, ng: int) -> tuple[jax.Array, jax.Array]:
    """Rows ``x [R, K]`` -> ``(xa [R, K] fp32, xf [R, K/32] fp32)`` for kernels stepping ``ng`` 32-column groups at
    a time: the reference ``act_quant`` (1x128) codes times 2**24, and each group's factor ``2**(e - 24)`` that
    gives the values back (``e``: its 128-block's scale exponent). Exact: e4m3 codes times powers of two. Within
    each step's ``32 ng`` columns, column ``32 g + 8 i + m`` (group ``g``, word ``i``, nibble ``m``) is stored at
    ``4 ng m + 4 g + i``: the activations of nibble ``m`` of the step's ``4 ng`` words are consecutive, so a warp's
    load of them reads one or two cache lines (grouped by group instead, a warp read ``ng`` lines per load and the
    kernels ran 2x slower at 16 tokens: H200, 2026-11-30)."""
    R, K = x.shape
    q, s = fp8_act_quant(x, 128)  # [R, K/128, 128] on the e4m3 grid, [R, K/128, 1] powers of two
    xa = (q * np.float32(2.0**24)).reshape(R, K // (32 * ng), ng * 4, 8).swapaxes(-1, -2).reshape(R, K)
    xf = jnp.repeat(s[..., 0] * np.float32(2.0**-24), 4, axis=-1)  # [R, K/32]
    return xa, xf


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _act_words_kernel(x_ptr, xa_ptr, xf_ptr, K: tl.constexpr, NG: tl.constexpr, NB: tl.constexpr):
    """:func:`act_words` of ``NB`` 128-wide blocks of one row: row ``program_id(0)`` of ``x [R, K]`` (bf16 or fp32),
    blocks ``[NB * program_id(1), + NB)`` -> their codes times 2**24 at their permuted places in ``xa [R, K]`` and
    their factors ``2**(e - 24)`` (4 per block) in ``xf [R, K / 32]``.

    The reference's special values are kept (:func:`common.act_quant_block`)."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1) * NB + tl.arange(0, NB)  # [NB] the row's 128-wide blocks
    c = blk[:, None] * 128 + tl.arange(0, 128)[None, :]  # [NB, 128] columns
    q, e = act_quant_block(tl.load(x_ptr + row * K + c).to(tl.float32))  # [NB, 128] e4m3 codes, [NB] exponents
    S: tl.constexpr = 32 * NG  # columns per K step: column 32 g + 8 i + m of a step goes to 4 NG m + 4 g + i
    p = c - c % S + (c % 8) * (4 * NG) + (c % S) // 8
    tl.store(xa_ptr + row * K + p, q * 16777216.0)
    f = tl.broadcast_to((pow2(e) * 5.9604644775390625e-08)[:, None], (NB, 4))  # [NB, 4] 2**e * 2**-24 (inf, -0.0)
    tl.store(xf_ptr + row * (K // 32) + blk[:, None] * 4 + tl.arange(0, 4)[None, :], f)


@triton.jit
def _fetch(wp, ws, n, K: tl.constexpr, c0, NG: tl.constexpr):
    """One K step's weight bytes: rows ``n [BN]`` (int64) of the packed ``[*, K/2]`` stack, columns
    ``[c0, c0 + 32 NG)``, as int32 words ``[BN, 4 NG]`` (word ``j``: word ``j % 4`` of group ``j // 4``) and the
    groups' scale bytes ``[BN, NG]`` (int32). (Requesting the next step's bytes before a step's math, a register
    double buffer, measured the same on an H200: 86.6 vs 88.3 us per one-token MoE call, 659 vs 635 at 16 tokens.)"""
    j = tl.arange(0, 4 * NG)[None, :]
    w = tl.load(wp.to(tl.pointer_type(tl.int32)) + n[:, None] * (K // 8) + c0 // 8 + j)
    sc = tl.load(ws + n[:, None] * (K // 32) + c0 // 32 + tl.arange(0, NG)[None, :])
    return w, sc.to(tl.int32)


@triton.jit
def _prefetch(wp, n, K: tl.constexpr, c0, NG: tl.constexpr, PF: tl.constexpr):
    """``PF`` > 0 (CUDA only): ask L2 for the weight words of the K step ``PF`` steps after the one at ``c0`` (the
    last step where that lies past K), one 16-byte vector per thread as :func:`_fetch` will load them."""
    c1 = tl.minimum(c0 + PF * 32 * NG, K - 32 * NG)
    g = tl.arange(0, NG)[None, :] * 4  # [1, NG] each group's first word (a group's 4 words lie in one thread)
    l2_prefetch(wp.to(tl.pointer_type(tl.int32)) + n[:, None] * (K // 8) + c1 // 8 + g)


@triton.jit
def _group_sums(w, sc, c0, xa, xf, BN: tl.constexpr, NG: tl.constexpr):
    """One K step of one weight matrix (:func:`_fetch`'s words and scale bytes for columns ``[c0, c0 + 32 NG)``)
    against the activation row ``xa``/``xf`` (:func:`act_words` layout) -> ``[BN, NG]``: each group's sum of exact
    products times its weight and activation factors."""
    xo = xa + c0 + tl.arange(0, 4 * NG)[None, :] + tl.zeros((BN, 1), tl.int32)  # [BN, 4NG] nibble 0's activations
    p = e2m1_nibble(w, 0) * tl.load(xo)
    for m in tl.static_range(1, 8):
        p += e2m1_nibble(w, m) * tl.load(xo + 4 * NG * m)
    s = tl.sum(tl.reshape(p, (BN, NG, 4)), axis=2)  # [BN, NG]: a group's 4 words lie in one thread
    f1, f2 = e2m1_factors(sc)
    fx = tl.load(xf + c0 // 32 + tl.arange(0, NG)[None, :] + tl.zeros((BN, 1), tl.int32))
    return s * (f1 * fx) * f2


@triton.jit
def _gate_up_gemv(xa_ptr, xf_ptr, tok_ptr, wt_ptr, e_ptr, w1p, w1s, w3p, w3s, h_ptr, D: tl.constexpr,
                  I: tl.constexpr, LIMIT: tl.constexpr, BN: tl.constexpr, NG: tl.constexpr, E: tl.constexpr,
                  PF: tl.constexpr = 0):
    """h[b, n] for pair ``b = program_id(0)`` and its BN columns n: ``xa/xf`` the tokens (:func:`act_words`),
    ``tok/wt/e`` the pairs' token, routing weight and local expert id. ``PF`` > 0 (CUDA only): each step asks L2
    for the words ``PF`` steps ahead (:func:`_prefetch`)."""
    b = tl.program_id(0)
    ex = tl.load(e_ptr + b)
    if ex < 0 or ex >= E:  # another device's expert: no work (stage 2 writes its zeros)
        return
    n = ex.to(tl.int64) * I + tl.program_id(1) * BN + tl.arange(0, BN).to(tl.int64)  # [BN] rows of the [E*I, D]
    tok = tl.load(tok_ptr + b).to(tl.int64)
    xa = xa_ptr + tok * D
    xf = xf_ptr + tok * (D // 32)
    acc_g = tl.zeros((BN, NG), tl.float32)  # per-group partial sums, reduced over the groups after the K loop
    acc_u = tl.zeros((BN, NG), tl.float32)
    for j in tl.static_range(1, PF):  # the first steps' lines (the loop asks PF steps ahead of each step)
        _prefetch(w1p, n, D, 0, NG, j)
        _prefetch(w3p, n, D, 0, NG, j)
    for c0 in range(0, D, 32 * NG):
        if PF > 0:
            _prefetch(w1p, n, D, c0, NG, PF)
            _prefetch(w3p, n, D, c0, NG, PF)
        wg, sg = _fetch(w1p, w1s, n, D, c0, NG)
        wu, su = _fetch(w3p, w3s, n, D, c0, NG)
        acc_g += _group_sums(wg, sg, c0, xa, xf, BN, NG)
        acc_u += _group_sums(wu, su, c0, xa, xf, BN, NG)
    a = swiglu_act(tl.sum(acc_g, axis=1), tl.sum(acc_u, axis=1), tl.load(wt_ptr + b), LIMIT)  # [BN]
    col = tl.program_id(1) * BN + tl.arange(0, BN)
    tl.store(h_ptr + b.to(tl.int64) * I + col, a.to(h_ptr.dtype.element_ty))


@triton.jit
def _down_gemv(ha_ptr, hf_ptr, e_ptr, w2p, w2s, y_ptr, D: tl.constexpr, I: tl.constexpr, BN: tl.constexpr,
               NG: tl.constexpr, E: tl.constexpr, PF: tl.constexpr = 0):
    """y[b, n] = bf16(act_quant(h[b]) @ w2[n].T) for pair b and BN output columns; ``ha/hf``: stage 1's h
    (:func:`act_words`). Another device's pair gets zeros."""
    b = tl.program_id(0)
    col = tl.program_id(1) * BN + tl.arange(0, BN)
    ex = tl.load(e_ptr + b)
    if ex < 0 or ex >= E:
        tl.store(y_ptr + b.to(tl.int64) * D + col, tl.zeros((BN,), tl.float32).to(y_ptr.dtype.element_ty))
        return
    n = ex.to(tl.int64) * D + col.to(tl.int64)  # [BN] rows of the [E*D, I] stack
    ha = ha_ptr + b.to(tl.int64) * I
    hf = hf_ptr + b.to(tl.int64) * (I // 32)
    acc = tl.zeros((BN, NG), tl.float32)
    for j in tl.static_range(1, PF):
        _prefetch(w2p, n, I, 0, NG, j)
    for c0 in range(0, I, 32 * NG):
        if PF > 0:
            _prefetch(w2p, n, I, c0, NG, PF)
        w, sc = _fetch(w2p, w2s, n, I, c0, NG)
        acc += _group_sums(w, sc, c0, ha, hf, BN, NG)
    y = round_bf16(tl.sum(acc, axis=1))  # [BN]
    tl.store(y_ptr + b.to(tl.int64) * D + col, y.to(y_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------- plans, launchers
def gemv_tiles(target: str, D: int, I: int, n_pairs: int = 1) -> dict:
    """Tile sizes of the GEMV kernels (one place): ``BN`` weight rows per program, ``NG`` 32-column groups per K step,
    ``BN * NG / 32`` warps: one 16-byte word vector per thread and matrix, the tile Triton lays out without shared
    memory (larger tiles per warp brought barriers back into the K loop: sm_90a SASS). ``n_pairs``: the call's
    (token, expert) pairs, which choose the rows per program."""
    if target == "cpu":  # the interpreter: few, wide programs
        return dict(BN=min(64, I, D), NG=4, num_warps=8, num_stages=1)
    # Measured on an H200 (V4-Flash MoE call, scripts/bench_moe.py --variants, 2026-11-30; docs/performance.md):
    # NG 8 with 4 warps beat NG 4 with 2 warps (86.6 vs 118.8 us at one token, 1,189 vs 1,391 at 32 tokens); 32
    # rows per program from 32 pairs on (the rows the previous form of these kernels measured best there). Below
    # 32 pairs, 512-column steps (NG 16, 8 warps) where D and I allow: twice the warps per SM for the loads' latency
    # (one token: 51.9 vs 57.5 us per MoE call, 4 tokens: 142.6 vs 149.4; at 16 and 32 tokens, 32 rows per program,
    # 2 % and 1 % slower: H200, 2026-12-03, scripts/probe_kernels.py --op moe). Below 32 pairs 8 rows per program
    # (4 warps, twice the programs) rather than 16 (8 warps): one token 94.6-107.2 vs 106.6-119.8 us per MoE call,
    # the 3-layer batch-1 decode step 0.848-0.857 vs 0.860-0.867 ms in a loop, each pair of runs alternated (H200,
    # 2026-12-06, bench_moe.py / bench_decode.py --variants DSV4_MOE_TILE=BN=8,num_warps=4). Two 16-byte vectors
    # per thread and matrix (BN 8, NG 32, 4 warps) measured the same in that step (H100, 2026-12-07: 1.020 ms vs
    # 1.017 / 1.007 for the runs around it).
    bn = 32 if n_pairs >= 32 else 8
    ng = 16 if n_pairs < 32 and D % 512 == 0 and I % 512 == 0 else 8
    return dict(BN=bn, NG=ng, num_warps=bn * ng // 32, num_stages=1)


def check_gemv_shapes(D: int, I: int, t: dict) -> None:
    step = 32 * t["NG"]
    if D % step or I % step or I % t["BN"] or D % t["BN"]:
        raise ValueError(f"fp4_moe (GEMV): expert shape D={D}, I={I} is not tiled by {t} (need D and I multiples of "
                         f"32*NG={step} and of BN={t['BN']})")


def _kw(t: dict, E: int) -> dict:
    reg = {"maxnreg": t["maxnreg"]} if t.get("maxnreg") else {}  # ptxas's register cap (a launch option)
    return dict(BN=t["BN"], NG=t["NG"], E=E, num_warps=t["num_warps"], num_stages=t["num_stages"], PF=t.get("PF", 0),
                **reg)


def act_plan(target: str, K: int) -> dict:
    """Blocks per program of :func:`_act_words_kernel` (``NB``, one warp per block): one on GPUs, the most programs
    for the least latency at decode sizes (R rows x K / 128 one-warp programs, 32 for one V4-Flash token); up to 8
    under the interpreter, whose cost is per program."""
    nb = math.gcd(K // 128, 8) if target == "cpu" else 1
    return dict(NB=nb, num_warps=nb)


def _check_act(K: int, ng: int, nb: int) -> None:
    if K % 128 or K % (32 * ng) or (K // 128) % nb:
        raise ValueError(f"act_words: K={K} is not tiled by 128-wide blocks ({nb} per program) and K steps of "
                         f"32*NG={32 * ng} columns")


def act_words_triton(x: jax.Array, ng: int, p: dict | None = None) -> tuple[jax.Array, jax.Array]:
    """:func:`act_words` (the same ``xa [R, K]``, ``xf [R, K/32]`` fp32 arrays, bit for bit) in one kernel launch;
    ``x [R, K]`` bf16 or fp32; ``p``: :func:`act_plan` (default: the GPU's)."""
    R, K = x.shape
    p = p or act_plan("gpu", K)
    _check_act(K, ng, p["NB"])
    out = (jax.ShapeDtypeStruct((R, K), jnp.float32), jax.ShapeDtypeStruct((R, K // 32), jnp.float32))
    if R == 0:
        return jnp.zeros(out[0].shape, jnp.float32), jnp.zeros(out[1].shape, jnp.float32)
    xa, xf = triton_call(x, kernel=_act_words_kernel, out_shape=out, grid=(R, K // (128 * p["NB"])), K=K, NG=ng,
                         NB=p["NB"], num_warps=p["num_warps"], num_stages=1)
    return xa, xf


def act_words_torch(x, ng: int, p: dict | None = None):
    """:func:`_act_words_kernel` on a torch tensor ``x [R, K]`` (the interpreter tests) -> ``(xa, xf)`` fp32 torch
    tensors; ``p``: :func:`act_plan` (default: the interpreter's)."""
    import torch

    R, K = x.shape
    p = p or act_plan("cpu", K)
    _check_act(K, ng, p["NB"])
    xa = torch.full((R, K), float("nan"), dtype=torch.float32, device=x.device)
    xf = torch.full((R, K // 32), float("nan"), dtype=torch.float32, device=x.device)
    _act_words_kernel[(R, K // (128 * p["NB"]))](x, xa, xf, K=K, NG=ng, NB=p["NB"], num_warps=p["num_warps"],
                                                   num_stages=1)
    return xa, xf


def launch_gemv_jax(x, tok, wt, e, w1, w2, w3, limit: float, t: dict) -> jax.Array:
    """Both GEMV kernels: ``x [T, D]`` the raw tokens, ``tok [R]``, ``wt [R]``, ``e [R]`` the pairs' token, routing
    weight and local expert id (outside ``[0, E)``: another device's) -> ``y [R, D]`` bf16, zeros for other devices'
    pairs. The tokens are quantized before stage 1 and ``h`` between the stages, one launch each
    (:func:`act_words_triton`)."""
    E, I, D2 = w1.packed.shape
    D, R = 2 * D2, tok.shape[0]
    xa, xf = act_words_triton(x, t["NG"])
    h = triton_call(xa, xf, tok, wt, e, w1.packed, w1.scale, w3.packed, w3.scale, kernel=_gate_up_gemv,
                    out_shape=jax.ShapeDtypeStruct((R, I), jnp.bfloat16), grid=(R, I // t["BN"]), D=D, I=I,
                    LIMIT=limit, **_kw(t, E))
    ha, hf = act_words_triton(h, t["NG"])  # rows of other devices' pairs are unwritten here and never read
    return triton_call(ha, hf, e, w2.packed, w2.scale, kernel=_down_gemv,
                       out_shape=jax.ShapeDtypeStruct((R, D), jnp.bfloat16), grid=(R, D // t["BN"]), D=D, I=I,
                       **_kw(t, E))


def launch_gemv_torch(x, tok, wt, e, w1, w2, w3, limit: float, t: dict):
    """The same kernels on torch tensors (the interpreter tests; the activations through :func:`act_words_torch`,
    the jax path's kernel); ``w*`` are ``(packed, scale)`` uint8 tensors. Returns ``(h [R, I], y [R, D])`` fp32; rows
    of other devices' pairs keep the poison ``nan`` in ``h`` and are zeros in ``y``."""
    import torch

    E, I, D2 = w1[0].shape
    D, R = 2 * D2, tok.shape[0]
    h = torch.full((R, I), float("nan"), dtype=torch.float32, device=x.device)
    y = torch.full((R, D), float("nan"), dtype=torch.float32, device=x.device)
    xa, xf = act_words_torch(x, t["NG"])
    _gate_up_gemv[(R, I // t["BN"])](xa, xf, tok, wt, e, *w1, *w3, h, D=D, I=I, LIMIT=limit, **_kw(t, E))
    ha, hf = act_words_torch(torch.nan_to_num(h), t["NG"])
    _down_gemv[(R, D // t["BN"])](ha, hf, e, *w2, y, D=D, I=I, **_kw(t, E))
    return h, y
