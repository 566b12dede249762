"""Triton kernels compiled and launched by XLA itself: ``__gpu$xla.gpu.triton`` custom calls.

jax-triton launches a kernel through a legacy custom call: XLA cannot put it in a CUDA graph (command buffer), so
every launch splits the step's graphs, and the launch runs jax-triton's host code. Measured on an H200
(2026-11-29): ~30 us of wall time per call beyond the kernel. JAX's own Pallas-on-Triton lowering uses another
route, the one taken here: the kernel's Triton IR (TTIR) travels inside the HLO as the backend config of a
``__gpu$xla.gpu.triton`` custom call. XLA compiles it with its bundled Triton to a kernel of the executable, like
any of its fusions. It can then sit in a command buffer beside them, with no host code per launch.

This module turns a ``@triton.jit`` kernel plus the call's arguments into that custom call. The call signature is
jax-triton's ``triton_call``, so the launchers do not change:

* positional arguments are arrays (in, by pointer) or Python ``int``/``bool`` scalars; a scalar becomes a
  compile-time constant of the kernel (XLA's Triton call passes buffers only). It is specialised, like a
  ``tl.constexpr``: every shape here is static;
* the outputs' pointers follow the inputs, in ``out_shape`` order; keyword metaparameters are ``constexpr``;
* ``grid``: an int, a tuple of up to 3 ints, or a callable of the metaparameter dict.

Only the Triton *frontend* (``triton`` Python package: source -> TTIR) runs here. XLA's Triton lowers the TTIR to
PTX / AMDGCN, so the ``triton`` wheel's version must write TTIR that XLA's bundled Triton reads. That was checked
by compiling every kernel of the package for sm_90 without a GPU (``scripts/count_launches.py``) with triton 3.6.0
and jax/jaxlib 0.10.2 and 0.11.2. ROCm (``"rocm"`` platform) takes the same route as Pallas does there; untried.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import dispatch
from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir
from jax.extend.core import Primitive

TARGET_NAME = "__gpu$xla.gpu.triton"
_POINTER_TYPES = {
    np.dtype(jnp.float32): "fp32", np.dtype(jnp.bfloat16): "bf16", np.dtype(jnp.float16): "fp16",
    np.dtype(jnp.float8_e4m3fn): "fp8e4nv", np.dtype(jnp.int64): "i64", np.dtype(jnp.int32): "i32",
    np.dtype(jnp.int16): "i16", np.dtype(jnp.int8): "i8", np.dtype(jnp.uint64): "u64", np.dtype(jnp.uint32): "u32",
    np.dtype(jnp.uint16): "u16", np.dtype(jnp.uint8): "u8", np.dtype(jnp.bool_): "i1",
}

triton_kernel_p = Primitive("dsv4_triton_kernel")
triton_kernel_p.multiple_results = True
# outside jax.jit (eager calls, e.g. the GPU tests) the primitive is compiled and run on its own, like jax's own
# primitives; without this rule an eager call raised "Evaluation rule for 'dsv4_triton_kernel' not implemented"
triton_kernel_p.def_impl(functools.partial(dispatch.apply_primitive, triton_kernel_p))


@triton_kernel_p.def_abstract_eval
def _abstract_eval(*_, out_shapes, **__):
    return [jax.core.ShapedArray(s.shape, s.dtype) for s in out_shapes]


def triton_call(*args, kernel, out_shape, grid, num_warps: int | None = None, num_stages: int | None = None,
                input_output_aliases: dict[int, int] | None = None, name: str = "", maxnreg: int | None = None,
                **metaparams):
    """Launch ``kernel`` on ``args`` as an XLA-compiled Triton kernel; returns the output array(s) (one array when
    ``out_shape`` is a single shape, else a list), like ``jax_triton.triton_call``. ``maxnreg``: the registers per
    thread ptxas may use (Triton's launch option of that name; carried as the TTIR module's ``ttg.maxnreg``
    attribute, which Triton's lowering turns into the kernel's ``.maxnreg``; NVIDIA only, ignored on ROCm)."""
    single = isinstance(out_shape, jax.ShapeDtypeStruct) or hasattr(out_shape, "shape")
    out_shapes = tuple(jax.ShapeDtypeStruct(s.shape, s.dtype) for s in ([out_shape] if single else out_shape))
    arrays, consts, names = [], dict(metaparams), kernel.arg_names
    for i, a in enumerate(args):
        if isinstance(a, (bool, int, np.integer)):
            consts[names[i]] = a if isinstance(a, bool) else int(a)
        elif isinstance(a, (float, np.floating)):
            raise TypeError(f"{kernel.__name__}: float scalar argument {names[i]}={a!r}; pass it as a keyword "
                            "metaparameter (constexpr) instead, its precision must be explicit")
        else:
            arrays.append((names[i], jnp.asarray(a)))
    g = grid(metaparams) if callable(grid) else grid
    g = (g,) if isinstance(g, int) else tuple(int(v) for v in g)
    if not 1 <= len(g) <= 3 or min(g) < 1:
        raise ValueError(f"{kernel.__name__}: grid {g} must be 1 to 3 positive ints")
    n_in = len(arrays)
    out_names = names[len(args):len(args) + len(out_shapes)]
    ptrs = tuple((n, _pointer_type(a.dtype)) for n, a in arrays) + tuple(
        (n, _pointer_type(s.dtype)) for n, s in zip(out_names, out_shapes))
    aliases = tuple(sorted((input_output_aliases or {}).items()))
    for i, o in aliases:
        if not (0 <= i < n_in and 0 <= o < len(out_shapes)):
            raise ValueError(f"{kernel.__name__}: input_output_aliases {i}->{o} out of range")
    outs = triton_kernel_p.bind(
        *[a for _, a in arrays], kernel=_Hashable(kernel), out_shapes=out_shapes, pointers=ptrs,
        constants=tuple(sorted(((k, _Hashable(v)) for k, v in consts.items()), key=lambda kv: kv[0])),
        grid=g + (1,) * (3 - len(g)), maxnreg=None if maxnreg is None else int(maxnreg),
        num_warps=4 if num_warps is None else int(num_warps),
        num_stages=3 if num_stages is None else int(num_stages), aliases=aliases, name=name or kernel.__name__)
    return outs[0] if single else list(outs)


class _Hashable:
    """Wraps a kernel or constant so that it can be a primitive parameter (hashed by identity for kernels and
    dtypes, by value otherwise)."""

    def __init__(self, v):
        self.v = v

    def _key(self):
        v = self.v
        return v if isinstance(v, (bool, int, float, str)) else (type(v), id(v))

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, _Hashable) and self._key() == other._key() and type(self.v) is type(other.v)

    def __repr__(self):
        return getattr(self.v, "__name__", repr(self.v))


def _pointer_type(dtype) -> str:
    try:
        return "*" + _POINTER_TYPES[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"no Triton pointer type for dtype {np.dtype(dtype)}") from None


# ---------------------------------------------------------------------------------------------- TTIR
_LOCK = threading.Lock()


@functools.cache
def _target(platform: str):
    """The Triton frontend's target: the first local GPU's, else (compiling without a GPU) Hopper / gfx950."""
    from triton.backends.compiler import GPUTarget

    try:
        dev = jax.local_devices(backend="gpu")[0]
    except RuntimeError:
        dev = None
    if platform == "rocm":
        arch = str(getattr(dev, "compute_capability", "") or "gfx950")
        return GPUTarget("hip", arch, 64)
    cc = str(getattr(dev, "compute_capability", "") or "9.0")
    return GPUTarget("cuda", int(cc.replace(".", "")), 32)


@functools.cache
def _ttir(platform: str, kernel: _Hashable, pointers: tuple, constants: tuple, num_warps: int,
          maxnreg: int | None = None) -> str:
    """The kernel's TTIR (text) with ``pointers`` as its only arguments (16-byte aligned, as XLA's buffers are);
    ``maxnreg`` (CUDA): the module attribute ``ttg.maxnreg``, as Triton's own compiler sets it."""
    import triton
    import triton._C.libtriton as libtriton
    from triton.compiler import code_generator
    from triton.compiler.compiler import ASTSource

    fn = kernel.v
    target = _target(platform)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": num_warps})
    consts = {k: v.v for k, v in constants}
    consts |= {q.name: q.default for q in fn.params if q.has_default and q.name not in consts and q.name not in
               dict(pointers)}
    signature = dict(pointers) | {k: "constexpr" for k in consts}
    unknown = set(signature) - set(fn.arg_names)
    if unknown or len(signature) != len(fn.arg_names):
        missing = set(fn.arg_names) - set(signature)
        raise TypeError(f"{fn.__name__}: arguments {sorted(unknown)} unknown, {sorted(missing)} not given")
    order = {n: i for i, n in enumerate(fn.arg_names)}
    attrs = {(order[n],): [["tt.divisibility", 16]] for n, _ in pointers}
    with _LOCK:
        ctx = libtriton.ir.context()
        libtriton.ir.load_dialects(ctx)
        backend.load_dialects(ctx)
        mod = code_generator.ast_to_ttir(fn, ASTSource(fn, constexprs=consts, signature=signature, attrs=attrs),
                                         options=options, codegen_fns=backend.get_codegen_implementation(options),
                                         context=ctx, module_map=backend.get_module_map())
        # inline the helper functions (a reduction's combine function is a call otherwise, which XLA's Triton
        # cannot legalize inside the reduce region) and clean up; XLA runs the rest of Triton's pipeline itself
        pm = libtriton.ir.pass_manager(ctx)
        libtriton.passes.common.add_inliner(pm)
        libtriton.passes.common.add_canonicalizer(pm)
        libtriton.passes.common.add_cse(pm)
        libtriton.passes.common.add_symbol_dce(pm)
        pm.run(mod, "dsv4_ttir")
        if maxnreg is not None and platform == "cuda":
            mod.set_attr("ttg.maxnreg", libtriton.ir.builder(ctx).get_int32_attr(maxnreg))
        return str(mod)


