"""Streaming, resumable conversion of an official DeepSeek-V4 checkpoint into the converted layout (``layout.py``).

Order of work, and why:

1. Validate everything before writing a byte: ``config.json``, the index, every shard header and file size, and every
   expected tensor's presence, dtype and shape (``checkpoint.validate_checkpoint``, MTP included, no unexpected
   tensor). Any problem ends with one :class:`CheckpointError` naming the file and tensor, and the output directory
   is not created. Then the output directory: refused if it holds anything but a conversion of this same source
   (``--overwrite`` discards an earlier conversion), locked against a second converter, and checked for free space.
2. Write ``weights/plan.json`` (what will be written, from which source). A rerun compares it, so resuming into a
   directory that holds another checkpoint's partial conversion is refused instead of mixing the two.
3. Stream unit by unit (top-level tensors, each layer, each MTP block), tensors in file-offset order: a prefetch
   thread keeps the kernel reading ahead of us (``posix_fadvise``); each source tensor is memory-mapped, its crc32
   computed, and handed (without a copy) to an asynchronous TensorStore write of its chunk file(s). At most
   ``inflight_bytes`` of writes and two units are outstanding, so host memory stays bounded whatever the checkpoint's
   size (a tensor's mapped pages are released once it is written). A unit whose writes have all completed gets its
   ``<unit>.done.json`` marker (with the checksums); on a rerun, units with a marker are skipped and any other unit
   directory is deleted and rewritten, so a killed run resumes and ends with the same bytes as an uninterrupted one.
   Durability: chunk files are written without per-file fsync; one ``syncfs`` per unit precedes its marker, on a
   commit thread, so reading and writing the next unit overlap the flush.
4. Copy the non-weight files (config, tokenizer, ...), then write ``dsv4_manifest.json`` last, atomically.

``verify_converted`` re-reads every stored array and compares each source tensor's crc32 with the one recorded
from the source bytes during conversion.
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
from dsv4_jax.convert.layout import LOCK, MANIFEST, PLAN, WEIGHTS, Leaf
from dsv4_jax.convert.safetensors_io import CheckpointError, SafetensorsCheckpoint, TensorInfo

TEST_DELAY_ENV = "DSV4_CONVERT_TEST_UNIT_DELAY"  # test hook: seconds to sleep after each committed unit


class ConversionError(RuntimeError):
    """The conversion cannot proceed (output directory problems, write failures)."""


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


def _map(info: TensorInfo) -> tuple[mmap.mmap, np.ndarray]:
    """Read-only map of one tensor's raw bytes: the mapping (to release its pages once written) and a uint8 view."""
    start = info.start - info.start % mmap.ALLOCATIONGRANULARITY
    with open(info.file, "rb") as f:
        mm = mmap.mmap(f.fileno(), info.end - start, access=mmap.ACCESS_READ, offset=start)
    return mm, np.frombuffer(mm, np.uint8, count=info.nbytes, offset=info.start - start)


def _release(mm: mmap.mmap) -> None:
    """Drop a written tensor's pages from this process (RSS) at once. TensorStore may keep a reference to the source
    array for a while; a later access would just fault the same bytes back in from the page cache."""
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


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
    mm, raw = _map(info)
    shape = leaf.shape[1:] if leaf.stacked else leaf.shape
    if leaf.narrow_i64:
        a = raw.view("<i8").reshape(shape)
        if a.size and (a.min() < 0 or a.max() >= np.iinfo(np.int32).max):
            raise CheckpointError(f"{info.file}: tensor {info.name} has values outside int32")
        return mm, a.astype(np.int32)
    return mm, raw.view(np.dtype(leaf.dtype)).reshape(shape)


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def _entries(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.name != LOCK]


def _check_out_dir(src: Path, out: Path) -> None:
    """Refuse an output directory that is the source, a file, or a non-empty directory we did not write."""
    if out.resolve() == src.resolve():
        raise ConversionError(f"{out}: the output directory must differ from the source directory")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out}: exists and is not a directory")
    if out.is_dir() and _entries(out) and not layout.looks_converted(out):
        raise ConversionError(f"{out}: directory is not empty and is not a dsv4-convert output; choose an empty or "
                              "new directory (refusing to delete unknown files)")


def _lock(out: Path):
    """Exclusive lock on ``out`` for this process's lifetime (released by the OS even on SIGKILL)."""
    import fcntl

    f = open(out / LOCK, "a+")  # held open until the conversion ends
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConversionError(f"{out}: another dsv4-convert process is writing this directory") from None
    return f


