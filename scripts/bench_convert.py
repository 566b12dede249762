"""Benchmark ``dsv4-convert`` at real V4-Flash layer shapes against the raw speed of the same disk.

Writes (once, cached) a synthetic checkpoint in the official format with the real V4-Flash shapes but only a few
layers (``--layers`` main layers + the MTP block + embed/head: ~3.7 GB per layer), then measures, each from a cold
page cache when it can be dropped (root: ``echo 3 > /proc/sys/vm/drop_caches``; otherwise reported as warm):

* raw read: every shard file read sequentially in 16 MiB blocks (the floor for any converter reading the source),
  once before and once after the conversion (the mean is reported: this VM disk's speed drifts);
* raw copy: the same bytes read and written to one file, then fsynced (the floor for any converter that writes a
  durable copy on the same disk);
* conversion: ``python -m dsv4_jax.convert SRC OUT --quiet`` in a subprocess (wall time, output durable at exit) and
  its peak RSS (``ru_maxrss`` of the child), compared with the largest layer's bytes;
* optionally ``--verify`` (re-read + crc32 of every tensor).

Usage::

    python scripts/bench_convert.py --workdir /tmp/dsv4_bench --layers 2 [--workers 2] [--verify] [--keep]

Prints a summary and writes ``WORKDIR/bench_convert.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsv4_jax.config import Config  # noqa: E402
from dsv4_jax.convert import layout  # noqa: E402
from dsv4_jax.convert.synthetic import V4_FLASH_HF_OVERRIDES, hf_config_dict, write_random_checkpoint  # noqa: E402

WARM = False


def drop_caches() -> bool:
    """Drop the page cache (needs root); False when not possible or with --warm."""
    if WARM:
        return False
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def raw_read(files: list[Path], block: int = 16 << 20) -> tuple[int, float]:
    buf = bytearray(block)
    mv = memoryview(buf)
    n, t0 = 0, time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while k := f.readinto(mv):
                n += k
    return n, time.perf_counter() - t0


def raw_copy(files: list[Path], dst: Path, block: int = 16 << 20) -> tuple[int, float]:
    buf = bytearray(block)
    mv = memoryview(buf)
    n, t0 = 0, time.perf_counter()
    with open(dst, "wb", buffering=0) as out:
        for p in files:
            with open(p, "rb", buffering=0) as f:
                while k := f.readinto(mv):
                    out.write(mv[:k])
                    n += k
        os.fsync(out.fileno())
    dt = time.perf_counter() - t0
    dst.unlink()
    return n, dt


def raw_write(nbytes: int, dst: Path, block: int = 16 << 20) -> float:
    """Seconds to write ``nbytes`` from memory to one new file and fsync it: the output disk's write floor."""
    mv = memoryview(os.urandom(block))
    n, t0 = 0, time.perf_counter()
    with open(dst, "wb", buffering=0) as out:
        while n < nbytes:
            n += out.write(mv[: min(block, nbytes - n)])
        os.fsync(out.fileno())
    dt = time.perf_counter() - t0
    dst.unlink()
    return dt


def raw_read_and_write(files: list[Path], nbytes: int, dst: Path) -> float:
    """Seconds to read the source files and, at the same time on another thread, write ``nbytes`` to a new file and
    fsync it: the floor of any converter that overlaps its reads and writes on one disk (reads and writes share it)."""
    import threading

    t0 = time.perf_counter()
    th = threading.Thread(target=raw_read, args=(files,))
    th.start()
    raw_write(nbytes, dst)
    th.join()
    return time.perf_counter() - t0


