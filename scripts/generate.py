#!/usr/bin/env python
"""Generate text with DeepSeek-V4 in JAX (a thin CLI over ``dsv4_jax.generate_stream``).

With ``--ckpt DIR`` (an official HF-release or converted checkpoint directory) it loads the model, its
``generation_config.json`` sampling defaults and its ``tokenizer.json``. Without ``--ckpt`` it runs a tiny built-in
model with RANDOM weights (token ids in and out, the output is meaningless) and says so.

Examples::

    python scripts/generate.py                                   # tiny random model, a few seconds of compile
    python scripts/generate.py --ckpt DIR --prompt "The capital of France is"
    python scripts/generate.py --ckpt DIR --chat --prompt "Hi!" --temperature 0.6
    python scripts/generate.py --ckpt DIR --interactive          # multi-turn chat
    python scripts/generate.py --ckpt DIR --batch-file prompts.txt --chat   # one prompt per line
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import dsv4_jax as d  # noqa: E402
from dsv4_jax.generate import demo_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="checkpoint directory (default: tiny built-in model with random weights)")
    ap.add_argument("--prompt", help="prompt text (space-separated token ids when there is no tokenizer)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn of the chat format")
    ap.add_argument("--thinking", action="store_true", help="with --chat/--interactive: thinking mode")
    ap.add_argument("--interactive", action="store_true", help="multi-turn chat on stdin (empty line or /exit ends)")
    ap.add_argument("--batch-file", help="file with one prompt per line, generated as one batch")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, help="0 = greedy (default: generation_config.json, else 1.0)")
    ap.add_argument("--top-p", type=float, help="nucleus sampling mass (default: generation_config.json, else 1.0)")
    ap.add_argument("--top-k", type=int, help="keep the k most likely tokens (default: off)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (and the random weights without --ckpt)")
    ap.add_argument("--max-len", type=int, help="cache length (default: prompt + new tokens, rounded up)")
    ap.add_argument("--steps-per-call", type=int, default=8, help="decode steps per device call while streaming")
    ap.add_argument("--numerics", choices=["reference", "float32"],
                    help="default: reference with --ckpt, float32 for the built-in model")
    return ap.parse_args(argv)


class Model:
    """The loaded model, its tokenizer (or None: token ids in and out) and the default sampling."""

    def __init__(self, args: argparse.Namespace):
        over = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
        self.tok = None
        if args.ckpt:
            from dsv4_jax.tokenizer import Tokenizer

            self.cfg = d.Config.from_pretrained(args.ckpt, numerics=args.numerics or "reference")
            print(f"loading {args.ckpt}\n{self.cfg.describe()}", flush=True)
            self.weights = d.load_weights(args.ckpt, self.cfg)
            if (Path(args.ckpt) / "tokenizer.json").is_file():
                self.tok = Tokenizer.from_dir(args.ckpt)
            else:
                print(f"NOTE: no tokenizer.json in {args.ckpt}: prompts and outputs are token ids")
            self.sampling = d.SamplingConfig.from_generation_config(args.ckpt, **over)
        else:
            self.cfg, self.weights = demo_model(seed=args.seed, numerics=args.numerics or "float32")
            print("NOTE: no --ckpt given: running a tiny built-in model with RANDOM weights (token ids in and out, "
                  "the output is meaningless; pass --ckpt DIR for the real model)")
            print(self.cfg.describe(), flush=True)
            self.sampling = d.SamplingConfig(**{k: v for k, v in over.items() if v is not None})

    def encode(self, text: str, chat: bool, thinking: bool) -> list[int]:
        if self.tok is None:
            if chat:
                raise SystemExit("--chat needs a tokenizer (a --ckpt with tokenizer.json)")
            try:
                return [int(t) for t in text.split()]
            except ValueError:
                raise SystemExit(f"without a tokenizer the prompt must be token ids, got {text!r}") from None
        if chat:
            return self.tok.encode_chat([{"role": "user", "content": text}], thinking_mode=_mode(thinking))
        return [self.tok.bos_id] + self.tok.encode(text)

    def default_prompt(self, seed: int) -> list[int]:
        if self.tok is not None:
            return [self.tok.bos_id] + self.tok.encode("The capital of France is")
        rng = np.random.default_rng(seed)
        return [self.cfg.bos_token_id] + [int(x) for x in rng.integers(2, self.cfg.vocab_size, 8)]

    def show(self, ids: list[int]) -> str:
        return self.tok.decode(ids) if self.tok else " ".join(map(str, ids))


def _mode(thinking: bool) -> str:
    return "thinking" if thinking else "chat"


def run(model: Model, prompts: list[list[int]], args: argparse.Namespace, echo: bool = True) -> list[list[int]]:
    """Stream one batch; print row 0's tokens as they come (every row at the end for a batch) and the timings."""
    B = len(prompts)
    dec = model.tok.incremental_decoder() if model.tok else None
    out: list[list[int]] = [[] for _ in prompts]
    t0 = time.perf_counter()
    stamps = []  # (time, tokens so far) after each device call
    stream = d.generate_stream(model.weights, model.cfg, prompts, args.max_new_tokens, model.sampling,
                               seed=args.seed, max_len=args.max_len, steps_per_call=args.steps_per_call)
    for new in stream:
        for b, toks in enumerate(new):
            out[b] += toks
        stamps.append((time.perf_counter(), sum(map(len, out))))
        if echo and B == 1 and new[0]:
            piece = dec.extend(new[0]) if dec else " ".join(map(str, new[0])) + " "
            print(piece, end="", flush=True)
    if echo and B == 1:
        print(dec.flush() if dec else "")
    elif echo:
        for b, row in enumerate(out):
            print(f"[{b}] {model.show(row)}")
    (t_first, n_first), (t_end, n_gen) = stamps[0], stamps[-1]
    rate = (n_gen - n_first) / max(t_end - t_first, 1e-9)
    steady = ""
    if len(stamps) > 2:  # the first decode call compiles; later calls show the running speed
        (t2, n2) = stamps[1]
        steady = f", {(n_gen - n2) / max(t_end - t2, 1e-9):.1f} tok/s after the first (compiling) call"
    print(f"prompt tokens: {sum(map(len, prompts))}  generated tokens: {n_gen}  time to first token: "
          f"{t_first - t0:.2f}s  decode: {rate:.1f} tok/s{steady}  (batch {B}, {model.sampling}; first calls of a "
          "shape include compilation)", flush=True)
    return out