def _reuse_or_clear(out: Path, plan: dict, overwrite: bool) -> bool:
    """Keep a previous conversion of the same source (resume); returns True when it is already complete."""
    if not _entries(out):
        return False
    plan_file = out / WEIGHTS / PLAN
    try:
        old = json.loads(plan_file.read_text()) if plan_file.is_file() else layout.read_manifest(out)["plan"]
    except (json.JSONDecodeError, KeyError, CheckpointError):
        old = None
    same = old is not None and old.get("plan_sha256") == plan["plan_sha256"] \
        and old.get("source_sha256") == plan["source_sha256"]
    if not same and not overwrite:
        raise ConversionError(f"{out}: holds a conversion of a different checkpoint (or of another dsv4-convert "
                              "version); pass --overwrite to discard it, or choose another directory")
    if overwrite:
        _clear(out)
        return False
    return (out / MANIFEST).is_file()


def _clear(out: Path) -> None:
    """Delete a previous conversion: the commit marker first, so no reader ever sees a half-deleted 'complete' dir."""
    (out / MANIFEST).unlink(missing_ok=True)
    for p in sorted(_entries(out)):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _check_space(out: Path, needed: int) -> None:
    free = shutil.disk_usage(out).free
    if free < needed * 1.01 + (64 << 20):
        raise ConversionError(f"{out}: not enough free disk space: the conversion needs {needed / 1e9:.2f} GB more, "
                              f"{free / 1e9:.2f} GB are free")


def _copy_aux(src: Path, out: Path) -> list[str]:
    """Copy every non-weight file of the source (config, tokenizer, inference/ and encoding/ code, README, ...)."""
    copied = []
    out_res = out.resolve()
    for root, dirs, files in os.walk(src):
        rootp = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (rootp / d).resolve() != out_res)
        for name in sorted(files):
            if name.endswith(".safetensors") or name == "model.safetensors.index.json" or name.startswith("."):
                continue
            rel = (rootp / name).relative_to(src)
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(rootp / name, out / rel)
            copied.append(str(rel))
    return copied


