"""Hot-op kernels behind one seam: each op has a reference (pure XLA) and a Triton implementation.

One module per op (``fp8_linear``, ``fp4_moe``) holds three things:

* the public function the model calls, a small dispatcher on :func:`use_triton`;
* ``*_reference``: the XLA code the model always ran (the spec, the CPU path; CPU results are pinned bit for bit by
  the golden tests);
* the ``@triton.jit`` kernels and their jax-triton launcher. The kernels import with plain ``triton`` (CI runs them
  on CPU under ``TRITON_INTERPRET=1`` with torch tensors); ``jax_triton`` is imported lazily in the launcher only.

``Config.kernels`` chooses: ``"reference"`` never uses Triton; ``"triton"`` always does and fails loudly where it
cannot (CPU backend, jax-triton or triton missing); ``"auto"`` uses Triton on a GPU backend when jax-triton imports.
Both implementations compute the same function up to fp32 summation order (each module's docstring says exactly).

Block sizes per architecture are chosen in one place, :func:`arch`; ``tl.dot_scaled`` (native MXFP4/FP8 scaled
dots) is only for AMD gfx950 (``arch() == "gfx950"``), every other target dequantizes in registers.
"""

from __future__ import annotations

import functools
import os

import jax

MODES = ("auto", "reference", "triton")


@functools.cache
def _jax_triton_error() -> str | None:
    """Why jax-triton cannot be used here (``None`` when it imports)."""
    try:
        import jax_triton  # noqa: F401
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else at import
        return f"{type(e).__name__}: {e}"
    return None


def triton_unavailable() -> str | None:
    """Why the Triton kernels cannot run here (no GPU backend, or jax-triton/triton missing); ``None`` if they can."""
    backend = jax.default_backend()
    if backend not in ("gpu", "cuda", "rocm"):
        return f"needs a GPU backend, JAX's default backend is {backend!r}"
    err = _jax_triton_error()
    if err is not None:
        return f"needs jax-triton and triton ({err}); install them (pip install jax-triton)"
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


def single_device() -> bool:
    """True unless a mesh of several devices is in context. The kernels are launched on one device's arrays; under a
    multi-device mesh the callers keep the XLA path (which GSPMD partitions), see each op's docstring."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


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
FFI_TARGET = "triton_kernel_call_ffi"  # jaxlib >= 0.10.1 (CUDA): typed FFI, initialized once, CUDA-graph compatible


def _graphable_lowering(ctx, *args, **params):
    """jax-triton 0.3.1's lowering of its kernel-call primitive, emitting jaxlib's typed-FFI target
    ``triton_kernel_call_ffi`` (the compressed kernel proto as its ``opaque`` attribute) instead of the legacy
    ``triton_kernel_call`` custom call. Same kernel, same launch; but the legacy call is opaque to XLA's command
    buffers: every launch is a host round trip through its handler, and it splits the step's CUDA graphs, so each
    XLA kernel around it is launched on its own (measured on an H200: a 14 us FP8 GEMV cost 45 us of wall time, a
    3-layer decode step was 1.7 ms of kernels in 5.5 ms). jax-triton >= 0.4 emits this target itself."""
    import jax_triton.triton_lib as tlib

    real = jax.ffi.ffi_lowering

    def ffi_lowering(target, *, api_version=2, backend_config=None, operand_output_aliases=None, **kw):
        if target != "triton_kernel_call" or api_version != 2:
            return real(target, api_version=api_version, backend_config=backend_config,
                        operand_output_aliases=operand_output_aliases, **kw)
        rule = real(FFI_TARGET, api_version=4, operand_output_aliases=operand_output_aliases, **kw)
        return lambda ctx, *a: rule(ctx, *a, opaque=backend_config)

    jax.ffi.ffi_lowering = ffi_lowering  # only for this call (lowering runs on one thread)
    try:
        return tlib.triton_kernel_call_lowering(tlib.get_cuda_backend, ctx, *args, **params)
    finally:
        jax.ffi.ffi_lowering = real


@functools.cache
def ffi_launch() -> bool:
    """Install :func:`_graphable_lowering` for jax-triton's primitive on CUDA (once), unless ``DSV4_TRITON_FFI=0``
    or jax is older than 0.10.1 (no such target). ROCm keeps jax-triton's own lowering: jaxlib registers the FFI
    target for CUDA only. Returns whether it is installed."""
    if os.environ.get("DSV4_TRITON_FFI", "1") == "0" or jax.__version_info__ < (0, 10, 1):
        return False
    try:
        import jax_triton.triton_lib as tlib
        from jax.interpreters import mlir
    except ImportError:
        return False
    if getattr(tlib, "_dsv4_shim", False) or not hasattr(tlib, "triton_kernel_call_lowering"):
        return False  # the CPU interpreter shim of the tests, or an unknown jax-triton
    mlir.register_lowering(tlib.triton_kernel_call_p, _graphable_lowering, platform="cuda")
    return True


def triton_call(*args, **kwargs):
    """``jax_triton.triton_call`` with the CUDA-graph-compatible lowering installed (:func:`ffi_launch`): the one
    entry point of every kernel launcher here."""
    import jax_triton as jt

    ffi_launch()
    return jt.triton_call(*args, **kwargs)
