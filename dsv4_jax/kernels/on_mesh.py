"""The kernels under a multi-device mesh: each device runs a one-device implementation on its own shards.

A Triton kernel (a jax-triton or XLA custom call) has no partitioning rule, so under a mesh XLA cannot split it; the
linears used to fall back to their XLA recipes there (``dequant`` copies + a GEMM per weight: on two H200s, batch 1,
~170 us of convert fusions per 3-layer step where one device ran the FP8 GEMV). Here the caller names how its weight
is split (the logical axes of :mod:`dsv4_jax.modeling.weights`) and :func:`linear_on_mesh` /
:func:`grouped_on_mesh` wrap the one-device function in ``jax.shard_map`` with matching specs:

* ``"cols"`` (``wq_b``, the shared expert's ``w1``/``w3``: output features split over
  ``model``): x whole, W's rows split, y split on its last dim. Every output element is one device's: same sums as
  one device.
* ``"rows"`` (``wo_b``, the shared expert's ``w2``: input features split over ``model``): x and W split on K,
  each device's fp32 partial sum, ``psum`` over ``model``, one rounding to ``out_dtype``: the order of the GSPMD
  reference (partial dots in fp32 + all-reduce + convert). K splits on whole 128-wide blocks, so the activation
  quantization per 1x128 block is unchanged.
* ``"none"`` (``wq_a``, ``wkv``, the indexer's ``wq_b``, the MTP projections: replicated): every device computes
  the whole product, as GSPMD does with the reference.
* :func:`pair_on_mesh` (the shared expert's ``w1``/``w3`` in one two-weight GEMV): both split as ``"cols"``.
* :func:`grouped_on_mesh` (``wo_a``: its groups split over ``model``): o and W split by group.
* :func:`replicated_on_mesh` (mHC's ``hc_pre``, the router: activations replicated over ``model``, small replicated
  weights): every device computes its batch rows whole, exactly what one device computes for them.

Batch rows stay split over ``data`` where the batch divides. ``None`` is returned where a split would cut a
128x128 scale block (the caller then keeps the XLA reference, which GSPMD partitions). The one-device function is
an argument so that the CPU tests can check these specs with the XLA reference inside (the kernels run on GPUs
only).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv4_jax.kernels import single_device
from dsv4_jax.modeling.quant import Fp8Tensor
from dsv4_jax.sharding import DATA, MODEL

QBLOCK = 128
PARALLEL = ("cols", "rows", "none")


def _mesh():
    return None if single_device() else jax.sharding.get_abstract_mesh()


def _lead(mesh, x: jax.Array) -> tuple:
    """Specs of x's leading dims: the batch (first) dim over ``data`` where it divides, the rest whole."""
    d = mesh.shape.get(DATA, 1)
    first = DATA if d > 1 and x.shape[0] % d == 0 else None
    return (first,) + (None,) * (x.ndim - 2)


def linear_on_mesh(fn: Callable, x: jax.Array, w: Fp8Tensor, out_dtype, parallel: str) -> jax.Array | None:
    """``fn(x_local, w_local, out_dtype) -> y_local`` on every device under the current mesh, ``x [..., K] @
    W[N, K].T``; ``None`` when there is no multi-device mesh or the split would cut a scale block."""
    mesh = _mesh()
    if parallel not in PARALLEL:
        raise ValueError(f"linear_on_mesh: parallel={parallel!r}, expected one of {PARALLEL}")
    if mesh is None or x.ndim < 2:
        return None
    m = mesh.shape.get(MODEL, 1)
    N, K = w.q.shape
    lead = _lead(mesh, x)
    if parallel == "cols":
        if N % (QBLOCK * m):
            return None
        specs, out = (P(*lead, None), P(MODEL, None), P(MODEL, None)), P(*lead, MODEL)

        def local(xl, q, s):
            return fn(xl, Fp8Tensor(q=q, scale=s), out_dtype)
    elif parallel == "rows":
        if K % (QBLOCK * m):
            return None
        specs, out = (P(*lead, MODEL), P(None, MODEL), P(None, MODEL)), P(*lead, None)

        def local(xl, q, s):
            return jax.lax.psum(fn(xl, Fp8Tensor(q=q, scale=s), jnp.float32), MODEL).astype(out_dtype)
    else:
        specs, out = (P(*lead, None), P(), P()), P(*lead, None)

        def local(xl, q, s):
            return fn(xl, Fp8Tensor(q=q, scale=s), out_dtype)
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out)(x, w.q, w.scale)


