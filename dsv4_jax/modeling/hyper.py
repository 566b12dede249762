"""Manifold-constrained hyper-connections (mHC), spec 4: hc_pre with Sinkhorn, hc_post, and the head's hc_head.

The residual stream is ``h [B, S, hc, D]``; every block reads a mix of the ``hc`` streams and writes back through a
doubly-stochastic ``comb`` matrix. All mixing math is fp32; results are rounded once to the activation dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.config import Config
from dsv4_jax.modeling.quant import HIGHEST
from dsv4_jax.modeling.weights import HcWeights


def _mixes(cfg: Config, h: jax.Array, w: HcWeights) -> tuple[jax.Array, jax.Array]:
    """``(x @ fn.T) * rsqrt(mean(x**2) + eps)`` on the UN-normalised flattened streams (order matters)."""
    B, S, hc, D = h.shape
    x = h.astype(jnp.float32).reshape(B, S, hc * D)
    r = 1.0 / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + np.float32(cfg.norm_eps))  # torch: 1/sqrt
    mixes = jnp.einsum("bsk,mk->bsm", x, w.fn, precision=HIGHEST) * r  # [B, S, n_mix]
    return mixes, x.reshape(B, S, hc, D)


# Unroll the Sinkhorn iterations: None = on every backend but the CPU (see :func:`sinkhorn`); True/False forces it
# (``scripts/count_launches.py`` compiles for a GPU from a CPU process).
UNROLL_SINKHORN: bool | None = None


def sinkhorn(cfg: Config, c: jax.Array) -> jax.Array:
    """Row softmax + eps, column normalisation, then (iters-1) x (row, column) normalisations, eps everywhere.

    On GPUs the iterations are unrolled, with an optimization barrier after each: as a loop each of the 19 was 4
    launches (counter, two reductions, a copy) outside the step's CUDA graph; unrolled they are 2 fused kernels
    each inside it (``scripts/count_launches.py``: one hc_pre site 82 kernels / 78 host launches -> 41 / 1).
    Without the barriers XLA fuses the whole chain into ~5 kernels, but one hc_pre then took 3-10x longer to compile
    for sm_90 (6.5 s at batch 1, 25 s at batch 32 on a 2-core CPU, against 2-2.7 s): minutes for a 43-layer model.
    On the CPU the loop stays: a tiny model's step compiled 2x slower unrolled, for the same arithmetic. (Writing
    the 4-term sums as elementwise adds of slices made XLA's GPU fusion pass run for over 15 minutes on one step.)"""
    eps = np.float32(cfg.hc_eps)
    c = jax.nn.softmax(c, axis=-1) + eps
    c = c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

    def body(_, c):
        c = c / (jnp.sum(c, axis=-1, keepdims=True) + eps)
        return c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

    unroll = jax.default_backend() != "cpu" if UNROLL_SINKHORN is None else UNROLL_SINKHORN
    if not unroll:
        return jax.lax.fori_loop(0, cfg.hc_sinkhorn_iters - 1, body, c)
    for i in range(cfg.hc_sinkhorn_iters - 1):
        c = body(i, c)
        c = jax.lax.optimization_barrier(c)  # one fusion per iteration: XLA fusing them all compiled 4-10x slower
    return c


def hc_pre(cfg: Config, h: jax.Array, w: HcWeights):
    """Collapse the streams for a block: returns ``y [B,S,D]`` (act dtype), ``post [B,S,hc]``, ``comb [B,S,hc,hc]``."""
    hc = cfg.hc_mult
    mixes, x = _mixes(cfg, h, w)
    pre = jax.nn.sigmoid(mixes[..., :hc] * w.scale[0] + w.base[:hc]) + np.float32(cfg.hc_eps)
    post = 2 * jax.nn.sigmoid(mixes[..., hc:2 * hc] * w.scale[1] + w.base[hc:2 * hc])
    c = mixes[..., 2 * hc:].reshape(*mixes.shape[:-1], hc, hc) * w.scale[2] + w.base[2 * hc:].reshape(hc, hc)
    comb = sinkhorn(cfg, c)
    return _weighted_streams(pre, x).astype(cfg.act_dtype), post, comb


def hc_post(cfg: Config, out: jax.Array, h_res: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
    """``h_new[k] = post[k] * out + sum_j comb[j, k] * h_res[j]`` in fp32, rounded once (sum over FIRST index)."""
    hr = h_res.astype(jnp.float32)
    mixed = comb[..., 0, :, None] * hr[:, :, 0:1]  # sum over j in order, like the reference's fp32 sum
    for j in range(1, hr.shape[2]):
        mixed = mixed + comb[..., j, :, None] * hr[:, :, j:j + 1]
    return (post[..., None] * out.astype(jnp.float32)[:, :, None, :] + mixed).astype(cfg.act_dtype)


def hc_head(cfg: Config, h: jax.Array, w: HcWeights) -> jax.Array:
    """The head's stream collapse: sigmoid weights, no Sinkhorn, no post. Returns ``y [B,S,D]`` (act dtype)."""
    mixes, x = _mixes(cfg, h, w)
    pre = jax.nn.sigmoid(mixes * w.scale[0] + w.base) + np.float32(cfg.hc_eps)
    return _weighted_streams(pre, x).astype(cfg.act_dtype)


def _weighted_streams(pre: jax.Array, x: jax.Array) -> jax.Array:
    """``sum_i pre[..., i] * x[..., i, :]`` accumulated in stream order (fp32), as the reference sums."""
    y = pre[..., 0, None] * x[..., 0, :]
    for i in range(1, x.shape[-2]):
        y = y + pre[..., i, None] * x[..., i, :]
    return y
