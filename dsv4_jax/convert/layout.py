"""On-disk layout of a converted checkpoint: one zarr v3 array per pytree leaf, grouped in units (``top``, one per
layer, one per MTP block), written with TensorStore and restorable onto any mesh.

Why this layout: the weights pytree (``dsv4_jax.modeling.weights``) is flattened once into :class:`Leaf` records in
``jax.tree_util`` order, so the converter and both loaders agree on every array by construction. Each leaf is a plain
zarr v3 array (``bytes`` codec, no compression: FP8/FP4 codes barely compress and decoding would cost more than the
disk saves) in the ``file`` kvstore, so every chunk is one file whose bytes are the tensor's raw little-endian bytes:
the output of a conversion is byte-for-byte reproducible, and a restore onto a mesh reads only the chunks that
overlap the local shards. Chunks never cross an expert (routed experts: one chunk per expert, so expert parallelism
reads exactly its experts' bytes) and split the other logically shardable axes (heads, vocab, ...) in halves down
to ``CHUNK_BYTES``, independently of any mesh.

Directory::

    OUT/config.json, generation_config.json, tokenizer*, inference/...  copied from the source (non-weight files)
    OUT/weights/plan.json                       what this conversion writes and from which source (resume check)
    OUT/weights/<unit>/<leaf>/zarr.json, c/...  one array per leaf, e.g. weights/layers.3/ffn.w1.packed/
    OUT/weights/<unit>.done.json                unit committed: crc32 of every source tensor's stored bytes
    OUT/.dsv4_convert.lock                      empty; locked while a converter writes the directory
    OUT/dsv4_manifest.json                      written last: the commit marker (absent = incomplete)

These paths (plus the copied files the manifest lists) are the converter's own: ``owned_paths`` names them, and
``--overwrite`` deletes nothing else, so files a user keeps in the directory survive. ``damage`` checks that a
directory claiming to be complete really is (manifest, every unit marker, every array's metadata and chunk files).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dsv4_jax.config import Config
from dsv4_jax.convert.safetensors_io import CheckpointError
from dsv4_jax.modeling.quant import Fp4Tensor, Fp8Tensor
from dsv4_jax.modeling.weights import Decl, materialize, storage_shapes, weight_decls

FORMAT = "dsv4-jax/converted-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "dsv4_manifest.json"
WEIGHTS = "weights"
PLAN = "plan.json"
LOCK = ".dsv4_convert.lock"  # held (flock) by the converter writing the directory
UNIT_NAME = re.compile(r"(top|layers\.\d+|mtp\.\d+)")  # the unit names plan_leaves produces
CHUNK_BYTES = 4 << 20  # largest chunk (file) of a non-expert array; experts: one chunk per expert (<= this if split)


class ConversionError(RuntimeError):
    """The conversion cannot proceed (output directory problems, write failures)."""


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One array of the weights pytree and where its bytes come from in the official checkpoint."""

    path: str  # pytree path, e.g. "layers.3.ffn.w1.packed"
    unit: str  # "top" | "layers.3" | "mtp.0": the conversion (and resume) unit
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name as stored: float8_e4m3fn, uint8, bfloat16, float32, int32
    chunks: tuple[int, ...]
    sources: tuple[str, ...]  # official tensor names; stacked leaves: one per expert (leading axis)
    stacked: bool
    narrow_i64: bool  # tid2eid: I64 on disk, int32 in the pytree

    @property
    def rel(self) -> str:
        """Path of the array inside its unit directory."""
        return self.path[len(self.unit) + 1:] if self.unit != "top" else self.path

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def source_index(self, i: int) -> tuple:
        """Index of source tensor ``i`` inside the leaf (an expert row, or everything)."""
        return (i,) if self.stacked else ()


class _Slot:
    """Placeholder leaf (not a pytree node) carrying a declaration and its stored component."""

    def __init__(self, decl: Decl, comp: str):
        self.decl, self.comp = decl, comp


def _slots(d: Decl):
    parts = {k: _Slot(d, k) for k in storage_shapes(d)}
    if d.kind == "fp8":
        return Fp8Tensor(q=parts["q"], scale=parts["scale"])
    if d.kind == "fp4":
        return Fp4Tensor(packed=parts["packed"], scale=parts["scale"])
    return parts["value"]


