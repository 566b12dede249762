"""Weight pytrees, each tensor declared once: shape, storage kind, logical sharding axes, checkpoint name, init.

Everything else is derived from the declarations by :func:`materialize`: random weights (:func:`init_weights`),
abstract shapes (``jax.eval_shape(init_weights, ...)`` or :func:`abstract_weights`), the logical-axes tree used by the
sharding rules (:func:`logical_axes`, :func:`decl_tree`) and the official checkpoint's tensors, read by the loader and
written by ``dsv4_jax.convert.synthetic`` (:func:`checkpoint_tensors`, :func:`disk_tensors`).

Storage kinds (the checkpoint's formats, spec 12.1): ``fp8`` -> :class:`Fp8Tensor`, ``fp4`` -> :class:`Fp4Tensor`
(routed experts, stacked over experts), ``bf16``, ``f32``, ``i32`` (``tid2eid``, I64 on disk).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dsv4_jax.config import Config
from dsv4_jax.modeling.quant import Fp4Tensor, Fp8Tensor, pow2_scale


@dataclasses.dataclass(frozen=True)
class Decl:
    """One weight: logical shape ``[..., N, K]``, storage kind, logical axes, checkpoint key, initializer."""

    shape: tuple[int, ...]
    kind: str  # fp8 | fp4 | bf16 | f32 | i32
    axes: tuple[str | None, ...]
    key: str  # fp8/fp4: base name ('.weight'/'.scale' appended); else the full tensor name. '{e}' = expert index
    init: str = "linear"  # random values (see _random_leaf); swiglu_in/out: w1,w3 / w2 of an expert (fp8/fp4)
    n_stack: int = 0  # >0: stacked over experts (leading axis), key contains '{e}'

    @property
    def full_shape(self) -> tuple[int, ...]:
        return ((self.n_stack,) if self.n_stack else ()) + self.shape


@struct.dataclass
class HcWeights:
    """mHC mixing parameters of one site: fn f32[n_mix, hc*D], base f32[n_mix], scale f32[3 or 1]."""

    fn: jax.Array
    base: jax.Array
    scale: jax.Array


@struct.dataclass
class CompressorWeights:
    ape: jax.Array  # f32 [m, c*d]
    wkv: jax.Array  # bf16 [c*d, D]
    wgate: jax.Array  # bf16 [c*d, D]
    norm: jax.Array  # bf16 [d]


@struct.dataclass
class IndexerWeights:
    wq_b: Fp8Tensor  # [Hi*Di, q_lora]
    weights_proj: jax.Array  # bf16 [Hi, D]
    compressor: CompressorWeights


@struct.dataclass
class AttentionWeights:
    attn_sink: jax.Array  # f32 [H]
    wq_a: Fp8Tensor  # [q_lora, D]
    q_norm: jax.Array  # bf16 [q_lora]
    wq_b: Fp8Tensor  # [H*Dh, q_lora]
    wkv: Fp8Tensor  # [Dh, D]
    kv_norm: jax.Array  # bf16 [Dh]
    wo_a: Fp8Tensor  # [G*R, H*Dh/G]  (used as a bf16 einsum, exactly as convert.py's dequantized copy)
    wo_b: Fp8Tensor  # [D, G*R]
    compressor: CompressorWeights | None = None
    indexer: IndexerWeights | None = None


@struct.dataclass
class MoEWeights:
    gate: jax.Array  # bf16 [E, D]
    w1: Fp4Tensor  # [E, I, D]  gate proj
    w2: Fp4Tensor  # [E, D, I]  down proj
    w3: Fp4Tensor  # [E, I, D]  up proj
    s1: Fp8Tensor  # shared expert [I, D]
    s2: Fp8Tensor  # [D, I]
    s3: Fp8Tensor  # [I, D]
    bias: jax.Array | None = None  # f32 [E] (learned routing)
    tid2eid: jax.Array | None = None  # i32 [vocab, k] (hash routing)


@struct.dataclass
class BlockWeights:
    attn_norm: jax.Array  # bf16 [D]
    ffn_norm: jax.Array  # bf16 [D]
    hc_attn: HcWeights
    hc_ffn: HcWeights
    attn: AttentionWeights
    ffn: MoEWeights


@struct.dataclass
class MTPWeights:
    block: BlockWeights
    e_proj: Fp8Tensor  # [D, D]
    h_proj: Fp8Tensor  # [D, D]
    enorm: jax.Array  # bf16 [D]
    hnorm: jax.Array  # bf16 [D]
    norm: jax.Array  # bf16 [D]
    hc_head: HcWeights


@struct.dataclass
class Weights:
    embed: jax.Array  # bf16 [V, D]
    head: jax.Array  # bf16 [V, D]
    norm: jax.Array  # bf16 [D]
    hc_head: HcWeights
    layers: tuple[BlockWeights, ...]
    mtp: tuple[MTPWeights, ...]


# ------------------------------------------------------------------------------------------- declarations
Node = tuple  # (cls, {field: Decl | Node | None})


def _hc(cfg: Config, p: str, n_mix: int, n_scale: int) -> Node:
    hcd = cfg.hc_mult * cfg.dim
    return HcWeights, dict(fn=Decl((n_mix, hcd), "f32", (None, None), p + "fn", "hc_fn"),
                           base=Decl((n_mix,), "f32", (None,), p + "base", "hc_base"),
                           scale=Decl((n_scale,), "f32", (None,), p + "scale", "hc_scale"))


def _compressor(cfg: Config, p: str, ratio: int, d: int) -> Node:
    c = 2 if ratio == 4 else 1
    return CompressorWeights, dict(
        ape=Decl((ratio, c * d), "f32", (None, None), p + "ape", "ape"),
        wkv=Decl((c * d, cfg.dim), "bf16", (None, "embed"), p + "wkv.weight"),
        wgate=Decl((c * d, cfg.dim), "bf16", (None, "embed"), p + "wgate.weight"),
        norm=Decl((d,), "bf16", (None,), p + "norm.weight", "norm"))


def _attention(cfg: Config, p: str, ratio: int) -> Node:
    H, Dh, D, G, R = cfg.n_heads, cfg.head_dim, cfg.dim, cfg.o_groups, cfg.o_lora_rank
    f = dict(
        attn_sink=Decl((H,), "f32", ("heads",), p + "attn_sink", "normal"),
        wq_a=Decl((cfg.q_lora_rank, D), "fp8", (None, "embed"), p + "wq_a"),
        q_norm=Decl((cfg.q_lora_rank,), "bf16", (None,), p + "q_norm.weight", "norm"),
        wq_b=Decl((H * Dh, cfg.q_lora_rank), "fp8", ("q_heads", None), p + "wq_b"),
        wkv=Decl((Dh, D), "fp8", (None, "embed"), p + "wkv"),
        kv_norm=Decl((Dh,), "bf16", (None,), p + "kv_norm.weight", "norm"),
        wo_a=Decl((G * R, H * Dh // G), "fp8", ("o_groups", None), p + "wo_a"),
        wo_b=Decl((D, G * R), "fp8", ("embed", "o_groups"), p + "wo_b"),
        compressor=None, indexer=None)
    if ratio:
        f["compressor"] = _compressor(cfg, p + "compressor.", ratio, Dh)
    if ratio == 4:
        Hi, Di = cfg.index_n_heads, cfg.index_head_dim
        f["indexer"] = (IndexerWeights, dict(
            wq_b=Decl((Hi * Di, cfg.q_lora_rank), "fp8", ("index_heads", None), p + "indexer.wq_b"),
            weights_proj=Decl((Hi, D), "bf16", ("index_heads", "embed"), p + "indexer.weights_proj.weight"),
            compressor=_compressor(cfg, p + "indexer.compressor.", 4, Di)))
    return AttentionWeights, f


def _moe(cfg: Config, p: str, hashed: bool) -> Node:
    E, I, D = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim
    ex = p + "experts.{e}."
    sh = p + "shared_experts."
    return MoEWeights, dict(
        gate=Decl((E, D), "bf16", ("experts_r", "embed"), p + "gate.weight"),
        w1=Decl((I, D), "fp4", ("experts", "ffn", "embed_e"), ex + "w1", "swiglu_in", n_stack=E),
        w2=Decl((D, I), "fp4", ("experts", "embed_e", "ffn"), ex + "w2", "swiglu_out", n_stack=E),
        w3=Decl((I, D), "fp4", ("experts", "ffn", "embed_e"), ex + "w3", "swiglu_in", n_stack=E),
        s1=Decl((I, D), "fp8", ("shared_ffn", "embed"), sh + "w1", "swiglu_in"),
        s2=Decl((D, I), "fp8", ("embed", "shared_ffn"), sh + "w2", "swiglu_out"),
        s3=Decl((I, D), "fp8", ("shared_ffn", "embed"), sh + "w3", "swiglu_in"),
        bias=None if hashed else Decl((E,), "f32", (None,), p + "gate.bias", "bias"),
        tid2eid=Decl((cfg.vocab_size, cfg.n_activated_experts), "i32", ("vocab_r", None), p + "gate.tid2eid",
                     "tid2eid") if hashed else None)


def _block(cfg: Config, p: str, ratio: int, hashed: bool) -> Node:
    n_mix = (2 + cfg.hc_mult) * cfg.hc_mult
    D = cfg.dim
    return BlockWeights, dict(
        attn_norm=Decl((D,), "bf16", (None,), p + "attn_norm.weight", "norm"),
        ffn_norm=Decl((D,), "bf16", (None,), p + "ffn_norm.weight", "norm"),
        hc_attn=_hc(cfg, p + "hc_attn_", n_mix, 3), hc_ffn=_hc(cfg, p + "hc_ffn_", n_mix, 3),
        attn=_attention(cfg, p + "attn.", ratio), ffn=_moe(cfg, p + "ffn.", hashed))


def weight_decls(cfg: Config) -> Node:
    """The declaration tree of the whole model (main layers and MTP)."""
    D, V = cfg.dim, cfg.vocab_size
    layers = tuple(_block(cfg, f"layers.{i}.", cfg.ratio(i), cfg.is_hash_layer(i)) for i in range(cfg.n_layers))
    mtp = []
    for j in range(cfg.n_mtp_layers):
        p = f"mtp.{j}."
        mtp.append((MTPWeights, dict(
            block=_block(cfg, p, cfg.ratio(cfg.n_layers + j), False),
            e_proj=Decl((D, D), "fp8", (None, "embed"), p + "e_proj"),
            h_proj=Decl((D, D), "fp8", (None, "embed"), p + "h_proj"),
            enorm=Decl((D,), "bf16", (None,), p + "enorm.weight", "norm"),
            hnorm=Decl((D,), "bf16", (None,), p + "hnorm.weight", "norm"),
            norm=Decl((D,), "bf16", (None,), p + "norm.weight", "norm"),
            hc_head=_hc(cfg, p + "hc_head_", cfg.hc_mult, 1))))
    return Weights, dict(
        embed=Decl((V, D), "bf16", ("vocab", "embed"), "embed.weight", "embed"),
        head=Decl((V, D), "bf16", ("vocab", "embed"), "head.weight", "head"),
        norm=Decl((D,), "bf16", (None,), "norm.weight", "norm"),
        hc_head=_hc(cfg, "hc_head_", cfg.hc_mult, 1), layers=layers, mtp=tuple(mtp))


def materialize(node, leaf_fn: Callable[[Decl], Any]):
    """Build the pytree of ``node`` by calling ``leaf_fn`` on every :class:`Decl`."""
    if node is None:
        return None
    if isinstance(node, Decl):
        return leaf_fn(node)
    if isinstance(node, tuple) and len(node) == 2 and isinstance(node[0], type):
        cls, fields = node
        return cls(**{k: materialize(v, leaf_fn) for k, v in fields.items()})
    if isinstance(node, tuple):
        return tuple(materialize(n, leaf_fn) for n in node)
    raise TypeError(f"unexpected declaration node {node!r}")


def iter_decls(node):
    """All :class:`Decl` of a declaration tree, in declaration order."""
    if node is None:
        return
    if isinstance(node, Decl):
        yield node
    elif isinstance(node, tuple) and len(node) == 2 and isinstance(node[0], type):
        for v in node[1].values():
            yield from iter_decls(v)
    else:
        for n in node:
            yield from iter_decls(n)


# ------------------------------------------------------------------------------------------- derived trees
_PLAIN = {"bf16": jnp.bfloat16, "f32": jnp.float32, "i32": jnp.int32}


def storage_shapes(d: Decl) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Per stored component: (shape, dtype). FP8: q + 128x128 scales; FP4: packed + 1x32 scales."""
    lead = d.full_shape[:-2]
    if d.kind == "fp8":
        n, k = d.shape
        return {"q": (d.full_shape, jnp.float8_e4m3fn), "scale": (lead + (-(-n // 128), -(-k // 128)), jnp.uint8)}
    if d.kind == "fp4":
        n, k = d.shape
        if k % 32:
            raise ValueError(f"{d.key}: FP4 inner dim {k} is not a multiple of 32")
        return {"packed": (lead + (n, k // 2), jnp.uint8), "scale": (lead + (n, k // 32), jnp.uint8)}
    return {"value": (d.full_shape, _PLAIN[d.kind])}


def _wrap(d: Decl, parts: dict[str, Any]):
    if d.kind == "fp8":
        return Fp8Tensor(q=parts["q"], scale=parts["scale"])
    if d.kind == "fp4":
        return Fp4Tensor(packed=parts["packed"], scale=parts["scale"])
    return parts["value"]


def abstract_weights(cfg: Config):
    """``jax.ShapeDtypeStruct`` tree of the weights (no memory allocated)."""
    return materialize(weight_decls(cfg), lambda d: _wrap(d, {k: jax.ShapeDtypeStruct(s, t)
                                                              for k, (s, t) in storage_shapes(d).items()}))


def attention_decls(cfg: Config, ratio: int) -> Node:
    """The declaration node of one attention layer of compression ratio ``ratio`` (checkpoint keys unprefixed): what
    the per-device attention on a mesh derives its weights' partition specs from (``sharding.attention_specs``)."""
    return _attention(cfg, "", ratio)


def moe_decls(cfg: Config, hashed: bool) -> Node:
    """The declaration node of one MoE block (hash-routed or not; keys unprefixed): the per-device MoE's partition
    specs (``sharding.moe_specs``)."""
    return _moe(cfg, "", hashed)


def component_tree(node, fn: Callable[[Decl, tuple[int, ...]], Any]):
    """The weights tree of declaration ``node`` with ``fn(decl, component shape)`` at every stored component (an FP8
    weight's ``q`` and ``scale``, an FP4 weight's ``packed`` and ``scale``, a plain array)."""
    return materialize(node, lambda d: _wrap(d, {k: fn(d, shp) for k, (shp, _) in storage_shapes(d).items()}))


def decl_tree(cfg: Config):
    """Tree of :class:`Decl` matching the weights tree leaf for leaf (each stored component gets its tensor's
    declaration): lets a consumer name the checkpoint tensor of any leaf, e.g. in an error."""
    return materialize(weight_decls(cfg), lambda d: _wrap(d, {k: d for k in storage_shapes(d)}))


def logical_axes(cfg: Config):
    """Tree of logical-axis tuples matching the weights tree leaf for leaf (used by the sharding rules)."""
    def axes(d: Decl):
        if len(d.axes) != len(d.full_shape):
            raise ValueError(f"{d.key}: axes {d.axes} do not match shape {d.full_shape}")
        return _wrap(d, {k: d.axes for k in storage_shapes(d)})
    return materialize(weight_decls(cfg), axes)


# safetensors dtype of each stored component in the official checkpoint (``.weight`` / ``.scale`` for fp8/fp4)
DISK_DTYPES: dict[str, dict[str, str]] = {
    "fp8": {"q": "F8_E4M3", "scale": "F8_E8M0"}, "fp4": {"packed": "I8", "scale": "F8_E8M0"},
    "bf16": {"value": "BF16"}, "f32": {"value": "F32"}, "i32": {"value": "I64"},  # tid2eid: I64 on disk
}
_DISK_SUFFIX = {"q": ".weight", "packed": ".weight", "scale": ".scale", "value": ""}


def disk_tensors(d: Decl) -> list[tuple[str, list[tuple[str, str, tuple[int, ...]]]]]:
    """The official checkpoint's tensors of one declaration: per entry (one per expert when stacked) its base name
    and ``[(tensor name, safetensors dtype, shape)]`` (fp8/fp4: ``.weight`` then ``.scale``)."""
    parts = storage_shapes(d)
    keys = [d.key.format(e=e) for e in range(d.n_stack)] if d.n_stack else [d.key]
    lead = len(d.full_shape) - len(d.shape)  # the stacking axis is not on disk: one tensor per expert
    return [(key, [(key + _DISK_SUFFIX[c], dt, tuple(parts[c][0][lead:])) for c, dt in DISK_DTYPES[d.kind].items()])
            for key in keys]


def checkpoint_tensors(cfg: Config) -> list[tuple[str, str, tuple[int, ...]]]:
    """Every tensor of an official checkpoint for ``cfg``: (name, safetensors dtype, shape), MTP included."""
    return [t for d in iter_decls(weight_decls(cfg)) for _, ts in disk_tensors(d) for t in ts]


# ------------------------------------------------------------------------------------------- random init
def _random_leaf(cfg: Config, d: Decl, key: jax.Array):
    """Random weight in the checkpoint format with roughly the golden checkpoint's statistics: the tensor's own key
    (folded from its name), then one small jitted program per (kind, shape, initializer). Called eagerly, leaves of
    equal shape share that program, so a model's random init compiles a few small programs instead of one huge one
    (the whole-tree jit took 41 s of compile for the tiny config on a CPU, 93 s for three V4-Flash layers on an H200);
    inside an outer jit it inlines as before. The values do not depend on which."""
    key = jax.random.fold_in(key, zlib.crc32(d.key.encode()) & 0x7FFFFFFF)
    return _random_value(cfg, dataclasses.replace(d, key="", axes=()), key)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _random_value(cfg: Config, d: Decl, key: jax.Array):
    k1, k2 = jax.random.split(key)
    shape = d.full_shape
    if d.kind == "fp8":
        n, k = d.shape
        w = jax.random.normal(k1, shape, jnp.float32) / np.sqrt(k)
        nb, kb = -(-n // 128), -(-k // 128)
        wp = jnp.pad(w, [(0, 0)] * (w.ndim - 2) + [(0, nb * 128 - n), (0, kb * 128 - k)])
        amax = jnp.abs(wp.reshape(*shape[:-2], nb, 128, kb, 128)).max(axis=(-3, -1))
        s = pow2_scale(amax, 448.0, np.float32(1e-30))
        sfull = jnp.repeat(jnp.repeat(s, 128, -2), 128, -1)[..., :n, :k]
        q = jnp.clip(w / sfull, -448, 448).astype(jnp.float8_e4m3fn)
        e = (jax.lax.bitcast_convert_type(s, jnp.uint32) >> 23).astype(jnp.uint8)
        return Fp8Tensor(q=q, scale=e)
    if d.kind == "fp4":
        parts = storage_shapes(d)
        packed = jax.random.bits(k1, parts["packed"][0], jnp.uint8)
        # uniform e2m1 codes have std ~2.9: pick scales so that w ~ N(0, 1/K) in magnitude, +-1 binade jitter
        base = int(np.round(np.log2(1.0 / (2.9 * np.sqrt(d.shape[1]))))) + 127
        jitter = jax.random.randint(k2, parts["scale"][0], -1, 2)
        return Fp4Tensor(packed=packed, scale=(base + jitter).astype(jnp.uint8))
    if d.kind == "i32":  # tid2eid: distinct expert ids per row
        u = jax.random.uniform(k1, (shape[0], cfg.n_routed_experts))
        return jnp.argsort(u, axis=-1)[:, : shape[1]].astype(jnp.int32)
    n01 = jax.random.normal(k1, shape, jnp.float32)
    init = d.init
    if init == "linear":
        v = n01 / np.sqrt(shape[-1])
    elif init == "norm":
        v = jnp.clip(1 + 0.15 * n01, 0.5, 1.5)
    elif init == "embed":
        v = n01
    elif init == "head":
        v = n01 * 2 / np.sqrt(cfg.dim)
    elif init == "hc_fn":
        v = n01 / np.sqrt(shape[-1])
    elif init == "hc_base":
        v = 0.5 * n01
        if shape[0] > cfg.hc_mult:  # +1 on the comb diagonal (mixes [2hc:] are the hc x hc comb matrix)
            hc = cfg.hc_mult
            v = v.at[2 * hc:].add(jnp.eye(hc, dtype=jnp.float32).reshape(-1))
    elif init == "hc_scale":
        v = jax.random.uniform(k1, shape, jnp.float32, 0.5, 1.0)
    elif init in ("normal",):
        v = n01
    elif init == "ape":
        v = 0.5 * n01
    elif init == "bias":
        v = 0.2 * n01
    else:
        raise ValueError(f"unknown initializer {init!r} (a {d.kind} tensor of shape {shape})")
    return v.astype(_PLAIN[d.kind])


def init_weights(cfg: Config, key: jax.Array):
    """Random weights in the checkpoint formats for any config; ``jax.eval_shape(init_weights, cfg, key)`` works
    for full-size V4-Flash/V4-Pro without allocating anything."""
    return materialize(weight_decls(cfg), lambda d: _random_leaf(cfg, d, key))
