"""FP8 / FP4 tensor types, the official quantization simulations, and the linear op that dispatches on them.

``quantize_act`` makes the one quantized-activation type, :class:`QuantAct` (e4m3 codes + fp32 power-of-two block
scales): what the FP8 GEMM kernels consume without a float round trip.

Weights stay in the checkpoint's formats (spec 12.1):
  * ``Fp8Tensor``: e4m3 values ``[..., N, K]`` + e8m0 exponents ``[..., ceil(N/128), ceil(K/128)]`` (one per 128x128
    block, value = q * 2**(e - 127)).
  * ``Fp4Tensor``: e2m1 codes packed two per byte ``[..., N, K/2]`` (LOW nibble = even k) + e8m0 exponents
    ``[..., N, K/32]`` (one per 1x32 block).
e8m0 exponents are kept as raw ``uint8`` bytes: portable across XLA backends and what Triton kernels consume.

The decode-state caches keep the snapped activations the same way (issue 12): :class:`Fp8Cache` (KV entries: e4m3
codes + one e8m0 byte per 64 nope dims + bf16 RoPE dims) and ``Fp4Tensor`` (indexer keys), made by
``encode_fp8_cache`` / ``encode_fp4_cache`` and read back, exactly, by ``cache_values``.

Activation simulations (spec 3): scales are powers of two rounded UP (``ceil(log2(amax * fp32(1/QMAX)))`` from the
IEEE bits), values are rounded to nearest-even on the e4m3 / e2m1 grid. Every dequantization here is exact in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_FLOOR = np.float32(1e-4)
FP4_FLOOR = np.float32(6 * 2.0**-126)
E2M1_VALUES = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)
HIGHEST = jax.lax.Precision.HIGHEST


@struct.dataclass
class Fp8Tensor:
    """FP8 e4m3 weight with 128x128 block e8m0 scales (raw exponent bytes)."""

    q: jax.Array  # e4m3 [..., N, K]
    scale: jax.Array  # uint8 [..., ceil(N/128), ceil(K/128)]

    @property
    def shape(self):
        return self.q.shape


@struct.dataclass
class Fp4Tensor:
    """FP4 e2m1 weight, two codes per byte (low nibble first), with 1x32 block e8m0 scales (raw bytes)."""

    packed: jax.Array  # uint8 [..., N, K/2]
    scale: jax.Array  # uint8 [..., N, K/32]

    @property
    def shape(self):
        return (*self.packed.shape[:-1], self.packed.shape[-1] * 2)


# ---------------------------------------------------------------------------------------------- scales
def e8m0_to_f32(e: jax.Array) -> jax.Array:
    """2**(e - 127) in fp32 for raw e8m0 bytes (exact; 0 -> 2**-127 denormal, 255 -> NaN)."""
    e = e.astype(jnp.int32)
    return jnp.where(e == 255, jnp.nan, jnp.ldexp(jnp.ones(e.shape, jnp.float32), e - 127))


def pow2_scale(amax: jax.Array, qmax: float, floor: np.float32) -> jax.Array:
    """Power-of-two scale rounded up, bit-exact with TileLang ``fast_log2_ceil``/``fast_pow2`` (spec 3.1)."""
    a = jnp.maximum(amax.astype(jnp.float32), floor)
    t = a * np.float32(1.0 / qmax)  # one fp32 multiply, not a division
    bits = jax.lax.bitcast_convert_type(t, jnp.uint32)
    e = ((bits >> 23) & 0xFF).astype(jnp.int32) - 127 + ((bits & 0x7FFFFF) != 0).astype(jnp.int32)
    return jax.lax.bitcast_convert_type(((e + 127) << 23).astype(jnp.uint32), jnp.float32)


def round_e4m3(v: jax.Array) -> jax.Array:
    """Round fp32 values (already clamped to +-448) to the e4m3 grid, ties to even; returns fp32."""
    return v.astype(jnp.float8_e4m3fn).astype(jnp.float32)


def round_e2m1(v: jax.Array) -> jax.Array:
    """Round fp32 values (already clamped to +-6) to the e2m1 grid {0,.5,1,1.5,2,3,4,6}, ties to even."""
    a = jnp.abs(v)
    step = jnp.where(a < 2.0, 0.5, jnp.where(a < 4.0, 1.0, 2.0))
    return jnp.sign(v) * jnp.round(a / step) * step  # jnp.round is half-to-even; grid parity == mantissa parity


def _blocks(x: jax.Array, block: int) -> jax.Array:
    if x.shape[-1] % block:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of the quantization block {block}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def fp8_act_quant(x: jax.Array, block: int = 128) -> tuple[jax.Array, jax.Array]:
    """``act_quant`` (not in place): e4m3 values (as fp32) and per-block power-of-two scales ``[..., K/block, 1]``."""
    xb = _blocks(x.astype(jnp.float32), block)
    s = pow2_scale(jnp.max(jnp.abs(xb), axis=-1, keepdims=True), FP8_MAX, FP8_FLOOR)
    return round_e4m3(jnp.clip(xb / s, -FP8_MAX, FP8_MAX)), s


def fp8_simulate(x: jax.Array, block: int) -> jax.Array:
    """In-place FP8 QAT simulation: snap ``x`` to the e4m3 grid scaled per block; same dtype as ``x`` (spec 3.2)."""
    q, s = fp8_act_quant(x, block)
    return (q * s).reshape(x.shape).astype(x.dtype)


def fp4_act_quant(x: jax.Array, block: int = 32) -> tuple[jax.Array, jax.Array]:
    """FP4 quantization per block: e2m1 values (as fp32) ``[..., K/block, block]`` and power-of-two scales
    ``[..., K/block, 1]`` (spec 3.3)."""
    xb = _blocks(x.astype(jnp.float32), block)
    s = pow2_scale(jnp.max(jnp.abs(xb), axis=-1, keepdims=True), FP4_MAX, FP4_FLOOR)
    return round_e2m1(jnp.clip(xb / s, -FP4_MAX, FP4_MAX)), s


def fp4_simulate(x: jax.Array, block: int = 32) -> jax.Array:
    """In-place FP4 QAT simulation: snap ``x`` to the e2m1 grid scaled per block of 32 (spec 3.3)."""
    q, s = fp4_act_quant(x, block)
    return (q * s).reshape(x.shape).astype(x.dtype)


# ---------------------------------------------------------------------------------------------- weights
def dequant_fp8(w: Fp8Tensor) -> jax.Array:
    """Exact fp32 value of an FP8 block-scaled weight ``[..., N, K]``."""
    n, k = w.q.shape[-2:]
    s = e8m0_to_f32(w.scale)
    s = jnp.repeat(jnp.repeat(s, 128, axis=-2)[..., :n, :], 128, axis=-1)[..., :k]
    return w.q.astype(jnp.float32) * s


def unpack_fp4(packed: jax.Array) -> jax.Array:
    """e2m1 codes ``[..., N, K/2]`` bytes -> fp32 values ``[..., N, K]`` (low nibble = even element)."""
    lo = packed & 0x0F
    hi = packed >> 4
    codes = jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return jnp.asarray(E2M1_VALUES)[codes.astype(jnp.int32)]


def dequant_fp4(w: Fp4Tensor) -> jax.Array:
    """Exact fp32 value of an FP4 1x32-block-scaled weight ``[..., N, K]``."""
    v = unpack_fp4(w.packed)
    return v * jnp.repeat(e8m0_to_f32(w.scale), 32, axis=-1)


def dequant(w) -> jax.Array:
    """fp32 value of any weight (Fp8Tensor, Fp4Tensor or a plain array)."""
    if isinstance(w, Fp8Tensor):
        return dequant_fp8(w)
    if isinstance(w, Fp4Tensor):
        return dequant_fp4(w)
    return w.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------- activations
@struct.dataclass
class QuantAct:
    """An activation FP8-quantized per 1x``block`` (the reference's ``act_quant``, not in place): what an FP8 GEMM
    consumes. Value = ``q * scale`` per block, exact in fp32."""

    q: jax.Array  # float8_e4m3fn [..., K]
    scale: jax.Array  # fp32 powers of two [..., K/block]

    @property
    def block(self) -> int:
        return self.q.shape[-1] // self.scale.shape[-1]

    def dequant(self) -> jax.Array:
        """fp32 ``[..., K]``: exactly ``quantized_input(x, True)``."""
        qb = self.q.astype(jnp.float32).reshape(*self.scale.shape, self.block)
        return (qb * self.scale[..., None]).reshape(self.q.shape)


@struct.dataclass
class SplitSum:
    """A linear's output left as the fp32 split-K partials of its kernel, ``parts [S, ..., N]``: the value is their
    sum over ``S`` rounded to ``dtype`` (:meth:`value`, what the kernels' XLA sum computes). A consumer kernel that
    reads the output once can sum them itself, a launch less (``mhc.hc_post_pre_norm_quant``)."""

    parts: jax.Array  # fp32 [S, ..., N]
    dtype: jnp.dtype = struct.field(pytree_node=False)

    def value(self) -> jax.Array:
        from dsv4_jax.kernels import sum_splits  # the kernels' own sum of split partials, one definition

        return sum_splits(self.parts, self.parts.shape[0], self.dtype)


def summed(y) -> jax.Array:
    """``y`` as an array: a :class:`SplitSum`'s value, anything else as it is."""
    return y.value() if isinstance(y, SplitSum) else y


def quantize_act(x: jax.Array, block: int = 128) -> QuantAct:
    """The one FP8 activation quantizer: e4m3 codes and per-block power-of-two scales (rounded up, spec 3.1)."""
    q, s = fp8_act_quant(x, block)  # fp32 values on the e4m3 grid [..., K/block, block], scales [..., K/block, 1]
    return QuantAct(q=q.astype(jnp.float8_e4m3fn).reshape(x.shape), scale=s[..., 0])


# ---------------------------------------------------------------------------------------------- snapped caches
def e8m0_bytes(s: jax.Array) -> jax.Array:
    """Raw e8m0 bytes of fp32 powers of two in the normal range (their biased exponent field); inverse of
    :func:`e8m0_to_f32`."""
    return ((jax.lax.bitcast_convert_type(s.astype(jnp.float32), jnp.uint32) >> 23) & 0xFF).astype(jnp.uint8)


def pack_e2m1(v: jax.Array) -> jax.Array:
    """fp32 values on the e2m1 grid ``[..., K]`` -> codes packed two per byte ``[..., K/2]`` (low nibble = even
    element, the :class:`Fp4Tensor` layout). The sign bit is copied, so -0 stays -0: :func:`unpack_fp4` gives back
    exactly ``v``."""
    a = jnp.abs(v)
    mag = jnp.where(a < 2.0, a * 2.0, jnp.where(a < 4.0, a + 2.0, a * 0.5 + 4.0)).astype(jnp.uint8)  # grid index
    codes = mag | (jnp.signbit(v).astype(jnp.uint8) << 3)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def encode_fp4_cache(x: jax.Array) -> Fp4Tensor:
    """:func:`fp4_simulate` (blocks of 32) kept as its codes: ``x [..., K]`` -> packed e2m1 ``[..., K/2]`` + e8m0
    bytes ``[..., K/32]``, the layout of FP4 weights. ``cache_values`` of the result equals ``fp4_simulate(x, 32)``
    bit for bit (the same grid values times the same power-of-two scales)."""
    q, s = fp4_act_quant(x, 32)  # [..., K/32, 32] e2m1 values, [..., K/32, 1] scales
    return Fp4Tensor(packed=pack_e2m1(q.reshape(x.shape)), scale=e8m0_bytes(s[..., 0]))


@struct.dataclass
class Fp8Cache:
    """Cache entries ``[..., Dh]`` whose first ``Dn`` dims are FP8-snapped (spec 3.2), stored as the snap's own
    codes: e4m3 values, one e8m0 scale byte per 64 dims, and the RoPE dims as they are (bf16). V4: 448 + 7 + 128 =
    583 bytes per entry instead of 1024 (vLLM/SGLang's 584-byte layout less its padding byte). The scales follow the
    reference rule (powers of two rounded up), so :meth:`decode` gives back exactly what ``fp8_simulate`` gives."""

    codes: jax.Array  # float8_e4m3fn [..., Dn]
    scales: jax.Array  # uint8 e8m0 [..., Dn/64]
    rope: jax.Array  # act dtype [..., Dh - Dn]

    @property
    def shape(self):
        return (*self.rope.shape[:-1], self.codes.shape[-1] + self.rope.shape[-1])

    def decode(self, dtype) -> jax.Array:
        """The entries as ``dtype`` values ``[..., Dh]``: ``bf16(fp32(code) * 2**(e-127))`` per nope dim (exact)."""
        qb = self.codes.astype(jnp.float32).reshape(*self.scales.shape, -1)  # [..., Dn/64, 64]
        nope = (qb * e8m0_to_f32(self.scales)[..., None]).reshape(self.codes.shape).astype(dtype)
        return jnp.concatenate([nope, self.rope.astype(dtype)], axis=-1)


def encode_fp8_cache(x: jax.Array, nope_dim: int, block: int = 64) -> Fp8Cache:
    """Snap the first ``nope_dim`` dims of ``x [..., Dh]`` per block of 64 (spec 3.2) and keep the codes; the RoPE
    dims are kept unchanged. ``encode_fp8_cache(x, Dn).decode(x.dtype)`` equals
    ``concat([fp8_simulate(x[..., :Dn], 64), x[..., Dn:]])`` bit for bit."""
    q, s = fp8_act_quant(x[..., :nope_dim], block)  # [..., Dn/64, 64] e4m3 values, [..., Dn/64, 1] scales
    return Fp8Cache(codes=q.astype(jnp.float8_e4m3fn).reshape(*x.shape[:-1], nope_dim), scales=e8m0_bytes(s[..., 0]),
                    rope=x[..., nope_dim:])


def cache_values(c, dtype) -> jax.Array:
    """The values of a cache (or of entries gathered from one) as ``dtype``: decoded from :class:`Fp8Cache` /
    :class:`Fp4Tensor` codes, a plain array as it is."""
    if isinstance(c, Fp8Cache):
        return c.decode(dtype)
    if isinstance(c, Fp4Tensor):
        return dequant_fp4(c).astype(dtype)
    return c


# ---------------------------------------------------------------------------------------------- linear
def quantized_input(x: jax.Array, simulate: bool) -> jax.Array:
    """The GEMM input as the FP8 kernels see it: fp32 value of ``act_quant(x, 128)`` (or plain fp32 when off)."""
    if not simulate:
        return x.astype(jnp.float32)
    return quantize_act(x, 128).dequant()


def linear(x: jax.Array, w, out_dtype, simulate: bool, xq: QuantAct | jax.Array | None = None, *,
           kernels: str = "reference", parallel: str | None = None, partials: bool = False) -> jax.Array:
    """``y = x @ W.T`` with the official dispatch on the weight type (spec 3.4).

    ``xq`` may pass the input's precomputed quantization (a :class:`QuantAct`, or the fp32 ``quantized_input(x)``).
    ``kernels`` (``Config.kernels``) selects the implementation of FP8 weights with the simulations on:
    :func:`dsv4_jax.kernels.fp8_linear.fp8_linear` (Triton where :func:`dsv4_jax.kernels.use_triton` says so);
    everything else is :func:`linear_reference`. ``parallel`` (``"cols"``, ``"rows"``, ``"none"``): how the weight is
    split under a mesh, which lets the kernel run per device (:mod:`dsv4_jax.kernels.on_mesh`). ``partials``: the
    caller takes a :class:`SplitSum` where the kernel splits K (its consumer sums the partials; :func:`summed`).
    """
    if kernels != "reference" and simulate and isinstance(w, Fp8Tensor):
        from dsv4_jax.kernels.fp8_linear import fp8_linear

        return fp8_linear(x, w, out_dtype, xq, kernels=kernels, parallel=parallel, partials=partials)
    return linear_reference(x, w, out_dtype, simulate, xq)


def linear_pair(x: jax.Array, wa, wb, out_dtype, simulate: bool, xq: QuantAct | jax.Array | None = None, *,
                kernels: str = "reference", parallel: str | None = None) -> tuple[jax.Array, jax.Array]:
    """``(linear(x, wa), linear(x, wb))`` for two weights of one input (the shared expert's w1 and w3): with FP8
    weights and the kernels on, :func:`dsv4_jax.kernels.fp8_linear.fp8_linear_pair` streams both in one launch at
    decode rows; otherwise two :func:`linear` calls."""
    if kernels != "reference" and simulate and isinstance(wa, Fp8Tensor) and isinstance(wb, Fp8Tensor):
        from dsv4_jax.kernels.fp8_linear import fp8_linear_pair

        return fp8_linear_pair(x, wa, wb, out_dtype, xq, kernels=kernels, parallel=parallel)
    return (linear(x, wa, out_dtype, simulate, xq, kernels=kernels, parallel=parallel),
            linear(x, wb, out_dtype, simulate, xq, kernels=kernels, parallel=parallel))


def linear_reference(x: jax.Array, w, out_dtype, simulate: bool, xq: QuantAct | jax.Array | None = None):
    """The XLA linear (spec 3.4).

    FP8/FP4 weights: the activation is FP8-quantized per 1x128 block (``simulate``), both operands are dequantized
    exactly to fp32, multiplied at HIGHEST precision and rounded once to ``out_dtype``. Plain weights: a matmul in
    fp32 of the (already rounded) operands.
    """
    if isinstance(w, (Fp8Tensor, Fp4Tensor)):
        if xq is None:
            xf = quantized_input(x, simulate)
        else:
            xf = xq.dequant() if isinstance(xq, QuantAct) else xq
        if simulate and exact_bf16_dots():
            # both operands are e4m3/e2m1 values times powers of two: exact in bf16, so a bf16 dot with fp32
            # accumulation computes the same products as the fp32 recipe, on the tensor cores, at half the bytes
            y = jnp.einsum("...k,nk->...n", xf.astype(jnp.bfloat16), dequant(w).astype(jnp.bfloat16),
                           preferred_element_type=jnp.float32)
            return y.astype(out_dtype)
    else:
        xf = x.astype(jnp.float32)
    y = jnp.einsum("...k,nk->...n", xf, dequant(w), precision=HIGHEST, preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


def exact_bf16_dots() -> bool:
    """Whether dots of bf16-exact operands run as bf16 x bf16 -> fp32 (accelerators). On CPU the fp32 form is kept:
    it is what the golden tests pin down bit for bit, and CPUs have no bf16 matrix units to gain from."""
    return jax.default_backend() != "cpu"


def dot_f32(a: jax.Array, b: jax.Array, spec: str) -> jax.Array:
    """``einsum(spec)`` accumulated in fp32; bf16 operands stay bf16 on accelerators (exact products either way)."""
    if a.dtype == b.dtype == jnp.bfloat16 and exact_bf16_dots():
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32), precision=HIGHEST)


# ---------------------------------------------------------------------------------------------- numpy packing
def quantize_fp8_weight_np(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp32 ``[N, K]`` -> (e4m3 ``[N, K]``, e8m0 bytes ``[ceil(N/128), ceil(K/128)]``), scale = ceil-pow2(amax/448)."""
    import ml_dtypes

    n, k = w.shape
    nb, kb = -(-n // 128), -(-k // 128)
    pad = np.zeros((nb * 128, kb * 128), np.float32)
    pad[:n, :k] = w
    blocks = np.abs(pad.reshape(nb, 128, kb, 128)).max(axis=(1, 3))
    e = np.ceil(np.log2(np.maximum(blocks, 1e-30) / 448.0)).astype(np.int32)
    e = np.clip(e, -127, 127)
    s = np.repeat(np.repeat(np.exp2(e.astype(np.float32)), 128, 0), 128, 1)[:n, :k]
    q = np.clip(w / s, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return q, (e + 127).astype(np.uint8)


def quantize_fp4_weight_np(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp32 ``[..., N, K]`` -> (packed uint8 ``[..., N, K/2]``, e8m0 bytes ``[..., N, K/32]``)."""
    import ml_dtypes

    *lead, n, k = w.shape
    wb = w.reshape(*lead, n, k // 32, 32)
    e = np.ceil(np.log2(np.maximum(np.abs(wb).max(-1), 1e-30) / 6.0)).astype(np.int32)
    e = np.clip(e, -127, 127)
    v = np.clip(wb / np.exp2(e.astype(np.float32))[..., None], -6, 6).astype(ml_dtypes.float4_e2m1fn)
    codes = v.reshape(*lead, n, k).view(np.uint8) & 0x0F
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return packed, (e + 127).astype(np.uint8)