def _key_str(k) -> str:
    for attr in ("name", "idx", "key"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    raise TypeError(f"unexpected pytree key {k!r}")


def chunk_shape(shape: tuple[int, ...], itemsize: int, axes: tuple, stacked: bool,
                target: int = CHUNK_BYTES) -> tuple[int, ...]:
    """Chunk of one array: one expert per chunk for stacked arrays, then the largest logically shardable axis (a
    named logical axis; any axis if none is named) halved until the chunk is at most ``target`` bytes."""
    chunk = list(shape)
    first = 1 if stacked else 0
    if stacked:
        chunk[0] = 1
    cand = [i for i in range(first, len(shape)) if axes[i] is not None] or list(range(first, len(shape)))
    while math.prod(chunk) * itemsize > target:
        splittable = [i for i in cand if chunk[i] > 1]
        if not splittable:
            break
        i = max(splittable, key=lambda j: chunk[j])
        chunk[i] = -(-chunk[i] // 2)
    return tuple(max(1, c) for c in chunk)


def plan_leaves(cfg: Config) -> tuple[Any, list[Leaf]]:
    """``(treedef, leaves)`` of the weights pytree of ``cfg`` in ``jax.tree_util`` flatten order."""
    tree = materialize(weight_decls(cfg), _slots)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = []
    for keypath, slot in flat:
        d, comp = slot.decl, slot.comp
        path = ".".join(_key_str(k) for k in keypath)
        parts = path.split(".")
        unit = ".".join(parts[:2]) if parts[0] in ("layers", "mtp") else "top"
        shape, dt = storage_shapes(d)[comp]
        dtype = np.dtype(dt).name
        suffix = {"q": ".weight", "packed": ".weight", "scale": ".scale", "value": ""}[comp]
        keys = [d.key.format(e=e) for e in range(d.n_stack)] if d.n_stack else [d.key]
        axes = d.axes if len(d.axes) == len(shape) else (None,) * len(shape)
        leaves.append(Leaf(path=path, unit=unit, shape=tuple(shape), dtype=dtype,
                           chunks=chunk_shape(tuple(shape), np.dtype(dtype).itemsize, axes, bool(d.n_stack)),
                           sources=tuple(k + suffix for k in keys), stacked=bool(d.n_stack),
                           narrow_i64=d.kind == "i32"))
    return treedef, leaves


def units_of(leaves: list[Leaf]) -> dict[str, list[Leaf]]:
    """Leaves grouped by unit, units in pytree order (top-level tensors first)."""
    out: dict[str, list[Leaf]] = {}
    for leaf in leaves:
        out.setdefault(leaf.unit, []).append(leaf)
    return out


def leaf_record(leaf: Leaf) -> dict:
    return {"unit": leaf.unit, "shape": list(leaf.shape), "dtype": leaf.dtype, "chunks": list(leaf.chunks)}


def plan_digest(leaves: list[Leaf]) -> str:
    """sha256 of everything that decides the bytes written (paths, shapes, dtypes, chunks, sources)."""
    h = hashlib.sha256()
    for leaf in leaves:
        h.update(json.dumps(dataclasses.astuple(leaf)).encode())
    h.update(f"{FORMAT}/{FORMAT_VERSION}".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- TensorStore specs
def array_spec(root: Path, leaf: Leaf, create: bool) -> dict:
    """TensorStore spec of one leaf under the converted directory ``root`` (absolute paths built at open time, so a
    converted directory can be moved)."""
    where = str(Path(root).resolve() / WEIGHTS / leaf.unit / leaf.rel) + "/"
    spec: dict = {"driver": "zarr3", "kvstore": {"driver": "file", "path": where},
                  "recheck_cached_data": False, "recheck_cached_metadata": False}
    if create:
        spec["metadata"] = {
            "shape": list(leaf.shape), "data_type": leaf.dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(leaf.chunks)}},
            "chunk_key_encoding": {"name": "default"},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}], "fill_value": 0}
        spec.update(create=True, delete_existing=True, store_data_equal_to_fill_value=True)
    else:
        spec["fill_missing_data_reads"] = False  # a missing chunk file is an error, never silent zeros
    return spec


