"""Mixture of experts (spec 9): sqrt-softplus router in fp32, hash routing on the first layers, SwiGLU experts.

The routing weight multiplies the SwiGLU activation (fp32) before the down projection; expert outputs are summed in
fp32 in ascending expert id, the shared expert last, and the sum is rounded once. The per-pair expert compute lives
in ``experts.py``; this module routes and, on a mesh, moves tokens to the devices that own their experts
(expert parallelism over all devices, ``EXPERT_AXES``) by one of two strategies:

* gather (small batches, decode): every device sees all tokens, runs its own experts on the pairs routed to them
  and the fp32 partial sums are reduced with one ``psum``. Two collectives, latency-bound sizes.
* all-to-all (large batches on meshes with more devices than experts per token): tokens are split over the
  devices, each (token, expert) pair travels only to the device owning the expert (``ragged_all_to_all`` on GPUs;
  on CPU, which lacks it, a dense ``all_to_all`` with the same result), the fp32 outputs travel back and each token's
  pairs are added in ascending expert id exactly as on one device.

With ``use_triton(cfg)`` the per-device pair compute is ``kernels.fp4_moe`` (FP4 grouped GEMMs reading only the
touched local experts, for both strategies); otherwise the XLA schedules of ``experts.py``, unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dsv4_jax.config import Config
from dsv4_jax.kernels import router as kernels_router
from dsv4_jax.kernels import single_device, streams, use_triton
from dsv4_jax.modeling.experts import combine, pairs_gathered, pairs_grouped, swiglu
from dsv4_jax.modeling.quant import quantized_input, summed
from dsv4_jax.modeling.weights import MoEWeights
from dsv4_jax.sharding import EXPERT_AXES, MODEL, moe_specs

# Under a multi-device mesh, run the block per device at the gather dispatch (moe's docstring); False: the partitioner
# and the routed experts' own shard_map, as before. A benchmark knob (bench_decode.py --variants).
PER_DEVICE = True


def route(cfg: Config, w: MoEWeights, x: jax.Array, ids: jax.Array):
    """Router: ``x [T,D]`` -> (expert ids ``[T,k]`` int32, weights ``[T,k]`` fp32, the choices' ranks ``[T,k]``
    int32 in expert id order where the router's kernel made them, else None); the math and its kernel live in
    :mod:`dsv4_jax.kernels.router`."""
    return kernels_router.route_ranked(cfg, w.gate, w.bias, w.tid2eid, x, ids)


def moe(cfg: Config, w: MoEWeights, x: jax.Array, ids: jax.Array, xq: jax.Array | None = None
        ) -> tuple[jax.Array, jax.Array]:
    """MoE block over ``x [B,S,D]`` (ffn_norm output) with token ids ``[B,S]`` (hash routing); ``xq``: the values of
    its FP8 quantization when the caller has them (``mhc.hc_pre_norm_quant``), else computed here.

    Returns ``[B,S,D]`` and the chosen expert ids ``[B,S,k]``.

    Under a mesh of several devices with the "gather" dispatch (decode sizes) the block runs per device in one
    ``shard_map`` (``sharding.moe_specs``): every device routes every token (the router's weights are replicated),
    runs its own experts' pairs and its share of the shared expert's width; the routed sums (fp32) are added over
    every device and the shared expert's fp32 partial products over ``model``, rounded to bf16 once, as XLA's
    partitioner ordered them. Inside, the code is one device's, so the router's, the FP8 GEMVs' and the split-K sum
    kernels run there as on one GPU. Elsewhere (all-to-all dispatch, a split that would cut a scale block) the block
    stays with the partitioner and the routed experts' own ``shard_map``.
    """
    B, S, D = x.shape
    if PER_DEVICE and not single_device():
        mesh = jax.sharding.get_abstract_mesh()
        n_dev = int(np.prod([mesh.shape.get(a, 1) for a in EXPERT_AXES]))
        specs = moe_specs(cfg, mesh, hashed=w.tid2eid is not None)
        if specs is not None and dispatch_strategy(cfg, B * S, n_dev) == "gather":
            def fn(w, x, ids, xq):
                return _moe(cfg, w, x, ids, xq, n_dev)

            # check_vma off: the Triton custom calls have no replication rule (both outputs are psum'd or computed
            # alike on every device)
            return jax.shard_map(fn, mesh=mesh, in_specs=(specs, P(), P(), P()), out_specs=(P(), P()),
                                 check_vma=False)(w, x, ids, xq)
    return _moe(cfg, w, x, ids, xq)


def _moe(cfg: Config, w: MoEWeights, x: jax.Array, ids: jax.Array, xq: jax.Array | None, n_dev: int = 0
         ) -> tuple[jax.Array, jax.Array]:
    """:func:`moe` on one device; ``n_dev`` > 0: inside its per-device ``shard_map`` over ``n_dev`` expert-parallel
    devices (this device's experts and shared-expert columns; the sums over devices here)."""
    B, S, D = x.shape
    xt = x.reshape(B * S, D)
    idx, wts, rank = route(cfg, w, xt, ids.reshape(-1))
    # the experts' first GEMMs share one activation quantization
    given = xq is not None
    xq_in = xq if given else quantized_input(xt, cfg.simulate)

    def values(q):  # the quantized row as the experts take it: the caller's values in fp32
        return q.reshape(xt.shape).astype(jnp.float32) if given else q

    with jax.named_scope("routed_experts"):
        if n_dev:  # this device's experts' pairs, added over every device
            y = jax.lax.psum(_local_pairs(cfg, w.w1, w.w2, w.w3, xt, values(xq_in), idx, wts, rank, n_dev),
                             EXPERT_AXES)
        else:
            y = routed_experts(cfg, w, xt, values(xq_in), idx, wts, rank)
    if n_dev:  # this device's columns of the shared expert: its fp32 share of w2's sum, added over model
        with jax.named_scope("shared_expert"):
            s = swiglu(cfg, xt, values(xq_in), w.s1, w.s2, w.s3, None, clamp=cfg.shared_expert_clamp, shared=True,
                       out_dtype=jnp.float32)
            y = y + jax.lax.psum(s, MODEL).astype(cfg.act_dtype).astype(jnp.float32)
        return y.astype(cfg.act_dtype).reshape(B, S, D), idx.reshape(B, S, -1)
    side = streams.enabled("shared")

    def shared(xt, xq_in, s1, s2, s3):
        # on a side stream: the caller's codes as they came (no fp32 copy crosses the region's boundary), w2's
        # split-K partials out (their sum stays fused into the block's consumer, as inline)
        return swiglu(cfg, xt, values(xq_in), s1, s2, s3, None, clamp=cfg.shared_expert_clamp, shared=True,
                      partials=side)

    with jax.named_scope("shared_expert"):  # independent of the routed experts: a side stream where enabled
        y = y + summed(streams.side("shared", shared, xt, xq_in, w.s1, w.s2, w.s3)).astype(jnp.float32)
    return y.astype(cfg.act_dtype).reshape(B, S, D), idx.reshape(B, S, -1)


def dispatch_strategy(cfg: Config, n_tokens: int, n_dev: int) -> str:
    """"gather" or "all_to_all" for ``n_tokens`` tokens on ``n_dev`` expert-parallel devices (``cfg.moe_dispatch``).

    Bytes each device receives per MoE, in units of T*D: gather = (2 [bf16 tokens] + 8 [fp32 psum]) * (n-1)/n;
    all-to-all = (6k/n [bf16 out, fp32 back] + 4 [fp32 all-gather of the outputs]) * (n-1)/n. All-to-all moves fewer
    bytes iff n > k; it also costs four more collectives, so "auto" takes it only with >= 1 pair per expert.
    """
    if n_dev == 1:
        return "local"
    if cfg.moe_dispatch != "auto":
        return cfg.moe_dispatch
    k = cfg.n_activated_experts
    return "all_to_all" if n_dev > k and n_tokens * k >= cfg.n_routed_experts else "gather"


def routed_experts(cfg: Config, w: MoEWeights, xt, xq, idx, wts, rank=None) -> jax.Array:
    """Sum of the routed experts for tokens ``xt [T,D]`` (``xq``: their FP8-quantized fp32 value), fp32 ``[T,D]``;
    ``rank``: the choices' order for the sum where the router made it (:func:`experts.combine`)."""
    T, k = idx.shape
    mesh = jax.sharding.get_abstract_mesh()
    n_dev = 1 if mesh.empty else int(np.prod([mesh.shape.get(a, 1) for a in EXPERT_AXES]))
    strategy = dispatch_strategy(cfg, T, n_dev)
    if strategy == "local":
        return _local_pairs(cfg, w.w1, w.w2, w.w3, xt, xq, idx, wts, rank, 1)
    ex = P(EXPERT_AXES)
    if strategy == "gather":
        def local(xt, xq, idx, wts, w1, w2, w3):
            return jax.lax.psum(_local_pairs(cfg, w1, w2, w3, xt, xq, idx, wts, None, n_dev), EXPERT_AXES)

        return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), P(), ex, ex, ex), out_specs=P(),
                             check_vma=False)(xt, xq, idx, wts, w.w1, w.w2, w.w3)
    if strategy != "all_to_all":
        raise ValueError(f"unknown MoE dispatch {strategy!r}")
    pad = -T % n_dev  # tokens split evenly over the devices; padding tokens route nowhere (expert -1)
    xt_p = jnp.pad(xt, ((0, pad), (0, 0)))
    idx_p = jnp.pad(idx, ((0, pad), (0, 0)), constant_values=-1)
    wts_p = jnp.pad(wts, ((0, pad), (0, 0)))
    ragged = jax.default_backend() != "cpu"
    fn = functools.partial(_all_to_all_local, cfg, n_dev, ragged, _pairs_fn(cfg, grouped=True))
    y = jax.shard_map(fn, mesh=mesh, in_specs=(ex, ex, ex, ex, ex, ex), out_specs=ex,
                      check_vma=False)(xt_p, idx_p, wts_p, w.w1, w.w2, w.w3)
    return y[:T]


