"""Hot-op kernels behind one seam: each op has a reference (pure XLA) and a Triton implementation.

One module per op (``fp8_linear``, ``fp4_moe``, ``sparse_attention``, ``mhc``) holds three things:

* the public function the model calls, a small dispatcher on :func:`use_triton`;
* ``*_reference``: the XLA code the model always ran (the spec, the CPU path; CPU results are pinned bit for bit by
  the golden tests);
* the ``@triton.jit`` kernels and their launcher (:func:`triton_call`: XLA's Triton custom call, or jax-triton; see
  :func:`launch_route`). The kernels import with plain ``triton`` (CI runs them on CPU under ``TRITON_INTERPRET=1``
  with torch tensors); ``jax_triton`` is imported lazily in the launcher only.

Where one op's module would pass ~500 lines, a part moves to a module beside it named after the op:
``sparse_attention_ref`` (the reference), ``sparse_attention_tiles`` (the kernel's helpers), ``sparse_attention_torch``
(torch launchers), ``sparse_attention_ws`` (the Gluon kernel of sm_90 decode calls), ``fp8_prefill``, ``fp8_gemv``
(the decode GEMV kernels), ``fp4_moe_gemv`` / ``_wx`` / ``_mma`` / ``_scaled``, ``indexer_prefill`` (kernel forms),
``bf16_proj`` (the decode step's bf16 projections, an op of its own).

``Config.kernels`` chooses: ``"reference"`` never uses Triton; ``"triton"`` always does and fails loudly where it
cannot (CPU backend, or the packages its launch route needs missing); ``"auto"`` uses Triton on a GPU backend when they
import.
Both implementations compute the same function up to fp32 summation order (each module's docstring says exactly).

Block sizes per architecture are chosen in one place, :func:`arch`; ``tl.dot_scaled`` (MXFP4 x MXFP8 scaled dots)
serves the tiled FP4 experts on gfx950 (native); on sm90 they decode the weight in registers as the bf16 dots' A
operand (``fp4_moe_wx``, measured faster than Triton's rewrite of the scaled dot); every other target, and the
decode GEMV kernels, dequantize FP4 in registers too.
"""

from __future__ import annotations

import functools
import os

import jax

MODES = ("auto", "reference", "triton")


ROUTES = ("auto", "xla", "jax-triton")
_route = [os.environ.get("DSV4_TRITON_LAUNCH", "auto")]
TILED_MIN_ROWS = 256  # the FP8 GEMM launches from this many rows on (prefill) count as tiled for the "auto" route


def launch_route() -> str:
    """How kernels are launched (set with the ``DSV4_TRITON_LAUNCH`` environment variable or
    :func:`set_launch_route`):

    * ``"xla"``: XLA compiles the kernel's Triton IR into the executable (``__gpu$xla.gpu.triton`` custom calls,
      :mod:`dsv4_jax.kernels.xla_triton`), so the kernels sit in the step's CUDA graphs with no host code per launch;
    * ``"jax-triton"``: ``jax_triton.triton_call``, a legacy custom call per launch, outside XLA's CUDA graphs
      (~30 us of host time each on an H200);
    * ``"auto"`` (default): the tiled kernels (the FP4 MoE's grouped GEMMs, the FP8 GEMM from
      :data:`TILED_MIN_ROWS` rows) through jax-triton where it is installed, every other kernel through XLA.

    Measured on H200s (2026-11-30, ``docs/performance.md``): with the mHC and router kernels on, a 3-layer V4-Flash
    decode step took 1.20 ms through XLA against 1.38 ms through jax-triton at batch 1, and 5.67 against 6.52 ms at
    batch 32 (one GPU, gathered GEMV experts); but on two GPUs at batch 32, where the experts run the tiled kernels,
    XLA's build of them made the step 5.42 ms against 4.68 ms. XLA compiles the TTIR with its own bundled Triton,
    whose pipeline differs from the ``triton`` wheel's; why the tiled kernels lose there is not profiled."""
    route = _route[0]
    if route not in ROUTES:
        raise ValueError(f"DSV4_TRITON_LAUNCH={route!r}, expected one of {ROUTES}")
    return route


def route_for(tiled: bool) -> str:
    """The route a launch takes: :func:`launch_route`, with ``"auto"`` resolved for a tiled or an untiled kernel."""
    route = launch_route()
    if route == "auto":
        return "jax-triton" if tiled and _import_error("jax_triton") is None else "xla"
    return route


