"""The KV compressor (spec 7): gated pooling of every ``m`` tokens into one entry, for any chunk on top of a state.

A compressed entry ``w`` summarises tokens ``[w*m, (w+1)*m)`` and is emitted once its window is complete. With
``m = 4`` the windows overlap (``c = 2``): each token has two halves A = ``[:d]`` and B = ``[d:]``, and entry ``w``
gates over the A halves of window ``w-1`` and the B halves of window ``w`` (8 slots). Gating is a softmax over the
token slots, per channel, in fp32.

Unlike the official code (one prefill at position 0, then single tokens) this handles ``S`` new tokens per row at any
per-row position: the row's buffered tokens and the chunk are laid out on one window-aligned axis, every window
that completes inside the chunk is pooled, and the buffers are rebuilt from the same axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.config import Config
from dsv4_jax.kernels import bf16_proj, use_triton
from dsv4_jax.kernels.bf16_proj import bf16_projections
from dsv4_jax.kernels.compressor_step import compress_decode
from dsv4_jax.kernels.hadamard import hadamard
from dsv4_jax.modeling.layers import apply_rope, rms_norm, rope_cos_sin
from dsv4_jax.modeling.quant import Fp4Tensor, Fp8Cache, encode_fp4_cache, encode_fp8_cache
from dsv4_jax.modeling.state import in_layout
from dsv4_jax.modeling.weights import CompressorWeights

NEG_INF = -jnp.inf


def _gather_tokens(src: jax.Array, idx: jax.Array, valid: jax.Array, fill: float) -> jax.Array:
    """``src [B, N, C]`` gathered at ``idx [B, L]`` (clamped), ``fill`` where not ``valid``."""
    g = jnp.take_along_axis(src, jnp.clip(idx, 0, src.shape[1] - 1)[..., None], axis=1)
    return jnp.where(valid[..., None], g, fill)


def _sum_slots(x: jax.Array) -> jax.Array:
    """Sum over the slot axis 2 in the reference's order: torch reduces a non-innermost axis by accumulating runs of
    16 rows in sequence and then the partial sums in sequence (``cascade_sum``); fp32 order matters here because
    the pooled entry is snapped to FP8 afterwards."""
    n = x.shape[2]
    chunk = 16 if n % 16 == 0 else n
    parts = []
    for c0 in range(0, n, chunk):
        acc = x[:, :, c0]
        for i in range(c0 + 1, c0 + chunk):
            acc = acc + x[:, :, i]
        parts.append(acc)
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out


# Rows from which a chunk of bf16 activations takes the projection on the tensor cores (:func:`tensor_core_project`)
TC_MIN_ROWS = 64


def tensor_core_project(kernels: str, w: CompressorWeights, x: jax.Array) -> bool:
    """Whether :func:`_project` multiplies ``x`` and the weights as bf16 with fp32 accumulation instead of casting
    both to fp32 first: for chunks of at least :data:`TC_MIN_ROWS` rows of bf16 activations and bf16 weights (as
    shipped), off the CPU, unless ``kernels="reference"``. The product of two bf16 values is exact in fp32, so both
    forms sum the same exact products in fp32; they differ in the order and rounding of the partial sums. Measured on
    an H200 (2026-12-04; ``scripts/bench_prefill_ops.py --ops compressor``: 8,192 x 4,096 by 4,096 x 1,024, error
    against float64 in units of ``2**-24 * sum |x_k w_k|``): XLA's fp32 ``HIGHEST`` form 1.74 ms (40 TFLOP/s), error
    mean 0.16 / max 3.7; the tensor-core form 0.30 ms, mean 1.4 / max 11.7 (the tensor cores' accumulation is not a
    chain of round-to-nearest fp32 adds), both far inside the fp32 dot's bound of ``K`` = 4,096 units and far below
    the bf16/FP8 roundings that follow. The golden criteria passed with it (``DSV4_KERNELS=auto``); a 128K prefill
    ran at 254,447 tokens/s per layer against 234,376. Decode steps and speculative-verify chunks (below the
    threshold) keep the fp32 form, so a rollback's rebuilt buffers (:func:`rebuild_buffers`, same rule, same
    ``kernels``) match the chunk's bit for bit. On accelerators a token's projection thus depends on whether its
    chunk has 64+ rows (the fp32 sums' order and rounding, as above): a prompt prefilled whole or in small chunks can
    differ there at the fp32 ulp level, before the bf16/FP8 roundings."""
    return (x.shape[1] >= TC_MIN_ROWS and x.dtype == jnp.bfloat16 and w.wkv.dtype == jnp.bfloat16
            and w.wgate.dtype == jnp.bfloat16 and kernels != "reference" and jax.default_backend() != "cpu")


def _project(w: CompressorWeights, x: jax.Array, pos: jax.Array, m: int, kernels: str,
             with_ape: bool = True, proj: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
    """The chunk's projections ``kv``/``sc`` ``[B, S, c*d]`` fp32, the score with ``ape`` of each token's place in
    its window unless ``with_ape`` is off (the decode kernel adds it itself: one XLA kernel fewer per compressor and
    step) (``kernels``: :func:`tensor_core_project`; the fp32 form by :func:`bf16_projections`, a kernel at decode
    rows where it is switched on). ``proj``: ``kv``/``sc`` already made by the caller (the attention's one launch
    for all of a CSA layer's bf16 projections), the same values as here."""
    S = x.shape[1]
    with jax.named_scope("compressor_proj"):
        if proj is not None:
            kv, sc = proj
        elif tensor_core_project(kernels, w, x):
            kv = jnp.einsum("bsk,nk->bsn", x, w.wkv, preferred_element_type=jnp.float32)  # [B,S,c*d]
            sc = jnp.einsum("bsk,nk->bsn", x, w.wgate, preferred_element_type=jnp.float32)
        else:  # fp32 sums of the exact products: XLA's HIGHEST einsum, or the kernel (HCA: bf16_proj.HCA)
            kn = kernels if m == 4 or bf16_proj.HCA else "reference"
            kv, sc = bf16_projections(x, (w.wkv, w.wgate), (jnp.float32, jnp.float32), kernels=kn)
        if with_ape:
            t = pos[:, None] + jnp.arange(S)[None, :]  # [B,S] absolute positions
            sc = sc + w.ape[t % m]  # position inside its window
    return kv, sc


def _token_axis(kv_buf: jax.Array, score_buf: jax.Array, pos: jax.Array, n_new: jax.Array, m: int,
                proj: tuple[jax.Array, jax.Array]):
    """Lay the row's buffered tokens and a chunk's projections ``proj`` (:func:`_project`'s ``kv``/``sc``
    ``[B,S,c*d]``) on one window-aligned axis.

    Returns ``kv_ax``/``sc_ax`` ``[B, L, c*d]`` fp32 (axis slot ``r`` = absolute position ``base + r``; slots
    without a token hold kv 0 / score -inf) and ``base [B]``. ``L = P + m*nwin`` covers the previous complete window
    (``P = m`` with overlap), the current partial one and every window the chunk reaches.
    """
    overlap = m == 4
    c = 2 if overlap else 1
    kv, sc = proj
    S = kv.shape[1]
    P = m if overlap else 0  # buffer slots holding the previous complete window
    nwin = (m - 1 + S + m - 1) // m  # windows that can be touched by this chunk
    L = P + m * nwin

    # one window-aligned axis r = 0..L-1 at absolute positions base + r
    base = (pos // m) * m - P  # [B]
    off = pos % m  # tokens of the current window already buffered
    r = jnp.arange(L)[None, :]
    j = r - P
    from_prev = r < P
    from_cur = (~from_prev) & (j < off[:, None])
    s_idx = j - off[:, None]
    from_new = (~from_prev) & (~from_cur) & (s_idx < n_new[:, None])
    src_idx = jnp.where(from_prev | from_cur, r, c * m + s_idx)
    valid = (from_prev & (base[:, None] >= 0)) | from_cur | from_new
    kv_all = jnp.concatenate([kv_buf, kv], axis=1)
    sc_all = jnp.concatenate([score_buf, sc], axis=1)
    return _gather_tokens(kv_all, src_idx, valid, 0.0), _gather_tokens(sc_all, src_idx, valid, NEG_INF), base


def _buffers(kv_ax: jax.Array, sc_ax: jax.Array, base: jax.Array, end: jax.Array, m: int):
    """The compressor buffers ``[B, c*m, c*d]`` for a row whose next position is ``end [B]``, read off the token axis
    of :func:`_token_axis`: the current partial window (and with overlap the previous complete one before it)."""
    cw = (end // m) * m  # start of the new current (partial) window
    jj = jnp.arange(m)[None, :]
    r_cur = (cw - base)[:, None] + jj
    cur_valid = cw[:, None] + jj < end[:, None]
    new_kv = [_gather_tokens(kv_ax, r_cur, cur_valid, 0.0)]
    new_sc = [_gather_tokens(sc_ax, r_cur, cur_valid, NEG_INF)]
    if m == 4:  # overlap
        r_prev = (cw - m - base)[:, None] + jj
        prev_valid = jnp.broadcast_to((cw - m >= 0)[:, None], r_prev.shape)
        new_kv.insert(0, _gather_tokens(kv_ax, r_prev, prev_valid, 0.0))
        new_sc.insert(0, _gather_tokens(sc_ax, r_prev, prev_valid, NEG_INF))
    return jnp.concatenate(new_kv, axis=1), jnp.concatenate(new_sc, axis=1)


def compress(cfg: Config, w: CompressorWeights, x: jax.Array, cache, kv_buf: jax.Array, score_buf: jax.Array,
             pos: jax.Array, n_new: jax.Array, ratio: int, freqs, indexer: bool,
             proj: tuple[jax.Array, jax.Array] | None = None):
    """Run the compressor over a chunk and write the windows it completes into the compressed cache.

    Args:
      x: ``[B, S, D]`` attention input (act dtype). cache: ``[B, N, d]`` compressed cache (plain, or the snapped
      codes: an ``Fp8Cache`` for the attention compressor, an ``Fp4Tensor`` for the indexer's).
      ``kv_buf``/``score_buf``: ``[B, c*m, c*d]`` fp32 buffers. pos: ``[B]`` position of the chunk's first token per
      row; ``n_new``: ``[B]`` valid tokens per row.
      indexer: indexer compressor (Hadamard + FP4 snapping) instead of the attention one (FP8 snapping).
      proj: the chunk's ``kv``/``sc`` projections (``[B, S, c*d]`` fp32, the score without ``ape``) where the caller
      made them (:func:`_project`), else None.
    Returns:
      the new cache and the new buffers.

    Every window on the chunk's token axis is pooled, and the complete ones are written (the others' ids are -1:
    dropped). A decode step completes a window only every ``m`` tokens, but skipping the pooling on the other steps
    with a ``jax.lax.cond`` did not pay on an H200 (2026-12-01, batch 1, 3 V4-Flash layers: the 5 conditionals of a
    step removed ~45 us of kernels and added ~85 us of idle time between graph nodes: 1.131 ms per looped step).
    A decode step (``S == 1``) of the attention compressor with FP8-snapped caches, or of the indexer's with
    FP4-snapped ones (``cfg.simulate``, an ``Fp4Tensor`` cache), runs everything after the projection in one Triton
    kernel where :func:`dsv4_jax.kernels.use_triton` says so (:func:`dsv4_jax.kernels.compressor_step.compress_decode`;
    both variants' GPU tests passed on an H200).
    """
    snapped = (indexer and cfg.simulate and isinstance(cache, Fp4Tensor)) or (
        not indexer and cfg.kv_fp8_sim and isinstance(cache, Fp8Cache))
    if x.shape[1] == 1 and snapped and x.shape[0] > 0 and use_triton(cfg):  # a decode step: one Triton kernel
        kv, sc = _project(w, x, pos, ratio, cfg.kernels, with_ape=False, proj=proj)  # [B,1,c*d] fp32, no ape
        return compress_decode(cfg, w, kv[:, 0], sc[:, 0], cache, kv_buf, score_buf, pos, n_new, ratio, freqs,
                               indexer=indexer)  # for everything after the projection, ape's add included
    kv, sc = _project(w, x, pos, ratio, cfg.kernels, proj=proj)  # [B,S,c*d] fp32
    return compress_projected(cfg, w, kv, sc, cache, kv_buf, score_buf, pos, n_new, ratio, freqs, indexer)


def compress_projected(cfg: Config, w: CompressorWeights, kv: jax.Array, sc: jax.Array, cache, kv_buf: jax.Array,
                       score_buf: jax.Array, pos: jax.Array, n_new: jax.Array, ratio: int, freqs, indexer: bool):
    """:func:`compress` after the projection: ``kv``/``sc`` ``[B, S, c*d]`` fp32 are :func:`_project`'s (the score
    with ``ape``). The XLA path of every chunk, and the reference of the decode kernel
    (:mod:`dsv4_jax.kernels.compressor_step`)."""
    m = ratio
    kv_ax, sc_ax, base = _token_axis(kv_buf, score_buf, pos, n_new, m, (kv, sc))
    nwin = (kv_ax.shape[1] - (m if m == 4 else 0)) // m
    entry_ids = pos[:, None] // m + jnp.arange(nwin)[None, :]  # [B, nwin]
    complete = (entry_ids + 1) * m <= (pos + n_new)[:, None]

    e = _pool(cfg, w, kv_ax, sc_ax, entry_ids, complete, m, freqs, indexer)
    cache = write_entries(cache, e, jnp.where(complete, entry_ids, -1))
    new_kv, new_sc = _buffers(kv_ax, sc_ax, base, pos + n_new, m)  # rebuilt for the new end position
    return cache, new_kv, new_sc


def _pool(cfg: Config, w: CompressorWeights, kv_ax: jax.Array, sc_ax: jax.Array, entry_ids: jax.Array,
          complete: jax.Array, m: int, freqs, indexer: bool):
    """The entries ``[B, nwin, d]`` of the windows on the token axis (act dtype, or their snapped codes): gated
    pooling (a softmax over the slots per channel, fp32), the norm, RoPE at the window's first position, and the
    snap (FP8 for the attention compressor; Hadamard and FP4 for the indexer's). Incomplete windows give values that
    are never written."""
    overlap = m == 4
    c = 2 if overlap else 1
    B, L = kv_ax.shape[:2]
    d = w.norm.shape[0]
    with jax.named_scope("compressor_pool"):
        kv_w = kv_ax.reshape(B, L // m, m, c * d)
        sc_w = sc_ax.reshape(B, L // m, m, c * d)
        if overlap:  # A halves of the previous window + B halves of this window: 2m slots
            kv_s = jnp.concatenate([kv_w[:, :-1, :, :d], kv_w[:, 1:, :, d:]], axis=2)
            sc_s = jnp.concatenate([sc_w[:, :-1, :, :d], sc_w[:, 1:, :, d:]], axis=2)
        else:
            kv_s, sc_s = kv_w, sc_w
        safe_sc = jnp.where(complete[:, :, None, None], sc_s, 0.0)
        gate = jax.nn.softmax(safe_sc, axis=2)
        pooled = _sum_slots(gate * kv_s)  # [B, nwin, d] fp32

    with jax.named_scope("compressor_post"):
        e = rms_norm(pooled.astype(cfg.act_dtype), w.norm, cfg.norm_eps, cfg.act_dtype)
        cos, sin = rope_cos_sin(freqs, entry_ids * m)  # rope position = first token of the window
        e = apply_rope(e, cos, sin)
        if indexer:
            e = hadamard(e, cfg.act_dtype, kernels=cfg.kernels)
            if cfg.simulate:
                e = encode_fp4_cache(e)  # the FP4 snap (spec 3.3) as packed codes + scales
        elif cfg.kv_fp8_sim:
            e = encode_fp8_cache(e, cfg.nope_dim)  # the FP8 snap of the nope dims (spec 3.2) as codes + scales
    return e


def rebuild_buffers(w: CompressorWeights, x: jax.Array, kv_buf: jax.Array, score_buf: jax.Array, pos: jax.Array,
                    n_new: jax.Array, ratio: int, kernels: str) -> tuple[jax.Array, jax.Array]:
    """The buffers :func:`compress` would return for the same chunk, without pooling any entry: what a rollback to
    ``n_new`` tokens of a longer chunk needs (the projections of the ``S`` chunk tokens are recomputed, ~``S*D*2cd``
    multiply-adds, because the verify pass that computed them does not keep them). Bit for bit the same buffers."""
    with jax.named_scope("compressor_rebuild"):
        proj = _project(w, x, pos, ratio, kernels)
        kv_ax, sc_ax, base = _token_axis(kv_buf, score_buf, pos, n_new, ratio, proj)
        return _buffers(kv_ax, sc_ax, base, pos + n_new, ratio)


def write_entries(cache, entries, entry_ids: jax.Array):
    """Scatter ``entries [B, n, d]`` into ``cache [B, N, d]`` at ``entry_ids [B, n]``; -1 ids are dropped. Cache and
    entries are plain arrays or snapped codes (every leaf is scattered); snapped entries written into a plain cache
    are decoded first."""
    entries = in_layout(entries, cache)
    B, N = cache.shape[:2]
    ids = jnp.where(entry_ids < 0, N, entry_ids)  # out of range -> dropped
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], ids.shape)
    return jax.tree_util.tree_map(lambda c, e: c.at[rows, ids].set(e.astype(c.dtype), mode="drop"), cache, entries)
