"""The attention's query / new-KV preparation kernel (``dsv4_jax/kernels/attn_prep.py``) against the XLA sequence.

CPU: ``_prep_kernel`` under Triton's interpreter (subprocess, torch CPU tensors) against ``prep_q_kv_reference``
(``head_rms_norm``, ``apply_rope``, ``encode_fp8_cache``), bit for bit. The query magnitudes lie in [0.5, 2) times a
power of two per head, so that the rounded squares' fp32 sum is exact in any order (module docstring: the only
operation whose order differs); the KV entries span 2**-10 .. 2**6 so that the snap rounds and its scales vary.
Cases: V4's head (512 dims, 448 snapped, 64 RoPE dims) over 16 heads (two head programs and the KV program per row)
with the CPU torch tail rule on (48 flattened heads: the last 16 take it), and a narrow head (128 dims, 64 snapped,
64 RoPE) over 4 heads without it.

GPU (skipped without one): V4-Flash's 64 heads at 1 and 4 rows with the kernel on (``AUTO`` patched) against the
reference on the same GPU: queries and KV values within one bf16 ulp (the sum order, FMA-contracted RoPE), >= 97 %
bit-equal; the entry's codes bit for bit the snap of the kernel's own KV values (one quantizer).
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

SEED = 19
EPS = 1e-6
# (rows, heads, head dim, snapped dims, RoPE dims, CPU torch tail)
CASES = [(3, 16, 512, 448, 64, True), (2, 4, 128, 64, 64, False)]


def _inputs(R: int, H: int, DH: int, rd: int, seed: int) -> dict:
    """bf16 values (as fp32): q with magnitudes in [0.5, 2) x 2**k per head, kv over 2**-10 .. 2**6; fp32 cos/sin of
    positions up to 2**20 (``layers.rope_cos_sin``)."""
    import jax.numpy as jnp

    from dsv4_jax.modeling.layers import rope_cos_sin

    rng = np.random.default_rng(seed)
    q = rng.uniform(0.5, 2.0, (R, H, DH)) * rng.choice([-1.0, 1.0], (R, H, DH))
    q *= np.exp2(rng.integers(-4, 5, (R, H, 1)))
    kv = rng.standard_normal((R, DH)) * np.exp2(rng.integers(-10, 6, (R, DH // 64, 1))).repeat(64, 1).reshape(R, DH)
    bf = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))  # noqa: E731
    freqs = (10000.0 ** (-np.arange(0, rd, 2) / rd)).astype(np.float32)
    cos, sin = rope_cos_sin(freqs, jnp.asarray(rng.integers(0, 2**20, R), jnp.int32))
    return dict(q=bf(q), kv=bf(kv), cos=np.asarray(cos, np.float32), sin=np.asarray(sin, np.float32))


def _reference(z: dict, dn: int, tail: bool):
    """``prep_q_kv_reference`` on the case: q', kv values (fp32 of bf16), codes (uint8 bits), scales, rope."""
    import jax.numpy as jnp

    from dsv4_jax.kernels.attn_prep import prep_q_kv_reference

    q, kv, e = prep_q_kv_reference(jnp.asarray(z["q"], jnp.bfloat16)[None], jnp.asarray(z["kv"], jnp.bfloat16)[None],
                                   jnp.asarray(z["cos"])[None], jnp.asarray(z["sin"])[None], EPS, dn, tail)
    f32 = lambda a: np.asarray(a[0].astype(jnp.float32))  # noqa: E731
    return f32(q), f32(kv), np.asarray(e.codes[0]).view(np.uint8), np.asarray(e.scales[0]), f32(e.rope)


def _interpret_main(path: str) -> None:
    """Subprocess body: the kernel on every stored case."""
    import torch

    from dsv4_jax.kernels.attn_prep import run_torch

    z = dict(np.load(path))
    out = {}
    for i, (_, _, _, dn, _, tail) in enumerate(CASES):
        t = lambda k, i=i: torch.from_numpy(z[f"{k}{i}"].copy())  # noqa: E731
        res = run_torch(t("q").to(torch.bfloat16), t("kv").to(torch.bfloat16), t("cos"), t("sin"), EPS, dn, tail)
        for name, a in zip(("q", "kv", "codes", "scales", "rope"), res):
            out[f"{name}{i}"] = a.numpy()
    np.savez(path + ".out.npz", **out)


