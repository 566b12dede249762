"""The indexer's totals for prefill rows: thousands of query rows over the whole FP4 key cache, in one launch.

The arithmetic is :func:`dsv4_jax.kernels.indexer._totals` (the reference's: a bf16 score per (row, head, entry)
from an fp32 dot over the head dim, relu, times the head weight rounded to bf16, summed over heads in fp32, rounded
to bf16), masked to -inf past each row's visible count, the same totals as the decode rows' kernel
(:func:`dsv4_jax.kernels.indexer._indexer_score_kernel`). What differs is the shape of the work. A prefill chunk of
8,192 rows shares one cache, so:

* the FP4 keys are decoded once per call to bf16 by XLA (:func:`~dsv4_jax.modeling.quant.cache_values`: e2m1 times a
  power-of-two scale is exact in bf16; 8 MB at 128K tokens of context, 0.12 ms on an H200), not once per row and
  block inside the kernel (the decode kernel's per-block decode and layout shuffles took ~3x the instructions);
* a program scores ``RB`` consecutive rows (one batch row) over ``NB`` blocks of ``BLK`` entries, the entries as
  the dot's M dimension and (row, head) as N: ``[BLK, DI] @ [DI, RB*HP]``. The head sum then runs along N, inside a
  thread and its quad, not across warps; the keys stream through shared memory by the software pipeliner
  (``NS`` stages), the queries stay put.

Measured on an H200 (2026-12-04, ``scripts/bench_prefill_ops.py --ops indexer``: 8,192 rows at positions 120K-128K over
32,768 entries, V4-Flash's 64 heads of 128): 9.5-10.1 ms per call (:func:`plan`), 450 TFLOP/s of the dot, against
20.7-24.3 ms for the decode rows' kernel over the same rows; the totals bit for bit the same but for a few one-ulp
differences (the fp32 head sum's order). ``RB=1`` re-reads every bf16 key per row (31 ms); rounding by integer
arithmetic (:func:`~dsv4_jax.kernels.common.round_bf16`) instead of the hardware's conversion: 20.9 ms.

Tested under Triton's interpreter (CI: ``tests/test_kernels_indexer.py``), on a GPU against the reference, and
compiled for sm_90 and gfx950 (``tests/test_kernels_sm90.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.kernels import arch, env_tiles, next_pow2, triton_call
from dsv4_jax.modeling.quant import Fp4Tensor, cache_values

try:  # the model imports this module; triton is optional (kernels="reference" needs none of it)
    import triton
    import triton.language as tl

    from dsv4_jax.kernels.common import rn_bf16
except ImportError:  # pragma: no cover - exercised only without the triton extra
    triton = tl = None

PLAN_KEYS = ("RB", "BLK", "NB", "NS", "num_warps")


def plan(n_heads: int, seq: int, target: str | None = None) -> dict:
    """The launch plan (the one place it is chosen): rows per program ``RB`` (2; a power of two dividing ``seq``, the
    rows per batch row, since a program's rows share one batch row), ``BLK`` entries per block (128), ``NB`` blocks
    per program (16), ``NS`` pipeline stages (2), 8 warps; heads padded to a power of two of at least 16. Measured on
    an H200 (2026-12-04, 8,192 rows over 32,768 entries, ms per call): this plan 9.5; 8 blocks per program 10.1, 4
    11.2; 3 stages 12.6; 256-entry blocks 11.8; 4 rows 14.0; 64-entry blocks 10.9 (4 warps: 11.9). CPUs (the
    interpreter): 32-entry blocks, 2 per program, 4 warps. ``DSV4_INDEX_PREFILL_TILE`` overrides any of
    :data:`PLAN_KEYS` (``"RB=4,BLK=64"``: a benchmark knob; ``RB`` still reduced to a divisor of ``seq``)."""
    target = target or arch()
    p = dict(RB=2, BLK=128, NB=16, NS=2, num_warps=8) if target != "cpu" else dict(RB=2, BLK=32, NB=2, NS=1,
                                                                                   num_warps=4)
    p.update(env_tiles("DSV4_INDEX_PREFILL_TILE", PLAN_KEYS))
    rb = 1 << (max(1, p["RB"]).bit_length() - 1)
    while seq % rb:
        rb //= 2
    p.update(RB=rb, HP=max(16, next_pow2(n_heads)))
    return p


if triton is not None:

    @triton.jit
    def _prefill_score_kernel(q_ptr, hw_ptr, k_ptr, lim_ptr, out_ptr, S: tl.constexpr, HI: tl.constexpr,
                              HP: tl.constexpr, DI: tl.constexpr, NC: tl.constexpr, BLK: tl.constexpr,
                              NB: tl.constexpr, RB: tl.constexpr, NS: tl.constexpr):
        """Totals of rows ``r0 + [0, RB)`` (``r0 = RB * program_id(0)``, batch row ``r0 // S``) over entries
        ``[NB * BLK * program_id(1), + NB * BLK)``: ``q [B*S, HI, DI]``, ``hw [B*S, HI]`` bf16, ``k [B, NC, DI]``
        bf16 (the decoded cache), ``lim [B*S]`` int32 visible counts, ``out [B*S, NC]``. A program whose first
        entry no row sees writes -inf and reads no key; the others score all their blocks (masked past each row's
        count), a loop without branches that the software pipeliner can stage."""
        r0 = tl.program_id(0) * RB
        rb = tl.arange(0, RB)
        lims = tl.load(lim_ptr + r0 + rb)  # [RB]
        n = tl.arange(0, RB * HP)  # dot columns: row n // HP, head n % HP
        hm = (n % HP) < HI  # [N] real heads
        d = tl.arange(0, DI)
        qn = q_ptr + (r0 + n // HP).to(tl.int64) * (HI * DI) + (n % HP) * DI  # [N]
        qt = tl.load(qn[None, :] + d[:, None], mask=hm[None, :], other=0.0)  # [DI, N] queries, transposed
        w = tl.load(hw_ptr + (r0 + n // HP).to(tl.int64) * HI + n % HP, mask=hm, other=0.0).to(tl.float32)  # [N]
        jb = tl.program_id(1) * (NB * BLK)
        rows = (r0 + rb).to(tl.int64)[None, :] * NC  # [1, RB]
        if jb >= tl.max(lims, axis=0):  # nothing visible to any of the rows
            for b in range(NB):
                j = jb + b * BLK + tl.arange(0, BLK)  # [BLK]
                tl.store(out_ptr + rows + j[:, None], tl.full((BLK, RB), float("-inf"), tl.float32).to(
                    out_ptr.dtype.element_ty), mask=(j < NC)[:, None])
        else:
            keys = k_ptr + (r0 // S).to(tl.int64) * NC * DI
            for b in tl.range(0, NB, num_stages=NS):
                j = jb + b * BLK + tl.arange(0, BLK)  # [BLK] entry ids
                kb = tl.load(keys + j[:, None] * DI + d[None, :], mask=(j < NC)[:, None], other=0.0)  # [BLK, DI]
                sc = tl.dot(kb, qt)  # [BLK, N] fp32 scores (exact sums of exact products if snapped)
                prod = rn_bf16(tl.maximum(rn_bf16(sc), 0.0) * w[None, :])  # [BLK, N]
                if HP != HI:  # padded heads add -0.0
                    prod = tl.where(hm[None, :], prod, -0.0)
                tot = rn_bf16(tl.sum(tl.reshape(prod, (BLK, RB, HP)), axis=2))  # [BLK, RB] sums over heads
                vis = j[:, None] < lims[None, :]
                tl.store(out_ptr + rows + j[:, None], tl.where(vis, tot, float("-inf")).to(out_ptr.dtype.element_ty),
                         mask=(j < NC)[:, None])


def check_shapes(q, hw, keys: Fp4Tensor, what: str) -> tuple[int, int, int, int, int]:
    """``(B, S, Hi, Di, Nc)`` of a scoring launch (this module's and the decode rows'), or a ``ValueError`` naming
    ``what`` and the argument whose shape does not fit ``q [B,S,Hi,Di]``."""
    B, S, Hi, Di = q.shape
    Nc = keys.packed.shape[1]
    want = {"hw": (B, S, Hi), "keys.packed": (B, Nc, Di // 2), "keys.scale": (B, Nc, Di // 32)}
    got = {"hw": hw.shape, "keys.packed": keys.packed.shape, "keys.scale": keys.scale.shape}
    for name, shape in want.items():
        if tuple(got[name]) != shape:
            raise ValueError(f"{what}: {name} has shape {tuple(got[name])}, expected {shape} for q {q.shape}")
    if Di % 32 or Di & (Di - 1):
        raise ValueError(f"{what}: index head dim {Di} must be a power of two and a multiple of 32")
    return B, S, Hi, Di, Nc


def _launch(p: dict, R: int, S: int, Hi: int, Di: int, Nc: int) -> tuple[tuple[int, int], dict]:
    """Grid and metaparameters of :func:`_prefill_score_kernel` for ``R`` rows under plan ``p``: the one place both
    launchers take them from."""
    grid = (R // p["RB"], -(-Nc // (p["BLK"] * p["NB"])))
    meta = dict(S=S, HI=Hi, HP=p["HP"], DI=Di, NC=Nc, BLK=p["BLK"], NB=p["NB"], RB=p["RB"], NS=p["NS"],
                num_warps=p["num_warps"], num_stages=1)  # the loop's own stages: NS
    return grid, meta


def prefill_totals_triton(q: jax.Array, hw: jax.Array, keys: Fp4Tensor, t: jax.Array,
                          kv: jax.Array | None = None) -> jax.Array:
    """Every entry's total ``[B,S,Nc]`` bf16 (-inf where invisible) for query rows ``q [B,S,Hi,Di]`` bf16 with head
    weights ``hw [B,S,Hi]`` at positions ``t [B,S]`` over the FP4 cache ``keys``: the keys decoded to bf16 (XLA;
    ``kv [B,Nc,Di]``: already decoded by the caller, e.g. once for several row blocks), then one launch of
    :func:`_prefill_score_kernel`."""
    B, S, Hi, Di, Nc = check_shapes(q, hw, keys, "indexer prefill kernel")
    kv = cache_values(keys, jnp.bfloat16) if kv is None else kv  # [B, Nc, Di] exact
    if kv.shape != (B, Nc, Di) or kv.dtype != jnp.bfloat16:
        raise ValueError(f"indexer prefill kernel: kv is {kv.dtype}{list(kv.shape)}, expected bf16[{B}, {Nc}, {Di}]")
    lim = ((t.astype(jnp.int32) + 1) // 4).reshape(B * S)  # visible entries per row
    grid, meta = _launch(plan(Hi, S), B * S, S, Hi, Di, Nc)
    out = triton_call(q.reshape(B * S, Hi, Di), hw.astype(jnp.bfloat16).reshape(B * S, Hi), kv, lim,
                      kernel=_prefill_score_kernel, out_shape=jax.ShapeDtypeStruct((B * S, Nc), jnp.bfloat16),
                      grid=grid, **meta)
    return out.reshape(B, S, Nc)


def prefill_totals_torch(q, hw, kv, lim, S: int):
    """:func:`_prefill_score_kernel` on torch tensors (the interpreter tests): ``q [R, Hi, Di]``, ``hw [R, Hi]``,
    ``kv [B, Nc, Di]`` bf16 (decoded keys), ``lim [R]`` int32 -> totals ``[R, Nc]`` fp32."""
    import torch

    R, Hi, Di = q.shape
    Nc = kv.shape[1]
    grid, meta = _launch(plan(Hi, S, "cpu" if q.device.type == "cpu" else None), R, S, Hi, Di, Nc)
    out = torch.full((R, Nc), float("nan"), dtype=torch.float32, device=q.device)
    _prefill_score_kernel[grid](q, hw, kv, lim, out, **meta)
    return out
