"""The whole model: blocks, forward over S new tokens per row on top of a state, the head, and the MTP block.

``forward`` is the single entry point for prefill (state at position 0), chunked prefill (several multi-token calls
in a row) and decode (S = 1); each row has its own position (``state.pos``) and optionally its own number of valid
tokens in the chunk (``lengths``, right padding), so uneven batches stay aligned with the compression windows.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv4_jax.config import Config
from dsv4_jax.kernels.mhc import hc_post_pre_norm_quant, hc_pre_norm_quant
from dsv4_jax.modeling.attention import attention
from dsv4_jax.modeling.hyper import hc_head, hc_post
from dsv4_jax.modeling.layers import rms_norm, rope_freqs
from dsv4_jax.modeling.moe import moe
from dsv4_jax.modeling.quant import dot_f32, linear
from dsv4_jax.modeling.state import LayerState, State
from dsv4_jax.modeling.weights import BlockWeights, HcWeights, Weights
from dsv4_jax.sharding import MODEL


def embed(table: jax.Array, tokens: jax.Array, vocab_size: int) -> jax.Array:
    """Rows of the embedding ``table [V, D]`` for ``tokens [B, S]`` (clipped into the vocabulary) -> ``[B, S, D]``.

    The table is split by rows over the mesh's ``model`` axis (the vocabulary). Left to XLA's partitioner, a GPU
    compile all-gathered the whole table (1.06 GB for V4-Flash) on every step: its kernel took 2.0 ms of the 3.6 ms
    batch-1 step on two H200s (``profile_decode.py --mesh 1x2``). Here each device looks up the tokens in its own
    rows and the rows are summed over ``model`` as integers: one device holds each row, the others give zero bits,
    so the sum is the row, bit for bit ([B, S, D] int32 moves instead of the table)."""
    ids = jnp.clip(tokens, 0, vocab_size - 1)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get(MODEL, 1) == 1:
        return table[ids]

    size = jnp.dtype(table.dtype).itemsize
    if size not in (2, 4):
        raise ValueError(f"embed: a {table.dtype} table under a mesh (the exact lookup sums 16- or 32-bit patterns)")
    bits_t = jnp.uint16 if size == 2 else jnp.int32

    def local(t, i):  # t [V / model, D]: this device's rows
        j = i - jax.lax.axis_index(MODEL) * t.shape[0]
        mine = (j >= 0) & (j < t.shape[0])
        bits = jax.lax.bitcast_convert_type(t[jnp.clip(j, 0, t.shape[0] - 1)], bits_t).astype(jnp.int32)
        bits = jax.lax.psum(jnp.where(mine[..., None], bits, 0), MODEL)  # [B, S, D] one nonzero term per element
        return jax.lax.bitcast_convert_type(bits.astype(bits_t), table.dtype)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(MODEL, None), P()), out_specs=P())(table, ids)


def block(cfg: Config, w: BlockWeights, ratio: int, h: jax.Array, ids: jax.Array, ls: LayerState, pos: jax.Array,
          n_new: jax.Array) -> tuple[jax.Array, LayerState, dict]:
    """One transformer block on the hc streams ``h [B,S,hc,D]``: mHC around attention, then around the MoE.

    Returns the new streams, the new layer state and the block's discrete decisions (``"indexer"`` top-k block ids
    ``[B,S,k]`` or None, ``"router"`` expert ids ``[B,S,k]``), plus ``"attn_input"`` ``[B,S,D]`` (the attention's
    input, from which a speculative rollback rebuilds the compressor buffers).
    """
    h, ls, aux = block_pending(cfg, w, ratio, h, ids, ls, pos, n_new)
    return streams(cfg, h), ls, aux


def block_pending(cfg: Config, w: BlockWeights, ratio: int, h, ids: jax.Array, ls: LayerState, pos: jax.Array,
                  n_new: jax.Array) -> tuple[tuple, LayerState, dict]:
    """:func:`block` with its last ``hc_post`` left pending: returns ``(out, h_res, post, comb)`` (:func:`streams`
    forms the streams) instead of the streams, and takes such a tuple for ``h`` as well. The next block's mHC
    kernels then form the streams where they read them (:func:`dsv4_jax.kernels.mhc.hc_post_pre_norm_quant`), as
    the block's own ffn site does with its attention's ``hc_post``: on GPUs a launch less per site."""
    with jax.named_scope("attn"):
        # rms_norm(hc_pre's y), and its FP8 quantization where the mHC kernel makes it (else None)
        h, x, xq, post, comb = _collapse(cfg, h, w.hc_attn, w.attn_norm)
        a, ls, chosen = attention(cfg, w.attn, x, ls, pos, n_new, ratio, rope_freqs(cfg, ratio), xq)
    with jax.named_scope("ffn"):
        h, xf, xfq, post, comb = _collapse(cfg, (a, h, post, comb), w.hc_ffn, w.ffn_norm)
        f, experts = moe(cfg, w.ffn, xf, ids, xfq)
    return (f, h, post, comb), ls, {"indexer": chosen, "router": experts, "attn_input": x}


def _collapse(cfg: Config, h, w: HcWeights, norm_w: jax.Array):
    """An mHC site on streams ``h`` or on a pending ``hc_post`` ``(out, h_res, post, comb)``: ``(streams, y, yq,
    post, comb)`` (:func:`dsv4_jax.kernels.mhc.hc_post_pre_norm_quant`)."""
    if isinstance(h, tuple):
        return hc_post_pre_norm_quant(cfg, *h, w, norm_w)
    return (h, *hc_pre_norm_quant(cfg, h, w, norm_w))


def streams(cfg: Config, h) -> jax.Array:
    """The hc streams ``[B,S,hc,D]`` of :func:`block_pending`'s result (its pending ``hc_post`` applied by XLA), or
    ``h`` itself."""
    return hc_post(cfg, *h) if isinstance(h, tuple) else h


def head(cfg: Config, head_w: jax.Array, hc_w: HcWeights, norm_w: jax.Array, h: jax.Array) -> jax.Array:
    """Final streams ``[B,S,hc,D]`` (or ``[B,hc,D]``) -> fp32 logits via hc_head, RMSNorm, fp32 matmul."""
    squeeze = h.ndim == 3
    if squeeze:
        h = h[:, None]
    y = rms_norm(hc_head(cfg, h, hc_w), norm_w, cfg.norm_eps, cfg.act_dtype)
    logits = dot_f32(y, head_w.astype(y.dtype), "bsd,vd->bsv")  # fp32 logits (exact bf16 products)
    return logits[:, 0] if squeeze else logits


def _last(x: jax.Array, n_new: jax.Array) -> jax.Array:
    """``x[b, n_new[b]-1]`` for every row."""
    return jnp.take_along_axis(x, jnp.maximum(n_new - 1, 0)[:, None, *([None] * (x.ndim - 2))], axis=1)[:, 0]


def _chunk_lengths(tokens: jax.Array, lengths) -> jax.Array:
    B, S = tokens.shape
    if lengths is None:
        return jnp.full((B,), S, jnp.int32)
    return jnp.clip(jnp.asarray(lengths, jnp.int32), 0, S)


def forward_layers(weights: Weights, cfg: Config, tokens: jax.Array, state: State, n_new: jax.Array):
    """Embedding and every main block over ``tokens [B,S]`` (``n_new [B]`` valid per row) on top of ``state``.

    Returns the final hc streams ``[B,S,hc,D]``, the new state (positions advanced by ``n_new``) and the attention
    input ``[B,S,D]`` of every layer (a tuple; what :mod:`dsv4_jax.modeling.rollback` needs to undo a chunk).
    """
    pos = state.pos
    tokens = tokens.astype(jnp.int32)
    with jax.named_scope("embed"):
        e = embed(weights.embed, tokens, cfg.vocab_size).astype(cfg.act_dtype)  # [B,S,D]
        h = jnp.broadcast_to(e[:, :, None, :], (*e.shape[:2], cfg.hc_mult, cfg.dim))
    layers, attn_inputs = [], []
    for i, (w, ls) in enumerate(zip(weights.layers, state.layers)):
        with jax.named_scope(f"layer_{i}"):
            h, ls, aux = block_pending(cfg, w, cfg.ratio(i), h, tokens, ls, pos, n_new)
        layers.append(ls)
        attn_inputs.append(aux["attn_input"])
    h = streams(cfg, h)
    return h, state.replace(pos=pos + n_new, layers=tuple(layers)), tuple(attn_inputs)


@partial(jax.jit, static_argnames=("cfg", "return_logits", "return_hidden"))
def forward_jit(weights: Weights, cfg: Config, tokens: jax.Array, state: State, lengths=None,
                return_logits: str = "all", return_hidden: bool = False):
    """Jitted :func:`dsv4_jax.forward` (no host-side checks)."""
    if return_logits not in ("all", "last", "none"):
        raise ValueError(f"return_logits={return_logits!r}, expected 'all', 'last' or 'none'")
    n_new = _chunk_lengths(tokens, lengths)
    h, new_state, _ = forward_layers(weights, cfg, tokens, state, n_new)
    logits = None
    with jax.named_scope("head"):
        if return_logits == "all":
            logits = head(cfg, weights.head, weights.hc_head, weights.norm, h)
        elif return_logits == "last":
            logits = head(cfg, weights.head, weights.hc_head, weights.norm, _last(h, n_new))
    if return_hidden:
        return logits, new_state, h
    return logits, new_state


def mtp_block(weights: Weights, cfg: Config, hidden: jax.Array, next_tokens: jax.Array, state: State,
              n_new: jax.Array) -> tuple[jax.Array, State]:
    """The MTP block without its head: main hc streams ``hidden [B,S,hc,D]`` at positions ``mtp_pos..`` and the
    tokens ``next_tokens [B,S]`` that followed them -> the MTP block's output streams ``[B,S,hc,D]`` and the state
    with its MTP cache and ``mtp_pos`` advanced by ``n_new [B]``."""
    if not weights.mtp:
        raise ValueError("this config has no MTP layer (n_mtp_layers=0)")
    w = weights.mtp[0]
    dt, sim = cfg.act_dtype, cfg.simulate
    pos = state.mtp_pos
    next_tokens = next_tokens.astype(jnp.int32)
    with jax.named_scope("mtp"):
        e = embed(weights.embed, next_tokens, cfg.vocab_size).astype(dt)
        e = rms_norm(e, w.enorm, cfg.norm_eps, dt)
        x = rms_norm(hidden.astype(dt), w.hnorm, cfg.norm_eps, dt)  # per stream
        x = (linear(e, w.e_proj, dt, sim, kernels=cfg.kernels, parallel="none")[:, :, None].astype(jnp.float32)
             + linear(x, w.h_proj, dt, sim, kernels=cfg.kernels, parallel="none").astype(jnp.float32)).astype(dt)
        h, ls, _ = block(cfg, w.block, cfg.ratio(cfg.n_layers), x, next_tokens, state.mtp[0], pos, n_new)
    return h, state.replace(mtp=(ls,) + tuple(state.mtp[1:]), mtp_pos=pos + n_new)


def mtp_head(weights: Weights, cfg: Config, h: jax.Array) -> jax.Array:
    """The MTP block's head on its output streams ``[B,S,hc,D]`` (or ``[B,hc,D]``) -> fp32 logits."""
    w = weights.mtp[0]
    with jax.named_scope("mtp_head"):
        return head(cfg, weights.head, w.hc_head, w.norm, h)


@partial(jax.jit, static_argnames=("cfg", "return_logits"))
def mtp_forward_jit(weights: Weights, cfg: Config, hidden: jax.Array, next_tokens: jax.Array, state: State,
                    lengths=None, return_logits: str = "all"):
    """Jitted :func:`dsv4_jax.mtp_forward`."""
    n_new = _chunk_lengths(next_tokens, lengths)
    h, state = mtp_block(weights, cfg, hidden, next_tokens, state, n_new)
    if return_logits == "last":
        h = _last(h, n_new)
    return mtp_head(weights, cfg, h), state
