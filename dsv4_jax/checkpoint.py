"""``load_weights``: a checkpoint directory -> the weight pytree, one array at a time, optionally onto a mesh.

Two directory kinds: the official HF release (safetensors shards, memory-mapped) and the output of ``dsv4-convert``
(``dsv4_jax.convert.layout``: one zarr array per leaf, restored with TensorStore). Both go through the same flat
list of leaves (``layout.plan_leaves``), so they give the same pytree bit for bit.

:func:`check_checkpoint_dir` runs first and tells the two kinds apart; a missing, empty or foreign directory, a
partial conversion (with the command that finishes it) or a download with missing shards is refused there in one
paragraph. Official directories: every expected tensor (from the weight declarations, MTP included) is checked for
presence, shape and dtype before anything is read; all problems are reported together in one
:class:`CheckpointError`. Tensors keep their on-disk formats (FP8 e4m3 + e8m0 block scales, packed FP4 + e8m0
scales); only ``tid2eid`` is narrowed from int64 to int32. Converted directories: refused unless their commit marker
(the manifest, written last) is present; the manifest must match the config leaf for leaf.

Values: what is cheap to check is checked as each array is read, while its bytes are in memory anyway
(:func:`check_values`): every e8m0 scale tensor is free of the NaN code 255, every ``tid2eid`` entry lies in
``[0, n_routed_experts)`` and the small fp32/bf16 tensors (norms, biases, router gates, mHC parameters, attention
sinks, compressor position biases) are finite. The big matrices (embeddings, head, FP8/FP4 weights, compressor
projections) are not scanned: non-finite logits they cause are caught during generation instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
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


# ------------------------------------------------------------------------------------------- directory check
_WHAT = ("load_weights and --ckpt take a DeepSeek-V4 checkpoint directory: the official release (config.json, "
         "model.safetensors.index.json and the model-*.safetensors shards) or the output of `dsv4-convert SRC OUT`")


def check_checkpoint_dir(path: str | Path) -> str:
    """``"official"`` or ``"converted"``: the kind of checkpoint directory at ``path``, after checking that it is
    complete enough to load. Raises :class:`CheckpointError` (one paragraph naming the path and the way out) for a
    missing path, a file, an empty directory, a directory without ``config.json``, a partial or damaged conversion
    (with the ``dsv4-convert`` command that finishes or repairs it) and an official directory whose index lists
    shards that are absent. Reads only directory entries and small JSON files."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory ({_WHAT})")
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file, not a directory ({_WHAT})")
    try:
        empty = next(path.iterdir(), None) is None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot list the directory ({e.strerror})") from None
    if empty:
        raise CheckpointError(f"{path}: the directory is empty ({_WHAT})")
    if layout.looks_converted(path):
        _check_converted_dir(path)
        return "converted"
    _check_official_dir(path)
    return "official"


def _check_official_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json, so this is not a DeepSeek-V4 checkpoint directory ({_WHAT})")
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        if not any(path.glob("*.safetensors")):
            raise CheckpointError(f"{path}: has config.json but no model.safetensors.index.json and no *.safetensors "
                                  "shard: the weights are missing (download them next to config.json)")
        return
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: corrupted index ({type(e).__name__}: {e}); download it again") from None
    missing = [f for f in shards if not (path / f).is_file()]
    if missing:
        more = f", ... ({len(missing)} in all)" if len(missing) > 5 else ""
        raise CheckpointError(f"{path / missing[0]}: shard file is missing: {len(missing)} of the {len(shards)} shards "
                              f"listed in {index.name} are absent ({', '.join(missing[:5])}{more}); the download is "
                              f"incomplete: download the missing file(s) into {path}")


def _converter_running(path: Path) -> bool:
    """Whether a ``dsv4-convert`` process holds the directory's lock right now."""
    import fcntl

    try:
        with open(path / layout.LOCK) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:
        pass
    return False


