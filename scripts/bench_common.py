"""Shared helpers of the kernel benchmarks (``bench_kernels.py``, ``bench_moe.py``): the card's reference rates
(copy bandwidth, XLA's plain e4m3 matmul), timing of jitted functions, rotating weight copies, a table printer.

Timing: a jitted function runs ``reps`` independent calls of the op (one per weight copy, so that weights are read
from HBM, not L2, as in a decode step), best-of-median over ``trials`` host-timed runs divided by ``reps``: the time
per call including the launch gaps a model step also pays.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import math
import os
import runpy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

L2_FLUSH_BYTES = 256 << 20  # rotate weight copies until this many bytes separate two reads of one copy (L2 is 50 MB)


@contextlib.contextmanager
def variant(spec: str):
    """Run the body under a benchmark variant, then restore everything: ``spec`` is whitespace-separated entries,
    ``NAME=VALUE`` (an environment variable, e.g. ``DSV4_MHC_TILE=NS=256,warps2=4``: the kernels' plan knobs, read
    when a launch is traced) or ``package.module:ATTR=VALUE`` (a module constant, ``VALUE`` a Python literal, e.g.
    ``dsv4_jax.kernels.sparse_attention:AUTO_MIN_LIST=0``); empty or ``default``: nothing. JAX's tracing caches are
    cleared on entry and exit, so a jitted step is traced again under the variant (``forward_jit``'s cache would
    otherwise hand back the program traced before). A malformed entry or an unknown attribute fails before anything
    is timed."""
    env, attrs = {}, []
    for entry in spec.split():
        if entry == "default":
            continue
        name, eq, value = entry.partition("=")
        if not eq or not name:
            raise ValueError(f"variant {spec!r}: {entry!r} is neither NAME=VALUE nor module:ATTR=VALUE")
        if ":" in name:
            mod, _, attr = name.partition(":")
            m = importlib.import_module(mod)
            if not hasattr(m, attr):
                raise ValueError(f"variant {spec!r}: module {mod} has no attribute {attr!r}")
            attrs.append((m, attr, ast.literal_eval(value)))
        else:
            env[name] = value
    saved_env = {k: os.environ.get(k) for k in env}
    saved_attrs = [(m, a, getattr(m, a)) for m, a, _ in attrs]
    try:
        os.environ.update(env)
        for m, a, v in attrs:
            setattr(m, a, v)
        jax.clear_caches()
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for m, a, v in saved_attrs:
            setattr(m, a, v)
        jax.clear_caches()


def parse_variants(text: str) -> tuple[str, ...]:
    """``--variants`` text (``';'``-separated :func:`variant` specs; empty: the default alone) -> the specs, each
    checked by entering it once, so a malformed one fails before anything is made or timed."""
    variants = tuple(text.split(";")) if text else ("",)
    for v in variants:
        with variant(v):
            pass
    return variants


def time_call(fn, *args, trials: int = 10, warmup: int = 2) -> float:
    """Median seconds of ``fn(*args)`` (already jitted), each run blocked until ready."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(trials):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def copies_for(nbytes: int, limit: int = 64) -> int:
    """How many copies of an operand of ``nbytes`` to rotate through so reads come from HBM."""
    return max(1, min(limit, math.ceil(L2_FLUSH_BYTES / max(1, nbytes))))


def time_rotating(op, operands: list, *shared, trials: int = 10) -> float:
    """Seconds per ``op(operand, *shared)`` call, over one jitted program calling it once per operand."""
    f = jax.jit(lambda ops, *sh: [op(o, *sh) for o in ops])
    return time_call(f, operands, *shared, trials=trials) / len(operands)


def xla_copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Bytes/s (read + write) of an XLA elementwise copy of ``nbytes``."""
    x = jnp.zeros(nbytes // 4, jnp.uint32)
    f = jax.jit(lambda a: a + 1)
    t = time_call(f, x)
    del x
    return 2 * nbytes / t


def triton_copy_bandwidth(nbytes: int = 4 << 30, block: int = 8192) -> float | None:
    """Bytes/s (read + write) of a Triton streaming copy of ``nbytes`` through jax-triton (``None`` without it, or
    without a GPU backend: the CPU smoke runs of the benchmarks)."""
    from dsv4_jax.kernels import triton_unavailable

    if triton_unavailable() is not None:
        return None
    try:
        import jax_triton as jt
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def copy_kernel(src, n, dst, BLOCK: tl.constexpr):  # jax-triton passes outputs after the inputs
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=m), mask=m)

    n = nbytes // 4
    x = jnp.zeros(n, jnp.uint32)
    f = jax.jit(lambda a: jt.triton_call(a, n, kernel=copy_kernel, out_shape=jax.ShapeDtypeStruct((n,), jnp.uint32),
                                         grid=(triton.cdiv(n, block),), BLOCK=block, num_warps=8))
    t = time_call(f, x)
    del x
    return 2 * nbytes / t


def xla_fp8_matmul_rate(n: int = 8192) -> float:
    """FLOP/s of XLA's plain e4m3 x e4m3 -> bf16 matmul at ``n``^3 (the prefill yardstick)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), jnp.float32).astype(jnp.float8_e4m3fn)
    b = jax.random.normal(k2, (n, n), jnp.float32).astype(jnp.float8_e4m3fn)
    f = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16))
    return 2 * n**3 / time_call(f, a, b)