def run_child(cmd: list[str]) -> tuple[float, int, int]:
    """Wall seconds, exit code and peak RSS (bytes) of a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=REPO).returncode
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        print("warning: peak RSS of this child is not above an earlier child's; the number is an upper bound")
    return dt, rc, peak * 1024


def disk_of(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-hT", str(path)], capture_output=True, text=True).stdout.splitlines()[-1].split()
        return f"{out[0]} ({out[1]}, {out[2]})"
    except (OSError, IndexError):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dsv4_bench"))
    ap.add_argument("--layers", type=int, default=2, help="main layers (layer 0: hash-routed CSA, 1: HCA, ...)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes writing the synthetic ckpt")
    ap.add_argument("--verify", action="store_true", help="also time dsv4-convert --verify on the output")
    ap.add_argument("--out", type=Path, default=None,
                    help="where to write the conversion (default WORKDIR/converted; e.g. /dev/shm/x to take the "
                    "output disk out of the measurement)")
    ap.add_argument("--warm", action="store_true",
                    help="keep the source in the page cache instead of dropping caches (with --out on tmpfs: the "
                    "converter's own throughput, no disk involved; needs RAM for source + output)")
    ap.add_argument("--keep", action="store_true", help="keep the converted output")
    ap.add_argument("--max-inflight-gb", type=float, default=1.0)
    args = ap.parse_args()
    global WARM
    WARM = args.warm

    n = args.layers
    ratios = [4 if i % 2 == 0 else 128 for i in range(n)] + [0]
    hf = hf_config_dict(**{**V4_FLASH_HF_OVERRIDES, "num_hidden_layers": n, "compress_ratios": ratios,
                           "num_hash_layers": min(1, n)})
    src = args.workdir / f"src_flash_{n}layers"
    out = args.out or args.workdir / "converted"
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not (src / "model.safetensors.index.json").is_file():
        t0 = time.perf_counter()
        print(f"writing the synthetic V4-Flash-shaped checkpoint ({n} layers + MTP) to {src} ...", flush=True)
        write_random_checkpoint(src, hf, seed=0, n_shards=n + 2, workers=args.workers)
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    files = sorted(src.glob("*.safetensors"))
    src_bytes = sum(p.stat().st_size for p in files)
    _, leaves = layout.plan_leaves(Config.from_hf_dict(hf))
    units = layout.units_of(leaves)
    largest = max(sum(leaf.nbytes for leaf in ls) for ls in units.values())

    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": f"{platform.node()}: {os.cpu_count()} CPU "
                 f"cores ({platform.processor() or platform.machine()}), "
                 f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
                 "disk": disk_of(args.workdir), "out_disk": disk_of(out.parent), "layers": n,
                 "source_gb": src_bytes / 1e9, "largest_unit_gb": largest / 1e9, "inflight_gb": args.max_inflight_gb}
    # order: raw read, conversion, raw read again, raw copy; nothing is deleted in between (deleting GBs makes
    # ext4 with online discard keep the disk busy for a while, which would slow whatever runs next)
    cold = drop_caches()
    res["cold_cache"] = cold
    nb, t1 = raw_read(files)
    if out.exists():
        shutil.rmtree(out)
    os.sync()
    time.sleep(5)
    drop_caches()
    cmd = [sys.executable, "-m", "dsv4_jax.convert", str(src), str(out), "--quiet",
           "--max-inflight-gb", str(args.max_inflight_gb)]
    dt, rc, peak = run_child(cmd)
    if rc != 0:
        print(f"conversion failed with exit code {rc}")
        return 1
    drop_caches()
    _, t2 = raw_read(files)
    res["raw_read_s"] = (t1 + t2) / 2
    res["raw_read_runs_s"] = [t1, t2]
    res["raw_read_gbps"] = nb / res["raw_read_s"] / 1e9
    out_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    res.update(convert_s=dt, convert_gbps=src_bytes / dt / 1e9, out_gb=out_bytes / 1e9, peak_rss_gb=peak / 1e9,
               rss_over_largest_unit=peak / largest, convert_over_raw_read=dt / res["raw_read_s"])
    if args.verify:
        drop_caches()
        t0 = time.perf_counter()
        rc = subprocess.run(cmd + ["--verify"], cwd=REPO).returncode
        res["verify_s"] = time.perf_counter() - t0
        res["verify_ok"] = rc == 0
    drop_caches()
    nb, dt_copy = raw_copy(files, args.workdir / "raw_copy.bin")
    res["raw_copy_s"], res["raw_copy_gbps"] = dt_copy, nb / dt_copy / 1e9
    res["convert_over_raw_copy"] = dt / dt_copy
    time.sleep(5)
    dt_write = raw_write(nb, out.parent / "raw_write.bin")
    res["raw_write_s"], res["raw_write_gbps"] = dt_write, nb / dt_write / 1e9
    res["convert_over_max_read_write"] = dt / max(res["raw_read_s"], dt_write)
    drop_caches()
    time.sleep(5)
    dt_both = raw_read_and_write(files, nb, out.parent / "raw_write.bin")
    res["raw_read_while_write_s"] = dt_both
    res["convert_over_read_while_write"] = dt / dt_both
    if not args.keep:
        shutil.rmtree(out)
    (args.workdir / "bench_convert.json").write_text(json.dumps(res, indent=1))
    c = "cold" if cold else ("WARM (--warm)" if args.warm else "WARM (page cache could not be dropped)")
    print(f"\n{res['machine']}; disk {res['disk']}; output on {res['out_disk']}; {res['date']}; reads {c}")
    print(f"source: {src_bytes / 1e9:.2f} GB ({n} V4-Flash layers + MTP + embed/head), largest unit "
          f"{largest / 1e9:.2f} GB")
    print(f"raw read : {res['raw_read_s']:7.1f} s  {res['raw_read_gbps']:.2f} GB/s (mean of "
          f"{t1:.1f} s before and {t2:.1f} s after the conversion)")
    print(f"raw copy : {res['raw_copy_s']:7.1f} s  {res['raw_copy_gbps']:.2f} GB/s (read + write + fsync)")
    print(f"raw write: {res['raw_write_s']:7.1f} s  {res['raw_write_gbps']:.2f} GB/s (from memory + fsync; the floor "
          f"with reads overlapped is max(read, write) = {max(res['raw_read_s'], res['raw_write_s']):.1f} s)")
    print(f"convert  : {dt:7.1f} s  {res['convert_gbps']:.2f} GB/s  = {res['convert_over_raw_read']:.2f}x raw read, "
          f"{res['convert_over_raw_copy']:.2f}x raw copy; peak RSS {peak / 1e9:.2f} GB = "
          f"{res['rss_over_largest_unit']:.2f}x largest unit; "
          f"{res['convert_over_max_read_write']:.2f}x max(raw read, raw write), "
          f"{res['convert_over_read_while_write']:.2f}x raw read + write at the same time "
          f"({res['raw_read_while_write_s']:.1f} s)")
    if args.verify:
        print(f"verify   : {res['verify_s']:7.1f} s  ({'ok' if res['verify_ok'] else 'FAILED'}, incl. the "
              "already-complete check)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
