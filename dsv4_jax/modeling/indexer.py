"""The lightning indexer of CSA layers (spec 8): picks, per query, the top-k compressed 4-token blocks.

Queries and compressed keys are Hadamard-rotated and FP4-snapped; scores are bf16 products summed over heads in bf16.
A query at absolute position ``t`` may only pick complete blocks ``w < (t+1)//4``. Ties are broken by lower block
id first (``jax.lax.top_k``), the convention of the golden data. The scoring and top-k run block by block over the
compressed entries (:func:`dsv4_jax.kernels.indexer.indexer_topk`), never holding all ``[B,S,Hi,Nc]`` scores.
"""

from __future__ import annotations

import jax

from dsv4_jax.config import Config
from dsv4_jax.kernels.hadamard import indexer_query_linear
from dsv4_jax.kernels.indexer import indexer_topk
from dsv4_jax.modeling.quant import linear
from dsv4_jax.modeling.weights import IndexerWeights


def index_topk(cfg: Config, w: IndexerWeights, x: jax.Array, qr: jax.Array, keys, t: jax.Array,
               cos: jax.Array, sin: jax.Array, qrq: jax.Array | None = None, hw: jax.Array | None = None
               ) -> jax.Array:
    """Top-k compressed block ids ``[B, S, k]`` (-1 where fewer than k blocks are visible).

    Args:
      x: ``[B,S,D]`` attention input; qr: ``[B,S,q_lora]`` normalised q LoRA; keys: ``[B, Nc, Di]`` indexer cache
      (plain, or FP4 codes, decoded block by block; already holding the blocks completed in this chunk); t: ``[B,S]``
      absolute query positions; cos/sin: ``[B,S,rd/2]`` RoPE of the query positions; qrq: the values of ``qr``'s FP8
      quantization where the attention's fused q projection made them (``wq_b`` of the attention quantizes the same
      ``qr``: one quantization for both, not a second one here), else ``None``; hw: ``[B,S,Hi]`` the head weights
      ``x @ weights_proj.T`` (bf16, unscaled) where the caller made them (the attention's one launch for all of a
      CSA layer's bf16 projections), else ``None``.
    """
    dt = cfg.act_dtype
    B, S, _ = x.shape
    Hi, Di = cfg.index_n_heads, cfg.index_head_dim
    # wq_b (replicated under a mesh), then RoPE, Hadamard, FP4 snap -> [B,S,Hi,Di]
    q = indexer_query_linear(qr, qrq, w.wq_b, Hi, cos, sin, dt, cfg.simulate, cfg.simulate, kernels=cfg.kernels)
    if hw is None:  # bf16 linear -> [B,S,Hi], scaled by Di**-0.5 Hi**-0.5 below
        hw = linear(x, w.weights_proj, dt, cfg.simulate)
    # scores and top-k, block by block (the head weights' scale inside the scoring kernel where it runs)
    return indexer_topk(q, hw, keys, t, cfg.index_topk, kernels=cfg.kernels, hw_scale=Di**-0.5 * Hi**-0.5)
