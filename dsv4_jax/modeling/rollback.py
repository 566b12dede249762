"""Exact rollback of a multi-token chunk to a per-row prefix of it (speculative decoding's verify step).

A verify pass feeds ``S`` tokens per row at positions ``pos .. pos+S-1``; afterwards each row keeps only its first
``keep`` of them. The state must then be exactly (bit for bit) what feeding those ``keep`` tokens alone would give.
What one chunk changes in a :class:`~dsv4_jax.modeling.state.LayerState`, and how each part is put back:

* ``kv`` window ring: the ``S`` slots ``(pos + j) % W`` (distinct when ``S <= W``). Slots ``j >= keep`` get their
  old contents back, saved before the chunk (position-masked selection on ``S`` slots).
* ``ckv`` / ``ikv`` compressed entries: the chunk can only complete entries ``pos//m .. (pos+S)//m - 1``, at most
  ``(m-1+S)//m`` ids. Those not complete after ``keep`` tokens (``id >= (pos+keep)//m``) get their old contents
  back: a compression window that closed inside rejected tokens is undone. Kept entries are the verify's own: an
  entry is pooled from its own window's tokens only, so it does not depend on how many tokens followed.
* ``c_kv``/``c_score`` (and the indexer's ``ic_*``) compressor buffers: they are rebuilt from scratch by the
  compressor for the new end position, so they are recomputed (:func:`~dsv4_jax.modeling.compressor.
  rebuild_buffers`) from the buffers before the chunk and the layer's attention input for the chunk: the same
  function on the same values, so the same bits.

The saved pieces (:class:`UndoLog`) are small: ``S`` ring slots, ``(m-1+S)//m`` entries per compressed cache and
the compressor buffers; nothing proportional to the context is copied (the chunk's writes can stay in place). The
cost of the exact rollback is the buffer recompute: two ``[S,D] x [D,c*d]`` fp32 products per compressor, i.e.
3.5 % of a V4-Flash CSA layer's multiply-adds per token (1.4 % for HCA), and re-reading the compressor weights once
per verify (0.61 GB for V4-Flash, ~5 % of the ~11.5 GB a batch-1 plain step reads), plus gathers and scatters of a
few entries. (Selecting the buffers from the pre- and post-chunk ones instead would avoid the recompute except when
the chunk crossed a window boundary that the kept prefix does not reach, but needs a data-dependent branch.)

The MTP drafts use :func:`undo` (``keep = 0`` for every row: the drafts' entries are all put back, the buffers
restored as saved).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dsv4_jax.config import Config
from dsv4_jax.modeling.compressor import rebuild_buffers
from dsv4_jax.modeling.state import LayerState
from dsv4_jax.modeling.weights import AttentionWeights


@struct.dataclass
class UndoLog:
    """What a chunk of ``S`` tokens may overwrite in one layer, saved before it (leaves of the cache layouts)."""

    ring: object  # leaves [B, S, ...]: window-ring slots (pos + j) % W
    ckv: object = None  # leaves [B, n_ids, ...]: compressed entries pos//m + i
    ikv: object = None  # leaves [B, n_ids, ...]: indexer keys pos//4 + i
    c_kv: jax.Array | None = None  # [B, c*m, c*d] fp32 compressor buffers (whole: the compressor rebuilds them)
    c_score: jax.Array | None = None
    ic_kv: jax.Array | None = None  # [B, 8, 2*Di] indexer-compressor buffers
    ic_score: jax.Array | None = None


def _ring_slots(pos: jax.Array, S: int, W: int) -> jax.Array:
    """``[B, S]`` ring slots of positions ``pos .. pos+S-1``."""
    return (pos[:, None] + jnp.arange(S)[None, :]) % W


def _entry_ids(pos: jax.Array, S: int, m: int) -> jax.Array:
    """``[B, n]`` ids of every compressed entry a chunk of ``S`` tokens at ``pos`` can complete."""
    return pos[:, None] // m + jnp.arange((m - 1 + S) // m)[None, :]


def _take(cache, idx: jax.Array):
    """Rows ``idx [B, n]`` of every leaf ``[B, N, d]`` of a cache (clamped: ids past the end read the last row)."""
    return jax.tree_util.tree_map(
        lambda a: jnp.take_along_axis(a, jnp.clip(idx, 0, a.shape[1] - 1)[..., None], axis=1), cache)


def _put_back(cache, idx: jax.Array, saved, restore: jax.Array):
    """``cache`` with rows ``idx [B, n]`` set to ``saved`` where ``restore [B, n]`` (ids past the end dropped)."""
    def put(a, v):
        N = a.shape[1]
        ids = jnp.where(restore, idx, N)  # N: dropped
        rows = jnp.broadcast_to(jnp.arange(a.shape[0])[:, None], ids.shape)
        return a.at[rows, ids].set(v, mode="drop")

    return jax.tree_util.tree_map(put, cache, saved)


def snapshot(ls: LayerState, pos: jax.Array, S: int, ratio: int, W: int) -> UndoLog:
    """Save what a chunk of ``S <= W`` tokens at positions ``pos [B]`` may overwrite in layer state ``ls``."""
    with jax.named_scope("undo_log"):
        log = dict(ring=_take(ls.kv, _ring_slots(pos, S, W)))
        if ratio:
            log.update(ckv=_take(ls.ckv, _entry_ids(pos, S, ratio)), c_kv=ls.c_kv, c_score=ls.c_score)
        if ratio == 4:
            log.update(ikv=_take(ls.ikv, _entry_ids(pos, S, 4)), ic_kv=ls.ic_kv, ic_score=ls.ic_score)
        return UndoLog(**log)


def _restore_caches(ls: LayerState, log: UndoLog, pos: jax.Array, S: int, keep: jax.Array, ratio: int,
                    W: int) -> dict:
    """The ring and compressed caches of ``ls`` with everything past ``keep [B]`` tokens of the chunk put back."""
    slots = _ring_slots(pos, S, W)
    new = dict(kv=_put_back(ls.kv, slots, log.ring, jnp.arange(S)[None, :] >= keep[:, None]))
    end = pos + keep
    for name, m in (("ckv", ratio), ("ikv", 4 if ratio == 4 else 0)):
        if m:
            ids = _entry_ids(pos, S, m)
            new[name] = _put_back(getattr(ls, name), ids, getattr(log, name), ids >= (end // m)[:, None])
    return new


def undo(ls: LayerState, log: UndoLog, pos: jax.Array, S: int, ratio: int, W: int) -> LayerState:
    """``ls`` after a chunk of ``S`` tokens at ``pos`` -> ``ls`` before it, exactly (every row keeps nothing)."""
    with jax.named_scope("undo"):
        new = _restore_caches(ls, log, pos, S, jnp.zeros_like(pos), ratio, W)
        for name in ("c_kv", "c_score", "ic_kv", "ic_score"):
            if getattr(log, name) is not None:
                new[name] = getattr(log, name)
        return ls.replace(**new)


def rollback(w: AttentionWeights, ls: LayerState, log: UndoLog, x: jax.Array, pos: jax.Array, keep: jax.Array,
             ratio: int, W: int, kernels: str) -> LayerState:
    """``ls`` after a chunk ``x [B,S,D]`` (the layer's attention input) at ``pos [B]`` -> the state after only its
    first ``keep [B]`` tokens, bit for bit as if only those had been fed (``kernels``: the config's, which chose
    the chunk's compressor projection)."""
    S = x.shape[1]
    with jax.named_scope("rollback"):
        new = _restore_caches(ls, log, pos, S, keep, ratio, W)
        if ratio:
            new["c_kv"], new["c_score"] = rebuild_buffers(w.compressor, x, log.c_kv, log.c_score, pos, keep, ratio,
                                                         kernels)
        if ratio == 4:
            new["ic_kv"], new["ic_score"] = rebuild_buffers(w.indexer.compressor, x, log.ic_kv, log.ic_score, pos,
                                                            keep, 4, kernels)
        return ls.replace(**new)


def check_chunk_fits(cfg: Config, S: int) -> None:
    """A rolled-back chunk must not write a ring slot twice: ``S <= window_size``."""
    if S > cfg.window_size:
        raise ValueError(f"a rollback chunk of {S} tokens needs window_size >= {S}, the config has "
                         f"{cfg.window_size}")
