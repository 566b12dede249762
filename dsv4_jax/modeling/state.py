"""The decode state: one immutable pytree holding every cache of every layer and a position per row.

Per main layer (spec 11), all batch-major so rows can be split over a data axis:
  * ``kv``      [B, W, Dh]         window ring, slot = position mod W (single shared K=V head, FP8-snapped nope dims)
  * ``ckv``     [B, max_len//m, Dh] compressed entries (m = 4 or 128), entry w summarises tokens [w*m, (w+1)*m)
  * ``c_kv``/``c_score`` [B, c*m, c*d] fp32 compressor buffers; with overlap (m=4, c=2) slots [0:m] hold the last
    complete window and [m:2m] the current partial one; without overlap [0:m] is the partial window
  * ``ikv``     [B, max_len//4, Di] indexer keys (CSA layers), ``ic_kv``/``ic_score`` the indexer compressor buffers
Unused buffer slots are canonical (kv 0, score -inf), so states reached through different chunkings compare equal.

The caches are stored in the formats the reference snaps them to, which loses nothing (the same values come back):
where the config snaps the KV (``cfg.kv_fp8_sim``) ``kv``/``ckv`` are :class:`~dsv4_jax.modeling.quant.Fp8Cache`
(583 bytes per V4 entry instead of 1024), where it snaps the indexer keys (``cfg.simulate``) ``ikv`` is an
:class:`~dsv4_jax.modeling.quant.Fp4Tensor` (68 bytes instead of 256). Otherwise (float32 oracle numerics, the
initial release's KV) they are plain arrays of the activation dtype. One row of 2**20 tokens, main and MTP layers:
V4-Flash 3,524 bytes per token (6,897 with bf16 caches), V4-Pro 5,046 (9,874); ``state_bytes_by_leaf`` itemizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dsv4_jax.config import Config
from dsv4_jax.errors import UserInputError
from dsv4_jax.modeling.quant import Fp4Tensor, Fp8Cache, cache_values


@struct.dataclass
class LayerState:
    kv: jax.Array | Fp8Cache
    ckv: jax.Array | Fp8Cache | None = None
    c_kv: jax.Array | None = None
    c_score: jax.Array | None = None
    ikv: jax.Array | Fp4Tensor | None = None
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


def _kv_cache(cfg: Config, lead: tuple[int, ...], snapped: bool) -> jax.Array | Fp8Cache:
    """An empty KV cache ``[*lead, Dh]``: FP8 codes where the config snaps the KV, else plain values."""
    dt, Dh, Dn = cfg.act_dtype, cfg.head_dim, cfg.nope_dim
    if not (snapped and cfg.kv_fp8_sim):
        return jnp.zeros((*lead, Dh), dt)
    return Fp8Cache(codes=jnp.zeros((*lead, Dn), jnp.float8_e4m3fn), scales=jnp.zeros((*lead, Dn // 64), jnp.uint8),
                    rope=jnp.zeros((*lead, Dh - Dn), dt))


def _index_cache(cfg: Config, lead: tuple[int, ...], snapped: bool) -> jax.Array | Fp4Tensor:
    """An empty indexer key cache ``[*lead, Di]``: packed FP4 codes where the config snaps the keys, else plain."""
    Di = cfg.index_head_dim
    if not (snapped and cfg.simulate):
        return jnp.zeros((*lead, Di), cfg.act_dtype)
    return Fp4Tensor(packed=jnp.zeros((*lead, Di // 2), jnp.uint8), scale=jnp.zeros((*lead, Di // 32), jnp.uint8))


def _layer_state(cfg: Config, ratio: int, batch: int, max_len: int, snapped: bool) -> LayerState:
    Dh = cfg.head_dim
    kw = dict(kv=_kv_cache(cfg, (batch, cfg.window_size), snapped))
    if ratio:
        c = 2 if ratio == 4 else 1
        kw.update(ckv=_kv_cache(cfg, (batch, max_len // ratio), snapped),
                  c_kv=jnp.zeros((batch, c * ratio, c * Dh), jnp.float32),
                  c_score=jnp.full((batch, c * ratio, c * Dh), -jnp.inf, jnp.float32))
    if ratio == 4:
        Di = cfg.index_head_dim
        kw.update(ikv=_index_cache(cfg, (batch, max_len // 4), snapped),
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


def init_state(cfg: Config, batch_size: int, max_len: int, *, snapped: bool = True) -> State:
    """A fresh state (every cache empty, every row at position 0) for ``batch_size`` rows of up to ``max_len``
    tokens. ``jax.eval_shape(lambda: init_state(...))`` gives its abstract shapes.

    ``snapped=False`` keeps every cache as plain activation-dtype values even where the config snaps them (the
    layout before the snapped formats: the same numbers at ~1.9x the bytes), for comparisons; the model computes
    the same logits, bit for bit, with either.

    ``max_len`` beyond ``cfg.max_position_embeddings`` is refused here with a ``UserInputError``: every state (for
    ``forward`` and for ``generate``) is made by this factory, so this is the one place that bounds every position a
    state can hold. (``generate``/``prefill`` check the same limit, and the prompt lengths, before any compute.)
    """
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"init_state: batch_size={batch_size} and max_len={max_len} must be >= 1")
    check_max_len(cfg, max_len, "init_state")
    layers = tuple(_layer_state(cfg, cfg.ratio(i), batch_size, max_len, snapped) for i in range(cfg.n_layers))
    mtp = tuple(_layer_state(cfg, cfg.ratio(cfg.n_layers + j), batch_size, max_len, snapped)
                for j in range(cfg.n_mtp_layers))
    # two distinct buffers: a donated state must not alias one array twice
    return State(pos=jnp.zeros((batch_size,), jnp.int32), layers=layers, mtp=mtp,
                 mtp_pos=jnp.zeros((batch_size,), jnp.int32), max_len=max_len)


def state_bytes(state: State) -> int:
    """Total bytes of the state's arrays (also of ``jax.eval_shape``'s abstract state)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))


def state_bytes_by_leaf(state: State) -> dict[str, int]:
    """Bytes per kind of leaf summed over layers and MTP layers, e.g. ``{"ckv.codes": ..., "c_kv": ..., "pos":
    ...}``: where a state's memory goes."""
    out: dict[str, int] = {}
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
        key = ".".join(names[1:] if names[0] in ("layers", "mtp") else names)
        out[key] = out.get(key, 0) + x.size * x.dtype.itemsize
    return out


def in_layout(entries, cache):
    """``entries`` (new cache rows, plain or snapped) in the layout of ``cache``: snapped entries are decoded to the
    dtype of a plain cache (``init_state(..., snapped=False)``); a snapped cache requires snapped entries."""
    if not isinstance(cache, (Fp8Cache, Fp4Tensor)):
        return cache_values(entries, cache.dtype)
    if type(entries) is not type(cache):
        raise TypeError(f"a {type(cache).__name__} cache needs {type(cache).__name__} entries, got "
                        f"{type(entries).__name__}: the state was built for a config with other numerics")
    return entries
