"""The XLA launch route of the kernels (dsv4_jax/kernels/xla_triton.py), checked without a GPU.

A function calling a kernel through :func:`xla_triton.triton_call` is lowered for the ``cuda`` platform (JAX lowers
for a platform it has no device of). The module must carry one ``__gpu$xla.gpu.triton`` custom call per launch,
whose backend config holds the kernel's Triton IR with the buffers as its only arguments (XLA's Triton call passes
no scalars), the call's scalar arguments folded in as constants, and the grid and warps asked for. That XLA then
compiles this IR for sm_90 was checked with ``scripts/count_launches.py`` (it needs the CUDA plugin, not in CI).
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax import kernels
from dsv4_jax.kernels import fp8_linear, xla_triton
from dsv4_jax.modeling.quant import Fp8Tensor


def _lowered_text(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _ir(text: str) -> str:
    """The Triton IR inside the lowered module's custom call (MLIR escapes bytes as backslash + two hex digits)."""
    raw = re.search(r'ir = "(.*?)", name', text, re.S).group(1)
    return re.sub(r"\\([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), raw)


def _weight(N: int, K: int, seed: int) -> Fp8Tensor:
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(N, K)).astype(np.float32)).astype(jnp.float8_e4m3fn)
    scale = jnp.asarray(2.0 ** rng.integers(-3, 3, (-(-N // 128), -(-K // 128))), jnp.float32)
    return Fp8Tensor(q=q, scale=scale)


@pytest.mark.parametrize("M", [1, 3, 40])
def test_fp8_launch_lowers_to_xla_triton_call(M):
    """The FP8 linear launchers (GEMV for few rows, the tiled kernel otherwise) as XLA Triton calls."""
    N, K, G = 256, 384, 1
    w = _weight(N, K, seed=M)
    x = jnp.asarray(np.random.default_rng(M).normal(size=(M, G, K)), jnp.bfloat16)

    def launch(x, w):
        if M <= fp8_linear.GEMV_ROWS:
            p = fp8_linear.gemv_plan(M, N, K, G, sms=8)
            return fp8_linear._launch_gemv(x, w, M, N, K, G, jnp.bfloat16, p)
        sx = jnp.ones((M, G, -(-K // 128)), jnp.float32)
        return fp8_linear._launch(x, sx, w, M, N, K, G, jnp.bfloat16, False, fp8_linear.plan(M, N, K, G))

    route = kernels.launch_route()
    kernels.set_launch_route("xla")
    try:
        text = _lowered_text(launch, x, w)
    finally:
        kernels.set_launch_route(route)
    calls = re.findall(r'stablehlo.custom_call @"?__gpu\$xla\.gpu\.triton"?\((.*?)\)', text)
    assert len(calls) == 1, text[:2000]
    ir_text = _ir(text)
    kernel = "fp8_gemv_kernel" if M <= fp8_linear.GEMV_ROWS else "fp8_gemm_kernel"
    [head] = [line for line in ir_text.splitlines() if f"tt.func public @{kernel}(" in line]
    n_buffers = 4 if M <= fp8_linear.GEMV_ROWS else 5  # inputs (x, [sx,] codes, scales) + the output
    assert head.count("!tt.ptr<") == n_buffers and ": i32 loc" not in head  # buffers only, no scalar argument
    # helpers inlined (jaxlib 0.11.2's Triton aborts on a reduction whose combine function is still a call)
    assert "tt.call" not in ir_text and ir_text.count("tt.func") == 1
    assert re.search(r"num_warps = \d+ : i32", text) and re.search(r"grid_x = \d+ : i32", text)


def test_scalar_arguments_become_constants_and_errors():
    """An int positional argument is folded into the IR (after the inliner and canonicalizer: one fp32 constant);
    a float one is refused (its precision would be implicit); a dtype without a Triton pointer type is refused by
    name."""
    import triton
    import triton.language as tl

    @triton.jit
    def add_n(x_ptr, n, o_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(o_ptr + offs, tl.load(x_ptr + offs) + n)

    x = jnp.zeros(16, jnp.float32)
    out = jax.ShapeDtypeStruct((16,), jnp.float32)
    text = _lowered_text(lambda x: xla_triton.triton_call(x, 7, kernel=add_n, out_shape=out, grid=1, BLOCK=16), x)
    ir_text = _ir(text)
    [head] = [line for line in ir_text.splitlines() if "tt.func public @add_n(" in line]
    assert head.count("!tt.ptr<f32>") == 2 and "%n" not in head  # x and o only: n is a constant
    assert "arith.constant dense<7.000000e+00> : tensor<16xf32>" in ir_text  # n folded: x + 7 in fp32
    with pytest.raises(TypeError, match="float scalar argument n"):
        _lowered_text(lambda x: xla_triton.triton_call(x, 0.5, kernel=add_n, out_shape=out, grid=1, BLOCK=16), x)
    with pytest.raises(TypeError, match="no Triton pointer type for dtype complex64"):
        _lowered_text(lambda x: xla_triton.triton_call(x.astype(jnp.complex64), 1, kernel=add_n, out_shape=out,
                                                      grid=1, BLOCK=16), x)


def test_auto_route_sends_only_tiled_kernels_to_jax_triton(monkeypatch):
    """``"auto"`` (the default): untiled kernels through XLA, tiled ones through jax-triton where it imports (else
    XLA too); the two explicit routes are taken as they are; an unknown route is refused by name."""
    route = kernels.launch_route()
    has_jt = kernels._import_error("jax_triton") is None
    try:
        kernels.set_launch_route("auto")
        assert kernels.route_for(False) == "xla"
        assert kernels.route_for(True) == ("jax-triton" if has_jt else "xla")
        monkeypatch.setattr(kernels, "_import_error", lambda m: "missing" if m == "jax_triton" else None)
        assert kernels.route_for(True) == "xla"
        for r in ("xla", "jax-triton"):
            kernels.set_launch_route(r)
            assert kernels.route_for(True) == kernels.route_for(False) == r
    finally:
        kernels.set_launch_route(route)
    with pytest.raises(ValueError, match="'cuda-graph'"):
        kernels.set_launch_route("cuda-graph")


@pytest.mark.parametrize("saved", [None, "/tmp/triton-cache-kept"])
def test_importing_the_launcher_keeps_tritons_cache_dir(tmp_path, monkeypatch, saved):
    """jax-triton 0.3.1 blanks ``TRITON_CACHE_DIR`` at import, which broke every later torch-launched Triton kernel
    of the process ("Could not create or locate cache dir"); ``_import_error`` puts the variable back as it was.
    A stand-in module does what jax-triton's import does, so the test needs no jax-triton."""
    (tmp_path / "blanks_triton_cache.py").write_text('import os\nos.environ["TRITON_CACHE_DIR"] = ""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    if saved is None:
        monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("TRITON_CACHE_DIR", saved)
    assert kernels._import_error.__wrapped__("blanks_triton_cache") is None
    assert os.environ.get("TRITON_CACHE_DIR") == saved


@pytest.mark.parametrize("maxnreg", [None, 96])
def test_register_cap_reaches_the_ir(maxnreg):
    """``maxnreg`` (ptxas's register cap, a speed choice) travels as the TTIR module's ``ttg.maxnreg`` attribute, the
    one Triton's own compiler sets and its lowering turns into the kernel's ``.maxnreg`` (XLA's Triton does the same:
    checked in the PTX of an sm_90 compile-only build, 2026-12-03); without it the module has none. (The jax-triton
    route has no such option: ``kernels.triton_call`` drops it there.)"""
    import triton
    import triton.language as tl

    @triton.jit
    def twice(x_ptr, o_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(o_ptr + offs, tl.load(x_ptr + offs) * 2)

    x = jnp.zeros(16, jnp.float32)
    out = jax.ShapeDtypeStruct((16,), jnp.float32)
    ir_text = _ir(_lowered_text(lambda x: xla_triton.triton_call(x, kernel=twice, out_shape=out, grid=1, BLOCK=16,
                                                                 maxnreg=maxnreg), x))
    attr = re.findall(r'"?ttg\.maxnreg"? = (\d+) : i32', ir_text)
    assert attr == ([] if maxnreg is None else [str(maxnreg)]), ir_text[:1000]
