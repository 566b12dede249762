#!/usr/bin/env python
"""Generate text with DeepSeek-V4 in JAX.

With ``--ckpt DIR`` (an official HF-release checkpoint directory) it loads the real model and its tokenizer; without
it, it runs a tiny built-in random-weight model (token ids only, the output is meaningless) and says so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import dsv4_jax as d  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="official DeepSeek-V4 checkpoint directory (default: tiny random model)")
    ap.add_argument("--prompt", default="The capital of France is", help="prompt text (token ids without --ckpt)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--numerics", choices=["reference", "float32"], default="reference")
    args = ap.parse_args(argv)

    if args.ckpt:
        from dsv4_jax.tokenizer import Tokenizer

        cfg = d.Config.from_pretrained(args.ckpt, numerics=args.numerics)
        print(f"loading {args.ckpt}\n{cfg.describe()}", flush=True)
        weights = d.load_weights(args.ckpt, cfg)
        tok = Tokenizer.from_dir(args.ckpt)
        prompt = [tok.bos_id] + tok.encode(args.prompt)
    else:
        cfg = d.Config.tiny(numerics=args.numerics)
        print("NOTE: no --ckpt given: running the tiny built-in model with RANDOM weights "
              "(output tokens are meaningless; pass --ckpt DIR for the real model)")
        print(cfg.describe(), flush=True)
        weights = d.init_weights(cfg, jax.random.key(args.seed))
        tok = None
        prompt = [cfg.bos_token_id] + [int(x) for x in np.random.default_rng(args.seed).integers(2, cfg.vocab_size, 8)]

    max_len = len(prompt) + args.max_new_tokens
    state = d.init_state(cfg, 1, max_len)
    t0 = time.perf_counter()
    logits, state = d.forward(weights, cfg, jnp.asarray([prompt]), state, return_logits="last")
    nxt = int(jnp.argmax(logits[0]))
    ttft = time.perf_counter() - t0
    out = [nxt]
    t1 = time.perf_counter()
    for _ in range(args.max_new_tokens - 1):
        if nxt == cfg.eos_token_id:
            break
        logits, state = d.forward(weights, cfg, jnp.asarray([[nxt]]), state, return_logits="last")
        nxt = int(jnp.argmax(logits[0]))
        out.append(nxt)
        print(tok.decode([nxt]) if tok else nxt, end=" " if tok is None else "", flush=True)
    dt = time.perf_counter() - t1
    print()
    print(f"prompt tokens: {len(prompt)}  generated: {len(out)}  time to first token: {ttft:.2f}s  "
          f"decode: {(len(out) - 1) / max(dt, 1e-9):.2f} tok/s (greedy; includes compilation on first use)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
