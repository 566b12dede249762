"""The XLA reference of sparse attention (spec 6, the official ``sparse_attn``): the code the model always ran, the
CPU path and the oracle of the Triton kernel in :mod:`dsv4_jax.kernels.sparse_attention` (whose public function
dispatches between the two). It concatenates ``[ring | chunk | compressed]``, gathers each query row's index list,
and rounds P to ``p_dtype`` relative to the row's final maximum, for P.V only; long chunks go in blocks of rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.modeling.quant import cache_values, dot_f32

BUDGET = 4 << 30  # bytes of per-row temporaries (gathered entries, scores) one block of query rows may hold


def rows_per_block(B: int, S: int, H: int, Dh: int, K: int, budget: int = BUDGET) -> int:
    """Query rows per block of :func:`sparse_attention_reference` (all ``S`` when they fit): each row holds its ``K``
    gathered entries (decoded: fp32 while decoding, then ``q.dtype``, ~6 bytes per dim) and ``H x K`` fp32 scores
    and probabilities."""
    per_row = B * K * (6 * Dh + 8 * H)
    return max(1, min(S, budget // max(per_row, 1)))


def sparse_attention_reference(q: jax.Array, ring, chunk, comp, idx: jax.Array, sink: jax.Array, scale: float,
                               p_dtype, budget: int = BUDGET) -> jax.Array:
    """Attention over gathered index lists, XLA.

    q ``[B,S,H,Dh]``; ring ``[B,W,Dh]``, chunk ``[B,S,Dh]``, comp ``[B,Nc,Dh]`` or None (plain arrays or
    :class:`Fp8Cache`; the gathered entries are decoded to ``q.dtype``); idx ``[B,S,K]`` into their concatenation
    (-1 = masked); sink ``[H]`` fp32. Scores and sums in fp32; the probabilities are rounded to ``p_dtype`` for the
    P.V product only. Returns ``[B,S,H,Dh]`` in ``q.dtype``.

    Every query row's result depends on its own q and index list only, so long chunks are computed in blocks of
    :func:`rows_per_block` rows (``jax.lax.map``; padded rows are fully masked and dropped): the gathered
    ``[B,S,K,Dh]`` entries of one 8192-token chunk at 1M context (HCA: K = 8320) would be 70 GB at once.
    """
    bufs = [ring, chunk] + ([comp] if comp is not None else [])
    kv = jax.tree_util.tree_map(lambda *b: jnp.concatenate(b, axis=1), *bufs)  # [B, W+S+Nc, Dh], stored layout
    B, S, H, Dh = q.shape
    rows = rows_per_block(B, S, H, Dh, idx.shape[-1], budget)
    if rows >= S:
        return _attend(q, kv, idx, sink, scale, p_dtype)
    n = -(-S // rows)
    pad = n * rows - S
    qb = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, n, rows, H, Dh).swapaxes(0, 1)
    ib = jnp.pad(idx, ((0, 0), (0, pad), (0, 0)), constant_values=-1).reshape(B, n, rows, -1).swapaxes(0, 1)
    out = jax.lax.map(lambda a: _attend(a[0], kv, a[1], sink, scale, p_dtype), (qb, ib))  # [n, B, rows, H, Dh]
    return out.swapaxes(0, 1).reshape(B, n * rows, H, Dh)[:, :S]


def _attend(q: jax.Array, kv, idx: jax.Array, sink: jax.Array, scale: float, p_dtype) -> jax.Array:
    """:func:`sparse_attention_reference` for query rows ``q [B,s,H,Dh]`` with index lists ``idx [B,s,K]`` into the
    concatenated buffers ``kv``."""
    valid = idx >= 0
    take = jnp.clip(idx, 0)[..., None]  # [B,S,K,1]
    g = jax.tree_util.tree_map(lambda a: jnp.take_along_axis(a[:, None], take, axis=2), kv)  # leaves [B,S,K,.]
    g = cache_values(g, q.dtype)  # [B,S,K,Dh]
    g = jnp.where(valid[..., None], g, jnp.zeros((), g.dtype))
    s = dot_f32(q, g.astype(q.dtype), "bshd,bskd->bshk") * np.float32(scale)
    s = jnp.where(valid[:, :, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)  # over the scores only: P is rounded relative to it
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # a fully masked row (a padding row; a query always sees itself)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True) + jnp.exp(sink[:, None] - m)
    acc = dot_f32(p.astype(p_dtype), g.astype(p_dtype), "bshk,bskd->bshd")
    return (acc / denom).astype(q.dtype)
