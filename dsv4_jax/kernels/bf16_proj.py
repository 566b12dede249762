"""The bf16-weight projections of a decode step's attention input, several weights in one launch.

Public function :func:`bf16_projections` ``(x [..., K], weights ([N_i, K] bf16, ...), out_dtypes) -> (y_i [...,
N_i], ...)``: ``y_i = round(fp32 sum_k x_k w_ik)``, every product of two bf16 values exact in fp32, rounded once to
``out_dtypes[i]`` (fp32: not at all). That is what the model computes for the weights the checkpoint ships in bf16
and reads with the attention input ``x``: each compressor's ``wkv`` and ``wgate`` (:func:`dsv4_jax.modeling.
compressor._project`'s fp32 form, ``precision=HIGHEST``; spec 7) and the indexer's ``weights_proj``
(:func:`dsv4_jax.modeling.quant.linear_reference` of a plain weight, bf16 out). The reference
(:func:`bf16_projections_reference`) is that XLA code; the kernel (:func:`_proj2_kernel`, :func:`_proj5_kernel`)
differs from it only in the order of the fp32 sums.

Why: at decode rows XLA made each compressor's two projections one reduce fusion and ``weights_proj`` another: three
kernels per CSA layer reading ~21 MB of bf16 weights (V4-Flash), one per HCA layer (8 MB), below the copy bandwidth
(``docs/performance.md``, the thirty-third session's profile). :func:`dsv4_jax.modeling.attention.attention` hands
all of a layer's (both compressors' and ``weights_proj``, five matrices) to one launch.

The kernel: one program per ``BN`` rows of one weight (the programs of weight ``i`` follow those of weight ``i - 1``),
all ``M`` activation rows, the whole K range in ``BK``-wide steps: each step loads a ``[BN, BK]`` weight tile
(16-byte loads along K) and the rows' ``[M, BK]`` activations (L1/L2 hits), and adds the exact products into an
``[M, BN, BK]`` fp32 accumulator elementwise; the K lanes are summed once after the loop. No split-K: every output
is whole in one program (no partial sums for a consumer to add) and the plan (:func:`plan`) depends only on ``M`` and
``K``: a row's result is the same bits whichever weights share the launch, which a speculative rollback relies on
(:func:`dsv4_jax.modeling.compressor.rebuild_buffers` recomputes the two compressor projections alone, bit for bit
those of the verify chunk's five-weight launch). Across row counts the order of the sums changes with ``BK``, as
XLA's reductions' does with their shapes.

Status: opt-in (``AUTO = False``: ``kernels="triton"``, or the benchmark variant
``dsv4_jax.kernels.bf16_proj:AUTO=True``); one device only (under a mesh the XLA form). On an H200 (2026-12-06,
``docs/performance.md``) its GPU test and the golden criteria passed, the five projections took 8.3 us against ~11
for XLA's three fusions (device time per CSA layer) and the HCA layers' two 7.0 us against XLA's 6.5 (so those stay
on XLA: :data:`HCA`), but the 3-layer batch-1 step did not get measurably faster (0.865-0.879 against 0.870-0.876 ms
in a loop, alternated): it joins ``"auto"`` when a step shows the gain. Portable Triton (bf16 loads, fp32
multiply-adds), tested under the interpreter in CI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from dsv4_jax.kernels import arch, env_tiles, next_pow2, triton_call, use_switched_triton

try:  # the model imports this module; triton is optional (kernels="reference" needs none of it)
    import triton
    import triton.language as tl

    from dsv4_jax.kernels.common import round_bf16
except ImportError:  # pragma: no cover - exercised only without the triton extra
    triton = tl = None

AUTO = False  # opt-in until its GPU test and timing (module docstring)
# The HCA compressors' two weights (m = 128: 8.4 MB on V4-Flash) through the kernel too; off: XLA's reduce fusion
# took 6.5 us per HCA layer against the kernel's 7.0 (H200, 2026-12-06, profile_decode.py, 2-row programs). A
# rollback rebuilds a compressor's projections by the same rule (its ratio), so its bits match the verify chunk's.
HCA = False
ROWS = 8  # activation rows up to this many take the kernel (decode steps, speculative verify chunks of small batches)
MAX_WEIGHTS = 5  # a CSA layer: both compressors' wkv and wgate, the indexer's weights_proj
TILE_KEYS = ("BN", "BK", "num_warps")  # DSV4_PROJ_TILE: benchmark knobs (kernels.env_tiles)

if triton is not None:

    @triton.jit
    def _seg(x_ptr, w_ptr, o_ptr, pid, M: tl.constexpr, MP: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
             BN: tl.constexpr, BK: tl.constexpr, ROUND: tl.constexpr):
        """Rows ``[pid * BN, + BN)`` of one weight ``w [N, K]`` (bf16) against ``x [M, K]`` (bf16) -> ``o [M, N]``:
        the fp32 sums, rounded to bf16 first where ``ROUND``."""
        # every tile is loaded in the accumulator's 3D layout (a [BN, BK] load broadcast to it went through shared
        # memory with barriers in the loop: sm_90a SASS)
        n = pid * BN + tl.arange(0, BN)
        n3 = n[None, :, None]  # [1, BN, 1]
        m = tl.arange(0, MP)
        m3 = m[:, None, None]  # [MP, 1, 1]
        kk = tl.arange(0, BK)[None, None, :]  # [1, 1, BK]
        w_rows = w_ptr + n3.to(tl.int64) * K
        acc = tl.zeros((MP, BN, BK), tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + kk
            w = tl.load(w_rows + k, mask=(n3 < N) & (k < K), other=0.0).to(tl.float32)  # [1, BN, BK]
            x = tl.load(x_ptr + m3 * K + k, mask=(m3 < M) & (k < K), other=0.0).to(tl.float32)  # [MP, 1, BK]
            acc += x * w  # exact products (bf16 x bf16), one fp32 add each
        y = tl.sum(acc, axis=2)  # [MP, BN]
        m_ok = m < M
        n_ok = n < N
        if ROUND:
            y = round_bf16(y)
        tl.store(o_ptr + m[:, None] * N + n[None, :], y.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _proj2_kernel(x_ptr, w0, w1, o0, o1, M: tl.constexpr, MP: tl.constexpr, K: tl.constexpr, N0: tl.constexpr,
                      N1: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """Two weights (one compressor's ``wkv``, ``wgate``): program ``p`` < ``cdiv(N0, BN)`` is ``w0``'s tile
        ``p``, the rest ``w1``'s (:func:`_seg`; ``R*``: round that output to bf16)."""
        pid = tl.program_id(0)
        P0: tl.constexpr = (N0 + BN - 1) // BN
        if pid < P0:
            _seg(x_ptr, w0, o0, pid, M, MP, N0, K, BN, BK, R0)
        else:
            _seg(x_ptr, w1, o1, pid - P0, M, MP, N1, K, BN, BK, R1)

    @triton.jit
    def _proj5_kernel(x_ptr, w0, w1, w2, w3, w4, o0, o1, o2, o3, o4, M: tl.constexpr, MP: tl.constexpr,
                      K: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, N3: tl.constexpr,
                      N4: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr,
                      R4: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """Five weights (a CSA layer's): :func:`_proj2_kernel`'s layout over five."""
        pid = tl.program_id(0)
        P0: tl.constexpr = (N0 + BN - 1) // BN
        P1: tl.constexpr = P0 + (N1 + BN - 1) // BN
        P2: tl.constexpr = P1 + (N2 + BN - 1) // BN
        P3: tl.constexpr = P2 + (N3 + BN - 1) // BN
        if pid < P0:
            _seg(x_ptr, w0, o0, pid, M, MP, N0, K, BN, BK, R0)
        elif pid < P1:
            _seg(x_ptr, w1, o1, pid - P0, M, MP, N1, K, BN, BK, R1)
        elif pid < P2:
            _seg(x_ptr, w2, o2, pid - P1, M, MP, N2, K, BN, BK, R2)
        elif pid < P3:
            _seg(x_ptr, w3, o3, pid - P2, M, MP, N3, K, BN, BK, R3)
        else:
            _seg(x_ptr, w4, o4, pid - P3, M, MP, N4, K, BN, BK, R4)


# ---------------------------------------------------------------------------------------------- plan, launch
def plan(M: int, K: int, target: str | None = None) -> dict:
    """Tiles for ``M`` rows of ``K`` columns (nothing else: module docstring). GPUs: 2 weight rows per program (a
    V4-Flash CSA layer's five weights: 1,312 programs, an HCA layer's two: 512), ``BK`` so that the ``[MP, BN, BK]``
    accumulator holds at most 8K values (1,024 columns, 4 KB of weights per step, at one row; K is a constexpr, so
    the whole loop unrolls and every step's loads are issued up front: sm_90a SASS). Device time on an H200
    (2026-12-06, ``profile_decode.py --scopes``) of a CSA layer's five with 4 / 2 / 1 rows per program: 8.8 / 8.3 /
    7.7 us (XLA's three fusions ~11); an HCA layer's compressor scope (two projections and the step kernel): 9.3 /
    7.0 / 7.2 us against XLA's 6.5. 2 rows: the form its GPU test and the golden criteria ran with.
    The interpreter: wide programs (its cost is per program). ``DSV4_PROJ_TILE`` (``BN``, ``BK``, ``num_warps``)
    overrides, for probes."""
    target = target or arch()
    mp = next_pow2(M)
    if target == "cpu":
        t = dict(BN=16, BK=min(256, next_pow2(K)), num_warps=4)
    else:
        t = dict(BN=2, BK=max(128, min(1024, 8192 // (mp * 2))), num_warps=4)
    t.update(env_tiles("DSV4_PROJ_TILE", TILE_KEYS))
    return t


def _meta(M: int, K: int, ns: Sequence[int], rounds: Sequence[bool], t: dict) -> tuple[tuple[int], dict]:
    """Grid and metaparameters (the jax and torch launchers take them from here)."""
    meta = dict(M=M, MP=next_pow2(M), K=K, BN=t["BN"], BK=t["BK"], num_warps=t["num_warps"], num_stages=1)
    meta.update({f"N{i}": n for i, n in enumerate(ns)})
    meta.update({f"R{i}": bool(r) for i, r in enumerate(rounds)})
    return (sum(math.ceil(n / t["BN"]) for n in ns),), meta


def _kernel(n: int):
    if n not in (2, MAX_WEIGHTS):
        raise ValueError(f"bf16_projections: {n} weights; the kernel takes 2 or {MAX_WEIGHTS}")
    return _proj2_kernel if n == 2 else _proj5_kernel


def bf16_projections_triton(x: jax.Array, weights: Sequence[jax.Array], out_dtypes: Sequence) -> tuple:
    """The kernel on ``x [M, K]`` bf16 and 2 or 5 bf16 weights ``[N_i, K]`` -> ``[M, N_i]`` in ``out_dtypes``
    (fp32 or bf16)."""
    M, K = x.shape
    g, meta = _meta(M, K, [w.shape[0] for w in weights], [jnp.dtype(d) == jnp.bfloat16 for d in out_dtypes],
                    plan(M, K))
    out = [jax.ShapeDtypeStruct((M, w.shape[0]), d) for w, d in zip(weights, out_dtypes)]
    return tuple(triton_call(x, *weights, kernel=_kernel(len(weights)), grid=g, out_shape=out, **meta))


def bf16_projections_reference(x: jax.Array, weights: Sequence[jax.Array], out_dtypes: Sequence) -> tuple:
    """The XLA form (the model's code before the kernel): an fp32 ``HIGHEST`` product per weight, then the rounding."""
    xf = x.astype(jnp.float32)
    return tuple(jnp.einsum("...k,nk->...n", xf, w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
                 .astype(d) for w, d in zip(weights, out_dtypes))


def kernel_applies(x: jax.Array, weights: Sequence[jax.Array], kernels: str) -> bool:
    """Whether :func:`bf16_projections` launches the kernel for these operands (decode rows, bf16, the switch)."""
    M = math.prod(x.shape[:-1])
    return (0 < M <= ROWS and len(weights) in (2, MAX_WEIGHTS) and x.dtype == jnp.bfloat16
            and all(w.dtype == jnp.bfloat16 and w.ndim == 2 and w.shape[1] == x.shape[-1] for w in weights)
            and use_switched_triton(kernels, AUTO, one_device=True))


# ---------------------------------------------------------------------------------------------- public
def bf16_projections(x: jax.Array, weights: Sequence[jax.Array], out_dtypes: Sequence, *,
                     kernels: str = "auto") -> tuple:
    """``x [..., K]`` (act dtype) times each bf16 weight ``[N_i, K]`` -> ``y_i [..., N_i]`` in ``out_dtypes[i]``,
    fp32 sums of exact products rounded once: the kernel where :func:`kernel_applies`, else the XLA form."""
    if len(weights) != len(out_dtypes):
        raise ValueError(f"bf16_projections: {len(weights)} weights but {len(out_dtypes)} output dtypes")
    for i, w in enumerate(weights):
        if w.ndim != 2 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"bf16_projections: weight {i} has shape {w.shape}, expected [N, {x.shape[-1]}]")
    if not kernel_applies(x, weights, kernels):
        return bf16_projections_reference(x, weights, out_dtypes)
    *lead, K = x.shape
    ys = bf16_projections_triton(x.reshape(-1, K), weights, out_dtypes)
    return tuple(y.reshape(*lead, y.shape[-1]) for y in ys)


def run_torch(x, weights, rounds: Sequence[bool], t: dict | None = None):
    """The kernel on torch tensors (CI: under ``TRITON_INTERPRET=1``): ``x [M, K]`` and the weights bf16 ->
    fp32 ``[M, N_i]`` (bf16-rounded values where ``rounds[i]``); ``t``: a plan (default: the interpreter's)."""
    import torch

    M, K = x.shape
    t = t or plan(M, K, "cpu")
    g, meta = _meta(M, K, [w.shape[0] for w in weights], rounds, t)
    outs = [torch.full((M, w.shape[0]), float("nan"), dtype=torch.float32) for w in weights]
    _kernel(len(weights))[g](x, *weights, *outs, **meta)
    return outs