def _lowering(platform: str):
    def rule(ctx, *args, kernel, out_shapes, pointers, constants, grid, num_warps, num_stages, aliases, name,
             maxnreg):
        ttir = _ttir(platform, kernel, pointers, constants, num_warps, maxnreg)
        out_types = [ir.RankedTensorType.get(s.shape, mlir.dtype_to_ir_type(np.dtype(s.dtype))) for s in out_shapes]
        config = dict(name=ir.StringAttr.get(name), ir=ir.StringAttr.get(ttir), num_stages=mlir.i32_attr(num_stages),
                      num_warps=mlir.i32_attr(num_warps), grid_x=mlir.i32_attr(grid[0]),
                      grid_y=mlir.i32_attr(grid[1]), grid_z=mlir.i32_attr(grid[2]), debug=ir.BoolAttr.get(False))
        layouts: Callable[[Sequence], list] = lambda avals: [list(reversed(range(len(a.shape)))) for a in avals]
        return mlir.custom_call(TARGET_NAME, result_types=out_types, operands=list(args), backend_config=config,
                                api_version=4, operand_layouts=layouts(ctx.avals_in),
                                result_layouts=layouts(ctx.avals_out), operand_output_aliases=dict(aliases)).results

    return rule


for _platform in ("cuda", "rocm"):
    mlir.register_lowering(triton_kernel_p, _lowering(_platform), platform=_platform)
