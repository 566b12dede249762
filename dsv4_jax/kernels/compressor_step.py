"""The compressors' decode step (spec 7) in one Triton kernel: buffer update, and on the steps that complete a
window the gated pooling, norm, RoPE, the snap (FP8; for the indexer's compressor Hadamard and FP4) and the cache
write, in place.

Public function :func:`compress_decode` ``(cfg, w, kv_new [B, c*d], sc_new [B, c*d], cache, kv_buf, score_buf, pos,
n_new, ratio, freqs, indexer) -> (cache, kv_buf, score_buf)``: what :func:`dsv4_jax.modeling.compressor.compress`
returns for a chunk of one token (``S == 1``, ``n_new`` 0 or 1 per row) of

* the ATTENTION compressor (``indexer=False``) with FP8-snapped caches (``cfg.kv_fp8_sim``: the cache is an
  :class:`~dsv4_jax.modeling.quant.Fp8Cache`), for both ratios (``m = 4`` with the overlapping 2-window buffers,
  ``m = 128``): :func:`_compress_step_kernel`;
* the INDEXER's compressor (``indexer=True``: ``m = 4`` with overlap, ``d = cfg.index_head_dim``, 128 on V4-Flash)
  with FP4-snapped keys (``cfg.simulate``: the cache is an :class:`~dsv4_jax.modeling.quant.Fp4Tensor`, ``packed
  [B, N, d/2]`` and ``scale [B, N, d/32]`` uint8): the same kernel with ``INDEXER`` on, launched through
  :func:`_compress_step_indexer_kernel` (its own entry because the cache has two leaves, not three).

``kv_new``/``sc_new`` are the token's projections (the score without ``ape``: the kernel adds the row of the token's
place in its window, the same fp32 add, one XLA kernel fewer), which stay in XLA (two GEMVs). The
reference is :func:`dsv4_jax.modeling.compressor.compress_projected` (the CPU path; this module calls it, it does not
copy it).

Why a kernel: XLA spends ~10 kernels per compressor per decode step (the token-axis gathers, the softmax, the slot
sum, the norm, RoPE, the FP8 snap, the scatter, the buffer rebuild), also on the ``m - 1`` of ``m`` steps where no
window completes and nothing but one buffer row changes. Here one program per batch row:

* no window completes (``n_new == 1``, ``pos % m < m - 1``): the token's ``kv``/``score`` row is stored into its
  buffer slot (``m + pos % m`` with overlap, else ``pos % m``); ``n_new == 0``: nothing;
* the token completes window ``w = pos // m``: the ``c*m`` gating slots (with overlap the A halves ``[:d]`` of the
  previous window, absent for ``w == 0``, and the B halves ``[d:]`` of this one; without overlap the ``m`` tokens)
  are pooled per channel by a softmax over the slots, fp32, in the reference's order (the max; ``exp(x - max)``
  summed in slot order; each weight ``exp / sum`` correctly rounded; the products summed in runs of 16 slots, then
  the runs, as ``_sum_slots``); then ``rms_norm`` of the bf16-rounded vector (correctly rounded ``sqrt`` and
  divisions, bf16 output), RoPE on the last ``rd`` dims at position ``w*m`` (cos/sin from XLA:
  ``layers.rope_cos_sin``, so the kernel needs no ``cos``), the FP8 snap of the nope dims (``encode_fp8_cache``:
  power-of-two scales rounded up, e4m3 nearest even, written as code bytes by :func:`common.e4m3_bits`) and the entry
  stored at ``cache[row, w]`` (dropped when ``w >= N``, like ``write_entries``). The indexer variant replaces the
  FP8 snap by the Hadamard rotation of all ``d`` dims (``layers.hadamard``: Sylvester order, the fp32 butterflies
  with strides 1, 2, 4, ... of :func:`dsv4_jax.kernels.hadamard.butterflies`, times ``fp32(d**-0.5)``, rounded once
  to bf16) and the FP4 snap (``encode_fp4_cache``: per block of 32 a power-of-two scale rounded up, e2m1 nearest
  even, codes packed two per byte with the even dim in the low nibble, by integer arithmetic:
  :func:`dsv4_jax.kernels.common.fp4_quant_block`). Then the buffers: with overlap the current window moves to the
  previous-window slots and the current slots are cleared; without overlap all slots are cleared (kv 0, score
  -inf).

Precondition: the buffers are canonical (``modeling/state.py``: slots without a token hold kv 0 / score -inf), as
every state the model makes is; the kernel then writes only what changes and its buffers equal the reference's bit
for bit. (The reference rebuilds every slot; writing the unchanged empty slots of an ``m = 128`` buffer would cost
~0.5 MB per row and step.) The cache leaves and the buffers are updated in place (``input_output_aliases``).

Numerics: the reference's formula and order. What may differ: ``exp`` (Triton's ``tl.exp`` against XLA's
implementation, a few ulps), the order of the denominator's and the norm's fp32 sums (XLA's reductions have no
specified order), and on GPUs the contraction of multiply-adds into FMAs. These move the fp32 pooled values by a few
ulps, which rarely changes a bf16 rounding and then at most one e4m3 step of a snapped value (or a block's scale,
when its maximum sits on a power-of-two boundary); ``tests/test_kernels_compressor.py`` and
``tests/compressor_cases.py`` state the tolerance.
In the indexer variant everything after RoPE is exact given the same RoPE output (the butterflies, the scale and
the roundings are the reference's operations in its order), and a RoPE value one bf16 ulp off moves an e2m1 code by
at most one step (or a block's scale). On the CPU (interpreter) both variants match the reference bit for bit.
Portable Triton (fp32 and integer arithmetic, no inline assembly, no hardware FP8/FP4 conversions).

Status: in ``"auto"`` on GPUs. The attention variant's GPU test passed on an H200 (2026-12-01: V4-Flash shapes,
m = 4 and 128, batch 1 and 32, m + 2 steps on each side's own outputs), and so did the golden tests with ``"auto"``
(layer-isolated, end to end); in the batch-1 profile of a 3-layer V4-Flash step its 3 launches took 7.5 us where ~30
XLA kernels stood (``docs/performance.md``, eleventh session). The indexer variant's GPU test passed on an H200 too
(2026-12-01: V4-Flash d = 128, batch 1 and 32, 6 steps on each side's own outputs); under the interpreter it is bit
for bit the reference (kernel and ``compress``); the golden tests on a GPU have not run with it yet. Under a mesh
every device runs it on its own batch rows (:func:`dsv4_jax.kernels.on_mesh.replicated_on_mesh`); that path has not
run yet (the CPU mesh tests take the XLA path, and no 2-GPU machine was lent this session).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.config import Config
from dsv4_jax.kernels import triton_call, use_triton
from dsv4_jax.kernels.on_mesh import replicated_on_mesh
from dsv4_jax.modeling.layers import rope_cos_sin
from dsv4_jax.modeling.quant import Fp4Tensor, Fp8Cache
from dsv4_jax.modeling.weights import CompressorWeights

try:  # the model imports this module; triton is optional (kernels="reference" needs none of it)
    import triton
    import triton.language as tl

    from dsv4_jax.kernels.common import act_quant_block, e4m3_bits, fp4_quant_block, round_bf16
    from dsv4_jax.kernels.hadamard import butterflies
except ImportError:  # pragma: no cover - exercised only without the triton extra
    triton = tl = None

QBLOCK = 64  # the FP8 snap's block of nope dims (spec 3.2)


if triton is not None:

    @triton.jit
    def _slot(kvb, scb, kvn, scn, apn, s, prev_ok, ch, M: tl.constexpr, NS: tl.constexpr, CD: tl.constexpr,
              D: tl.constexpr, OVERLAP: tl.constexpr, KV: tl.constexpr):
        """Gating slot ``s`` (runtime int) of a completing window, channels ``ch [D]``: its score row (or with
        ``KV`` its kv row too) as fp32 ``[D]``. Slot ``NS - 1`` is the new token (``kvn``/``scn`` row pointers,
        its score plus the ``ape`` row ``apn`` of its place in the window);
        the others are buffer slot ``s`` (``kvb``/``scb``: the row's buffer), with overlap the A halves of slots
        ``< M`` (absent, kv 0 / score -inf, unless ``prev_ok``) and the B halves (columns ``D + ch``) of the rest."""
        is_new = s == NS - 1  # the masks below are scalars, broadcast to [D] by "& (col >= 0)"
        col = ch
        ok = s < NS - 1
        if OVERLAP:
            col = ch + tl.where(s >= M, D, 0)
            ok = ok & ((s >= M) | prev_ok)
        new_ok = is_new & (col >= 0)
        sc = tl.where(is_new, tl.load(scn + col, mask=new_ok, other=float("-inf")) + tl.load(apn + col, mask=new_ok,
                                                                                            other=0.0),
                      tl.load(scb + s * CD + col, mask=ok & (col >= 0), other=float("-inf")))
        kv = sc
        if KV:
            kv = tl.where(is_new, tl.load(kvn + col, mask=is_new & (col >= 0), other=0.0),
                          tl.load(kvb + s * CD + col, mask=ok & (col >= 0), other=0.0))
        return kv, sc

    @triton.jit
    def _compress_step_kernel(kvn_ptr, scn_ptr, ape_ptr, pos_ptr, nnew_ptr, cs_ptr, nw_ptr,
                              codes_in, scales_in, rope_in, kvb_in, scb_in,  # aliased by the outputs below
                              codes_ptr, scales_ptr, rope_ptr, kvb_ptr, scb_ptr,
                              N: tl.constexpr, M: tl.constexpr, D: tl.constexpr, DN: tl.constexpr,
                              RD: tl.constexpr, OVERLAP: tl.constexpr, CH: tl.constexpr, FCH: tl.constexpr,
                              EPS: tl.constexpr, INDEXER: tl.constexpr, LOG: tl.constexpr, HSCALE: tl.constexpr):
        """Program ``row``: one decode step of the row's compressor (module docstring). ``kvn/scn [B, CD]`` the
        token's projections (the score without ``ape``), ``ape [M, CD]`` fp32 (row ``pos % M`` is added to the
        token's score, as the reference's projection adds it), ``pos``/``nnew [B]`` int32, ``cs [B, 2, RD/2]``
        fp32 the cos and sin at the entry's position (one array: XLA computes both in one fusion), ``nw [D]`` the
        norm weight; in place: ``codes [B, N, DN]`` e4m3 (written as bytes), ``scales [B, N, DN/64]``
        e8m0 bytes, ``rope [B, N, RD]`` bf16, ``kvb``/``scb [B, CM, CD]`` fp32 buffers (``CD = c*D``, ``CM = c*M``).
        The ``*_in`` pointers are the same buffers as the outputs' (``input_output_aliases``), unused.
        ``INDEXER`` (launched through :func:`_compress_step_indexer_kernel`): after RoPE the Hadamard rotation
        (``LOG = log2 D`` stages, ``HSCALE = fp32(D**-0.5)``) and the FP4 snap of all ``D`` dims; then ``codes``
        are the packed e2m1 bytes ``[B, N, D/2]`` (low nibble = even dim), ``scales`` the e8m0 bytes ``[B, N,
        D/32]``, and ``rope`` is not used."""
        C: tl.constexpr = 2 if OVERLAP else 1
        CD: tl.constexpr = C * D
        CM: tl.constexpr = C * M
        NS: tl.constexpr = C * M  # gating slots of an entry
        row = tl.program_id(0).to(tl.int64)
        p = tl.load(pos_ptr + row)
        n = tl.load(nnew_ptr + row)
        off = p % M
        kvn = kvn_ptr + row * CD
        scn = scn_ptr + row * CD
        apn = ape_ptr + off * CD  # the ape row of the token's place in its window
        kvb = kvb_ptr + row * (CM * CD)
        scb = scb_ptr + row * (CM * CD)
        cc = tl.arange(0, CD)
        if (n > 0) & (off == M - 1):  # the token completes window p // M
            if OVERLAP:  # the current window with the new token: the next previous window [M, CD]
                j = tl.arange(0, M)[:, None]
                last = j == M - 1
                cur_kv = tl.where(last, tl.load(kvn + cc)[None, :],
                                  tl.load(kvb + (M + j) * CD + cc[None, :], mask=~last, other=0.0))
                cur_sc = tl.where(last, (tl.load(scn + cc) + tl.load(apn + cc))[None, :],
                                  tl.load(scb + (M + j) * CD + cc[None, :], mask=~last, other=0.0))
            prev_ok = p >= M  # with overlap: the previous window exists
            ch = tl.arange(0, D)
            mx = tl.full([D], float("-inf"), tl.float32)
            for c0 in range(0, NS, CH):  # softmax over the slots, per channel: the max ...
                for i in tl.static_range(CH):
                    _, sc = _slot(kvb, scb, kvn, scn, apn, c0 + i, prev_ok, ch, M, NS, CD, D, OVERLAP, False)
                    mx = tl.maximum(mx, sc)
            den = tl.zeros([D], tl.float32)
            for c0 in range(0, NS, CH):  # ... the sum of exp(x - max) in slot order ...
                for i in tl.static_range(CH):
                    _, sc = _slot(kvb, scb, kvn, scn, apn, c0 + i, prev_ok, ch, M, NS, CD, D, OVERLAP, False)
                    den = den + tl.exp(sc - mx)
            pooled = tl.zeros([D], tl.float32)
            for c0 in range(0, NS, CH):  # ... and the weighted kv, summed in runs of CH slots, then the runs
                part = tl.zeros([D], tl.float32)
                for i in tl.static_range(CH):
                    kv, sc = _slot(kvb, scb, kvn, scn, apn, c0 + i, prev_ok, ch, M, NS, CD, D, OVERLAP, True)
                    g = tl.div_rn(tl.exp(sc - mx), den) * kv
                    part = g if i == 0 else part + g
                pooled = tl.where(c0 == 0, part, pooled + part)
            # rms_norm of the bf16-rounded pooled vector -> bf16 values (fp32 arithmetic, as layers.rms_norm)
            x = round_bf16(pooled)
            ms = tl.div_rn(tl.sum(x * x, axis=0), tl.full([], D, tl.float32))
            r = tl.div_rn(tl.full([], 1.0, tl.float32), tl.sqrt_rn(ms + EPS))
            y = round_bf16(tl.load(nw_ptr + ch).to(tl.float32) * (x * r))  # [D]
            # RoPE on the interleaved pairs of the last RD dims (layers.apply_rope), rounded to bf16
            a, b = tl.split(tl.reshape(y, (D // 2, 2)))  # [D/2] each
            jp = tl.arange(0, D // 2) - (D - RD) // 2  # pair index inside the rope dims
            rope = jp >= 0
            cs = tl.load(cs_ptr + row * RD + jp, mask=rope, other=1.0)
            sn = tl.load(cs_ptr + row * RD + RD // 2 + jp, mask=rope, other=0.0)
            ra = tl.where(rope, round_bf16(a * cs - b * sn), a)
            rb = tl.where(rope, round_bf16(a * sn + b * cs), b)
            y = tl.reshape(tl.join(ra, rb), (D,))
            ent = p // M
            if INDEXER:
                # the Hadamard rotation (layers.hadamard: fp32 butterflies, the scale, one bf16 rounding), then the
                # FP4 snap of all D dims per block of 32 (encode_fp4_cache), the codes packed two per byte
                h = round_bf16(tl.reshape(butterflies(tl.reshape(y, (1, D)), 1, D, LOG), (D,)) * HSCALE)  # [D]
                q4, e4 = fp4_quant_block(tl.reshape(h, (D // 32, 32)))  # [D/32, 32] e2m1 codes, [D/32] exponents
                lo, hi = tl.split(tl.reshape(q4, (D // 2, 2)))  # [D/2] the even and the odd dims' codes
                if ent < N:  # write_entries drops ids past the cache
                    slot = row * N + ent
                    tl.store(codes_ptr + slot * (D // 2) + tl.arange(0, D // 2), (lo | (hi << 4)).to(tl.uint8))
                    tl.store(scales_ptr + slot * (D // 32) + tl.arange(0, D // 32), (e4 + 127).to(tl.uint8))
            else:
                # the FP8 snap of the nope dims per block of 64 (encode_fp8_cache), the codes as e4m3 bytes
                q, e = act_quant_block(tl.reshape(y, (D // 64, 64)))  # [D/64, 64] e4m3 grid values, [D/64] exps
                code = e4m3_bits(q)  # [D/64, 64] int32 bytes (sign, NaN and subnormals as the cast's)
                if ent < N:  # write_entries drops ids past the cache
                    slot = row * N + ent
                    blk = tl.arange(0, D // 64)
                    dd = blk[:, None] * 64 + tl.arange(0, 64)[None, :]  # [D/64, 64]
                    codes_u8 = codes_ptr.to(tl.pointer_type(tl.uint8))  # the e4m3 codes as bytes: no FP8 type used
                    tl.store(codes_u8 + slot * DN + dd, code.to(tl.uint8), mask=dd < DN)
                    tl.store(scales_ptr + slot * (DN // 64) + blk, (e + 127).to(tl.uint8), mask=blk < DN // 64)
                    tl.store(rope_ptr + slot * RD + (dd - DN),
                             tl.reshape(y, (D // 64, 64)).to(rope_ptr.dtype.element_ty), mask=dd >= DN)
            tl.debug_barrier()  # every read of the buffers above before the writes below (other threads)
            if OVERLAP:  # the completed window becomes the previous one; the current one is empty
                jj = tl.arange(0, M)[:, None]
                tl.store(kvb + jj * CD + cc[None, :], cur_kv)
                tl.store(scb + jj * CD + cc[None, :], cur_sc)
                tl.store(kvb + (M + jj) * CD + cc[None, :], tl.zeros([M, CD], tl.float32))
                tl.store(scb + (M + jj) * CD + cc[None, :], tl.full([M, CD], float("-inf"), tl.float32))
            else:  # every slot empty
                for s0 in range(0, CM, FCH):
                    sl = s0 + tl.arange(0, FCH)[:, None]
                    tl.store(kvb + sl * CD + cc[None, :], tl.zeros([FCH, CD], tl.float32))
                    tl.store(scb + sl * CD + cc[None, :], tl.full([FCH, CD], float("-inf"), tl.float32))
        elif n > 0:  # the token goes to its slot of the current window
            dst = (M + off if OVERLAP else off) * CD + cc
            tl.store(kvb + dst, tl.load(kvn + cc))
            tl.store(scb + dst, tl.load(scn + cc) + tl.load(apn + cc))

    @triton.jit
    def _compress_step_indexer_kernel(kvn_ptr, scn_ptr, ape_ptr, pos_ptr, nnew_ptr, cs_ptr, nw_ptr,
                                      packed_in, scale_in, kvb_in, scb_in,  # aliased by the outputs below
                                      packed_ptr, scale_ptr, kvb_ptr, scb_ptr,
                                      N: tl.constexpr, M: tl.constexpr, D: tl.constexpr, RD: tl.constexpr,
                                      OVERLAP: tl.constexpr, CH: tl.constexpr, FCH: tl.constexpr, EPS: tl.constexpr,
                                      LOG: tl.constexpr, HSCALE: tl.constexpr):
        """The indexer compressor's step: :func:`_compress_step_kernel` with ``INDEXER`` on its two cache leaves,
        ``packed [B, N, D/2]`` and ``scale [B, N, D/32]`` (uint8, the ``Fp4Tensor``); an entry point of its own
        because a launch passes exactly the kernel's arrays (jax-triton: the outputs' pointers follow the inputs),
        and the indexer's cache has no third leaf (``rope`` gets ``scale``'s pointer, never used)."""
        _compress_step_kernel(kvn_ptr, scn_ptr, ape_ptr, pos_ptr, nnew_ptr, cs_ptr, nw_ptr,
                              packed_in, scale_in, scale_in, kvb_in, scb_in, packed_ptr, scale_ptr, scale_ptr, kvb_ptr,
                              scb_ptr, N, M, D, D - RD, RD, OVERLAP, CH, FCH, EPS, True, LOG, HSCALE)


# ---------------------------------------------------------------------------------------------- plan
def plan(d: int, m: int) -> dict:
    """Slots per unrolled run ``CH`` (the reference's runs of 16 for ``m = 128``, all 8 with overlap), slots per
    clearing store ``FCH`` and warps: the one place they are chosen. One program per row: the pooling needs the
    whole entry for its norm, and a decode step has few rows."""
    ns = 2 * m if m == 4 else m
    return dict(CH=16 if ns % 16 == 0 else ns, FCH=8, num_warps=4 if d <= 256 else 8)


def _meta(cfg: Config, d: int, m: int, n: int, p: dict, indexer: bool = False) -> dict:
    """The kernel's metaparameters: :func:`_compress_step_kernel`'s, or with ``indexer``
    :func:`_compress_step_indexer_kernel`'s (no ``DN``/``INDEXER``: all ``d`` dims are snapped)."""
    meta = dict(N=n, M=m, D=d, RD=cfg.rope_head_dim, OVERLAP=m == 4, CH=p["CH"], FCH=p["FCH"],
                EPS=float(np.float32(cfg.norm_eps)), LOG=int(math.log2(d)), HSCALE=float(np.float32(d**-0.5)),
                num_warps=p["num_warps"], num_stages=1)
    if not indexer:
        meta.update(DN=cfg.nope_dim, INDEXER=False)
    return meta


def _check(cfg: Config, norm: jax.Array, kv_new, sc_new, cache, kv_buf, score_buf, pos, n_new, ratio: int,
           ape) -> None:
    """ValueError naming the first tensor whose shape or dtype does not fit."""
    if ratio not in (4, 128):
        raise ValueError(f"compress_decode: ratio must be 4 or 128, got {ratio}")
    d, rd = norm.shape[0], cfg.rope_head_dim
    c = 2 if ratio == 4 else 1
    if isinstance(cache, Fp4Tensor):  # the indexer's compressor: Hadamard and the FP4 snap of all d dims
        B, N = cache.packed.shape[:2]
        if d & (d - 1) or d < 32 or not 0 < rd < d or rd % 2:
            raise ValueError(f"compress_decode: norm {norm.shape}: the indexer kernel needs d a power of two >= 32 "
                             f"above rope_head_dim = {rd} (even)")
        if jnp.dtype(cfg.act_dtype) != jnp.bfloat16:
            raise ValueError(f"compress_decode: the indexer kernel rounds to bf16, the act dtype is "
                             f"{jnp.dtype(cfg.act_dtype)}")
        leaves = [("cache.packed", cache.packed, (B, N, d // 2), jnp.uint8),
                  ("cache.scale", cache.scale, (B, N, d // 32), jnp.uint8)]
    elif isinstance(cache, Fp8Cache):
        dn = cfg.nope_dim
        B, N = cache.codes.shape[:2]
        if d & (d - 1) or d < 64 or d != dn + rd:
            raise ValueError(f"compress_decode: norm {norm.shape}: the kernel needs d = nope_dim + rope_head_dim = "
                             f"{dn} + {rd}, a power of two >= 64")
        leaves = [("cache.codes", cache.codes, (B, N, dn), jnp.float8_e4m3fn),
                  ("cache.scales", cache.scales, (B, N, dn // QBLOCK), jnp.uint8),
                  ("cache.rope", cache.rope, (B, N, rd), jnp.bfloat16)]
    else:
        raise ValueError(f"compress_decode: the cache must be an Fp8Cache (cfg.kv_fp8_sim) or, for the indexer, an "
                         f"Fp4Tensor (cfg.simulate), got {type(cache).__name__}")
    want = [("kv_new", kv_new, (B, c * d), jnp.float32), ("sc_new", sc_new, (B, c * d), jnp.float32),
            ("ape", ape, (ratio, c * d), jnp.float32),
            ("kv_buf", kv_buf, (B, c * ratio, c * d), jnp.float32),
            ("score_buf", score_buf, (B, c * ratio, c * d), jnp.float32), *leaves, ("pos", pos, (B,), jnp.int32),
            ("n_new", n_new, (B,), jnp.int32)]
    for name, a, shape, dtype in want:
        if tuple(a.shape) != shape or a.dtype != dtype:
            raise ValueError(f"compress_decode: {name} is {a.dtype} {tuple(a.shape)}, expected {jnp.dtype(dtype)} "
                             f"{shape} (m={ratio}, d={d})")


def _leaves(cache) -> tuple:
    """The cache's arrays in the kernel's order: ``(packed, scale)`` of an ``Fp4Tensor`` (the indexer's), else
    ``(codes, scales, rope)`` of an ``Fp8Cache``."""
    return (cache.packed, cache.scale) if isinstance(cache, Fp4Tensor) else (cache.codes, cache.scales, cache.rope)


def _rebuild(indexer: bool, leaves):
    """The cache from :func:`_leaves`' arrays."""
    if indexer:
        return Fp4Tensor(packed=leaves[0], scale=leaves[1])
    return Fp8Cache(codes=leaves[0], scales=leaves[1], rope=leaves[2])


def compress_decode_triton(cfg: Config, norm: jax.Array, kv_new: jax.Array, sc_new: jax.Array,
                           cache: Fp8Cache | Fp4Tensor, kv_buf: jax.Array, score_buf: jax.Array, pos: jax.Array,
                           n_new: jax.Array, ratio: int, cos: jax.Array, sin: jax.Array, ape: jax.Array):
    """The kernel on one device's rows: ``cos``/``sin [B, rd/2]`` fp32 at each row's entry position; an
    ``Fp4Tensor`` cache selects the indexer variant. Returns the new cache and buffers (the inputs' buffers,
    written in place)."""
    _check(cfg, norm, kv_new, sc_new, cache, kv_buf, score_buf, pos, n_new, ratio, ape)
    indexer = isinstance(cache, Fp4Tensor)
    leaves = _leaves(cache)
    d = norm.shape[0]
    B, N = leaves[0].shape[:2]
    meta = _meta(cfg, d, ratio, N, plan(d, ratio), indexer)
    cs = jnp.stack([cos, sin], axis=1).astype(jnp.float32)  # [B, 2, rd/2]: cos, sin and this in one XLA fusion
    ins = (kv_new, sc_new, ape, pos, n_new, cs, norm, *leaves, kv_buf, score_buf)
    shapes = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in ins[7:])
    outs = triton_call(*ins, kernel=_compress_step_indexer_kernel if indexer else _compress_step_kernel,
                       out_shape=shapes, grid=(B,), input_output_aliases={7 + i: i for i in range(len(shapes))},
                       **meta)
    return _rebuild(indexer, outs[:-2]), outs[-2], outs[-1]


def compress_decode_reference(cfg: Config, w: CompressorWeights, kv_new: jax.Array, sc_new: jax.Array, cache,
                              kv_buf: jax.Array, score_buf: jax.Array, pos: jax.Array, n_new: jax.Array, ratio: int,
                              freqs, indexer: bool = False):
    """The XLA path: :func:`dsv4_jax.modeling.compressor.compress_projected` on the one-token chunk."""
    from dsv4_jax.modeling.compressor import compress_projected

    sc = sc_new + w.ape[pos % ratio]  # [B, c*d]: the score with ape, as _project adds it for a one-token chunk
    return compress_projected(cfg, w, kv_new[:, None], sc[:, None], cache, kv_buf, score_buf, pos, n_new, ratio,
                              freqs, indexer=indexer)


def compress_decode(cfg: Config, w: CompressorWeights, kv_new: jax.Array, sc_new: jax.Array, cache,
                    kv_buf: jax.Array, score_buf: jax.Array, pos: jax.Array, n_new: jax.Array, ratio: int, freqs,
                    indexer: bool = False):
    """One decode step of the attention compressor (or with ``indexer`` the indexer's) after its projection (module
    docstring): ``kv_new``/``sc_new [B, c*d]`` fp32, the token's projections (the score without ``ape``: both
    paths add it); returns ``(cache, kv_buf, score_buf)``. The kernel runs where
    :func:`dsv4_jax.kernels.use_triton` says so for an ``Fp8Cache`` (attention) or an ``Fp4Tensor`` with
    ``cfg.simulate`` (indexer), else the reference."""
    fits = (isinstance(cache, Fp4Tensor) and cfg.simulate) if indexer else isinstance(cache, Fp8Cache)
    if not (use_triton(cfg) and fits and kv_new.shape[0] > 0):
        return compress_decode_reference(cfg, w, kv_new, sc_new, cache, kv_buf, score_buf, pos, n_new, ratio, freqs,
                                         indexer)
    cos, sin = rope_cos_sin(freqs, (pos // ratio) * ratio)  # [B, rd/2] at each row's entry position
    leaves = _leaves(cache)
    k = len(leaves)

    def local(kvn, scn, *a):  # a: the cache leaves, kvb, scb, p, nn, cs, sn, (norm, ape)
        kvb, scb, p, nn, cs, sn = a[k:-1]
        norm, ape = a[-1]
        return compress_decode_triton(cfg, norm, kvn, scn, _rebuild(indexer, a[:k]), kvb, scb, p, nn, ratio, cs, sn,
                                      ape.astype(jnp.float32))

    acts = (kv_new, sc_new, *leaves, kv_buf, score_buf, pos, n_new, cos, sin)
    return replicated_on_mesh(local, acts, (w.norm, w.ape))


def run_torch(cfg: Config, norm, kv_new, sc_new, codes, scales, rope, kv_buf, score_buf, pos, n_new, ratio: int, cos,
              sin, ape, p: dict | None = None) -> None:
    """Launch the kernel on torch tensors (CI: under ``TRITON_INTERPRET=1``), updating ``codes`` (float8_e4m3fn),
    ``scales``, ``rope`` and the buffers in place; shapes as :func:`compress_decode_triton`'s (``sc_new`` without
    ``ape [m, c*d]``, which the kernel adds). ``rope=None``: the
    indexer variant, ``codes``/``scales`` the ``Fp4Tensor``'s ``packed [B, N, d/2]``/``scale [B, N, d/32]``
    (uint8)."""
    d = norm.shape[0]
    B, N = codes.shape[:2]
    indexer = rope is None
    import torch

    meta = _meta(cfg, d, ratio, N, p or plan(d, ratio), indexer)
    cs = torch.stack([cos, sin], dim=1).contiguous()  # [B, 2, rd/2], as the jax launcher passes them
    if indexer:
        _compress_step_indexer_kernel[(B,)](kv_new, sc_new, ape, pos, n_new, cs, norm, codes, scales, kv_buf,
                                            score_buf, codes, scales, kv_buf, score_buf, **meta)
    else:
        _compress_step_kernel[(B,)](kv_new, sc_new, ape, pos, n_new, cs, norm, codes, scales, rope, kv_buf,
                                    score_buf, codes, scales, rope, kv_buf, score_buf, **meta)
