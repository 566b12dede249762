"""Prefill-size timings of three ops of a V4-Flash layer, each beside its alternatives (one H200-sized chunk: 8,192
tokens at positions 120K-128K of a 128K-token prompt), with their results compared:

* ``indexer``: the indexer's totals of the chunk's rows over the 32,768 FP4 entries: the prefill kernel
  (``kernels/indexer_prefill.py``) in its plan and in each ``--index-tiles`` plan (``DSV4_INDEX_PREFILL_TILE``), and
  the decode rows' kernel; the fraction of totals equal to the decode kernel's, the -inf pattern checked.
* ``compressor``: the compressor projection ``[8192, 4096] x [N, 4096]`` (N = 1,024 attention, 256 indexer), XLA's
  fp32 ``HIGHEST`` form and the bf16 dot with fp32 accumulation, with each one's error against float64 (first 512
  rows) in units of ``2**-24 * sum |x_k w_k|`` (an fp32 dot's bound is K = 4,096 units).
* ``router``: the router's logits and selection over 256 experts in each ``--router-tiles`` plan (``DOT=1``: fp32
  ``ieee`` dot; ``DOT=2``: the bf16 operands), with the fraction of tokens whose selection equals the first plan's.

Random inputs from fixed seeds; each figure is the median of ``--trials`` timed calls after a warm-up (wall time of
one jitted call, launch included). Needs a GPU and jax-triton (the kernels)::

    python scripts/bench_prefill_ops.py --ops indexer,compressor,router
    python scripts/bench_prefill_ops.py --ops router --router-tiles "DOT=1,BK=32;DOT=2,BK=64;DOT=2,BK=64,BT=128"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import time_call  # noqa: E402

from dsv4_jax.config import Config  # noqa: E402
from dsv4_jax.kernels import indexer as ix  # noqa: E402
from dsv4_jax.kernels import indexer_prefill as ixp  # noqa: E402
from dsv4_jax.kernels import router  # noqa: E402
from dsv4_jax.modeling.quant import encode_fp4_cache, fp4_simulate  # noqa: E402

S, D = 8192, 4096  # chunk rows, model dim (V4-Flash)


def timed(fn, *args, trials: int) -> float:
    """Median wall ms of ``trials`` calls of ``fn(*args)`` after warm-up (``bench_common.time_call``)."""
    return time_call(fn, *args, trials=trials) * 1e3


def bench_indexer(args) -> None:
    Nc, H, Di = 32768, 64, 128
    rng = np.random.default_rng(0)
    q = fp4_simulate(jnp.asarray(rng.standard_normal((1, S, H, Di)), jnp.bfloat16), 32).astype(jnp.bfloat16)
    hw = jnp.asarray(rng.standard_normal((1, S, H)) * 0.1, jnp.bfloat16)
    keys = encode_fp4_cache(jnp.asarray(rng.standard_normal((1, Nc, Di)), jnp.bfloat16))
    t = jnp.asarray((4 * Nc - S + np.arange(S))[None], jnp.int32)
    tflop = float(np.sum((np.asarray(t) + 1) // 4)) * H * Di * 2 / 1e12  # the visible entries' dots
    decode = jax.jit(ix.indexer_totals_triton)
    ref = np.asarray(decode(q, hw, keys, t).astype(jnp.float32))
    fin = np.isfinite(ref)
    print(json.dumps(dict(op="indexer", impl="decode rows' kernel", ms=round(timed(decode, q, hw, keys, t,
                                                                                   trials=args.trials), 3))))
    for tile in args.index_tiles.split(";"):
        os.environ["DSV4_INDEX_PREFILL_TILE"] = tile
        f = jax.jit(lambda q, hw, k, t: ixp.prefill_totals_triton(q, hw, k, t))  # traced anew: reads the tile
        got = np.asarray(f(q, hw, keys, t).astype(jnp.float32))
        ms = timed(f, q, hw, keys, t, trials=args.trials)
        print(json.dumps(dict(op="indexer", impl="prefill kernel", tile=tile, plan=ixp.plan(H, S), ms=round(ms, 3),
                              tflops=round(tflop / ms * 1e3, 1), inf_pattern_ok=bool((np.isneginf(got) == ~fin).all()),
                              equal_to_decode_kernel=round(float((got[fin] == ref[fin]).mean()), 6))), flush=True)
    os.environ.pop("DSV4_INDEX_PREFILL_TILE", None)


def bench_compressor(args) -> None:
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, S, D)), jnp.bfloat16)
    forms = {"fp32 HIGHEST": lambda x, w: jnp.einsum("bsk,nk->bsn", x.astype(jnp.float32), w.astype(jnp.float32),
                                                     precision=jax.lax.Precision.HIGHEST),
             "bf16 dot, fp32 accumulation": lambda x, w: jnp.einsum("bsk,nk->bsn", x, w,
                                                                    preferred_element_type=jnp.float32)}
    for N in (1024, 256):
        w = jnp.asarray(rng.standard_normal((N, D)) * 0.02, jnp.bfloat16)
        xd, wd = np.asarray(x[0, :512], np.float64), np.asarray(w, np.float64)
        want, unit = xd @ wd.T, np.abs(xd) @ np.abs(wd).T * 2.0**-24
        for name, form in forms.items():
            f = jax.jit(form)
            err = np.abs(np.asarray(f(x, w)[0, :512], np.float64) - want) / unit
            ms = timed(f, x, w, trials=args.trials)
            print(json.dumps(dict(op="compressor", N=N, impl=name, ms=round(ms, 3),
                                  tflops=round(2 * S * D * N / ms / 1e9, 1), err_mean_units=round(float(err.mean()), 3),
                                  err_max_units=round(float(err.max()), 3))), flush=True)


def bench_router(args) -> None:
    E = 256
    rng = np.random.default_rng(2)
    cfg = Config.tiny(n_routed_experts=E, n_activated_experts=6, route_scale=2.5)
    gate = jnp.asarray(rng.standard_normal((E, D)) / 64, jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal(E) * 0.01, jnp.float32)
    for T in (int(t) for t in args.router_tokens.split(",")):
        x = jnp.asarray(rng.standard_normal((T, D)), jnp.bfloat16)
        ids = jnp.zeros((T,), jnp.int32)
        first = None
        for tile in args.router_tiles.split(";"):
            over = {k: int(v) for k, v in (kv.split("=") for kv in tile.split(",") if kv)}
            p = {**router.plan(T, E, D, "sm90", bf16=True), **over}
            f = jax.jit(lambda g, b, x, i, p=p: router.route_triton(cfg, g, b, None, x, i, p=p))
            idx = np.asarray(f(gate, bias, x, ids)[0])
            same = None if first is None else round(float((idx == first).all(axis=1).mean()), 6)
            first = idx if first is None else first
            print(json.dumps(dict(op="router", tokens=T, plan=p, ms=round(timed(f, gate, bias, x, ids,
                                                                                trials=args.trials), 3),
                                  selections_equal_to_first=same)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default="indexer,compressor,router", help="comma list of indexer, compressor, router")
    ap.add_argument("--index-tiles", default=";NB=8;RB=4", help="';'-separated DSV4_INDEX_PREFILL_TILE values "
                    "('' = the plan)")
    ap.add_argument("--router-tiles", default="DOT=1,BK=32;DOT=2,BK=64;DOT=2,BK=64,BT=128;DOT=2,BK=32",
                    help="';'-separated router plan entries (over router.plan's bf16 plan for the tokens)")
    ap.add_argument("--router-tokens", default="8192", help="comma list of token counts for the router")
    ap.add_argument("--trials", type=int, default=9)
    args = ap.parse_args()
    ops = {"indexer": bench_indexer, "compressor": bench_compressor, "router": bench_router}
    unknown = [o for o in args.ops.split(",") if o not in ops]
    if unknown:
        ap.error(f"--ops: unknown {unknown}, expected a comma list of {list(ops)}")
    print(json.dumps(dict(device=jax.devices()[0].device_kind, backend=jax.default_backend())), flush=True)
    for op in args.ops.split(","):
        ops[op](args)


if __name__ == "__main__":
    main()
