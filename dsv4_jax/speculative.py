"""Speculative decoding with the MTP block, inside the one jitted decode loop, with exact state rollback.

One iteration of the loop, per row at main position ``P`` (tokens ``0..P-1`` fed, ``x_P`` = ``last`` sampled):

1. **draft** -- ``d_1`` comes from the MTP logits the previous iteration left (MTP at position ``P-1``: main
   streams ``h[P-1]`` and token ``x_P``); ``d_2..d_k`` from ``k-1`` single-token MTP calls at positions
   ``P..P+k-2``, each fed the MTP block's own output streams and the previous draft (the main streams of those
   positions do not exist yet). These calls write the MTP cache; an undo log puts it back afterwards.
2. **verify** -- one main forward of ``[x_P, d_1..d_k]`` (``k+1`` tokens at ``P..P+k``): logits ``L_0..L_k``.
3. **accept** -- the longest agreeing prefix ``n``: greedy rows accept ``d_j`` iff it is the argmax of ``L_{j-1}``
   and then take the argmax of ``L_n``; sampled rows use the speculative-sampling rule (accept ``d_j`` with
   probability ``min(1, p(d_j)/q(d_j))``; at the first rejection draw from ``normalize(max(p - q, 0))``; when all
   ``k`` are accepted draw the bonus token from ``p`` of ``L_k``), where ``p`` and ``q`` are the main and the MTP
   distributions after the row's temperature / top-k / top-p. This draws every token exactly from ``p`` (Leviathan
   et al. 2023, Chen et al. 2023), so the output distribution is plain sampling's. The row emits ``n + 1`` tokens,
   cut at a stop token, at ``max_new_tokens`` and before non-finite logits, as the plain loop would.
4. **rollback** -- the main state keeps the first ``f`` of the ``k+1`` tokens (``f`` = tokens emitted; see
   :mod:`dsv4_jax.modeling.rollback` for the per-cache rules and their cost).
5. **MTP catch-up** -- one MTP call over ``P..P+f-1`` with the main streams ``h[P..]`` of the verify and the
   emitted tokens: the MTP cache becomes exactly what running the MTP after every plain decode step gives, and its
   last logits are the next iteration's ``d_1`` distribution.

At every loop boundary the state is therefore the one of plain decoding of the same tokens, with the MTP block run
after each of them (``mtp_pos == pos``): bit for bit in the tests (tests/test_speculative.py, reference numerics).

Cost per iteration: one main forward of ``k+1`` tokens, one MTP call of ``k+1`` tokens, ``k-1`` of one token, the
main head on ``k+1`` positions and the MTP head on ``k`` (``k`` sequential reads of the head weights: at batch 1 the
largest overhead); plus the rollback (the compressor projections of the ``k+1`` tokens again: 0.61 GB of compressor
weights re-read for V4-Flash, ~5 % of a batch-1 plain step's weight bytes) and a few small gathers and scatters per
layer. Timing: ``scripts/bench_decode.py --speculative K``; figures in ``docs/performance.md``.

Bit-for-bit equality with plain decoding assumes that the model computes a token the same way in a ``k+1``-token
call as in a one-token call. The rollback itself is exact against feeding the kept tokens in that call; where the
backend rounds an fp32 product differently for another number of tokens (XLA:CPU does for some shapes, a GPU GEMM
may pick another algorithm), the logits differ in the last bits, as chunked prefill's do, and greedy output can
differ from plain decoding's at a logit near-tie.

Randomness: every iteration of a row uses ``fold_in(row_key, n_out)`` (``n_out`` = tokens the row has so far, which
grows every iteration), split by purpose; token 0 is sampled from the prefill logits exactly as in plain decoding.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import struct

from dsv4_jax.config import Config
from dsv4_jax.errors import UserInputError
from dsv4_jax.generate import PAD, TRACES, DecodeCarry, _finite_rows
from dsv4_jax.modeling.model import _last, forward_layers, head, mtp_block, mtp_head
from dsv4_jax.modeling.rollback import rollback, snapshot, undo
from dsv4_jax.modeling.state import State
from dsv4_jax.sampling import distribution, exponential_race

K_MAX = 4  # draft tokens per iteration: 1..K_MAX


@struct.dataclass
class ForcedDraft:
    """Test hook replacing the MTP's drafts (the MTP block still runs and its cache still advances).

    ``tokens [B, M]`` is the draft for each token index of a row (e.g. what plain decoding produced); ``miss [B]``
    selects, per row: ``-2`` the MTP's own draft (no forcing), ``-1`` the forced tokens, ``m >= 0`` the forced
    tokens with one made wrong (``(token + 1) % V``) at draft position ``(s + m) % (k+1) + 1`` in loop iteration
    ``s`` (``k+1``: none), so a row cycles through every rejection point and rows with different ``m`` accept
    different counts in the same iteration. A forced draft is a deterministic proposal, ``q = onehot(draft)``, so
    sampled rows still follow the exact acceptance rule. (One compiled program serves all three kinds of rows.)
    """

    tokens: jax.Array  # int32 [B, M]
    miss: jax.Array  # int32 [B]


@struct.dataclass
class SpecCarry:
    """The decode carry plus what the next iteration's first draft needs and the acceptance counters."""

    base: DecodeCarry  # state (with mtp_pos == pos), tokens, flags; base.step counts loop iterations
    q_logits: jax.Array  # f32 [B, V] MTP logits predicting the token after ``last``
    h_mtp: jax.Array  # [B, hc, D] MTP output streams at its last position (input of draft 2)
    n_verify: jax.Array  # int32 [B] verify steps the row took part in
    n_accepted: jax.Array  # int32 [B] sum over those steps of accepted drafts + 1
    forced: ForcedDraft | None = None
    k: int = struct.field(pytree_node=False, default=1)


