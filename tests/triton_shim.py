"""A CPU stand-in for ``jax_triton.triton_call``: the model's own ``@triton.jit`` kernels under Triton's interpreter.

Used in a subprocess (``TRITON_INTERPRET=1`` must be set before ``triton`` -- hence ``dsv4_jax`` -- is imported, and
must not leak into the test process): :func:`install` puts a fake ``jax_triton`` module in ``sys.modules`` and makes
``dsv4_jax.kernels.use_triton`` say yes for ``kernels="auto"``/``"triton"`` on the CPU backend, so that
``d.forward``/``block`` with ``Config(kernels="triton")`` run the very launchers of ``kernels/fp8_linear.py`` and
``kernels/fp4_moe.py`` (their grids, plans, layouts and metaparameters), each kernel launch becoming a
``jax.pure_callback`` that runs the kernel on torch CPU tensors.

Faithful to jax-triton 0.3.1 (``triton_lib.triton_call``): positional arguments are flattened, Python
``bool``/``int``/``float``/``np.float32`` values are scalar arguments kept in place, every other argument is an
array; the outputs' pointers follow all inputs, metaparameters are passed as ``constexpr`` keywords, ``grid`` may be
an int, a tuple of up to three ints or a callable taking the metaparameter dict; ``input_output_aliases`` maps an
ARRAY argument index (scalars not counted) to an output index and the output buffer IS the input buffer (the kernel
sees the same memory through both pointers); outputs are NOT zeroed unless listed in ``zeroed_outputs`` (jax-triton
hands the kernel uninitialised memory): here they are poisoned (NaN, or all bits set for integers) so that an
element a kernel forgets to write shows up.

Three interpreter defects are corrected (GPU semantics, what the compiled kernels do), in the subprocess only:

* Triton 3.6's interpreter multiplies ``bfloat16`` dot operands as their raw uint16 bit patterns; here the bf16
  operands are widened exactly to fp32 first (a GPU bf16 ``tl.dot`` forms the exact products, accumulated in fp32).
* it converts fp32 -> bf16 (``.to(tl.bfloat16)``) by truncation; a GPU rounds to nearest even (LLVM ``fptrunc``).
* it has no ``tl.dot_scaled`` (its builder lacks ``create_dot_scaled``): :func:`create_dot_scaled` implements the
  documented semantics (e2m1 / e4m3 operands times e8m0 scales per 32 along K, fp32 sums).

The kernels run on a worker thread started by :func:`install` (in the main thread, before XLA runs anything): XLA's
CPU threads, where ``pure_callback`` calls back, flush fp32 denormals to zero (FTZ/DAZ), and the FP4 kernels decode
the e2m1 code 0.5 through an fp32 denormal (exact on GPUs, which keep denormals in plain fp32 arithmetic); under
FTZ every 0.5 weight would read as 0. :func:`_denormals_kept` checks the worker before each launch.

What the interpreter cannot show: hardware accumulation. Sums here are numpy fp32 (exact products, some order); on
Hopper an e4m3 ``tl.dot`` adds a 128-wide block in a narrower accumulator (``tests/test_kernels_fp8.py``).
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import time
import types

import numpy as np

MODES = ("auto", "reference", "triton")


# ---------------------------------------------------------------------------------------------- numpy <-> torch
def _to_torch(a: np.ndarray):
    """A writable torch CPU tensor holding a copy of ``a`` (bf16 and e4m3 travel as their bit patterns)."""
    import ml_dtypes
    import torch

    a = np.ascontiguousarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    if a.dtype == ml_dtypes.float8_e4m3fn:
        return torch.from_numpy(a.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    return torch.from_numpy(a.copy())


def _to_numpy(t, dtype) -> np.ndarray:
    """The torch tensor ``t`` as a numpy array of the jax dtype ``dtype``."""
    import ml_dtypes
    import torch

    dtype = np.dtype(dtype)
    if dtype == ml_dtypes.bfloat16:
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    if dtype == ml_dtypes.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return t.numpy().astype(dtype, copy=False)


def _empty(shape, dtype):
    """An output buffer as jax-triton would hand it over (uninitialised): poisoned, so unwritten elements show."""
    import ml_dtypes

    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating) or dtype in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn):
        return _to_torch(np.full(shape, np.nan, np.float32).astype(dtype))
    return _to_torch(np.full(shape, -1, np.int64).astype(dtype))


def normalize_grid(grid, metaparams: dict) -> tuple[int, int, int]:
    """jax-triton's grid rule: a callable gets the metaparameter dict; an int or up to 3 ints, padded with 1."""
    if callable(grid):
        grid = grid(metaparams)
    if isinstance(grid, int):
        grid = (grid,)
    if len(grid) > 3:
        raise ValueError(f"`grid` should have three or fewer dimensions, got {grid}")
    return tuple(int(g) for g in grid) + (1,) * (3 - len(grid))