def set_launch_route(route: str) -> None:
    """Choose the launch route for programs traced from now on (see :func:`launch_route`). A change clears JAX's
    tracing and compilation caches: the route is not part of their keys, so a jitted function traced under the old
    route would otherwise keep launching through it."""
    if route not in ROUTES:
        raise ValueError(f"launch route {route!r}, expected one of {ROUTES}")
    if route != _route[0]:
        jax.clear_caches()
    _route[0] = route


@functools.cache
def _import_error(module: str) -> str | None:
    """Why ``module`` cannot be imported here (``None`` when it imports).

    jax-triton 0.3.1 sets ``TRITON_CACHE_DIR`` to ``""`` when imported, which leaves every later ``@triton.jit``
    launch of the process (torch tensors: the probes, the torch launchers) failing with "Could not create or locate
    cache dir"; the variable is put back as it was (jax-triton compiles through its own cache, not Triton's)."""
    saved = os.environ.get("TRITON_CACHE_DIR")
    try:
        __import__(module)
    except Exception as e:  # ImportError, or a broken install raising something else at import
        return f"{type(e).__name__}: {e}"
    finally:
        if saved is None:
            if os.environ.get("TRITON_CACHE_DIR") == "":
                del os.environ["TRITON_CACHE_DIR"]
        else:
            os.environ["TRITON_CACHE_DIR"] = saved
    return None


def triton_unavailable() -> str | None:
    """Why the Triton kernels cannot run here (no GPU backend, or triton / jax-triton missing); ``None`` if they
    can. The XLA route needs only the ``triton`` package (its frontend writes the kernels' IR)."""
    backend = jax.default_backend()
    if backend not in ("gpu", "cuda", "rocm"):
        return f"needs a GPU backend, JAX's default backend is {backend!r}"
    needed = ("triton", "jax_triton") if launch_route() == "jax-triton" else ("triton",)
    for module in needed:
        err = _import_error(module)
        if err is not None:
            return f"needs {module} ({err}); install it (pip install {module.replace('_', '-')})"
    return None


def use_triton(cfg) -> bool:
    """Whether the hot ops run their Triton kernels for ``cfg`` (a ``Config`` or its ``kernels`` string).

    Raises ``RuntimeError`` for ``kernels="triton"`` on a CPU backend or without jax-triton/triton.
    """
    mode = cfg if isinstance(cfg, str) else cfg.kernels
    if mode not in MODES:
        raise ValueError(f"kernels={mode!r}, expected one of {MODES}")
    if mode == "reference":
        return False
    why = triton_unavailable()
    if mode == "triton" and why is not None:
        raise RuntimeError(f"kernels='triton' {why}; or use kernels='reference' or 'auto'")
    return why is None


def use_opt_in_triton(kernels: str) -> bool:
    """Whether an opt-in kernel (one that passes its GPU tests but is not faster than its reference everywhere: the
    indexer kernels and its query kernel; sparse attention outside the cases of its own ``use_kernel``) runs:
    only with ``kernels="triton"``, on one device, where :func:`use_triton` says yes. ``"auto"`` keeps its XLA
    reference. (mHC and the router left this switch on 2026-11-30, after the golden tests of criteria 1
    and 2 passed on an H200 with them on.)"""
    return kernels == "triton" and use_triton(kernels) and single_device()