def _check_converted_dir(path: Path) -> None:
    """A conversion is complete when its manifest (written last), config.json and every unit's marker and directory
    are there (the chunk files are checked as they are read). Messages give the ``dsv4-convert`` command that
    finishes or repairs the directory, with the source recorded in its plan or manifest."""
    weights = path / layout.WEIGHTS
    plan, _ = layout.read_json(weights / layout.PLAN)
    manifest, m_err = layout.read_json(path / layout.MANIFEST)
    plans = [p for p in (plan, manifest.get("plan") if isinstance(manifest, dict) else None) if isinstance(p, dict)]
    source = next((p["source"] for p in plans if isinstance(p.get("source"), str)), None)
    cmd = (f"`dsv4-convert {source} {path}`" if source else
           f"`dsv4-convert SRC {path}` (SRC: the official checkpoint it was converted from)")
    busy = " A dsv4-convert process is writing this directory right now: wait for it to finish." \
        if _converter_running(path) else ""
    markers = sorted(p.name[:-len(".done.json")] for p in weights.glob("*.done.json")) if weights.is_dir() else []
    if m_err == "missing":
        total = _unit_count(source)
        of = f" of {total}" if total else ""
        raise CheckpointError(f"{path}: incomplete converted checkpoint: {len(markers)}{of} units converted, no "
                              f"{layout.MANIFEST} (written last, when a conversion completes)"
                              + ("" if (path / "config.json").is_file() else " and no config.json yet")
                              + f".{busy} The conversion was interrupted or is still running; to finish it, run "
                              f"{cmd} again: it keeps the finished units and resumes.")
    if m_err:
        fix = f"rerunning {cmd} repairs it" if plans else (f"its plan is lost too: running {cmd} with --overwrite "
                                                            "(deletes only the converter's files) converts it again")
        raise CheckpointError(f"{path / layout.MANIFEST}: corrupted manifest ({m_err}): a damaged converted "
                              f"checkpoint.{busy} To load it, {fix}.")
    layout.read_manifest(path)  # format and version
    units = manifest.get("units") if isinstance(manifest.get("units"), list) else []
    lost = [u for u in units if u not in markers or not (weights / str(u)).is_dir()]
    problems = []
    if lost:
        problems.append(f"{len(lost)} of its {len(units)} units lack their data or marker in {weights} "
                        f"({', '.join(map(str, lost[:5]))}{', ...' if len(lost) > 5 else ''})")
    if not (path / "config.json").is_file():
        problems.append("config.json is missing")
    if problems:
        raise CheckpointError(f"{path}: damaged converted checkpoint: {'; '.join(problems)}.{busy} Run {cmd} again: "
                              "it rewrites what is missing and keeps the rest.")


def _unit_count(source: str | None) -> int | None:
    """Number of conversion units of the source checkpoint (None when its config cannot be read)."""
    if not source:
        return None
    try:
        _, leaves = layout.plan_leaves(Config.from_pretrained(source))
    except (OSError, ValueError):
        return None
    return len(layout.units_of(leaves))


# ------------------------------------------------------------------------------------------- value checks
_BIG_FLOATS = ("embed", "head", "wkv", "wgate", "weights_proj")  # bf16 matrices that are not scanned (size)


def value_check(leaf: Leaf) -> str | None:
    """Which load-time value check applies to a leaf: ``"scale"`` (e8m0 bytes, no 255), ``"tid2eid"`` (expert ids
    in range), ``"finite"`` (small fp32/bf16 tensors) or ``None``."""
    if leaf.narrow_i64:
        return "tid2eid"
    if leaf.dtype == "uint8" and leaf.path.endswith(".scale"):
        return "scale"
    if leaf.dtype in ("bfloat16", "float32") and leaf.path.rsplit(".", 1)[-1] not in _BIG_FLOATS:
        return "finite"
    return None


def check_values(leaf: Leaf, a: np.ndarray, index: tuple, n_experts: int, name: str, where: str) -> None:
    """Raise :class:`CheckpointError` naming ``where`` (the file), the checkpoint tensor ``name``, the first bad index
    and value when ``a`` (the part ``index`` of the tensor ``name``, one expert of a stacked leaf) fails the leaf's
    :func:`value_check`. One vectorised pass over bytes already in memory; the index is only located on failure."""
    kind = value_check(leaf)
    if kind is None or a.size == 0:
        return
    if kind == "scale":
        if a.max() != 255:
            return
        bad = a == 255
    elif kind == "tid2eid":
        if a.min() >= 0 and a.max() < n_experts:
            return
        bad = (a < 0) | (a >= n_experts)
    elif a.dtype == np.float32:
        if np.isfinite(a).all():
            return
        bad = ~np.isfinite(a)
    else:  # bf16 (numpy has no native ufuncs for it): exponent bits all ones = inf or NaN
        exp = a.view(np.uint16) & 0x7F80
        if exp.max() != 0x7F80:
            return
        bad = exp == 0x7F80
    pos = tuple(int(i) for i in np.argwhere(bad)[0])
    shape = leaf.shape[1:] if leaf.stacked else leaf.shape
    at = [p + sl.indices(n)[0] for p, sl, n in zip(pos, index, shape)]
    if kind == "scale":
        what = f"e8m0 scale byte 255 (the NaN code: its whole block of weights would be NaN) at index {at}"
    elif kind == "tid2eid":
        what = (f"hash-routing entry tid2eid{at} = {int(a[pos])} (an expert of token id {at[0]}) is outside "
                f"[0, n_routed_experts={n_experts})")
    else:
        what = f"non-finite value {float(a[pos])} at index {at}"
    raise CheckpointError(f"{where}: tensor {name}: {what}; the checkpoint is corrupted (download or convert this "
                          "file again)")


