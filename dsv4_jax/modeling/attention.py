"""Attention of one layer (spec 6): q LoRA, one shared K=V head, sliding window + compressed entries, sinks.

Every query attends to an index list into one KV buffer ``[ring (W) | chunk (S) | compressed cache (Nc)]``:
  * its window: the ``W`` most recent positions ``(t-W, t]``, found in the ring (positions before the chunk) or in
    the chunk itself;
  * for HCA layers (m=128) every complete compressed entry ``w < (t+1)//128``;
  * for CSA layers (m=4) the indexer's top-k entries.
This is the official kernel's contract (index lists, -1 = masked) generalised to S tokens at per-row positions, so
prefill, chunked prefill and decode are one code path. The three sources keep the caches' stored layout (FP8 codes
where the config snaps the KV); ``kernels.sparse_attention`` reads the gathered entries from them (the Triton
kernel in place, the XLA reference through a concatenation) and decodes only those.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dsv4_jax.config import Config
from dsv4_jax.kernels import single_device, streams
from dsv4_jax.kernels.act_quant import grouped_proj_quant
from dsv4_jax.kernels.attn_prep import prep_q_kv
from dsv4_jax.kernels.attn_proj import q_kv_lora
from dsv4_jax.kernels.bf16_proj import bf16_projections, kernel_applies
from dsv4_jax.kernels.ring_write import ring_write
from dsv4_jax.kernels.sparse_attention import sparse_attention
from dsv4_jax.modeling.compressor import compress
from dsv4_jax.modeling.indexer import index_topk
from dsv4_jax.modeling.layers import rope_cos_sin
from dsv4_jax.modeling.quant import linear, quantize_act
from dsv4_jax.modeling.state import LayerState, in_layout
from dsv4_jax.modeling.weights import AttentionWeights
from dsv4_jax.sharding import DATA, MODEL, attention_specs

# Under a multi-device mesh, run the layer per device (attention's docstring); False: XLA partitions it as before
# (the mesh's kernels off). A benchmark knob (bench_decode.py --variants), not a result's: the same sums either way.
PER_DEVICE = True


def window_indices(pos: jax.Array, S: int, W: int) -> jax.Array:
    """``[B,S,W]`` buffer indices of each query's window, oldest first; ring slot ``p % W`` for positions before the
    chunk, ``W + (p - pos)`` inside it, -1 before position 0."""
    t = pos[:, None] + jnp.arange(S)[None, :]  # [B,S]
    kp = t[..., None] - (W - 1) + jnp.arange(W)  # [B,S,W] key positions
    in_chunk = kp >= pos[:, None, None]
    idx = jnp.where(in_chunk, W + kp - pos[:, None, None], kp % W)
    return jnp.where(kp >= 0, idx, -1)


def csa_projections(cfg: Config, w: AttentionWeights, x: jax.Array) -> tuple[jax.Array, ...] | None:
    """A CSA layer's five bf16 projections of its input ``x [B,S,D]`` in one launch (:mod:`dsv4_jax.kernels.bf16_proj`,
    decode rows with the kernel on): the attention compressor's ``kv``/``sc`` and the indexer compressor's (fp32
    ``[B,S,c*d]``, the scores without ``ape``), and the indexer's head weights (bf16 ``[B,S,Hi]``); None where the
    kernel does not take them (each computes its own then, as before)."""
    ws = (w.compressor.wkv, w.compressor.wgate, w.indexer.compressor.wkv, w.indexer.compressor.wgate,
          w.indexer.weights_proj)
    if not kernel_applies(x, ws, cfg.kernels):
        return None
    with jax.named_scope("csa_projections"):
        return bf16_projections(x, ws, (jnp.float32,) * 4 + (cfg.act_dtype,), kernels=cfg.kernels)


def attention(cfg: Config, w: AttentionWeights, x: jax.Array, ls: LayerState, pos: jax.Array, n_new: jax.Array,
              ratio: int, freqs: np.ndarray, xq: jax.Array | None = None
              ) -> tuple[jax.Array, LayerState, jax.Array | None]:
    """One attention layer over a chunk ``x [B,S,D]`` (attn_norm output; ``xq``: the values of its FP8 quantization
    when the caller has them, as ``mhc.hc_pre_norm_quant`` makes them, else computed here).

    Returns ``[B,S,D]``, the new layer state and, for CSA layers, the indexer's choice ``[B,S,k]`` (block ids, -1 =
    none; ``None`` for other layers).

    Under a mesh of several devices the layer runs per device in one ``shard_map`` where the weights split whole
    (``sharding.attention_specs``): each device its heads (``wq_b``, the sinks, the sparse attention), its output-LoRA
    groups (``wo_a``) and ``wo_b``'s matching input features, whose fp32 partial products are summed over ``model``
    and rounded once (the order XLA's partitioner gave them); the shared K=V head, the compressors and the indexer
    computed whole on every device (their weights are replicated); batch rows over ``data`` where they divide. Inside,
    the code is one device's, so the kernels run there as on one GPU (before, a mesh kept every attention op on XLA:
    a 3-layer V4-Flash batch-1 step compiled for two H200s had 179 kernels against one H200's 112). Elsewhere, and
    where the split would cut a head, a group or a scale block, XLA partitions the layer.
    """
    mesh = jax.sharding.get_abstract_mesh()
    # (cpu_rsqrt_tail picks the heads that take the CPU reference's tail reciprocal by their index in the whole
    # [rows x heads] array, which a device's share of the heads would change: XLA partitions that mode)
    specs = None if single_device() or cfg.cpu_rsqrt_tail or not PER_DEVICE else attention_specs(cfg, mesh, ratio)
    if specs is None:
        return _attention(cfg, w, x, ls, pos, n_new, ratio, freqs, xq, reduce=False)
    d = mesh.shape[DATA]
    rows = P(DATA if d > 1 and x.shape[0] % d == 0 else None)  # batch-major arrays (state_shardings' layout)

    def fn(w, x, ls, pos, n_new, xq):
        return _attention(cfg, w, x, ls, pos, n_new, ratio, freqs, xq, reduce=True)

    # check_vma off: the Triton custom calls inside have no replication rule (the psum'd output, the state and the
    # indexer's choice are the same on every model device by construction: replicated inputs and weights)
    return jax.shard_map(fn, mesh=mesh, in_specs=(specs, rows, rows, rows, rows, rows), out_specs=(rows, rows, rows),
                         check_vma=False)(w, x, ls, pos, n_new, xq)


def _attention(cfg: Config, w: AttentionWeights, x: jax.Array, ls: LayerState, pos: jax.Array, n_new: jax.Array,
               ratio: int, freqs: np.ndarray, xq: jax.Array | None, reduce: bool
               ) -> tuple[jax.Array, LayerState, jax.Array | None]:
    """:func:`attention` on one device's heads and groups (all of them without a mesh): ``reduce`` (inside the
    per-device ``shard_map``) sums ``wo_b``'s fp32 partial products over the ``model`` axis and rounds them once."""
    dt, sim, kn = cfg.act_dtype, cfg.simulate, cfg.kernels
    B, S, _ = x.shape
    Dh, W = cfg.head_dim, cfg.window_size
    gw = cfg.n_heads * Dh // cfg.o_groups  # the width of an output-LoRA group
    t = pos[:, None] + jnp.arange(S)[None, :]  # [B,S]
    cos, sin = rope_cos_sin(freqs, t)  # [B,S,rd/2]

    with jax.named_scope("q_proj"):
        if xq is None:
            xq = quantize_act(x) if sim else None  # shared by wq_a and wkv
        # qr [B,S,q_lora], kv [B,S,Dh]: both normed; qrq: qr's FP8 quantization where the fused kernels make it
        qr, qrq, kv = q_kv_lora(x, xq, w.wq_a, w.wkv, w.q_norm, w.kv_norm, cfg.norm_eps, dt, sim, kernels=kn)
        q = linear(qr, w.wq_b, dt, sim, qrq, kernels=kn, parallel="cols").reshape(B, S, -1, Dh)  # this device's

    with jax.named_scope("kv_proj"):
        # q: per-head RMS norm and RoPE; kv_values [B,S,Dh]: RoPE'd, before the snap (the ring write's kernel snaps
        # them itself); kv: the FP8 snap of the nope dims (spec 3.2) as codes + scales. One kernel at decode rows.
        q, kv_values, kv = prep_q_kv(q, kv, cos, sin, cfg.norm_eps, cfg.nope_dim if cfg.kv_fp8_sim else None,
                                     cfg.cpu_rsqrt_tail, kernels=kn)
        kv = in_layout(kv, ls.kv)  # [B,S,Dh] as the ring stores it

    new = {}
    comp_idx = chosen = None
    if ratio:
        proj = csa_projections(cfg, w, x) if ratio == 4 else None  # one launch for the CSA layer's five, or None
        with jax.named_scope("compressor"):
            new["ckv"], new["c_kv"], new["c_score"] = compress(cfg, w.compressor, x, ls.ckv, ls.c_kv, ls.c_score,
                                                               pos, n_new, ratio, freqs, indexer=False,
                                                               proj=proj[:2] if proj else None)
        n_c = new["ckv"].shape[1]
        if ratio == 4:
            with jax.named_scope("indexer"):
                new["ikv"], new["ic_kv"], new["ic_score"] = compress(cfg, w.indexer.compressor, x, ls.ikv, ls.ic_kv,
                                                                     ls.ic_score, pos, n_new, 4, freqs, indexer=True,
                                                                     proj=proj[2:4] if proj else None)
                # reads the state, writes none of it: a side stream where enabled (beside wq_b and the q/kv prep)
                comp_idx = chosen = streams.side("indexer", functools.partial(index_topk, cfg), w.indexer, x, qr,
                                                 new["ikv"], t, cos, sin, qrq, proj[4] if proj else None)  # [B,S,k]
        else:
            j = jnp.arange(n_c)[None, None, :]
            comp_idx = jnp.where(j < ((t + 1) // ratio)[..., None], j, -1)  # every complete entry
        comp_idx = jnp.where(comp_idx >= 0, comp_idx + W + S, -1)

    with jax.named_scope("sparse_attn"):
        idx = window_indices(pos, S, W)
        if comp_idx is not None:
            idx = jnp.concatenate([idx, comp_idx], axis=-1)  # [B,S,K] into [ring | chunk | compressed]
        o = sparse_attention(q, ls.kv, kv, new["ckv"] if ratio else None, idx, w.attn_sink, Dh**-0.5, dt,
                             kernels=kn, out_rope=(cos, sin))  # [B,S,H,Dh], the inverse RoPE applied
        # the ring write (below) after the last read of the old ring (this attention): without this order XLA copied
        # every donated ring leaf before writing it in place (9 extra kernels per 3-layer decode step on an H200).
        # On o, not on the layer's output: a barrier there kept wo_b's split-K sum out of its consumer's fusion.
        o, ring = jax.lax.optimization_barrier((o, ls.kv))

    with jax.named_scope("o_proj"):
        o = o.reshape(B, S, -1, gw)  # [B,S,G,gw]: this device's groups
        # z [B,S,G,R]: bf16 copy of wo_a, fp32 accumulation; zq: its FP8 quantization's values where the kernel
        # made them with the split-K sum (decode rows), else None (wo_b's linear quantizes)
        z, zq = grouped_proj_quant(o, w.wo_a, dt, kernels=kn)
        if reduce:  # this device's fp32 share of wo_b's sum, summed over the model axis, rounded once
            out = linear(z.reshape(B, S, -1), w.wo_b, jnp.float32, sim, zq, kernels=kn, parallel="rows")
            out = jax.lax.psum(out, MODEL).astype(dt)
        else:  # [B,S,D], or the kernel's split-K partials (quant.SplitSum): the block's next mHC kernel sums them
            out = linear(z.reshape(B, S, -1), w.wo_b, dt, sim, zq, kernels=kn, parallel="rows", partials=True)

    with jax.named_scope("kv_ring_write"):
        new["kv"] = ring_write(ring, kv, pos, n_new, kv_values, kernels=kn)  # slot t % W of the last W tokens
    return out, ls.replace(**new), chosen
