#!/usr/bin/env python
"""Device time per kernel of single hot ops (FP4 MoE at decode sizes, FP8 linears at one row), from a profiler trace.

``bench_moe.py`` / ``bench_kernels.py`` time whole jitted programs (kernels + the XLA ops around them + launch
gaps); this splits such a program into its kernels, so a slow op can be told apart from slow launches:

    python scripts/profile_ops.py --moe-tokens 1 --moe-tiles ",GEMV=0" --fp8 wq_b,wo_b --rows 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_kernels import _op, fp8_shapes, random_fp8  # noqa: E402
from bench_moe import make_op, random_fp4, routes  # noqa: E402
from profile_decode import kernel_table  # noqa: E402

import dsv4_jax as d  # noqa: E402


def trace(fn, args, calls: int, label: str, device_match: str) -> None:
    """Run ``fn(*args)`` (``calls`` op calls per run) under the profiler; print wall and device time per op call."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(5):
        jax.block_until_ready(fn(*args))
    wall = (time.perf_counter() - t0) / 5 / calls * 1e6
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(3):
                jax.block_until_ready(fn(*args))
        tab = kernel_table(Path(tmp), device_match, 3 * calls)
    print(f"\n== {label}: wall {wall:.1f} us per call, device busy {tab['busy_us_per_step']:.1f} us, "
          f"{tab['kernels_per_step']:.1f} kernels per call ({jax.devices()[0].device_kind})", flush=True)
    for r in tab["rows"][:12]:
        print(f"  {r['us_per_step']:9.2f} us  {r['per_step']:5.1f}x  {r['kernel']}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moe-tokens", default="1")
    ap.add_argument("--moe-tiles", default="", help="';'-separated tile overrides ('' = default plan)")
    ap.add_argument("--fp8", default="wq_b,wo_b", help="FP8 linear shapes (bench_kernels.fp8_shapes names)")
    ap.add_argument("--rows", default="1")
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--device-match", default="/device:GPU")
    args = ap.parse_args()
    cfg = d.Config.v4_flash()
    E, D, I, k = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, cfg.n_activated_experts
    tokens = [int(t) for t in args.moe_tokens.split(",") if t]
    keys = jax.random.split(jax.random.key(1), 3)
    w1, w2, w3 = (random_fp4(keys[0], E, I, D), random_fp4(keys[1], E, D, I), random_fp4(keys[2], E, I, D)) if tokens \
        else (None, None, None)
    for T in tokens:
        idx, wts = routes(jax.random.key(T), args.calls, T, E, k)
        xs = jax.random.normal(jax.random.key(T + 1), (args.calls, T, D), jnp.bfloat16)
        for spec in args.moe_tiles.split(";"):
            tile = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in spec.split(",") if kv} or None
            fn = make_op(cfg, "triton", w1, w2, w3, None, tile)
            trace(fn, (xs, idx, wts), args.calls, f"MoE T={T} tile={tile}", args.device_match)
    del w1, w2, w3
    for name in filter(None, args.fp8.split(",")):
        G, N, K = fp8_shapes(cfg)[name]
        ws = [random_fp8(kk, G * N, K) for kk in jax.random.split(jax.random.key(2), args.calls)]
        for M in map(int, args.rows.split(",")):
            x = jax.random.normal(jax.random.key(M), (M, G, K) if G > 1 else (M, K)).astype(jnp.bfloat16)
            f = jax.jit(lambda ws, x, G=G: [_op(w, x, G > 1, "triton") for w in ws])
            trace(f, (ws, x), args.calls, f"FP8 {name} rows={M}", args.device_match)


if __name__ == "__main__":
    main()
