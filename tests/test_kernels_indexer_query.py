"""The indexer query kernel (``dsv4_jax/kernels/hadamard.py``: :func:`indexer_query`, RoPE + Hadamard + FP4 snap in
one launch) against its reference (``indexer_query_reference``: ``layers.apply_rope``, ``layers.hadamard``,
``quant.fp4_simulate``, the model's former three steps).

CPU: the ``@triton.jit`` kernel under Triton's interpreter (subprocess, torch CPU tensors): bit for bit, since every
step is the reference's fp32 operation in its order and numpy contracts nothing into FMAs. Cases: V4-Flash's indexer
(64 heads of 128 dims, 64 RoPE dims) and a narrow one (4 heads of 32 dims, 16 RoPE dims: the tiny models), a
partly filled last program, positions from 0 to 2**20, the snap on and off. Inputs span 2**-8 .. 2**7 per row so
that RoPE, the butterflies and the snap round. GPU: the jitted launcher at decode and prefill rows (skipped without
a GPU), with the tolerance of :func:`_check` (the RoPE products may contract into FMAs there).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton_shim  # noqa: E402

SEED = 77
# (tokens, heads, head dim, rope dims): V4-Flash's indexer (64 x 128, 64 RoPE dims: 256 rows, 8 programs of 32),
# 3 tokens of it (the last program partly filled is not possible at 64 heads: the narrow case has 12 rows in one
# 128-row program), and the tiny models' 4 x 32 with 16 RoPE dims
CASES = [(4, 64, 128, 64), (3, 4, 32, 16)]


def _inputs(T: int, H: int, n: int, rd: int, seed: int) -> dict:
    """bf16 queries (as fp32) with per-(token, head) scales over 2**-8 .. 2**7, and fp32 cos/sin of positions up to
    2**20 from the model's RoPE table (``layers.rope_cos_sin`` of V4-Flash-like frequencies)."""
    import jax.numpy as jnp

    from dsv4_jax.modeling.layers import rope_cos_sin

    rng = np.random.default_rng(seed)
    q = rng.standard_normal((T, H, n)) * np.exp2(rng.integers(-8, 8, (T, H, 1)))
    q = np.asarray(jnp.asarray(q, jnp.bfloat16).astype(jnp.float32))
    freqs = (10000.0 ** (-np.arange(0, rd, 2) / rd)).astype(np.float32)
    pos = rng.integers(0, 2**20, T)
    cos, sin = rope_cos_sin(freqs, jnp.asarray(pos, jnp.int32))
    return dict(q=q, cos=np.asarray(cos, np.float32), sin=np.asarray(sin, np.float32))


def _reference(z: dict, fp4: bool) -> np.ndarray:
    """``indexer_query_reference`` with the XLA Hadamard, ``[T, H, n]`` fp32 (bf16 values)."""
    import jax.numpy as jnp

    from dsv4_jax.kernels.hadamard import indexer_query_reference

    q = jnp.asarray(z["q"], jnp.bfloat16)[None]
    out = indexer_query_reference(q, jnp.asarray(z["cos"])[None], jnp.asarray(z["sin"])[None], jnp.bfloat16, fp4)
    return np.asarray(out[0].astype(jnp.float32))


def _interpret_main(path: str) -> None:
    """Subprocess body: the kernel on every stored case, the snap on and off."""
    import torch

    from dsv4_jax.kernels.hadamard import run_query_torch

    z = dict(np.load(path))
    out = {}
    for i in range(len(CASES)):
        q = torch.from_numpy(z[f"q{i}"].copy()).to(torch.bfloat16)  # exact: bf16 values
        cos, sin = torch.from_numpy(z[f"cos{i}"].copy()), torch.from_numpy(z[f"sin{i}"].copy())
        parts = torch.from_numpy(z[f"parts{i}"].copy())  # [2, T, H, n] fp32 partials summing to q exactly
        for fp4 in (0, 1):
            out[f"{i}_{fp4}"] = run_query_torch(q, cos, sin, bool(fp4)).numpy()
            out[f"{i}_{fp4}_s2"] = run_query_torch(parts, cos, sin, bool(fp4), split=2).numpy()
            out[f"{i}_{fp4}_s1"] = run_query_torch(q[None], cos, sin, bool(fp4), split=1).numpy()
    np.savez(path + ".out.npz", **out)


