"""Streaming, resumable conversion of an official DeepSeek-V4 checkpoint into the converted layout (``layout.py``).

Order of work, and why:

1. Validate everything before writing a byte: ``config.json``, the index, every shard header and file size, and every
   expected tensor's presence, dtype and shape (``checkpoint.validate_checkpoint``, MTP included, no unexpected
   tensor). Any problem ends with one :class:`CheckpointError` naming the file and tensor, and the output directory
   is not created. Then the output directory (``layout.check_out_dir`` / ``prepare_out``): refused if it overlaps the
   source either way, or holds anything but a conversion of this same source plus the user's own files
   (``--overwrite`` deletes an earlier conversion's files, and only those: ``layout.owned_paths``), locked against a
   second converter, and checked for free space.
2. Write ``weights/plan.json`` (what will be written, from which source). A rerun compares it, so resuming into a
   directory that holds another checkpoint's partial conversion is refused instead of mixing the two.
3. Stream unit by unit (top-level tensors, each layer, each MTP block), tensors in file-offset order: a prefetch
   thread keeps the kernel reading ahead of us (``posix_fadvise``); each source tensor is memory-mapped, its crc32
   computed, and handed (without a copy) to an asynchronous TensorStore write of its chunk file(s). At most
   ``inflight_bytes`` of writes and two units are outstanding, so host memory stays bounded whatever the checkpoint's
   size (a tensor's mapped pages are released once it is written). A unit whose writes have all completed gets its
   ``<unit>.done.json`` marker (with the checksums); on a rerun, units whose marker and arrays are intact
   (``layout.unit_damage``) are skipped and any other unit directory is deleted and rewritten, so a killed run
   resumes and ends with the same bytes as an uninterrupted one. An output that claims to be complete is checked the
   same way (and its manifest, ``layout.manifest_damage``): damage is reported and repaired, never called complete.
   Durability: chunk files are written without per-file fsync; one ``syncfs`` per unit precedes its marker, on a
   commit thread, so reading and writing the next unit overlap the flush.
4. Copy the non-weight files (config, tokenizer, ...), then write ``dsv4_manifest.json`` last, atomically.

The checksums recorded here are what ``verify.verify_converted`` compares a converted directory (and, optionally, its
source) against.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import mmap
import os
import shutil
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dsv4_jax.checkpoint import validate_checkpoint
from dsv4_jax.config import Config
from dsv4_jax.convert import layout
from dsv4_jax.convert.layout import MANIFEST, PLAN, WEIGHTS, ConversionError, Leaf
from dsv4_jax.convert.safetensors_io import (
    CheckpointError,
    Prefetcher,
    SafetensorsCheckpoint,
    TensorInfo,
    map_tensor,
    release_pages,
)

TEST_DELAY_ENV = "DSV4_CONVERT_TEST_UNIT_DELAY"  # test hook: seconds to sleep after each committed unit


@dataclasses.dataclass
class Progress:
    units_done: int
    units_total: int
    bytes_done: int
    bytes_total: int
    unit: str
    started: float
    phase: str = "convert"  # convert | verify


@dataclasses.dataclass
class Result:
    out: Path
    units_written: int
    units_skipped: int
    bytes_written: int
    seconds: float
    already_complete: bool = False
    repaired: tuple[str, ...] = ()  # damage found in an output that claimed to be complete (now rewritten)


def _fingerprint(src: Path, ckpt: SafetensorsCheckpoint) -> str:
    """sha256 of the source's config and tensor table (names, dtypes, shapes, files, offsets)."""
    h = hashlib.sha256((src / "config.json").read_bytes())
    for name in sorted(ckpt.tensors):
        t = ckpt.tensors[name]
        h.update(json.dumps([name, t.dtype, list(t.shape), t.file.name, t.start, t.end]).encode())
    return h.hexdigest()


def _load_config(src: Path) -> Config:
    try:
        return Config.from_pretrained(src)
    except FileNotFoundError:
        raise CheckpointError(f"{src / 'config.json'}: missing (an official checkpoint directory has the model's "
                              "config.json next to the shards)") from None
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _libc():
    """The process's C library (ctypes), or None where it cannot be loaded; loaded once."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None)
        except OSError:
            _LIBC = False
    return _LIBC or None


_LIBC = None


def _trim_heap() -> None:
    """Give freed memory back to the OS. TensorStore encodes chunks on many threads; glibc keeps what they free in
    per-thread arenas, which made the RSS creep to several times the in-flight bytes on a slow disk."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only
        libc.malloc_trim(0)


def _sync_filesystem(path: Path) -> None:
    """Flush every written byte of the filesystem holding ``path`` to the disk (``syncfs``; ``os.sync`` where the
    C library lacks it)."""
    libc = _libc()
    fd = os.open(path, os.O_RDONLY)
    try:
        if not (libc is not None and hasattr(libc, "syncfs") and libc.syncfs(fd) == 0):
            os.sync()
    finally:
        os.close(fd)


