"""``load_weights``: a checkpoint directory -> the weight pytree, one array at a time, optionally onto a mesh.

Two directory kinds: the official HF release (safetensors shards, memory-mapped) and the output of ``dsv4-convert``
(``dsv4_jax.convert.layout``: one zarr array per leaf, restored with TensorStore). Both go through the same flat
list of leaves (``layout.plan_leaves``), so they give the same pytree bit for bit.

Official directories: every expected tensor (from the weight declarations, MTP included) is checked for presence,
shape and dtype before anything is read; all problems are reported together in one :class:`CheckpointError`.
Tensors keep their on-disk formats (FP8 e4m3 + e8m0 block scales, packed FP4 + e8m0 scales); only ``tid2eid`` is
narrowed from int64 to int32. Converted directories: refused unless their commit marker (the manifest, written
last) is present; the manifest must match the config leaf for leaf.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dsv4_jax.config import Config
from dsv4_jax.convert import layout
from dsv4_jax.convert.layout import Leaf
from dsv4_jax.convert.safetensors_io import CheckpointError, SafetensorsCheckpoint
from dsv4_jax.modeling.weights import checkpoint_tensors


def validate_checkpoint(ckpt: SafetensorsCheckpoint, cfg: Config) -> None:
    """Raise one :class:`CheckpointError` listing every missing, unexpected or mis-shaped tensor."""
    expected = {name: (dt, tuple(shape)) for name, dt, shape in checkpoint_tensors(cfg)}
    problems = []
    missing = [n for n in expected if n not in ckpt.tensors]
    unexpected = [n for n in ckpt.tensors if n not in expected]
    for name, (dt, shape) in expected.items():
        info = ckpt.tensors.get(name)
        if info is not None and (info.dtype != dt or info.shape != shape):
            problems.append(f"  {name}: {info.dtype}{list(info.shape)} in {info.file.name}, expected {dt}{list(shape)}")
    if missing:
        problems.insert(0, f"  missing ({len(missing)}): " + ", ".join(missing[:8])
                        + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.insert(0, f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected[:8])
                        + (" ..." if len(unexpected) > 8 else ""))
    if problems:
        more = f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
        raise CheckpointError(f"{ckpt.path}: checkpoint does not match the config "
                              f"({cfg.n_layers} layers, {cfg.n_routed_experts} experts, dim {cfg.dim}):\n"
                              + "\n".join(problems[:30]) + more)


def _full(leaf: Leaf) -> tuple:
    return tuple(slice(None) for _ in leaf.shape)


def _index_key(index, shape) -> tuple:
    return tuple(s.indices(n) for s, n in zip(index, shape))


def _official_reader(ckpt: SafetensorsCheckpoint):
    """``read(leaf, index)``: the part ``index`` of a leaf, read from the memory-mapped official shards (stacked
    experts: only the experts in ``index``)."""

    def tensor(leaf: Leaf, name: str) -> np.ndarray:
        a = ckpt.read(name)
        if leaf.narrow_i64:
            if a.size and (a.min() < 0 or a.max() >= np.iinfo(np.int32).max):
                raise CheckpointError(f"{ckpt.tensors[name].file}: tensor {name} has values outside int32")
            a = a.astype(np.int32)
        return a

    def read(leaf: Leaf, index: tuple) -> np.ndarray:
        if leaf.stacked:
            experts = range(leaf.shape[0])[index[0]]
            return np.stack([tensor(leaf, leaf.sources[e])[index[1:]] for e in experts])
        return tensor(leaf, leaf.sources[0])[index]

    return read


def _place(leaf: Leaf, sharding, read) -> jax.Array:
    """One device array (``sharding`` None: default device) or a sharded array whose every distinct shard is read
    once (replicas share the read)."""
    if sharding is None:
        return jax.device_put(np.ascontiguousarray(read(leaf, _full(leaf))))
    cache: dict = {}

    def shard(index):
        key = _index_key(index, leaf.shape)
        if key not in cache:
            cache[key] = np.ascontiguousarray(read(leaf, index))
        return cache[key]

    return jax.make_array_from_callback(leaf.shape, sharding, shard)


def _target_shardings(cfg: Config, mesh, treedef, n: int) -> list | None:
    """Per-leaf shardings on ``mesh``: ``dsv4_jax.sharding.weight_shardings`` when that module exists, else
    replicated."""
    if mesh is None:
        return None
    fn = None
    if importlib.util.find_spec("dsv4_jax.sharding") is not None:
        fn = getattr(importlib.import_module("dsv4_jax.sharding"), "weight_shardings", None)
    if fn is None:
        return [NamedSharding(mesh, PartitionSpec())] * n
    leaves, td = jax.tree_util.tree_flatten(fn(cfg, mesh), is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if td != treedef:
        raise ValueError("dsv4_jax.sharding.weight_shardings returned a tree that does not match the weights tree")
    return leaves


def _result(path: Path, leaf: Leaf, future) -> np.ndarray:
    try:
        return future.result()
    except Exception as e:
        raise CheckpointError(f"{path / layout.WEIGHTS / leaf.unit / leaf.rel}: cannot read {leaf.path} "
                              f"({str(e).splitlines()[0]}); rerun dsv4-convert with --verify") from None


def _load_converted(path: Path, cfg: Config, leaves: list[Leaf], shardings: list | None) -> list:
    """Restore a converted directory: per unit, start the TensorStore reads of every local shard of every leaf (each
    host reads only the chunks of its own shards), then assemble the arrays."""
    import tensorstore as ts

    layout.check_manifest(path, layout.read_manifest(path), leaves)
    ctx = layout.ts_context()
    sh = shardings or [None] * len(leaves)
    out: list = []
    by_unit: dict[str, list[int]] = {}
    for i, leaf in enumerate(leaves):
        by_unit.setdefault(leaf.unit, []).append(i)
    for idxs in by_unit.values():
        arrays = {i: ts.open(layout.array_spec(path, leaves[i], create=False), context=ctx) for i in idxs}
        reads: dict = {}
        for i in idxs:
            leaf = leaves[i]
            want = [_full(leaf)] if sh[i] is None else sh[i].addressable_devices_indices_map(leaf.shape).values()
            try:
                arr = arrays[i].result()
                for index in want:
                    key = (i, _index_key(index, leaf.shape))
                    if key not in reads:
                        reads[key] = arr[index].read()
            except Exception as e:
                raise CheckpointError(f"{path / layout.WEIGHTS / leaf.unit / leaf.rel}: cannot read {leaf.path} "
                                      f"({str(e).splitlines()[0]}); rerun dsv4-convert with --verify") from None

        for i in idxs:
            out.append(_place(leaves[i], sh[i], lambda leaf, index, i=i, reads=reads: _result(path, leaf, reads[
                (i, _index_key(index, leaf.shape))])))
    return out


def load_weights(path: str | Path, cfg: Config | None = None, mesh=None):
    """Load a DeepSeek-V4 checkpoint directory into the weight pytree (device arrays).

    Args:
      path: an official HF-release directory (``model.safetensors.index.json`` and shards, read memory-mapped) or a
        directory written by ``dsv4-convert`` (refused with a clear error while its conversion is incomplete).
      cfg: the config; ``None`` reads ``config.json`` from ``path``.
      mesh: ``None`` places everything on the default device; a ``jax.sharding.Mesh`` places every array with the
        shardings of ``dsv4_jax.sharding.weight_shardings`` (replicated if that module is absent), each host
        reading only the bytes of its own shards (stacked experts: only its experts).
    """
    path = Path(path)
    converted = layout.looks_converted(path)
    if converted:
        layout.read_manifest(path)  # an incomplete conversion fails here, before anything else is read
    if cfg is None:
        cfg = Config.from_pretrained(path)
    treedef, leaves = layout.plan_leaves(cfg)
    shardings = _target_shardings(cfg, mesh, treedef, len(leaves))
    if converted:
        return jax.tree_util.tree_unflatten(treedef, _load_converted(path, cfg, leaves, shardings))
    ckpt = SafetensorsCheckpoint(path)
    validate_checkpoint(ckpt, cfg)
    read = _official_reader(ckpt)
    sh = shardings or [None] * len(leaves)
    return jax.tree_util.tree_unflatten(treedef, [_place(leaf, s, read) for leaf, s in zip(leaves, sh)])
