"""Next-token sampling: greedy, temperature, top-k, top-p, and the official reference's Gumbel-max trick.

The official ``generate.py`` (spec §13) samples with ``argmax(probs / E)``, ``probs = softmax(logits / max(T, 1e-5))``
and ``E ~ Exp(1)`` i.i.d. per vocabulary entry; ``T = 0`` means argmax. Dividing by exponential noise is an exact
way to draw from ``probs`` (Gumbel-max: ``argmax(log p - log E)`` with ``-log E ~ Gumbel``), so ``"gumbel"`` and
``"categorical"`` (``jax.random.categorical``) draw from the same distribution with different noise.

Every parameter is a per-row array, so one compiled decode program serves greedy and sampled rows, any temperature,
top-k and top-p; only the noise ``method`` is static. Each row draws its noise from its own key, so a row's stream
does not depend on the other rows of the batch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("gumbel", "categorical")
MIN_TEMPERATURE = 1e-5  # the official floor: softmax(logits / max(T, 1e-5))


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token. Defaults are the release's ``generation_config.json`` (T 1.0, top-p 1.0).

    Attributes:
      temperature: 0 -> greedy argmax; > 0 -> sample from ``softmax(logits / T)``.
      top_k: keep the k most likely tokens (0 = off).
      top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p`` (1.0 = off);
        applied after top-k, on the renormalised distribution (the order of HF transformers).
      method: ``"gumbel"`` (official ``argmax(probs / Exp(1))``) or ``"categorical"``; both exact.
    Ties at the top-k / top-p threshold value keep every tied token.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    method: str = "gumbel"

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"SamplingConfig: temperature={self.temperature} must be >= 0 (0 = greedy)")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"SamplingConfig: top_k={self.top_k} must be an int >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig: top_p={self.top_p} must be in (0, 1] (1 = off)")
        if self.method not in METHODS:
            raise ValueError(f"SamplingConfig: method={self.method!r}, expected one of {METHODS}")
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "top_p", float(self.top_p))

    @classmethod
    def greedy(cls) -> SamplingConfig:
        return cls(temperature=0.0)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_generation_config(cls, path: str | Path, **overrides) -> SamplingConfig:
        """Read ``generation_config.json`` (a file or a checkpoint directory); ``overrides`` win.

        ``do_sample: false`` means greedy; absent fields keep the dataclass defaults.
        """
        p = Path(path)
        f = p / "generation_config.json" if p.is_dir() else p
        kw = {}
        if f.is_file():
            try:
                g = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}: not valid JSON ({e})") from None
            for name in ("temperature", "top_k", "top_p"):
                if g.get(name) is not None:
                    kw[name] = g[name]
            if g.get("do_sample") is False:
                kw["temperature"] = 0.0
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    def row_params(self, batch: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(temperature f32[B], top_k i32[B], top_p f32[B])`` for :func:`sample`."""
        return (jnp.full((batch,), self.temperature, jnp.float32), jnp.full((batch,), self.top_k, jnp.int32),
                jnp.full((batch,), self.top_p, jnp.float32))


def _filter(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set logits outside the per-row top-k / top-p sets to -inf. ``logits [B,V]`` already temperature-scaled."""
    V = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)  # [B,V] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # [B,1]
    desc = jnp.where(desc >= kth, desc, -jnp.inf)  # top-k first, then top-p on the renormalised rest
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    n_keep = jnp.sum((before < top_p[:, None]) & (probs > 0), axis=-1)  # >= 1: the first token always stays
    thr = jnp.take_along_axis(desc, jnp.maximum(n_keep - 1, 0)[:, None], axis=-1)  # [B,1]
    return jnp.where(logits >= jnp.maximum(thr, kth), logits, -jnp.inf)


def _row_params(B: int, temperature, top_k, top_p) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Scalars or ``[B]`` arrays -> ``(temperature f32[B], top_k i32[B], top_p f32[B])``."""
    return (jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (B,)),
            jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (B,)),
            jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (B,)))


def _scaled(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """``logits f32[B,V]`` / temperature, with the tokens outside each row's top-k / top-p set at -inf."""
    scaled = logits / jnp.maximum(temperature, MIN_TEMPERATURE)[:, None]
    # the sort is only paid when some row filters (not with the release defaults)
    return jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1.0)), _filter, lambda x, k, p: x, scaled, top_k, top_p)


def exponential_race(probs: jax.Array, keys: jax.Array) -> jax.Array:
    """One draw per row from the (unnormalised) weights ``probs f32[B,V]``: ``argmax(probs / E)``, ``E ~ Exp(1)``
    i.i.d. (the official Gumbel-max form; exact for any non-negative weights, zero weights are never drawn)."""
    V = probs.shape[-1]
    noise = jax.vmap(lambda k: jax.random.exponential(k, (V,), jnp.float32))(keys)
    # E = 0 has probability 2^-24 per entry: floor it so probs / E stays finite (0 / tiny = 0 for masked ones)
    return jnp.argmax(probs / jnp.maximum(noise, jnp.finfo(jnp.float32).tiny), axis=-1).astype(jnp.int32)


@jax.named_scope("distribution")
def distribution(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """The distribution :func:`sample` draws from when ``temperature > 0``: ``f32[B,V]`` probabilities of the
    temperature-scaled, top-k / top-p filtered ``logits [B,V]`` (speculative sampling compares two of them)."""
    B = logits.shape[0]
    temperature, top_k, top_p = _row_params(B, temperature, top_k, top_p)
    return jax.nn.softmax(_scaled(logits.astype(jnp.float32), temperature, top_k, top_p), axis=-1)


@jax.named_scope("sample")
def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           method: str = "gumbel") -> jax.Array:
    """One token per row: ``logits f32[B,V]``, ``keys`` typed PRNG keys ``[B]`` -> ``int32[B]``.

    ``temperature/top_k/top_p`` are ``[B]`` arrays (or scalars); rows with temperature 0 take the argmax.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}, expected one of {METHODS}")
    B, V = logits.shape
    logits = logits.astype(jnp.float32)
    temperature, top_k, top_p = _row_params(B, temperature, top_k, top_p)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = _scaled(logits, temperature, top_k, top_p)
    if method == "gumbel":
        drawn = exponential_race(jax.nn.softmax(scaled, axis=-1), keys)  # [B]
    else:
        drawn = jax.vmap(jax.random.categorical)(keys, scaled)
    return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)


def step_keys(row_keys: jax.Array, step: jax.Array) -> jax.Array:
    """The keys for generated token number ``step`` of every row: ``fold_in(row_key, step)``."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)


def row_keys(seed, batch: int) -> jax.Array:
    """Per-row PRNG keys ``[B]``: an int seed gives ``fold_in(key(seed), row)``; a sequence of ``batch`` ints gives
    ``key(seed[row])`` (use that to make a row's samples independent of its place in the batch)."""
    if isinstance(seed, int | np.integer):
        seed = int(seed)
        return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), jnp.arange(batch))
    seeds = [int(s) for s in seed]
    if len(seeds) != batch:
        raise ValueError(f"seed: got {len(seeds)} per-row seeds for {batch} rows")
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