def _stored_array(leaf: Leaf, info: TensorInfo) -> tuple[mmap.mmap, np.ndarray]:
    """The source tensor as stored in the leaf: the on-disk bytes viewed in the leaf dtype (tid2eid narrowed)."""
    mm, raw = map_tensor(info)
    shape = leaf.shape[1:] if leaf.stacked else leaf.shape
    if leaf.narrow_i64:
        a = raw.view("<i8").reshape(shape)
        if a.size and (a.min() < 0 or a.max() >= np.iinfo(np.int32).max):
            raise CheckpointError(f"{info.file}: tensor {info.name} has values outside int32")
        return mm, a.astype(np.int32)
    return mm, raw.view(np.dtype(leaf.dtype)).reshape(shape)


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def _aux_files(src: Path) -> list[str]:
    """The non-weight files of the source (config, tokenizer, inference/ and encoding/ code, README, ...), relative."""
    rels = []
    for root, dirs, files in os.walk(src):  # OUT never lies inside SRC (layout.check_out_dir)
        rootp = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not (name.endswith(".safetensors") or name == "model.safetensors.index.json" or name.startswith(".")):
                rels.append(str((rootp / name).relative_to(src)))
    return rels


def _check_aux_targets(out: Path, rels: list[str]) -> None:
    """Refuse (before any heavy work) to copy a file through a folder of ``out`` that is a link leading elsewhere."""
    for rel in rels:
        for parent in list(Path(rel).parents)[:-1]:
            d = out / parent
            if d.is_symlink():
                raise ConversionError(f"{d}: is a link to {d.resolve()}, outside the output directory; refusing to "
                                      f"write {rel} there (replace the link by a folder)")


def _copy_aux(src: Path, out: Path, rels: list[str]) -> None:
    """Copy the source's non-weight files ``rels``; a link in place of a copied file is replaced, never written
    through."""
    _check_aux_targets(out, rels)
    for rel in rels:
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink():
            dst.unlink()
        shutil.copyfile(src / rel, dst)


def _unit_jobs(ckpt: SafetensorsCheckpoint, leaves: list[Leaf]) -> list[tuple[TensorInfo, Leaf, int]]:
    """The source tensors of one unit as (tensor, leaf, index in the leaf), in file-offset order."""
    jobs = [(ckpt.tensors[name], leaf, i) for leaf in leaves for i, name in enumerate(leaf.sources)]
    return sorted(jobs, key=lambda j: (str(j[0].file), j[0].start))