def _local_pairs(cfg: Config, w1, w2, w3, xt, xq, idx, wts, rank, n_dev: int) -> jax.Array:
    """The pairs routed to the experts ``w1``/``w2``/``w3`` of this device (all of them for ``n_dev`` 1; inside a
    ``shard_map`` over the expert axes at the gather dispatch, its own: the others' pairs give zeros), summed per
    token in ascending expert id, fp32 ``[T, D]``; ``rank``: the router's order for the sum, or None."""
    T, k = idx.shape
    # Fewer pairs than local experts (decode): gather each pair's expert weights in one batched op (on a mesh every
    # device computes every pair, masking other devices' ones: the grouped schedule would read fewer bytes, but its
    # loop and skip predicates cost a host round trip per block on GPUs, which measured slower at batch 1).
    # Otherwise group the pairs by expert: each local expert's weights are read once, other devices' pairs skipped.
    pairs = _pairs_fn(cfg, grouped=T * k >= cfg.n_routed_experts // n_dev)
    e = idx.reshape(-1)
    if n_dev > 1:  # the device's first expert id: ids outside [0, local experts) are other devices'
        e = e - jax.lax.axis_index(EXPERT_AXES) * w1.packed.shape[0]
    return combine(pairs(cfg, xt, xq, _pair_tokens(T, k), e, wts.reshape(-1), w1, w2, w3), idx, rank)


def _pair_tokens(T: int, k: int) -> jax.Array:
    """Each pair's token ``[T * k]``; a literal at decode sizes (XLA folds no iota: as ``jnp.arange(T * k) // k`` it
    was a kernel of its own on GPUs, every layer and step)."""
    return jnp.asarray(np.arange(T * k, dtype=np.int32) // k) if T * k <= 4096 else jnp.arange(T * k) // k


def _pairs_fn(cfg: Config, grouped: bool):
    """The per-device pair compute: the FP4 kernels where :func:`use_triton` says so (each device reads only the
    experts its pairs touch; their reference fallback keeps the schedule below), else the XLA schedule."""
    if use_triton(cfg):
        from dsv4_jax.kernels.fp4_moe import fp4_moe_pairs

        return functools.partial(fp4_moe_pairs, grouped=grouped)
    return pairs_grouped if grouped else pairs_gathered


def _exchange(x, out, in_off, send_sizes, out_off, recv_sizes, n_dev: int, ragged: bool):
    """``ragged_all_to_all`` over ``EXPERT_AXES``: rows ``x[in_off[j] : in_off[j] + send_sizes[j]]`` land in device
    j's ``out`` at ``out_off[j]``; ``recv_sizes[i]`` rows arrive from device i. Without ``ragged`` (CPU), a dense
    ``all_to_all`` of ``x.shape[0]``-row slots per device pair and a scatter give the same ``out``."""
    if ragged:
        return jax.lax.ragged_all_to_all(x, out, in_off, send_sizes, out_off, recv_sizes, axis_name=EXPERT_AXES)
    cap = x.shape[0]
    r = jnp.arange(cap)
    src = jnp.minimum(in_off[:, None] + r, cap - 1)  # [n_dev, cap]
    tail = (1,) * (x.ndim - 1)
    buf = jnp.where((r < send_sizes[:, None]).reshape(n_dev, cap, *tail), x[src], 0)
    recv = jax.lax.all_to_all(buf, EXPERT_AXES, 0, 0)  # [n_dev (sender), cap, ...]
    off = jax.lax.all_to_all(out_off, EXPERT_AXES, 0, 0)  # where each sender's rows go in my ``out``
    dst = jnp.where(r < recv_sizes[:, None], off[:, None] + r, out.shape[0])
    return out.at[dst.reshape(-1)].set(recv.reshape(n_dev * cap, *x.shape[1:]), mode="drop")


def _all_to_all_local(cfg: Config, n_dev: int, ragged: bool, pairs, xt, idx, wts, w1, w2, w3):
    """Per device: its ``T_l`` tokens ``xt [T_l,D]``, their choices ``idx/wts [T_l,k]`` (-1 = padding token) and its
    ``n_local`` experts -> fp32 ``[T_l, D]``; ``pairs`` computes the received pairs (grouped schedule or kernel)."""
    T_l, k = idx.shape
    n_pairs, n_local = T_l * k, w1.packed.shape[0]
    e = idx.reshape(-1)
    key = jnp.where(e >= 0, e, cfg.n_routed_experts)
    order = jnp.argsort(key, stable=True)  # pairs grouped by destination device, then expert
    dest = key // n_local  # n_dev for padding pairs: sent nowhere
    send_sizes = jnp.zeros(n_dev + 1, jnp.int32).at[dest].add(1)[:n_dev]
    in_off = jnp.cumsum(send_sizes) - send_sizes
    sizes = jax.lax.all_gather(send_sizes, EXPERT_AXES)  # [sender, receiver]
    me = jax.lax.axis_index(EXPERT_AXES)
    before = jnp.cumsum(sizes, axis=0) - sizes  # rows of earlier senders in each receiver's buffer
    out_off, recv_sizes = before[me], sizes[:, me]
    R = n_dev * n_pairs  # worst case: every pair of every device is routed to this device (nothing is dropped)
    xch = functools.partial(_exchange, n_dev=n_dev, ragged=ragged)
    args = (in_off, send_sizes, out_off, recv_sizes)
    x_in = xch(xt[order // k], jnp.zeros((R, xt.shape[1]), xt.dtype), *args)
    e_in = xch((key[order] % n_local).astype(jnp.int32), jnp.full((R,), n_local, jnp.int32), *args)
    w_in = xch(wts.reshape(-1)[order], jnp.zeros((R,), wts.dtype), *args)
    with jax.named_scope("local_experts"):
        y = pairs(cfg, x_in, quantized_input(x_in, cfg.simulate), jnp.arange(R), e_in, w_in, w1, w2, w3)
    # send every output row back to the device and slot it came from
    back = (jnp.cumsum(recv_sizes) - recv_sizes, recv_sizes, (jnp.cumsum(sizes, axis=1) - sizes)[:, me], send_sizes)
    y_back = xch(y, jnp.zeros((n_pairs, y.shape[1]), y.dtype), *back)  # row r = pair order[r]
    y_pairs = jnp.zeros_like(y_back).at[order].set(y_back)
    return combine(y_pairs, idx)
