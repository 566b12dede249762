#!/usr/bin/env python
"""Sparse-attention decode at long contexts, and chunked prefill of one layer with its peak memory.

``--mode decode``: one V4-Flash attention call per query row over the stored cache layout (FP8 codes + scales + bf16
RoPE dims, 584 bytes per entry), for a CSA layer (window 128 + the indexer's top-512 compressed entries) and an HCA
layer (window 128 + every compressed entry: context/128 of them) at each ``--contexts``; the Triton kernel beside
the XLA reference. Bytes = the entries each row gathers (+ q and o); the fraction is against the best copy
bandwidth measured in the same run (``bench_common.card_rates``). ``n`` calls on different caches run in one jitted
program (no host round trips; caches rotate so reads come from HBM).

``--mode indexer``: the lightning indexer's decode call of a CSA layer (``indexer_topk``: scores of the query row
against every visible compressed key, ``ctx / 4`` of them in the FP4 layout, then the top-512) at each ``--contexts``,
the XLA path beside the Triton scoring kernel, each with the top-k in two levels at each ``--topk-blocks`` (0: one
``top_k``; two levels apply from 8 rows on), checked to select the same ids; bytes = the key cache each row reads.

``--mode prefill``: real-shape V4-Flash layers (``bench_decode.flash_layers``: CSA, HCA, ...) with random weights,
a prompt of ``--prefill-len`` tokens fed in chunks of ``--chunk`` tokens (the state sized for the whole prompt plus
``--decode`` steps), tokens/s per layer per chunk size, then decode steps after it, and the device's peak memory.

    python scripts/bench_attention.py --mode decode --contexts 4096,32768,131072,1048576
    python scripts/bench_attention.py --mode decode --batch 32 --contexts 131072,1048576 \
        --variants "BK=32,num_stages=2;num_warps=4"             # other plans, timed beside the default
    python scripts/bench_attention.py --mode indexer --batch 32 --contexts 4096,32768,131072,1048576
    python scripts/bench_attention.py --mode prefill --prefill-len 131072 --chunk 8192 --layers 2
    python scripts/bench_attention.py --mode prefill --chunk 65536 --profile /tmp/trace   # last chunk, per scope
    python scripts/bench_attention.py --mode decode --contexts 1024 --heads 4 --calls 2   # CPU smoke tests
    python scripts/bench_attention.py --mode prefill --model tiny --prefill-len 512 --chunk 128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_common import card_rates, copies_for, op_scopes, print_rates, scope_table, time_call  # noqa: E402

import dsv4_jax as d  # noqa: E402
from dsv4_jax.kernels import indexer as indexer_mod  # noqa: E402
from dsv4_jax.kernels import indexer_ref, triton_unavailable  # noqa: E402
from dsv4_jax.kernels import sparse_attention as sa_mod  # noqa: E402
from dsv4_jax.kernels.indexer import indexer_topk  # noqa: E402
from dsv4_jax.kernels.sparse_attention import (  # noqa: E402
    PER_SM,
    plan,
    sparse_attention_reference,
    sparse_attention_triton,
)
from dsv4_jax.modeling.attention import window_indices  # noqa: E402
from dsv4_jax.modeling.quant import Fp4Tensor, Fp8Cache  # noqa: E402


def random_cache(key, B: int, n: int, dn: int, dr: int) -> Fp8Cache:
    """Random entries in the stored FP8 layout (codes from a normal draw, scales around 2**-4)."""
    k1, k2 = jax.random.split(key)
    codes = (jax.random.normal(k1, (B, n, dn)) * 64).astype(jnp.float8_e4m3fn)
    return Fp8Cache(codes=codes, scales=jnp.full((B, n, dn // 64), 123, jnp.uint8),
                    rope=jax.random.normal(k2, (B, n, dr)).astype(jnp.bfloat16))


def decode_case(cfg, B: int, ctx: int, kind: str, key):
    """Inputs of one decode call at context ``ctx``: q, ring, chunk, compressed cache, index lists, sink."""
    H, Dh, W, dr = cfg.n_heads, cfg.head_dim, cfg.window_size, cfg.rope_head_dim
    ratio = 4 if kind == "csa" else 128
    nc = ctx // ratio
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (B, 1, H, Dh)).astype(jnp.bfloat16)
    ring, chunk, comp = (random_cache(k, B, n, Dh - dr, dr) for k, n in zip(ks[1:4], (W, 1, nc)))
    pos = jnp.full((B,), ctx - 1, jnp.int32)
    win = window_indices(pos, 1, W)  # [B,1,W]
    if kind == "csa":
        sel = jax.vmap(lambda k: jax.random.choice(k, nc, (min(cfg.index_topk, nc),), replace=False))(
            jax.random.split(ks[4], B))[:, None, :]
    else:
        sel = jnp.broadcast_to(jnp.arange(nc)[None, None, :], (B, 1, nc))
    idx = jnp.concatenate([win, (sel + W + 1).astype(jnp.int32)], -1)
    sink = jax.random.normal(ks[5], (H,), jnp.float32)
    return q, ring, chunk, comp, idx, sink


def parse_variants(text: str) -> list[dict]:
    """``'BH=64,DC=256;num_warps=4'`` -> ``[{"BH": 64, "DC": 256}, {"num_warps": 4}]`` (overrides of
    :func:`sparse_attention.plan`, each timed as one more Triton row; any plan key: tiles, launch options, and
    ``BPS`` / ``PER_SM`` below)."""
    return [{k: int(v) for k, v in (kv.split("=") for kv in part.split(","))} for part in text.split(";") if part]


def plan_variant(cfg, rows: int, K: int, over: dict) -> dict:
    """The GPU plan with ``over``'s tile entries; ``BPS`` (blocks per split) and ``PER_SM`` (programs per SM the split
    aims at, e.g. 2 with 4-warp programs) size the split (:func:`sparse_attention.plan`)."""
    over = dict(over)
    bps, per_sm = over.pop("BPS", None), over.pop("PER_SM", PER_SM)
    return plan(cfg.n_heads, cfg.head_dim, rows=rows, K=K, bps=bps, per_sm=per_sm, tiles=over)


def bench_decode(cfg, args, rates) -> list[dict]:
    impls = ["reference"] + (["triton"] if triton_unavailable() is None else [])
    impls += [f"triton[{v}]" for v in (args.variants.split(";") if args.variants and len(impls) > 1 else [])]
    rows = []
    for ctx in map(int, args.contexts.split(",")):
        for kind in ("csa", "hca"):
            one = decode_case(cfg, args.batch, ctx, kind, jax.random.key(ctx))
            K = one[4].shape[-1]
            dn = cfg.head_dim - cfg.rope_head_dim
            entry = dn + dn // 64 + 2 * cfg.rope_head_dim  # stored bytes per entry (583 for V4)
            nbytes = args.batch * (K * entry + 2 * 2 * cfg.n_heads * cfg.head_dim)
            n = min(args.calls, copies_for(nbytes, args.calls))
            cases = [decode_case(cfg, args.batch, ctx, kind, jax.random.key(ctx * 7 + i)) for i in range(n)]
            sc = cfg.head_dim**-0.5
            for impl in impls:
                if impl == "reference":
                    op = lambda c, sc=sc: sparse_attention_reference(*c[:5], c[5], sc, jnp.bfloat16)  # noqa: E731
                else:
                    over = parse_variants(impl[7:-1])[0] if "[" in impl else {}
                    ws = bool(over.pop("WS", 0))  # the warp-specialised Gluon kernel (sparse_attention.WS)
                    p = None if ws else plan_variant(cfg, args.batch, K, over)
                    op = lambda c, sc=sc, p=p: sparse_attention_triton(*c[:5], c[5], sc, p)  # noqa: E731
                fn = jax.jit(lambda cs, op=op: [op(c) for c in cs])
                ws_default, sa_mod.WS = sa_mod.WS, impl != "reference" and ws  # "triton" alone: the portable kernel
                t = time_call(fn, cases, trials=args.trials, warmup=1) / n
                sa_mod.WS = ws_default
                r = dict(context=ctx, layer=kind, impl=impl, entries=K, MB=nbytes / 1e6, us=t * 1e6,
                         frac_copy=nbytes / t / rates["copy_best"], device=rates["device"])
                rows.append(r)
                print(f"ctx {ctx:8d} {kind} {impl:24s} {K:6d} entries/row  {r['MB']:8.2f} MB  {r['us']:9.1f} us  "
                      f"{100 * r['frac_copy']:5.1f}% of copy bw", flush=True)
            del cases
    return rows


def indexer_case(cfg, B: int, ctx: int, key):
    """Inputs of one indexer decode call at context ``ctx`` (a CSA layer: ``ctx / 4`` compressed entries, all
    visible): q ``[B,1,Hi,Di]``, head weights ``[B,1,Hi]``, the FP4 key cache (random e2m1 bytes, e8m0 scales around
    1), positions."""
    Hi, Di, nc = cfg.index_n_heads, cfg.index_head_dim, ctx // 4
    ks = jax.random.split(key, 4)
    q = jax.random.normal(ks[0], (B, 1, Hi, Di)).astype(jnp.bfloat16)
    hw = (jax.random.normal(ks[1], (B, 1, Hi)) * Hi**-0.5).astype(jnp.bfloat16)
    keys = Fp4Tensor(packed=jax.random.randint(ks[2], (B, nc, Di // 2), 0, 256).astype(jnp.uint8),
                     scale=jax.random.randint(ks[3], (B, nc, Di // 32), 125, 129).astype(jnp.uint8))
    return q, hw, keys, jnp.full((B, 1), ctx - 1, jnp.int32)


def bench_indexer(cfg, args, rates) -> list[dict]:
    """The indexer's decode call (scores of every visible compressed key + top-k) at each context: the XLA path
    (``kernels="reference"``) and, where Triton runs, the scoring kernel (``kernels="triton"``: one kernel for the
    totals, then the top-k), for every ``--topk-blocks`` value: ``radix`` (the radix-selection kernels,
    ``kernels/topk.py``) or a number (``jax.lax.top_k`` in two levels with ``indexer_ref.TOPK_BLOCK`` set to it; it
    applies from ``indexer_ref.TOPK_MIN_ROWS`` rows on), each checked to select the ids of the first. Bytes = the FP4
    key cache each row reads (``Di / 2`` codes + ``Di / 32`` scales per entry)."""
    impls = [m for m in args.impls.split(",") if m == "reference" or triton_unavailable() is None]
    rows, default_block, use_radix = [], indexer_ref.TOPK_BLOCK, indexer_mod.topk.use_kernel
    for ctx in map(int, args.contexts.split(",")):
        nc = ctx // 4
        nbytes = args.batch * nc * (cfg.index_head_dim // 2 + cfg.index_head_dim // 32)
        n = min(args.calls, copies_for(nbytes, args.calls))
        cases = [indexer_case(cfg, args.batch, ctx, jax.random.key(ctx * 7 + i)) for i in range(n)]
        for impl in impls:
            first = None
            variants = args.topk_blocks.split(",")
            for tb in variants[:None if impl != "reference" else 1]:  # the XLA path: no top-k variants
                radix = tb == "radix"  # both read when the op is traced: one program per value
                indexer_mod.topk.use_kernel = use_radix if radix else (lambda kernels, n: False)
                indexer_ref.TOPK_BLOCK = default_block if radix else int(tb)
                op = lambda c, impl=impl: indexer_topk(*c, cfg.index_topk, kernels=impl)  # noqa: E731
                fn = jax.jit(lambda cs, op=op: [op(c) for c in cs])
                t = time_call(fn, cases, trials=args.trials, warmup=1) / n
                ids = np.asarray(fn(cases)[0])
                if first is None:
                    first = ids
                same = bool((ids == first).all())  # every top-k block size selects the same ids
                name = f"{impl}[topk {tb}]"
                r = dict(mode="indexer", context=ctx, batch=args.batch, impl=name, entries=nc, MB=nbytes / 1e6,
                         us=t * 1e6, frac_copy=nbytes / t / rates["copy_best"], same_ids=same,
                         device=rates["device"])
                rows.append(r)
                print(f"indexer ctx {ctx:8d} batch {args.batch:3d} {name:22s} {nc:7d} keys/row  {r['MB']:8.2f} MB  "
                      f"{r['us']:9.1f} us  {100 * r['frac_copy']:5.1f}% of copy bw  same ids: {same}", flush=True)
        indexer_ref.TOPK_BLOCK, indexer_mod.topk.use_kernel = default_block, use_radix
        del cases
    return rows


def bench_prefill(args) -> list[dict]:
    from bench_decode import flash_layers

    from dsv4_jax.modeling.model import forward_jit

    cfg = flash_layers(args.layers, "reference") if args.model == "flash" else d.Config.tiny()
    cfg = cfg.with_(kernels=args.kernels)
    indexer_mod.PREFILL_RADIX_AUTO = not args.prefill_merge  # read when the step is traced
    sa_mod.PREFILL_AUTO = not args.attn_prefill_reference  # read when the step is traced
    w = d.init_weights(cfg, jax.random.key(0))
    L, C = args.prefill_len, args.chunk
    state = d.init_state(cfg, 1, L + args.decode)
    toks = jnp.asarray(np.random.default_rng(0).integers(2, cfg.vocab_size, (1, L + args.decode)), jnp.int32)
    step = jax.jit(lambda w, t, s: forward_jit(w, cfg, t, s, return_logits="last"), donate_argnums=2)
    times, prof = [], None
    for c0 in range(0, L, C):
        traced = args.profile and c0 + C >= L and c0 > 0  # the last chunk, warm
        if traced:
            jax.profiler.start_trace(args.profile)
        t0 = time.perf_counter()
        logits, state = step(w, toks[:, c0:c0 + C], state)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t0)
        if traced:
            jax.profiler.stop_trace()
            hlo = step.lower(w, toks[:, c0:c0 + C], state).compile().as_text()  # the program just traced
            prof = scope_table(Path(args.profile), op_scopes(hlo))
        print(f"prefill chunk at {c0:8d}: {times[-1] * 1e3:9.1f} ms", flush=True)
    dec = []
    for k in range(args.decode):
        t0 = time.perf_counter()
        logits, state = step(w, toks[:, L + k:L + k + 1], state)
        jax.block_until_ready(logits)
        dec.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    warm = times[1:] or times  # the first chunk includes compilation
    r = dict(mode="prefill", model=args.model, kernels=args.kernels, prefill_radix=not args.prefill_merge,
             attn_prefill_kernel=not args.attn_prefill_reference,
             layers=cfg.n_layers, prompt=L, chunk=C, tokens_per_s_per_layer=C / np.median(warm) * cfg.n_layers,
             first_chunk_s=times[0],
             decode_ms=float(np.median(dec[1:] or dec)) * 1e3 if dec else None,
             peak_bytes=stats.get("peak_bytes_in_use"), device=jax.devices()[0].device_kind)
    print(json.dumps(r), flush=True)
    if prof:
        r["profile"] = prof
        print(f"last chunk profiled: {prof['kernels']} kernels, {prof['busy_ms']:.1f} ms of device time", flush=True)
        for what in ("scopes", "names"):
            print(f"by {what[:-1]}:", flush=True)
            for row in prof[what][:args.profile_top]:
                print(f"  {row['ms']:9.2f} ms {row['kernels']:6d} kernels  {row['scope']}", flush=True)
    return [r]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["decode", "indexer", "prefill"], default="decode")
    ap.add_argument("--contexts", default="4096,32768,131072,1048576")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calls", type=int, default=8, help="calls per timed program (different caches)")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--variants", default="", help="decode: extra Triton plans, e.g. 'BH=64,DC=256;num_warps=4'")
    ap.add_argument("--heads", type=int, default=0, help="override n_heads (CPU smoke tests)")
    ap.add_argument("--topk-blocks", default=f"radix,{indexer_ref.TOPK_BLOCK}",
                    help="indexer: top-k selections to time (comma "
                    "list): radix (the radix-selection kernels), or jax.lax.top_k with first-level blocks of N entries "
                    "(0 = one top_k over the row)")
    ap.add_argument("--impls", default="reference,triton", help="indexer: kernels modes to time (comma list)")
    ap.add_argument("--prefill-len", type=int, default=131072)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--model", choices=["flash", "tiny"], default="flash", help="prefill: real V4-Flash layers, or "
                    "the tiny built-in config (a CPU smoke test)")
    ap.add_argument("--decode", type=int, default=4, help="decode steps after the prefill")
    ap.add_argument("--prefill-merge", action="store_true", help="prefill: with --kernels auto, the indexer's prefill "
                    "rows merge a top-k per entry block instead of one radix selection (unsets "
                    "dsv4_jax.kernels.indexer.PREFILL_RADIX_AUTO)")
    ap.add_argument("--attn-prefill-reference", action="store_true", help="prefill: with --kernels auto, the prefill "
                    "rows' sparse attention keeps the XLA reference (unsets dsv4_jax.kernels.sparse_attention."
                    "PREFILL_AUTO)")
    ap.add_argument("--kernels", default="auto", help="prefill: the config's kernels (reference | triton | auto)")
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--profile", help="prefill: trace the last chunk into this folder; device time per named scope")
    ap.add_argument("--profile-top", type=int, default=30, help="scopes to print with --profile")
    args = ap.parse_args()
    if args.mode in ("decode", "indexer"):
        rates = card_rates(copy_gib=1 if jax.default_backend() == "cpu" else 4, with_matmul=False)
        print_rates(rates)
        cfg = d.Config.v4_flash()
        if args.heads:
            cfg = cfg.with_(n_heads=args.heads, o_groups=min(cfg.o_groups, args.heads), index_n_heads=args.heads)
        rows = (bench_decode if args.mode == "decode" else bench_indexer)(cfg, args, rates)
    else:
        rows = bench_prefill(args)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