class _UnitWriter:
    """Streams the units to TensorStore with at most ``budget`` bytes of writes outstanding."""

    def __init__(self, out: Path, ckpt: SafetensorsCheckpoint, plan_sha: str, budget: int, progress, total: int,
                 n_units: int):
        import tensorstore as ts

        self.ts, self.out, self.ckpt, self.plan_sha, self.budget = ts, out, ckpt, plan_sha, budget
        # chunk files are not fsynced one by one (many small synchronous flushes starve the disk); each unit is
        # made durable with one syncfs before its marker is written (``_commit``)
        self.ctx = layout.ts_context(io_sync=False)
        self.pending: deque = deque()  # (write future, nbytes, unit, description, source mapping, crc future)
        self.inflight = self.since_trim = 0
        self.left: dict[str, int] = {}
        self.crcs: dict[str, dict[str, Future]] = {}
        # crc32 (zlib releases the GIL) on other threads: it also faults the mapped pages in, in parallel
        self.crc_pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="crc")
        self.commit_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit")
        self.commits: deque = deque()
        self.stopping = threading.Event()
        self.progress, self.total, self.n_units = progress, total, n_units
        self.done_bytes, self.units_done, self.started = 0, 0, time.monotonic()
        self.delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)

    def _report(self, unit: str) -> None:
        if self.progress is not None:
            self.progress(Progress(self.units_done, self.n_units, self.done_bytes, self.total, unit, self.started))

    def _retire_one(self) -> None:
        fut, nbytes, unit, what, mm, crc = self.pending.popleft()
        try:
            fut.result()
            crc.result()
        except Exception as e:  # TensorStore raises ValueError/OSError-like errors with the OS message inside
            raise ConversionError(f"writing {what} failed: {e}. Fix the cause (e.g. free disk space) and rerun the "
                                  "same command: finished layers are kept and the conversion resumes") from None
        release_pages(mm)
        self.inflight -= nbytes
        self.done_bytes += nbytes
        self.since_trim += nbytes
        if self.since_trim > self.budget // 4:
            self.since_trim = 0
            _trim_heap()
        self.left[unit] -= 1
        if self.left[unit] == 0:
            self._commit(unit)
        self._report(unit)

    def _commit(self, unit: str) -> None:
        """All of ``unit``'s writes are done: make them durable and write its marker, on the commit thread (in unit
        order), while the main loop goes on reading and writing the next unit."""
        crcs = {name: f.result() for name, f in sorted(self.crcs.pop(unit).items())}
        self.commits.append(self.commit_pool.submit(self._durable_commit, unit, crcs))

    def _durable_commit(self, unit: str, crcs: dict) -> None:
        _sync_filesystem(self.out / WEIGHTS / unit)  # the unit's bytes are on disk before its marker says so
        marker = {"unit": unit, "plan_sha256": self.plan_sha, "crc32": crcs}
        layout.write_json_atomic(self.out / WEIGHTS / f"{unit}.done.json", marker)
        self.units_done += 1
        if self.delay:
            self.stopping.wait(self.delay)

    def _check_commits(self, wait: bool) -> None:
        while self.commits and (wait or self.commits[0].done()):
            try:
                self.commits.popleft().result()
            except OSError as e:
                raise ConversionError(f"committing a unit failed: {e}. Fix the cause (e.g. free disk space) and rerun "
                                      "the same command: finished layers are kept and the conversion resumes") from None

    def _retire_done(self) -> None:
        """Retire finished writes at the head of the queue without waiting (units commit as soon as possible)."""
        while self.pending and self.pending[0][0].done():
            self._retire_one()

    def write_unit(self, unit: str, leaves: list[Leaf], jobs: list, prefetch: Prefetcher) -> None:
        while sum(1 for n in self.left.values() if n) >= 2:  # at most this unit and the previous one in flight
            self._retire_one()
        udir = self.out / WEIGHTS / unit
        if udir.exists():  # partial unit of an interrupted run: rewrite it completely
            shutil.rmtree(udir)
        arrays = {leaf.path: self.ts.open(layout.array_spec(self.out, leaf, create=True), context=self.ctx).result()
                  for leaf in leaves}
        self.left[unit] = len(jobs)
        self.crcs[unit] = {}
        for info, leaf, i in jobs:
            prefetch.consume(info)
            mm, a = _stored_array(leaf, info)
            self.crcs[unit][info.name] = crc = self.crc_pool.submit(_crc, a)
            target = arrays[leaf.path][leaf.source_index(i)]
            # the source is a read-only file mapping: TensorStore may write straight from it (no copy)
            fut = target.write(a, can_reference_source_data_indefinitely=True)
            self.pending.append((fut, a.nbytes, unit, f"{leaf.path} (from {info.name} in {info.file.name})", mm, crc))
            self.inflight += a.nbytes
            del a, mm, crc
            while self.inflight > self.budget:
                self._retire_one()
            self._retire_done()
            self._check_commits(wait=False)
        if not jobs:
            self._commit(unit)

    def finish(self) -> None:
        while self.pending:
            self._retire_one()
        self._check_commits(wait=True)

    def drain_commits(self) -> None:
        """After a write failure: wait for the commits already queued, each a unit whose writes all succeeded, so a
        rerun keeps those units (cancelled by :meth:`close`, they were redone, or not, depending on thread timing).
        Their own errors (the same full disk) are not reported over the first failure."""
        while self.commits:
            try:
                self.commits.popleft().result()
            except Exception:  # noqa: S110 - the unit has no marker and is redone on resume
                pass

    def close(self) -> None:
        self.stopping.set()
        # Ctrl-C: no queued unit is committed (after a write failure drain_commits has already committed them)
        self.commit_pool.shutdown(wait=False, cancel_futures=True)
        # writes still in flight (after a failure or Ctrl-C) reference the source mappings: let them end before the
        # caller goes on (at most the in-flight budget, a minute at worst); their errors do not matter, their unit is
        # not committed
        deadline = time.monotonic() + 60
        for fut, *_ in self.pending:
            try:
                fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: S110 - the unit is redone on resume
                pass
        self.pending.clear()
        self.crc_pool.shutdown(wait=True, cancel_futures=True)