def pair_on_mesh(fn: Callable, x: jax.Array, wa: Fp8Tensor, wb: Fp8Tensor, parallel: str | None):
    """``fn(x_local, wa_local, wb_local) -> (ya_local, yb_local)`` on every device for two weights of one input split
    alike (the shared expert's ``w1``/``w3``: ``"cols"``, output features over ``model``; or replicated, ``"none"``
    / ``None``): x whole on each device (its batch rows over ``data``), each device's outputs its own columns.
    ``None`` without a multi-device mesh, for ``"rows"``, or where a split would cut a scale block."""
    mesh = _mesh()
    if mesh is None or x.ndim < 2 or parallel == "rows":
        return None
    m = mesh.shape.get(MODEL, 1)
    lead = _lead(mesh, x)
    if parallel == "cols":
        if wa.q.shape[0] % (QBLOCK * m) or wb.q.shape[0] % (QBLOCK * m):
            return None
        wspec, out = P(MODEL, None), P(*lead, MODEL)
    else:
        wspec, out = P(), P(*lead, None)

    def local(xl, qa, sa, qb, sb):
        return fn(xl, Fp8Tensor(q=qa, scale=sa), Fp8Tensor(q=qb, scale=sb))

    return jax.shard_map(local, mesh=mesh, in_specs=(P(*lead, None),) + (wspec,) * 4, out_specs=(out, out))(
        x, wa.q, wa.scale, wb.q, wb.scale)


def grouped_on_mesh(fn: Callable, o: jax.Array, w: Fp8Tensor, out_dtype) -> jax.Array | None:
    """``fn(o_local, w_local, out_dtype)`` per device for ``wo_a``'s grouped projection ``o [..., G, d] ->
    [..., G, R]`` with the groups split over ``model``; ``None`` as :func:`linear_on_mesh`."""
    mesh = _mesh()
    if mesh is None or o.ndim < 3:
        return None
    m = mesh.shape.get(MODEL, 1)
    G = o.shape[-2]
    if G % m or (w.q.shape[0] // m) % QBLOCK:
        return None
    lead = _lead(mesh, o)[:-1]  # o has one more trailing dim than a linear's input

    def local(ol, q, s):
        return fn(ol, Fp8Tensor(q=q, scale=s), out_dtype)

    specs = (P(*lead, MODEL, None), P(MODEL, None), P(MODEL, None))
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(*lead, MODEL, None))(o, w.q, w.scale)


def replicated_on_mesh(fn: Callable, acts: tuple, params) -> tuple | jax.Array:
    """``fn(*acts, params)``, under a multi-device mesh on every device with its local rows: each activation's
    leading (batch) dim over ``data`` where every one divides, otherwise whole; ``params`` (a pytree of weights
    replicated by the sharding rules) whole. Every device computes all of its rows as one device would (the
    ``model`` devices the same rows): results identical to one device's. Without such a mesh, ``fn`` runs as is."""
    mesh = _mesh()
    if mesh is None:
        return fn(*acts, params)
    d = mesh.shape.get(DATA, 1)
    row = P(DATA) if d > 1 and all(a.shape[0] % d == 0 for a in acts) else P()
    return jax.shard_map(fn, mesh=mesh, in_specs=(row,) * len(acts) + (P(),), out_specs=row)(*acts, params)
