"""What a decode step launches on an H200, counted WITHOUT a GPU: XLA compiles the step for sm_90 on this machine.

JAX can compile for a GPU it does not have (a "compile-only" CUDA device made from a target description,
``jax.experimental.topologies``). XLA then runs its whole GPU pipeline (fusion, scheduling, command buffers, PTX) and
dumps the executable's thunk sequence: every kernel, copy and loop the step runs, in order. This script reads that
sequence and reports:

* ``kernels``: device kernels per step (XLA fusions, XLA-compiled Triton kernels, library calls, copies/memsets);
* ``host_launches``: what the host issues per step: one per CUDA graph (XLA's command buffers), plus every kernel
  outside a graph. That is what a small-batch step pays for in launch latency;
* ``host_syncs``: device-to-host round trips: a ``while`` loop whose trip count XLA does not know copies its
  predicate to the host before every iteration (counted once per loop: the trip count is data-dependent);
* ``legacy_custom_calls``: jax-triton launches (outside every graph, host code per call);
* the kernels per named scope (``layer_0/attn/indexer`` ...).

Needs the CUDA plugin installed next to jax (``pip install "jax[cuda13]"``), no GPU and no driver. Example:

    python scripts/count_launches.py --model flash --layers 3 --batch 1 --kernels reference,auto

The target is an H200 (sm_90, 132 SMs, 141 GB, 4.8 TB/s) described in this file: fusion decisions that depend on
XLA's cost model may differ slightly from a real H200's runtime-queried description.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the default device stays the CPU
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver / cuPTI here
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_common import op_scopes  # noqa: E402

# An H200 SXM as XLA's GpuTargetConfig (hardware facts: sm_90, 132 SMs, 50 MiB L2, 141 GB HBM3e at 4.8 TB/s)
H200 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 shared_memory_per_block_optin: 232448 threads_per_core_limit: 2048
  core_count: 132 fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 4800000000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 150754820096 cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  thread_dim_limit_x: 1024 thread_dim_limit_y: 1024 thread_dim_limit_z: 64
  device_vendor: "NVIDIA Corporation" name: "NVIDIA H200"
}
platform_name: "CUDA"
device_description_str: "NVIDIA H200"
"""
# kAsyncStart holds an async region (a side stream: dsv4_jax.kernels.streams); its kAsyncDone launches nothing
CONTAINERS = {"kCommandBuffer", "kSequential", "kWhile", "kConditional", "kWaitForStreams", "kAsyncStart"}
MARKERS = {"kAsyncDone"}
COLLECTIVES = ("AllReduce", "AllGather", "ReduceScatter", "AllToAll", "CollectivePermute", "Nccl", "Collective")
_LINE = re.compile(r"^(\s*)(\d+): (k\w+)\s*\[[^\]]*\]\s*(\S*)")


def h200_mesh(data: int = 1, model: int = 1):
    """A ``(data, model)`` mesh (``dsv4_jax.sharding``'s axis names) of compile-only H200s: one host with ``data *
    model`` of them, as ``jax.experimental.topologies`` describes it (no device needed)."""
    from jax.experimental import topologies

    from dsv4_jax.sharding import DATA, MODEL

    topo = topologies.get_topology_desc(platform="cuda", topology_name="", target_config=H200,
                                        topology=f"1x1x{data * model}")
    return topologies.make_mesh(topo, (data, model), (DATA, MODEL))