def ts_context(io_sync: bool = True):
    """TensorStore context: enough file I/O concurrency to keep a disk busy, data copies on every core."""
    import tensorstore as ts

    return ts.Context({"file_io_sync": io_sync, "file_io_concurrency": {"limit": 32},
                       "data_copy_concurrency": {"limit": max(2, os.cpu_count() or 2)},
                       "cache_pool": {"total_bytes_limit": 0}})


# ------------------------------------------------------------------------------------------- converted directories
def looks_converted(path: Path) -> bool:
    """Whether ``path`` is (the start of) a converted checkpoint rather than an official one."""
    return (path / MANIFEST).is_file() or (path / WEIGHTS / PLAN).is_file() or (path / LOCK).is_file()


def read_manifest(path: Path) -> dict:
    """The commit marker of a converted directory; a clear error when the conversion is incomplete or corrupted."""
    f = path / MANIFEST
    if not f.is_file():
        raise CheckpointError(f"{path}: incomplete converted checkpoint (no {MANIFEST}, which is written last): "
                              "the conversion was interrupted or is still running; rerun `dsv4-convert SRC "
                              f"{path}` to finish it")
    try:
        m = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: corrupted manifest ({e}); rerunning `dsv4-convert SRC {path}` repairs it "
                              "(or add --overwrite to convert again)") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{f}: not a dsv4-jax converted checkpoint manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{f}: format version {m.get('format_version')}, this dsv4-jax reads "
                              f"{FORMAT_VERSION}; reconvert the official checkpoint")
    return m


def check_manifest(path: Path, manifest: dict, leaves: list[Leaf]) -> None:
    """Raise one error listing every leaf of ``cfg`` that the converted directory lacks or stores differently."""
    stored = manifest.get("leaves", {})
    problems = []
    for leaf in leaves:
        rec = stored.get(leaf.path)
        if rec is None:
            problems.append(f"  {leaf.path}: missing")
        elif rec.get("shape") != list(leaf.shape) or rec.get("dtype") != leaf.dtype:
            problems.append(f"  {leaf.path}: {rec.get('dtype')}{rec.get('shape')}, expected {leaf.dtype}"
                            f"{list(leaf.shape)}")
    extra = sorted(set(stored) - {leaf.path for leaf in leaves})
    if extra:
        problems.append(f"  unexpected ({len(extra)}): " + ", ".join(extra[:8]) + (" ..." if len(extra) > 8 else ""))
    if problems:
        raise CheckpointError(f"{path / MANIFEST}: converted checkpoint does not match the config:\n"
                              + "\n".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else ""))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON durably: temp file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------- ownership and damage
def marker_path(root: Path, unit: str) -> Path:
    return Path(root) / WEIGHTS / f"{unit}.done.json"


