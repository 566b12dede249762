"""Independent branches of a layer on a second GPU compute stream (XLA stream annotations), so their kernels overlap.

Why: at decode sizes every kernel of a layer is short and latency-bound (one-token GEMVs at 45-65 % of the copy
bandwidth, ~1 us kernels), and XLA runs the step as one CUDA graph whose nodes it orders by buffer use. Two branches
that share no data still end up in one chain: buffer reuse between them adds false dependencies (the V4-Flash step
compiled for an H200, ``scripts/count_launches.py``: the shared expert's first GEMV waits on the routed experts' down
GEMV; the attention's ``wq_b`` GEMV on the indexer's query kernel). :func:`side` runs a function as an XLA call
annotated with another compute stream (``jax.experimental.compute_on("gpu_stream:N")``): XLA turns it into an async
region on that stream, inside the same command buffer, and the rest of the layer runs beside it until its results
are needed.

The branches (the callers name them):

* ``"shared"``: the MoE's shared expert (3 kernels, ~12.6 us per layer on an H200), beside the routed experts;
* ``"indexer"``: a CSA layer's ``index_topk`` (its query GEMV and kernel, scoring and top-k, ~15 of the indexer's
  ~22 us), beside the attention's ``wq_b`` GEMV and q/kv preparation (~17 us). The compressors, which write the
  state in place, stay on the main stream.

Numerics: the same kernels on the same inputs; only the order in which the GPU runs them changes (bit for bit
the same outputs). What changes is the region's boundary: XLA does not fuse across it, so a conversion or an add
that a neighbouring fusion used to absorb may become a kernel of its own.

Status: opt-in (:data:`BRANCHES` empty), a benchmark knob (``dsv4_jax.kernels.streams:BRANCHES='shared,indexer'``).
Measured on an H100 (2026-12-07, ``bash scripts/gpu_session.sh streams``, 3-layer V4-Flash step in a 16-step loop,
each variant right after a default run; ``docs/performance.md``): batch 1 1.018 / 1.010 ms against 1.004 / 0.993,
batch 32 4.707 / 4.748 against 4.714 / 4.734: no gain (the overlapped kernels share the same memory bandwidth and
SMs, and the regions' boundaries cost a few small kernels: 118 against 112 per batch-1 step, 161 against 150 at
batch 32), so it stays off. Its GPU test passed at batch 1 (logits and state bit for bit). On the CPU (the
reference path, the interpreter tests) and under a multi-device mesh it does nothing: the function runs inline.
ROCm: XLA's stream annotation is common GPU code; never tried there.
"""

from __future__ import annotations

import jax

from dsv4_jax.kernels import arch, single_device

BRANCHES: tuple[str, ...] | str = ()  # the branches that run on the side stream ("shared", "indexer"); () = none
STREAM = 1  # the XLA compute stream id of the side stream
KNOWN = ("shared", "indexer")


def enabled(branch: str) -> bool:
    """Whether ``branch`` runs on the side stream here (GPU, one device, named in :data:`BRANCHES`)."""
    if branch not in KNOWN:
        raise ValueError(f"streams: unknown branch {branch!r} (known: {', '.join(KNOWN)})")
    names = BRANCHES.split(",") if isinstance(BRANCHES, str) else BRANCHES
    unknown = [n for n in names if n and n not in KNOWN]
    if unknown:
        raise ValueError(f"streams.BRANCHES: unknown branch {unknown} (known: {', '.join(KNOWN)})")
    return branch in names and arch() != "cpu" and single_device()


def side(branch: str, fn, *args):
    """``fn(*args)`` (arrays and pytrees of arrays in, the same out), on the side stream where :func:`enabled`,
    else inline. ``fn`` must be pure and close over static values only (configs, Python numbers)."""
    if not enabled(branch):
        return fn(*args)
    import inspect

    from jax._src import config as jax_config  # the compute_on context's own switch (no public way, see below)
    from jax._src.core import MemorySpace
    from jax.experimental import compute_on as co

    def body(*a):
        # only the region's call carries the annotation: JAX tags every equation traced inside ``compute_on``,
        # nested jitted calls included (``jnp.floor_divide`` is one), and XLA rejects a stream region nested in
        # another ("No ExecutionStreamId found for call-start"), so the body is traced outside the context
        prev = jax_config.compute_on_context_manager.swap_local(None)
        try:
            return fn(*a)
        finally:
            jax_config.compute_on_context_manager.set_local(prev)

    ctype = f"gpu_stream:{STREAM}"
    # the functional form (jax >= 0.11: ``compute_on(f, compute_type=, out_memory_spaces=)``; ``compute_on2`` in
    # 0.10) where there is one, else the context manager around a jitted call (0.10's ``compute_on``)
    functional = getattr(co, "compute_on2", None)
    if functional is None and "out_memory_spaces" in inspect.signature(co.compute_on).parameters:
        functional = co.compute_on
    if functional is not None:
        return functional(body, compute_type=ctype, out_memory_spaces=MemorySpace.Device)(*args)
    with co.compute_on(ctype):
        return jax.jit(body)(*args)
