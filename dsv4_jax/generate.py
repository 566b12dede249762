"""Generation: chunked prefill, then every decode step on device in one ``lax.while_loop`` (or ``lax.scan`` chunks).

Pipeline (each stage one jitted program, the model state donated from stage to stage so the caches are never copied):

1. **prefill** -- prompts are right-padded into ``[B, L]`` and fed in chunks whose sizes come from a small fixed set
   (``prefill_chunks``), with per-row ``lengths``: a row whose prompt is shorter takes 0 tokens in later chunks and
   is left untouched. Each row keeps the logits of its last prompt token from the chunk where its prompt ends. Any
   prompt length therefore compiles at most ``len(prefill_chunks)`` prefill programs.
2. **start** -- samples token 0 of every row and builds the :class:`DecodeCarry`.
3. **decode** -- :func:`generate` runs one ``lax.while_loop`` until every row is done; :func:`generate_stream` runs
   ``lax.scan`` over ``steps_per_call`` steps per call and yields the new tokens. Both apply the same step function
   with the same per-row keys (``fold_in(row_key, token_index)``), so they give identical tokens.

A done row (stop token sampled, or ``max_new_tokens`` reached) is fed with length 0: its caches, position and output
stop changing while the other rows go on. Programs depend on the batch size and ``max_len`` (rounded up to a bucket
by default), never on the prompt lengths, ``max_new_tokens``, the sampling parameters (only the noise method is
static) or the stop tokens (up to four share one shape).

Non-finite logits (a NaN weight, an out-of-range ``tid2eid`` entry, an overflow) never become tokens: every stage that
samples also checks, on device, that the row's logits are finite (one ``isfinite`` reduction over the ``[B, V]``
logits the sampler reads anyway). A row whose logits are not finite emits nothing for that step, records the step in
``DecodeCarry.bad_step`` and stops like a done row; the other rows go on. When generation ends, :func:`generate` and
:func:`generate_stream` raise :class:`~dsv4_jax.errors.NonFiniteError` naming the row(s) (= prompt indices) and the
step, with the tokens generated before the failure attached. Healthy runs give the same tokens and programs as
without the check.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dsv4_jax.config import Config
from dsv4_jax.errors import NonFiniteError, UserInputError
from dsv4_jax.modeling.model import forward_jit
from dsv4_jax.modeling.state import State, check_max_len, context_limit, init_state
from dsv4_jax.modeling.weights import Weights
from dsv4_jax.sampling import SamplingConfig, row_keys, sample, step_keys
from dsv4_jax.sharding import DATA, mesh_of, shard_state, use_mesh_of

DEFAULT_CHUNKS = (16, 64, 256, 1024)
PAD = -1  # output buffer entries after a row stopped
NO_FAULT = -1  # DecodeCarry.bad_step of a row whose logits were always finite
STOP_SLOTS = 4  # the stop-token list is padded to a multiple of this (bounded shapes)

# Number of traces (= compiled programs) per stage. Incremented while tracing, so it counts distinct programs.
TRACES: collections.Counter = collections.Counter()


def compiled_programs() -> dict[str, int]:
    """How many programs each generation stage has compiled so far in this process (tests bound this)."""
    return dict(TRACES)


@struct.dataclass
class DecodeCarry:
    """Everything the decode loop needs, carried through ``lax.while_loop`` / ``lax.scan`` on device."""

    state: State  # all caches (window ring, compressed KV, compressor buffers, indexer keys) + per-row positions
    last: jax.Array  # int32 [B] the newest token of each row (the next step's input)
    out: jax.Array  # int32 [B, max_len] generated tokens, PAD after the row stopped
    n_out: jax.Array  # int32 [B] tokens generated per row
    step: jax.Array  # int32 [] index of the next token to generate (same for all rows)
    done: jax.Array  # bool [B]
    bad_step: jax.Array  # int32 [B] step whose logits were not finite (the row stopped there), NO_FAULT if none
    keys: jax.Array  # PRNG keys [B], one stream per row
    limit: jax.Array  # int32 [] max_new_tokens
    stop: jax.Array  # int32 [n] stop token ids, padded with -1
    temperature: jax.Array  # f32 [B]
    top_k: jax.Array  # int32 [B]
    top_p: jax.Array  # f32 [B]
    method: str = struct.field(pytree_node=False, default="gumbel")  # sampling noise (static)


def demo_model(seed: int = 0, numerics: str = "float32", vocab_size: int = 512) -> tuple[Config, Weights]:
    """The tiny random-weight model of the notebook and the tests: :mod:`dsv4_jax.demo`'s model (three layers:
    window-only hash-routed, CSA with indexer, HCA; window 8) with a small vocabulary (``scripts/generate.py`` uses
    the tokenizer's), so every boundary is crossed within a few hundred tokens and a program compiles in seconds on a
    CPU. The weights are a random checkpoint in the official on-disk format read back by
    :func:`dsv4_jax.load_weights`: much faster than an eager ``init_weights`` on a CPU, and the real loading path.
    """
    from dsv4_jax.demo import demo_config, demo_weights

    cfg = demo_config(vocab_size, numerics)
    return cfg, demo_weights(cfg, seed)


# ------------------------------------------------------------------------------------------ host-side checks
def bucket_len(n: int) -> int:
    """Default cache length for ``n`` tokens: a power of two >= 128 up to 8192, then a multiple of 8192. Bounds the
    number of distinct state shapes (hence programs) while wasting at most 2x (small) or 8191 tokens (large)."""
    if n <= 8192:
        return max(128, 1 << (n - 1).bit_length())
    return -(-n // 8192) * 8192


def chunk_plan(length: int, chunks: Sequence[int]) -> list[int]:
    """Chunk sizes covering ``length`` prompt tokens: the smallest chunk covering the rest when it is at most twice
    the rest (or nothing smaller fits), else the largest chunk that fits. E.g. (16, 64, 256, 1024): 300 -> 256 + 64,
    1000 -> 1024, 17 -> 16 + 16."""
    chunks = sorted(set(int(c) for c in chunks))
    plan, rem = [], length
    while rem > 0:
        cover = [c for c in chunks if c >= rem]
        fits = [c for c in chunks if c <= rem]
        c = cover[0] if cover and (cover[0] <= 2 * rem or not fits) else fits[-1]
        plan.append(c)
        rem -= c
    return plan


def _check(cfg: Config, prompts, max_new_tokens: int, max_len: int | None, chunks,
           extra: int = 0) -> tuple[list[list[int]], int]:
    """Validate everything before any compute (``UserInputError`` naming the row and the numbers); return the prompts
    as int lists and the cache length (default: :func:`bucket_len`, capped at ``cfg.max_position_embeddings``).
    ``extra``: positions past prompt + ``max_new_tokens`` that must fit too (speculative verification reaches
    ``k - 1`` positions beyond the last token it can keep)."""
    if isinstance(prompts, np.ndarray | jax.Array):
        prompts = prompts.tolist()
    if not isinstance(prompts, Sequence) or not prompts or isinstance(prompts, str):
        raise UserInputError("generate: prompts must be a non-empty list of token-id lists")
    rows = []
    for b, p in enumerate(prompts):
        if isinstance(p, int | np.integer) or isinstance(p, str):
            raise UserInputError(f"generate: row {b} is {p!r}; prompts must be a list of token-id lists")
        p = [int(t) for t in p]
        if not p:
            raise UserInputError(f"generate: row {b} has an empty prompt (start it with BOS id {cfg.bos_token_id})")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise UserInputError(f"generate: row {b} has token id {bad[0]} at position {p.index(bad[0])}, outside "
                                 f"the vocabulary [0, {cfg.vocab_size})")
        rows.append(p)
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise UserInputError(f"generate: max_new_tokens={max_new_tokens} must be an int >= 1")
    if not chunks or any(int(c) < 1 for c in chunks):
        raise UserInputError(f"generate: prefill_chunks={chunks} must be positive sizes")
    longest = max(len(p) for p in rows)
    limit = cfg.max_position_embeddings
    spec = f" + {extra} positions that speculative decoding verifies past them" if extra else ""
    if max_len is None:
        if longest + max_new_tokens + extra > limit:
            raise UserInputError(f"generate: the longest prompt ({longest} tokens) + max_new_tokens={max_new_tokens}"
                                 f"{spec} = {longest + max_new_tokens + extra} tokens exceeds the model's "
                                 f"{context_limit(cfg)}")
        max_len = min(bucket_len(longest + max_new_tokens + extra), limit)
    elif int(max_len) != max_len or max_len < 1:
        raise UserInputError(f"generate: max_len={max_len} must be an int >= 1")
    check_max_len(cfg, max_len, "generate")
    for b, p in enumerate(rows):
        if len(p) > max_len:
            raise UserInputError(f"generate: row {b} has a {len(p)}-token prompt, longer than the cache (max_len="
                                 f"{max_len})")
        if len(p) + max_new_tokens + extra > max_len:
            more = "raise max_len" if max_len < limit else f"shorten the prompt ({context_limit(cfg)})"
            raise UserInputError(f"generate: row {b} needs {len(p)} prompt + {max_new_tokens} new tokens{spec} = "
                                 f"{len(p) + max_new_tokens + extra} > max_len={max_len}; lower max_new_tokens to "
                                 f"{max_len - len(p) - extra} or {more}")
    return rows, int(max_len)


# ------------------------------------------------------------------------------------------ jitted stages
@partial(jax.jit, static_argnums=(0, 1, 2))
def _fresh_state(cfg: Config, batch: int, max_len: int) -> State:
    """``init_state`` as a program: its outputs are distinct device buffers. (``init_state`` hands out one zeros
    buffer for both ``pos`` and ``mtp_pos``, and a donated argument must not alias another.)"""
    TRACES["state"] += 1
    return init_state(cfg, batch, max_len)


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("state", "first_logits"))
def _prefill_chunk(weights, cfg: Config, tokens: jax.Array, lengths: jax.Array, ends: jax.Array, state: State,
                   first_logits: jax.Array) -> tuple[State, jax.Array]:
    """One prefill chunk ``tokens [B,C]`` (``lengths [B]`` valid); rows whose prompt ends here (``ends [B]``) take
    their last-token logits into ``first_logits [B,V]``."""
    TRACES["prefill"] += 1
    with jax.named_scope("prefill"):
        logits, state = forward_jit(weights, cfg, tokens, state, lengths, return_logits="last")
    return state, jnp.where(ends[:, None], logits, first_logits)


def _finite_rows(logits: jax.Array) -> jax.Array:
    """bool ``[B]``: every logit of the row is finite (``logits [B,V]``; a NaN or an infinity anywhere fails)."""
    return jnp.all(jnp.isfinite(logits), axis=-1)


def _is_stop(tok: jax.Array, stop: jax.Array) -> jax.Array:
    """``tok [B]`` in ``stop [n]`` (padded with -1, which no token equals) -> bool ``[B]``."""
    return jnp.any(tok[:, None] == stop[None, :], axis=-1)


@partial(jax.jit, static_argnames=("method",), donate_argnames=("state",))
def _start(first_logits: jax.Array, state: State, keys: jax.Array, limit: jax.Array, stop: jax.Array,
           temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, method: str) -> DecodeCarry:
    """Sample token 0 of every row from the prefill logits ``[B,V]`` and build the decode carry. A row whose
    logits are not finite emits nothing and is done with ``bad_step`` 0."""
    TRACES["start"] += 1
    B = first_logits.shape[0]
    ok = _finite_rows(first_logits)  # [B]
    tok = sample(first_logits, step_keys(keys, jnp.int32(0)), temperature, top_k, top_p, method)  # [B]
    tok = jnp.where(ok, tok, 0)  # a bad row's input stays a valid id (it is fed with length 0 from now on)
    out = jnp.full((B, state.max_len), PAD, jnp.int32).at[:, 0].set(jnp.where(ok, tok, PAD))
    done = _is_stop(tok, stop) | (limit <= 1) | ~ok
    return DecodeCarry(state=state, last=tok, out=out, n_out=ok.astype(jnp.int32), step=jnp.int32(1), done=done,
                       bad_step=jnp.where(ok, NO_FAULT, 0).astype(jnp.int32), keys=keys, limit=limit, stop=stop,
                       temperature=temperature, top_k=top_k, top_p=top_p, method=method)


def _step(weights, cfg: Config, c: DecodeCarry) -> DecodeCarry:
    """One decode step for every row that is not done (done rows take 0 tokens: nothing of theirs changes). An
    active row whose logits are not finite emits nothing, records ``bad_step`` and is done."""
    active = ~c.done  # [B]
    with jax.named_scope("decode_step"):
        logits, state = forward_jit(weights, cfg, c.last[:, None], c.state, active.astype(jnp.int32),
                                    return_logits="last")  # [B,V]
        tok = sample(logits, step_keys(c.keys, c.step), c.temperature, c.top_k, c.top_p, c.method)  # [B]
    bad = active & ~_finite_rows(logits)  # [B]
    emit = active & ~bad
    tok = jnp.where(emit, tok, c.last)
    out = c.out.at[:, c.step].set(jnp.where(emit, tok, PAD), mode="drop")
    n_out = c.n_out + emit.astype(jnp.int32)
    done = c.done | bad | _is_stop(tok, c.stop) | (n_out >= c.limit)
    bad_step = jnp.where(bad, c.step, c.bad_step)
    return c.replace(state=state, last=tok, out=out, n_out=n_out, step=c.step + 1, done=done, bad_step=bad_step)


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("carry",))
def _decode_while(weights, cfg: Config, carry: DecodeCarry) -> DecodeCarry:
    """Decode until every row is done, all on device."""
    TRACES["decode_while"] += 1
    return jax.lax.while_loop(lambda c: ~jnp.all(c.done), partial(_step, weights, cfg), carry)


@partial(jax.jit, static_argnames=("cfg", "n_steps"), donate_argnames=("carry",))
def _decode_scan(weights, cfg: Config, carry: DecodeCarry, n_steps: int) -> tuple[DecodeCarry, jax.Array]:
    """``n_steps`` decode steps (skipped once every row is done); returns the carry and ``int32 [B, n_steps]`` new
    tokens (PAD where a row produced none)."""
    TRACES["decode_scan"] += 1

    def body(c: DecodeCarry, _):
        c2 = jax.lax.cond(jnp.all(c.done), lambda x: x, partial(_step, weights, cfg), c)
        return c2, jnp.where(c2.n_out > c.n_out, c2.last, PAD)  # the rows that emitted a token this step

    carry, toks = jax.lax.scan(body, carry, None, length=n_steps)
    return carry, toks.T


# ------------------------------------------------------------------------------------------ public entry points
def prefill(weights, cfg: Config, prompts, max_new_tokens: int, sampling: SamplingConfig | None = None, *,
            seed: int | Sequence[int] = 0, max_len: int | None = None, stop_tokens: Sequence[int] | None = None,
            prefill_chunks: Sequence[int] = DEFAULT_CHUNKS, speculative: int = 0):
    """Check the request, prefill every prompt and sample token 0: the carry that :func:`decode` continues (a
    :class:`~dsv4_jax.speculative.SpecCarry` with ``speculative=k``: the prefill also runs the MTP block).

    Args are those of :func:`generate`. Raises :class:`~dsv4_jax.errors.UserInputError` (a ``ValueError`` naming
    the row and the numbers) before any compute, e.g. for a ``max_len`` beyond ``cfg.max_position_embeddings``.
    """
    from dsv4_jax import speculative as spec

    sampling = SamplingConfig() if sampling is None else sampling
    if not isinstance(sampling, SamplingConfig):
        raise UserInputError(f"sampling must be a SamplingConfig or None, got {type(sampling).__name__}")
    k = spec.check_speculative(cfg, weights, speculative) if speculative != 0 else 0
    stop = [cfg.eos_token_id] if stop_tokens is None else [int(t) for t in stop_tokens]
    rows, max_len = _check(cfg, prompts, max_new_tokens, max_len, prefill_chunks, max(k - 1, 0))
    B = len(rows)
    lens = np.array([len(p) for p in rows])
    keys = row_keys(seed, B)
    state = _fresh_state(cfg, B, max_len)
    mesh = mesh_of(weights)
    if mesh is not None and B % mesh.shape[DATA] == 0:  # rows over the data axis (else replicated: same results)
        state = shard_state(state, mesh)
    first = jnp.zeros((B, cfg.vocab_size), jnp.float32)
    hidden = jnp.zeros((B, cfg.hc_mult, cfg.dim), cfg.act_dtype) if k else None  # [B,hc,D] last prompt streams
    start = 0
    for c in chunk_plan(int(lens.max()), prefill_chunks):
        toks = np.zeros((B, c + 1), np.int32)  # one more column: the successors the MTP block pairs with
        for b, p in enumerate(rows):
            seg = p[start:start + c + 1]
            toks[b, :len(seg)] = seg
        n = np.clip(lens - start, 0, c).astype(np.int32)
        ends = (lens > start) & (lens <= start + c)
        args = (jnp.asarray(toks[:, :c]), jnp.asarray(n), jnp.asarray(ends), state, first)
        if k:
            mtp_n = np.clip(lens - 1 - start, 0, c).astype(np.int32)  # pairs whose successor is a prompt token
            state, first, hidden = spec.prefill_chunk(weights, cfg, *args, jnp.asarray(toks[:, 1:]),
                                                      jnp.asarray(mtp_n), hidden)
        else:
            state, first = _prefill_chunk(weights, cfg, *args)
        start += c
    stop_arr = np.full((-(-max(len(stop), 1) // STOP_SLOTS) * STOP_SLOTS,), -1, np.int32)  # bounded shapes
    stop_arr[:len(stop)] = stop
    carry = _start(first, state, keys, jnp.int32(max_new_tokens), jnp.asarray(stop_arr), *sampling.row_params(B),
                   method=sampling.method)
    return spec.start(weights, cfg, carry, hidden, k) if k else carry


def _base(carry) -> DecodeCarry:
    """The :class:`DecodeCarry` of a plain or speculative carry."""
    return getattr(carry, "base", carry)


def decode(weights, cfg: Config, carry):
    """Run the ``lax.while_loop`` until every row of ``carry`` (plain or speculative) is done. ``carry`` is donated:
    do not reuse it."""
    if bool(jnp.all(_base(carry).done)):  # e.g. max_new_tokens == 1: nothing to do, nothing to compile
        return carry
    if carry is not _base(carry):
        from dsv4_jax.speculative import decode_while

        return decode_while(weights, cfg, carry)
    return _decode_while(weights, cfg, carry)


def tokens(carry, check: bool = True) -> list[list[int]]:
    """The generated ids of every row of a carry (one device-to-host copy).

    With ``check`` (default), raises :class:`~dsv4_jax.errors.NonFiniteError` if some row met non-finite logits
    (its ``tokens`` attribute holds what this returns with ``check=False``: each row's tokens up to its failure).
    """
    carry = _base(carry)
    out, n_out, bad_step = jax.device_get((carry.out, carry.n_out, carry.bad_step))
    rows = [np.asarray(out)[b, :n].tolist() for b, n in enumerate(np.asarray(n_out).tolist())]
    if check:
        raise_if_nonfinite(np.asarray(bad_step), rows)
    return rows


def raise_if_nonfinite(bad_step: np.ndarray, rows: list[list[int]]) -> None:
    """Raise :class:`~dsv4_jax.errors.NonFiniteError` naming every row whose ``bad_step [B]`` is set (row b is
    prompt b of the request) and the earliest step; ``rows`` (the tokens kept) travel with the error."""
    bad = [int(b) for b in np.flatnonzero(bad_step != NO_FAULT)]
    if not bad:
        return
    steps = {b: int(bad_step[b]) for b in bad}
    where = ", ".join(f"row {b} (prompt {b}) at step {s}" for b, s in steps.items())
    raise NonFiniteError(
        f"generate: the model produced non-finite logits (NaN or inf) for {where}. Step s is the row's s-th new "
        "token (step 0: the prefill's logits after the last prompt token); no token was emitted from those logits: "
        "the row stopped there and keeps its s earlier tokens, while the other rows ran to the end (every row's "
        "tokens: NonFiniteError.tokens). Usual causes: a corrupted weight (a NaN/inf value, an e8m0 scale byte 255) "
        "or a hash-routing tid2eid entry outside [0, n_routed_experts); load_weights refuses such values in the "
        "tensors it checks (scales, tid2eid, norms, biases, gates, mHC parameters).",
        rows=tuple(bad), step=min(steps.values()), steps=steps, tokens=rows)


def generate(weights, cfg: Config, prompts, max_new_tokens: int, sampling: SamplingConfig | None = None, *,
             seed: int | Sequence[int] = 0, max_len: int | None = None, stop_tokens: Sequence[int] | None = None,
             prefill_chunks: Sequence[int] = DEFAULT_CHUNKS, speculative: int = 0,
             stats: dict | None = None) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` tokens after each prompt; the whole decode runs in one device loop.

    Args:
      prompts: a list of token-id lists (any lengths; BOS is not added).
      sampling: :class:`SamplingConfig` (default: the release's ``generation_config.json`` values, Gumbel-max;
        ``SamplingConfig.greedy()`` for argmax).
      seed: an int (row ``b`` uses ``fold_in(key(seed), b)``) or one int per row (row ``b`` uses ``key(seed[b])``,
        which makes a row's samples independent of the rest of the batch).
      max_len: cache length; default :func:`bucket_len` of the longest prompt + ``max_new_tokens``.
      stop_tokens: ids that end a row (default ``(cfg.eos_token_id,)``; ``()`` never stops early).
      prefill_chunks: the allowed prefill chunk sizes (one compiled program each at most).
      speculative: ``k`` in 1..4: speculative decoding, ``k`` tokens drafted per step by the MTP block and verified
        in one forward (:mod:`dsv4_jax.speculative`); the same tokens as plain decoding when greedy, the same
        distribution when sampling. Needs ``k - 1`` cache positions past prompt + ``max_new_tokens``. 0: plain.
      stats: a dict to receive the speculative counters at the end (:func:`dsv4_jax.speculative.stats`:
        ``mean_accepted_length`` etc.); left alone in plain decoding.
    Returns:
      The generated ids of each row, without the prompt; a row that stopped on a stop token ends with it.
    Raises:
      UserInputError: a bad argument (before any compute), e.g. ``max_len`` or prompt + ``max_new_tokens`` beyond
        ``cfg.max_position_embeddings``, or a prompt + ``max_new_tokens`` longer than an explicit ``max_len``.
      NonFiniteError: some row's logits were not finite (checked on device at every step, prefill included): raised
        after the other rows finished, naming the rows and steps, with every row's tokens so far in ``.tokens``.
    """
    with use_mesh_of(weights):  # weights placed on a mesh (dsv4_jax.sharding): run under it
        carry = prefill(weights, cfg, prompts, max_new_tokens, sampling, seed=seed, max_len=max_len,
                        stop_tokens=stop_tokens, prefill_chunks=prefill_chunks, speculative=speculative)
        carry = decode(weights, cfg, carry)
    _fill_stats(carry, stats)
    return tokens(carry)


def _fill_stats(carry, stats: dict | None) -> None:
    """Put a speculative carry's counters into ``stats`` (if given)."""
    if stats is not None and carry is not _base(carry):
        from dsv4_jax.speculative import stats as spec_stats

        stats.update(spec_stats(carry))


def generate_stream(weights, cfg: Config, prompts, max_new_tokens: int, sampling: SamplingConfig | None = None, *,
                    seed: int | Sequence[int] = 0, max_len: int | None = None,
                    stop_tokens: Sequence[int] | None = None, prefill_chunks: Sequence[int] = DEFAULT_CHUNKS,
                    steps_per_call: int = 8, speculative: int = 0,
                    stats: dict | None = None) -> Iterator[list[list[int]]]:
    """Like :func:`generate`, but yields the new tokens of every row as they come.

    The first item holds token 0 of every row (right after prefill: time to first token); each later item holds
    what ``steps_per_call`` on-device steps (one ``lax.scan`` call) produced per row (``[]`` for finished rows; with
    ``speculative=k`` a step is one draft + verify iteration and yields 1..k+1 tokens per row). ``stats`` is
    filled once generation ends, as in :func:`generate`.
    Concatenating the items of a row gives exactly :func:`generate`'s output for it. A row whose logits become
    non-finite yields nothing more from that step on (the others go on), and once every row is done the generator
    raises :class:`~dsv4_jax.errors.NonFiniteError` as :func:`generate` does (after the last item).
    """
    if int(steps_per_call) != steps_per_call or steps_per_call < 1:
        raise UserInputError(f"generate_stream: steps_per_call={steps_per_call} must be an int >= 1")
    with use_mesh_of(weights):
        carry = prefill(weights, cfg, prompts, max_new_tokens, sampling, seed=seed, max_len=max_len,
                        stop_tokens=stop_tokens, prefill_chunks=prefill_chunks, speculative=speculative)
    scan = _decode_scan
    if speculative:
        from dsv4_jax.speculative import decode_scan as scan
    b = _base(carry)
    first, n_first, done, bad = jax.device_get((b.last, b.n_out, b.done, b.bad_step))
    yield [[int(t)] if n else [] for t, n in zip(first, n_first)]  # n = 0: non-finite prefill logits
    while not bool(np.all(done)):  # done also covers max_new_tokens (n_out >= limit)
        with use_mesh_of(weights):
            carry, toks = scan(weights, cfg, carry, n_steps=int(steps_per_call))
        b = _base(carry)
        toks, done, bad = jax.device_get((toks, b.done, b.bad_step))
        yield [[int(t) for t in row if t != PAD] for row in np.asarray(toks)]
    _fill_stats(carry, stats)
    if np.any(np.asarray(bad) != NO_FAULT):
        tokens(carry)  # raises NonFiniteError naming the rows and steps, with the tokens kept


def max_programs(n_chunk_sizes: int, speculative: bool = False) -> int:
    """Upper bound on programs per (config, batch size, max_len, sampling method[, k]): the state constructor, one
    per prefill chunk size, start (with ``speculative``, also the MTP start), and the two decode loops (while, and
    scan for one ``steps_per_call``)."""
    return n_chunk_sizes + 4 + int(speculative)


__all__ = ["DEFAULT_CHUNKS", "DecodeCarry", "bucket_len", "chunk_plan", "compiled_programs", "decode", "demo_model",
           "generate", "generate_stream", "max_programs", "prefill", "raise_if_nonfinite", "tokens"]
