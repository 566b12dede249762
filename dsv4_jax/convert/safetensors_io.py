"""Memory-mapped safetensors reading with validation of the index, the shard headers and the file sizes.

No torch: the header is parsed by hand (8-byte little-endian length, JSON, then raw little-endian data) and tensors
are ``np.memmap`` views, so reading one tensor touches only its bytes. Every error names the file and the tensor.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

# safetensors dtype -> numpy dtype used to view the raw bytes (e8m0 as raw exponent bytes, packed FP4 as uint8)
DTYPES: dict[str, np.dtype] = {
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E8M0": np.dtype(np.uint8), "I8": np.dtype(np.uint8),
    "U8": np.dtype(np.uint8), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32), "F64": np.dtype(np.float64), "I32": np.dtype(np.int32), "I64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
}
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, truncated, corrupted or does not match the config."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Parse and validate one shard's header; returns (tensors by name, ``__metadata__``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: shard file is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated file ({size} bytes, no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: corrupted header (declares {n} header bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupted header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted header (not a JSON object)")
    meta = header.pop("__metadata__", {}) or {}
    out = {}
    data_start = 8 + n
    for name, h in header.items():
        try:
            dtype, shape, (b, e) = h["dtype"], tuple(int(s) for s in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupted header entry for tensor {name!r}: {h!r}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        want = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if e - b != want or b < 0:
            raise CheckpointError(f"{path}: tensor {name!r} {dtype}{list(shape)} declares {e - b} bytes, "
                                  f"expected {want}")
        if data_start + e > size:
            raise CheckpointError(f"{path}: truncated file: tensor {name!r} ends at byte {data_start + e}, "
                                  f"file has {size}")
        out[name] = TensorInfo(name, dtype, shape, path, data_start + b, data_start + e)
    return out, meta


class SafetensorsCheckpoint:
    """A checkpoint directory: ``model.safetensors.index.json`` + shards (or a single ``model.safetensors``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: checkpoint directory does not exist")
        index = self.path / "model.safetensors.index.json"
        self.tensors: dict[str, TensorInfo] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: corrupted index ({type(e).__name__}: {e})") from None
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                infos, _ = read_header(self.path / shard)
                for name, info in infos.items():
                    if weight_map.get(name) != shard:
                        raise CheckpointError(f"{self.path / shard}: tensor {name!r} is in this shard but the index "
                                              f"maps it to {weight_map.get(name)!r}")
                    self.tensors[name] = info
            missing = sorted(set(weight_map) - set(self.tensors))
            if missing:
                raise CheckpointError(f"{index}: {len(missing)} indexed tensor(s) not found in their shard, e.g. "
                                      f"{missing[:3]} (in {weight_map[missing[0]]})")
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no model.safetensors.index.json and no *.safetensors files")
            for f in files:
                infos, _ = read_header(f)
                dup = set(infos) & set(self.tensors)
                if dup:
                    raise CheckpointError(f"{f}: tensor(s) {sorted(dup)[:3]} also appear in another shard")
                self.tensors.update(infos)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str) -> np.ndarray:
        """Memory-mapped read-only view of one tensor (raw on-disk dtype view, see ``DTYPES``)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} not found")
        dt = DTYPES[info.dtype]
        if info.nbytes == 0:
            return np.zeros(info.shape, dt)
        mm = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.start, shape=(info.nbytes,))
        return mm.view(dt).reshape(info.shape)

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def file_size(path: Path) -> int:
    return os.stat(path).st_size


# ------------------------------------------------------------------------------------------- streaming reads
def map_tensor(info: TensorInfo) -> tuple[mmap.mmap, np.ndarray]:
    """Read-only map of one tensor's raw bytes: the mapping (to release its pages once written) and a uint8 view."""
    start = info.start - info.start % mmap.ALLOCATIONGRANULARITY
    with open(info.file, "rb") as f:
        mm = mmap.mmap(f.fileno(), info.end - start, access=mmap.ACCESS_READ, offset=start)
    return mm, np.frombuffer(mm, np.uint8, count=info.nbytes, offset=info.start - start)


def release_pages(mm: mmap.mmap) -> None:
    """Drop a written tensor's pages from this process (RSS) at once. TensorStore may keep a reference to the source
    array for a while; a later access would just fault the same bytes back in from the page cache."""
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


class Prefetcher(threading.Thread):
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