# ---------------------------------------------------------------------------------------------- triton_call
LAUNCHES: list[dict] = []  # one entry per kernel launch (name, grid, metaparameters, seconds): what ran
_WORKER: list[concurrent.futures.ThreadPoolExecutor] = []  # the launch thread (started by install, see docstring)


def _denormals_kept() -> bool:
    """Whether fp32 denormals survive arithmetic on this thread (no FTZ/DAZ): 2**-127 * 2**126 == 0.5."""
    return float(np.array([2.0**-127], np.float32)[0] * np.float32(2.0**126)) == 0.5


def _on_worker(fn):
    """Run ``fn()`` on the worker thread, refusing to run where denormals are flushed."""
    if not _WORKER:
        raise RuntimeError("triton_shim: install() was not called")

    def checked():
        if not _denormals_kept():
            raise RuntimeError("triton_shim: fp32 denormals are flushed on the launch thread (FTZ/DAZ); the FP4 "
                               "kernels' e2m1 decode needs them, as on GPUs")
        return fn()

    return _WORKER[0].submit(checked).result()


def triton_call(*args, kernel, out_shape, grid, name: str = "", custom_call_target_name: str = "triton_kernel_call",
                num_warps: int | None = None, num_stages: int | None = None, num_ctas: int = 1,
                compute_capability: int | None = None, enable_fp_fusion: bool = True,
                input_output_aliases: dict[int, int] | None = None, zeroed_outputs=(), debug: bool = False,
                serialized_metadata: bytes = b"", **metaparams):
    """``jax_triton.triton_call`` with the same signature, run as a ``jax.pure_callback`` under the interpreter."""
    import jax
    import torch

    flat_args, _ = jax.tree_util.tree_flatten(args)
    out_shape = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), out_shape)
    flat_out, out_tree = jax.tree_util.tree_flatten(out_shape)
    slots, arrays = [], []  # slots: ("a", array index) or ("s", scalar value), in argument order
    for arg in flat_args:
        if isinstance(arg, (bool, int, float)):
            slots.append(("s", arg))
        elif isinstance(arg, np.float32):
            slots.append(("s", float(arg)))
        else:
            slots.append(("a", len(arrays)))
            arrays.append(arg)
    aliases = dict(input_output_aliases or {})
    zeroed = zeroed_outputs(metaparams) if callable(zeroed_outputs) else tuple(zeroed_outputs)
    g = normalize_grid(grid, metaparams)
    launch_kw = dict(num_warps=4 if num_warps is None else num_warps,  # jax-triton's defaults
                     num_stages=3 if num_stages is None else num_stages)
    record = dict(kernel=getattr(kernel, "__name__", str(kernel)), grid=g, metaparams=dict(metaparams))

    def host(*vals):
        tens = [_to_torch(np.asarray(v)) for v in vals]
        outs = []
        for i, o in enumerate(flat_out):
            src = [a for a, oi in aliases.items() if oi == i]
            if src:  # the output buffer is the input buffer
                t = tens[src[0]]
                if tuple(t.shape) != tuple(o.shape):
                    raise ValueError(f"input_output_aliases: input {src[0]} {tuple(t.shape)} vs output {o.shape}")
            elif i in zeroed:
                t = _to_torch(np.zeros(o.shape, o.dtype))
            else:
                t = _empty(o.shape, o.dtype)
            outs.append(t)
        call = [tens[v] if kind == "a" else v for kind, v in slots]

        def launch():
            with torch.no_grad():
                kernel[g](*call, *outs, **launch_kw, **metaparams)

        t0 = time.perf_counter()
        _on_worker(launch)
        LAUNCHES.append({**record, "seconds": time.perf_counter() - t0})
        return tuple(_to_numpy(t, o.dtype) for t, o in zip(outs, flat_out))

    res = jax.pure_callback(host, tuple(flat_out), *arrays, vmap_method="sequential")
    return jax.tree_util.tree_unflatten(out_tree, list(res))


