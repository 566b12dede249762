"""FP8/FP4 formats and the official quantization simulations, against values worked out by hand from the spec (3)."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsv4_jax.modeling import quant as q


def f32(a):
    return np.asarray(a, np.float32)


@pytest.mark.parametrize("amax,qmax,floor,expected", [
    (448.0, 448.0, q.FP8_FLOOR, 1.0),  # 448 * fp32(1/448) == 1 exactly -> 2**0
    (449.0, 448.0, q.FP8_FLOOR, 2.0),  # just above -> rounds UP to the next power of two
    (1.0, 448.0, q.FP8_FLOOR, 2.0**-8),  # 1/448 = 0.00223 -> 2**ceil(-8.8) = 2**-8
    (0.0, 448.0, q.FP8_FLOOR, 2.0**-22),  # floor 1e-4: 1e-4/448 = 2.2e-7 -> 2**-22
    (6.0, 6.0, q.FP4_FLOOR, 1.0),  # 6 * fp32(1/6) rounds to exactly 1.0 in fp32
    (7.0, 6.0, q.FP4_FLOOR, 2.0),
    (3.0, 6.0, q.FP4_FLOOR, 0.5),  # 0.5 exactly: a power of two stays
    (0.0, 6.0, q.FP4_FLOOR, 2.0**-126),
])
def test_pow2_scale_rounds_up(amax, qmax, floor, expected):
    s = q.pow2_scale(jnp.float32(amax), qmax, floor)
    assert float(s) == expected


def test_fp8_snap_ties_to_even_and_saturates():
    # one block of 64 with amax 448 -> scale 1; e4m3 spacing is 0.125 in [1,2), 32 in [256,512)
    vals = np.zeros(64, np.float32)
    vals[:6] = [448.0, 1.0625, 1.1875, -1.1875, 300.0, 0.0009765625]
    # 1.0625: tie between 1.0 (even) and 1.125 -> 1.0; 1.1875: tie between 1.125 and 1.25 (even) -> 1.25
    # 300 -> 288 (nearer); 2**-10 is an e4m3 subnormal multiple of 2**-9? no: smallest subnormal is 2**-9 -> tie to 0
    want = np.zeros(64, np.float32)
    want[:6] = [448.0, 1.0, 1.25, -1.25, 288.0, 0.0]
    got = f32(q.fp8_simulate(jnp.asarray(vals), 64))
    np.testing.assert_array_equal(got, want)


def test_fp8_snap_uses_block_scale_and_keeps_dtype():
    x = np.zeros((2, 128), np.float32)
    x[0, 0], x[0, 1] = 1.0, 0.51  # amax 1 -> s = 2**-8: 0.51/2**-8 = 130.56 -> e4m3 spacing 8 -> 128 -> 0.5
    x[1, 64], x[1, 65] = 900.0, 3.0  # second block: amax 900 -> s = 4: 3/4 = 0.75 exact -> 3.0
    got = f32(q.fp8_simulate(jnp.asarray(x, jnp.bfloat16), 64).astype(jnp.float32))
    assert got[0, 0] == 1.0 and got[0, 1] == 0.5
    assert got[1, 64] == 896.0 and got[1, 65] == 3.0  # 900/4 = 225 -> e4m3 (spacing 16 in [128,256)) 224 -> 896
    assert q.fp8_simulate(jnp.asarray(x, jnp.bfloat16), 64).dtype == jnp.bfloat16


def test_fp4_snap_rne_table():
    # amax 6 -> scale 1: the e2m1 grid directly; ties go to the even mantissa
    pairs = [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0), (5.5, 6.0),
             (-0.75, -1.0), (-2.5, -2.0), (0.3, 0.5), (6.0, 6.0)]
    x = np.zeros(32, np.float32)
    x[: len(pairs)] = [a for a, _ in pairs]
    got = f32(q.fp4_simulate(jnp.asarray(x), 32))
    np.testing.assert_array_equal(got[: len(pairs)], [b for _, b in pairs])


def test_fp4_snap_scaled_block():
    x = np.zeros(32, np.float32)
    x[0], x[1], x[2] = 7.0, 2.5, -1.0  # amax 7 -> s = 2: 3.5 -> 4 (8), 1.25 -> 1 (2), -0.5 -> -0.5 (-1)
    got = f32(q.fp4_simulate(jnp.asarray(x), 32))
    assert got[:3].tolist() == [8.0, 2.0, -1.0]


def test_round_e2m1_matches_ml_dtypes_everywhere():
    v = np.random.default_rng(0).uniform(-6, 6, 20000).astype(np.float32)
    v = np.concatenate([v, np.arange(-6, 6.001, 0.25, dtype=np.float32)])  # all midpoints
    want = v.astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(f32(q.round_e2m1(jnp.asarray(v))), want)


def test_unpack_fp4_low_nibble_first():
    packed = jnp.asarray(np.array([[0x21, 0x9F]], np.uint8))  # 0x21: lo 1 (0.5), hi 2 (1.0); 0x9F: lo F (-6), hi 9
    np.testing.assert_array_equal(f32(q.unpack_fp4(packed)), [[0.5, 1.0, -6.0, -0.5]])


def test_fp4_weight_roundtrip_and_scale():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 64)).astype(np.float32)
    packed, scale = q.quantize_fp4_weight_np(w)
    assert packed.shape == (3, 32) and scale.shape == (3, 2)
    # scale = 2**ceil(log2(amax/6)) per 32-block, stored as exponent + 127
    amax = np.abs(w.reshape(3, 2, 32)).max(-1)
    np.testing.assert_array_equal(scale.astype(int) - 127, np.ceil(np.log2(amax / 6)).astype(int))
    deq = f32(q.dequant_fp4(q.Fp4Tensor(packed=jnp.asarray(packed), scale=jnp.asarray(scale))))
    s = np.repeat(np.exp2(scale.astype(np.float32) - 127), 32, axis=1)
    want = (w / s).astype(ml_dtypes.float4_e2m1fn).astype(np.float32) * s
    np.testing.assert_array_equal(deq, want)


def test_fp8_weight_dequant_block_scales():
    # a [130, 200] weight: 2x2 blocks (ragged edges), each with its own power-of-two scale
    rng = np.random.default_rng(2)
    w = rng.normal(size=(130, 200)).astype(np.float32)
    w[:128, :128] *= 1000
    qv, scale = q.quantize_fp8_weight_np(w)
    assert scale.shape == (2, 2)
    deq = f32(q.dequant_fp8(q.Fp8Tensor(q=jnp.asarray(qv), scale=jnp.asarray(scale))))
    sfull = np.exp2(np.repeat(np.repeat(scale.astype(np.float32) - 127, 128, 0), 128, 1)[:130, :200])
    np.testing.assert_array_equal(deq, qv.astype(np.float32) * sfull)
    assert np.abs(deq - w).max() / np.abs(w).max() < 2**-4  # e4m3 has 3 mantissa bits


def test_e8m0_special_values():
    got = f32(q.e8m0_to_f32(jnp.asarray(np.array([127, 0, 254, 255], np.uint8))))
    # exponent 0 is 2**-127, a subnormal that backends with flush-to-zero (XLA:CPU) read as 0
    assert got[0] == 1.0 and got[1] in (0.0, np.float32(2.0**-127)) and got[2] == 2.0**127 and np.isnan(got[3])


def test_linear_fp8_matches_exact_dequantized_product():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 256)).astype(np.float32)
    qv, scale = q.quantize_fp8_weight_np(rng.normal(size=(128, 256)).astype(np.float32) / 16)
    w = q.Fp8Tensor(q=jnp.asarray(qv), scale=jnp.asarray(scale))
    y = f32(q.linear(jnp.asarray(x, jnp.bfloat16), w, jnp.float32, simulate=True))
    # oracle in float64: activation snapped per 1x128 block, weights dequantized
    xb = x.astype(ml_dtypes.bfloat16).astype(np.float64).reshape(5, 2, 128)
    e = np.ceil(np.log2(np.maximum(np.abs(xb).max(-1, keepdims=True), 1e-4) / 448))
    xs = (np.clip(xb / 2**e, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * 2**e).reshape(5, 256)
    want = xs @ f32(q.dequant_fp8(w)).astype(np.float64).T
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)  # fp32 accumulation of 256 exact products
