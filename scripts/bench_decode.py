#!/usr/bin/env python
"""Decode-step timing of real-size DeepSeek-V4 layers (random weights in the checkpoint formats) on 1..N devices.

Counts the bytes one decode step must read per device (weights touched + KV state), measures the device copy
bandwidth, and reports the floor (bytes / bandwidth) beside the median jitted decode-step time. ``--check`` first
verifies, on a small random config, that every mesh of the available devices gives the single-device logits
(float32 numerics).

    python scripts/bench_decode.py --model flash --layers 3 --batch 1,32 --meshes 1x1,1x2,2x1 --check

``--speculative K`` also times, on the same weights, a (K+1)-token verify forward and one whole speculative
iteration (K MTP drafts, verify, acceptance, exact rollback, MTP catch-up; ``dsv4_jax.speculative``), and derives
the time per token at accepted lengths 1, 2, 2.8 and K+1 (the iteration's work does not depend on how many drafts
are accepted; K+1 is what a draft forced to agree gives)::

    python scripts/bench_decode.py --model flash --layers 3 --batch 1 --speculative 3   # GPU
    python scripts/bench_decode.py --model tiny --batch 1 --speculative 2 --iters 2      # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
from scripts.bench_common import parse_variants, time_call, triton_copy_bandwidth, variant, xla_copy_bandwidth  # noqa: E402


def copy_bandwidth(device) -> dict:
    """Copy bandwidths of ``device`` in bytes/s (read + write counted, 4 GiB): XLA's elementwise copy and a Triton
    streaming copy (where jax-triton is installed); the floors use the best of them."""
    with jax.default_device(device):
        out = {"xla": xla_copy_bandwidth(), "triton": triton_copy_bandwidth()}
    return {k: v for k, v in out.items() if v}


def step_bytes(cfg: d.Config, w, state, batch: int) -> dict:
    """Bytes one decode step reads (whole model, all devices): non-expert weights, the shared experts, the routed
    experts touched (the expected number of distinct experts per layer), and the KV state it reads: all of it except
    the CSA layers' compressed KV, of which each row reads only the ``index_topk`` entries its indexer picks
    (``state`` is the whole state's size; at a 1M-token context it is 2.3x what a step reads)."""
    leaves = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(t))
    routed = sum(leaves((lw.ffn.w1, lw.ffn.w2, lw.ffn.w3)) for lw in w.layers)
    per_expert = routed / max(1, cfg.n_routed_experts * len(w.layers))
    # expected distinct experts per layer when each token picks k of E uniformly: E * (1 - (1 - k/E)^batch)
    E, k = cfg.n_routed_experts, cfg.n_activated_experts
    touched = E * (1 - (1 - k / E) ** batch) * per_expert * len(w.layers)
    dense = leaves(w.layers) - routed + leaves((w.head, w.hc_head, w.norm))
    tid = sum(leaves(lw.ffn.tid2eid) for lw in w.layers if lw.ffn.tid2eid is not None)  # only rows gathered
    dense -= tid
    read = 0
    for ls in state.layers:
        read += leaves(ls)
        if ls.ikv is not None and ls.ckv is not None:  # CSA: the picked entries of the compressed KV only
            n_c = jax.tree_util.tree_leaves(ls.ckv)[0].shape[1]
            read -= leaves(ls.ckv) * (1 - min(cfg.index_topk, n_c) / n_c)
    return {"dense_weights": dense, "routed_experts_touched": touched, "state": leaves(state.layers),
            "state_read": read, "total": dense + touched + read}


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
    """Logits of every mesh vs one device, float32 numerics (default: a small config crossing every boundary), with
    each MoE dispatch strategy (the all-to-all one runs ``ragged_all_to_all`` on GPUs, which CPUs lack)."""
    cfg = cfg or d.Config.tiny(numerics="float32", n_heads=8, o_groups=8, o_lora_rank=128, index_n_heads=8,
                               vocab_size=512, window_size=8, index_topk=4)
    w = d.init_weights(cfg, jax.random.key(0))
    B, S = batch, (140 if cfg.dim <= 1024 else 24)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (B, S)))
    ref, _ = d.forward(w, cfg, toks, d.init_state(cfg, B, 160))
    ref = np.asarray(ref)
    out = []
    for shape in meshes:
        mesh = sh.make_mesh(*shape, devices=jax.devices()[: shape[0] * shape[1]])
        for strategy in ("gather", "all_to_all") if mesh.size > 1 else ("auto",):
            c = cfg.with_(moe_dispatch=strategy)
            got, _ = d.forward(sh.shard_weights(w, c, mesh), c, toks, sh.shard_state(d.init_state(c, B, 160), mesh))
            rel = float(np.abs(np.asarray(got) - ref).max() / np.abs(ref).max())
            out.append({"mesh": list(shape), "moe_dispatch": strategy, "max_rel_err_vs_1_device": rel,
                        "layers": cfg.n_layers, "dim": cfg.dim})
            print(f"check mesh {shape} moe_dispatch={strategy}: max rel err vs 1 device {rel:.2e}", flush=True)
    return out


