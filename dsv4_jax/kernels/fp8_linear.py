"""FP8 block-scaled linear ``y = x @ W.T`` (spec 3.4) and ``wo_a``'s grouped bf16 projection, in Triton.

Public functions (the model calls only these):

* :func:`fp8_linear` ``x [..., K] -> [..., N]``: W e4m3 ``[N, K]`` + 128x128 e8m0 scales, the activation quantized
  per 1x128 block (:func:`dsv4_jax.modeling.quant.quantize_act`), ``acc += dot(xq_blk, wq_blk) * sx * sw`` in fp32
  per 128-wide K block (the promotion of the official ``fp8_gemm``), rounded once to ``out_dtype``.
* :func:`grouped_proj` ``o [..., G, d] -> [..., G, R]``: ``einsum('...gd,grd->...gr', o, wo_a)`` with wo_a e4m3
  ``[G*R, d]`` dequantized to bf16 in registers (exact: e4m3 x 2**e fits bf16), bf16 x bf16 -> fp32, bf16 out; no
  activation quantization (spec 6: the reference uses convert.py's bf16 copy of wo_a).

``*_reference`` are the XLA recipes (the spec, the CPU path: bit for bit what the model always computed).

Numerics contract: the kernels form the same products as the reference (every operand is exact) and sum them in
fp32 in another order, so results agree to ~1e-6 relative before the final rounding, i.e. within one ulp of
``out_dtype`` after it. The per-block dot runs on bf16 copies of the e4m3 codes (exact) with fp32
accumulation. An e4m3 x e4m3 tensor-core dot (plan key ``FP8_DOT=True``, for benchmarks) would be twice the dot rate
but Hopper sums each 128-wide block with a narrower adder (as the official TileLang GEMM on GPUs does, hence its
per-128 promotion): on the golden data that alone breaks the layer-isolated criterion (simulated under the
interpreter, tests/triton_shim.py), while the exact bf16 dot matches the reference; decode is bound by the weight
bytes, not the dot, so exactness costs nothing there. The GPU tests allow one bf16 ulp.
Results are deterministic run to run: split-K partials go to an fp32 workspace ``[S, M, N]`` reduced by XLA in a
fixed order (no atomics).

Kernels, by row count (:func:`plan`, per architecture, :func:`dsv4_jax.kernels.arch`): up to ``GEMV_ROWS`` the
tensor-core-free :func:`fp8_gemv_kernel` (in :mod:`dsv4_jax.kernels.fp8_gemv`, with its two-weight form); up to 64
:func:`fp8_gemm_kernel` (grid ``(m-n tiles, K splits, groups)``, a 16..64-row tile, 64-wide N tiles, K split so that
about two programs per SM stream the weight); from ``PREFILL_MIN_ROWS`` on :mod:`dsv4_jax.kernels.fp8_prefill` (the
weight decoded in registers as the tensor cores' A operand, 128-row weight tiles swept across the row tiles).

Portability / ROCm: plain ``tl.load``/``tl.dot``, no inline PTX. ``tl.dot`` on e4m3 x e4m3 needs Hopper/Ada (sm89+)
or CDNA3+ (whose native FP8 is the ``fnuz`` variant; OCP e4m3 needs gfx950): on other targets (Ampere, MI250,
MI300X) the activation would have to be dequantized to bf16 like the grouped path; that switch is not written:
there ``kernels="auto"`` keeps the XLA FP8 linear (``"triton"`` raises) while the bf16 grouped projection still
uses its kernel. None of this has been run on ROCm. ``tl.dot_scaled`` (native scaled FP8 on gfx950) is not used
here: the register path is the only one, everywhere. Status: the GPU tests pass on an H200 and the golden criteria
hold with these kernels (``docs/performance.md``); the per-device path under a multi-GPU mesh
(:mod:`dsv4_jax.kernels.on_mesh`) is tested on CPU devices with the reference inside, not yet on GPUs.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp

from dsv4_jax.kernels import (
    SM_COUNT,
    TILED_MIN_ROWS,
    arch,
    check_prefetch,
    env_tiles,
    fp8_dot_supported,
    next_pow2,
    single_device,
    split_output,
    sum_splits,
    triton_call,
    use_triton,
)
from dsv4_jax.kernels.fp8_prefill import PREFILL_MIN_ROWS, fp8_wx, prefill_plan, split_plan
from dsv4_jax.kernels.on_mesh import grouped_on_mesh, linear_on_mesh, pair_on_mesh
from dsv4_jax.modeling.quant import (
    Fp8Tensor,
    QuantAct,
    SplitSum,
    dequant,
    dot_f32,
    linear_reference,
    quantize_act,
)

try:  # the model imports this module; triton is optional (kernels="reference" needs none of it)
    import triton
    import triton.language as tl

    from dsv4_jax.kernels.common import e8m0
    from dsv4_jax.kernels.fp8_gemv import fp8_gemv2_kernel, fp8_gemv_kernel
except ImportError:  # pragma: no cover - exercised only without the triton extra
    triton = tl = None

QBLOCK = 128  # weight scale block (128x128) and activation quantization block (1x128)


# ---------------------------------------------------------------------------------------------- references
def fp8_linear_reference(x: jax.Array, w: Fp8Tensor, out_dtype, xq: QuantAct | jax.Array | None = None) -> jax.Array:
    """The reference FP8 linear with the activation simulation on: ``quant.linear_reference``."""
    return linear_reference(x, w, out_dtype, True, xq)


def grouped_proj_reference(o: jax.Array, w: Fp8Tensor, out_dtype) -> jax.Array:
    """``o [..., G, d]`` x wo_a ``[G*R, d]`` -> ``[..., G, R]``: bf16 copy of wo_a, fp32-accumulated einsum."""
    G, d = o.shape[-2:]
    wb = dequant(w).astype(out_dtype).reshape(G, -1, d)  # exact: convert.py's bf16 copy (in bf16 numerics)
    return dot_f32(o, wb, "...gd,grd->...gr").astype(out_dtype)


# ---------------------------------------------------------------------------------------------- kernel
if triton is not None:
    @triton.jit
    def fp8_gemm_kernel(x_ptr, sx_ptr, w_ptr, sw_ptr, M, out_ptr,  # jax-triton: outputs follow the inputs
                        N: tl.constexpr, K: tl.constexpr, G: tl.constexpr, KB: tl.constexpr, SWK: tl.constexpr,
                        X_FP8: tl.constexpr, SPLIT: tl.constexpr, KPS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, INTERPRET: tl.constexpr = False,
                        FP8_DOT: tl.constexpr = False):
        """One ``[BLOCK_M, BLOCK_N]`` output tile of group ``g`` over its share of the K blocks.

        x ``[M, G, K]`` (e4m3 codes when X_FP8 with fp32 scales sx ``[M, G, KB]``, else bf16), w e4m3 ``[G*N, K]`` with
        e8m0 scales ``[ceil(G*N/128), SWK]``, out ``[M, G, N]`` (``[SPLIT, M, G, N]`` fp32 partials when SPLIT > 1).
        Shapes other than M are compile-time constants: jax-triton passes scalar arguments without divisibility
        hints, and without them the e4m3 rows could not be loaded 16 bytes at a time nor pipelined (cp.async).
        """
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        g = tl.program_id(2)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * num_n  # swizzle: GROUP_M row tiles sweep the N tiles together (weight tiles stay in L2)
        first_m = (pid // width) * GROUP_M
        rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % rows
        pid_n = (pid % width) // rows

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, 128)
        m_ok = offs_m < M
        n_ok = offs_n < N
        wrow = g * N + offs_n  # [BN] weight rows
        x_rows = x_ptr + (offs_m.to(tl.int64) * G + g) * K  # [BM]
        w_rows = w_ptr + wrow.to(tl.int64) * K  # [BN]
        sw_rows = sw_ptr + (wrow // 128) * SWK  # [BN]

        kb0 = pid_k * KPS  # this program's K blocks: [kb0, kb0 + KPS), clipped to K (a constexpr trip count)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(KPS):
            kb = kb0 + i
            k = kb * 128 + offs_k  # [128]
            k_ok = k < K  # also false for every k of a block past the end of K
            kb_ok = kb * 128 < K
            xt = tl.load(x_rows[:, None] + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BM,128]
            wt = tl.load(w_rows[:, None] + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BN,128]
            sw = e8m0(tl.load(sw_rows + kb, mask=n_ok & kb_ok, other=127))  # [BN]
            if X_FP8:
                sx = tl.load(sx_ptr + (offs_m * G + g) * KB + kb, mask=m_ok & kb_ok, other=0.0)  # [BM]
                if FP8_DOT:  # e4m3 x e4m3 tensor-core dot: Hopper sums a block with a narrower adder (not exact)
                    d = tl.dot(xt, tl.trans(wt))
                elif INTERPRET:  # same exact products in fp32 (the interpreter's bf16 dots are not faithful)
                    d = tl.dot(xt.to(tl.float32), tl.trans(wt.to(tl.float32)), input_precision="ieee")
                else:  # e4m3 values are exact in bf16: a bf16 dot sums the exact products in fp32
                    d = tl.dot(xt.to(tl.bfloat16), tl.trans(wt.to(tl.bfloat16)))  # [BM,BN]
                acc += d * sx[:, None] * sw[None, :]
            else:
                wb = (wt.to(tl.float32) * sw[:, None]).to(tl.bfloat16)  # exact dequantization
                if INTERPRET:  # Triton 3.6's interpreter multiplies bf16 dot operands as raw integers: same products
                    acc = tl.dot(xt.to(tl.float32), tl.trans(wb.to(tl.float32)), acc, input_precision="ieee")
                else:
                    acc = tl.dot(xt, tl.trans(wb), acc)  # bf16 x bf16 -> fp32
        out_rows = (offs_m.to(tl.int64) * G + g) * N  # [BM]
        mask = m_ok[:, None] & n_ok[None, :]
        if SPLIT == 1:
            tl.store(out_ptr + out_rows[:, None] + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            part = pid_k.to(tl.int64) * M * G * N
            tl.store(out_ptr + part + out_rows[:, None] + offs_n[None, :], acc, mask=mask)


# ---------------------------------------------------------------------------------------------- planning


def plan(M: int, N: int, K: int, G: int = 1, target: str | None = None) -> dict:
    """Tile sizes, K split and launch options for an ``[M, K] x [N, K]`` problem (G groups), per architecture.

    Up to GEMV_ROWS rows: the GEMV kernel. Up to 64: on sm90 an ungrouped weight takes
    :func:`dsv4_jax.kernels.fp8_prefill.split_plan` (the weight-stationary kernel with K split: 5-17 % faster than
    the e4m3-dot tiles at 16/32 rows on 8 of 10 V4-Flash shapes, an H200, 2026-12-02), a grouped one (``wo_a``,
    16-19 % slower that way) and the other targets one row tile of 16..64 rows, 64-wide N tiles, K split until
    about PER_SM programs per SM stream the weight. From PREFILL_MIN_ROWS on: :mod:`dsv4_jax.kernels.fp8_prefill`'s
    kernel (plan key ``WX``). ``BLOCK_M``/``SPLIT``/``KPS`` plans for many rows still run :func:`fp8_gemm_kernel`'s
    tiles (benchmarks: the former prefill kernel).
    """
    target = target or arch()
    if M <= GEMV_ROWS:
        return _target_gemv_plan(M, N, K, G, target)
    if M < PREFILL_MIN_ROWS:
        if G == 1 and target == "sm90":
            return split_plan(M, N, K, G, SM_COUNT[target])
        return decode_plan(M, N, K, G, SM_COUNT[target])
    return prefill_plan(M, N, K, G, target, SM_COUNT[target])


def decode_plan(M: int, N: int, K: int, G: int, sms: int, block_n: int = 64, per_sm: int = 4, num_stages: int = 4,
                num_warps: int = 4) -> dict:
    """Split-K plan for few rows: enough (N tile, K split) programs for ``per_sm`` per SM, no empty split."""
    n_kb = math.ceil(K / QBLOCK)
    tiles = math.ceil(N / block_n) * G
    split = max(1, min(n_kb, math.ceil(per_sm * sms / tiles)))
    kps = math.ceil(n_kb / split)
    return dict(BLOCK_M=max(16, next_pow2(M)), BLOCK_N=block_n, SPLIT=math.ceil(n_kb / kps), KPS=kps,
                GROUP_M=1, num_warps=num_warps, num_stages=num_stages)


GEMV_ROWS = 8  # decode rows up to this many take the tensor-core-free GEMV kernel
GEMV_TILE_KEYS = ("BLOCK_N", "NB", "PER_SM", "PF", "XL", "RA", "num_warps", "num_stages")  # DSV4_FP8_GEMV_TILE


def gemv_plan(M: int, N: int, K: int, G: int, sms: int, block_n: int = 16, nb: int = 2, per_sm: int = 8,
              num_warps: int = 4, num_stages: int = 3, maxnreg: int | None = None, pf: int = 0,
              xl: int | None = None, ra: int | None = None) -> dict:
    """GEMV plan for ``M <= GEMV_ROWS`` rows: ``block_n``-row weight tiles, ``nb`` 128-wide K blocks per step, K
    split until about ``per_sm`` programs per SM stream the weight (no empty split); ``maxnreg``: ptxas's register
    cap (probes); ``pf`` > 0 (CUDA only, opt-in: no gain measured) L2 prefetches ``pf`` steps ahead, ``xl`` the
    activations loaded in the weights' layout, ``ra`` one accumulator per row in 16-column chunks (:mod:`fp8_gemv`).
    ``ra`` and ``xl`` default to 1 at 2-8 rows (no barrier in the K loop; each row's output then equals the one-row
    call's bit for bit): ``wo_b`` 40.6 -> 32.6 us, ``wq_b`` 28.2 -> 25.4 at 4 rows (H100, 2026-12-08); at one row to 0
    (``xl``: 17.4 -> 18.2 us for ``wo_b``, slower).
    ``DSV4_FP8_GEMV_TILE`` (``BLOCK_N``, ``NB``, ``PER_SM``, ``PF``, ``XL``, ``RA``, ``num_warps``, ``num_stages``)
    overrides them for every FP8 GEMV of a process: a benchmark knob (``bench_decode.py --variants``). In the 3-layer
    batch-1 step on an H100 (2026-12-07, alternated with the defaults' 1.002-1.017 ms in a loop) ``PER_SM=16`` 1.011
    ms, ``NB=4`` 1.004, ``BLOCK_N=8`` 1.014: no plan beat these defaults."""
    env = env_tiles("DSV4_FP8_GEMV_TILE", GEMV_TILE_KEYS)
    block_n, nb, per_sm = env.get("BLOCK_N", block_n), env.get("NB", nb), env.get("PER_SM", per_sm)
    num_warps, num_stages = env.get("num_warps", num_warps), env.get("num_stages", num_stages)
    ra = env.get("RA", int(1 < M <= GEMV_ROWS) if ra is None else ra)
    pf, xl = env.get("PF", pf), env.get("XL", ra if xl is None else xl)
    steps = math.ceil(K / (QBLOCK * nb))
    tiles = math.ceil(N / block_n) * G
    split = max(1, min(steps, math.ceil(per_sm * sms / tiles)))
    kps = math.ceil(steps / split)
    extra = {"maxnreg": maxnreg} if maxnreg else {}
    return dict(GEMV=True, BLOCK_N=block_n, NB=nb, SPLIT=math.ceil(steps / kps), KPS=kps,
                CW=16 if M == 1 or ra else 128, PF=pf, XL=xl, RA=ra, num_warps=num_warps, num_stages=num_stages,
                **extra)


def _target_gemv_plan(M: int, N: int, K: int, G: int, target: str) -> dict:
    """:func:`gemv_plan` on ``target``: the interpreter pays per program, so 64-row tiles there (the GPUs' 16 stream
    best); ``PF`` refused off NVIDIA."""
    p = gemv_plan(M, N, K, G, SM_COUNT[target], block_n=64 if target == "cpu" else 16)
    check_prefetch(p["PF"], target, "fp8_linear GEMV")
    return p


def grid(M: int, N: int, G: int, p: dict) -> tuple[int, int, int]:
    if p.get("GEMV"):
        return (math.ceil(N / p["BLOCK_N"]), p["SPLIT"], G)
    return (math.ceil(M / p["BLOCK_M"]) * math.ceil(N / p["BLOCK_N"]), p["SPLIT"], G)


def _check(w: Fp8Tensor, what: str, K: int, rows: int) -> None:
    if w.q.ndim != 2 or w.q.shape != (rows, K) or w.q.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"{what}: weight codes must be float8_e4m3fn [{rows}, {K}], got {w.q.dtype} {w.q.shape}")
    want = (math.ceil(rows / QBLOCK), math.ceil(K / QBLOCK))
    if w.scale.shape != want or w.scale.dtype != jnp.uint8:
        raise ValueError(f"{what}: weight scales must be uint8 {want}, got {w.scale.dtype} {w.scale.shape}")


# ---------------------------------------------------------------------------------------------- jax launcher
def _launch(x, sx, w: Fp8Tensor, M, N, K, G, out_dtype, x_fp8: bool, p: dict | None = None) -> jax.Array:
    """triton_call of :func:`fp8_gemm_kernel`; ``x`` ``[M, G, K]``; returns ``[M, G, N]`` in ``out_dtype``.
    ``p`` overrides :func:`plan` (benchmarks)."""
    p = p or plan(M, N, K, G)
    out_t = jax.ShapeDtypeStruct(*split_output(p["SPLIT"], (M, G, N), out_dtype, jnp.float32))
    y = triton_call(x, sx, w.q, w.scale, M, kernel=fp8_gemm_kernel, out_shape=out_t, grid=grid(M, N, G, p),
                    tiled=M >= TILED_MIN_ROWS, N=N, K=K, G=G, KB=math.ceil(K / QBLOCK), SWK=w.scale.shape[1],
                    X_FP8=x_fp8, **p)
    return sum_splits(y, p["SPLIT"], out_dtype)


def gemv_partials(x, w: Fp8Tensor, M, N, K, G, out_dtype, p: dict) -> jax.Array:
    """triton_call of :func:`fp8_gemv_kernel` on the raw activation ``x [M, G, K]`` -> fp32 partials
    ``[SPLIT, M, G, N]``, or ``[M, G, N]`` in ``out_dtype`` when unsplit (:func:`split_output`)."""
    out_t = jax.ShapeDtypeStruct(*split_output(p["SPLIT"], (M, G, N), out_dtype, jnp.float32))
    kw = {k: v for k, v in p.items() if k != "GEMV"}
    return triton_call(x, w.q, w.scale, kernel=fp8_gemv_kernel, out_shape=out_t, grid=grid(M, N, G, p), M=M,
                       MP=next_pow2(M), N=N, K=K, G=G, SWK=w.scale.shape[1], **kw)


def _launch_gemv(x, w: Fp8Tensor, M, N, K, G, out_dtype, p: dict) -> jax.Array:
    """:func:`gemv_partials` summed -> ``[M, G, N]``."""
    return sum_splits(gemv_partials(x, w, M, N, K, G, out_dtype, p), p["SPLIT"], out_dtype)


def _fp8_linear_triton(x: jax.Array, w: Fp8Tensor, out_dtype, xq, p: dict | None = None, partials: bool = False):
    *lead, K = x.shape
    N = w.q.shape[0]
    _check(w, "fp8_linear", K, N)
    if K % QBLOCK:
        raise ValueError(f"fp8_linear: K={K} is not a multiple of the activation quantization block {QBLOCK}")
    M = math.prod(lead)
    if M == 0:
        return jnp.zeros((*lead, N), out_dtype)
    p = p or plan(M, N, K)
    if p.get("GEMV"):  # the quantized values (exact in bf16), so that the kernel's K loop only streams the weight
        y = gemv_partials(gemv_values(x, xq).reshape(M, 1, K), w, M, N, K, 1, out_dtype, p)
        if partials and p["SPLIT"] > 1:
            return SplitSum(y.reshape(p["SPLIT"], *lead, N), out_dtype)
        return sum_splits(y, p["SPLIT"], out_dtype).reshape(*lead, N)
    if p.get("WX"):  # prefill: the same values, as the B operand of the weight-stationary tensor-core kernel
        return fp8_wx(gemv_values(x, xq).reshape(M, 1, K), w, out_dtype, p).reshape(*lead, N)
    qa = xq if isinstance(xq, QuantAct) else quantize_act(x, QBLOCK)
    y = _launch(qa.q.reshape(M, 1, K), qa.scale.reshape(M, 1, K // QBLOCK), w, M, N, K, 1, out_dtype, True, p)
    return y.reshape(*lead, N)


def _grouped_triton(o: jax.Array, w: Fp8Tensor, out_dtype, p: dict | None = None) -> jax.Array:
    *lead, G, d = o.shape
    R = w.q.shape[0] // G
    _check(w, "grouped_proj (wo_a)", d, G * R)
    M = math.prod(lead)
    if M == 0:
        return jnp.zeros((*lead, G, R), out_dtype)
    p = p or plan(M, R, d, G)
    if p.get("GEMV"):
        return _launch_gemv(o.astype(jnp.bfloat16).reshape(M, G, d), w, M, R, d, G, out_dtype, p).reshape(*lead, G, R)
    if p.get("WX"):
        return fp8_wx(o.astype(jnp.bfloat16).reshape(M, G, d), w, out_dtype, p).reshape(*lead, G, R)
    dummy = jnp.zeros((1,), jnp.float32)  # no activation scales in the bf16 variant
    y = _launch(o.astype(jnp.bfloat16).reshape(M, G, d), dummy, w, M, R, d, G, out_dtype, False, p)
    return y.reshape(*lead, G, R)


# ---------------------------------------------------------------------------------------------- public
def _triton_ok(kernels: str) -> bool:
    return use_triton(kernels) and single_device()


def fp8_linear(x: jax.Array, w: Fp8Tensor, out_dtype, xq: QuantAct | jax.Array | None = None, *,
               kernels: str = "auto", parallel: str | None = None, partials: bool = False):
    """``x [..., K] @ W[N, K].T -> [..., N]`` in ``out_dtype`` with the FP8 activation quantization (spec 3.4).

    ``xq``: the input's precomputed :class:`QuantAct`, or its values (fp32 or bf16, exact): the GEMV path (decode
    rows) takes them as they are, the tiled path recomputes the codes. ``kernels`` as ``Config.kernels``.
    ``parallel``: how the weight is split under a mesh (:mod:`dsv4_jax.kernels.on_mesh`: ``"cols"``, ``"rows"``,
    ``"none"``); there the kernel runs per device on its shards. The XLA path is kept (same function up to fp32
    summation order) under a mesh for a caller that does not say (``None``) or a split that would cut a scale block,
    and, with ``"auto"``, on devices without e4m3 tensor-core dots. ``partials``: where the one-device GEMV splits
    K, its fp32 partials as a :class:`dsv4_jax.modeling.quant.SplitSum` (the caller's consumer sums them).
    """
    if parallel is not None and use_triton(kernels) and not single_device() and fp8_dot_supported():
        y = linear_on_mesh(lambda xl, wl, dt: _fp8_linear_triton(xl, wl, dt, None), x, w, out_dtype, parallel)
        if y is not None:
            return y
    if _triton_ok(kernels):
        if fp8_dot_supported():
            return _fp8_linear_triton(x, w, out_dtype, xq, partials=partials)
        if kernels == "triton":
            raise RuntimeError(f"kernels='triton': the FP8 linear kernel needs e4m3 tensor-core dots (NVIDIA sm89+ or "
                               f"AMD gfx950); this device is {jax.devices()[0].device_kind!r}. Use kernels='auto'")
    return fp8_linear_reference(x, w, out_dtype, xq)


def fp8_linear_pair(x: jax.Array, wa: Fp8Tensor, wb: Fp8Tensor, out_dtype, xq: QuantAct | jax.Array | None = None,
                    *, kernels: str = "auto", parallel: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Two FP8 linears of one input, ``(x @ wa.T, x @ wb.T)`` (the shared expert's ``w1``/``w3``). At decode rows both
    weights stream in one launch (:func:`fp8_gemv2_kernel`: fp32 split-K partials of both, summed by XLA in a fixed
    order like :func:`fp8_linear`'s), under a mesh on every device with its own columns
    (:func:`dsv4_jax.kernels.on_mesh.pair_on_mesh`); otherwise two :func:`fp8_linear` calls."""
    *lead, K = x.shape
    M, Na, Nb = math.prod(lead), wa.q.shape[0], wb.q.shape[0]
    if gemv2_ok(M, K, kernels, on_mesh=True):
        _check(wa, "fp8_linear_pair (first weight)", K, Na)
        _check(wb, "fp8_linear_pair (second weight)", K, Nb)

        def one_device(xl, wal, wbl):  # [..., K] -> [..., Na_local], [..., Nb_local]
            na, ml = wal.q.shape[0], math.prod(xl.shape[:-1])
            part = launch_gemv2(xl.reshape(ml, K), wal, wbl)  # [SPLIT, M, Na + Nb]
            y = jnp.sum(part, axis=0).astype(out_dtype)  # fixed-order reduction: deterministic
            return y[:, :na].reshape(*xl.shape[:-1], na), y[:, na:].reshape(*xl.shape[:-1], -1)

        xv = gemv_values(x, xq)
        ys = pair_on_mesh(one_device, xv, wa, wb, parallel) if not single_device() else one_device(xv, wa, wb)
        if ys is not None:
            return ys
    return (fp8_linear(x, wa, out_dtype, xq, kernels=kernels, parallel=parallel),
            fp8_linear(x, wb, out_dtype, xq, kernels=kernels, parallel=parallel))


def gemv_values(x: jax.Array, xq: QuantAct | jax.Array | None) -> jax.Array:
    """What the GEMV kernels read: the values of ``x``'s FP8 quantization in bf16 (exact), from the caller's
    :class:`QuantAct` or values (e.g. the mHC kernel's), else quantized here."""
    if xq is None or isinstance(xq, QuantAct):
        xq = (quantize_act(x, QBLOCK) if xq is None else xq).dequant()
    return xq.astype(jnp.bfloat16)


def gemv2_ok(M: int, K: int, kernels: str, on_mesh: bool = False) -> bool:
    """Whether two FP8 weights of one input take :func:`fp8_gemv2_kernel`: decode rows, K in whole quantization
    blocks, the kernels on, one device (``on_mesh``: or a mesh, where the caller runs the kernel per device)."""
    on = use_triton(kernels) if on_mesh else _triton_ok(kernels)
    return 0 < M <= GEMV_ROWS and K % QBLOCK == 0 and on and fp8_dot_supported()


def gemv2_plan(M: int, Na: int, Nb: int, K: int, target: str | None = None) -> dict:
    """:func:`gemv_plan` for two weights in one launch: the tiles of both count."""
    return _target_gemv_plan(M, Na + Nb, K, 1, target or arch())


def gemv2_meta(M: int, Na: int, Nb: int, K: int, p: dict) -> tuple[tuple[int, int, int], dict]:
    """Grid and metaparameters of :func:`fp8_gemv2_kernel` (the jax and the torch launchers take them from here)."""
    tiles = math.ceil(Na / p["BLOCK_N"]) + math.ceil(Nb / p["BLOCK_N"])
    return (tiles, p["SPLIT"], 1), dict(M=M, MP=next_pow2(M), N=Na, N2=Nb, K=K, SWK=math.ceil(K / QBLOCK),
                                        **{k: v for k, v in p.items() if k != "GEMV"})


def launch_gemv2(xv: jax.Array, wa: Fp8Tensor, wb: Fp8Tensor, p: dict | None = None) -> jax.Array:
    """triton_call of :func:`fp8_gemv2_kernel` on ``xv [M, K]`` (bf16 values) -> fp32 partials ``[SPLIT, M, Na+Nb]``."""
    M, K = xv.shape
    Na, Nb = wa.q.shape[0], wb.q.shape[0]
    p = p or gemv2_plan(M, Na, Nb, K)
    g, meta = gemv2_meta(M, Na, Nb, K, p)
    return triton_call(xv, wa.q, wa.scale, wb.q, wb.scale, kernel=fp8_gemv2_kernel, grid=g,
                       out_shape=jax.ShapeDtypeStruct((p["SPLIT"], M, Na + Nb), jnp.float32), **meta)


def grouped_proj(o: jax.Array, w: Fp8Tensor, out_dtype, *, kernels: str = "auto") -> jax.Array:
    """``wo_a``'s grouped projection ``o [..., G, d] -> [..., G, R]`` (spec 6), reading wo_a's FP8 in place.

    The weight is rounded to ``out_dtype`` (bf16 in reference numerics, fp32 in the float32 oracle) as the reference
    does; the kernel runs for bf16 activations and outputs with an FP8 weight, the reference otherwise. Under a mesh
    the kernel runs per device on its groups (:func:`dsv4_jax.kernels.on_mesh.grouped_on_mesh`)."""
    if isinstance(w, Fp8Tensor) and o.dtype == out_dtype == jnp.bfloat16 and use_triton(kernels):
        if single_device():
            return _grouped_triton(o, w, out_dtype)
        y = grouped_on_mesh(_grouped_triton, o, w, out_dtype)
        if y is not None:
            return y
    return grouped_proj_reference(o, w, out_dtype)


# ---------------------------------------------------------------------------------------------- torch launcher
def run_torch(x, sx, wq, ws, G: int, out_dtype, x_fp8: bool, p: dict | None = None):
    """Launch the kernel on torch tensors (CI runs it under ``TRITON_INTERPRET=1``; benchmarks may use it on GPUs).

    x ``[M, G, K]``, sx ``[M, G, K/128]`` fp32 (ignored unless ``x_fp8``), wq e4m3 ``[G*N, K]``, ws uint8 scales.
    Returns ``[M, G, N]`` in ``out_dtype`` (a torch dtype).
    """
    import torch

    M, _, K = x.shape
    N = wq.shape[0] // G
    p = p or plan(M, N, K, G)
    shape, dt = split_output(p["SPLIT"], (M, G, N), out_dtype, torch.float32)
    out = torch.full(shape, float("nan"), dtype=dt, device=x.device)
    fp8_gemm_kernel[grid(M, N, G, p)](x, sx, wq, ws, M, out, N=N, K=K, G=G, KB=math.ceil(K / QBLOCK),
                                       SWK=ws.shape[1], X_FP8=x_fp8,
                                       INTERPRET=os.environ.get("TRITON_INTERPRET") == "1", **p)
    return sum_splits(out, p["SPLIT"], out_dtype)


def run_gemv_torch(x, wq, ws, G: int, out_dtype, p: dict):
    """Launch :func:`fp8_gemv_kernel` on torch tensors: ``x [M, G, K]`` bf16 activations (for the FP8 linear: the
    values of ``quantize_act``), wq e4m3 ``[G*N, K]``, ws uint8 scales -> ``[M, G, N]`` in ``out_dtype``."""
    import torch

    M, _, K = x.shape
    N = wq.shape[0] // G
    shape, dt = split_output(p["SPLIT"], (M, G, N), out_dtype, torch.float32)
    out = torch.full(shape, float("nan"), dtype=dt, device=x.device)
    kw = {k: v for k, v in p.items() if k != "GEMV"}
    fp8_gemv_kernel[grid(M, N, G, p)](x, wq, ws, out, M=M, MP=next_pow2(M), N=N, K=K, G=G,
                                      SWK=ws.shape[1], **kw)
    return sum_splits(out, p["SPLIT"], out_dtype)
