"""Host-side entry points: argument checks with clear errors, then the jitted model functions.

Checks run only on concrete inputs; under an outer ``jax.jit`` (tracers) they are skipped and the jitted functions
are called directly.
"""

from __future__ import annotations

import jax
import numpy as np

from dsv4_jax.config import Config
from dsv4_jax.modeling.model import forward_jit, mtp_forward_jit
from dsv4_jax.modeling.state import State
from dsv4_jax.sharding import use_mesh_of


def _check_chunk(cfg: Config, tokens, state: State, lengths, pos_field: str, what: str) -> None:
    if getattr(tokens, "ndim", None) != 2:
        raise ValueError(f"{what}: tokens must be [batch, seq], got shape {getattr(tokens, 'shape', None)}")
    B, S = tokens.shape
    if B != state.batch_size:
        raise ValueError(f"{what}: tokens have batch {B} but the state was built for {state.batch_size} rows")
    if isinstance(tokens, jax.core.Tracer) or isinstance(getattr(state, pos_field), jax.core.Tracer):
        return
    tok = np.asarray(tokens)
    n = np.full((B,), S) if lengths is None else np.asarray(lengths)
    if n.shape != (B,) or (n < 0).any() or (n > S).any():
        raise ValueError(f"{what}: lengths must be [batch] ints in [0, {S}], got {n.tolist()}")
    valid = np.arange(S)[None, :] < n[:, None]
    bad = valid & ((tok < 0) | (tok >= cfg.vocab_size))
    if bad.any():
        b, s = map(int, np.argwhere(bad)[0])
        raise ValueError(f"{what}: token id {int(tok[b, s])} at row {b}, position {s} is outside the vocabulary "
                         f"[0, {cfg.vocab_size})")
    end = np.asarray(getattr(state, pos_field)) + n
    if state.max_len and (end > state.max_len).any():
        b = int(np.argmax(end))
        raise ValueError(f"{what}: row {b} would reach {int(end[b])} tokens but the cache holds max_len="
                         f"{state.max_len}; build the state with init_state(cfg, batch, max_len>={int(end.max())})")


def forward(weights, cfg: Config, tokens, state: State, return_logits: str = "all", lengths=None,
            return_hidden: bool = False):
    """Process ``tokens [B, S]`` (S new tokens per row, on top of ``state``) and return ``(logits, new_state)``.

    Args:
      return_logits: ``"all"`` -> fp32 ``[B, S, V]``; ``"last"`` -> fp32 ``[B, V]`` at each row's last valid
        token; ``"none"`` -> ``None`` (prefill chunks whose logits are not needed).
      lengths: optional ``[B]`` number of valid tokens per row (right padding); rows advance by their length.
      return_hidden: also return the final hc streams ``[B, S, hc, D]`` (the MTP block's input).
    Prefill = a fresh state; chunked prefill = several calls; decode = ``S == 1``. Rows may sit at different positions.
    """
    _check_chunk(cfg, tokens, state, lengths, "pos", "forward")
    with use_mesh_of(weights):  # weights placed on a mesh (dsv4_jax.sharding): run under it
        return forward_jit(weights, cfg, tokens, state, lengths, return_logits=return_logits,
                           return_hidden=return_hidden)


def mtp_forward(weights, cfg: Config, hidden, next_tokens, state: State, return_logits: str = "all", lengths=None):
    """The MTP block: final hc streams of the main model at positions ``p..`` and the tokens at ``p+1..`` ->
    fp32 logits predicting the tokens at ``p+2..``. Uses and advances the state's own MTP window cache."""
    _check_chunk(cfg, next_tokens, state, lengths, "mtp_pos", "mtp_forward")
    with use_mesh_of(weights):
        return mtp_forward_jit(weights, cfg, hidden, next_tokens, state, lengths, return_logits=return_logits)