def compile_for_h200(fn, *args, dump: str | None = None, donate_argnums=(), options: dict | None = None,
                     shardings=None, mesh=None):
    """``fn`` jitted and compiled for an sm_90 device that is not here; ``args``: pytrees of ShapeDtypeStructs;
    ``options``: more XLA compiler options. ``mesh`` (:func:`h200_mesh`) and ``shardings`` (a pytree of
    ``NamedSharding`` per argument, or None for replicated): a multi-device compile under that mesh. Returns
    ``(compiled, dump folder)``."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = mesh if mesh is not None else h200_mesh()
    rep = NamedSharding(mesh, P())
    shardings = shardings if shardings is not None else tuple(jax.tree.map(lambda a: rep, a) for a in args)
    args = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), args, shardings)
    dump = dump or tempfile.mkdtemp(prefix="dsv4_launches_")
    with jax.set_mesh(mesh):
        traced = jax.jit(fn, donate_argnums=donate_argnums).trace(*args)
        compiled = traced.lower(lowering_platforms=("cuda",)).compile(
            compiler_options={"xla_dump_to": dump, **(options or {})})
    return compiled, dump


def _tree(path: str) -> list[dict]:
    """The thunk sequence file as a tree of ``{kind, name, children: {section: [...]}}``."""
    root = {"kind": "root", "name": "", "children": {"": []}, "indent": -1}
    stack, section = [root], {id(root): ""}
    for line in open(path):
        if not line.strip():
            continue
        m = _LINE.match(line)
        ind = len(line) - len(line.lstrip())
        if m is None:  # a section header of the innermost loop / conditional: "condition:", "body:", "branch 0:"
            while len(stack) > 1 and stack[-1]["kind"] not in ("kWhile", "kConditional"):
                stack.pop()
            section[id(stack[-1])] = line.strip().rstrip(":")
            stack[-1]["children"].setdefault(section[id(stack[-1])], [])
            continue
        while len(stack) > 1 and stack[-1]["indent"] >= ind and not (
                stack[-1]["kind"] in ("kWhile", "kConditional") and section.get(id(stack[-1])) and
                stack[-1]["indent"] < ind):
            stack.pop()
        node = {"kind": m.group(3), "id": int(m.group(2)), "name": m.group(4), "children": {"": []}, "indent": ind}
        parent = stack[-1]
        parent["children"].setdefault(section.get(id(parent), ""), []).append(node)
        stack.append(node)
        section[id(node)] = ""
    return root["children"][""]


def _annotations(dump: str) -> dict[int, str]:
    """thunk id -> HLO instruction name, from the thunk metadata dump."""
    out = {}
    for path in glob.glob(f"{dump}/*thunk_metadata.txt"):
        for blk in open(path).read().split("thunk_metadata {")[1:]:
            ann, tid = re.search(r'profile_annotation: "([^"]*)"', blk), re.search(r"thunk_id: (\d+)", blk)
            if ann and tid:
                out[int(tid.group(1))] = ann.group(1)
    return out


def _hlo_info(dump: str) -> tuple[dict[str, str], dict[str, int], dict[str, str]]:
    """From the optimized HLO: instruction name -> named scope (op_name without the jit prefixes and the op),
    while-loop name -> known trip count, and Triton custom call -> its kernel's function name."""
    scopes, trips, funcs = {}, {}, {}
    for path in glob.glob(f"{dump}/*after_optimizations.txt"):
        text = open(path).read()
        scopes.update({name: "/".join(parts[:-1]) or parts[-1] if parts else ""
                       for name, parts in op_scopes(text).items()})
        for line in text.splitlines():
            t = re.match(r"\s*%([\w.\-]+) = .* while\(.*\"known_trip_count\":\{\"n\":\"(\d+)\"", line)
            if t:
                trips[t.group(1)] = int(t.group(2))
            f = re.match(r"\s*%([\w.\-]+) = .* custom-call\(.*tt\.func public @(\w+)", line)
            if f:
                funcs[f.group(1)] = f.group(2)
    return scopes, trips, funcs


def summarize(dump: str) -> dict:
    """Counts of one compiled step from its dump folder (see the module docstring)."""
    [seq] = glob.glob(f"{dump}/*thunk_sequence_after_thunk_passes.txt")
    names = _annotations(dump)
    scopes, trips, funcs = _hlo_info(dump)
    res = Counter(dict.fromkeys(("kernels", "host_launches", "graphs", "host_syncs", "legacy_custom_calls"), 0))
    by_scope, by_kind, names_in = Counter(), Counter(), {}

    def walk(nodes, mult: int, graphed: bool):
        for n in nodes:
            kind = n["kind"]
            if kind == "kCommandBuffer":
                res["host_launches"] += mult
                res["graphs"] += mult
                walk(n["children"][""], mult, True)
            elif kind == "kWhile":
                hlo = names.get(n["id"], "")
                trip = trips.get(hlo.replace("_", "."), trips.get(hlo))
                if trip is None:  # data-dependent: condition + predicate copy + host sync, counted once
                    res["host_syncs"] += mult
                    walk(n["children"].get("condition", []), mult, graphed)
                walk(n["children"].get("body", []), mult * (trip or 1), graphed)
            elif kind in ("kConditional",):
                branches = [v for k, v in n["children"].items() if k.startswith("branch")]
                res["host_syncs"] += mult  # the branch index is read on the host
                walk(max(branches, key=len) if branches else [], mult, graphed)
            elif kind in CONTAINERS:
                walk(n["children"][""], mult, graphed)
            elif kind in MARKERS:
                continue
            else:
                hlo = names.get(n["id"], n["name"])
                res["kernels"] += mult
                res["host_launches"] += 0 if graphed else mult
                by_kind[kind] += mult
                if kind == "kCustomCall":
                    res["legacy_custom_calls"] += mult
                scope = scopes.get(hlo, scopes.get(hlo.replace("_", "."), "?"))
                by_scope[scope] += mult
                func = funcs.get(hlo, funcs.get(hlo.replace("_", ".")))
                label = f"{hlo} ({func})" if func else hlo
                names_in.setdefault(scope, []).append(label if mult == 1 else f"{label} x{mult}")

    walk(_tree(seq), 1, False)
    return {**res, "by_kind": dict(by_kind), "by_scope": dict(sorted(by_scope.items(), key=lambda kv: -kv[1])),
            "kernels_by_scope": names_in}


