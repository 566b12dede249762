#!/usr/bin/env python
"""Routed-expert (FP4 MoE) timing at V4-Flash / V4-Pro shapes: the Triton kernels, the XLA reference schedules and
``jax.lax.ragged_dot`` on bf16 experts, one device, random weights in the checkpoint format, uniform random routing.

Each timed call is the whole routed-expert op of ``moe.routed_experts`` on one device: block schedule, kernels (or
reference), and the per-token combine. ``n`` calls on different tokens and routes run unrolled in one jitted
program (no host round trips; consecutive calls touch different experts, so the L2 holds nothing useful) and the
time is the median over repeats of that program divided by ``n``. Bytes = the distinct experts the routes touch
(w1, w2, w3 codes + scales) + tokens in and fp32 pairs out; the floor is bytes / the best copy bandwidth measured in
the same run (``bench_common.card_rates``: an XLA copy and a Triton streaming copy, read + write counted).

    python scripts/bench_moe.py --models flash,pro --tokens 1,4,16,64,2048
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_common import card_rates, print_rates, time_call  # noqa: E402

import dsv4_jax as d  # noqa: E402
from dsv4_jax.modeling import experts as ex  # noqa: E402
from dsv4_jax.modeling.quant import Fp4Tensor, quantized_input  # noqa: E402

T0 = time.perf_counter()


def log(msg: str):
    """Progress with the elapsed time, to stderr (unbuffered)."""
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def random_fp4(key, E, N, K) -> Fp4Tensor:
    k1, k2 = jax.random.split(key)
    return Fp4Tensor(packed=jax.random.bits(k1, (E, N, K // 2), jnp.uint8),
                     scale=jax.random.randint(k2, (E, N, K // 32), 118, 124).astype(jnp.uint8))


def routes(key, n, T, E, k):
    """``n`` sets of routes ``[n, T, k]``: k distinct uniform experts per token, and weights."""
    k1, k2 = jax.random.split(key)
    idx = jax.lax.top_k(jax.random.uniform(k1, (n, T, E)), k)[1].astype(jnp.int32)
    return idx, jax.random.uniform(k2, (n, T, k), jnp.float32, 0.1, 1.0)


def make_op(cfg, impl: str, w1, w2, w3, bf16=None, tile=None):
    """``(xs [n,T,D] bf16, idx [n,T,k], wts) -> [n,T,D]`` fp32: ``n`` unrolled routed-expert calls."""
    from dsv4_jax.kernels.fp4_moe import fp4_moe_pairs_triton

    def one(x, idx, wts, w1, w2, w3, bf16):
        T, k = idx.shape
        tok = jnp.arange(T * k, dtype=jnp.int32) // k
        e, wt = idx.reshape(-1), wts.reshape(-1)
        xq = quantized_input(x, True)
        if impl == "triton":
            y = fp4_moe_pairs_triton(cfg, x, xq, tok, e, wt, w1, w2, w3, tile)
        elif impl == "reference":
            pairs = ex.pairs_gathered if T * k < w1.packed.shape[0] else ex.pairs_grouped
            y = pairs(cfg, x, xq, tok, e, wt, w1, w2, w3)
        else:  # ragged_dot on bf16 experts [E, D, I] / [E, I, D] (no FP8 activation quantization)
            b1, b3, b2 = bf16
            order = jnp.argsort(e, stable=True)
            sizes = jnp.zeros(b1.shape[0], jnp.int32).at[e].add(1)
            xs = x[tok[order]]
            g = jax.lax.ragged_dot(xs, b1, sizes).astype(jnp.float32)
            u = jax.lax.ragged_dot(xs, b3, sizes).astype(jnp.float32)
            a = (wt[order][:, None] * jax.nn.silu(jnp.minimum(g, 10.0)) * jnp.clip(u, -10, 10)).astype(jnp.bfloat16)
            y = jnp.zeros((T * k, x.shape[-1]), jnp.float32).at[order].set(jax.lax.ragged_dot(a, b2, sizes))
        return ex.combine(y, idx)

    def run(xs, idx, wts, w1, w2, w3, bf16):  # weights are arguments: closed-over arrays would become constants
        return jnp.stack([one(xs[i], idx[i], wts[i], w1, w2, w3, bf16) for i in range(xs.shape[0])])

    return functools.partial(jax.jit(run), w1=w1, w2=w2, w3=w3, bf16=bf16)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="flash,pro")
    ap.add_argument("--tokens", default="1,4,16,64,2048")
    ap.add_argument("--impls", default="triton,reference,ragged_dot")
    ap.add_argument("--calls", type=int, default=16, help="unrolled calls per program (decode sizes)")
    ap.add_argument("--variants", default="", help="extra Triton tile overrides, e.g. 'G=8;BN1=32,BN2=32'")
    ap.add_argument("--ref-max-tokens", type=int, default=64, help="skip the XLA reference above this many tokens")
    args = ap.parse_args()
    rates = card_rates(with_matmul=False)
    print_rates(rates)
    best = rates["copy_best"]
    rows = []
    for model in args.models.split(","):
        cfg = d.Config.v4_flash() if model == "flash" else d.Config.v4_pro()
        E, D, I, k = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, cfg.n_activated_experts
        keys = jax.random.split(jax.random.key(1), 4)
        w1, w2, w3 = random_fp4(keys[0], E, I, D), random_fp4(keys[1], E, D, I), random_fp4(keys[2], E, I, D)
        log(f"{model}: weights")
        per_expert = sum(a.nbytes for w in (w1, w2, w3) for a in (w.packed, w.scale)) / E
        bf16 = None
        for T in map(int, args.tokens.split(",")):
            n = args.calls if T <= 64 else 2
            idx, wts = routes(jax.random.key(T), n, T, E, k)
            xs = jax.random.normal(jax.random.key(T + 1), (n, T, D), jnp.bfloat16)
            touched = float(np.mean([len(np.unique(np.asarray(idx[i]))) for i in range(n)]))
            nbytes = touched * per_expert + T * D * 2 + T * k * D * 4
            flops = 2 * T * k * 3 * D * I
            variants = [v for v in args.variants.split(";") if v]
            impls = args.impls.split(",") + [f"triton[{v}]" for v in variants]
            for impl in impls:
                if impl == "reference" and T > args.ref_max_tokens:
                    continue
                tile = None
                if impl.startswith("triton["):
                    tile = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in impl[7:-1].split(",")}
                if impl == "ragged_dot" and bf16 is None:
                    log(f"{model}: bf16 experts for ragged_dot")
                    kb = jax.random.split(keys[3], 3)
                    bf16 = tuple(jax.random.normal(kk, s, jnp.bfloat16) * 0.02
                                 for kk, s in zip(kb, [(E, D, I), (E, D, I), (E, I, D)]))
                log(f"{model} T={T} {impl}: compile")
                fn = make_op(cfg, "triton" if tile else impl, w1, w2, w3, bf16, tile)
                t0 = time.perf_counter()
                jax.block_until_ready(fn(xs, idx, wts))
                compile_s = time.perf_counter() - t0
                t = time_call(fn, xs, idx, wts, trials=5 if T <= 64 else 3, warmup=1) / n
                r = dict(model=model, T=T, impl=impl, us=t * 1e6, touched=touched, MB=nbytes / 1e6,
                         bw_frac=nbytes / t / best, tflops=flops / t / 1e12, floor_us=nbytes / best * 1e6)
                rows.append(r)
                print(f"{model:5s} T={T:5d} {impl:16s} {r['us']:10.1f} us  experts {touched:6.1f}  {r['MB']:8.1f} MB  "
                      f"floor {r['floor_us']:8.1f} us  {100 * r['bw_frac']:5.1f}% of copy bw  {r['tflops']:7.1f} "
                      f"TFLOP/s  (compile+first {compile_s:.1f} s)", flush=True)
        del w1, w2, w3, bf16
    print("\n| model | tokens | impl | time (us) | experts | MB | floor (us) | % copy bw | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['T']} | {r['impl']} | {r['us']:.1f} | {r['touched']:.1f} | {r['MB']:.1f} | "
              f"{r['floor_us']:.1f} | {100 * r['bw_frac']:.1f} | {r['tflops']:.1f} |")
    ref = {(r["model"], r["T"]): r["us"] for r in rows if r["impl"] == "reference"}
    for r in rows:
        if r["impl"] == "triton" and (r["model"], r["T"]) in ref:
            print(f"speedup vs reference {r['model']} T={r['T']}: {ref[(r['model'], r['T'])] / r['us']:.1f}x")


if __name__ == "__main__":
    main()
