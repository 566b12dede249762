"""Device meshes and the one table that maps logical axes to mesh axes.

The mesh has two named axes: ``data`` (batch rows of the decode state) and ``model`` (attention heads, output-LoRA
groups, the shared expert's width, the vocabulary). Routed experts are split over ALL devices
(``("data", "model")``): each device holds and reads only its own experts' FP4 bytes, and the MoE runs inside an
explicit ``shard_map`` (``dsv4_jax.modeling.moe``). Everything else is partitioned by XLA from the weight and state
shardings below; the single shared K=V head, compressors, mHC and norms are replicated (they are small). Every
logical axis name a weight declares (``dsv4_jax.modeling.weights``) must be in :data:`RULES` (split) or
:data:`REPLICATED` (whole on every device); any other name is refused, naming the tensor.

Weights and state carry no mesh: place them with :func:`shard_weights` / :func:`shard_state` (or
``load_weights(..., mesh=mesh)``) and call ``dsv4_jax.forward`` as usual; it runs under the mesh of its inputs.
Several hosts: call ``jax.distributed.initialize()`` first, then build the mesh over ``jax.devices()``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsv4_jax.config import Config
from dsv4_jax.modeling.quant import Fp4Tensor
from dsv4_jax.modeling.weights import Decl, abstract_weights, attention_decls, component_tree, decl_tree, moe_decls

DATA, MODEL = "data", "model"  # the mesh's axis names, defined here only
EXPERT_AXES = (DATA, MODEL)  # routed experts are split over every device of the mesh

# logical axis -> mesh axis (or tuple of axes) it is split over
RULES: dict[str, Any] = {
    "batch": DATA,
    "experts": EXPERT_AXES,
    "q_heads": MODEL,
    "heads": MODEL,
    "o_groups": MODEL,
    "shared_ffn": MODEL,
    "vocab": MODEL,
}
# logical axes replicated on purpose (every device needs the whole dim)
REPLICATED: frozenset[str] = frozenset({
    "embed",  # the model width: activations are replicated over `model`, so weights keep it whole
    "embed_e", "ffn",  # inner dims of a routed expert: a device holds its experts whole
    "experts_r",  # router gate rows: every device scores every expert
    "vocab_r",  # tid2eid rows: every device looks up the hash routing of its tokens
    # indexer heads: every device scores every head, so the sum over heads needs no all-reduce (split, it cost one
    # [B, Nc] fp32 all-reduce per CSA layer and step: ~25-33 us each at decode on two H200s, against ~3 us to read
    # the 8 MB of V4-Flash's indexer wq_b once more) and the top-k sees one device's sums, bit for bit
    "index_heads",
})
KNOWN_AXES: frozenset[str] = frozenset(RULES) | REPLICATED


def make_mesh(data: int = 1, model: int | None = None, devices=None) -> Mesh:
    """A ``(data, model)`` mesh over ``devices`` (default: all devices; ``model`` defaults to the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    model = len(devices) // data if model is None else model
    if data * model != len(devices):
        raise ValueError(f"mesh ({data} x {model}) needs {data * model} devices, got {len(devices)}")
    return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


def _axis_size(mesh, axes) -> int:
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return int(np.prod([mesh.shape[a] for a in axes]))


def validate_mesh(cfg: Config, mesh) -> None:
    """Raise ``ValueError`` naming the count that the mesh does not divide."""
    m, e = mesh.shape[MODEL], _axis_size(mesh, EXPERT_AXES)
    checks = [("n_heads", cfg.n_heads, m, MODEL), ("o_groups", cfg.o_groups, m, MODEL),
              ("moe_inter_dim (shared expert)", cfg.moe_inter_dim, m, MODEL),
              ("vocab_size", cfg.vocab_size, m, MODEL), ("n_routed_experts", cfg.n_routed_experts, e, "data x model")]
    bad = [f"{name}={n} is not divisible by the {axis} axis ({k})" for name, n, k, axis in checks if n % k]
    if bad:
        raise ValueError(f"mesh {dict(mesh.shape)} does not fit this model: " + "; ".join(bad))


def spec_for(axes: tuple, shape: tuple[int, ...] | None = None, mesh=None, where: str = "") -> P:
    """PartitionSpec of logical ``axes``. With ``shape`` and ``mesh``, a dim the mesh axis does not divide (only the
    tiny per-block scale arrays, e.g. one 128-row scale block shared by several heads) stays replicated.

    An axis name that is neither in :data:`RULES` nor in :data:`REPLICATED` raises ``ValueError`` naming it and
    ``where`` (the tensor): a typo in a declaration must not silently replicate a tensor."""
    unknown = [a for a in axes if a is not None and a not in KNOWN_AXES]
    if unknown:
        raise ValueError(f"{where or 'tensor'}: unknown logical axis {unknown[0]!r} in {tuple(axes)}; known axes: "
                         f"split {sorted(RULES)}, replicated {sorted(REPLICATED)} (None = replicated)")
    parts = []
    for i, a in enumerate(axes):
        mesh_axes = RULES.get(a) if a is not None else None
        if mesh_axes is not None and shape is not None and mesh is not None and shape[i] % _axis_size(mesh, mesh_axes):
            mesh_axes = None
        parts.append(mesh_axes)
    return P(*parts)


def weight_shardings(cfg: Config, mesh) -> Any:
    """Pytree of ``NamedSharding`` matching the weights tree of ``cfg``."""
    validate_mesh(cfg, mesh)

    def one(path, d: Decl, sd: jax.ShapeDtypeStruct) -> NamedSharding:
        where = f"weight {d.key!r} (weights{jax.tree_util.keystr(path)})"
        return NamedSharding(mesh, spec_for(d.axes, sd.shape, mesh, where))

    return jax.tree_util.tree_map_with_path(one, decl_tree(cfg), abstract_weights(cfg))


def attention_specs(cfg: Config, mesh, ratio: int):
    """``PartitionSpec`` of every leaf of one attention layer's weights (ratio ``ratio``) as :func:`weight_shardings`
    places them, for the per-device attention of ``dsv4_jax.modeling.attention`` (one ``shard_map``: each device its
    heads, output-LoRA groups and ``wo_b`` input features); ``None`` where the ``model`` axis does not split all of
    them whole: heads, groups, and every FP8 weight's values together with its 128x128 scale blocks. Then the
    attention stays with XLA's partitioner."""
    if set(mesh.axis_names) != {DATA, MODEL}:  # not a mesh of make_mesh's: its partitioner's business
        return None
    m = mesh.shape[MODEL]
    specs = _specs(attention_decls(cfg, ratio), mesh)
    split = m == 1 or (specs.attn_sink == P(MODEL) and cfg.n_heads % m == 0 and cfg.o_groups % m == 0
                       and _whole_blocks(specs.wq_b, specs.wo_a, specs.wo_b))
    return specs if split else None


def moe_specs(cfg: Config, mesh, hashed: bool):
    """``PartitionSpec`` of every leaf of one MoE block's weights as :func:`weight_shardings` places them, for the
    per-device MoE of ``dsv4_jax.modeling.moe`` (routed experts over every device, the shared expert's width over
    ``model``); ``None`` where the ``model`` axis would cut one of the shared expert's 128x128 scale blocks."""
    if set(mesh.axis_names) != {DATA, MODEL}:
        return None
    specs = _specs(moe_decls(cfg, hashed), mesh)
    return specs if mesh.shape[MODEL] == 1 or _whole_blocks(specs.s1, specs.s2, specs.s3) else None


def _specs(node, mesh):
    return component_tree(node, lambda d, shp: spec_for(d.axes, shp, mesh, d.key))


def _whole_blocks(*fp8_specs) -> bool:
    """Whether each FP8 weight's values and scale blocks are split alike over ``model`` (no block cut)."""
    return all(t.q == t.scale and MODEL in tuple(t.q) for t in fp8_specs)


def shard_weights(weights, cfg: Config, mesh):
    """Place an existing weights pytree on ``mesh`` (each device receives only its shards)."""
    return jax.device_put(weights, weight_shardings(cfg, mesh))


def state_shardings(state, mesh):
    """Batch-major state arrays split over ``data``; positions too. Requires batch % data == 0."""
    b = state.pos.shape[0]
    if b % mesh.shape[DATA]:
        raise ValueError(f"batch size {b} is not divisible by the mesh's data axis ({mesh.shape[DATA]})")
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, P(DATA, *([None] * (x.ndim - 1)))), state)


def shard_state(state, mesh):
    return jax.device_put(state, state_shardings(state, mesh))


def mesh_of(tree) -> Mesh | None:
    """The mesh the arrays of ``tree`` are placed on (None for single-device / unplaced arrays)."""
    for leaf in jax.tree_util.tree_leaves(tree):
        s = getattr(leaf, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh.size > 1:
            return s.mesh
    return None


def use_mesh_of(tree):
    """Context manager: run under the mesh of ``tree`` (no-op without one)."""
    mesh = mesh_of(tree)
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def expert_bytes_per_device(w: Fp4Tensor) -> dict:
    """Bytes of a stacked expert tensor held by each device (packed values + scales)."""
    out: dict = {}
    for arr in (w.packed, w.scale):
        for shard in arr.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


__all__ = ["DATA", "EXPERT_AXES", "KNOWN_AXES", "MODEL", "REPLICATED", "RULES", "attention_specs",
           "expert_bytes_per_device", "make_mesh", "mesh_of", "moe_specs", "shard_state", "shard_weights", "spec_for",
           "state_shardings", "use_mesh_of", "validate_mesh", "weight_shardings"]