# ---------------------------------------------------------------------------------------------- interpreter fixes
def fix_interpreter() -> None:
    """GPU semantics for the interpreter defects of the module docstring (bf16 dots, fp32 -> bf16 rounding, the
    missing ``tl.dot_scaled``); idempotent. The kernel test subprocesses that launch kernels directly call it too."""
    import triton.language as tl
    from triton.runtime import interpreter as itp

    B = itp.InterpreterBuilder
    if getattr(B, "_dsv4_fixed", False):
        return
    dot0, cast0 = B.create_dot, B.cast_impl

    def widen(h):  # bf16 bits (uint16) -> the exact fp32 values
        return itp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = widen(a)
        if b.dtype.scalar == tl.bfloat16:
            b = widen(b)
        return dot0(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, np.float32).view(np.uint32).astype(np.uint64)
            rne = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # nearest even (finite)
            nan = np.isnan(src.data)
            rne = np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), rne)  # NaN stays NaN (quiet)
            return itp.TensorHandle(rne, tl.bfloat16)
        return cast0(self, src, dst_type)

    B.create_dot, B.cast_impl, B._dsv4_fixed = create_dot, cast_impl, True
    B.create_dot_scaled = create_dot_scaled
    from triton.language.semantic import TritonSemantic

    dot_scaled0 = TritonSemantic.dot_scaled

    def dot_scaled(self, lhs, lhs_scale, lhs_format, rhs, rhs_scale, rhs_format, *args, **kwargs):
        # the interpreter passes the format strings bare; the compiler (and this semantic) wraps them as constexprs
        fmt = [f if isinstance(f, tl.constexpr) else tl.constexpr(f) for f in (lhs_format, rhs_format)]
        return dot_scaled0(self, lhs, lhs_scale, fmt[0], rhs, rhs_scale, fmt[1], *args, **kwargs)

    TritonSemantic.dot_scaled = dot_scaled
    _patch_once_per_launch(itp, tl)


def _mx_values(data: np.ndarray, fmt: str, k_axis: int) -> np.ndarray:
    """The fp32 values of a ``tl.dot_scaled`` operand held as raw bytes: ``e2m1`` two codes per byte along the K
    axis (the lower-index element in the low nibble), ``e4m3`` one e4m3fn byte per element."""
    import ml_dtypes

    raw = np.ascontiguousarray(data).view(np.uint8)
    if fmt == "e4m3":
        return raw.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    if fmt != "e2m1":
        raise NotImplementedError(f"triton_shim: dot_scaled format {fmt} is not emulated")
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
    lo, hi = grid[raw & 15], grid[raw >> 4]
    both = np.stack([lo, hi], axis=k_axis % raw.ndim + 1)  # [..., K/2, 2, ...]: element 2k, then 2k + 1
    shape = list(raw.shape)
    shape[k_axis] *= 2
    return both.reshape(shape)


def create_dot_scaled(self, lhs, lhs_scale, lhs_format, rhs, rhs_scale, rhs_format, fast_math, lhs_k_pack,
                      rhs_k_pack, acc):
    """``tl.dot_scaled``, which Triton 3.6's interpreter lacks, with the semantics of its GPU lowerings: each operand
    decoded exactly (:func:`_mx_values`), times its e8m0 scale ``2**(s - 127)`` per 32 elements along K (lhs scale
    ``[M, K/32]``, rhs scale ``[N, K/32]``), then an fp32 matmul added to ``acc``. K-packed e2m1 and e4m3 only."""
    import triton.language as tl
    from triton.runtime import interpreter as itp

    fa, fb = lhs_format.name.lower(), rhs_format.name.lower()
    if not (lhs_k_pack and rhs_k_pack):
        raise NotImplementedError("triton_shim: dot_scaled with e2m1 packed along M/N is not emulated")
    a, b = _mx_values(lhs.data, fa, -1), _mx_values(rhs.data, fb, -2)  # [M, K], [K, N]
    if lhs_scale is not None:
        a = a * np.repeat(np.exp2(lhs_scale.data.astype(np.float32) - 127), 32, axis=-1)
    if rhs_scale is not None:
        b = b * np.repeat(np.exp2(rhs_scale.data.astype(np.float32) - 127), 32, axis=-1).T
    return itp.TensorHandle((np.matmul(a, b) + acc.data).astype(np.float32), tl.float32)


