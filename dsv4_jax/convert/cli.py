"""``dsv4-convert SRC_DIR OUT_DIR [--verify]``: official DeepSeek-V4 checkpoint -> sharded, mesh-independent arrays.

Exit status 0 only when ``OUT_DIR`` holds a complete conversion (and, with ``--verify``, every stored tensor's
checksum equals the source's). Any problem prints one paragraph naming the file and tensor (a traceback only with
``--debug``) and exits non-zero: 1 for errors, 2 for bad usage, 130 when interrupted. An interrupted or failed run
keeps the layers it finished; rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import sys
import time

from dsv4_jax.convert.safetensors_io import CheckpointError
from dsv4_jax.convert.writer import ConversionError, Progress, convert, verify_converted

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
        "validated before any heavy work.")
    ap.add_argument("src", metavar="SRC_DIR", help="official checkpoint directory")
    ap.add_argument("out", metavar="OUT_DIR", help="output directory (created; an interrupted conversion resumes)")
    ap.add_argument("--verify", action="store_true",
                    help="afterwards, re-read every stored array and compare its crc32 with the source tensor's")
    ap.add_argument("--overwrite", action="store_true",
                    help="discard a previous (complete or partial) conversion found in OUT_DIR")
    ap.add_argument("--max-inflight-gb", type=float, default=1.0, metavar="GB",
                    help="bound on bytes read but not yet written (host memory; default 1.0)")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bar = None if args.quiet else ProgressLine()
    budget = max(1 << 20, int(args.max_inflight_gb * (1 << 30)))
    try:
        res = convert(args.src, args.out, overwrite=args.overwrite, inflight_bytes=budget, progress=bar)
        if bar:
            bar.close()
        if res.already_complete:
            print(f"{PROG}: {res.out} already holds this complete conversion", file=sys.stderr)
        else:
            rate = res.bytes_written / max(res.seconds, 1e-9) / 1e9
            kept = f" ({res.units_skipped} unit(s) kept from an earlier run)" if res.units_skipped else ""
            print(f"{PROG}: wrote {res.bytes_written / 1e9:.2f} GB in {res.seconds:.1f} s ({rate:.2f} GB/s) to "
                  f"{res.out}{kept}", file=sys.stderr)
        if args.verify:
            t0 = time.monotonic()
            n = verify_converted(args.out, progress=bar, inflight_bytes=budget)
            if bar:
                bar.close()
            print(f"{PROG}: verified {n / 1e9:.2f} GB in {time.monotonic() - t0:.1f} s: every tensor's crc32 matches "
                  "the source", file=sys.stderr)
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
        known = isinstance(e, (CheckpointError, ConversionError, OSError))
        msg = str(e) if known else f"{type(e).__name__}: {e} (rerun with --debug for a traceback)"
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
