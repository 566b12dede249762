"""The bf16-weight projections kernel (``dsv4_jax/kernels/bf16_proj.py``) against XLA's fp32 form.

CPU: ``_proj2_kernel`` / ``_proj5_kernel`` under Triton's interpreter (subprocess, torch CPU tensors):

* exact cases: activations and weights are small integers times powers of two, so every fp32 sum of their products
  is exact in any order; the kernel's outputs (fp32, and the bf16-rounded ones) must be the reference's bits. Rows
  1, 3 (a masked row of the padded 4) and 8, K = 320 (the last 256-wide step masked), weights of 40 and 8 rows (the
  last 16-row program masked), five weights of mixed output dtypes and two;
* a random case: the fp32 outputs within the fp32 summation bound ``K * 2**-24 * sum |x w|`` of a float64 oracle,
  the bf16 ones within one bf16 ulp of the reference's;
* the rollback property: the two-weight launch gives the same bits for its weights as the five-weight launch that
  starts with them (random values: orders matter there).

GPU (skipped without one): V4-Flash's CSA layer (K 4,096; 1,024, 1,024, 256, 256 and 64 rows), its HCA layer's two
and V4-Pro's K 7,168 at 1, 4 and 8 rows through the public function with the kernel on, against the reference on
the same GPU (fp32 outputs within twice the summation bound, bf16 ones within one ulp) and the two-weight launch
against the five-weight one, bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton_shim  # noqa: E402
from test_kernels_fp8 import _bf16_ulp  # noqa: E402

SEED = 1207
# (rows M, K, weight rows, bf16-rounded outputs, exact values)
F, T = False, True
CASES = [(1, 320, (40, 8), (F, F), T), (3, 320, (40, 8, 16, 24, 8), (F, T, F, F, T), T), (8, 256, (16, 40), (T, F), T),
         (2, 512, (48, 32, 16, 16, 8), (F, F, F, F, T), F)]


def _bf16(a: np.ndarray) -> np.ndarray:
    import ml_dtypes

    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16)


def _operands(M: int, K: int, ns, exact: bool, seed: int):
    """bf16 ``x [M, K]`` and weights ``[n, K]``: exact cases small integers times 2**-3 / 2**-6 (|sum| < 2**24 units
    of 2**-9: every fp32 sum exact), otherwise normal values."""
    rng = np.random.default_rng(seed)
    if exact:
        x = rng.integers(-8, 9, (M, K)) * 2.0**-3
        ws = [rng.integers(-16, 17, (n, K)) * 2.0**-6 for n in ns]
    else:
        x = rng.standard_normal((M, K)) * 2.0
        ws = [rng.standard_normal((n, K)) * 0.05 for n in ns]
    return _bf16(x), [_bf16(w) for w in ws]


def _reference(x, ws, rounds):
    import jax.numpy as jnp

    from dsv4_jax.kernels.bf16_proj import bf16_projections_reference

    ys = bf16_projections_reference(jnp.asarray(x), [jnp.asarray(w) for w in ws],
                                    [jnp.bfloat16 if r else jnp.float32 for r in rounds])
    return [np.asarray(y.astype(jnp.float32)) for y in ys]


def _interpret_main(path: str) -> None:
    """Subprocess body: every case's launch, and the two-weight launch of each five-weight case's first two."""
    import torch

    from dsv4_jax.kernels.bf16_proj import run_torch

    z = dict(np.load(path))
    t = lambda a: torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)  # noqa: E731
    out = {}
    for i, (_, _, ns, rounds, _) in enumerate(CASES):
        x, ws = t(z[f"x{i}"]), [t(z[f"w{i}_{j}"]) for j in range(len(ns))]
        for j, y in enumerate(run_torch(x, ws, rounds)):
            out[f"y{i}_{j}"] = y.numpy()
        if len(ns) == 5:
            for j, y in enumerate(run_torch(x, ws[:2], rounds[:2])):
                out[f"pair{i}_{j}"] = y.numpy()
    np.savez(path + ".out.npz", **out)


def test_interpreter_matches_reference(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    ops = [_operands(M, K, ns, ex, SEED + i) for i, (M, K, ns, _, ex) in enumerate(CASES)]
    arrays = {}
    for i, (x, ws) in enumerate(ops):
        arrays[f"x{i}"] = x.view(np.uint16)
        arrays.update({f"w{i}_{j}": w.view(np.uint16) for j, w in enumerate(ws)})
    out = triton_shim.interpret(__file__, arrays, tmp_path)
    for i, (_, K, ns, rounds, exact) in enumerate(CASES):
        x, ws = ops[i]
        refs = _reference(x, ws, rounds)
        for j, (ref, r) in enumerate(zip(refs, rounds)):
            y, what = out[f"y{i}_{j}"], f"case {i} {CASES[i][:3]} weight {j}"
            assert y.shape == ref.shape and np.isfinite(y).all(), f"{what}: unwritten (NaN) elements"
            if exact:
                np.testing.assert_array_equal(y.view(np.uint32), ref.view(np.uint32), err_msg=what)
            elif r:
                assert (np.abs(y - ref) <= _bf16_ulp(ref)).all(), f"{what}: more than one bf16 ulp off"
            else:
                xf, wf = x.astype(np.float64), ws[j].astype(np.float64)
                bound = K * 2.0**-24 * (np.abs(xf) @ np.abs(wf).T) + 1e-30
                assert (np.abs(y - xf @ wf.T) <= bound).all(), f"{what}: outside the fp32 summation bound"
        assert any(not e for *_, e in CASES), "no random case"
        if len(ns) == 5:
            for j in range(2):
                np.testing.assert_array_equal(out[f"pair{i}_{j}"].view(np.uint32), out[f"y{i}_{j}"].view(np.uint32),
                                              err_msg=f"case {i}: the two-weight launch differs from the five")


def test_cpu_dispatch_is_the_reference():
    """On a CPU backend the public function is the XLA form, bit for bit; bad weights are refused by name."""
    import jax.numpy as jnp

    from dsv4_jax.kernels.bf16_proj import bf16_projections, bf16_projections_reference

    x, ws = _operands(2, 256, (16, 8), False, SEED)
    x3 = jnp.asarray(x).reshape(1, 2, 256)
    ys = bf16_projections(x3, [jnp.asarray(w) for w in ws], [jnp.float32, jnp.bfloat16], kernels="auto")
    refs = bf16_projections_reference(x3, [jnp.asarray(w) for w in ws], [jnp.float32, jnp.bfloat16])
    for y, r in zip(ys, refs):
        assert y.shape == r.shape and y.dtype == r.dtype
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(r, np.float32))
    with pytest.raises(ValueError, match=r"weight 1 has shape \(8, 128\)"):
        bf16_projections(x3, [jnp.asarray(ws[0]), jnp.zeros((8, 128), jnp.bfloat16)], [jnp.float32] * 2)


@pytest.mark.parametrize("K,ns", [(4096, (1024, 1024, 256, 256, 64)), (4096, (512, 512)), (7168, (1024, 1024))],
                         ids=["flash-csa", "flash-hca", "pro"])
@pytest.mark.parametrize("M", [1, 4, 8])
def test_gpu_matches_reference(monkeypatch, M, K, ns):
    from dsv4_jax.kernels import triton_unavailable

    why = triton_unavailable()
    if why is not None:
        pytest.skip(f"bf16_proj GPU test: {why}")
    import jax
    import jax.numpy as jnp

    import dsv4_jax.kernels.bf16_proj as bp

    monkeypatch.setattr(bp, "AUTO", True)
    x, ws = _operands(M, K, ns, False, SEED + M + K + len(ns))
    rounds = [j == 4 for j in range(len(ns))]  # weights_proj's output is rounded to bf16
    dts = [jnp.bfloat16 if r else jnp.float32 for r in rounds]
    xj, wj = jnp.asarray(x).reshape(1, M, K), [jnp.asarray(w) for w in ws]
    assert bp.kernel_applies(xj, wj, "auto"), "the dispatcher would not take the kernel on a GPU"
    ys = jax.jit(lambda a: bp.bf16_projections(a, wj, dts, kernels="auto"))(xj)
    refs = jax.jit(lambda a: bp.bf16_projections_reference(a, wj, dts))(xj)
    xf = x.astype(np.float64)
    for j, (y, ref, r) in enumerate(zip(ys, refs, rounds)):
        y, ref = (np.asarray(a.astype(jnp.float32)).reshape(M, -1) for a in (y, ref))
        what = f"GPU M={M} K={K} weight {j}"
        assert np.isfinite(y).all(), f"{what}: non-finite output"
        if r:
            assert (np.abs(y - ref) <= _bf16_ulp(ref)).all(), f"{what}: more than one bf16 ulp off"
        else:
            mag = np.abs(xf) @ np.abs(ws[j].astype(np.float64)).T
            assert (np.abs(y - ref) <= 2 * K * 2.0**-24 * mag + 1e-30).all(), f"{what}: outside the bound"
    if len(ns) == 5:  # the rollback's two-weight launch: the same bits
        pair = jax.jit(lambda a: bp.bf16_projections(a, wj[:2], dts[:2], kernels="auto"))(xj)
        for j in range(2):
            np.testing.assert_array_equal(np.asarray(pair[j]).view(np.uint32), np.asarray(ys[j]).view(np.uint32),
                                          err_msg=f"GPU M={M}: the two-weight launch differs from the five")


if __name__ == "__main__":  # the interpreter subprocess
    _interpret_main(sys.argv[1])
