#!/usr/bin/env python
"""Kernel benchmarks at V4-Flash / V4-Pro shapes: each op's Triton path beside its XLA reference.

For every op, shape and row count: median time per call (jitted, weights rotated through enough copies to be read
from HBM), the bytes a call must move (weight codes + scales, activation in, output out), the achieved bandwidth as
a fraction of the copy bandwidth measured in the same run (decode rows), or TFLOP/s as a fraction of XLA's plain
e4m3 matmul at 8192^3 (prefill rows), and the reference path's time.

    python scripts/bench_kernels.py                       # all ops, flash + pro, rows 1,4,16,64,2048
    python scripts/bench_kernels.py --ops fp8_linear --models flash --rows 1,16 --shapes wq_b,wo_b

Ops register in ``OPS`` (name -> bench function(model tag, cfg, rows list, rates, args) -> table rows); other
benchmark scripts (``bench_moe.py``) reuse ``bench_common``.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_common import card_rates, copies_for, print_rates, table, time_rotating  # noqa: E402

from dsv4_jax.config import Config  # noqa: E402
from dsv4_jax.kernels import arch  # noqa: E402
from dsv4_jax.kernels.fp8_linear import (  # noqa: E402
    GEMV_ROWS,
    SM_COUNT,
    _fp8_linear_triton,
    _grouped_triton,
    decode_plan,
    fp8_linear,
    gemv_plan,
    grouped_proj,
    plan,
)
from dsv4_jax.kernels.fp8_prefill import split_plan  # noqa: E402
from dsv4_jax.modeling.quant import Fp8Tensor, dequant  # noqa: E402

PREFILL_ROWS = 256  # row counts above this are reported as prefill (TFLOP/s), below as decode (bandwidth)


def fp8_shapes(cfg: Config) -> dict[str, tuple[int, int, int]]:
    """name -> (G groups, N rows per group, K) of the model's FP8 GEMMs (weight declarations of weights.py)."""
    D, H, Dh, G = cfg.dim, cfg.n_heads, cfg.head_dim, cfg.o_groups
    return {"wq_a": (1, cfg.q_lora_rank, D), "wq_b": (1, H * Dh, cfg.q_lora_rank), "wkv": (1, Dh, D),
            "wo_b": (1, D, G * cfg.o_lora_rank), "shared_w1": (1, cfg.moe_inter_dim, D),
            "shared_w2": (1, D, cfg.moe_inter_dim),
            "index_wq_b": (1, cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank),
            "wo_a": (G, cfg.o_lora_rank, H * Dh // G)}


def random_fp8(key, rows: int, k: int) -> Fp8Tensor:
    """A random FP8 weight ``[rows, k]`` (codes from a normal draw, scales around 2**-8)."""
    q = (jax.random.normal(key, (rows, k), jnp.float32) * 64).astype(jnp.float8_e4m3fn)
    s = jnp.full((-(-rows // 128), -(-k // 128)), 119, jnp.uint8)
    return Fp8Tensor(q=q, scale=s)


def _op(w: Fp8Tensor, x: jax.Array, grouped: bool, kernels: str) -> jax.Array:
    if grouped:
        return grouped_proj(x, w, jnp.bfloat16, kernels=kernels)
    return fp8_linear(x, w, jnp.bfloat16, kernels=kernels)


def bench_fp8(tag: str, cfg: Config, rows_list, rates, args, grouped: bool) -> list[dict]:
    out = []
    for name, (G, N, K) in fp8_shapes(cfg).items():
        if (name == "wo_a") != grouped or (args.shapes and name not in args.shapes):
            continue
        wbytes = G * N * K + G * (-(-N // 128)) * (-(-K // 128))
        n_copies = copies_for(wbytes, limit=args.max_copies)
        keys = jax.random.split(jax.random.key(1), n_copies)
        ws = [random_fp8(k, G * N, K) for k in keys]
        for M in rows_list:
            x = jax.random.normal(jax.random.key(M), (M, G, K) if grouped else (M, K), jnp.float32)
            x = x.astype(jnp.bfloat16)
            abytes = M * G * K * 2  # bf16 in (quantized inside the call for fp8_linear)
            nbytes = wbytes + abytes + M * G * N * 2
            w_use = ws if M <= PREFILL_ROWS else ws[:2]
            t_tri, t_ref = (time_rotating(partial(_op, grouped=grouped, kernels=kn), w_use, x, trials=args.trials)
                            for kn in ("triton", "reference"))
            p = plan(M, N, K, G)
            row = {"model": tag, "op": name, "rows": M, "N": G * N, "K": K, "split": p.get("SPLIT", 1),
                   "MB": nbytes / 1e6, "triton_us": t_tri * 1e6, "ref_us": t_ref * 1e6,
                   "speedup": t_ref / t_tri}
            if M <= PREFILL_ROWS:
                bw = nbytes / t_tri
                row.update(floor_us=nbytes / rates["copy_best"] * 1e6, TBps=bw / 1e12,
                           frac=bw / rates["copy_best"])
            else:
                fl = 2.0 * M * G * N * K / t_tri
                row.update(TFLOPs=fl / 1e12, frac=fl / rates["fp8_matmul_xla"])
            out.append(row)
            print(table([row], list(row)).splitlines()[-1], flush=True)
        del ws
    return out


def tune(rates, args) -> None:
    """Kernel-plan candidates at a few V4-Flash shapes (``--tune-rows``: GEMV and the K-split weight-stationary
    tensor-core kernel up to GEMV_ROWS rows, the tensor-core decode plans up to 64, prefill above): time per call."""
    cfg, sms = Config.v4_flash(), SM_COUNT[arch()]
    gemv = [dict(block_n=bn, nb=nb, per_sm=ps, num_warps=nw, num_stages=st) for bn, nb, ps, nw, st in
            ((16, 2, 8, 4, 3), (32, 2, 8, 4, 3), (16, 4, 8, 4, 3), (8, 4, 8, 4, 3), (16, 2, 4, 4, 4), (32, 4, 4, 8, 3),
             (16, 1, 16, 4, 4))]
    dec = [dict(block_n=bn, per_sm=ps, num_stages=st) for bn, ps, st in
           ((64, 2, 4), (64, 4, 4), (64, 8, 4), (128, 4, 4), (128, 8, 3), (32, 8, 4))]
    wxd = [dict(block_n=bn, per_sm=ps, num_warps=nw, num_stages=st) for bn, ps, nw, st in  # fp8_prefill, split K
           ((128, 2, 8, 4), (64, 4, 4, 4), (128, 4, 8, 3), (64, 2, 4, 4))]
    pre = [dict(WX=True, BLOCK_N=bn, BLOCK_M=bm, BK=bk, GROUP_N=8, num_warps=nw, num_stages=st)  # fp8_prefill
           for bn, bm, bk, nw, st in ((128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
                                      (128, 256, 64, 8, 4), (128, 128, 128, 8, 3))]
    pre.append(dict(BLOCK_M=128, BLOCK_N=128, SPLIT=1, GROUP_M=8, num_warps=8, num_stages=4))  # the former kernel
    rows = []
    for name in ("wq_a", "wq_b", "wo_b", "shared_w1", "wo_a"):
        G, N, K = fp8_shapes(cfg)[name]
        wbytes = G * N * K
        ws = [random_fp8(k, G * N, K) for k in jax.random.split(jax.random.key(1), copies_for(wbytes, 48))]
        for M in map(int, args.tune_rows.split(",")):
            x = jax.random.normal(jax.random.key(M), (M, G, K) if G > 1 else (M, K), jnp.float32).astype(jnp.bfloat16)
            cands = ([gemv_plan(M, N, K, G, sms, **c) for c in gemv] + [split_plan(M, N, K, G, sms, **c) for c in wxd]
                     if M <= GEMV_ROWS else
                     [decode_plan(M, N, K, G, sms, **c) for c in dec] +
                     [split_plan(M, N, K, G, sms, **c) for c in wxd] if M <= 64 else
                     [c if c.get("WX") else dict(KPS=-(-K // 128), **c) for c in pre])
            if M > 64:  # the ceiling of an exact (bf16) tensor-core GEMM here: XLA's bf16 matmul on a bf16 copy
                wb = [dequant(w).astype(jnp.bfloat16).reshape((G, N, K) if G > 1 else (N, K)) for w in ws[:2]]
                spec = "mgk,gnk->mgn" if G > 1 else "mk,nk->mn"
                t = time_rotating(lambda w, x, spec=spec: jnp.einsum(spec, x, w), wb, x, trials=args.trials)
                r = {"op": name, "rows": M, "plan": "XLA bf16 matmul (bf16 weight copy)", "us": t * 1e6,
                     "frac_mm": (2.0 * M * G * N * K / t) / rates["fp8_matmul_xla"]}
                rows.append(r)
                print(table([r], list(r)).splitlines()[-1], flush=True)
                del wb
            y_ref = np.asarray(_op(ws[0], x, G > 1, "reference"), np.float32)  # each candidate's output checked
            for p in cands:
                if G > 1:
                    f = lambda w, x, p=p: _grouped_triton(x, w, jnp.bfloat16, p)
                else:
                    f = lambda w, x, p=p: _fp8_linear_triton(x, w, jnp.bfloat16, None, p)
                try:
                    t = time_rotating(f, ws if M <= 64 else ws[:2], x, trials=args.trials)
                    err = np.max(np.abs(np.asarray(jax.jit(f)(ws[0], x), np.float32) - y_ref))
                except Exception as e:  # a candidate that does not compile (shared memory) is reported, not fatal
                    print(f"{name} M={M} {p}: {type(e).__name__} {str(e)[:200]}", flush=True)
                    continue
                r = {"op": name, "rows": M, "plan": " ".join(f"{k}={v}" for k, v in p.items()), "us": t * 1e6,
                     "rel_err": err / max(float(np.max(np.abs(y_ref))), 1e-30)}  # bf16 outputs: ~2**-8 at most
                if M <= 64:
                    r["frac_copy"] = (wbytes / t) / rates["copy_best"]
                else:
                    r["frac_mm"] = (2.0 * M * G * N * K / t) / rates["fp8_matmul_xla"]
                rows.append(r)
                print(table([r], list(r)).splitlines()[-1], flush=True)
        del ws
    print("\n" + table(rows, ["op", "rows", "plan", "us", "frac_copy", "frac_mm", "rel_err"]))


OPS = {
    "fp8_linear": lambda *a: bench_fp8(*a, grouped=False),
    "wo_a_grouped": lambda *a: bench_fp8(*a, grouped=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma list of {list(OPS)}")
    ap.add_argument("--models", default="flash,pro")
    ap.add_argument("--rows", default="1,4,16,64,2048")
    ap.add_argument("--shapes", default="", help="comma list of shape names (default: all)")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--max-copies", type=int, default=48)
    ap.add_argument("--tune", action="store_true", help="time kernel-plan candidates instead (a few Flash shapes)")
    ap.add_argument("--tune-rows", default="1,4,16,2048", help="row counts of --tune")
    args = ap.parse_args()
    args.shapes = [s for s in args.shapes.split(",") if s]
    rows_list = [int(r) for r in args.rows.split(",")]
    rates = card_rates()
    print_rates(rates)
    if args.tune:
        return tune(rates, args)
    cfgs = {"flash": Config.v4_flash(), "pro": Config.v4_pro()}
    results = []
    for op in args.ops.split(","):
        if op not in OPS:
            raise SystemExit(f"--ops: unknown op {op!r}, expected some of {list(OPS)}")
        for tag in args.models.split(","):
            results += OPS[op](tag, cfgs[tag], rows_list, rates, args)
    cols = ["model", "op", "rows", "N", "K", "split", "MB", "triton_us", "floor_us", "TBps", "TFLOPs", "frac",
            "ref_us", "speedup"]
    print("\n" + table(results, cols))
    dec = [r for r in results if r["rows"] <= 16]
    if dec:
        print(f"decode rows 1-16: median fraction of copy bandwidth {np.median([r['frac'] for r in dec]):.2f}")


if __name__ == "__main__":
    main()
