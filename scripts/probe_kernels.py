#!/usr/bin/env python
"""One kernel call on torch CUDA tensors: its device time per plan, or plain launches for Nsight Compute (``ncu``).

The kernels are launched straight from torch through their torch launchers (``run_torch``: no JAX, no XLA custom
call), so ``ncu`` sees exactly the kernel's launches, and a CUDA graph replay times them without host launch cost.
Inputs are random, at V4-Flash shapes:

* ``--op attn``: sparse-attention decode (``sparse_attention_torch.run_torch``), 64 heads of 512 dims over the
  stored FP8 cache layout (448 e4m3 codes + 7 e8m0 scales + 64 bf16 RoPE dims per entry), for a CSA layer (window
  128 + 512 selected compressed entries) or an HCA layer (window 128 + every compressed entry) at ``--context``;
* ``--op mhc``: mHC's ``hc_pre`` with the block's norm (``mhc.run_torch``: split-K mixes, then the finish kernel),
  hc = 4 streams of 4096, ``--batch`` tokens;
* ``--op moe``: the FP4 MoE decode GEMV (:func:`fp4_moe_gemv.launch_gemv_torch`: both stages, both activation
  kernels) for ``--batch`` tokens of 6 experts each; plan overrides are :func:`fp4_moe_gemv.gemv_tiles` entries;
  ``MMA=1`` takes the tensor-core GEMV of :mod:`fp4_moe_mma` instead (:func:`fp4_moe_mma.launch_mma_torch`, the
  same four launches; overrides are :func:`fp4_moe_mma.mma_tiles` entries, ``F8=1`` its e4m3 dots); ``ASYNC=1``
  the Gluon GEMV of :mod:`fp4_moe_gemv_async` (overrides: ``NS``, ``NG1``, ``NG2``, ``GT``, ``num_warps``); ``PF=n``
  the FMA GEMV's L2 prefetches ``n`` steps ahead;
* ``--op fp8``: the FP8 GEMV (``fp8_linear.run_gemv_torch`` on a bf16 activation, ``x32=1`` an fp32 one; the
  split-K partials summed by torch) for ``--batch`` rows at the V4-Flash weights named by ``--weight``; plan
  overrides are :func:`fp8_linear.gemv_plan`'s keywords (``block_n``, ``nb``, ``per_sm``, ``num_warps``,
  ``num_stages``, and the opt-in ``pf``, ``xl``, ``ra``).

    python scripts/probe_kernels.py --op attn --batch 32 --context 131072 --kind csa --tiles ';num_stages=1'
    python scripts/probe_kernels.py --op attn --kind hca --context 1048576 --scale-stride 8 --tiles \
        ';S8=1,BK=64,num_stages=3;S8=1,BK=64,num_stages=2;S8=1,BK=32,num_stages=4'
    python scripts/probe_kernels.py --op mhc --batch 1 --tiles ';warps2=4;warps2=2'
    python scripts/probe_kernels.py --op fp8 --batch 1 --weight wo_b --tiles ';block_n=32;nb=4'
    ncu --clock-control none --kernel-name regex:_sparse_attn --launch-skip 2 --launch-count 1 \\
        --section WarpStateStats --section SchedulerStats --section SpeedOfLight --section SourceCounters \\
        python scripts/probe_kernels.py --op attn --batch 32 --context 131072 --kind csa --ncu --iters 3

Times include the launchers' NaN fills of their outputs and workspaces (a few us at most). ``--copy`` first times a
2 GiB torch device copy (4 GiB moved), the card's copy bandwidth in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the modules import jax: keep it off the memory
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton.testing  # noqa: E402

from dsv4_jax.kernels import fp4_moe_gemv, fp4_moe_gemv_async, fp4_moe_mma, fp8_linear, mhc  # noqa: E402
from dsv4_jax.kernels import sparse_attention as sa  # noqa: E402
from dsv4_jax.kernels import sparse_attention_torch as sa_torch  # noqa: E402

H, DH, DN, W = 64, 512, 448, 128  # V4-Flash attention
HC, D, NMIX = 4, 4096, 24  # V4-Flash mHC
# V4-Flash FP8 weights at decode: (groups, N, K) of each linear
FP8_WEIGHTS = dict(wq_a=(1, 1024, 4096), wq_b=(1, 32768, 1024), wkv=(1, 512, 4096), wo_a=(8, 1024, 4096),
                   wo_b=(1, 4096, 8192), w13=(1, 2048, 4096), w2=(1, 4096, 2048), idx_wq_b=(1, 8192, 1024))


def attn_case(args, g):
    """(launcher of a plan, bytes read, description) for one sparse-attention decode call."""
    B, nc = args.batch, args.context // (4 if args.kind == "csa" else 128)

    def cache(n):
        codes = (torch.randn(B, n, DN, device="cuda", generator=g) * 64).to(torch.float8_e4m3fn)
        scales = torch.full((B, n, args.scale_stride), 123, dtype=torch.uint8, device="cuda")
        return codes, scales, torch.randn(B, n, DH - DN, device="cuda", generator=g).to(torch.bfloat16)

    sources = [cache(W), cache(1), cache(nc)]
    q = torch.randn(B, 1, H, DH, device="cuda", generator=g).to(torch.bfloat16)
    win = torch.arange(W, device="cuda").expand(B, W)
    if args.kind == "csa":
        sel = torch.stack([torch.randperm(nc, device="cuda", generator=g)[:min(512, nc)] for _ in range(B)])
    else:
        sel = torch.arange(nc, device="cuda").expand(B, nc)
    idx = torch.cat([win, sel + W + 1], -1).to(torch.int32)[:, None, :].contiguous()
    sink = torch.randn(H, device="cuda", generator=g)
    K = idx.shape[-1]

    def launcher(over):
        if over.pop("WS", 0):  # the warp-specialised Gluon kernel (sm_90), its own plan with these overrides
            from dsv4_jax.kernels import sparse_attention_ws as sa_ws

            p = sa_ws.plan(B, H, K, 132, over)
            return (lambda: sa_ws.run_torch(q, sources, idx, sink, W, nc, DH**-0.5, p)), p
        p = sa.plan(H, DH, "sm90", rows=B, K=K, tiles=over)
        return (lambda: sa_torch.run_torch(q, sources, True, idx, sink, W, nc, DH**-0.5, p)), p

    nbytes = B * K * (DN + DN // 64 + 2 * (DH - DN))
    return launcher, nbytes, f"{args.kind} ctx {args.context} batch {B} K {K}"


def mhc_case(args, g):
    """(launcher of a plan, bytes read, description) for one ``hc_pre`` + norm call."""
    T = args.batch
    h = torch.randn(T, HC, D, device="cuda", generator=g).to(torch.bfloat16)
    fn = torch.randn(NMIX, HC * D, device="cuda", generator=g) * 1e-2
    scale, base = torch.rand(3, device="cuda", generator=g), torch.randn(NMIX, device="cuda", generator=g)
    norm_w = torch.rand(D, device="cuda", generator=g)

    def launcher(over):
        p = {**mhc.plan(T, HC, D, "sm90", norm=True), **over}
        return (lambda: mhc.run_torch(h, fn, scale, base, 1e-6, 1e-6, 20, p, norm_w)), p

    return launcher, fn.numel() * 4 + h.numel() * 2, f"mhc tokens {T}"


def fp8_case(args, g):
    """(launcher of a plan, bytes read, description) for one FP8 GEMV call on a bf16 activation, as the model
    launches it."""
    G, N, K = FP8_WEIGHTS[args.weight]
    x = torch.randn(args.batch, G, K, device="cuda", generator=g).to(torch.bfloat16)
    wq = (torch.randn(G * N, K, device="cuda", generator=g) * 64).to(torch.float8_e4m3fn)
    ws = torch.randint(118, 124, ((G * N + 127) // 128, (K + 127) // 128), device="cuda", generator=g,
                       dtype=torch.uint8)

    def launcher(over):
        xv = x.float() if over.pop("x32", 0) else x  # x32=1: the activation in fp32 (no bf16 -> fp32 per weight)
        p = fp8_linear.gemv_plan(args.batch, N, K, G, 132, **over)
        return (lambda: fp8_linear.run_gemv_torch(xv, wq, ws, G, torch.bfloat16, p)), p

    return launcher, wq.numel() + ws.numel(), f"fp8 {args.weight} rows {args.batch} G {G} N {N} K {K}"


def moe_case(args, g):
    """(launcher of a plan, bytes read, description) for one FP4 MoE decode GEMV call (both stages and the two
    activation kernels, ``fp4_moe_gemv.launch_gemv_torch``): ``--batch`` tokens x 6 experts of a 64-expert slice of
    V4-Flash's stack (random packed e2m1 bytes, e8m0 scales 118-123)."""
    T, E, k = args.batch, 64, 6
    D, I = 4096, 2048

    def fp4(rows, cols):
        return (torch.randint(0, 256, (E, rows, cols // 2), device="cuda", generator=g, dtype=torch.uint8),
                torch.randint(118, 124, (E, rows, cols // 32), device="cuda", generator=g, dtype=torch.uint8))

    w1, w2, w3 = fp4(I, D), fp4(D, I), fp4(I, D)
    x = torch.randn(T, D, device="cuda", generator=g).to(torch.bfloat16)
    tok = torch.arange(T, device="cuda", dtype=torch.int32).repeat_interleave(k)
    e = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(T)]).reshape(-1).to(torch.int32)
    wt = torch.rand(T * k, device="cuda", generator=g)
    touched = len(torch.unique(e))

    def launcher(over):
        if over.pop("ASYNC", 0):  # the Gluon GEMV with its weights copied ahead (fp4_moe_gemv_async)
            p1, p2 = fp4_moe_gemv_async.plans(D, I, T * k, over)
            return (lambda: fp4_moe_gemv_async.launch_torch(x, tok, wt, e, w1, w2, w3, 10.0, p1, p2)), (p1, p2)
        if over.pop("MMA", 0):  # the tensor-core GEMV (both stages, both activation kernels)
            t = {**fp4_moe_mma.mma_tiles("sm90", D, I), **over}
            return (lambda: fp4_moe_mma.launch_mma_torch(x, tok, wt, e, w1, w2, w3, 10.0, t, interpret=False)), t
        t = {**fp4_moe_gemv.gemv_tiles("sm90", D, I, T * k), **over}
        return (lambda: fp4_moe_gemv.launch_gemv_torch(x, tok, wt, e, w1, w2, w3, 10.0, t)), t

    nbytes = touched * sum(a[0].numel() + a[1].numel() for a in (w1, w2, w3)) // E
    return launcher, nbytes, f"moe gemv tokens {T} pairs {T * k} experts {touched}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", default="attn", choices=["attn", "mhc", "fp8", "moe"])
    ap.add_argument("--weight", default="wo_b", choices=sorted(FP8_WEIGHTS), help="fp8: which V4-Flash weight")
    ap.add_argument("--batch", type=int, default=32, help="query rows (attn), tokens (mhc) or rows (fp8)")
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--kind", default="csa", choices=["csa", "hca"])
    ap.add_argument("--scale-stride", type=int, default=DN // 64, help="attn: bytes per entry's scale row (8: padded "
                    "to 8 bytes, what the S8 plan reads as one vector: --tiles 'S8=1,BK=64,num_stages=3')")
    ap.add_argument("--tiles", default="", help="plan overrides, e.g. 'BK=32,num_stages=2' (; separates plans)")
    ap.add_argument("--iters", type=int, default=20, help="ms of graph replays (timing), or launches (--ncu)")
    ap.add_argument("--ncu", action="store_true", help="launch --iters times without timing (run under ncu)")
    ap.add_argument("--copy", action="store_true", help="first time a 2 GiB torch copy (the card's copy bandwidth)")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    if args.copy:  # 2 GiB read + 2 GiB written: the floor's bandwidth on this card, in this run
        src = torch.empty(1 << 31, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        ms = triton.testing.do_bench(lambda: dst.copy_(src), rep=200, return_mode="median")
        print(f"torch copy of 2 GiB: {2 * src.numel() / ms / 1e9:.3f} TB/s (read + write)", flush=True)
        del src, dst
    launcher, nbytes, what = dict(attn=attn_case, mhc=mhc_case, fp8=fp8_case, moe=moe_case)[args.op](args, g)
    for text in args.tiles.split(";"):
        try:  # a plan that does not build (shared memory, registers) is reported; the others still run
            run, p = launcher({k: int(v) for k, v in (kv.split("=") for kv in text.split(",") if kv)})
            run()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001
            print(f"{what} plan {text or 'default'}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        if args.ncu:  # plain launches for ncu to catch (its replay times each kernel)
            for _ in range(args.iters):
                run()
            torch.cuda.synchronize()
            continue
        us = triton.testing.do_bench_cudagraph(run, rep=args.iters, return_mode="median") * 1e3
        print(f"{what} plan {text or 'default'} {p}: {us:.1f} us (CUDA graph, median), {nbytes / 1e6:.2f} MB read, "
              f"{nbytes / us / 1e6:.3f} TB/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
