#!/usr/bin/env python
"""Where a decode step's device time goes: a ``jax.profiler`` trace of a few jitted decode steps, summed per kernel.

For each ``Config.kernels`` value it times the step (median wall), then traces ``--steps`` steps and reads the
Perfetto JSON the profiler writes: device kernels (events of the processes whose name matches ``--device-match``,
``/device:GPU`` by default) grouped by name (digits stripped, so ``fusion.12`` and ``fusion.31`` pool), with their
count and device time per step, the device-busy time per step beside the wall time (the rest is launch gaps), and
the number of kernels per step. One call answers "which kernels, how many launches, how much idle". ``--host-top N``
also lists the host's events of the same trace (every other process: JAX's dispatch, XLA's thunks, the launches,
the waits), grouped the same way with their count and time per step (nested events each count their own time):
where the wall time outside the kernels goes. ``--scopes N`` lists the device time per named scope
(``layer_0/attn/indexer``, ``layer_1/ffn/shared_expert``...: each kernel's HLO instruction looked up in the compiled
step's ``op_name`` metadata), which tells whose the small XLA fusions are. Kernels inside XLA's CUDA graphs carry
no HLO name in the trace (they pool under ``(no scope)``): run it with ``XLA_FLAGS=--xla_gpu_enable_command_buffer=``.

    python scripts/profile_decode.py --model flash --layers 3 --batch 1,32 --kernels reference,auto@xla --out $OUT
    python scripts/profile_decode.py --model tiny --device-match CPU     # smoke test of the parser on a CPU
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import dsv4_jax as d  # noqa: E402
from dsv4_jax import sharding as sh  # noqa: E402
from dsv4_jax.kernels import launch_route  # noqa: E402
from dsv4_jax.modeling.model import forward_jit  # noqa: E402
from scripts.bench_common import device_events, op_scopes, parse_variants, scope_table, variant  # noqa: E402
from scripts.bench_decode import flash_layers, kernels_mode, pro_layers, start_position  # noqa: E402


def _grouped(events: list[dict], steps: int, label: str, width: int) -> list[dict]:
    """Complete events grouped by name (digits stripped, cut to ``width``: ``fusion.12`` and ``fusion.31`` pool):
    ``{label: name, "per_step": count / steps, "us_per_step": total / steps}``, longest first."""
    per = collections.defaultdict(lambda: [0, 0.0])  # name -> [count, total us]
    for e in events:
        key = re.sub(r"[._]?\d+", "", e.get("name", "?"))[:width] or "?"
        per[key][0] += 1
        per[key][1] += float(e["dur"])
    return sorted(({label: k, "per_step": c / steps, "us_per_step": t / steps} for k, (c, t) in per.items()),
                  key=lambda r: -r["us_per_step"])


def kernel_table(trace_dir: Path, device_match: str, steps: int) -> dict:
    """Per-kernel device time from the newest Perfetto trace under ``trace_dir``."""
    trace, processes, events = device_events(trace_dir, device_match)
    rows = _grouped(events, steps, "kernel", 60)
    return {"trace": trace, "processes": processes, "kernels_per_step": len(events) / steps,
            "busy_us_per_step": sum(float(e["dur"]) for e in events) / steps, "rows": rows}


def host_table(trace_dir: Path, device_match: str, steps: int) -> list[dict]:
    """The host's events of the newest trace under ``trace_dir`` (the processes not matching ``device_match``),
    grouped as the kernels are: count and microseconds per step, longest first."""
    return _grouped(device_events(trace_dir, device_match, host=True)[2], steps, "event", 70)


def scope_rows(trace_dir: Path, scopes: dict[str, list[str]], device_match: str, steps: int,
               depth: int = 3) -> list[dict]:
    """:func:`scripts.bench_common.scope_table`'s per-scope rows of the newest trace, per step: ``{"scope",
    "per_step": kernels / steps, "us_per_step"}``, longest first."""
    rows = scope_table(trace_dir, scopes, depth, device_match)["scopes"]
    return [{"scope": r["scope"], "per_step": r["kernels"] / steps, "us_per_step": r["ms"] * 1e3 / steps}
            for r in rows]


def profile(cfg, kernels: tuple[str, ...], batch: int, max_len: int, steps: int, device_match: str,
            seed: int = 0, w=None, top: int = 25, mesh=None, full: bool = True, variants=("",),
            host_top: int = 0, scopes: int = 0) -> list[dict]:
    """Time and trace one decode step per ``kernels`` entry (``MODE`` or ``MODE@ROUTE``) and benchmark variant
    (:func:`scripts.bench_common.variant`) at ``batch`` rows; with a ``mesh``, ``w`` already placed on it (the state
    is sharded here). ``full``: every row starts as late as the traced steps allow (a full ``max_len`` context,
    :func:`start_position`), else at position 0 (an empty state: the indexer kernel then skips its whole cache)."""
    w = d.init_weights(cfg, jax.random.key(seed)) if w is None else w  # eager: one small program per leaf shape
    mesh = mesh or sh.make_mesh(1, 1, devices=jax.devices()[:1])
    tok = jnp.asarray(np.random.default_rng(seed).integers(2, cfg.vocab_size, (batch, 1)), jnp.int32)
    out = []
    default_route = launch_route()
    for kern, var in [(k, v) for k in kernels for v in variants]:
        c = cfg.with_(kernels=kernels_mode(kern, default_route))
        step = jax.jit(lambda w, t, s, c=c: forward_jit(w, c, t, s, return_logits="last"), donate_argnums=2)
        state = d.init_state(c, batch, max_len)
        start = start_position(max_len, 13 + steps, "full" if full else 0)  # 13 untraced steps, the traced ones
        state = sh.shard_state(state.replace(pos=jnp.full_like(state.pos, start),
                                             mtp_pos=jnp.full_like(state.mtp_pos, start)), mesh)
        with jax.set_mesh(mesh), variant(var):
            tab = _traced(step, w, tok, state, steps, device_match, host_top > 0, scopes > 0)
        tab.update(kernels=kern, variant=var or "default", batch=batch, layers=cfg.n_layers,
                   mesh=list(mesh.devices.shape), device=jax.devices()[0].device_kind, date=time.strftime("%Y-%m-%d"))
        out.append(tab)
        print(f"\n== kernels={kern} variant={var or 'default'} batch={batch} mesh={tab['mesh']}: "
              f"wall {tab['wall_us_per_step']:.0f} us/step, "
              f"device busy {tab['busy_us_per_step']:.0f} us/step, {tab['kernels_per_step']:.0f} kernels/step "
              f"({tab['device']}; {', '.join(tab['processes'])})")
        for r in tab["rows"][:top]:
            print(f"  {r['us_per_step']:9.1f} us  {r['per_step']:6.1f}x  {r['kernel']}")
        if host_top:
            print("  host events per step:")
            for r in tab["host"][:host_top]:
                print(f"  {r['us_per_step']:9.1f} us  {r['per_step']:6.1f}x  {r['event']}")
        if scopes:
            print("  device time per named scope, per step:")
            for r in tab["scopes"][:scopes]:
                print(f"  {r['us_per_step']:9.1f} us  {r['per_step']:6.1f}x  {r['scope']}")
    return out


def _traced(step, w, tok, state, steps: int, device_match: str, host: bool = False, scoped: bool = False) -> dict:
    """Median wall of 10 steps after 3 warm-up ones, then the kernel table of ``steps`` traced steps (with ``host``,
    the host's events too, under ``"host"``; with ``scoped``, the device time per named scope under ``"scopes"``)."""
    for _ in range(3):
        logits, state = step(w, tok, state)
    jax.block_until_ready(logits)
    ts = []
    for _ in range(10):
        t0 = time.perf_counter()
        logits, state = step(w, tok, state)
        jax.block_until_ready(logits)
        ts.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                logits, state = step(w, tok, state)
            jax.block_until_ready(logits)
        tab = kernel_table(Path(tmp), device_match, steps)
        if host:
            tab["host"] = host_table(Path(tmp), device_match, steps)
        if scoped:  # the program just traced, compiled again (the persistent cache) for its op_name metadata
            tab["scopes"] = scope_rows(Path(tmp), op_scopes(step.lower(w, tok, state).compile().as_text()),
                                       device_match, steps)
    tab["wall_us_per_step"] = float(np.median(ts)) * 1e6
    return tab


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["flash", "pro", "tiny"], default="flash")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--batch", default="1", help="comma list of batch sizes")
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5, help="steps inside the trace")
    ap.add_argument("--kernels", default="reference,auto",
                    help="comma list of Config.kernels values; MODE@ROUTE picks the launch route too (auto@xla)")
    ap.add_argument("--top", type=int, default=25, help="kernels listed per configuration")
    ap.add_argument("--device-match", default="/device:GPU", help="substring of the device processes' names")
    ap.add_argument("--mesh", default="1x1", help="DATAxMODEL (e.g. 1x2; --device-match /device:GPU:0 then keeps "
                    "one device's kernels)")
    ap.add_argument("--out", help="folder for profile.json")
    ap.add_argument("--empty", action="store_true", help="start at position 0 (an empty state) instead of a full "
                    "max-len context")
    ap.add_argument("--variants", default="", help="';'-separated benchmark variants (see bench_decode.py)")
    ap.add_argument("--host-top", type=int, default=0, help="host events listed per configuration (0: none)")
    ap.add_argument("--scopes", type=int, default=0, help="named scopes listed per configuration, by device time "
                    "(0: none; run with XLA_FLAGS=--xla_gpu_enable_command_buffer= so that kernels carry their names)")
    args = ap.parse_args(argv)
    variants = parse_variants(args.variants)  # a malformed variant fails here, before anything is timed
    make = {"flash": flash_layers, "pro": pro_layers,
            "tiny": lambda n, num: d.Config.tiny(numerics=num)}[args.model]
    cfg = make(args.layers, "reference")
    w = d.init_weights(cfg, jax.random.key(0))
    shape = tuple(int(x) for x in args.mesh.split("x"))
    mesh = sh.make_mesh(*shape, devices=jax.devices()[: shape[0] * shape[1]])
    if mesh.size > 1:
        w = jax.device_put(w, sh.weight_shardings(cfg, mesh))
    res = [r for b in args.batch.split(",") for r in profile(cfg, tuple(args.kernels.split(",")), int(b),
                                                             args.max_len, args.steps, args.device_match, w=w,
                                                             top=args.top, mesh=mesh, full=not args.empty,
                                                             variants=variants, host_top=args.host_top,
                                                             scopes=args.scopes)]
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "profile.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
