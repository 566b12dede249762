"""Small building blocks: RMSNorm, the weightless per-head q norm, interleaved RoPE with YaRN, Hadamard.

Precision follows the official code (spec 4, 5, 6, 8): RMSNorm is fp32 inside and rounds once to the activation
dtype; the q per-head norm is done in bf16 arithmetic step by step; RoPE rotates interleaved pairs of the LAST
``rope_head_dim`` dims in fp32 and rounds once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.config import Config, yarn_ramp_bounds


def rms_norm(x: jax.Array, w: jax.Array, eps: float, out_dtype) -> jax.Array:
    """``out(w_f32 * (x_f32 * rsqrt(mean(x_f32**2) + eps)))`` over the last axis."""
    xf = x.astype(jnp.float32)
    r = 1.0 / jnp.sqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + np.float32(eps))  # torch: 1/sqrt
    return (w.astype(jnp.float32) * (xf * r)).astype(out_dtype)


def head_rms_norm(q: jax.Array, eps: float, dtype, cpu_rsqrt_tail: bool = False) -> jax.Array:
    """Weightless per-head RMS normalisation, every step rounded to ``dtype`` like the bf16 torch ops (spec 6).

    ``rsqrt`` is correctly rounded (what GPU torch computes). ``cpu_rsqrt_tail`` instead reproduces torch's CPU
    kernel (AVX2 build), which the golden data was produced with: its vectorised loop covers the first
    ``32 * (n // 32)`` of the ``n`` flattened heads correctly rounded, and the scalar tail computes
    ``bf16(1 / bf16(sqrt(x)))``.
    """
    f32 = jnp.float32
    sq = (q.astype(f32) * q.astype(f32)).astype(dtype)
    ms = jnp.mean(sq.astype(f32), axis=-1, keepdims=True).astype(dtype)
    ms = (ms.astype(f32) + np.float32(eps)).astype(dtype).astype(f32)
    r = (1.0 / jnp.sqrt(ms)).astype(dtype)
    if cpu_rsqrt_tail and dtype == jnp.bfloat16:
        n = ms.size
        tail = (jnp.arange(n) >= 32 * (n // 32)).reshape(ms.shape)
        r_scalar = (1.0 / jnp.sqrt(ms).astype(dtype).astype(f32)).astype(dtype)
        r = jnp.where(tail, r_scalar, r)
    return (q.astype(f32) * r.astype(f32)).astype(dtype)


# ------------------------------------------------------------------------------------------------- RoPE
def rope_freqs(cfg: Config, ratio: int) -> np.ndarray:
    """fp32 inverse frequencies ``[rope_head_dim/2]`` of a layer: base 10000 plain for window-only layers,
    ``compress_rope_theta`` with YaRN for compressed layers (spec 5). Computed on the host like the reference."""
    dim = cfg.rope_head_dim
    base = cfg.compress_rope_theta if ratio else cfg.rope_theta
    f = (1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
    if ratio:
        lo, hi = yarn_ramp_bounds(cfg, base)
        if hi == lo:
            hi += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo), 0, 1)
        smooth = (1 - ramp).astype(np.float32)
        f = (f / np.float32(cfg.rope_factor) * (1 - smooth) + f * smooth).astype(np.float32)
    return f


def rope_cos_sin(freqs: np.ndarray, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin ``[*pos.shape, rope_head_dim/2]`` of ``angle = fp32(pos * f)``."""
    ang = pos.astype(jnp.float32)[..., None] * jnp.asarray(freqs)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, inverse: bool = False) -> jax.Array:
    """Rotate interleaved pairs ``(2j, 2j+1)`` of the last ``2*cos.shape[-1]`` dims of ``x``.

    ``cos``/``sin`` broadcast against ``x[..., :-rd]`` without its last axis (e.g. ``[B, S, 1, rd/2]`` for heads).
    """
    rd = 2 * cos.shape[-1]
    nope, r = x[..., :-rd], x[..., -rd:]
    rf = r.astype(jnp.float32).reshape(*r.shape[:-1], rd // 2, 2)
    a, b = rf[..., 0], rf[..., 1]
    if inverse:
        sin = -sin
    rot = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(r.shape).astype(x.dtype)
    return jnp.concatenate([nope, rot], axis=-1)


# ------------------------------------------------------------------------------------------------- Hadamard
def hadamard(x: jax.Array, out_dtype) -> jax.Array:
    """Orthonormal Hadamard transform over the last axis (power of two), fp32 butterflies with strides 1, 2, 4, ...
    (Sylvester order, the stage order of the reference kernel), times ``n**-0.5``, rounded to ``out_dtype``."""
    n = x.shape[-1]
    y = x.astype(jnp.float32)
    lead = y.shape[:-1]
    h = 1
    while h < n:
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        h *= 2
    return (y.reshape(*lead, n) * np.float32(n**-0.5)).astype(out_dtype)
