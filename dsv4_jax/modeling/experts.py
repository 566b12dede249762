"""Routed-expert compute on the (token, expert) pairs one device owns, in pure XLA.

Two schedules with the same per-pair math (spec 9: SwiGLU with clamp, routing weight applied to the activation in
fp32 before the down projection):

* :func:`pairs_gathered` (decode, few pairs): gathers the weights of each pair's expert, so a step reads ``T*k``
  experts' FP4 bytes and nothing else.
* :func:`pairs_grouped` (prefill, large batches): pairs sorted by expert and laid out in blocks of ``C`` rows that
  each belong to one expert (the layout a grouped-GEMM kernel uses); a scan over the blocks dequantizes one
  expert's weights per block and skips the empty tail. Work is proportional to the pairs, not to experts x tokens.

Either returns one fp32 row per pair; :func:`combine` sums a token's pairs in ascending expert id as the reference.
Weights stay FP4: only the expert in hand is dequantized, never a bf16 copy of the stack.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.config import Config
from dsv4_jax.kernels.act_quant import swiglu_f32, swiglu_pair
from dsv4_jax.modeling.quant import linear, linear_pair


def swiglu(cfg: Config, x: jax.Array, xq: jax.Array, w1, w2, w3, weight: jax.Array | None, clamp: bool,
           shared: bool = False, partials: bool = False, out_dtype=None):
    """One expert: ``w2(bf16(weight * silu(min(g, L)) * clip(u, -L, L)))`` with g = w1 x, u = w3 x (bf16 outputs).
    ``shared``: the shared expert, whose width is split over the mesh's ``model`` axis (w1/w3 by output, w2 by
    input features); routed experts are whole on the device that holds them. ``partials``: ``w2``'s output may come
    as its kernel's split-K partials (:class:`dsv4_jax.modeling.quant.SplitSum`; ``quant.summed`` gives the value).
    ``out_dtype``: ``w2``'s output dtype (default the activations'; fp32 for a device's share of a split sum)."""
    dt, sim = cfg.act_dtype, cfg.simulate
    out = out_dtype or dt
    kn = cfg.kernels  # FP8 weights (the shared expert) go through kernels.fp8_linear; FP4 ones stay on the reference
    cols, rows = ("cols", "rows") if shared else (None, None)
    lim = float(cfg.swiglu_limit) if clamp and cfg.swiglu_limit > 0 else 0.0  # 0: no clamp
    if weight is None:  # a and the values of its FP8 quantization in one launch where the kernel runs (decode rows)
        a, aq = swiglu_pair(x, w1, w3, xq, lim, dt, sim, kernels=kn, parallel=cols)  # [.., I], values or None
        return linear(a, w2, out, sim, aq, kernels=kn, parallel=rows, partials=partials)
    g, u = linear_pair(x, w1, w3, dt, sim, xq, kernels=kn, parallel=cols)  # bf16 [.., I] each
    a = weight[:, None] * swiglu_f32(g, u, lim)  # the routing weight on the fp32 activation
    return linear(a.astype(dt), w2, out, sim, kernels=kn, parallel=rows)


def _take(tree, i):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def pairs_gathered(cfg: Config, x, xq, tok, e, wt, w1s, w2s, w3s) -> jax.Array:
    """Pairs ``(x[tok[r]], expert e[r], weight wt[r])`` -> fp32 ``[R, D]``; pairs with ``e`` outside the local stack
    give zeros. Reads the weights of each pair's expert (for few pairs)."""
    n_local = w1s.packed.shape[0]
    valid = (e >= 0) & (e < n_local)
    sel = jnp.clip(e, 0, n_local - 1)

    def one(x1, xq1, w1, w2, w3, w):
        return swiglu(cfg, x1[None], xq1[None], w1, w2, w3, w[None], clamp=True)[0]

    out = jax.vmap(one)(x[tok], xq[tok], _take(w1s, sel), _take(w2s, sel), _take(w3s, sel), wt)
    return jnp.where(valid[:, None], out.astype(jnp.float32), 0.0)


