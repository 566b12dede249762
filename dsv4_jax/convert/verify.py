"""Verification of a converted directory (``dsv4-convert --verify``): every stored array re-read and each source
tensor's crc32 compared with the one recorded from the source bytes during conversion (``writer``'s unit markers);
with ``src`` the source is re-read too and compared with the same record (a source changed after the conversion is
caught only then). Reads are bounded by ``inflight_bytes``, as the conversion's writes are.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dsv4_jax.config import Config
from dsv4_jax.convert import layout
from dsv4_jax.convert.layout import MANIFEST, WEIGHTS, Leaf
from dsv4_jax.convert.safetensors_io import CheckpointError, SafetensorsCheckpoint, TensorInfo, release_pages
from dsv4_jax.convert.writer import Progress, _crc, _fingerprint, _stored_array


def _check_one(out: Path, job: tuple, crcs: dict, bad: list) -> int:
    """Wait for one verification read, compare its crc32 with the one recorded at conversion; returns its size."""
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
        bad.append(f"  {name} -> {where}: crc32 {got:08x} differs from the {crcs[name]:08x} recorded from the "
                   "source at conversion time")
    return nbytes


def _source_crc(leaf: Leaf, info: TensorInfo) -> int:
    """crc32 of a source tensor as it is on disk now (re-read), in the leaf's stored form."""
    mm, a = _stored_array(leaf, info)
    try:
        return _crc(a)
    finally:
        release_pages(mm)


def _check_source(ckpt: SafetensorsCheckpoint, futs: dict, crcs: dict, bad: list) -> None:
    """Compare the re-read source tensors' crc32 with the ones recorded when they were converted."""
    for name, fut in futs.items():
        info = ckpt.tensors[name]
        try:
            got = fut.result()
        except (OSError, CheckpointError) as e:
            bad.append(f"  {name} in {info.file}: unreadable ({str(e).splitlines()[0]})")
            continue
        if got != crcs.get(name):
            bad.append(f"  {name} in {info.file}: the source changed since the conversion (crc32 now {got:08x}, "
                       f"recorded {crcs.get(name, 0):08x}); if the change is intended, rerun with --overwrite")


def verify_converted(out: str | Path, progress: Callable[[Progress], None] | None = None,
                     inflight_bytes: int = 1 << 30, src: str | Path | None = None) -> int:
    """Re-read every array of the converted directory ``out`` and compare the crc32 of each source tensor's slice
    with the one recorded from the source bytes at conversion time. With ``src`` (``--verify-source``), also re-read
    every source tensor there and compare its crc32 now with the recorded one (twice the reading), which catches a
    source changed since the conversion. Returns the number of converted bytes checked; raises a
    :class:`CheckpointError` listing the mismatching tensors (with their array directories or source files)."""
    import tensorstore as ts

    out = Path(out)
    manifest = layout.read_manifest(out)
    cfg = Config.from_hf_dict(manifest["config"], source=str(out / MANIFEST))
    _, leaves = layout.plan_leaves(cfg)
    layout.check_manifest(out, manifest, leaves)
    ckpt = pool = None
    if src is not None:
        ckpt = SafetensorsCheckpoint(src)
        if _fingerprint(Path(src), ckpt) != manifest["plan"].get("source_sha256"):
            raise CheckpointError(f"{src}: not the checkpoint {out} was converted from (its config.json or tensor "
                                  f"table differs from the one recorded in {out / MANIFEST})")
        pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="crc")
    ctx = layout.ts_context()
    units = layout.units_of(leaves)
    total = sum(leaf.nbytes for leaf in leaves)
    done, started, bad = 0, time.monotonic(), []
    try:
        for k, (unit, uleaves) in enumerate(units.items()):
            marker_file = layout.marker_path(out, unit)
            try:
                crcs = json.loads(marker_file.read_text())["crc32"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{marker_file}: missing or corrupted unit marker ({e}); rerunning "
                                      f"`dsv4-convert SRC {out}` repairs it") from None
            src_crcs = {name: pool.submit(_source_crc, leaf, ckpt.tensors[name])
                        for leaf in uleaves for name in leaf.sources} if pool else {}
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
            _check_source(ckpt, src_crcs, crcs, bad)
            done += sum(leaf.nbytes for leaf in uleaves)
            if progress is not None:
                progress(Progress(k + 1, len(units), done, total, unit, started, phase="verify"))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if bad:
        raise CheckpointError(f"{out}: verification failed for {len(bad)} tensor(s):\n" + "\n".join(bad[:20])
                              + ("\n  ..." if len(bad) > 20 else ""))
    return done
