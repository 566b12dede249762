"""``dsv4-convert SRC_DIR OUT_DIR [--verify]``: official DeepSeek-V4 checkpoint -> sharded, mesh-independent arrays.

Exit status 0 only when ``OUT_DIR`` holds a complete conversion: every unit's arrays present, every unit marker and
the manifest readable and in agreement (a damaged output is reported and repaired from the source first). With
``--verify`` every stored tensor's crc32 also equals the crc32 recorded from the source bytes when it was converted
(the source is not re-read); ``--verify-source`` also re-reads the source and compares it with the same record (twice
the reading). Any problem prints one paragraph naming the file and tensor (a traceback only with ``--debug``) and
exits non-zero: 1 for errors, 2 for bad usage, 130 when interrupted. An interrupted or failed run keeps the layers it
finished; rerunning the same command resumes. ``--overwrite`` deletes only the converter's own files (see
``layout.owned_paths``); a source and output directory that overlap are refused.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from dsv4_jax.convert.safetensors_io import CheckpointError
from dsv4_jax.convert.verify import verify_converted
from dsv4_jax.convert.writer import ConversionError, Progress, convert

PROG = "dsv4-convert"


def _fmt_s(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class ProgressLine:
    """One stderr status line: units, bytes, throughput, ETA. Redrawn in place (at most 4x a second) on a terminal;
    one line per finished unit otherwise (logs stay readable)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.last_draw = 0.0
        self.last_units = -1

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if self.tty:
            if now - self.last_draw < 0.25 and p.bytes_done < p.bytes_total:
                return
        elif p.units_done == self.last_units:
            return
        self.last_draw, self.last_units = now, p.units_done
        dt = max(now - p.started, 1e-9)
        rate = p.bytes_done / dt
        eta = (p.bytes_total - p.bytes_done) / rate if rate > 0 else 0.0
        line = (f"{p.phase} {p.units_done:>3}/{p.units_total} units  {p.bytes_done / 1e9:7.2f}/"
                f"{p.bytes_total / 1e9:.2f} GB  {rate / 1e9:5.2f} GB/s  ETA {_fmt_s(eta)}  [{p.unit}]")
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.last_units >= 0:
            self.stream.write("\n")
            self.stream.flush()
        self.last_units = -1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG, description="Convert an official DeepSeek-V4 checkpoint directory (HF release: safetensors shards, "
        "config.json, tokenizer files) into sharded arrays that load_weights restores onto any device mesh, each "
        "host reading only its own shards. Streaming (bounded memory), resumable (rerun after an interruption), "
        "validated before any heavy work.",
        epilog="Exit status: 0 when OUT_DIR holds a complete conversion (every unit's arrays, every unit marker and "
        "the manifest present, readable and in agreement; tensor bytes are checked by --verify), 1 on any error (one "
        "paragraph naming the file, tensor or field at fault), 2 on bad usage, 130 when interrupted.")
    ap.add_argument("src", metavar="SRC_DIR", help="official checkpoint directory")
    ap.add_argument("out", metavar="OUT_DIR", help="output directory (created; an interrupted conversion resumes, a "
                    "damaged one is reported and repaired; must neither be, contain nor lie inside SRC_DIR)")
    ap.add_argument("--verify", action="store_true",
                    help="afterwards, re-read every stored array and compare its crc32 with the crc32 recorded from "
                    "the source tensor's bytes when it was converted (the source is not re-read)")
    ap.add_argument("--verify-source", action="store_true",
                    help="like --verify, and also re-read every source tensor and compare its crc32 now with the "
                    "recorded one, which catches a source changed since the conversion (reads twice as much)")
    ap.add_argument("--overwrite", action="store_true",
                    help="discard a previous (complete or partial) conversion found in OUT_DIR: deletes only the "
                    "files the converter wrote there, never other files")
    ap.add_argument("--max-inflight-gb", type=float, default=1.0, metavar="GB",
                    help="bound on bytes read but not yet written (host memory; default 1.0)")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    return ap


def _error_text(e: Exception) -> str:
    """One paragraph for a known error: an OS error as 'path: reason' (it names the file at fault)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, (CheckpointError, ConversionError, OSError)):
        return str(e)
    return f"{type(e).__name__}: {e} (rerun with --debug for a traceback)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bar = None if args.quiet else ProgressLine()
    budget = max(1 << 20, int(args.max_inflight_gb * (1 << 30)))

    def log(msg: str) -> None:
        if bar:
            bar.close()
        print(f"{PROG}: {msg}", file=sys.stderr)

    try:
        res = convert(args.src, args.out, overwrite=args.overwrite, inflight_bytes=budget, progress=bar, log=log)
        if bar:
            bar.close()
        if res.already_complete:
            print(f"{PROG}: {res.out} already holds this complete conversion (every unit, its marker and the "
                  "manifest checked; tensor bytes are checked by --verify)", file=sys.stderr)
        else:
            rate = res.bytes_written / max(res.seconds, 1e-9) / 1e9
            kept = f" ({res.units_skipped} unit(s) kept from an earlier run)" if res.units_skipped else ""
            what = "repaired: " if res.repaired else ""
            print(f"{PROG}: {what}wrote {res.bytes_written / 1e9:.2f} GB in {res.seconds:.1f} s ({rate:.2f} GB/s) "
                  f"to {res.out}{kept}", file=sys.stderr)
        if args.verify or args.verify_source:
            t0 = time.monotonic()
            n = verify_converted(args.out, progress=bar, inflight_bytes=budget,
                                 src=args.src if args.verify_source else None)
            if bar:
                bar.close()
            also = (" and every source tensor, re-read now, has that same crc32" if args.verify_source else
                    " (the source was not re-read: --verify-source also compares its current bytes)")
            print(f"{PROG}: verified {n / 1e9:.2f} GB in {time.monotonic() - t0:.1f} s: every stored tensor's crc32 "
                  f"equals the crc32 recorded from the source when it was converted{also}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        if bar:
            bar.close()
        print(f"{PROG}: interrupted; finished layers are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:
        if bar:
            bar.close()
        if args.debug:
            raise
        print(f"{PROG}: error: {_error_text(e)}", file=sys.stderr)
        return 1



def run(argv: list[str] | None = None) -> None:
    """Process entry point (the ``dsv4-convert`` command, ``python -m dsv4_jax.convert``): :func:`main`, then exit
    with its status. After Ctrl-C (status 130: the message is out, every committed unit is on disk and the rest is
    redone on resume) the process leaves at once with ``os._exit``: the interpreter's normal exit would first join
    the worker threads, among them a unit's commit, whose ``syncfs`` can take long on a busy disk. ``main`` itself
    returns normally, for callers in the same process."""
    rc = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    if rc == 130:
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":  # pragma: no cover
    run()
