"""float32 numerics vs the PyPI transformers DeepSeek-V4 (float32, CPU) on random official-format checkpoints.

transformers is structurally right but not numerically faithful to the official code; with every simulation off
(``numerics="float32"``) both compute the same real-valued function, so all-position logits must agree to float32
rounding. Configs cover hash layers, window-only / CSA (ratio 4, indexer selecting) / HCA (ratio 128) layers, and
prompts longer than the window and than 128. The indexer gets 16 heads: with few heads whole blocks score exactly
0 (every head's relu is 0) and torch's CPU top-k breaks such ties in an unspecified order.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import dsv4_jax as d
from dsv4_jax.convert.synthetic import hf_config_dict, write_random_checkpoint

hf_oracle = pytest.importorskip("hf_oracle", reason="transformers/torch not installed")

CONFIGS = {
    # indexer selects (4*index_topk < S); window 8 << S; two HCA layers; 2 hash layers
    "select": dict(num_hidden_layers=5, compress_ratios=[0, 4, 128, 4, 128, 0], num_hash_layers=2, sliding_window=8,
                   index_topk=24, index_n_heads=16, hidden_size=256, n_routed_experts=8, num_experts_per_tok=2,
                   vocab_size=512),
    # every complete block selected; 3 hash layers incl. a CSA and an HCA layer; batch 2
    "dense": dict(num_hidden_layers=4, compress_ratios=[4, 128, 0, 4, 0], num_hash_layers=3, sliding_window=16,
                  index_topk=64, index_n_heads=16, hidden_size=256, n_routed_experts=4, num_experts_per_tok=2,
                  vocab_size=384),
}


# fixed seeds (weights and tokens), so a failure reproduces
@pytest.mark.parametrize("name,seq,batch,seed", [("select", 140, 1, 101), ("dense", 200, 2, 202)])
def test_float32_matches_transformers(tmp_path, name, seq, batch, seed):
    hf = hf_config_dict(**CONFIGS[name])
    ckpt = write_random_checkpoint(tmp_path / "ckpt", hf, seed=seed)
    tokens = np.random.default_rng(seed).integers(0, hf["vocab_size"], (batch, seq))
    want = hf_oracle.hf_logits(ckpt, tokens)
    cfg = d.Config.from_pretrained(ckpt, numerics="float32")
    w = d.load_weights(ckpt, cfg)
    got, _ = d.forward(w, cfg, jnp.asarray(tokens), d.init_state(cfg, batch, seq))
    got = np.asarray(got)
    rel = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)  # per position
    assert rel.max() <= 1e-4, f"seed {seed}: max per-position relative error {rel.max():.2e} (mean {rel.mean():.2e})"