def interactive(model: Model, args: argparse.Namespace) -> None:
    """Multi-turn chat: like the official generate.py, the whole conversation is re-encoded each turn."""
    from dsv4_jax.chat import parse_completion

    messages: list[dict] = []
    history: list[int] = []  # without a tokenizer: the ids of the conversation so far
    print("interactive chat; an empty line or /exit ends it", flush=True)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line or line == "/exit":
            break
        if model.tok is None:
            history = history + model.encode(line, False, False)
            history = history or [model.cfg.bos_token_id]
            history += run(model, [history], args)[0]
            continue
        messages.append({"role": "user", "content": line})
        prompt = model.tok.encode_chat(messages, thinking_mode=_mode(args.thinking))
        reply = model.tok.decode(run(model, [prompt], args)[0])
        msg = parse_completion(reply, thinking_mode=_mode(args.thinking), strict=False)
        messages.append({k: v for k, v in msg.items() if v or k in ("role", "content")})


def main(argv=None) -> int:
    args = parse_args(argv)
    model = Model(args)
    if args.interactive:
        interactive(model, args)
        return 0
    if args.batch_file:
        lines = [ln.strip() for ln in Path(args.batch_file).read_text().splitlines() if ln.strip()]
        prompts = [model.encode(ln, args.chat, args.thinking) for ln in lines]
        if not prompts:
            raise SystemExit(f"{args.batch_file}: no prompts")
    elif args.prompt is not None:
        prompts = [model.encode(args.prompt, args.chat, args.thinking)]
    else:
        if args.chat:
            raise SystemExit("--chat needs --prompt (or --batch-file / --interactive)")
        prompts = [model.default_prompt(args.seed)]
    print(f"prompt: {model.show(prompts[0])}" + (f"  (+{len(prompts) - 1} more rows)" if len(prompts) > 1 else ""))
    try:
        run(model, prompts, args)
    except ValueError as e:  # request checks (prompt too long, bad ids, ...) come before any compute
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