def use_switched_triton(kernels: str, auto: bool, one_device: bool = False) -> bool:
    """Whether a kernel with its own ``"auto"`` switch (a module constant such as ``ring_write.AUTO``, which a
    benchmark variant can turn off) runs: with the switch on wherever :func:`use_triton` says so (``one_device``: and
    only without a multi-device mesh, for kernels whose callers have no per-device form), off only where opted in
    (:func:`use_opt_in_triton`)."""
    if not auto:
        return use_opt_in_triton(kernels)
    return use_triton(kernels) and (single_device() or not one_device)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``): Triton block shapes must be powers of two."""
    return 1 << max(n - 1, 0).bit_length()


def env_tiles(var: str, keys: tuple[str, ...]) -> dict:
    """Plan entries from the environment variable ``var`` (``"KEY=INT,KEY=INT"``; unset or empty: none), every key one
    of ``keys``: the kernels' benchmark knobs (``DSV4_MOE_TILE``, ``DSV4_INDEX_TILE``, ``DSV4_ROUTER_TILE``,
    ``DSV4_MHC_TILE``), read when a launch is traced. Anything else is refused, naming the variable and the entry."""
    text = os.environ.get(var, "")
    out = {}
    for kv in filter(None, text.split(",")):
        key, _, val = kv.partition("=")
        if key not in keys or not val.lstrip("-").isdigit():
            raise ValueError(f"{var}={text!r}: {kv!r} is not KEY=INT with KEY one of {keys}")
        out[key] = int(val)
    return out


def split_output(split: int, shape: tuple[int, ...], out_dtype, f32):
    """``(shape, dtype)`` of a launch whose K may be split: ``[split, *shape]`` fp32 partials (``f32``: the float32
    dtype of the caller's library, jax or torch) when ``split > 1``, else ``shape`` in ``out_dtype``, written by the
    kernel directly. :func:`sum_splits` finishes it."""
    return ((split, *shape), f32) if split > 1 else (tuple(shape), out_dtype)


def sum_splits(y, split: int, out_dtype):
    """The partials of :func:`split_output` summed over their leading axis in a fixed order (deterministic: no
    atomics) and cast to ``out_dtype``; ``y`` itself when unsplit. Jax arrays and torch tensors alike."""
    if split == 1:
        return y
    y = y.sum(0)
    return y.astype(out_dtype) if hasattr(y, "astype") else y.to(out_dtype)


def single_device() -> bool:
    """True unless a mesh of several devices is in context that XLA partitions. The kernels are launched on one
    device's arrays; under a multi-device mesh the callers keep the XLA path (which GSPMD partitions), see each op's
    docstring. Inside a ``shard_map`` over every axis of the mesh (all axes manual: each device runs the body on its
    own shards, as ``modeling.attention`` and ``modeling.moe`` do) the code is one device's again: True."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1 or set(mesh.manual_axes) == set(mesh.axis_names)


SM_COUNT = {"sm90": 132, "sm80": 108, "gfx950": 256, "gfx9": 304, "cpu": 4}  # compute units per arch() family


@functools.cache
def arch() -> str:
    """The accelerator family the block sizes are chosen for: "sm90" (Hopper), "sm80" (Ampere/Ada/other NVIDIA),
    "gfx950" (MI355X), "gfx9" (other CDNA) or "cpu" (the interpreter)."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return "cpu"
    kind = getattr(dev, "compute_capability", None)
    if kind is not None:  # NVIDIA: "9.0"
        return "sm90" if str(kind).split(".")[0] == "9" else "sm80"
    name = str(getattr(dev, "device_kind", "")).lower()
    return "gfx950" if "mi355" in name or "gfx950" in name else "gfx9"


def check_prefetch(pf: int, target: str, what: str) -> None:
    """Refuse the opt-in L2 prefetch plan key (``PF``: ``common.l2_prefetch``, PTX inline assembly) on a target
    that is not an NVIDIA GPU (AMD, the interpreter), naming the kernel, the value and the target: the one check
    every kernel with that key calls before it launches."""
    if pf and not target.startswith("sm"):
        raise ValueError(f"{what}: PF={pf} (L2 prefetch, PTX inline assembly) needs an NVIDIA GPU, not {target}")


@functools.cache
def fp8_dot_supported() -> bool:
    """Whether ``tl.dot`` takes OCP e4m3 (``float8_e4m3fn``) operands here: NVIDIA sm89+ (Ada, Hopper, Blackwell)
    or AMD gfx950 (MI300's native FP8 is the ``fnuz`` variant). The CPU interpreter emulates it."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return True
    cc = getattr(dev, "compute_capability", None)
    if cc is not None:
        major, minor = (int(v) for v in str(cc).split(".")[:2])
        return (major, minor) >= (8, 9)
    return arch() == "gfx950"


# ---------------------------------------------------------------------------------------------- launching
def triton_call(*args, tiled: bool = False, **kwargs):
    """Launch a ``@triton.jit`` kernel with jax-triton's ``triton_call`` signature, by :func:`route_for` (``tiled``:
    the launcher's kernel is a tiled GEMM, see :func:`launch_route`): the one entry point of every kernel launcher
    here (the CPU tests substitute the interpreter shim of ``tests/triton_shim.py`` through the jax-triton route).

    The jax-triton route costs ~30 us of wall time per call beyond its kernel on an H200 (a 14 us FP8 GEMV: 45 us
    per call inside one jitted program), with jax-triton 0.3.1's legacy custom call and equally with jaxlib's
    typed-FFI target ``triton_kernel_call_ffi`` (tried 2026-11-29, docs/performance.md). The XLA route has no host
    code per launch. ``maxnreg`` (a register cap for ptxas: a speed choice, never a result's) reaches the XLA route
    only: jax-triton 0.3.1 has no such option, so that route drops it."""
    if route_for(tiled) == "jax-triton":
        import jax_triton as jt

        kwargs.pop("maxnreg", None)
        return jt.triton_call(*args, **kwargs)
    from dsv4_jax.kernels.xla_triton import triton_call as xla_call

    return xla_call(*args, **kwargs)