def check_speculative(cfg: Config, weights, k) -> int:
    """``k`` as an int after checking it and that the model can draft (``UserInputError`` otherwise); ``weights``
    None checks the config only (before loading)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= K_MAX:
        raise UserInputError(f"generate: speculative={k!r} must be an int in 1..{K_MAX} (draft tokens per step; 0 = "
                             "plain decoding)")
    if not cfg.n_mtp_layers or (weights is not None and not weights.mtp):
        raise UserInputError(f"generate: speculative={k} drafts with the MTP block, but this model has none "
                             f"(n_mtp_layers={cfg.n_mtp_layers})")
    if k + 1 > cfg.window_size:
        raise UserInputError(f"generate: speculative={k} verifies {k + 1} tokens at once, more than the window "
                             f"(window_size={cfg.window_size}); use speculative <= {cfg.window_size - 1}")
    return k


# ------------------------------------------------------------------------------------------ prefill and start
@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("state", "first_logits", "first_hidden"))
def prefill_chunk(weights, cfg: Config, tokens: jax.Array, lengths: jax.Array, ends: jax.Array, state: State,
                  first_logits: jax.Array, next_tokens: jax.Array, mtp_lengths: jax.Array,
                  first_hidden: jax.Array) -> tuple[State, jax.Array, jax.Array]:
    """A prefill chunk ``tokens [B,C]`` that also runs the MTP block over it: MTP position ``s`` pairs the main
    streams at ``s`` with prompt token ``s+1`` (``next_tokens [B,C]``, ``mtp_lengths [B]`` valid pairs: the last
    prompt token's successor is sampled later, :func:`start`). Rows whose prompt ends here keep their last-token
    logits ``[B,V]`` and final streams ``[B,hc,D]``."""
    TRACES["prefill_mtp"] += 1
    with jax.named_scope("prefill"):
        h, state, _ = forward_layers(weights, cfg, tokens, state, lengths)  # h [B,C,hc,D]
        h_last = _last(h, lengths)  # [B,hc,D]
        logits = head(cfg, weights.head, weights.hc_head, weights.norm, h_last)  # [B,V]
        _, state = mtp_block(weights, cfg, h, next_tokens, state, mtp_lengths)
    return (state, jnp.where(ends[:, None], logits, first_logits),
            jnp.where(ends[:, None, None], h_last, first_hidden))


@partial(jax.jit, static_argnames=("cfg", "k"), donate_argnames=("carry", "first_hidden"))
def start(weights, cfg: Config, carry: DecodeCarry, first_hidden: jax.Array, k: int,
          forced: ForcedDraft | None = None) -> SpecCarry:
    """Run the MTP block at the last prompt position (its main streams ``first_hidden [B,hc,D]`` and token 0) and
    build the speculative carry (``mtp_pos == pos`` from here on)."""
    TRACES["spec_start"] += 1
    with jax.named_scope("spec_start"):
        hm, state = mtp_block(weights, cfg, first_hidden[:, None], carry.last[:, None], carry.state, carry.n_out)
        q = mtp_head(weights, cfg, hm[:, 0])  # [B,V]
    zeros = jnp.zeros_like(carry.n_out)
    return SpecCarry(base=carry.replace(state=state), q_logits=q, h_mtp=hm[:, 0], n_verify=zeros, n_accepted=zeros,
                     forced=forced, k=k)


# ------------------------------------------------------------------------------------------ one iteration
def _fold(keys: jax.Array, i) -> jax.Array:
    """``fold_in(key, i)`` for every row's key ``[B]`` (``i`` a scalar or ``[B]``)."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, 0 if jnp.ndim(i) else None))(keys, i)


def _pick(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x[b, idx[b]]`` for ``x [B, N, ...]``, ``idx [B]``."""
    return jnp.take_along_axis(x, idx[:, None, *([None] * (x.ndim - 2))], axis=1)[:, 0]


def _draft_token(c: SpecCarry, logits: jax.Array, j: int, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Draft token ``d_j [B]`` from MTP ``logits [B,V]`` and the distribution it was drawn from ``q [B,V]``: argmax
    for greedy rows, a draw from the MTP's own sampling distribution otherwise (one-hot on the draft where that
    distribution is not finite, or where the forced-draft hook chose the token)."""
    b = c.base
    V = logits.shape[-1]
    q = distribution(logits, b.temperature, b.top_k, b.top_p)  # [B,V]
    d = jnp.where(b.temperature > 0, exponential_race(q, key), jnp.argmax(logits, -1).astype(jnp.int32))
    keep_q = _finite_rows(q)[:, None]
    if c.forced is not None:
        f = c.forced
        idx = jnp.clip(b.n_out - 1 + j, 0, f.tokens.shape[1] - 1)
        want = jnp.take_along_axis(f.tokens, idx[:, None], axis=1)[:, 0]
        wrong = (f.miss >= 0) & ((b.step + f.miss) % (c.k + 1) + 1 == j)
        forced = (f.miss >= -1)[:, None]
        d = jnp.where(forced[:, 0], jnp.where(wrong, (want + 1) % V, want), d).astype(jnp.int32)
        keep_q = keep_q & ~forced
    return d, jnp.where(keep_q, q, jax.nn.one_hot(d, V, dtype=q.dtype))


def _draft(weights, cfg: Config, c: SpecCarry, kb: jax.Array) -> tuple[jax.Array, jax.Array, State]:
    """Drafts ``d [B,k]``, their distributions ``q [B,k,V]`` and the state, whose MTP cache the draft calls wrote
    and an undo log put back (so the state flows on without a copy of the cache being kept)."""
    b, k = c.base, c.k
    active = (~b.done).astype(jnp.int32)
    state, pos, W = b.state, b.state.mtp_pos, cfg.window_size
    ratio = cfg.ratio(cfg.n_layers)
    d, q = _draft_token(c, c.q_logits, 1, _fold(kb, 1))  # [B], [B,V]

    def one(carry, j):  # draft j >= 2: one MTP token at position P+j-2 (a scan: one copy of the block to compile)
        state, h, d_prev = carry
        hm, state = mtp_block(weights, cfg, h[:, None], d_prev[:, None], state, active)
        d, q = _draft_token(c, mtp_head(weights, cfg, hm[:, 0]), j, _fold(kb, j))
        return (state, hm[:, 0], d), (d, q)

    if k == 1:
        return d[:, None], q[:, None], state
    with jax.named_scope("mtp_drafts"):
        log = snapshot(state.mtp[0], pos, k - 1, ratio, W)
        (state, _, _), (ds, qs) = jax.lax.scan(one, (state, c.h_mtp, d), jnp.arange(2, k + 1))  # [k-1,B], [k-1,B,V]
        mtp0 = undo(state.mtp[0], log, pos, k - 1, ratio, W)
    state = state.replace(mtp=(mtp0,) + tuple(state.mtp[1:]), mtp_pos=pos)
    ds = jnp.concatenate([d[:, None], ds.T], axis=1)  # [B,k]
    qs = jnp.concatenate([q[:, None], jnp.swapaxes(qs, 0, 1)], axis=1)  # [B,k,V]
    return ds, qs, state


def _accept(c: SpecCarry, logits: jax.Array, d: jax.Array, q: jax.Array, kb: jax.Array):
    """Acceptance per row from the verify ``logits [B,k+1,V]``, drafts ``d [B,k]`` and their ``q [B,k,V]``.

    Returns ``n [B]`` accepted drafts, ``y [B,k+1]`` the tokens to emit (``d_1..d_n``, then the corrected or bonus
    token at index ``n``) and ``ok [B]`` whether ``L_n`` (the logits the last token is drawn from) is finite.
    """
    b, k = c.base, c.k
    B, _, V = logits.shape
    temperature, top_k, top_p = (jnp.repeat(a, k + 1) for a in (b.temperature, b.top_k, b.top_p))
    p = distribution(logits.reshape(B * (k + 1), V), temperature, top_k, top_p)
    p = p.reshape(B, k + 1, V)
    best = jnp.argmax(logits, -1).astype(jnp.int32)  # [B,k+1]
    finite = jnp.all(jnp.isfinite(logits), -1)  # [B,k+1]
    sampled = b.temperature > 0  # [B]
    pd = jnp.take_along_axis(p[:, :k], d[..., None], -1)[..., 0]  # [B,k] p_{j-1}(d_j)
    qd = jnp.take_along_axis(q, d[..., None], -1)[..., 0]  # [B,k] q_j(d_j)
    u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(_fold(kb, K_MAX + 1))  # [B,k] in [0,1)
    agree = jnp.where(sampled[:, None], u * qd < pd, d == best[:, :k]) & finite[:, :k]
    n = jnp.sum(jnp.cumprod(agree.astype(jnp.int32), axis=1), axis=1)  # [B] leading accepted drafts
    p_n = _pick(p, n)  # [B,V]
    q_n = jnp.where((n < k)[:, None], _pick(q, jnp.minimum(n, k - 1)), 0.0)
    resid = jnp.maximum(p_n - q_n, 0.0)  # at a rejection: normalize(max(p - q, 0)); after k accepted: p
    resid = jnp.where(jnp.sum(resid, -1, keepdims=True) > 0, resid, p_n)
    t = jnp.where(sampled, exponential_race(resid, _fold(kb, K_MAX + 2)), _pick(best, n))
    y = jnp.where(jnp.arange(k + 1)[None, :] == n[:, None], t[:, None], jnp.pad(d, ((0, 0), (0, 1))))
    return n, y, _pick(finite, n)


def _step(weights, cfg: Config, c: SpecCarry) -> tuple[SpecCarry, jax.Array]:
    """One speculative iteration for every row that is not done; also returns the emitted tokens ``[B,k+1]``
    (PAD past each row's count)."""
    b = c.base
    B, S = b.last.shape[0], c.k + 1
    W = cfg.window_size
    active = ~b.done
    kb = _fold(b.keys, b.n_out)  # this iteration's randomness per row
    P = b.state.pos
    with jax.named_scope("draft"):
        d, q, state = _draft(weights, cfg, c, kb)  # [B,k], [B,k,V]
    with jax.named_scope("verify"):
        logs = [snapshot(ls, P, S, cfg.ratio(i), W) for i, ls in enumerate(state.layers)]
        toks = jnp.concatenate([b.last[:, None], d], axis=1)  # [B,k+1]
        h, state, xs = forward_layers(weights, cfg, toks, state, jnp.where(active, S, 0))  # h [B,k+1,hc,D]
        logits = head(cfg, weights.head, weights.hc_head, weights.norm, h)  # [B,k+1,V]
    with jax.named_scope("accept"):
        n, y, ok = _accept(c, logits, d, q, kb)
        room = b.limit - b.n_out  # tokens the row may still emit
        is_stop = jnp.any(y[..., None] == b.stop[None, None, :], -1)  # [B,k+1]
        stop_at = jnp.min(jnp.where(is_stop, jnp.arange(S)[None, :], S), axis=1)  # first stop index (S: none)
        e = jnp.minimum(jnp.minimum(jnp.where(ok, n + 1, n), room), stop_at + 1)
        e = jnp.where(active, e, 0)  # tokens emitted
        # non-finite L_n: plain decoding would have fed d_n (if it got that far) and stopped without a token
        bad = active & ~ok & (n < room) & (stop_at >= n)
        f = jnp.where(bad, n + 1, e)  # tokens the main state keeps
    with jax.named_scope("rollback"):
        layers = tuple(rollback(w.attn, ls, log, x, P, f, cfg.ratio(i), W, cfg.kernels)
                       for i, (w, ls, log, x) in enumerate(zip(weights.layers, state.layers, logs, xs)))
        state = state.replace(pos=P + f, layers=layers)
    with jax.named_scope("mtp_catch_up"):
        hm, state = mtp_block(weights, cfg, h, y, state, e)  # MTP at P..P+e-1: (h[P+i], y_i)
        hm_last = _last(hm, e)  # [B,hc,D]
        q_next = mtp_head(weights, cfg, hm_last)  # [B,V]
    emitted = jnp.arange(S)[None, :] < e[:, None]
    cols = jnp.where(emitted, b.n_out[:, None] + jnp.arange(S)[None, :], b.out.shape[1])
    out = b.out.at[jnp.arange(B)[:, None], cols].set(y, mode="drop")
    n_out = b.n_out + e
    last = jnp.where(e > 0, _pick(y, jnp.maximum(e - 1, 0)), b.last)
    done = b.done | bad | (stop_at < e) | (n_out >= b.limit)
    base = b.replace(state=state, last=last, out=out, n_out=n_out, step=b.step + 1, done=done,
                     bad_step=jnp.where(bad, b.n_out + n, b.bad_step))
    keep = (e > 0)[:, None]
    c = c.replace(base=base, q_logits=jnp.where(keep, q_next, c.q_logits),
                  h_mtp=jnp.where(keep[..., None], hm_last, c.h_mtp),
                  n_verify=c.n_verify + active.astype(jnp.int32), n_accepted=c.n_accepted + jnp.where(active, n + 1, 0))
    return c, jnp.where(emitted, y, PAD)


# ------------------------------------------------------------------------------------------ loops
@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("carry",))
def decode_while(weights, cfg: Config, carry: SpecCarry) -> SpecCarry:
    """Speculative iterations until every row is done, all on device."""
    TRACES["spec_while"] += 1
    return jax.lax.while_loop(lambda c: ~jnp.all(c.base.done), lambda c: _step(weights, cfg, c)[0], carry)


@partial(jax.jit, static_argnames=("cfg", "n_steps"), donate_argnames=("carry",))
def decode_scan(weights, cfg: Config, carry: SpecCarry, n_steps: int) -> tuple[SpecCarry, jax.Array]:
    """``n_steps`` speculative iterations (skipped once every row is done); returns the carry and the new tokens
    ``int32 [B, n_steps*(k+1)]`` (PAD where a row produced none)."""
    TRACES["spec_scan"] += 1
    B, S = carry.base.last.shape[0], carry.k + 1

    def body(c: SpecCarry, _):
        return jax.lax.cond(jnp.all(c.base.done), lambda x: (x, jnp.full((B, S), PAD, jnp.int32)),
                            lambda x: _step(weights, cfg, x), c)

    carry, toks = jax.lax.scan(body, carry, None, length=n_steps)  # toks [n_steps, B, k+1]
    return carry, jnp.transpose(toks, (1, 0, 2)).reshape(B, n_steps * S)


def stats(carry: SpecCarry) -> dict:
    """Acceptance counters of a speculative carry: ``mean_accepted_length`` (tokens per verify step, accepted
    drafts + 1, pooled over rows; 1..k+1), per-row ``accepted_length`` and ``verify_steps``, and ``k``."""
    nv, na = (jax.device_get(x).tolist() for x in (carry.n_verify, carry.n_accepted))
    return {"k": carry.k, "verify_steps": nv, "accepted_length": [a / v if v else 0.0 for a, v in zip(na, nv)],
            "mean_accepted_length": sum(na) / max(sum(nv), 1)}


__all__ = ["K_MAX", "ForcedDraft", "SpecCarry", "check_speculative", "decode_scan", "decode_while", "prefill_chunk",
           "start", "stats"]
