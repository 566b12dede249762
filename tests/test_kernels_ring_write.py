"""The window ring's decode write (``dsv4_jax/kernels/ring_write.py``) against its XLA reference (``encode_fp8_cache``
of the new entry, written with selects): bit for bit (the snap is the reference's operations: power-of-two scales,
e4m3 nearest even; the rest moves bytes). Cases: rows at different positions (slot 0, the last slot, a wrap far past
``W``), a row that brings no token (``n_new = 0``: its ring must stay as it was), the V4 entry layout (448 e4m3
codes in 7 blocks, 64 bf16 RoPE dims), entries whose blocks span 2**-20 .. 2**8 (e4m3 subnormal codes) with zeros and
negative zeros.

CPU: the jax launcher under Triton's interpreter (``tests/triton_shim.py``) in a subprocess; GPU: the jitted launcher
and the ``"auto"`` dispatcher (skipped without a GPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton_shim  # noqa: E402

SEED = 53
DN, NS, RD = 448, 7, 64  # V4's entry: e4m3 nope dims, their e8m0 bytes per 64, bf16 RoPE dims


def _case(B: int, W: int, seed: int) -> dict:
    """A random ring and one new entry per row (codes as bytes, RoPE as bf16 bit patterns), positions and n_new."""
    import ml_dtypes

    rng = np.random.default_rng(seed)

    def rope(shape):  # finite bf16 values' bit patterns (XLA's CPU select canonicalises NaN payloads)
        return (rng.standard_normal(shape) * 4).astype(ml_dtypes.bfloat16).view(np.uint16)

    pos = rng.integers(0, 1 << 20, B).astype(np.int32)
    pos[:4] = [0, W - 1, 7 * W + 3, 1_000_003][: min(4, B)]  # slot 0, the last slot, wraps
    n_new = np.ones(B, np.int32)
    if B >= 3:
        n_new[2] = 0  # a row without a token
    vals = rng.standard_normal((B, 1, DN + RD)) * np.exp2(rng.integers(-20, 9, (B, 1, (DN + RD) // 64)).repeat(64, -1))
    vals[..., 5] = 0.0
    vals[..., 6] = -0.0
    return dict(ring_codes=rng.integers(0, 256, (B, W, DN), dtype=np.uint8),
                ring_scales=rng.integers(100, 140, (B, W, NS), dtype=np.uint8),
                ring_rope=rope((B, W, RD)), values=vals.astype(ml_dtypes.bfloat16).view(np.uint16), pos=pos,
                n_new=n_new)


def _caches(z: dict):
    """(ring, kv, pos, n_new, values): the new entries both snapped (``kv``, what the reference writes) and as bf16
    values (what the kernel snaps)."""
    import jax.numpy as jnp

    from dsv4_jax.modeling.quant import Fp8Cache, encode_fp8_cache

    ring = Fp8Cache(codes=jnp.asarray(z["ring_codes"]).view(jnp.float8_e4m3fn), scales=jnp.asarray(z["ring_scales"]),
                    rope=jnp.asarray(z["ring_rope"]).view(jnp.bfloat16))
    values = jnp.asarray(z["values"]).view(jnp.bfloat16)
    return ring, encode_fp8_cache(values, DN), jnp.asarray(z["pos"]), jnp.asarray(z["n_new"]), values


def _bytes(c) -> dict:
    return {"codes": np.asarray(c.codes).view(np.uint8), "scales": np.asarray(c.scales),
            "rope": np.asarray(c.rope).view(np.uint16)}


def _reference(z: dict) -> dict:
    import jax

    from dsv4_jax.kernels.ring_write import ring_write_reference

    return _bytes(jax.jit(ring_write_reference)(*_caches(z)[:4]))


def _check(got: dict, z: dict, what: str) -> None:
    ref = _reference(z)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{what}: {k}")
    moved = ref["codes"] != z["ring_codes"]
    idle = z["n_new"] == 0
    assert moved.any() and not moved[idle].any(), f"{what}: the cases do not write, or write a row without a token"
    codes = ref["codes"][~idle] & 0x7F
    assert np.any((codes > 0) & (codes < 8)) and np.any(ref["codes"][~idle] == 0x80), f"{what}: no subnormal or -0"


def _interpret_main(path: str) -> None:
    """Subprocess body: the jax launcher (``kernels="triton"``) under the shim, on every stored case."""
    triton_shim.install(target="cpu")
    import jax

    from dsv4_jax.kernels.ring_write import ring_write

    z = dict(np.load(path))
    out = {}
    for i in range(int(z["n"])):
        a = {k[len(f"{i}_"):]: v for k, v in z.items() if k.startswith(f"{i}_")}
        n0 = len(triton_shim.LAUNCHES)
        res = jax.jit(lambda *c: ring_write(*c, kernels="triton"))(*_caches(a))
        assert [r["kernel"] for r in triton_shim.LAUNCHES[n0:]] == ["_ring_write_kernel"], "the kernel did not run"
        out.update({f"{i}_{k}": v for k, v in _bytes(res).items()})
    np.savez(path + ".out.npz", **out)


CASES = [(5, 16), (3, 128)]  # (rows, W): V4's W = 128


def test_interpreter_matches_reference_bits(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    cases = [_case(B, W, SEED + i) for i, (B, W) in enumerate(CASES)]
    arrays = {"n": np.asarray(len(cases))}
    for i, z in enumerate(cases):
        arrays.update({f"{i}_{k}": v for k, v in z.items()})
    out = triton_shim.interpret(__file__, arrays, tmp_path)
    for i, z in enumerate(cases):
        _check({k: out[f"{i}_{k}"] for k in ("codes", "scales", "rope")}, z, f"interpreter case {CASES[i]}")


def test_cpu_dispatch_and_bad_shapes():
    """On a CPU backend ``"auto"`` is the reference; the launcher names what does not fit."""
    from dsv4_jax.kernels.ring_write import ring_write, ring_write_triton

    z = _case(4, 16, SEED)
    _check(_bytes(ring_write(*_caches(z), kernels="auto")), z, "auto on CPU")
    ring, _, pos, nn, values = _caches(z)
    with pytest.raises(ValueError, match="values"):
        ring_write_triton(ring, values[..., :256], pos, nn)
    with pytest.raises(ValueError, match="ring codes"):
        ring_write_triton(ring.replace(scales=ring.scales[..., :3]), values, pos, nn)
    with pytest.raises(ValueError, match="pos"):
        ring_write_triton(ring, values, pos[:3], nn)


@pytest.mark.parametrize("B", [1, 32])
def test_gpu_matches_reference_bits(B, monkeypatch):
    """V4's ring (W = 128) at batch 1 and 32: the jitted launcher and the ``"auto"`` dispatcher with the kernel in
    it (``AUTO``)."""
    from dsv4_jax.kernels import triton_unavailable

    why = triton_unavailable()
    if why is not None:
        pytest.skip(f"ring write GPU test: {why}")
    import jax

    from dsv4_jax.kernels import ring_write as rw
    from dsv4_jax.kernels.ring_write import ring_write, ring_write_triton

    monkeypatch.setattr(rw, "AUTO", True)
    z = _case(B, 128, SEED + B)
    ring, _, pos, nn, values = _caches(z)
    _check(_bytes(jax.jit(ring_write_triton)(ring, values, pos, nn)), z, f"GPU B={B}")
    _check(_bytes(jax.jit(lambda *c: ring_write(*c, kernels="auto"))(*_caches(z))), z, f"GPU auto B={B}")


if __name__ == "__main__":  # the interpreter subprocess
    _interpret_main(sys.argv[1])
