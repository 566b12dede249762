#!/usr/bin/env python
"""Decode-step timing of real-size DeepSeek-V4 layers (random weights in the checkpoint formats) on 1..N devices.

Counts the bytes one decode step must read per device (weights touched + KV state), measures the device copy
bandwidth, and reports the floor (bytes / bandwidth) beside the median jitted decode-step time. ``--check`` first
verifies, on a small random config, that every mesh of the available devices gives the single-device logits
(float32 numerics).

    python scripts/bench_decode.py --model flash --layers 3 --batch 1 --meshes 1x1,1x2,2x1 --check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import dsv4_jax as d  # noqa: E402
from dsv4_jax import sharding as sh  # noqa: E402
from dsv4_jax.modeling.model import forward_jit  # noqa: E402


def copy_bandwidth(device, nbytes=1 << 30, iters=10) -> float:
    """Device-memory copy bandwidth in bytes/s (read + write counted), median of ``iters``."""
    x = jax.device_put(jnp.zeros(nbytes // 4, jnp.float32), device)
    f = jax.jit(lambda a: a + 1.0)
    f(x).block_until_ready()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        f(x).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * nbytes / float(np.median(ts))


def step_bytes(cfg: d.Config, w, state, batch: int) -> dict:
    """Bytes one decode step reads (whole model, all devices): non-expert weights, the shared experts, the routed
    experts touched (at most batch * k distinct per layer), and the KV state."""
    leaves = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(t))
    routed = sum(leaves((lw.ffn.w1, lw.ffn.w2, lw.ffn.w3)) for lw in w.layers)
    per_expert = routed / max(1, cfg.n_routed_experts * len(w.layers))
    touched = min(cfg.n_routed_experts, batch * cfg.n_activated_experts) * per_expert * len(w.layers)
    dense = leaves(w.layers) - routed + leaves((w.head, w.hc_head, w.norm))
    tid = sum(lw.ffn.tid2eid.nbytes for lw in w.layers if lw.ffn.tid2eid is not None)  # only rows gathered
    dense -= tid
    return {"dense_weights": dense, "routed_experts_touched": touched, "state": leaves(state.layers),
            "total": dense + touched + leaves(state.layers)}


def flash_layers(n_layers: int, numerics: str) -> d.Config:
    """Real V4-Flash shapes with the first ``n_layers`` of the schedule starting at layer 2 (CSA, HCA, CSA, ...)."""
    full = d.Config.v4_flash()
    ratios = full.compress_ratios[2:2 + n_layers] + (0,)
    return full.with_(n_layers=n_layers, compress_ratios=ratios, n_hash_layers=1, numerics=numerics)


def pro_layers(n_layers: int, numerics: str) -> d.Config:
    full = d.Config.v4_pro()
    ratios = full.compress_ratios[2:2 + n_layers] + (0,)
    return full.with_(n_layers=n_layers, compress_ratios=ratios, n_hash_layers=1, numerics=numerics)


def check_meshes(meshes, cfg=None, batch=8) -> list[dict]:
    """Logits of every mesh vs one device, float32 numerics (default: a small config crossing every boundary)."""
    cfg = cfg or d.Config.tiny(numerics="float32", n_heads=8, o_groups=8, o_lora_rank=128, index_n_heads=8,
                               vocab_size=512, window_size=8, index_topk=4)
    w = jax.jit(lambda k: d.init_weights(cfg, k))(jax.random.key(0))
    B, S = batch, (140 if cfg.dim <= 1024 else 24)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (B, S)))
    ref, _ = d.forward(w, cfg, toks, d.init_state(cfg, B, 160))
    ref = np.asarray(ref)
    out = []
    for shape in meshes:
        mesh = sh.make_mesh(*shape, devices=jax.devices()[: shape[0] * shape[1]])
        got, _ = d.forward(sh.shard_weights(w, cfg, mesh), cfg, toks, sh.shard_state(d.init_state(cfg, B, 160), mesh))
        rel = float(np.abs(np.asarray(got) - ref).max() / np.abs(ref).max())
        out.append({"mesh": list(shape), "max_rel_err_vs_1_device": rel, "layers": cfg.n_layers, "dim": cfg.dim})
        print(f"check mesh {shape}: max rel err vs 1 device {rel:.2e}", flush=True)
    return out


def collective_time(mesh, nbytes: int, iters: int = 20) -> float:
    """Median time of one psum over the whole mesh of an fp32 array of ``nbytes`` (the MoE combine's size)."""
    from jax.sharding import PartitionSpec as P

    x = jnp.zeros((max(1, nbytes // 4),), jnp.float32)
    f = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, sh.EXPERT_AXES), mesh=mesh, in_specs=P(), out_specs=P()))
    f(x).block_until_ready()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        f(x).block_until_ready()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def bench(cfg, meshes, batch, max_len, iters, seed=0, sink=None) -> list[dict]:
    results = []
    for shape in meshes:
        if batch % shape[0]:
            print(f"skip mesh {shape}: batch {batch} not divisible by its data axis", flush=True)
            continue
        n = shape[0] * shape[1]
        devs = jax.devices()[:n]
        mesh = sh.make_mesh(*shape, devices=devs)
        shardings = sh.weight_shardings(cfg, mesh)
        t0 = time.perf_counter()
        w = jax.jit(lambda k: d.init_weights(cfg, k), out_shardings=shardings)(jax.random.key(seed))
        jax.block_until_ready(w)
        t_init = time.perf_counter() - t0
        state = sh.shard_state(d.init_state(cfg, batch, max_len), mesh)
        toks = jnp.asarray(np.random.default_rng(seed).integers(2, cfg.vocab_size, (batch, 64)))
        with jax.set_mesh(mesh):
            _, state = forward_jit(w, cfg, toks, state, return_logits="none")  # prefill 64 tokens
            step = jax.jit(lambda w, t, s: forward_jit(w, cfg, t, s, return_logits="last"), donate_argnums=2)
            tok = jnp.zeros((batch, 1), jnp.int32)
            t0 = time.perf_counter()
            logits, state = step(w, tok, state)
            jax.block_until_ready(logits)
            t_compile = time.perf_counter() - t0
            for _ in range(3):
                logits, state = step(w, tok, state)
            jax.block_until_ready(logits)
            ts = []
            for _ in range(iters):
                t = time.perf_counter()
                logits, state = step(w, tok, state)
                jax.block_until_ready(logits)
                ts.append(time.perf_counter() - t)
        nbytes = step_bytes(cfg, w, state, batch)
        bw = copy_bandwidth(devs[0])
        # per device: dense weights split by the model axis (approx.), experts by all devices, state by data
        per_dev = nbytes["total"] / n
        med = float(np.median(ts))
        # collectives per step: the MoE psum of [B, D] fp32 and the output-projection all-reduce per layer
        coll = collective_time(mesh, batch * cfg.dim * 4) if n > 1 else 0.0
        res = {"collective_psum_BxD_s": coll, "collectives_per_step_est_s": coll * 2 * cfg.n_layers,
               "mesh": list(shape), "devices": n, "device_kind": devs[0].device_kind, "batch": batch,
               "layers": cfg.n_layers, "median_step_s": med, "min_step_s": float(np.min(ts)), "iters": iters,
               "compile_s": t_compile, "init_s": t_init, "bytes_per_step": nbytes, "bytes_per_device_est": per_dev,
               "copy_bw_GBps": bw / 1e9, "floor_s_per_device": per_dev / bw}
        results.append(res)
        print(json.dumps(res), flush=True)
        if sink:
            sink(res)
        del w, state
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["flash", "pro", "tiny"], default="flash", help="tiny: smoke test")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--meshes", default="1x1", help="comma list of DATAxMODEL")
    ap.add_argument("--numerics", default="reference", choices=["reference", "float32"])
    ap.add_argument("--check", action="store_true", help="first check mesh equality on a small config")
    ap.add_argument("--check-real", type=int, default=0, help="also check mesh equality on N real-size layers")
    ap.add_argument("--out", help="write results json here")
    args = ap.parse_args(argv)
    meshes = [tuple(int(v) for v in m.split("x")) for m in args.meshes.split(",")]
    jax.config.update("jax_default_prng_impl", "rbg")  # fast random init of GBs of weights
    print(f"devices: {jax.devices()}", flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, "args": vars(args)}
    def save(_=None):
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1))

    if args.check:
        out["check"] = check_meshes([m for m in meshes if m != (1, 1)] or [(1, 1)])
        save()
    make = {"flash": flash_layers, "pro": pro_layers,
            "tiny": lambda n, num: d.Config.tiny(numerics=num, n_heads=8, o_groups=8, o_lora_rank=128,
                                                 index_n_heads=8, vocab_size=512)}[args.model]
    if args.check_real:
        real = make(args.check_real, "float32")
        out["check_real"] = check_meshes([m for m in meshes if m != (1, 1)], real, batch=2)
        save()
    out["bench"] = []
    bench(make(args.layers, args.numerics), meshes, args.batch, args.max_len, args.iters,
          sink=lambda r: (out["bench"].append(r), save()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
