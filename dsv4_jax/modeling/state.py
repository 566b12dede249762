"""The decode state: one immutable pytree holding every cache of every layer and a position per row.

Per main layer (spec 11), all batch-major so rows can be split over a data axis:
  * ``kv``      [B, W, Dh]         window ring, slot = position mod W (single shared K=V head, FP8-snapped nope dims)
  * ``ckv``     [B, max_len//m, Dh] compressed entries (m = 4 or 128), entry w summarises tokens [w*m, (w+1)*m)
  * ``c_kv``/``c_score`` [B, c*m, c*d] fp32 compressor buffers; with overlap (m=4, c=2) slots [0:m] hold the last
    complete window and [m:2m] the current partial one; without overlap [0:m] is the partial window
  * ``ikv``     [B, max_len//4, Di] indexer keys (CSA layers), ``ic_kv``/``ic_score`` the indexer compressor buffers
Unused buffer slots are canonical (kv 0, score -inf), so states reached through different chunkings compare equal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dsv4_jax.config import Config
from dsv4_jax.errors import UserInputError


@struct.dataclass
class LayerState:
    kv: jax.Array
    ckv: jax.Array | None = None
    c_kv: jax.Array | None = None
    c_score: jax.Array | None = None
    ikv: jax.Array | None = None
    ic_kv: jax.Array | None = None
    ic_score: jax.Array | None = None


@struct.dataclass
class State:
    pos: jax.Array  # int32 [B]: tokens already processed per row (= position of the next token)
    layers: tuple[LayerState, ...]
    mtp: tuple[LayerState, ...]
    mtp_pos: jax.Array  # int32 [B]: tokens already processed by the MTP block per row
    max_len: int = struct.field(pytree_node=False, default=0)

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]


def _layer_state(cfg: Config, ratio: int, batch: int, max_len: int) -> LayerState:
    dt = cfg.act_dtype
    Dh = cfg.head_dim
    kw = dict(kv=jnp.zeros((batch, cfg.window_size, Dh), dt))
    if ratio:
        c = 2 if ratio == 4 else 1
        kw.update(ckv=jnp.zeros((batch, max_len // ratio, Dh), dt),
                  c_kv=jnp.zeros((batch, c * ratio, c * Dh), jnp.float32),
                  c_score=jnp.full((batch, c * ratio, c * Dh), -jnp.inf, jnp.float32))
    if ratio == 4:
        Di = cfg.index_head_dim
        kw.update(ikv=jnp.zeros((batch, max_len // 4, Di), dt),
                  ic_kv=jnp.zeros((batch, 8, 2 * Di), jnp.float32),
                  ic_score=jnp.full((batch, 8, 2 * Di), -jnp.inf, jnp.float32))
    return LayerState(**kw)


def context_limit(cfg: Config) -> str:
    """``cfg.max_position_embeddings`` and where it comes from, for error messages."""
    return (f"max_position_embeddings={cfg.max_position_embeddings} (the YaRN-extended context of the checkpoint's "
            f"config.json: rope_scaling.original_max_position_embeddings={cfg.original_seq_len} x "
            f"factor={cfg.rope_factor:g})")


def check_max_len(cfg: Config, max_len: int, who: str) -> None:
    """Refuse (:class:`~dsv4_jax.errors.UserInputError`) a cache longer than the model's context: positions beyond
    ``cfg.max_position_embeddings`` lie outside the range the YaRN RoPE was extended to (the release supports up to
    there), so their outputs would be unsupported extrapolation, not an error anyone would notice."""
    if max_len > cfg.max_position_embeddings:
        raise UserInputError(f"{who}: max_len={max_len} exceeds the model's {context_limit(cfg)}; use max_len <= "
                             f"{cfg.max_position_embeddings}")


def init_state(cfg: Config, batch_size: int, max_len: int) -> State:
    """A fresh state (every cache empty, every row at position 0) for ``batch_size`` rows of up to ``max_len``
    tokens. ``jax.eval_shape(lambda: init_state(...))`` gives its abstract shapes.

    ``max_len`` beyond ``cfg.max_position_embeddings`` is refused here with a ``UserInputError``: every state (for
    ``forward`` and for ``generate``) is made by this factory, so this is the one place that bounds every position a
    state can hold. (``generate``/``prefill`` check the same limit, and the prompt lengths, before any compute.)
    """
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"init_state: batch_size={batch_size} and max_len={max_len} must be >= 1")
    check_max_len(cfg, max_len, "init_state")
    layers = tuple(_layer_state(cfg, cfg.ratio(i), batch_size, max_len) for i in range(cfg.n_layers))
    mtp = tuple(_layer_state(cfg, cfg.ratio(cfg.n_layers + j), batch_size, max_len) for j in range(cfg.n_mtp_layers))
    # two distinct buffers: a donated state must not alias one array twice
    return State(pos=jnp.zeros((batch_size,), jnp.int32), layers=layers, mtp=mtp,
                 mtp_pos=jnp.zeros((batch_size,), jnp.int32), max_len=max_len)


def state_bytes(state: State) -> int:
    """Total bytes of the state's arrays."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))