def _parts(q: np.ndarray, seed: int) -> np.ndarray:
    """Two fp32 partials ``[2, *q.shape]`` of the bf16 values ``q`` whose sum is ``q`` exactly in either order: ``d``
    within a factor 4 of ``q`` (bf16), ``q - d`` exact in fp32."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    u = rng.uniform(0.25, 1.0, q.shape) * rng.choice([-1.0, 1.0], q.shape)
    d = (q * u).astype(ml_dtypes.bfloat16).astype(np.float32)
    parts = np.stack([q - d, d]).astype(np.float32)
    assert (parts[0] + parts[1] == q).all() and (parts[1] + parts[0] == q).all()
    return parts


def test_interpreter_matches_reference_bits(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    cases = [_inputs(*c, SEED + i) for i, c in enumerate(CASES)]
    for i, z in enumerate(cases):
        z["parts"] = _parts(z["q"], SEED + 100 + i)
    arrays = {f"{k}{i}": v for i, z in enumerate(cases) for k, v in z.items()}
    out = triton_shim.interpret(__file__, arrays, tmp_path)
    for i, z in enumerate(cases):
        for fp4 in (0, 1):
            ref = _reference(z, bool(fp4))
            for form in ("", "_s2", "_s1"):  # the bf16 input, wq_b's split partials, its unsplit bf16 output
                got = out[f"{i}_{fp4}{form}"]
                assert np.isfinite(got).all(), f"case {CASES[i]}{form}: unwritten outputs"
                np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32),
                                              err_msg=f"case {CASES[i]} fp4={fp4}{form}")


def test_reference_is_the_models_former_steps():
    """The reference composes RoPE, the XLA butterflies and the snap; the snap changes values (the test inputs are
    not on the FP4 grid), and RoPE changes the last dims only (so a wrong RoPE slice would show)."""
    import jax.numpy as jnp

    from dsv4_jax.modeling.layers import apply_rope, hadamard

    z = _inputs(*CASES[1], SEED)
    q = jnp.asarray(z["q"], jnp.bfloat16)[None]
    cos, sin = jnp.asarray(z["cos"])[None], jnp.asarray(z["sin"])[None]
    plain = np.asarray(hadamard(apply_rope(q, cos[:, :, None], sin[:, :, None]), jnp.bfloat16)[0].astype(jnp.float32))
    np.testing.assert_array_equal(_reference(z, False), plain)
    assert (_reference(z, True) != plain).mean() > 0.5
    rope = np.asarray(apply_rope(q, cos[:, :, None], sin[:, :, None])[0].astype(jnp.float32))
    rd = 2 * z["cos"].shape[-1]
    np.testing.assert_array_equal(rope[..., :-rd], z["q"][..., :-rd])
    assert (rope[..., -rd:] != z["q"][..., -rd:]).mean() > 0.5


def test_cpu_modes_give_the_reference():
    """On a CPU backend ``"auto"`` and ``"reference"`` run the reference; bad shapes are refused by name."""
    import jax.numpy as jnp

    from dsv4_jax.kernels.hadamard import indexer_query, indexer_query_triton

    z = _inputs(*CASES[1], SEED)
    q = jnp.asarray(z["q"], jnp.bfloat16)[None]
    cos, sin = jnp.asarray(z["cos"])[None], jnp.asarray(z["sin"])[None]
    for fp4 in (False, True):
        ref = _reference(z, fp4)
        for mode in ("auto", "reference"):
            got = np.asarray(indexer_query(q, cos, sin, jnp.bfloat16, fp4, kernels=mode)[0].astype(jnp.float32))
            np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    with pytest.raises(ValueError, match="indexer_query"):
        indexer_query_triton(jnp.zeros((1, 2, 4, 96), jnp.bfloat16), cos[:, :1], sin[:, :1], True)
    with pytest.raises(ValueError, match="indexer_query"):
        indexer_query_triton(q, cos[:, :, :4], sin[:, :, :4][:, :1], True)


def _check(got: np.ndarray, ref: np.ndarray, fp4: bool, what: str) -> None:
    """GPU tolerance. Everything but RoPE's products is the reference's operations in its order; LLVM (and XLA)
    may contract ``a cos - b sin`` into an FMA, which moves a rotated value by at most one bf16 ulp. After the
    butterflies that moves some bf16 roundings by one ulp, and through the snap an e2m1 code by at most one step
    (at most half the value, or half the block scale below 1) or a block's scale (when its maximum sits on a
    power-of-two boundary). Hence ``|got - ref| <= 2**-1 max(|got|, |ref|) + 2**-1 s`` with the snap (``s``: the
    larger of the two blocks' scales), ``2**-7 |pair| + 2**-7 max|ref|`` of the row without it, and at least 97 % of
    the values bit for bit either way (a wrong pairing, stage, sign or block breaks that fraction)."""
    exact = float(np.mean(got.view(np.uint32) == ref.view(np.uint32)))
    assert exact >= 0.97, f"{what}: only {exact:.4f} of the values bit for bit"
    if fp4:
        gb, rb = got.reshape(-1, 32), ref.reshape(-1, 32)
        s = np.maximum(np.abs(gb).max(1, keepdims=True), np.abs(rb).max(1, keepdims=True)) / 6.0 * 2.0
        bad = np.abs(gb - rb) > 0.5 * np.maximum(np.abs(gb), np.abs(rb)) + 0.5 * s
    else:
        bad = np.abs(got - ref) > 2.0**-7 * np.abs(ref) + 2.0**-7 * np.abs(ref).max(-1, keepdims=True)
    assert not bad.any(), f"{what}: {bad.sum()} values outside the tolerance"


@pytest.mark.parametrize("T", [1, 32, 512], ids=["decode-b1", "decode-b32", "prefill-512"])
def test_gpu_matches_reference(T):
    """V4-Flash's indexer queries (64 heads of 128, 64 RoPE dims) at decode and prefill rows, against the
    reference run on the same GPU (its Hadamard the kernel in ``"auto"``, itself bit for bit the butterflies)."""
    from dsv4_jax.kernels import triton_unavailable

    why = triton_unavailable()
    if why is not None:
        pytest.skip(f"indexer query GPU test: {why}")
    import jax
    import jax.numpy as jnp

    from dsv4_jax.kernels.hadamard import indexer_query_triton

    z = _inputs(T, 64, 128, 64, SEED + T)
    q = jnp.asarray(z["q"], jnp.bfloat16)[None]
    cos, sin = jnp.asarray(z["cos"])[None], jnp.asarray(z["sin"])[None]
    for fp4 in (False, True):
        got = jax.jit(indexer_query_triton, static_argnums=3)(q, cos, sin, fp4)
        _check(np.asarray(got[0].astype(jnp.float32)), _reference(z, fp4), fp4, f"T={T} fp4={fp4}")


@pytest.mark.parametrize("T", [1, 4], ids=["decode-b1", "decode-b4"])
def test_gpu_query_linear_matches_unfused(monkeypatch, T):
    """``indexer_query_linear`` with the kernel on (``QUERY_AUTO`` patched: ``wq_b``'s GEMV partials straight into the
    query kernel) against the unfused path on the same GPU (the FP8 linear, then ``indexer_query_reference``):
    V4-Flash's ``wq_b`` (8,192 x 1,024), 64 heads of 128, the snap on and off; :func:`_check`'s tolerance (the split
    partials may also be summed in another order there: one more bf16 rounding to move)."""
    from dsv4_jax.kernels import triton_unavailable

    why = triton_unavailable()
    if why is not None:
        pytest.skip(f"indexer query GPU test: {why}")
    import jax
    import jax.numpy as jnp

    import dsv4_jax.kernels.hadamard as hd
    from dsv4_jax.modeling.quant import Fp8Tensor, quantize_act, quantize_fp8_weight_np

    rng = np.random.default_rng(SEED + 7 * T)
    wq, ws = quantize_fp8_weight_np(rng.standard_normal((8192, 1024)).astype(np.float32) * 0.05)
    w = Fp8Tensor(q=jnp.asarray(wq), scale=jnp.asarray(ws))
    qr = jnp.asarray(rng.standard_normal((1, T, 1024)), jnp.bfloat16)
    qrq = quantize_act(qr).dequant().astype(jnp.bfloat16)
    z = _inputs(T, 64, 128, 64, SEED + T)
    cos, sin = jnp.asarray(z["cos"])[None], jnp.asarray(z["sin"])[None]
    def run(fp4: bool, on: bool):  # a fresh jit per setting: the switch is read at trace time
        monkeypatch.setattr(hd, "QUERY_AUTO", on)
        return jax.jit(lambda a, b: hd.indexer_query_linear(a, b, w, 64, cos, sin, jnp.bfloat16, True, fp4))(qr, qrq)

    for fp4 in (False, True):
        got, ref = run(fp4, True), run(fp4, False)
        _check(np.asarray(got[0].astype(jnp.float32)), np.asarray(ref[0].astype(jnp.float32)), fp4,
               f"query linear T={T} fp4={fp4}")


if __name__ == "__main__":  # the interpreter subprocess
    _interpret_main(sys.argv[1])
