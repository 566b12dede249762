"""The decode-state caches in their snapped formats (issue 12): the same numbers as bf16 caches at half the bytes.

Where the config snaps them (reference numerics), the KV ring and compressed KV are stored as e4m3 codes + one e8m0
byte per 64 nope dims + bf16 RoPE dims (``Fp8Cache``), the indexer keys as packed e2m1 + e8m0 per 32
(``Fp4Tensor``). What is asserted: decoding the codes gives back the simulations' values bit for bit
(``fp8_simulate`` / ``fp4_simulate``, i.e. what the caches hold today), on edge cases: zero and -0 blocks, amax below
the scale floors, saturation, ties.
"""

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.modeling.quant import (
    cache_values,
    encode_fp4_cache,
    encode_fp8_cache,
    fp4_simulate,
    fp8_simulate,
)

SEED = 20261129


def bits(a) -> np.ndarray:
    """The raw bits of an array (so -0 vs 0 and NaN payloads count as differences)."""
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def hard_values(rng, shape) -> jax.Array:
    """bf16 rows over 50 binades with the corner cases of the snaps in some blocks."""
    x = rng.standard_normal(shape).astype(np.float32) * np.exp2(rng.integers(-40, 12, (shape[0], 1)))
    x[0, :64] = 0.0  # all-zero block: the scale floor
    x[1, :64] = -0.0
    x[2, :] = 1e-7 * rng.standard_normal(shape[1])  # amax below the FP8 floor (1e-4)
    x[3, :] = 1e-38 * rng.standard_normal(shape[1])  # FP4 scale at its floor 2**-126: denormal products
    x[4, :64] = np.linspace(-448, 448, 64)  # saturation edge, scale 1
    x[5, :32] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4  # e2m1 midpoints (ties to even), amax 6
    x[6, :64] = np.tile([1.0625, 1.1875, -1.1875, 448.0], 16)  # e4m3 ties
    return jnp.asarray(x, jnp.bfloat16)


def test_fp8_cache_decodes_to_the_fp8_simulation():
    x = hard_values(np.random.default_rng(SEED), (64, 512))  # [N, Dh] with Dn = 448
    c = encode_fp8_cache(x, 448)
    assert (c.codes.dtype, c.codes.shape, c.scales.dtype, c.scales.shape, c.rope.shape) == (
        jnp.float8_e4m3fn, (64, 448), jnp.uint8, (64, 7), (64, 64))
    want = jnp.concatenate([fp8_simulate(x[:, :448], 64), x[:, 448:]], axis=-1)
    np.testing.assert_array_equal(bits(c.decode(jnp.bfloat16)), bits(want))
    np.testing.assert_array_equal(bits(encode_fp8_cache(want, 448).decode(jnp.bfloat16)), bits(want))  # idempotent


def test_fp4_cache_decodes_to_the_fp4_simulation():
    x = hard_values(np.random.default_rng(SEED + 1), (64, 128))
    c = encode_fp4_cache(x)
    assert (c.packed.dtype, c.packed.shape, c.scale.dtype, c.scale.shape) == (jnp.uint8, (64, 64), jnp.uint8, (64, 4))
    want = fp4_simulate(x, 32)
    np.testing.assert_array_equal(bits(cache_values(c, jnp.bfloat16)), bits(want))
    np.testing.assert_array_equal(bits(cache_values(encode_fp4_cache(want), jnp.bfloat16)), bits(want))