def convert(src: str | Path, out: str | Path, *, overwrite: bool = False, inflight_bytes: int = 1 << 30,
            progress: Callable[[Progress], None] | None = None, log: Callable[[str], None] | None = None) -> Result:
    """Convert the official checkpoint directory ``src`` into ``out`` (see the module docstring). Resumes a previous
    interrupted conversion of the same source, and repairs a damaged one (``layout.unit_damage`` /
    ``manifest_damage``: the damaged units and the manifest are rewritten); returns at once if ``out`` is complete.
    ``log`` receives one-paragraph notices (what ``--overwrite`` deleted, what damage is being repaired)."""
    src, out = Path(src), Path(out)
    t0 = time.monotonic()
    if not src.is_dir():
        raise CheckpointError(f"{src}: checkpoint directory does not exist")
    cfg = _load_config(src)
    ckpt = SafetensorsCheckpoint(src)
    try:
        validate_checkpoint(ckpt, cfg)
    except CheckpointError as e:
        raise CheckpointError(f"{src / 'config.json'} and the tensors disagree: {e}") from None
    _, leaves = layout.plan_leaves(cfg)
    plan = {"format": layout.FORMAT, "format_version": layout.FORMAT_VERSION,
            "plan_sha256": layout.plan_digest(leaves), "source_sha256": _fingerprint(src, ckpt),
            "source": str(src.resolve()), "n_tensors": len(ckpt.tensors)}
    layout.check_out_dir(src, out)
    out.mkdir(parents=True, exist_ok=True)
    lock = layout.lock_dir(out)
    try:
        return _convert_locked(src, out, ckpt, leaves, plan, overwrite, inflight_bytes, progress, log or _quiet, t0)
    finally:
        lock.close()


def _quiet(msg: str) -> None:
    pass


def _find_work(out: Path, plan: dict, leaves: list[Leaf]) -> tuple[list[str], list[str]]:
    """``(units to write, damage found)``. Units whose marker and arrays are intact are kept. With a manifest present
    (the directory claims to be complete) anything missing is damage; without one (an interrupted run) a unit
    without a marker is simply not done yet, but a marker whose arrays are broken is damage."""
    units = layout.units_of(leaves)
    complete = (out / MANIFEST).exists()
    damage = layout.manifest_damage(out, plan, leaves) if complete else []
    todo = []
    for unit, uleaves in units.items():
        problems = layout.unit_damage(out, unit, uleaves, plan["plan_sha256"])
        if problems:
            todo.append(unit)
            if complete or layout.marker_path(out, unit).exists():
                damage += problems
    old, _ = layout.read_json(out / WEIGHTS / PLAN)
    if old != plan:
        if complete and not layout.same_plan(old, plan):
            damage.append(f"{WEIGHTS}/{PLAN}: missing or unreadable")
        layout.write_json_atomic(out / WEIGHTS / PLAN, plan)  # same source (checked): record where it is now
    return todo, damage


def _convert_locked(src, out, ckpt, leaves, plan, overwrite, inflight_bytes, progress, log, t0) -> Result:
    aux = _aux_files(src)
    _check_aux_targets(out, aux)  # before anything is deleted or written
    layout.prepare_out(out, plan, overwrite, log)
    (out / WEIGHTS).mkdir(parents=True, exist_ok=True)
    todo, damage = _find_work(out, plan, leaves)
    if (out / MANIFEST).exists() and not damage:
        return Result(out, 0, 0, 0, time.monotonic() - t0, already_complete=True)
    if damage:
        shown = "\n  ".join(damage[:8]) + (f"\n  ... ({len(damage) - 8} more)" if len(damage) > 8 else "")
        log(f"{out}: damaged conversion, repairing it from the source (rewriting {len(todo)} unit(s) and the "
            f"manifest; --overwrite would convert everything again):\n  {shown}")
        (out / MANIFEST).unlink(missing_ok=True)  # no longer complete until the repair ends
        layout.fsync_dir(out)
    units = layout.units_of(leaves)
    for unit in todo:
        layout.marker_path(out, unit).unlink(missing_ok=True)
    total = sum(leaf.nbytes for u in todo for leaf in units[u])
    layout.check_space(out, total)
    w = _UnitWriter(out, ckpt, plan["plan_sha256"], inflight_bytes, progress, total, len(units))
    w.units_done = len(units) - len(todo)
    jobs = {unit: _unit_jobs(ckpt, units[unit]) for unit in todo}
    prefetch = Prefetcher([j[0] for unit in todo for j in jobs[unit]], min(inflight_bytes, 512 << 20))
    prefetch.start()
    try:
        for unit in todo:
            w.write_unit(unit, units[unit], jobs[unit], prefetch)
        w.finish()
    except ConversionError:  # a write failed: commit the units finished before it (Ctrl-C cancels them instead)
        w.drain_commits()
        raise
    finally:
        prefetch.close()
        w.close()

    _copy_aux(src, out, aux)
    manifest = {"format": layout.FORMAT, "format_version": layout.FORMAT_VERSION, "plan": plan,
                "config": json.loads((src / "config.json").read_text()), "aux_files": aux,
                "units": list(units), "total_bytes": sum(leaf.nbytes for leaf in leaves),
                "leaves": {leaf.path: layout.leaf_record(leaf) for leaf in leaves}}
    layout.fsync_dir(out / WEIGHTS)
    layout.write_json_atomic(out / MANIFEST, manifest)
    return Result(out, len(todo), len(units) - len(todo), total, time.monotonic() - t0, repaired=tuple(damage))
