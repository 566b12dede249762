"""Prefill (many rows) FP8 block-scaled GEMM with the weight as the tensor-core A operand, dequantized in registers.

:func:`dsv4_jax.kernels.fp8_linear.fp8_linear` and :func:`~dsv4_jax.kernels.fp8_linear.grouped_proj` send
:data:`PREFILL_MIN_ROWS` rows and more here (the decode rows keep their GEMV / split-K kernels). Same contract as
theirs:

* ``out[m, g, n] = sum_k x[m, g, k] * W[g*N + n, k] * sw(g*N + n, k)`` with ``x`` the bf16 *values* of the operand:
  for the FP8 linear the values of the reference's 1x128 activation quantization (``quantize_act``: e4m3 code x
  power-of-two scale, exact in bf16), for ``wo_a`` its bf16 input. W e4m3 ``[G*N, K]``, sw the 128x128 e8m0 block
  scales. Every product is exact (as in the reference, whose ``fp8_gemm`` forms code x code and scales each 128-wide
  block's sum by ``sx * sw``, both powers of two); the products are summed in fp32 in another order, so outputs agree
  with the reference within one ulp of ``out_dtype`` (the tests' bound: ``K 2**-24 sum|terms|`` before rounding).

Why this shape (issue 11: prefill FP8 GEMM at >= 80 % of XLA's plain e4m3 matmul): the former tiled kernel fed both
operands to the tensor cores as bf16 converted from e4m3 in registers, so Triton wrote the converted weight tile back
to shared memory before every wgmma (``tl.dot``'s B operand must live there) and re-scaled an fp32 accumulator per
128-wide K block: 212-357 TFLOP/s on an H200 (2026-11-29). Here the product is computed transposed, ``acc[BN, BM] =
deq(W)[BN, BK] @ x[BM, BK].T``: the weight, decoded and scaled in registers, is the A operand, which Hopper's wgmma
reads from registers; the activation tile (bf16, as stored) is the B operand, streamed to shared memory by the
pipeliner untouched; one fp32 accumulator runs over all of K (the scale is applied to the exact weight values, not
per block to partial sums). The e4m3 x e4m3 tensor-core dot stays out: Hopper sums a block's products in a narrower
adder, which the golden criteria do not tolerate (see ``fp8_linear``'s docstring).

Measured on an H200 (2026-12-02, V4-Flash shapes at 2048 rows, ``bench_kernels.py --tune``): ``wq_b`` 463 us (297
TFLOP/s), ``wo_b`` 421 (326), ``wo_a`` 392 (351), ``shared_w1`` 168 (205), ``wq_a`` 164 (105: 128 tiles, one per SM):
1.3-1.9x the former kernel, 0.67-1.2x the time of XLA's bf16 matmul on a bf16 copy of the weight (430-520 TFLOP/s at the
large shapes) and 0.10-0.35 of XLA's e4m3 rate at 8192^3 (1,008 TFLOP/s). An exact kernel is bounded by the bf16
tensor-core rate, about half the e4m3 one: the issue's 80 %-of-e4m3 target needs e4m3 dots, which the golden criteria
exclude. A variant in the reference's order (fp16 copies of both operands' codes, each 128-wide block promoted with ``sw
* sx``) measured 1.3-1.9x slower: an FMA pair per accumulator element per block and the scale loads in the K loop cost
more than decoding the weight.

:func:`split_plan` splits K for few rows (decode batches, fp32 partials summed by the caller): 5-17 % faster than the
decode kernel at 16 and 32 rows on 4 of 5 shapes, slower on ``wo_a``; not yet the default (its effect on a decode step
is unmeasured). Tiles come from :func:`prefill_plan` per architecture; the grid sweeps ``GROUP_N`` weight tiles across
every row tile before moving on, so a weight tile is read from HBM about once and the activation stays in L2.

Portability: plain ``tl.load``/``tl.dot`` on bf16, nothing vendor-specific; e4m3 decoding needs fp8 conversions
(sm89+, gfx942/gfx950). On AMD the A-from-registers form is MFMA's native one. Not run on ROCm.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp

from dsv4_jax.kernels import SM_COUNT, TILED_MIN_ROWS, arch, next_pow2, split_output, sum_splits, triton_call
from dsv4_jax.modeling.quant import Fp8Tensor

try:
    import triton
    import triton.language as tl

    from dsv4_jax.kernels.common import e8m0
except ImportError:  # pragma: no cover - exercised only without the triton extra
    triton = tl = None

PREFILL_MIN_ROWS = 65  # from this many rows on the FP8 linear and wo_a take this kernel


if triton is not None:
    @triton.jit
    def fp8_wx_kernel(w_ptr, sw_ptr, x_ptr, M, out_ptr,  # jax-triton: outputs follow the inputs
                      N: tl.constexpr, K: tl.constexpr, G: tl.constexpr, SWK: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_M: tl.constexpr, BK: tl.constexpr, GROUP_N: tl.constexpr, SPLIT: tl.constexpr = 1,
                      KCH: tl.constexpr = 0, INTERPRET: tl.constexpr = False):
        """Tile ``out[BLOCK_M rows, g, BLOCK_N cols]`` of group ``g`` (grid ``(n tiles x m tiles, G, SPLIT)``).

        w e4m3 ``[G*N, K]``, sw uint8 e8m0 ``[ceil(G*N/128), SWK]``, x bf16 values ``[M, G, K]``, out ``[M, G, N]``,
        or with ``SPLIT > 1`` fp32 partials ``[SPLIT, M, G, N]`` over K chunks of ``KCH`` columns (few rows: enough
        programs to stream the weight; summed by the caller in a fixed order). Shapes other than ``M`` are
        compile-time constants (jax-triton passes scalars without divisibility hints; with them the rows are known
        16-byte aligned and the loads pipeline)."""
        pid = tl.program_id(0)
        g = tl.program_id(1)
        ks = tl.program_id(2)
        num_n: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
        num_m = tl.cdiv(M, BLOCK_M)
        width = GROUP_N * num_m  # swizzle: GROUP_N weight tiles sweep all row tiles together
        first_n = (pid // width) * GROUP_N
        cols = tl.minimum(num_n - first_n, GROUP_N)
        pid_n = first_n + (pid % width) % cols
        pid_m = (pid % width) // cols

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        offs_k = tl.arange(0, BK)
        n_ok = offs_n < N
        m_ok = offs_m < M
        wrow = g * N + offs_n
        w_rows = w_ptr + wrow.to(tl.int64) * K  # [BN]
        sw_rows = sw_ptr + (wrow // 128) * SWK  # [BN]
        x_rows = x_ptr + (offs_m.to(tl.int64) * G + g) * K  # [BM]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        KC: tl.constexpr = K if SPLIT == 1 else KCH
        for kc in range(0, KC, BK):
            k0 = ks * KC + kc
            k = k0 + offs_k  # [BK]
            k_ok = k < K
            wt = tl.load(w_rows[:, None] + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BN, BK]
            xt = tl.load(x_rows[:, None] + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
            sw = e8m0(tl.load(sw_rows + k0 // 128, mask=n_ok & (k0 < K), other=127))  # [BN]: one block per step
            wb = (wt.to(tl.float32) * sw[:, None]).to(tl.bfloat16)  # exact: e4m3 x 2**e fits bf16
            if INTERPRET:  # Triton 3.6's interpreter multiplies bf16 dot operands as raw integers: same products
                acc = tl.dot(wb.to(tl.float32), tl.trans(xt.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(wb, tl.trans(xt), acc)  # [BN, BM]: bf16 x bf16 -> fp32, A from registers
        out = tl.trans(acc).to(out_ptr.dtype.element_ty)  # [BM, BN]
        out_rows = (ks.to(tl.int64) * M + offs_m) * G * N + g * N  # [BM]
        tl.store(out_ptr + out_rows[:, None] + offs_n[None, :], out, mask=m_ok[:, None] & n_ok[None, :])


def prefill_plan(M: int, N: int, K: int, G: int = 1, target: str = "sm90", sms: int = 132) -> dict:
    """Tile sizes and launch options of :func:`fp8_wx_kernel` for ``M`` rows (per architecture); ``WX`` marks the
    plan as this kernel's for :func:`dsv4_jax.kernels.fp8_linear.plan`'s callers.

    ``BK`` divides 128 so that one weight scale block covers a step. sm90 (tuned on an H200 at V4-Flash shapes, 2048
    rows, ``bench_kernels.py --tune``): 128 weight rows (two warpgroups of 64, the wgmma M) x 256 activation rows
    in 64-wide K steps, 3 stages (8 KB of e4m3 weight + 32 KB of bf16 activation per stage), unless that leaves most
    SMs without a tile (``wq_a`` at 2K rows: 64 tiles), then 128 activation rows in 4 stages. gfx950: 128 x 128 in 3
    stages (its 160 KB of LDS; untimed)."""
    if target == "cpu":  # the interpreter: few programs, two K steps per scale block as on the GPUs
        return dict(WX=True, BLOCK_N=64, BLOCK_M=64, BK=64, GROUP_N=2, num_warps=4, num_stages=1)
    wide = target == "sm90" and math.ceil(N / 128) * G * math.ceil(M / 256) >= 0.9 * sms
    return dict(WX=True, BLOCK_N=128, BLOCK_M=256 if wide else 128, BK=64, GROUP_N=8, num_warps=8,
                num_stages=3 if wide or target != "sm90" else 4)


def split_plan(M: int, N: int, K: int, G: int = 1, sms: int = 132, block_n: int = 128, per_sm: float = 2.0,
               num_warps: int = 8, num_stages: int = 4) -> dict:
    """A plan for few rows (decode batches up to 64): row tiles of ``min(64, max(16, next_pow2(M)))`` activation
    rows (the wgmma N), ``block_n`` weight rows, and K split in 128-column multiples until about ``per_sm`` programs
    per SM stream the weight (fp32 partials, summed by the caller)."""
    block_m = min(64, max(16, next_pow2(M)))
    n_kb = math.ceil(K / 128)
    tiles = math.ceil(N / block_n) * G * math.ceil(M / block_m)
    split = max(1, min(n_kb, round(per_sm * sms / tiles)))
    kch = 128 * math.ceil(n_kb / split)
    return dict(WX=True, BLOCK_N=block_n, BLOCK_M=block_m, BK=64, GROUP_N=8, SPLIT=math.ceil(K / kch), KCH=kch,
                num_warps=num_warps, num_stages=num_stages)


def grid(M: int, N: int, G: int, p: dict) -> tuple[int, int, int]:
    return (math.ceil(N / p["BLOCK_N"]) * math.ceil(M / p["BLOCK_M"]), G, p.get("SPLIT", 1))


def _meta(N: int, K: int, G: int, p: dict) -> dict:
    p = {k: v for k, v in p.items() if k != "WX"}
    split, kch = p.get("SPLIT", 1), p.get("KCH", 0)
    if 128 % p["BK"] or (split > 1 and (kch % 128 or split * kch < K or (split - 1) * kch >= K)):
        raise ValueError(f"fp8 prefill plan {p} for K={K}: BK must divide the 128-wide scale block, and a split's "
                         "K chunks (KCH) must be whole scale blocks, cover K and none be empty")
    return dict(N=N, K=K, G=G, SWK=math.ceil(K / 128), **{"SPLIT": 1, "KCH": 0, **p})


def fp8_wx(xv: jax.Array, w: Fp8Tensor, out_dtype, p: dict | None = None) -> jax.Array:
    """``xv [M, G, K]`` bf16 values x ``w`` e4m3 ``[G*N, K]`` (128x128 e8m0 scales) -> ``[M, G, N]`` in ``out_dtype``
    through :func:`fp8_wx_kernel` (jax-triton or XLA's Triton route, as :func:`dsv4_jax.kernels.triton_call`)."""
    M, G, K = xv.shape
    N = w.q.shape[0] // G
    target = arch()
    p = p or prefill_plan(M, N, K, G, target, SM_COUNT[target])
    split = p.get("SPLIT", 1)
    out_t = jax.ShapeDtypeStruct(*split_output(split, (M, G, N), out_dtype, jnp.float32))
    y = triton_call(w.q, w.scale, xv.astype(jnp.bfloat16), M, kernel=fp8_wx_kernel, out_shape=out_t,
                    grid=grid(M, N, G, p), tiled=M >= TILED_MIN_ROWS, **_meta(N, K, G, p))
    return sum_splits(y, split, out_dtype)


def run_torch(xv, wq, ws, G: int, out_dtype, p: dict):
    """Launch :func:`fp8_wx_kernel` on torch tensors (CI: under ``TRITON_INTERPRET=1``): ``xv [M, G, K]`` bf16 values,
    wq e4m3 ``[G*N, K]``, ws uint8 scales -> ``[M, G, N]`` in ``out_dtype`` (a torch dtype)."""
    import torch

    M, _, K = xv.shape
    N = wq.shape[0] // G
    split = p.get("SPLIT", 1)
    shape, dt = split_output(split, (M, G, N), out_dtype, torch.float32)
    out = torch.full(shape, float("nan"), dtype=dt, device=xv.device)
    fp8_wx_kernel[grid(M, N, G, p)](wq, ws, xv, M, out, INTERPRET=os.environ.get("TRITON_INTERPRET") == "1",
                                    **_meta(N, K, G, p))
    return sum_splits(out, split, out_dtype)