def block_rows(n_pairs: int, n_local: int) -> int:
    """Rows per block of the grouped layout: about the mean pairs per expert, a power of two in [8, 128]."""
    mean = max(1, -(-n_pairs // max(1, n_local)))
    return int(min(128, max(8, 1 << (mean - 1).bit_length())))


def n_blocks_bound(n_pairs: int, n_local: int, block: int) -> int:
    """Static bound on the blocks of the grouped layout: ``sum_e ceil(count_e / block) <= ceil(R / block) + min(E, R)``
    (each non-empty expert adds at most one partly filled block)."""
    return -(-n_pairs // block) + min(n_local, n_pairs)


def group_pairs(e: jax.Array, n_local: int, block: int):
    """The grouped layout of pairs with local expert ids ``e [R]`` (ids outside ``[0, n_local)`` get no slot).

    Pairs are sorted by expert (stable: ascending pair index within an expert) and each expert's pairs fill
    ``ceil(count / block)`` consecutive blocks of ``block`` slots; empty experts get no block. Returns
    ``row_of_slot [n_blocks * block]`` (pair index per slot, ``R`` for padding slots), ``block_expert [n_blocks]``
    (expert of each block; blocks past ``used_blocks`` are unused, their entry is ``n_local``), ``used_blocks``
    (scalar int32) and ``slot_of_pair [R]`` (``n_blocks * block`` for pairs that have no slot).
    """
    R = e.shape[0]
    valid = (e >= 0) & (e < n_local)
    key = jnp.where(valid, e, n_local)  # invalid pairs sort last and get no block
    order = jnp.argsort(key, stable=True)  # [R]
    e_sorted = key[order]
    counts = jnp.zeros(n_local + 1, jnp.int32).at[key].add(1)[:n_local]  # [n_local]
    padded = (counts + block - 1) // block * block
    start_pad = jnp.cumsum(padded) - padded  # first slot of each expert's blocks
    start = jnp.cumsum(counts) - counts  # first sorted row of each expert
    n_blocks = n_blocks_bound(R, n_local, block)
    n_slots = n_blocks * block
    e_c = jnp.minimum(e_sorted, n_local - 1)
    slot = jnp.where(e_sorted < n_local, start_pad[e_c] + jnp.arange(R) - start[e_c], n_slots)  # [R] sorted order
    row_of_slot = jnp.full(n_slots, R, jnp.int32).at[slot].set(order.astype(jnp.int32), mode="drop")  # R = none
    used_blocks = jnp.sum(padded) // block
    # compare_all: one fused comparison; the default binary search is a while loop (4 GPU launches per step, outside
    # the CUDA graphs: scripts/count_launches.py)
    block_expert = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(n_blocks) * block, side="right",
                                    method="compare_all").astype(jnp.int32)
    slot_of_pair = jnp.zeros(R, jnp.int32).at[order].set(slot.astype(jnp.int32))  # [R]
    return row_of_slot, block_expert, used_blocks.astype(jnp.int32), slot_of_pair


def pairs_grouped(cfg: Config, x, xq, tok, e, wt, w1s, w2s, w3s, block: int | None = None) -> jax.Array:
    """Same as :func:`pairs_gathered` for many pairs: sorted by expert into one-expert blocks of ``block`` rows."""
    R, D = tok.shape[0], x.shape[-1]
    n_local = w1s.packed.shape[0]
    C = block or block_rows(R, n_local)
    n_blocks = n_blocks_bound(R, n_local, C)
    row_of_slot, block_expert, used_blocks, _ = group_pairs(e, n_local, C)

    # tokens are gathered per block straight from x (no [R, D] copy of the repeated tokens); slot R / token T is
    # the zero padding row
    x_pad = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])  # [T+1, D]
    xq_pad = jnp.concatenate([xq, jnp.zeros((1, D), xq.dtype)])
    tok_pad = jnp.concatenate([tok, jnp.full((1,), x.shape[0], tok.dtype)])  # [R+1]
    wt_pad = jnp.concatenate([wt, jnp.zeros((1,), wt.dtype)])

    def step(out, b):
        rows = jax.lax.dynamic_slice_in_dim(row_of_slot, b * C, C)  # [C]

        def run(out):
            ex = jnp.minimum(block_expert[b], n_local - 1)
            t = tok_pad[rows]
            y = swiglu(cfg, x_pad[t], xq_pad[t], _take(w1s, ex), _take(w2s, ex), _take(w3s, ex),
                       wt_pad[rows], clamp=True)
            return out.at[rows].set(y.astype(jnp.float32))  # padding slots all land on row R

        return jax.lax.cond(b < used_blocks, run, lambda o: o, out), None

    out, _ = jax.lax.scan(step, jnp.zeros((R + 1, D), jnp.float32), jnp.arange(n_blocks))
    return out[:R]


def choice_ranks(idx: jax.Array) -> jax.Array:
    """``[T,k]`` int32: how many of a token's choices come before choice ``j`` in (expert id, position) order, i.e.
    the stable argsort's inverse, without a sort (on GPUs a sort kernel and a copy per layer)."""
    k = idx.shape[-1]
    lower = (idx[:, None, :] < idx[:, :, None]) | ((idx[:, None, :] == idx[:, :, None]) & jnp.tri(k, k, -1, bool))
    return jnp.sum(lower, axis=-1, dtype=jnp.int32)


def combine(y: jax.Array, idx: jax.Array, rank: jax.Array | None = None) -> jax.Array:
    """Per-pair outputs ``[T*k, D]`` (pair ``t*k + j`` = token t's j-th choice ``idx[t, j]``) -> fp32 ``[T, D]``,
    each token's experts added in ascending expert id, as the reference loops over experts. ``rank``:
    :func:`choice_ranks` of ``idx`` where the router's kernel made them (computed here otherwise: on GPUs a kernel
    of its own per layer, which XLA does not fuse into the selects)."""
    T, k = idx.shape
    y = y.reshape(T, k, -1)
    rank = choice_ranks(idx) if rank is None else rank  # [T,k]
    acc = None
    for r in range(k):  # the choice of rank r, picked by selects (exact), added in rank order
        pick = y[:, k - 1]
        for j in range(k - 2, -1, -1):
            pick = jnp.where((rank[:, j] == r)[:, None], y[:, j], pick)
        acc = pick if acc is None else acc + pick
    return acc
