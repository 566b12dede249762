"""Mixture of experts (spec 9): sqrt-softplus router in fp32, hash routing on the first layers, SwiGLU experts.

The routing weight multiplies the SwiGLU activation (fp32) before the down projection; expert outputs are summed in
fp32 in ascending expert id, the shared expert last, and the sum is rounded once. This XLA reference path scans the
experts one at a time, dequantizing only the expert in hand (never a full bf16 copy) and skipping experts no token
was routed to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dsv4_jax.config import Config
from dsv4_jax.modeling.quant import HIGHEST, linear, quantized_input
from dsv4_jax.modeling.weights import MoEWeights

EXPERT_AXES = ("data", "model")  # routed experts are split over every device of the mesh


def route(cfg: Config, w: MoEWeights, x: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Router: ``x [T,D]`` -> (expert ids ``[T,k]`` int32, weights ``[T,k]`` fp32)."""
    logits = jnp.einsum("td,ed->te", x.astype(jnp.float32), w.gate.astype(jnp.float32), precision=HIGHEST)
    scores = jnp.sqrt(jnp.where(logits > 20.0, logits, jnp.log1p(jnp.exp(jnp.minimum(logits, 20.0)))))
    if w.tid2eid is not None:  # hash routing
        idx = w.tid2eid[ids]
    else:  # the bias only influences the selection
        _, idx = jax.lax.top_k(scores + w.bias, cfg.n_activated_experts)
    wts = jnp.take_along_axis(scores, idx, axis=-1)
    wts = wts / jnp.sum(wts, axis=-1, keepdims=True) * np.float32(cfg.route_scale)
    return idx.astype(jnp.int32), wts


def swiglu(cfg: Config, x: jax.Array, xq: jax.Array, w1, w2, w3, weight: jax.Array | None, clamp: bool):
    """One expert: ``w2(bf16(weight * silu(min(g, L)) * clip(u, -L, L)))`` with g = w1 x, u = w3 x (bf16 outputs)."""
    dt, sim = cfg.act_dtype, cfg.simulate
    g = linear(x, w1, dt, sim, xq).astype(jnp.float32)
    u = linear(x, w3, dt, sim, xq).astype(jnp.float32)
    if clamp and cfg.swiglu_limit > 0:
        lim = np.float32(cfg.swiglu_limit)
        u = jnp.clip(u, -lim, lim)
        g = jnp.minimum(g, lim)
    a = jax.nn.silu(g) * u
    if weight is not None:
        a = weight[:, None] * a
    return linear(a.astype(dt), w2, dt, sim)


def _routed(cfg: Config, xt, xq, idx, wts, w1s, w2s, w3s, first_expert) -> jax.Array:
    """Sum of the routed experts ``first_expert ..`` (the stacked slices given) over all tokens, fp32 ``[T, D]``,
    accumulated in ascending expert id; experts no token was routed to are skipped."""

    def expert_step(y, inp):
        e, w1, w2, w3 = inp
        hit = idx == e  # [T,k]
        weight = jnp.sum(jnp.where(hit, wts, 0.0), axis=-1)  # [T]
        routed = jnp.any(hit, axis=-1)

        def run(_):
            out = swiglu(cfg, xt, xq, w1, w2, w3, weight, clamp=True)
            return jnp.where(routed[:, None], out.astype(jnp.float32), 0.0)

        return y + jax.lax.cond(jnp.any(routed), run, lambda _: jnp.zeros_like(y), None), None

    n_local = w1s.packed.shape[0]
    y0 = jnp.zeros(xt.shape, jnp.float32)
    y, _ = jax.lax.scan(expert_step, y0, (first_expert + jnp.arange(n_local), w1s, w2s, w3s))
    return y


def _routed_gather(cfg: Config, xt, xq, idx, wts, w1s, w2s, w3s, first_expert) -> jax.Array:
    """Same sum as :func:`_routed` for few tokens (decode): gathers only the (token, expert) pairs' weights, so a
    step reads ``T*k`` experts instead of looping over all of them. Per token the experts are added in ascending
    id, as the reference does."""
    T, k = idx.shape
    order = jnp.argsort(idx, axis=-1)
    e_sorted = jnp.take_along_axis(idx, order, axis=-1) - first_expert  # [T,k] local ids
    w_sorted = jnp.take_along_axis(wts, order, axis=-1)
    n_local = w1s.packed.shape[0]
    mine = (e_sorted >= 0) & (e_sorted < n_local)
    sel = jnp.clip(e_sorted, 0, n_local - 1).reshape(-1)  # [T*k]
    take = lambda t: jax.tree_util.tree_map(lambda a: a[sel], t)
    xs, xqs = jnp.repeat(xt, k, axis=0), jnp.repeat(xq, k, axis=0)  # [T*k, D]

    def one(x, xq1, w1, w2, w3, wt):
        return swiglu(cfg, x[None], xq1[None], w1, w2, w3, wt[None], clamp=True)[0]

    out = jax.vmap(one)(xs, xqs, take(w1s), take(w2s), take(w3s), w_sorted.reshape(-1))  # [T*k, D]
    out = jnp.where(mine.reshape(-1, 1), out.astype(jnp.float32), 0.0).reshape(T, k, -1)
    y = out[:, 0]
    for j in range(1, k):
        y = y + out[:, j]
    return y


def moe(cfg: Config, w: MoEWeights, x: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """MoE block over ``x [B,S,D]`` (ffn_norm output) with token ids ``[B,S]`` (hash routing).

    Returns ``[B,S,D]`` and the chosen expert ids ``[B,S,k]``.
    """
    B, S, D = x.shape
    xt = x.reshape(B * S, D)
    idx, wts = route(cfg, w, xt, ids.reshape(-1))
    xq = quantized_input(xt, cfg.simulate)  # the experts' first GEMMs share one activation quantization

    with jax.named_scope("routed_experts"):
        mesh = jax.sharding.get_abstract_mesh()
        n_dev = 1 if mesh.empty else int(np.prod([mesh.shape.get(a, 1) for a in EXPERT_AXES]))
        # few (token, expert) pairs per device-local expert set: gather them; otherwise loop over the experts
        routed = _routed_gather if xt.shape[0] * idx.shape[1] < cfg.n_routed_experts // n_dev else _routed
        if n_dev == 1:
            y = routed(cfg, xt, xq, idx, wts, w.w1, w.w2, w.w3, first_expert=0)
        else:
            # expert parallelism: every device sees all tokens, runs its own experts, and the partial sums are
            # reduced (the small-batch strategy: one all-gather of the tokens, one psum of [T, D] fp32)
            def local(xt, xq, idx, wts, w1, w2, w3):
                first = jax.lax.axis_index(EXPERT_AXES) * w1.packed.shape[0]
                return jax.lax.psum(routed(cfg, xt, xq, idx, wts, w1, w2, w3, first), EXPERT_AXES)

            ex = P(EXPERT_AXES)
            y = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), P(), ex, ex, ex), out_specs=P(),
                              check_vma=False)(xt, xq, idx, wts, w.w1, w.w2, w.w3)
    with jax.named_scope("shared_expert"):
        y = y + swiglu(cfg, xt, xq, w.s1, w.s2, w.s3, None, clamp=cfg.shared_expert_clamp).astype(jnp.float32)
    return y.astype(cfg.act_dtype).reshape(B, S, D), idx.reshape(B, S, -1)
