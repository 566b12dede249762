"""dsv4-jax: DeepSeek-V4 (Flash and Pro) inference in JAX.

Public API (stable names)::

    cfg = Config.from_pretrained(ckpt_dir)            # or Config.v4_flash() / v4_pro() / tiny()
    weights = load_weights(ckpt_dir, cfg)             # or init_weights(cfg, jax.random.key(0))
    state = init_state(cfg, batch_size, max_len)
    logits, state = forward(weights, cfg, tokens, state, return_logits="all" | "last")
    new_ids = generate(weights, cfg, [prompt_ids, ...], max_new_tokens, SamplingConfig(...))  # or generate_stream
"""

import os as _os

# The reference numerics round to bf16 after every op like the official torch code; XLA's default "excess
# precision" would drop some of those roundings inside fusions. This must be set before JAX creates its backends.
if "xla_allow_excess_precision" not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()

from dsv4_jax.api import forward, mtp_forward  # noqa: E402
from dsv4_jax.checkpoint import load_weights  # noqa: E402
from dsv4_jax.config import Config  # noqa: E402
from dsv4_jax.convert.safetensors_io import CheckpointError  # noqa: E402
from dsv4_jax.generate import generate, generate_stream  # noqa: E402
from dsv4_jax.modeling.state import LayerState, State, init_state  # noqa: E402
from dsv4_jax.modeling.weights import Weights, abstract_weights, init_weights, logical_axes  # noqa: E402
from dsv4_jax.sampling import SamplingConfig  # noqa: E402

__all__ = [
    "CheckpointError", "Config", "LayerState", "State", "Weights", "abstract_weights", "forward", "init_state",
    "init_weights", "load_weights", "logical_axes", "mtp_forward",
    "SamplingConfig", "generate", "generate_stream",
]