def card_rates(copy_gib: int = 4, with_matmul: bool = True) -> dict:
    """The card's yardsticks measured in this run: copy bandwidths (XLA, Triton, best) and the e4m3 matmul rate."""
    xla = xla_copy_bandwidth(copy_gib << 30)
    tri = triton_copy_bandwidth(copy_gib << 30)
    out = {"device": jax.devices()[0].device_kind, "copy_xla": xla, "copy_triton": tri,
           "copy_best": max(xla, tri or 0.0)}
    if with_matmul:
        out["fp8_matmul_xla"] = xla_fp8_matmul_rate()
    return out


def print_rates(r: dict) -> None:
    tri = f"{r['copy_triton'] / 1e12:.2f}" if r["copy_triton"] else "n/a"
    print(f"device: {r['device']}; copy bandwidth (4 GiB, read+write): XLA {r['copy_xla'] / 1e12:.2f} TB/s, "
          f"Triton {tri} TB/s, best {r['copy_best'] / 1e12:.2f} TB/s")
    if "fp8_matmul_xla" in r:
        print(f"XLA e4m3 matmul 8192^3: {r['fp8_matmul_xla'] / 1e12:.0f} TFLOP/s")


def table(rows: list[dict], cols: list[str]) -> str:
    """A fixed-width text table of ``rows`` (dicts) over ``cols``; floats printed with 3 significant digits."""
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    width = [max([len(c)] + [len(x[i]) for x in cells]) for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.rjust(w) for x, w in zip(xs, width))
    return "\n".join([line(cols), line(["-" * w for w in width])] + [line(x) for x in cells])


def device_events(trace_dir: Path, device_match: str, host: bool = False) -> tuple[str, list[str], list[dict]]:
    """The newest Perfetto trace under ``trace_dir`` (``jax.profiler``): its path, the names of the processes whose
    name contains ``device_match`` (e.g. ``/device:GPU:0``) and their complete events (kernels, command buffers);
    with ``host``, the complete events of every other process instead (the host's threads: dispatch, launches,
    waits)."""
    import gzip
    import json

    files = sorted(Path(trace_dir).rglob("*.trace.json.gz"), key=lambda f: f.stat().st_mtime)
    if not files:
        raise SystemExit(f"no *.trace.json.gz under {trace_dir}: the profiler wrote {list(Path(trace_dir).rglob('*'))}")
    with gzip.open(files[-1], "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    pids = {p for p, n in names.items() if device_match in n}
    if not pids:
        raise SystemExit(f"no process matches {device_match!r}; processes: {sorted(names.values())}")
    return (str(files[-1]), sorted(names[p] for p in pids),
            [e for e in events if e.get("ph") == "X" and (e.get("pid") in pids) != host and "dur" in e])


def op_scopes(hlo_text: str) -> dict[str, list[str]]:
    """HLO instruction name -> its ``op_name`` metadata as a list of named-scope parts with the ``jit(...)`` wrappers
    dropped (e.g. ``["layer_0", "attn", "indexer", "reduce_sum"]``), from an optimized module's text."""
    import re

    pat = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name="([^"]*)"')
    return {m.group(1): [x for x in m.group(2).split("/") if x and not x.startswith("jit(")]
            for m in map(pat.match, hlo_text.splitlines()) if m}


def scope_table(trace_dir: Path, scopes: dict[str, list[str]], depth: int = 3,
                device_match: str = "/device:GPU:0") -> dict:
    """Device time of the newest Perfetto trace under ``trace_dir`` (the processes matching ``device_match``), summed
    per kernel name and per named scope: the kernel's HLO instruction (``hlo_op``, else the event name) looked up in
    ``scopes`` (:func:`op_scopes`), its op's own name dropped, cut to its first ``depth`` levels below the jit, e.g.
    ``layer_0/attn/indexer``. Rows ``{"scope", "kernels", "ms"}``, longest first; the module's own span (``Xla...``)
    is not a kernel."""
    import re

    trace, _, events = device_events(trace_dir, device_match)
    per_scope: dict[str, list] = {}
    per_name: dict[str, list] = {}
    for e in events:
        if e.get("name", "").startswith("Xla"):  # the module's own span
            continue
        a, ms = e.get("args", {}), float(e["dur"]) / 1e3
        op = str(a.get("hlo_op") or e.get("name", "?"))
        parts = scopes.get(op, [])
        for table, key in ((per_scope, "/".join(parts[:-1][:depth] or parts) or "(no scope)"),
                           (per_name, re.sub(r"[._]?\d+$", "", op)[:60])):
            row = table.setdefault(key, [0, 0.0])
            row[0] += 1
            row[1] += ms
    rank = lambda t: sorted(({"scope": k, "kernels": n, "ms": ms} for k, (n, ms) in t.items()),  # noqa: E731
                            key=lambda r: -r["ms"])
    rows = rank(per_scope)
    return {"trace": trace, "kernels": sum(r["kernels"] for r in rows), "busy_ms": sum(r["ms"] for r in rows),
            "scopes": rows, "names": rank(per_name)}


if __name__ == "__main__":  # python scripts/bench_common.py 'SPEC' -m MODULE [ARGS...]: a module run under a variant
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        raise SystemExit("usage: python scripts/bench_common.py 'VARIANT' -m MODULE [ARGS...] (e.g. -m pytest -k gpu)")
    spec, module, args = sys.argv[1], sys.argv[3], sys.argv[4:]
    sys.argv = [module, *args]
    with variant(spec):
        runpy.run_module(module, run_name="__main__", alter_sys=True)