COLLECTIVE = re.compile(r"= (\w+)\[([\d,]*)\][^ ]* (all-reduce|all-gather|reduce-scatter|all-to-all|ragged-all-to-all|"
                        r"collective-permute)(-start)?\(")
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "s32": jnp.int32, "f16": jnp.float16, "u8": jnp.uint8,
          "pred": jnp.bool_, "s8": jnp.int8, "u32": jnp.uint32, "f8e4m3fn": jnp.float8_e4m3fn}


def collectives_of(compiled_text: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(op, dtype, result shape) of every collective in a compiled HLO module's text."""
    out = []
    for m in COLLECTIVE.finditer(compiled_text):
        dt, dims, op = m.group(1), m.group(2), m.group(3)
        out.append((op, dt, tuple(int(v) for v in dims.split(",") if v)))
    return out


def collective_time(mesh, colls, reps: int = 50) -> tuple[float, list[dict]]:
    """Sum of the device times of the step's collectives, each measured alone over the whole mesh at its size (an
    all-reduce as a psum, any other kind as an all-gather producing the same bytes) inside a ``fori_loop`` of
    ``reps`` dependent repetitions (so host dispatch is not counted): the time a step spends communicating if
    nothing overlaps it."""
    from jax.sharding import PartitionSpec as P

    total, rows, cache = 0.0, [], {}
    n, ax = mesh.size, sh.EXPERT_AXES
    for op, dt, shape in colls:
        size = int(np.prod(shape)) if shape else 1
        key = (op == "all-reduce", DTYPES.get(dt, jnp.float32), size)
        if key not in cache:
            is_ar, dtype, sz = key
            if is_ar:
                body = lambda i, a: jax.lax.psum(a, ax) * jnp.asarray(0.5, a.dtype)
                x, spec = jnp.zeros((sz,), dtype), P()
            else:
                chunk = -(-sz // n)
                body = lambda i, a: jax.lax.dynamic_slice_in_dim(  # noqa: E731
                    jax.lax.all_gather(a, ax, tiled=True), jax.lax.axis_index(ax) * a.shape[0], a.shape[0])
                x, spec = jnp.zeros((chunk * n,), dtype), P(ax)
            f = jax.jit(jax.shard_map(lambda a, b=body: jax.lax.fori_loop(0, reps, b, a), mesh=mesh, in_specs=spec,
                                      out_specs=spec, check_vma=False))
            cache[key] = time_call(f, x, trials=5, warmup=1) / reps
        total += cache[key]
        rows.append({"op": op, "dtype": dt, "shape": list(shape), "s": cache[key]})
    return total, rows


def kernels_mode(kern: str, default_route: str) -> str:
    """``MODE`` or ``MODE@ROUTE`` (``auto@xla``: ``kernels="auto"`` launched by XLA) -> ``MODE``, with the launch
    route set for the programs traced next (plain ``MODE``: ``default_route``, what ``DSV4_TRITON_LAUNCH`` chose)."""
    from dsv4_jax.kernels import set_launch_route

    mode, _, route = kern.partition("@")
    set_launch_route(route or default_route)
    return mode


def bench(cfg, meshes, batches, max_len, iters, seed=0, sink=None, kernels=("auto",), speculative=0,
          spec_on=None, start="full", variants=("",)) -> list[dict]:
    """Time every (mesh, batch, kernels, variant) combination; ``spec_on = (batches, kernels)`` limits the
    speculative timing (``speculative`` drafts) to those (default: all); ``start``: see :func:`start_position`;
    ``variants``: :func:`scripts.bench_common.variant` specs, each timed on the same weights in this process."""
    from dsv4_jax.kernels import launch_route, use_triton

    results = []
    spec_on = spec_on or (tuple(batches), tuple(kernels))
    default_route = launch_route()
    t0 = time.perf_counter()  # random weights made once on the first device, then placed on each mesh
    w0 = d.init_weights(cfg, jax.random.key(seed))  # eager: one small program per leaf shape
    jax.block_until_ready(w0)
    t_init = time.perf_counter() - t0
    print(f"random init {t_init:.0f} s", flush=True)
    for shape in meshes:
        n = shape[0] * shape[1]
        devs = jax.devices()[:n]
        mesh = sh.make_mesh(*shape, devices=devs)
        w = w0 if n == 1 else jax.device_put(w0, sh.weight_shardings(cfg, mesh))
        bws = copy_bandwidth(devs[0])
        bw = max(bws.values())
        print("copy bandwidth (4 GiB, read + write): " + ", ".join(f"{k} {v / 1e12:.2f} TB/s" for k, v in bws.items()),
              flush=True)
        for batch, kern, var in [(b, k, v) for b in batches for k in kernels for v in variants]:
            if batch % shape[0]:
                print(f"skip mesh {shape} batch {batch}: not divisible by the data axis", flush=True)
                continue
            c = cfg.with_(kernels=kernels_mode(kern, default_route))
            pos = start_position(max_len, steps_taken(iters), start)
            with variant(var):  # the speculative timing too: it traces its own programs
                res = step_timing(c, w, mesh, batch, max_len, iters, seed, pos)
                if speculative and batch in spec_on[0] and kern in spec_on[1]:
                    res["speculative"] = spec_timing(c, w, mesh, batch, max_len, iters, speculative, seed,
                                                     res["median_step_s"])
            res.update(kernels=kern, triton=use_triton(c), launch_route=launch_route(), variant=var or "default")
            nbytes = step_bytes(cfg, w, d.init_state(cfg, batch, max_len), batch)
            # per device: dense weights split by the model axis (approx.), experts by all devices, state by data
            per_dev = nbytes["total"] / n
            res.update(mesh=list(shape), devices=n, device_kind=devs[0].device_kind, batch=batch, layers=cfg.n_layers,
                       init_s=t_init, bytes_per_step=nbytes, bytes_per_device_est=per_dev, copy_bw_GBps=bw / 1e9,
                       copy_bw_all_GBps={k: v / 1e9 for k, v in bws.items()},
                       floor_s_per_device=per_dev / bw)
            results.append(res)
            print(json.dumps(res), flush=True)
            if sink:
                sink(res)
        del w
    del w0
    return results


def steps_taken(iters: int) -> int:
    """Decode steps :func:`step_timing` runs on one state (warm-up, timed calls, the jitted loops)."""
    return 3 + iters + (2 + max(3, iters // 2)) * LOOP_STEPS


def start_position(max_len: int, steps: int, start) -> int:
    """Where every row's position starts for ``steps`` decode steps on one state (:func:`steps_taken` here):
    ``"full"`` -> as late as those steps allow (``max_len`` minus ``steps``), so the indexer sees a full cache and
    the attention full index lists: the work of a ``max_len``-token context (the caches hold zeros, which costs the
    same); an int -> that position (0: an empty state, what this script timed before 2026-12-03: the indexer kernel
    then skips every entry, as it skips entries a row cannot see yet)."""
    pos = max(0, max_len - steps - 1) if start == "full" else int(start)
    if not 0 <= pos <= max_len - steps:
        raise ValueError(f"--start {start}: position {pos} leaves fewer than {steps} of the {max_len} "
                         "positions for the timed steps")
    return pos


def step_timing(cfg, w, mesh, batch, max_len, iters, seed, start: int = 0) -> dict:
    """Median jitted decode-step time (state donated, every row starting at position ``start``), and the step's
    collectives."""
    state = d.init_state(cfg, batch, max_len)
    state = state.replace(pos=jnp.full_like(state.pos, start), mtp_pos=jnp.full_like(state.mtp_pos, start))
    state = sh.shard_state(state, mesh)
    with jax.set_mesh(mesh):
        step = jax.jit(lambda w, t, s: forward_jit(w, cfg, t, s, return_logits="last"), donate_argnums=2)
        tok = jnp.asarray(np.random.default_rng(seed).integers(2, cfg.vocab_size, (batch, 1)), jnp.int32)
        t0 = time.perf_counter()
        compiled = step.lower(w, tok, state).compile()
        t_compile = time.perf_counter() - t0
        colls = collectives_of(compiled.as_text()) if mesh.size > 1 else []
        for _ in range(3):
            logits, state = step(w, tok, state)
        jax.block_until_ready(logits)
        ts = []
        for _ in range(iters):
            t = time.perf_counter()
            logits, state = step(w, tok, state)
            jax.block_until_ready(logits)
            ts.append(time.perf_counter() - t)
        loop_s = loop_timing(cfg, w, tok, state, iters)
    coll, coll_rows = collective_time(mesh, colls) if mesh.size > 1 else (0.0, [])
    return {"median_step_s": float(np.median(ts)), "min_step_s": float(np.min(ts)), "iters": iters, "start": start,
            "loop_step_s": loop_s, "loop_steps": LOOP_STEPS,
            "compile_s": t_compile, "collectives_in_step": len(colls), "collective_s_sum_alone": coll,
            "collectives": coll_rows}


LOOP_STEPS = 16


def loop_timing(cfg, w, tok, state, iters: int) -> float:
    """Seconds per step of ``LOOP_STEPS`` greedy decode steps inside one jitted ``fori_loop`` (each step's argmax is
    the next step's token), as the jitted generate loop runs them: no host dispatch between steps, unlike the
    per-call median (one jitted step per Python call: it pays the call's dispatch of every weight leaf and the
    host's wait, which a ``while_loop`` does not)."""
    def run(w, t, s):
        def body(_, c):
            t, s = c
            logits, s = forward_jit(w, cfg, t, s, return_logits="last")
            return jnp.argmax(logits.reshape(t.shape[0], -1), -1).astype(jnp.int32)[:, None], s

        return jax.lax.fori_loop(0, LOOP_STEPS, body, (t, s))

    f = jax.jit(run, donate_argnums=2)
    t_s, _ = _median_time(lambda c: f(w, *c), (tok, state), max(3, iters // 2))
    return t_s / LOOP_STEPS


def _median_time(fn, carry, iters: int):
    """Median seconds of ``carry = fn(carry)`` (``fn`` donates its argument; 2 warm-up calls) and the last carry."""
    for _ in range(2):
        carry = fn(carry)
    jax.block_until_ready(carry)
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        carry = fn(carry)
        jax.block_until_ready(carry)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), carry


def spec_timing(cfg, w, mesh, batch, max_len, iters, k, seed, plain_s) -> dict:
    """Speculative decoding with ``k`` drafts vs a plain step (``plain_s``): median time of a (k+1)-token verify
    forward (state donated) and of a whole iteration, and the implied time per token at accepted lengths 1, 2, 2.8
    and k+1. Greedy rows, MTP drafts (random weights: nearly every draft is rejected; the iteration's work is the
    same whatever is accepted). Needs ``max_len`` >= 4 + (iters + 2) * (k + 1)."""
    from dsv4_jax import speculative as spec
    from dsv4_jax.generate import DecodeCarry
    from dsv4_jax.modeling.model import forward_layers, head

    S = k + 1
    tok = jnp.asarray(np.random.default_rng(seed).integers(2, cfg.vocab_size, (batch, S)), jnp.int32)
    with jax.set_mesh(mesh):
        def verify(w, state):
            h, state, _ = forward_layers(w, cfg, tok, state, jnp.full((batch,), S, jnp.int32))
            return head(cfg, w.head, w.hc_head, w.norm, h), state  # logits [B,k+1,V]

        vf = jax.jit(verify, donate_argnums=1)
        fresh = lambda: jax.tree_util.tree_map(jnp.copy, sh.shard_state(d.init_state(cfg, batch, max_len), mesh))
        verify_s, _ = _median_time(lambda s: vf(w, s)[1], fresh(), iters)

        state = fresh()  # distinct buffers (init_state shares one zeros array for pos and mtp_pos)
        keys = jax.random.split(jax.random.key(seed), batch)
        base = DecodeCarry(state=state, last=tok[:, 0], out=jnp.full((batch, max_len), -1, jnp.int32),
                           n_out=jnp.ones((batch,), jnp.int32), step=jnp.int32(1), done=jnp.zeros((batch,), bool),
                           bad_step=jnp.full((batch,), -1, jnp.int32), keys=keys,
                           limit=jnp.int32(max_len), stop=jnp.full((4,), -1, jnp.int32),
                           temperature=jnp.zeros((batch,), jnp.float32), top_k=jnp.zeros((batch,), jnp.int32),
                           top_p=jnp.ones((batch,), jnp.float32))
        carry = spec.SpecCarry(base=base, q_logits=jnp.zeros((batch, cfg.vocab_size), jnp.float32),
                               h_mtp=jnp.zeros((batch, cfg.hc_mult, cfg.dim), cfg.act_dtype),
                               n_verify=jnp.zeros((batch,), jnp.int32), n_accepted=jnp.zeros((batch,), jnp.int32), k=k)
        sf = jax.jit(lambda w, c: spec._step(w, cfg, c)[0], donate_argnums=1)
        t0 = time.perf_counter()
        sf.lower(w, carry).compile()
        compile_s = time.perf_counter() - t0
        iter_s, carry = _median_time(lambda c: sf(w, c), carry, iters)
    acc = spec.stats(carry)["mean_accepted_length"]
    per_token = {str(a): iter_s / a for a in (1, 2, 2.8, k + 1)}
    return {"k": k, "verify_s": verify_s, "iteration_s": iter_s, "draft_rollback_catchup_s": iter_s - verify_s,
            "iteration_over_plain": iter_s / plain_s, "s_per_token_at_accepted_length": per_token,
            "speedup_at_accepted_length": {a: plain_s / t for a, t in per_token.items()},
            "break_even_accepted_length": iter_s / plain_s, "measured_accepted_length_random_weights": acc,
            "compile_s": compile_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["flash", "pro", "tiny"], default="flash", help="tiny: smoke test")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--batch", default="1", help="comma list of batch sizes")
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--meshes", default="1x1", help="comma list of DATAxMODEL")
    ap.add_argument("--numerics", default="reference", choices=["reference", "float32"])
    ap.add_argument("--kernels", default="auto",
                    help="comma list of Config.kernels values to time (before/after); MODE@ROUTE picks the kernels' "
                    "launch route too (auto@xla, auto@jax-triton: dsv4_jax.kernels.launch_route)")
    ap.add_argument("--speculative", type=int, default=0, metavar="K",
                    help="also time a (K+1)-token verify and a speculative iteration with K MTP drafts (1..4)")
    ap.add_argument("--speculative-batch", default="", help="comma list: time speculation at these batches only")
    ap.add_argument("--speculative-kernels", default="", help="comma list: time speculation for these --kernels only")
    ap.add_argument("--check", action="store_true", help="first check mesh equality on a small config")
    ap.add_argument("--check-real", type=int, default=0, help="also check mesh equality on N real-size layers")
    ap.add_argument("--moe-tile", default="", help="FP4 MoE tile overrides for every call, e.g. 'GEMV=2' (the opt-in "
                    "tensor-core GEMV): sets DSV4_MOE_TILE (dsv4_jax.kernels.fp4_moe.tile_override)")
    ap.add_argument("--start", default="full", help="position every row starts the timed steps at: 'full' (the "
                    "latest the timed steps allow: a full max-len context) or an int (0: an empty state); the "
                    "speculative timing always starts at 0")
    ap.add_argument("--variants", default="", help="';'-separated benchmark variants, each timed on the same weights: "
                    "NAME=VALUE env entries and module:ATTR=VALUE constants (scripts/bench_common.variant), e.g. "
                    "'default;DSV4_MHC_TILE=warps2=4 dsv4_jax.kernels.sparse_attention:AUTO_MIN_LIST=0'")
    ap.add_argument("--out", help="write results json here")
    args = ap.parse_args(argv)
    if args.moe_tile:
        os.environ["DSV4_MOE_TILE"] = args.moe_tile
        from dsv4_jax.kernels.fp4_moe import tile_override

        tile_override()  # a malformed value fails here, not in the middle of a timing
    variants = parse_variants(args.variants)  # a malformed variant fails here, before anything is timed
    meshes = [tuple(int(v) for v in m.split("x")) for m in args.meshes.split(",")]
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
    batches = [int(b) for b in args.batch.split(",")]
    bench(make(args.layers, args.numerics), meshes, batches, args.max_len, args.iters,
          sink=lambda r: (out["bench"].append(r), save()), kernels=tuple(args.kernels.split(",")),
          speculative=args.speculative,
          spec_on=(tuple(int(b) for b in (args.speculative_batch or args.batch).split(",")),
                   tuple((args.speculative_kernels or args.kernels).split(","))), start=args.start,
          variants=variants)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
