"""Gluon kernels inside ``jit``: a patch of jax-triton 0.3.1's kernel builder.

jax-triton lowers every kernel it is given as Triton IR (``ASTSource``); a Gluon function (Triton's lower-level
language, e.g. the warp-specialised attention kernel of :mod:`sparse_attention_ws`) must be compiled through
``GluonASTSource`` instead, and a warp-specialised one with a register cap (jax-triton has no ``maxnreg`` option).
:func:`install` wraps jax-triton's builder so that Gluon functions take that route, with the cap their ``MAXNREG``
constexpr names (none without one); every other kernel goes to jax-triton's own builder unchanged. A module of its
own so that every Gluon kernel's jax launcher shares it (CUDA only: Gluon's sm_90 kernels).
"""

from __future__ import annotations

import os


def install() -> None:
    """Teach jax-triton 0.3.1 to build Gluon kernels (idempotent): its ``get_or_create_triton_kernel`` lowers every
    kernel as Triton IR (``ASTSource``), which a Gluon function is not; for Gluon functions the patched builder
    compiles through ``GluonASTSource`` with the register cap its ``MAXNREG`` constexpr names, if it has one (a
    warp-specialised kernel must know its cap, jax-triton has no such option) and hands jax-triton the PTX, the
    kernel's real warp count (consumers and decoders) and its shared memory. Other kernels go to jax-triton's own
    builder unchanged."""
    import jax_triton.triton_lib as jtl
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction

    if getattr(jtl, "_dsv4_gluon_route", False):
        return
    base = jtl.get_or_create_triton_kernel
    cache = {}

    def build(backend_init_func, platform, fn, arg_dtypes, scalar_args, *, num_warps, num_stages, num_ctas,
              compute_capability, enable_fp_fusion, metaparams, dump):
        if not isinstance(fn, GluonJITFunction):
            return base(backend_init_func, platform, fn, arg_dtypes, scalar_args, num_warps=num_warps,
                        num_stages=num_stages, num_ctas=num_ctas, compute_capability=compute_capability,
                        enable_fp_fusion=enable_fp_fusion, metaparams=metaparams, dump=dump)
        if platform != "cuda" or scalar_args:
            raise ValueError(f"{fn.__name__}: the Gluon route builds CUDA kernels with array arguments only")
        cc = compute_capability or jtl.triton_kernel_call_lib.get_compute_capability(0)
        key = (fn, tuple(arg_dtypes), tuple(sorted(metaparams.items())), num_warps, cc)
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(arg_dtypes))}
        if key not in cache:
            sig = {fn.arg_names[i]: t for i, t in enumerate(arg_dtypes)} | {k: "constexpr" for k in metaparams}
            unset = os.environ.get("TRITON_CACHE_DIR") == ""  # jax-triton's import sets it so: Triton's own cache
            if unset:
                del os.environ["TRITON_CACHE_DIR"]
            try:
                k = triton.compile(GluonASTSource(fn, sig, constexprs=dict(metaparams), attrs=attrs),
                                   target=GPUTarget("cuda", cc, 32),
                                   options=dict(num_warps=num_warps, num_stages=num_stages,
                                                maxnreg=metaparams.get("MAXNREG") or None))
            finally:
                if unset:
                    os.environ["TRITON_CACHE_DIR"] = ""
            cache[key] = jtl.triton_kernel_call_lib.TritonKernel(k.metadata.name, k.metadata.num_warps, num_ctas,
                                                                 k.metadata.shared, k.asm["ptx"], "", cc)
        return cache[key], attrs

    jtl.get_or_create_triton_kernel = build
    jtl._dsv4_gluon_route = True