def test_interpreter_matches_reference_bits(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    cases = [_inputs(R, H, DH, rd, SEED + i) for i, (R, H, DH, _, rd, _) in enumerate(CASES)]
    out = triton_shim.interpret(__file__, {f"{k}{i}": v for i, z in enumerate(cases) for k, v in z.items()}, tmp_path)
    for i, (_, _, _, dn, _, tail) in enumerate(CASES):
        ref = _reference(cases[i], dn, tail)
        for name, want in zip(("q", "kv", "codes", "scales", "rope"), ref):
            got = out[f"{name}{i}"]
            assert got.shape == want.shape, (name, got.shape, want.shape)
            np.testing.assert_array_equal(got.view(np.uint32) if got.dtype == np.float32 else got,
                                          want.view(np.uint32) if want.dtype == np.float32 else want,
                                          err_msg=f"case {CASES[i]}: {name}")
        assert (ref[0] != cases[i]["q"]).mean() > 0.5  # the norm and RoPE moved the queries


def test_tail_rule_changes_something():
    """The CPU tail's reciprocal differs from the correctly rounded one on these inputs (so the case tests it)."""
    import jax.numpy as jnp

    from dsv4_jax.modeling.layers import head_rms_norm

    z = _inputs(*CASES[0][:3], CASES[0][4], SEED)
    q = jnp.asarray(z["q"], jnp.bfloat16)[None]
    a, b = head_rms_norm(q, EPS, jnp.bfloat16, True), head_rms_norm(q, EPS, jnp.bfloat16, False)
    assert bool(jnp.any(a != b))


def test_cpu_dispatch_is_the_reference():
    import jax.numpy as jnp

    from dsv4_jax.kernels.attn_prep import prep_q_kv, prep_q_kv_reference

    z = _inputs(*CASES[1][:3], CASES[1][4], SEED)
    args = (jnp.asarray(z["q"], jnp.bfloat16)[None], jnp.asarray(z["kv"], jnp.bfloat16)[None],
            jnp.asarray(z["cos"])[None], jnp.asarray(z["sin"])[None], EPS, 64)
    for got, want in zip(prep_q_kv(*args, kernels="auto")[:2], prep_q_kv_reference(*args)[:2]):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("R", [1, 4], ids=["decode-b1", "decode-b4"])
def test_gpu_matches_reference(monkeypatch, R):
    from dsv4_jax.kernels import triton_unavailable

    why = triton_unavailable()
    if why is not None:
        pytest.skip(f"attention prep GPU test: {why}")
    import jax
    import jax.numpy as jnp

    import dsv4_jax.kernels.attn_prep as ap
    from dsv4_jax.modeling.quant import encode_fp8_cache

    z = _inputs(R, 64, 512, 64, SEED + R)
    z["q"] = z["q"] * np.float32(np.random.default_rng(R).standard_normal(z["q"].shape) ** 2)  # sums that round
    z["q"] = np.asarray(jnp.asarray(z["q"], jnp.bfloat16).astype(jnp.float32))
    args = (jnp.asarray(z["q"], jnp.bfloat16)[None], jnp.asarray(z["kv"], jnp.bfloat16)[None],
            jnp.asarray(z["cos"])[None], jnp.asarray(z["sin"])[None])

    def run(on: bool):
        monkeypatch.setattr(ap, "AUTO", on)
        return jax.jit(lambda *a: ap.prep_q_kv(*a, EPS, 448, kernels="auto"))(*args)

    got, ref = run(True), run(False)
    for name, g, r in (("q", got[0], ref[0]), ("kv", got[1], ref[1])):
        g, r = np.asarray(g.astype(jnp.float32)), np.asarray(r.astype(jnp.float32))
        assert (np.abs(g - r) <= _bf16_ulp(r) + 2.0**-133).all(), f"R={R} {name}: beyond one bf16 ulp"
        assert np.mean(g.view(np.uint32) == r.view(np.uint32)) >= 0.97, f"R={R} {name}: too few equal bits"
    mine = encode_fp8_cache(got[1], 448)
    for leaf in ("codes", "scales", "rope"):
        np.testing.assert_array_equal(np.asarray(getattr(got[2], leaf)).view(np.uint8),
                                      np.asarray(getattr(mine, leaf)).view(np.uint8), err_msg=f"R={R} {leaf}")


if __name__ == "__main__":  # the interpreter subprocess
    _interpret_main(sys.argv[1])
