"""The Hadamard kernel (``dsv4_jax/kernels/hadamard.py``) against the reference butterflies
(``modeling/layers.py::hadamard``): bit for bit. Both sides run the same fp32 additions and subtractions in the same
stage order, then one multiply by ``n**-0.5`` and one rounding, so any difference is a bug (a wrong pairing, stage
order or rounding).

CPU: the ``@triton.jit`` kernel under Triton's interpreter in a subprocess, on torch CPU tensors. GPU: the jitted
launcher at the indexer's shapes (skipped without a GPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton_shim  # noqa: E402

SEED = 31
# (rows, n): the indexer's 128-dim heads with a partly filled last program (130 rows of 32 per program), and 64 / 2
CASES = [(5, 128), (130, 128), (3, 64), (2, 2)]


def _input(rows: int, n: int, seed: int) -> np.ndarray:
    """bf16 values (as fp32) with row scales over 2**-8 .. 2**7, so the butterfly sums round in fp32."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n)) * np.exp2(rng.integers(-8, 8, (rows, 1)))
    return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))


def _reference(x: np.ndarray, bf16: bool) -> np.ndarray:
    import jax.numpy as jnp

    from dsv4_jax.modeling.layers import hadamard

    return np.asarray(hadamard(jnp.asarray(x), jnp.bfloat16 if bf16 else jnp.float32).astype(jnp.float32))


def _interpret_main(path: str) -> None:
    """Subprocess body: the kernel on every stored case, bf16 and fp32 outputs."""
    import torch

    from dsv4_jax.kernels.hadamard import run_torch

    z = dict(np.load(path))
    out = {}
    for i in range(len(CASES)):
        for bf in (0, 1):
            out[f"{i}_{bf}"] = run_torch(torch.from_numpy(z[f"x{i}"].copy()), bool(bf)).numpy()
    np.savez(path + ".out.npz", **out)


def test_interpreter_matches_reference_bits(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    xs = {f"x{i}": _input(r, n, SEED + i) for i, (r, n) in enumerate(CASES)}
    out = triton_shim.interpret(__file__, xs, tmp_path)
    for i, (r, n) in enumerate(CASES):
        for bf in (0, 1):
            got, ref = out[f"{i}_{bf}"], _reference(xs[f"x{i}"], bool(bf))
            assert np.isfinite(got).all(), f"rows={r} n={n}: unwritten outputs"
            np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32),
                                          err_msg=f"rows={r} n={n} bf16={bf}")


def test_cpu_modes_give_the_reference():
    """On a CPU backend ``"auto"`` and ``"reference"`` run the XLA butterflies; a bad width is refused."""
    import jax.numpy as jnp

    from dsv4_jax.kernels.hadamard import hadamard, hadamard_triton

    x = jnp.asarray(_input(4, 128, SEED))
    ref = _reference(np.asarray(x), True)
    for mode in ("auto", "reference"):
        got = np.asarray(hadamard(x, jnp.bfloat16, kernels=mode).astype(jnp.float32))
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    with pytest.raises(ValueError, match="power of two"):
        hadamard_triton(jnp.zeros((2, 96)), jnp.bfloat16)


@pytest.mark.parametrize("shape", [(1, 1, 64, 128), (4, 1, 64, 128), (1, 512, 64, 128), (1, 300, 128)],
                         ids=["decode-q", "batch4-q", "prefill-q", "keys"])
def test_gpu_matches_reference_bits(shape):
    """The indexer's queries (64 heads of 128) at decode and prefill rows, and a chunk of compressed keys."""
    from dsv4_jax.kernels import triton_unavailable

    why = triton_unavailable()
    if why is not None:
        pytest.skip(f"Hadamard GPU test: {why}")
    import jax
    import jax.numpy as jnp

    from dsv4_jax.kernels.hadamard import hadamard_triton

    x = _input(int(np.prod(shape[:-1])), shape[-1], SEED).reshape(shape)
    got = jax.jit(hadamard_triton, static_argnums=1)(jnp.asarray(x, jnp.bfloat16), jnp.bfloat16)
    got = np.asarray(got.astype(jnp.float32)).reshape(-1, shape[-1])
    ref = _reference(x.reshape(-1, shape[-1]), True)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    from dsv4_jax.kernels.hadamard import hadamard  # the dispatcher's "auto" takes the kernel on a GPU

    auto = jax.jit(lambda a: hadamard(a, jnp.bfloat16, kernels="auto"))(jnp.asarray(x, jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(auto.astype(jnp.float32)).reshape(-1, shape[-1]).view(np.uint32),
                                  ref.view(np.uint32))


if __name__ == "__main__":  # the interpreter subprocess
    _interpret_main(sys.argv[1])