def _inside(root: Path, rel: str) -> Path | None:
    """``root / rel`` when ``rel`` is a plain relative path that stays inside ``root``, through no symlinked folder
    (a manifest is data: a tampered one, or a folder replaced by a link, must not make us delete anything outside the
    output directory)."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        return None
    p = root / rel
    if p.parent.resolve() != root.resolve() / Path(rel).parent:  # a symlinked folder on the way leads elsewhere
        return None
    return p


def owned_paths(root: Path, manifest: dict | None) -> list[Path]:
    """Every existing path of ``root`` that the converter wrote: the manifest, ``weights/plan.json``, the unit
    directories and markers (recognised by name, so a partial conversion's units are included), their temporary
    files, and the copied non-weight files listed by the manifest (none when it is unreadable: the converter cannot
    prove it wrote them). The lock file is not included (it is held while this runs)."""
    root = Path(root)
    out = [root / n for n in (MANIFEST, MANIFEST + ".tmp")]
    w = root / WEIGHTS
    if w.is_dir() and not w.is_symlink():
        for p in w.iterdir():
            name = p.name[:-4] if p.name.endswith(".tmp") else p.name
            unit = name[:-len(".done.json")] if name.endswith(".done.json") else name
            if name == PLAN or (UNIT_NAME.fullmatch(unit) and (p.is_dir() or name != unit)):
                out.append(p)
    aux = (manifest or {}).get("aux_files", [])
    for rel in aux if isinstance(aux, list) else []:
        p = _inside(root, rel)
        if p is not None:
            out.append(p)
    return [p for p in out if p.is_symlink() or p.exists()]


def remove_owned(root: Path, manifest: dict | None) -> list[Path]:
    """Delete what ``owned_paths`` lists (the manifest first, so no reader ever sees a half-deleted 'complete'
    directory), then the directories this left empty (``weights/``, copied sub-folders); nothing else. Returns the
    paths deleted."""
    root = Path(root)
    paths = owned_paths(root, manifest)
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    parents = sorted({q for p in paths for q in p.parents if q != root and root in q.parents},
                     key=lambda q: len(q.parts), reverse=True)
    for d in parents:
        if d.is_dir() and not d.is_symlink() and not any(d.iterdir()):
            d.rmdir()
    return paths


def read_json(f: Path) -> tuple[Any, str | None]:
    """``(value, None)``, or ``(None, what is wrong)`` for a missing or unreadable JSON file."""
    if not f.is_file():
        return None, "missing"
    try:
        return json.loads(f.read_bytes()), None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None, f"unreadable ({str(e).splitlines()[0]})"


def _array_damage(root: Path, leaf: Leaf) -> str | None:
    """What is wrong with one stored array: its ``zarr.json`` (shape, dtype, chunks) or a missing chunk file."""
    where = Path(root) / WEIGHTS / leaf.unit / leaf.rel
    meta, err = read_json(where / "zarr.json")
    if err:
        return f"{where.relative_to(root)}/zarr.json: {err}"
    try:
        ok = (meta["shape"] == list(leaf.shape) and meta["data_type"] == leaf.dtype
              and meta["chunk_grid"]["configuration"]["chunk_shape"] == list(leaf.chunks))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        return f"{where.relative_to(root)}/zarr.json: does not describe {leaf.dtype}{list(leaf.shape)}"
    want = math.prod(-(-s // c) for s, c in zip(leaf.shape, leaf.chunks))
    have = sum(len(files) for _, _, files in os.walk(where / "c")) if leaf.shape else int((where / "c").is_file())
    if have != want:
        return f"{where.relative_to(root)}: {want - have} of {want} chunk file(s) missing"
    return None


def unit_damage(root: Path, unit: str, leaves: list[Leaf], plan_sha: str) -> list[str]:
    """Why ``unit`` is not committed in ``root`` (empty when it is): its marker must parse, belong to this plan and
    hold a checksum for exactly the unit's source tensors, and every array must be present."""
    f = marker_path(root, unit)
    rel = f.relative_to(root)
    m, err = read_json(f)
    if err:
        return [f"{rel}: {err}"]
    if not isinstance(m, dict) or m.get("plan_sha256") != plan_sha or m.get("unit") != unit:
        return [f"{rel}: belongs to another conversion"]
    crcs = m.get("crc32")
    names = {s for leaf in leaves for s in leaf.sources}
    if not isinstance(crcs, dict) or set(crcs) != names or not all(isinstance(v, int) for v in crcs.values()):
        return [f"{rel}: does not hold one checksum per source tensor of the unit"]
    return [p for p in (_array_damage(root, leaf) for leaf in leaves) if p]


def manifest_damage(root: Path, plan: dict, leaves: list[Leaf]) -> list[str]:
    """Why ``root``'s manifest does not describe the conversion ``plan`` of ``leaves`` (empty when it does)."""
    m, err = read_json(Path(root) / MANIFEST)
    if err:
        return [f"{MANIFEST}: {err}"]
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
        return [f"{MANIFEST}: not a {FORMAT} v{FORMAT_VERSION} manifest"]
    if not same_plan(m.get("plan"), plan):
        return [f"{MANIFEST}: records another conversion plan or source"]
    try:
        check_manifest(root, m, leaves)
    except CheckpointError as e:
        return [str(e)]
    if m.get("units") != list(units_of(leaves)) or not isinstance(m.get("aux_files"), list):
        return [f"{MANIFEST}: unit or file list does not match the plan"]
    lost = [rel for rel in m["aux_files"] if (p := _inside(Path(root), rel)) is None or not p.is_file()]
    return [f"{MANIFEST}: listed file(s) missing: {', '.join(map(str, lost[:5]))}"] if lost else []


# ------------------------------------------------------------------------------------------- output directory
def entries(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.name != LOCK]


def check_out_dir(src: Path, out: Path) -> None:
    """Refuse an output directory that overlaps the source (either way, symlinks resolved: a conversion or an
    ``--overwrite`` there could overwrite or delete source files), a file, or a non-empty directory we did not
    write."""
    s, o = src.resolve(), out.resolve()
    if s == o or s in o.parents or o in s.parents:
        how = "is" if s == o else "lies inside" if s in o.parents else "contains"
        raise ConversionError(f"{out}: the output directory {how} the source directory {src} (resolved: {o} and "
                              f"{s}); choose an output directory outside the source, and not containing it")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out}: exists and is not a directory")
    if out.is_dir() and entries(out) and not looks_converted(out):
        raise ConversionError(f"{out}: directory is not empty and is not a dsv4-convert output; choose an empty or "
                              "new directory (refusing to delete unknown files)")