PTX_DUMP = {"xla_dump_emitter_re": ".*"}  # XLA options that make it dump each module's PTX and Triton's IR (jax 0.11)


def find_ptxas() -> str | None:
    """A CUDA ptxas new enough for XLA's PTX: ``$PTXAS``, the pip CUDA toolkit next to jax (``nvidia/cu13/bin``), or
    ``/usr/local/cuda*/bin``."""
    cands = [os.environ.get("PTXAS", "")]
    try:
        import nvidia

        cands += [os.path.join(p, "cu13", "bin", "ptxas") for p in nvidia.__path__]
    except ImportError:
        pass
    cands += sorted(glob.glob("/usr/local/cuda*/bin/ptxas"), reverse=True)
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


def triton_builds(dump: str, ptxas: str) -> list[dict]:
    """XLA's builds of the Triton kernels in a compile's dump (``PTX_DUMP`` options): per kernel its registers and
    spill bytes (``ptxas -v`` for sm_90a on the dumped PTX) and shared memory (Triton's ``ttg.shared``). Why: XLA
    compiles the kernels' Triton IR with its own bundled Triton, whose build can differ from the ``triton`` wheel's
    (``tests/test_kernels_sm90.py`` checks the latter): on 2026-12-03 its sparse-attention build asked for 196,608
    bytes of shared memory (a transposed copy of the KV tile) and spilled 846 bytes, against 131,072 and 388, and ran
    3.5x slower on an H200."""
    shared = {}
    for f in glob.glob(os.path.join(dump, "*.triton-to-llvm.txt")):
        m = re.search(r"ttg\.shared = (\d+)", open(f).read())
        shared[f.split(".")[-3]] = int(m.group(1)) if m else None
    rows = []
    for ptx in sorted(glob.glob(os.path.join(dump, "*.ptx"))):
        text = open(ptx).read()
        names = re.findall(r"\.entry (\w+)\(", text)
        if not names or not any(n in shared for n in names):
            continue  # XLA's own fusions
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True, timeout=600).stderr
        for n in names:
            part = out.split(f"Compiling entry function '{n}'")[-1]
            regs = re.search(r"Used (\d+) registers", part)
            spill = re.search(r"(\d+) bytes spill stores", part)
            rows.append(dict(kernel=n, registers=int(regs.group(1)) if regs else None,
                             spill_bytes=int(spill.group(1)) if spill else None, shared_bytes=shared.get(n)))
    return rows


