"""FP8 block-scaled linear: ``y = x @ W.T`` with W e4m3 + 128x128 e8m0 scales (spec 3.4).

Public function :func:`fp8_linear`; :func:`fp8_linear_reference` is the XLA recipe (the spec, the CPU path).
The Triton kernel lands in the next commit; until then every mode runs the reference.
"""

from __future__ import annotations

import jax

from dsv4_jax.kernels import use_triton
from dsv4_jax.modeling.quant import Fp8Tensor, QuantAct, linear_reference


def fp8_linear_reference(x: jax.Array, w: Fp8Tensor, out_dtype, xq: QuantAct | jax.Array | None = None) -> jax.Array:
    """The reference FP8 linear with the activation simulation on: ``quant.linear_reference``."""
    return linear_reference(x, w, out_dtype, True, xq)


def fp8_linear(x: jax.Array, w: Fp8Tensor, out_dtype, xq: QuantAct | jax.Array | None = None, *,
               kernels: str = "auto") -> jax.Array:
    """``x [..., K] @ W[N, K].T -> [..., N]`` in ``out_dtype``; ``kernels`` as ``Config.kernels``."""
    use_triton(kernels)  # validates the mode (raises for "triton" where it cannot run)
    return fp8_linear_reference(x, w, out_dtype, xq)
