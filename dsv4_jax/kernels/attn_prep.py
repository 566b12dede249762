"""The attention's queries and its new KV entry at decode rows, prepared in one launch.

Public function :func:`prep_q_kv` ``(q [B, S, H, Dh], kv [B, S, Dh]) -> (q', kv_values, kv_entry)``:

* ``q' = apply_rope(head_rms_norm(q))``: each head's weightless RMS norm with the reference's bf16 roundings at every
  step (:func:`dsv4_jax.modeling.layers.head_rms_norm`), then RoPE of its last ``rd`` dims
  (:func:`dsv4_jax.modeling.layers.apply_rope`: pairs ``(2j, 2j + 1)``, fp32, rounded to bf16);
* ``kv_values = apply_rope(kv)``, what the ring-write kernel snaps, and ``kv_entry =
  encode_fp8_cache(kv_values, Dn)``, the chunk's entry in the ring's :class:`~dsv4_jax.modeling.quant.Fp8Cache`
  layout (e4m3 codes and e8m0 bytes per 64 nope dims, the RoPE dims in bf16), which the attention reads.

:func:`prep_q_kv_reference` is the XLA sequence the model always ran (the spec, the CPU path).

Why: XLA made three to four kernels of these per layer at a decode step (``scripts/count_launches.py --names``:
``q_proj``'s sum of squares per head and its norm + RoPE + concatenation, ``kv_proj``'s RoPE + concatenation and, in
CSA layers, the snap's amax), each ~2 us of a ~200 us layer on an H100. :func:`_prep_kernel` runs ``BH`` heads of
one row per program and, in one more program per row, the KV entry.

Numerics: every step is the reference's fp32 operation with its bf16 rounding (nearest even by arithmetic:
:func:`dsv4_jax.kernels.common.round_bf16`), the square root and the reciprocal correctly rounded (``sqrt_rn``,
``div_rn``: what XLA computes); the per-head sum of the 512 rounded squares is a tree in another order than XLA's
(fp32 rounding before a bf16 rounding), and the RoPE products may contract into FMAs on a GPU (as XLA's may): a
value may move by one bf16 ulp. Under the interpreter (numpy, no FMA) it is the reference's bits wherever the sum's
order does not matter. ``cpu_rsqrt_tail`` (the golden data's CPU torch rule for the flattened heads past the last
multiple of 32) is honoured, so the interpreter runs the golden configs as the reference does.

Status: in ``"auto"`` on one GPU (``AUTO``; ``kernels="triton"`` too). Its GPU test passed on an H100 and so did the
golden all-position and layer-isolated criteria with it on (2026-12-06, with :mod:`dsv4_jax.kernels.act_quant` and
the indexer query kernel); in the 3-layer V4-Flash decode step at batch 1 the three together took the jitted loop
from 1.081 to 1.043 ms per step (``docs/performance.md``, thirty-third session). ``AUTO = False`` (a benchmark
variant) makes it opt-in again. Under a mesh the callers keep XLA's form. Portable Triton (integer/fp32 arithmetic,
plain loads).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.kernels import next_pow2, triton_call, use_switched_triton
from dsv4_jax.modeling.layers import apply_rope, head_rms_norm
from dsv4_jax.modeling.quant import Fp8Cache, encode_fp8_cache

try:  # the model imports this module; triton is optional (kernels="reference" needs none of it)
    import triton
    import triton.language as tl

    from dsv4_jax.kernels.common import act_quant_block, e4m3_bits, rope_rows, round_bf16
except ImportError:  # pragma: no cover - exercised only without the triton extra
    triton = tl = None

AUTO = True  # the kernel in "auto" (GPUs): its GPU test and the golden criteria passed with it (Status above)
MAX_ROWS = 64  # decode rows (B * S) up to this many take the kernel
BH = 8  # heads per program


if triton is not None:

    @triton.jit
    def _prep_kernel(q_ptr, kv_ptr, cs_ptr, sn_ptr, qo_ptr, kvo_ptr, codes_ptr, scales_ptr, rope_ptr,
                     H: tl.constexpr, DH: tl.constexpr, RD: tl.constexpr, DN: tl.constexpr, BH: tl.constexpr,
                     EPS: tl.constexpr, TAIL: tl.constexpr):
        """Program ``(r, g)``: for ``g < cdiv(H, BH)`` heads ``[g BH, g BH + BH)`` of token ``r`` of ``q [R, H, DH]``
        normed and rotated to ``qo``; for the last ``g`` the token's entry ``kv [R, DH]`` rotated to ``kvo`` and
        snapped into ``codes [R, DN]`` (e4m3 bytes), ``scales [R, DN/64]`` (e8m0 bytes) and ``rope [R, DH - DN]``.
        Heads whose flattened index ``r H + h`` is at least ``TAIL`` take the CPU torch tail's reciprocal
        ``bf16(1 / bf16(sqrt(ms)))`` (``head_rms_norm``'s ``cpu_rsqrt_tail``; ``TAIL`` past every head: none)."""
        r = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        c = tl.arange(0, DH)
        if g * BH < H:
            h = g * BH + tl.arange(0, BH)  # [BH]
            ok = (h < H)[:, None]
            rows = (r * H + h)[:, None] * DH + c[None, :]
            x = tl.load(q_ptr + rows, mask=ok, other=0.0).to(tl.float32)  # [BH, DH]
            sq = round_bf16(x * x)
            ms = round_bf16(tl.sum(sq, axis=1) / DH)  # the mean of the rounded squares, rounded (DH a power of 2)
            ms = round_bf16(ms + EPS)
            one = tl.full((BH,), 1.0, tl.float32)
            rr = round_bf16(tl.div_rn(one, tl.sqrt_rn(ms)))
            rr = tl.where(r * H + h >= TAIL, round_bf16(tl.div_rn(one, round_bf16(tl.sqrt_rn(ms)))), rr)
            qy = rope_rows(round_bf16(x * rr[:, None]), cs_ptr, sn_ptr, r, ok, BH, DH, RD)
            tl.store(qo_ptr + rows, qy.to(qo_ptr.dtype.element_ty), mask=ok)
        else:
            kv = tl.load(kv_ptr + r * DH + c[None, :]).to(tl.float32)  # [1, DH]
            ky = rope_rows(kv, cs_ptr, sn_ptr, r, tl.full((1, 1), 1, tl.int1), 1, DH, RD)
            tl.store(kvo_ptr + r * DH + c[None, :], ky.to(kvo_ptr.dtype.element_ty))
            blk = tl.arange(0, DH // 64)
            dd = blk[:, None] * 64 + tl.arange(0, 64)[None, :]  # [DH/64, 64]
            kb = tl.reshape(ky, (DH // 64, 64))
            v, e = act_quant_block(kb)  # the nope blocks' codes and scale exponents
            dst = codes_ptr.to(tl.pointer_type(tl.uint8))  # the e4m3 codes as bytes: no FP8 type involved
            tl.store(dst + r * DN + dd, e4m3_bits(v).to(tl.uint8), mask=dd < DN)
            tl.store(scales_ptr + r * (DN // 64) + blk, (e + 127).to(tl.uint8), mask=blk < DN // 64)
            tl.store(rope_ptr + r * (DH - DN) + (dd - DN), kb.to(rope_ptr.dtype.element_ty), mask=dd >= DN)


def _meta(R: int, H: int, DH: int, rd: int, dn: int, eps: float, tail: int) -> tuple[tuple[int, int], dict]:
    """Grid and metaparameters of :func:`_prep_kernel` (the jax and the torch launchers take them from here)."""
    if DH & (DH - 1) or dn % 64 or not 0 < rd <= DH - dn or rd % 2:
        raise ValueError(f"prep_q_kv: head dim {DH} (a power of two), {dn} snapped dims (blocks of 64) and {rd} RoPE "
                         f"dims (even, after the snapped ones) do not fit the kernel")
    bh = min(BH, next_pow2(H))
    return (R, math.ceil(H / bh) + 1), dict(H=H, DH=DH, RD=rd, DN=dn, BH=bh, EPS=float(np.float32(eps)), TAIL=tail,
                                            num_warps=4, num_stages=1)


def _tail(R: int, H: int, cpu_rsqrt_tail: bool) -> int:
    """First flattened head that takes the CPU tail's reciprocal (``head_rms_norm``), or past the last one."""
    n = R * H
    return 32 * (n // 32) if cpu_rsqrt_tail else n


def prep_q_kv_reference(q: jax.Array, kv: jax.Array, cos: jax.Array, sin: jax.Array, eps: float, dn: int | None,
                        cpu_rsqrt_tail: bool = False):
    """The XLA sequence: ``(apply_rope(head_rms_norm(q)), apply_rope(kv), encode_fp8_cache(...) or the values when
    ``dn`` is None)``."""
    q = apply_rope(head_rms_norm(q, eps, q.dtype, cpu_rsqrt_tail), cos[:, :, None], sin[:, :, None])
    kv = apply_rope(kv, cos, sin)
    return q, kv, (encode_fp8_cache(kv, dn) if dn is not None else kv)


def prep_q_kv_triton(q: jax.Array, kv: jax.Array, cos: jax.Array, sin: jax.Array, eps: float, dn: int,
                     cpu_rsqrt_tail: bool = False):
    """:func:`_prep_kernel` on one device's rows (bf16 q and kv; fp32 cos/sin)."""
    B, S, H, DH = q.shape
    R, rd = B * S, 2 * cos.shape[-1]
    if kv.shape != (B, S, DH) or cos.shape != (B, S, rd // 2) or sin.shape != cos.shape:
        raise ValueError(f"prep_q_kv: q {q.shape}, kv {kv.shape}, cos {cos.shape}, sin {sin.shape} do not fit")
    grid, meta = _meta(R, H, DH, rd, dn, eps, _tail(R, H, cpu_rsqrt_tail))
    bf = jnp.bfloat16
    outs = [jax.ShapeDtypeStruct((R, H, DH), bf), jax.ShapeDtypeStruct((R, DH), bf),
            jax.ShapeDtypeStruct((R, dn), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((R, dn // 64), jnp.uint8),
            jax.ShapeDtypeStruct((R, DH - dn), bf)]
    qo, kvo, codes, scales, rope = triton_call(q.reshape(R, H, DH), kv.reshape(R, DH),
                                               cos.reshape(R, -1).astype(jnp.float32),
                                               sin.reshape(R, -1).astype(jnp.float32), kernel=_prep_kernel,
                                               out_shape=outs, grid=grid, **meta)
    entry = Fp8Cache(codes=codes.reshape(B, S, dn), scales=scales.reshape(B, S, -1), rope=rope.reshape(B, S, -1))
    return qo.reshape(q.shape), kvo.reshape(kv.shape), entry


def prep_q_kv(q: jax.Array, kv: jax.Array, cos: jax.Array, sin: jax.Array, eps: float, dn: int | None,
              cpu_rsqrt_tail: bool = False, *, kernels: str = "auto"):
    """``(q', kv_values, kv_entry)`` (module docstring) for ``q [B, S, H, Dh]``, ``kv [B, S, Dh]`` and the rows' RoPE
    ``cos``/``sin [B, S, rd/2]``; ``dn``: the snapped dims (``None``: no FP8 snap, the entry is the values). The
    kernel runs for bf16 decode rows with a snap where :data:`AUTO` (or ``kernels="triton"``) says so, on one
    device; everywhere else :func:`prep_q_kv_reference`."""
    B, S = q.shape[:2]
    if (use_switched_triton(kernels, AUTO, one_device=True) and dn is not None and 0 < B * S <= MAX_ROWS
            and q.dtype == kv.dtype == jnp.bfloat16):
        return prep_q_kv_triton(q, kv, cos, sin, eps, dn, cpu_rsqrt_tail)
    return prep_q_kv_reference(q, kv, cos, sin, eps, dn, cpu_rsqrt_tail)


def run_torch(q, kv, cos, sin, eps: float, dn: int, cpu_rsqrt_tail: bool = False):
    """:func:`_prep_kernel` on torch tensors (CI: under ``TRITON_INTERPRET=1``): ``q [R, H, Dh]``, ``kv [R, Dh]`` bf16,
    ``cos``/``sin [R, rd/2]`` fp32 -> ``q'``, ``kv_values`` (fp32, bf16 values), ``codes`` (uint8 e4m3 bits),
    ``scales`` (uint8), ``rope`` (fp32, bf16 values)."""
    import torch

    R, H, DH = q.shape
    grid, meta = _meta(R, H, DH, 2 * cos.shape[-1], dn, eps, _tail(R, H, cpu_rsqrt_tail))
    nan = lambda *s: torch.full(s, float("nan"), dtype=torch.float32)  # noqa: E731
    qo, kvo, rope = nan(R, H, DH), nan(R, DH), nan(R, DH - dn)
    codes = torch.full((R, dn), 255, dtype=torch.uint8)
    scales = torch.full((R, dn // 64), 255, dtype=torch.uint8)
    _prep_kernel[grid](q, kv, cos, sin, qo, kvo, codes, scales, rope, **meta)
    return qo, kvo, codes, scales, rope