def lock_dir(out: Path):
    """Exclusive lock on ``out`` for this process's lifetime (released by the OS even on SIGKILL). On a read-only
    directory an existing lock file is opened for reading (flock works on it), so a complete conversion there can
    still be checked and verified; anything that must write then fails naming the file."""
    import fcntl

    try:
        f = open(out / LOCK, "a+")  # held open until the conversion ends
    except OSError:
        if not (out / LOCK).is_file():
            raise
        f = open(out / LOCK)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConversionError(f"{out}: another dsv4-convert process is writing this directory") from None
    return f


def same_plan(old, plan: dict) -> bool:
    return isinstance(old, dict) and all(old.get(k) == plan[k] for k in ("plan_sha256", "source_sha256"))


def prepare_out(out: Path, plan: dict, overwrite: bool, log: Callable[[str], None]) -> None:
    """Keep a previous conversion of the same source (resume or repair), or with ``overwrite`` delete the converter's
    own files of a previous conversion (``owned_paths``; files the user keeps there stay)."""
    if not entries(out):
        return
    manifest, m_err = read_json(out / MANIFEST)
    manifest = manifest if isinstance(manifest, dict) else None
    old, p_err = read_json(out / WEIGHTS / PLAN)
    if not isinstance(old, dict):
        old = manifest.get("plan") if manifest else None
    if overwrite:
        removed = remove_owned(out, manifest)
        kept = sorted(p.name for p in entries(out))
        more = f"; kept {len(kept)} entries it cannot prove it wrote: {', '.join(kept[:5])}" if kept else ""
        log(f"{out}: --overwrite: deleted the previous conversion ({len(removed)} path(s)){more}")
        return
    if not isinstance(old, dict):
        raise ConversionError(f"{out}: damaged conversion: {WEIGHTS}/{PLAN} is {p_err or 'not a plan'} and {MANIFEST} "
                              f"is {m_err or 'without a plan'}, so the source it was converted from is unknown; "
                              "pass --overwrite to delete the converter's files there (nothing else) and convert again")
    if not same_plan(old, plan):
        raise ConversionError(f"{out}: holds a conversion of a different checkpoint (or of another dsv4-convert "
                              "version); pass --overwrite to discard it (only the converter's files are deleted), "
                              "or choose another directory")


def check_space(out: Path, needed: int) -> None:
    margin = int(needed * 0.01) + (64 << 20)  # filesystem metadata, the manifest, the copied non-weight files
    free = shutil.disk_usage(out).free
    if free < needed + margin:
        raise ConversionError(f"{out}: not enough free disk space: the conversion needs {needed / 1e9:.2f} GB more "
                              f"plus a safety margin of 1% + 64 MiB ({(needed + margin) / 1e9:.2f} GB in all), "
                              f"{free / 1e9:.2f} GB are free")
