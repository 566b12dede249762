"""The lightning indexer of CSA layers (spec 8): picks, per query, the top-k compressed 4-token blocks.

Queries and compressed keys are Hadamard-rotated and FP4-snapped; scores are bf16 products summed over heads in bf16.
A query at absolute position ``t`` may only pick complete blocks ``w < (t+1)//4``. Ties are broken by lower block
id first (``jax.lax.top_k``), the convention of the golden data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.config import Config
from dsv4_jax.modeling.layers import apply_rope, hadamard
from dsv4_jax.modeling.quant import HIGHEST, cache_values, fp4_simulate, linear
from dsv4_jax.modeling.weights import IndexerWeights


def index_topk(cfg: Config, w: IndexerWeights, x: jax.Array, qr: jax.Array, keys, t: jax.Array,
               cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Top-k compressed block ids ``[B, S, k]`` (-1 where fewer than k blocks are visible).

    Args:
      x: ``[B,S,D]`` attention input; qr: ``[B,S,q_lora]`` normalised q LoRA; keys: ``[B, Nc, Di]`` indexer cache
      (plain, or FP4 codes decoded here; already holding the blocks completed in this chunk); t: ``[B,S]``
      absolute query positions; cos/sin: ``[B,S,rd/2]`` RoPE of the query positions.
    """
    dt = cfg.act_dtype
    B, S, _ = x.shape
    Hi, Di = cfg.index_n_heads, cfg.index_head_dim
    q = linear(qr, w.wq_b, dt, cfg.simulate, kernels=cfg.kernels).reshape(B, S, Hi, Di)
    q = apply_rope(q, cos[:, :, None], sin[:, :, None])
    q = hadamard(q, dt)
    if cfg.simulate:
        q = fp4_simulate(q, 32)
    hw = linear(x, w.weights_proj, dt, cfg.simulate)  # bf16 linear -> [B,S,Hi]
    hw = (hw.astype(jnp.float32) * np.float32(Di**-0.5 * Hi**-0.5)).astype(dt)
    keys = cache_values(keys, dt)  # [B,Nc,Di]
    score = jnp.einsum("bshd,btd->bsht", q.astype(jnp.float32), keys.astype(jnp.float32),
                       precision=HIGHEST).astype(dt)  # [B,S,Hi,Nc]
    prod = (jax.nn.relu(score).astype(jnp.float32) * hw.astype(jnp.float32)[..., None]).astype(dt)
    total = jnp.sum(prod.astype(jnp.float32), axis=2).astype(dt).astype(jnp.float32)  # [B,S,Nc]
    n_c = keys.shape[1]
    visible = jnp.arange(n_c)[None, None, :] < ((t + 1) // 4)[..., None]
    total = jnp.where(visible, total, -jnp.inf)
    k = min(cfg.index_topk, n_c)
    vals, idx = jax.lax.top_k(total, k)
    return jnp.where(vals == -jnp.inf, -1, idx).astype(jnp.int32)