def _patch_once_per_launch(itp, tl) -> None:
    """Speed only: Triton 3.6's interpreter re-patches ``triton.language`` (``inspect.getmembers`` of 4 modules,
    ~0.3 ms) on every call of a nested ``@jit`` function, and ``tl.sum``/``tl.max``/``tl.sigmoid`` are such
    functions: a third of the mHC kernels' interpreted time went there. Within one launch the patches stay in force
    (the launch restores them only at its end), so a nested function whose ``triton.language`` modules were already
    patched in this launch skips it. The functions run exactly as before."""
    import inspect
    import threading

    G, F = itp.GridExecutor, itp.InterpretedFunction
    if getattr(F, "_dsv4_once", False) or not hasattr(itp, "_patch_lang"):
        return
    grid_call0, local, keys = G.__call__, threading.local(), {}

    def key(fn):
        if fn not in keys:
            keys[fn] = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
        return keys[fn]

    def grid_call(self, *args, **kwargs):
        local.patched = {key(self.fn)}  # GridExecutor.__call__ patches its kernel's modules itself
        try:
            return grid_call0(self, *args, **kwargs)
        finally:
            local.patched = None

    def fn_call(self, *args, **kwargs):  # InterpretedFunction.__call__ of triton 3.6, the patch made once per launch
        patched, k = getattr(local, "patched", None), key(self.fn)
        if patched is None or k not in patched:
            itp._patch_lang(self.fn)
            if patched is not None:
                patched.add(k)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise itp.InterpreterError(repr(e)) from e

    G.__call__, F.__call__, F._dsv4_once = grid_call, fn_call, True


# ---------------------------------------------------------------------------------------------- install
def fake_use_triton(cfg) -> bool:
    """``use_triton`` as on a GPU with jax-triton installed: every mode but ``"reference"`` runs the kernels."""
    mode = cfg if isinstance(cfg, str) else cfg.kernels
    if mode not in MODES:
        raise ValueError(f"kernels={mode!r}, expected one of {MODES}")
    return mode != "reference"


def install(target: str = "sm90") -> None:
    """Route the model's kernel launches through :func:`triton_call` under the interpreter (this process only).

    ``target``: the architecture the launchers plan for (``dsv4_jax.kernels.arch``): ``"sm90"`` reproduces the H200's
    plans (split-K over 132 SMs, decode/prefill tiles), ``"cpu"`` the interpreter tests' ones.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton_shim.install: set TRITON_INTERPRET=1 before importing triton/dsv4_jax")
    if "jax_triton" in sys.modules and not getattr(sys.modules["jax_triton"], "_dsv4_shim", False):
        raise RuntimeError("triton_shim.install: the real jax_triton is already imported")
    if not _WORKER:  # started here, on the caller's (main) thread: default floating-point environment
        _WORKER.append(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="triton-shim"))
        if not _WORKER[0].submit(_denormals_kept).result():
            raise RuntimeError("triton_shim.install: fp32 denormals are flushed on a fresh thread; call install() "
                               "from a thread with the default floating-point environment")
    fake = types.ModuleType("jax_triton")
    fake.triton_call, fake._dsv4_shim = triton_call, True
    sys.modules["jax_triton"] = fake
    fix_interpreter()

    from triton.runtime.interpreter import InterpretedFunction

    import dsv4_jax.kernels as K
    import dsv4_jax.kernels.fp4_moe  # noqa: F401  (imported so that its bound names are patched below)
    import dsv4_jax.kernels.fp8_linear  # noqa: F401
    import dsv4_jax.modeling.moe  # noqa: F401

    if not isinstance(dsv4_jax.kernels.fp8_linear.fp8_gemm_kernel, InterpretedFunction):
        raise RuntimeError("triton_shim.install: the kernels were decorated without TRITON_INTERPRET=1")
    K.set_launch_route("jax-triton")  # the fake jax_triton below runs each launch under the interpreter
    use0, arch0 = K.use_triton, K.arch
    for mod in [m for n, m in list(sys.modules.items()) if n.startswith("dsv4_jax") and m is not None]:
        if getattr(mod, "use_triton", None) is use0:
            mod.use_triton = fake_use_triton
        if getattr(mod, "arch", None) is arch0:
            mod.arch = lambda: target


def interpret(script: str, arrays: dict, folder, timeout: int = 600) -> dict:
    """Run ``python script <folder>/in.npz`` with ``TRITON_INTERPRET=1`` on the CPU (the kernel tests' interpreter
    subprocess: the variable must be set before triton is imported) after saving ``arrays`` there; returns the
    arrays the script saved to ``<folder>/in.npz.out.npz``. A failing subprocess fails the caller with its stderr."""
    import subprocess

    path = os.path.join(str(folder), "in.npz")
    np.savez(path, **arrays)
    env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, script, path], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"interpreter subprocess failed:\n{r.stderr[-4000:]}"
    return dict(np.load(path + ".out.npz"))