class _Prefetcher(threading.Thread):
    """Keeps the kernel reading ``window`` bytes ahead of the tensor being processed (``posix_fadvise`` WILLNEED on
    the next tensors, in processing order, from its own thread since the call blocks while the disk queue is full):
    the disk serves many requests at once while earlier tensors are checksummed and written, and the memory-mapped
    reads then hit the page cache (which is not counted in our RSS)."""

    def __init__(self, infos: list[TensorInfo], window: int):
        super().__init__(name="dsv4-convert-prefetch", daemon=True)
        self.infos, self.window = infos, window
        self.consumed = 0
        self.stopped = False
        self.cv = threading.Condition()

    def consume(self, info: TensorInfo) -> None:
        """Called before ``info`` is read."""
        with self.cv:
            self.consumed += info.nbytes
            self.cv.notify()

    def run(self) -> None:
        if not hasattr(os, "posix_fadvise"):
            return
        fds: dict[Path, int] = {}
        issued = 0
        try:
            for t in self.infos:
                with self.cv:
                    while not self.stopped and issued - self.consumed >= self.window:
                        self.cv.wait()
                    if self.stopped:
                        return
                fd = fds.get(t.file)
                if fd is None:
                    fd = fds[t.file] = os.open(t.file, os.O_RDONLY)
                os.posix_fadvise(fd, t.start, t.nbytes, os.POSIX_FADV_WILLNEED)
                issued += t.nbytes
        except OSError:
            return  # only a hint: the reads themselves report real errors
        finally:
            for fd in fds.values():
                os.close(fd)

    def close(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify()
        self.join()


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
        _release(mm)
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

    def write_unit(self, unit: str, leaves: list[Leaf], jobs: list, prefetch: _Prefetcher) -> None:
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

    def close(self) -> None:
        self.stopping.set()
        self.commit_pool.shutdown(wait=False, cancel_futures=True)  # no unit is committed after a failure / Ctrl-C
        self.crc_pool.shutdown(wait=True, cancel_futures=True)


def convert(src: str | Path, out: str | Path, *, overwrite: bool = False, inflight_bytes: int = 1 << 30,
            progress: Callable[[Progress], None] | None = None) -> Result:
    """Convert the official checkpoint directory ``src`` into ``out`` (see the module docstring). Resumes a previous
    interrupted conversion of the same source; returns at once if ``out`` is already complete."""
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
    _check_out_dir(src, out)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        return _convert_locked(src, out, ckpt, leaves, plan, overwrite, inflight_bytes, progress, t0)
    finally:
        lock.close()


def _convert_locked(src, out, ckpt, leaves, plan, overwrite, inflight_bytes, progress, t0) -> Result:
    if _reuse_or_clear(out, plan, overwrite):
        return Result(out, 0, 0, 0, time.monotonic() - t0, already_complete=True)
    (out / WEIGHTS).mkdir(parents=True, exist_ok=True)
    if not (out / WEIGHTS / PLAN).is_file():
        layout.write_json_atomic(out / WEIGHTS / PLAN, plan)

    units = layout.units_of(leaves)
    todo, skipped = [], 0
    for unit in units:
        marker = out / WEIGHTS / f"{unit}.done.json"
        try:
            ok = json.loads(marker.read_text()).get("plan_sha256") == plan["plan_sha256"]
        except (OSError, json.JSONDecodeError, AttributeError):
            ok = False
        if ok:
            skipped += 1
        else:
            marker.unlink(missing_ok=True)
            todo.append(unit)
    total = sum(leaf.nbytes for u in todo for leaf in units[u])
    _check_space(out, total)
    w = _UnitWriter(out, ckpt, plan["plan_sha256"], inflight_bytes, progress, total, len(units))
    w.units_done = skipped
    jobs = {unit: _unit_jobs(ckpt, units[unit]) for unit in todo}
    prefetch = _Prefetcher([j[0] for unit in todo for j in jobs[unit]], min(inflight_bytes, 512 << 20))
    prefetch.start()
    try:
        for unit in todo:
            w.write_unit(unit, units[unit], jobs[unit], prefetch)
        w.finish()
    finally:
        prefetch.close()
        w.close()

    aux = _copy_aux(src, out)
    manifest = {"format": layout.FORMAT, "format_version": layout.FORMAT_VERSION, "plan": plan,
                "config": json.loads((src / "config.json").read_text()), "aux_files": aux,
                "units": list(units), "total_bytes": sum(leaf.nbytes for leaf in leaves),
                "leaves": {leaf.path: layout.leaf_record(leaf) for leaf in leaves}}
    layout.fsync_dir(out / WEIGHTS)
    layout.write_json_atomic(out / MANIFEST, manifest)
    return Result(out, len(todo), skipped, total, time.monotonic() - t0)


def _check_one(out: Path, job: tuple, crcs: dict, bad: list) -> int:
    """Wait for one verification read, compare its crc32 with the recorded one; returns its size."""
    fut, leaf, name, nbytes = job
    where = out / WEIGHTS / leaf.unit / leaf.rel
    try:
        got = _crc(np.asarray(fut.result()))
    except Exception as e:
        bad.append(f"  {name} -> {where}: unreadable ({str(e).splitlines()[0]})")
        return nbytes
    if name not in crcs:
        bad.append(f"  {name} -> {where}: no checksum recorded in {leaf.unit}.done.json")
    elif crcs[name] != got:
        bad.append(f"  {name} -> {where}: crc32 {got:08x} differs from the source's {crcs[name]:08x}")
    return nbytes


def verify_converted(out: str | Path, progress: Callable[[Progress], None] | None = None,
                     inflight_bytes: int = 1 << 30) -> int:
    """Re-read every array of the converted directory ``out`` and compare the crc32 of each source tensor's slice
    with the one recorded from the source bytes. Returns the number of bytes checked; raises a
    :class:`CheckpointError` listing the mismatching tensors (with their array directories)."""
    import tensorstore as ts

    out = Path(out)
    manifest = layout.read_manifest(out)
    cfg = Config.from_hf_dict(manifest["config"], source=str(out / MANIFEST))
    _, leaves = layout.plan_leaves(cfg)
    layout.check_manifest(out, manifest, leaves)
    ctx = layout.ts_context()
    units = layout.units_of(leaves)
    total = sum(leaf.nbytes for leaf in leaves)
    done, started, bad = 0, time.monotonic(), []
    for k, (unit, uleaves) in enumerate(units.items()):
        marker_file = out / WEIGHTS / f"{unit}.done.json"
        try:
            crcs = json.loads(marker_file.read_text())["crc32"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{marker_file}: missing or corrupted unit marker ({e})") from None
        pending: deque = deque()  # (read future, leaf, source tensor name, bytes)
        inflight = 0
        for leaf in uleaves:
            try:
                arr = ts.open(layout.array_spec(out, leaf, create=False), context=ctx).result()
            except Exception as e:
                bad.append(f"  {leaf.path} -> {out / WEIGHTS / leaf.unit / leaf.rel}: cannot open "
                           f"({str(e).splitlines()[0]})")
                continue
            if tuple(arr.shape) != leaf.shape or arr.dtype.numpy_dtype != np.dtype(leaf.dtype):
                bad.append(f"  {leaf.path}: stored {arr.dtype.numpy_dtype}{list(arr.shape)}, expected "
                           f"{leaf.dtype}{list(leaf.shape)}")
                continue
            per = leaf.nbytes // len(leaf.sources)
            for i, name in enumerate(leaf.sources):
                pending.append((arr[leaf.source_index(i)].read(), leaf, name, per))
                inflight += per
                while inflight > inflight_bytes:
                    inflight -= _check_one(out, pending.popleft(), crcs, bad)
        while pending:
            _check_one(out, pending.popleft(), crcs, bad)
        done += sum(leaf.nbytes for leaf in uleaves)
        if progress is not None:
            progress(Progress(k + 1, len(units), done, total, unit, started, phase="verify"))
    if bad:
        raise CheckpointError(f"{out}: verification failed for {len(bad)} tensor(s):\n" + "\n".join(bad[:20])
                              + ("\n  ..." if len(bad) > 20 else ""))
    return done
