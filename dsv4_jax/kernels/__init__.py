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
def triton_call(*args, **kwargs):
    """``jax_triton.triton_call``: the one entry point of every kernel launcher here (imported lazily, so the model
    imports without jax-triton; the CPU tests substitute the interpreter shim of ``tests/triton_shim.py``).

    Each call costs ~30 us of wall time beyond its kernel on an H200 (a 14 us FP8 GEMV: 45 us per call inside one
    jitted program), with jax-triton 0.3.1's legacy custom call and equally with jaxlib's typed-FFI target
    ``triton_kernel_call_ffi``, with or without ``CUSTOM_CALL`` command buffers (tried 2026-11-29,
    docs/performance.md): that overhead, not the kernels, now bounds decode at small batch."""
    import jax_triton as jt

    return jt.triton_call(*args, **kwargs)