def pretend_gpu():
    """Make the model's dispatchers take their GPU paths while JAX's default backend is the CPU: the Triton
    kernels are then lowered for the compile-only H200 exactly as on a real one (launch route of
    ``dsv4_jax.kernels.launch_route``)."""
    import dsv4_jax.kernels as K

    try:  # jax-triton asks the (absent) GPU for its compute capability when it compiles a kernel
        from jax_triton import triton_lib

        triton_lib.triton_kernel_call_lib.get_compute_capability = lambda device: 90
    except ImportError:
        pass
    K.triton_unavailable = lambda: None
    K.arch = lambda: "sm90"
    for mod in [m for n, m in list(sys.modules.items()) if n.startswith("dsv4_jax") and m is not None]:
        for attr, new in (("triton_unavailable", K.triton_unavailable), ("arch", K.arch)):
            if hasattr(mod, attr):
                setattr(mod, attr, new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="flash", choices=["flash", "pro"])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--batch", default="1")
    ap.add_argument("--kernels", default="reference,auto")
    ap.add_argument("--route", default="jax-triton,xla", help="kernel launch routes to count (dsv4_jax.kernels)")
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--meshes", default="1x1", help="DATAxMODEL meshes of compile-only H200s to count, e.g. 1x1,1x2")
    ap.add_argument("--scopes", type=int, default=15, help="named scopes to list (most kernels first)")
    ap.add_argument("--json", help="append each result as a JSON line to this file")
    ap.add_argument("--names", default="", help="list the kernels (HLO names) of the scopes containing this text")
    ap.add_argument("--variants", default="",
                    help="';'-separated variants (scripts/bench_common.variant: NAME=VALUE env entries, "
                         "module:ATTR=VALUE constants), each counted: 'dsv4_jax.kernels.mhc:FUSE_POST=True;default'")
    ap.add_argument("--builds", action="store_true",
                    help="also report XLA's build of every Triton kernel (registers, spills, shared memory; needs a "
                         "CUDA ptxas: $PTXAS, the pip CUDA toolkit or /usr/local/cuda)")
    args = ap.parse_args(argv)
    ptxas = find_ptxas() if args.builds else None
    if args.builds and ptxas is None:
        raise SystemExit("--builds: no ptxas found (set PTXAS=/path/to/ptxas)")

    from bench_decode import flash_layers, pro_layers

    import dsv4_jax as d
    from dsv4_jax.modeling import hyper
    from dsv4_jax.modeling.model import forward_jit
    from scripts.bench_common import parse_variants, variant

    hyper.UNROLL_SINKHORN = True  # as on a GPU backend (the default backend of this process is the CPU)
    base = (flash_layers if args.model == "flash" else pro_layers)(args.layers, "reference")
    import dsv4_jax.kernels as K
    from dsv4_jax.sharding import state_shardings, weight_shardings

    runs = [(k, r, v, m) for k in args.kernels.split(",") for r in (args.route.split(",") if k != "reference" else [""])
            for v in parse_variants(args.variants) for m in args.meshes.split(",")]
    for kern, route, var, mesh_name in runs:
        mesh = h200_mesh(*(int(n) for n in mesh_name.split("x")))
        if kern != "reference":
            pretend_gpu()
            K.set_launch_route(route)
        cfg = base.with_(kernels=kern)
        w = jax.eval_shape(lambda k, c=cfg: d.init_weights(c, k), jax.random.key(0))
        for batch in [int(b) for b in args.batch.split(",")]:
            state = jax.eval_shape(lambda c=cfg, b=batch: d.init_state(c, b, args.max_len))
            tok = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
            t0 = time.perf_counter()
            shardings = None
            if mesh.size > 1:  # as dsv4_jax.sharding places them (tokens replicated, as generate's decode loop)
                rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
                shardings = (weight_shardings(cfg, mesh), rep, state_shardings(state, mesh))
            # the state donated, as bench_decode.py and the decode loop update it (else XLA copies every cache)
            with variant(var):
                _, dump = compile_for_h200(lambda w, t, s, c=cfg: forward_jit(w, c, t, s, return_logits="last"),
                                           w, tok, state, donate_argnums=2, options=PTX_DUMP if ptxas else None,
                                           shardings=shardings, mesh=mesh)
            res = summarize(dump)
            res.update(model=args.model, layers=args.layers, batch=batch, mode=kern, route=route, mesh=mesh_name,
                       variant=var or "default", max_len=args.max_len,
                       compile_s=round(time.perf_counter() - t0, 1), jax=jax.__version__, dump=dump)
            top = list(res["by_scope"].items())[:args.scopes]
            label = f" [{var}]" if var else ""
            coll = {k: v for k, v in res["by_kind"].items() if any(c in k for c in COLLECTIVES)}
            print(f"{args.model} x{args.layers} mesh {mesh_name} batch {batch} kernels={kern} {route}{label}: "
                  f"{res['kernels']} kernels, {res['host_launches']} host launches ({res['graphs']} graphs), "
                  f"{res['host_syncs']} host syncs, {res['legacy_custom_calls']} legacy custom calls; collectives "
                  f"{coll or 0}; compiled in {res['compile_s']} s", flush=True)
            print("  " + ", ".join(f"{k or '(top)'} {v}" for k, v in top), flush=True)
            if ptxas:
                res["triton_builds"] = builds = triton_builds(dump, ptxas)
                for b in sorted(builds, key=lambda b: b["kernel"]):
                    print(f"  XLA build {b['kernel']}: {b['registers']} registers, {b['spill_bytes']} B spilled, "
                          f"{b['shared_bytes']} B shared", flush=True)
            for scope, kernels in res["kernels_by_scope"].items():
                if args.names and args.names in scope:
                    print(f"  {scope}: {', '.join(kernels)}", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