def _full(leaf: Leaf) -> tuple:
    return tuple(slice(None) for _ in leaf.shape)


def _index_key(index, shape) -> tuple:
    return tuple(s.indices(n) for s, n in zip(index, shape))


def _official_reader(ckpt: SafetensorsCheckpoint, n_experts: int):
    """``read(leaf, index)``: the part ``index`` of a leaf, read from the memory-mapped official shards (stacked
    experts: only the experts in ``index``), its values checked (:func:`check_values`)."""

    def tensor(leaf: Leaf, name: str, index: tuple) -> np.ndarray:
        a = np.ascontiguousarray(ckpt.read(name)[index])  # the bytes are read here
        check_values(leaf, a, index, n_experts, name, str(ckpt.tensors[name].file))
        if leaf.narrow_i64:
            a = a.astype(np.int32)  # safe: the check bounded the values by n_experts
        return a

    def read(leaf: Leaf, index: tuple) -> np.ndarray:
        if leaf.stacked:
            experts = range(leaf.shape[0])[index[0]]
            return np.stack([tensor(leaf, leaf.sources[e], index[1:]) for e in experts])
        return tensor(leaf, leaf.sources[0], index)

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


def _result(path: Path, leaf: Leaf, future, index: tuple, n_experts: int) -> np.ndarray:
    """The array read by ``future`` (the part ``index`` of a converted leaf), its values checked."""
    where = str(path / layout.WEIGHTS / leaf.unit / leaf.rel)
    try:
        a = future.result()
    except Exception as e:
        raise CheckpointError(f"{where}: cannot read {leaf.path} ({str(e).splitlines()[0]}); rerun dsv4-convert with "
                              "--verify") from None
    if leaf.stacked:  # one source tensor per expert: name the expert's tensor
        for j, e in enumerate(range(leaf.shape[0])[index[0]]):
            check_values(leaf, a[j], index[1:], n_experts, leaf.sources[e], where)
    else:
        check_values(leaf, a, index, n_experts, leaf.sources[0], where)
    return a


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
            out.append(_place(leaves[i], sh[i], lambda leaf, index, i=i, reads=reads: _result(
                path, leaf, reads[(i, _index_key(index, leaf.shape))], index, cfg.n_routed_experts)))
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
    Raises:
      CheckpointError: naming the file and tensor: the directory is missing, incomplete or damaged
        (:func:`check_checkpoint_dir`), a tensor is missing or mis-shaped, or a value fails :func:`check_values`
        (scale byte 255, ``tid2eid`` out of range, non-finite norm/bias/gate/mHC value).
    """
    path = Path(path)
    converted = check_checkpoint_dir(path) == "converted"  # a missing/partial directory fails here, before any read
    if cfg is None:
        cfg = Config.from_pretrained(path)
    treedef, leaves = layout.plan_leaves(cfg)
    shardings = _target_shardings(cfg, mesh, treedef, len(leaves))
    if converted:
        return jax.tree_util.tree_unflatten(treedef, _load_converted(path, cfg, leaves, shardings))
    ckpt = SafetensorsCheckpoint(path)
    validate_checkpoint(ckpt, cfg)
    read = _official_reader(ckpt, cfg.n_routed_experts)
    sh = shardings or [None] * len(leaves)
    return jax.tree_util.tree_unflatten(treedef, [_place(leaf, s, read) for leaf, s in zip(leaves, sh)])
