"""Random DeepSeek-V4 checkpoints written in the official HF-release on-disk format (numpy + ml_dtypes only).

Why: the JAX model is checked against oracles (the transformers port in float32, the official code) that all load
the *same* directory, so the directory must look exactly like a real release: the same tensor names, dtypes and
shapes (spec section 12), FP8 e4m3 linears with 128x128 e8m0 block scales, routed experts as packed e2m1 FP4 with
1x32 e8m0 scales, an ``I64`` ``tid2eid`` table per hash layer, the MTP block, sharded safetensors files with a
standard ``model.safetensors.index.json``. ``expected_tensors`` is the single source of that inventory; a test
checks it against ``/work/shared/spec/tensor_inventory.json`` (real V4-Flash / V4-Pro) tensor for tensor.

Public API
    ``hf_config_dict(**overrides)``      the HF ``config.json`` of a tiny model (golden ``tiny`` values by default)
    ``inference_config_dict(cfg)``       the matching ``inference/config.json`` read by the official ``ModelArgs``
    ``expected_tensors(cfg)``            ``[(name, safetensors dtype, shape)]`` of an official checkpoint
    ``write_random_checkpoint(...)``     writes a random checkpoint, streaming tensor by tensor
    ``CheckpointReader``, ``load_tensor``, ``read_safetensors_header``, ``dequantize_fp8``, ``dequantize_fp4``
                                         numpy readers (tests, load checks)

Random values (each tensor has its own generator seeded by ``(seed, crc32(group name))``, so a tensor's values do
not depend on the shard layout or on ``layer_subset``), following the golden ``tiny`` checkpoint (README section 3):

* FP8 linears: ``N(0,1)/sqrt(fan_in)`` times a random ``2**U(-0.5,0.5)`` per 128x128 block, quantized per block
  with scale ``s = 2**e``, ``e`` the smallest integer with ``amax <= 448 * 2**e`` (= ``ceil(log2(amax/448))``
  exactly), value ``e4m3_rne(w / s)``; stored scale byte ``e + 127`` (``F8_E8M0``).
* Routed experts (FP4): ``N(0,1)/sqrt(fan_in)`` times ``2**U(-0.5,0.5)`` per 1x32 block, scale ``2**e`` with
  ``amax <= 6 * 2**e`` minimal, value ``e2m1_rne(w / s)`` (bit-identical to an ml_dtypes ``float4_e2m1fn``
  cast), two codes per byte, LOW
  nibble = even element, stored as ``I8 [out, in/2]`` with ``F8_E8M0 [out, in/32]`` scales.
* "Hot" SwiGLU channels so that ``swiglu_limit`` really clamps: 1/16 of the shared-expert and 1/32 of each routed
  expert's intermediate channels have their ``w1``/``w3`` rows multiplied by 8 and their ``w2`` columns divided by
  8 (before quantization).
* BF16 linears (gate, compressor wkv/wgate, indexer weights_proj): ``N(0,1)/sqrt(fan_in)``; norms
  ``1 + 0.15 N`` clipped to [0.5, 1.5]; embed ``N(0,1)``; head ``2 N / sqrt(dim)``.
* F32: ``hc_*_fn`` ``N/sqrt(hc*dim)``; ``hc_*_base`` ``0.5 N`` with +1 on the comb diagonal (attn/ffn sites, not
  the heads); ``hc_*_scale`` ``U(0.5, 1)``; ``attn_sink`` ``N(0,1)``; ``ape`` ``0.5 N``; ``gate.bias`` ``0.2 N``.
* ``tid2eid``: ``I64 [vocab, n_activated]``, distinct expert ids per row (the first k of a random permutation).

Files: ``config.json`` (HF fields, golden key order), ``generation_config.json``, ``inference/config.json``
(official ``ModelArgs``), shards ``model-0000i-of-0000N.safetensors`` with header metadata ``{"format": "pt"}``,
tensors laid out like ``safetensors.torch.save_file`` does it (dtype groups I64, F32, BF16, F8_E8M0, F8_E4M3, I8,
then by name; header padded with spaces to a multiple of 8), and ``model.safetensors.index.json`` with
``metadata.total_size`` = sum of tensor bytes and a name-sorted ``weight_map``. The embedding goes to the first
shard, ``head``/``norm``/``hc_head_*`` and the MTP block to the last, main layers in order in between (a contiguous
split that balances shard bytes). With the golden config and 3 shards the headers, offsets, index and config files
are byte-identical to the golden tiny checkpoint's.
"""

from __future__ import annotations

import copy
import json
import math
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

# ------------------------------------------------------------------------------------------------ format constants
DTYPE_ITEMSIZE = {"I64": 8, "F32": 4, "BF16": 2, "F8_E8M0": 1, "F8_E4M3": 1, "I8": 1}
# Order in which `safetensors` writes dtype groups (descending Rust `Dtype` enum), used for the data layout.
_DTYPE_WRITE_RANK = {"I64": 0, "F32": 1, "BF16": 2, "F8_E8M0": 3, "F8_E4M3": 4, "I8": 5}
NUMPY_DTYPES = {
    "I64": np.dtype("<i8"),
    "F32": np.dtype("<f4"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I8": np.dtype(np.int8),
}
FP8_BLOCK = 128  # weight scale block (rows and columns) of the FP8 linears
FP4_BLOCK = 32  # weight scale block (columns) of the FP4 routed experts
FP8_MAX = 448.0
FP4_MAX = 6.0
FP4_E2M1_VALUES = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)
_STRIP_ROWS = 128  # rows generated per random draw; fixed so that values do not depend on memory settings
_HOT_SHARED, _HOT_ROUTED, _HOT_GAIN = 16, 32, 8.0

# ------------------------------------------------------------------------------------------------ configs
# Field set and key order of the golden tiny `ckpt/config.json` (itself the field set of the HF release).
_TINY_HF_CONFIG: dict = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "expert_dtype": "fp4",
    "hc_eps": 1e-06,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 256,
    "index_head_dim": 128,
    "index_n_heads": 4,
    "index_topk": 4,
    "initializer_range": 0.02,
    "max_position_embeddings": 1048576,
    "model_type": "deepseek_v4",
    "moe_intermediate_size": 256,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 5,
    "num_hash_layers": 2,
    "num_key_value_heads": 1,
    "num_nextn_predict_layers": 1,
    "o_groups": 2,
    "o_lora_rank": 64,
    "q_lora_rank": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.5,
    "scoring_func": "sqrtsoftplus",
    "sliding_window": 16,
    "swiglu_limit": 10.0,
    "tie_word_embeddings": False,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.57.1",
    "use_cache": True,
    "vocab_size": 1024,
    "compress_rope_theta": 160000,
    "compress_ratios": [0, 4, 128, 4, 128, 0],
}

# Real release shapes (spec section 1); `hf_config_dict(**V4_FLASH_HF_OVERRIDES)` is the V4-Flash config.json.
V4_FLASH_HF_OVERRIDES: dict = {
    "vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64, "head_dim": 512,
    "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024, "sliding_window": 128,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4] + [0], "index_n_heads": 64, "index_head_dim": 128,
    "index_topk": 512, "n_routed_experts": 256, "num_experts_per_tok": 6, "moe_intermediate_size": 2048,
    "routed_scaling_factor": 1.5, "num_hash_layers": 3,
}
V4_PRO_HF_OVERRIDES: dict = {
    **V4_FLASH_HF_OVERRIDES,
    "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128, "q_lora_rank": 1536, "o_groups": 16,
    "compress_ratios": [128, 128] + [4, 128] * 29 + [4] + [0], "index_topk": 1024, "n_routed_experts": 384,
    "moe_intermediate_size": 3072, "routed_scaling_factor": 2.5,
}


def default_compress_ratios(n_layers: int, n_mtp: int = 1) -> list[int]:
    """Layer schedule used when only ``num_hidden_layers`` is overridden: layer 0 window-only, then CSA (4) and HCA
    (128) alternating, then ``n_mtp`` MTP entries (0). For 5 layers this is the golden tiny schedule."""
    main = [0] + [4 if i % 2 == 1 else 128 for i in range(1, n_layers)]
    return main[:n_layers] + [0] * n_mtp


def hf_config_dict(**overrides) -> dict:
    """A complete HF ``config.json`` dict for a DeepSeek-V4 model: the golden ``tiny`` config with ``overrides``.

    Any existing field may be overridden (unknown names raise ``ValueError``, to catch typos: the project's loader
    rejects unknown fields too). Derived fields follow the overrides unless given explicitly:
    ``compress_ratios`` (``default_compress_ratios`` when ``num_hidden_layers`` / ``num_nextn_predict_layers``
    change; a list of ``num_hidden_layers`` entries gets the MTP zeros appended), ``num_hash_layers`` (capped at
    ``num_hidden_layers``) and ``max_position_embeddings`` (``original_max_position_embeddings * factor`` as in the
    release).
    """
    unknown = sorted(set(overrides) - set(_TINY_HF_CONFIG))
    if unknown:
        raise ValueError(f"unknown DeepSeek-V4 config field(s) {unknown}")
    cfg = copy.deepcopy(_TINY_HF_CONFIG)
    cfg.update(copy.deepcopy(overrides))
    n, n_mtp = int(cfg["num_hidden_layers"]), int(cfg["num_nextn_predict_layers"])
    if "compress_ratios" not in overrides and ({"num_hidden_layers", "num_nextn_predict_layers"} & set(overrides)):
        cfg["compress_ratios"] = default_compress_ratios(n, n_mtp)
    ratios = [int(r) for r in cfg["compress_ratios"]]
    if len(ratios) == n:
        ratios += [0] * n_mtp
    cfg["compress_ratios"] = ratios
    if "num_hash_layers" not in overrides:
        cfg["num_hash_layers"] = min(int(cfg["num_hash_layers"]), n)
    if "max_position_embeddings" not in overrides:
        rs = cfg["rope_scaling"]
        cfg["max_position_embeddings"] = int(rs["original_max_position_embeddings"] * rs["factor"])
    _validate(cfg)
    return cfg


def _validate(cfg: dict) -> None:
    """Reject configs whose checkpoint cannot exist (shapes that do not divide, bad schedules)."""
    d = _Dims(cfg)
    checks = [
        (len(d.ratios) == d.n_layers + d.n_mtp,
         f"compress_ratios has {len(d.ratios)} entries, need num_hidden_layers + num_nextn_predict_layers"),
        (all(r >= 0 for r in d.ratios), "compress ratios must be >= 0"),
        (0 <= d.n_hash <= d.n_layers, "num_hash_layers must be in [0, num_hidden_layers]"),
        (0 < d.k <= d.E, "num_experts_per_tok must be in [1, n_routed_experts]"),
        ((d.H * d.hd) % d.G == 0, "num_attention_heads * head_dim must be divisible by o_groups"),
        (d.D % FP4_BLOCK == 0 and d.I % FP4_BLOCK == 0,
         "hidden_size and moe_intermediate_size must be multiples of 32 (FP4 expert scale blocks)"),
        (0 < d.rope < d.hd and d.rope < d.ihd, "qk_rope_head_dim must be smaller than head_dim and index_head_dim"),
        (cfg["num_key_value_heads"] == 1, "DeepSeek-V4 has one shared KV head"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"invalid DeepSeek-V4 config: {msg}")


def inference_config_dict(cfg: dict, max_seq_len: int = 4096, max_batch_size: int = 4) -> dict:
    """The official ``inference/config.json`` (``ModelArgs`` field names) equivalent to the HF ``cfg``.

    ``max_seq_len`` / ``max_batch_size`` only size the official code's caches and RoPE tables (not in the HF config;
    the official defaults are 4096 / 4)."""
    rs = cfg["rope_scaling"]
    return {
        "vocab_size": cfg["vocab_size"], "dim": cfg["hidden_size"], "moe_inter_dim": cfg["moe_intermediate_size"],
        "n_layers": cfg["num_hidden_layers"], "n_hash_layers": cfg["num_hash_layers"],
        "n_heads": cfg["num_attention_heads"], "n_routed_experts": cfg["n_routed_experts"],
        "n_shared_experts": cfg["n_shared_experts"], "n_activated_experts": cfg["num_experts_per_tok"],
        "score_func": cfg["scoring_func"], "route_scale": cfg["routed_scaling_factor"],
        "swiglu_limit": cfg["swiglu_limit"], "q_lora_rank": cfg["q_lora_rank"], "head_dim": cfg["head_dim"],
        "rope_head_dim": cfg["qk_rope_head_dim"], "o_groups": cfg["o_groups"], "o_lora_rank": cfg["o_lora_rank"],
        "window_size": cfg["sliding_window"], "original_seq_len": rs["original_max_position_embeddings"],
        "rope_theta": cfg["rope_theta"], "rope_factor": rs["factor"], "beta_fast": rs["beta_fast"],
        "beta_slow": rs["beta_slow"], "index_n_heads": cfg["index_n_heads"], "index_head_dim": cfg["index_head_dim"],
        "index_topk": cfg["index_topk"], "hc_mult": cfg["hc_mult"], "hc_sinkhorn_iters": cfg["hc_sinkhorn_iters"],
        "dtype": "fp8", "scale_fmt": "ue8m0", "expert_dtype": cfg.get("expert_dtype", "fp4"),
        "compress_rope_theta": cfg["compress_rope_theta"], "compress_ratios": list(cfg["compress_ratios"]),
        "max_batch_size": max_batch_size, "max_seq_len": max_seq_len,
    }


def generation_config_dict(cfg: dict) -> dict:
    """``generation_config.json`` as in the release (sampling at temperature 1, top_p 1)."""
    return {"_from_model_config": True, "bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
            "do_sample": True, "temperature": 1.0, "top_p": 1.0, "transformers_version": cfg["transformers_version"]}


class _Dims:
    """Short names for the config fields the tensor shapes depend on."""

    def __init__(self, cfg: dict):
        self.V, self.D = int(cfg["vocab_size"]), int(cfg["hidden_size"])
        self.n_layers, self.n_mtp = int(cfg["num_hidden_layers"]), int(cfg["num_nextn_predict_layers"])
        self.H, self.hd, self.rope = int(cfg["num_attention_heads"]), int(cfg["head_dim"]), int(cfg["qk_rope_head_dim"])
        self.qr, self.G, self.R = int(cfg["q_lora_rank"]), int(cfg["o_groups"]), int(cfg["o_lora_rank"])
        self.ih, self.ihd = int(cfg["index_n_heads"]), int(cfg["index_head_dim"])
        self.E, self.k, self.I = int(cfg["n_routed_experts"]), int(cfg["num_experts_per_tok"]), int(
            cfg["moe_intermediate_size"])
        self.n_shared, self.n_hash, self.hc = int(cfg["n_shared_experts"]), int(cfg["num_hash_layers"]), int(
            cfg["hc_mult"])
        self.ratios = [int(r) for r in cfg["compress_ratios"]]


# ------------------------------------------------------------------------------------------------ tensor inventory
@dataclass
class _Group:
    """Tensors generated together from one random stream (a quantized weight and its scale, or a single tensor)."""

    key: str  # rng key (a name prefix) and the unit that decides the shard
    kind: str  # "fp8", "fp4", "bf16", "norm", "f32", "tid2eid"
    tensors: list[tuple[str, str, tuple[int, ...]]]
    params: dict = field(default_factory=dict)
    unit: int = 0  # sharding unit index (0 = embed, 1..n_layers = main layers, last = head tail + MTP)


def _fp8(name: str, out: int, inp: int, **params) -> _Group:
    scale = (math.ceil(out / FP8_BLOCK), math.ceil(inp / FP8_BLOCK))
    return _Group(name, "fp8", [(f"{name}.weight", "F8_E4M3", (out, inp)), (f"{name}.scale", "F8_E8M0", scale)],
                  dict(params, out=out, inp=inp))


def _fp4(name: str, out: int, inp: int, **params) -> _Group:
    return _Group(name, "fp4", [(f"{name}.weight", "I8", (out, inp // 2)),
                                (f"{name}.scale", "F8_E8M0", (out, inp // FP4_BLOCK))],
                  dict(params, out=out, inp=inp))


def _bf16(name: str, shape: tuple[int, ...], std: float) -> _Group:
    return _Group(name, "bf16", [(name, "BF16", shape)], {"std": std})


def _norm(name: str, n: int) -> _Group:
    return _Group(name, "norm", [(name, "BF16", (n,))])


def _f32(name: str, shape: tuple[int, ...], dist: str, **params) -> _Group:
    return _Group(name, "f32", [(name, "F32", shape)], dict(params, dist=dist))


def _hc_groups(p: str, site: str, d: _Dims) -> list[_Group]:
    mix = (2 + d.hc) * d.hc
    return [_f32(f"{p}hc_{site}_fn", (mix, d.hc * d.D), "normal", std=1 / math.sqrt(d.hc * d.D)),
            _f32(f"{p}hc_{site}_base", (mix,), "hc_base", hc=d.hc),
            _f32(f"{p}hc_{site}_scale", (3,), "uniform", lo=0.5, hi=1.0)]


def _head_groups(p: str, d: _Dims) -> list[_Group]:
    """``hc_head_{fn,base,scale}``: the final stream collapse (no comb, so no diagonal offset)."""
    return [_f32(f"{p}hc_head_fn", (d.hc, d.hc * d.D), "normal", std=1 / math.sqrt(d.hc * d.D)),
            _f32(f"{p}hc_head_base", (d.hc,), "normal", std=0.5),
            _f32(f"{p}hc_head_scale", (1,), "uniform", lo=0.5, hi=1.0)]


def _compressor_groups(p: str, ratio: int, d_out: int, d: _Dims) -> list[_Group]:
    c = 2 if ratio == 4 else 1  # overlapping windows (CSA) carry two halves per token
    s = 1 / math.sqrt(d.D)
    return [_f32(f"{p}ape", (ratio, c * d_out), "normal", std=0.5),
            _bf16(f"{p}wkv.weight", (c * d_out, d.D), s), _bf16(f"{p}wgate.weight", (c * d_out, d.D), s),
            _norm(f"{p}norm.weight", d_out)]


def _block_groups(p: str, layer_id: int, d: _Dims, mtp: bool) -> list[_Group]:
    """All tensors of one block (main layer ``layers.{i}.`` or MTP ``mtp.{j}.``), in the release's order."""
    ratio = d.ratios[layer_id]
    hashed = (not mtp) and layer_id < d.n_hash
    g: list[_Group] = [_norm(f"{p}attn_norm.weight", d.D), _norm(f"{p}ffn_norm.weight", d.D)]
    g += _hc_groups(p, "attn", d) + _hc_groups(p, "ffn", d)
    g += [_f32(f"{p}attn.attn_sink", (d.H,), "normal", std=1.0),
          _fp8(f"{p}attn.wq_a", d.qr, d.D), _norm(f"{p}attn.q_norm.weight", d.qr),
          _fp8(f"{p}attn.wq_b", d.H * d.hd, d.qr),
          _fp8(f"{p}attn.wkv", d.hd, d.D), _norm(f"{p}attn.kv_norm.weight", d.hd),
          _fp8(f"{p}attn.wo_a", d.G * d.R, d.H * d.hd // d.G), _fp8(f"{p}attn.wo_b", d.D, d.G * d.R)]
    if ratio:
        g += _compressor_groups(f"{p}attn.compressor.", ratio, d.hd, d)
    if ratio == 4:
        g += [_fp8(f"{p}attn.indexer.wq_b", d.ih * d.ihd, d.qr),
              _bf16(f"{p}attn.indexer.weights_proj.weight", (d.ih, d.D), 1 / math.sqrt(d.D))]
        g += _compressor_groups(f"{p}attn.indexer.compressor.", 4, d.ihd, d)
    g.append(_bf16(f"{p}ffn.gate.weight", (d.E, d.D), 1 / math.sqrt(d.D)))
    if hashed:
        g.append(_Group(f"{p}ffn.gate.tid2eid", "tid2eid", [(f"{p}ffn.gate.tid2eid", "I64", (d.V, d.k))],
                        {"n_experts": d.E}))
    else:
        g.append(_f32(f"{p}ffn.gate.bias", (d.E,), "normal", std=0.2))
    inter = d.I * d.n_shared
    hot = {"hot_key": f"{p}ffn.shared_experts", "hot_width": inter, "hot_frac": _HOT_SHARED}
    g += [_fp8(f"{p}ffn.shared_experts.w1", inter, d.D, hot_rows=True, **hot),
          _fp8(f"{p}ffn.shared_experts.w2", d.D, inter, hot_cols=True, **hot),
          _fp8(f"{p}ffn.shared_experts.w3", inter, d.D, hot_rows=True, **hot)]
    if mtp:
        g += [_fp8(f"{p}e_proj", d.D, d.D), _fp8(f"{p}h_proj", d.D, d.D),
              _norm(f"{p}enorm.weight", d.D), _norm(f"{p}hnorm.weight", d.D), _norm(f"{p}norm.weight", d.D)]
        g += _head_groups(p, d)
    for e in range(d.E):
        q = f"{p}ffn.experts.{e}"
        hot = {"hot_key": q, "hot_width": d.I, "hot_frac": _HOT_ROUTED}
        g += [_fp4(f"{q}.w1", d.I, d.D, hot_rows=True, **hot), _fp4(f"{q}.w2", d.D, d.I, hot_cols=True, **hot),
              _fp4(f"{q}.w3", d.I, d.D, hot_rows=True, **hot)]
    return g


def _all_groups(cfg: dict, layer_subset: Iterable[int] | None = None) -> list[_Group]:
    """Every tensor group of the checkpoint in release order (top level, main layers, MTP), with shard units."""
    d = _Dims(cfg)
    keep = None if layer_subset is None else {int(i) for i in layer_subset}
    bad = sorted(i for i in (keep or ()) if not 0 <= i < d.n_layers + d.n_mtp)
    if bad:
        raise ValueError(f"layer_subset entries {bad} outside [0, {d.n_layers + d.n_mtp}) "
                         "(MTP block j is layer num_hidden_layers + j)")
    tail_unit = d.n_layers + 1
    top = [_bf16("embed.weight", (d.V, d.D), 1.0), _bf16("head.weight", (d.V, d.D), 2 / math.sqrt(d.D)),
           _norm("norm.weight", d.D)] + _head_groups("", d)
    for grp in top:
        grp.unit = 0 if grp.key == "embed.weight" else tail_unit
    groups = list(top)
    for i in range(d.n_layers + d.n_mtp):
        if keep is not None and i not in keep:
            continue
        mtp = i >= d.n_layers
        prefix = f"mtp.{i - d.n_layers}." if mtp else f"layers.{i}."
        for grp in _block_groups(prefix, i, d, mtp):
            grp.unit = tail_unit if mtp else i + 1
            groups.append(grp)
    return groups


def expected_tensors(cfg: dict, layer_subset: Iterable[int] | None = None) -> list[tuple[str, str, tuple[int, ...]]]:
    """``[(name, safetensors dtype, shape)]`` of an official DeepSeek-V4 checkpoint for the HF config ``cfg``.

    Order: ``embed/head/norm/hc_head_*``, then each main layer (attention and FFN tensors in the release's order,
    then routed experts 0..E-1 as ``w1.weight, w1.scale, w2.weight, w2.scale, w3.weight, w3.scale``), then the MTP
    block(s) ``mtp.{j}.``. ``layer_subset`` (layer indices, MTP block j = ``num_hidden_layers + j``) keeps only
    those blocks; top-level tensors are always listed.
    """
    return [t for grp in _all_groups(cfg, layer_subset) for t in grp.tensors]


def tensor_nbytes(dtype: str, shape: Iterable[int]) -> int:
    """Bytes of a tensor in a safetensors file."""
    return DTYPE_ITEMSIZE[dtype] * math.prod(shape)


# ------------------------------------------------------------------------------------------------ random values
def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode())])


def _ceil_pow2_exponent(amax: np.ndarray, qmax: float) -> np.ndarray:
    """Smallest integer e with ``amax <= qmax * 2**e`` (i.e. ``ceil(log2(amax / qmax))``, computed exactly),
    clamped to the e8m0 range [-127, 127]; an all-zero block gets the smallest exponent."""
    a = np.maximum(np.asarray(amax, dtype=np.float64), qmax * 2.0 ** -127)
    e = np.ceil(np.log2(a / qmax)).astype(np.int64)
    e = np.where(a > np.ldexp(qmax, e), e + 1, e)  # exact fix-ups of log2 rounding
    e = np.where(a <= np.ldexp(qmax, e - 1), e - 1, e)
    return np.clip(e, -127, 127)


def quantize_fp8_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize float32 ``w [rows, cols]`` (rows <= 128, one row block) to e4m3 with one power-of-two scale per
    128-column block. Returns (e4m3 codes as uint8 ``[rows, cols]``, e8m0 scale bytes ``[1, ceil(cols/128)]``)."""
    rows, cols = w.shape
    nb = math.ceil(cols / FP8_BLOCK)
    padded = np.zeros((rows, nb * FP8_BLOCK), np.float32)
    padded[:, :cols] = np.abs(w)
    amax = padded.reshape(rows, nb, FP8_BLOCK).max(axis=(0, 2))
    e = _ceil_pow2_exponent(amax, FP8_MAX)
    inv = np.repeat(np.ldexp(np.float32(1), -e).astype(np.float32), FP8_BLOCK)[:cols]
    q = np.clip(w * inv, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return q.view(np.uint8), (e + 127).astype(np.uint8)[None, :]


# e2m1 rounding boundaries (midpoints of the grid) and whether a value exactly on one rounds UP (to the even code)
_E2M1_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def e2m1_codes(x: np.ndarray) -> np.ndarray:
    """Round float32 ``x`` to e2m1 codes (uint8 0..15, bit 3 = sign) with round-to-nearest-even and saturation:
    bit-identical to ``x.astype(ml_dtypes.float4_e2m1fn).view(np.uint8)`` but ~5x faster (7 comparisons)."""
    a = np.abs(x)
    code = np.zeros(x.shape, np.uint8)
    for mid, tie_up in _E2M1_MIDPOINTS:
        code += (a >= np.float32(mid)) if tie_up else (a > np.float32(mid))
    return code | (np.signbit(x).astype(np.uint8) << 3)


def quantize_fp4_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize float32 ``w [rows, cols]`` (cols % 32 == 0) to e2m1 with one power-of-two scale per 1x32 block.
    Returns (packed bytes ``[rows, cols/2]`` uint8, low nibble = even element; e8m0 bytes ``[rows, cols/32]``)."""
    rows, cols = w.shape
    blocks = w.reshape(rows, cols // FP4_BLOCK, FP4_BLOCK)
    e = _ceil_pow2_exponent(np.abs(blocks).max(axis=2), FP4_MAX)
    scaled = blocks * np.ldexp(np.float32(1), -e).astype(np.float32)[:, :, None]
    codes = e2m1_codes(scaled).reshape(rows, cols)
    packed = (codes[:, 0::2] & 0xF) | ((codes[:, 1::2] & 0xF) << 4)
    return packed.astype(np.uint8), (e + 127).astype(np.uint8)


def _hot_channels(seed: int, params: dict) -> np.ndarray | None:
    """Indices of the "hot" SwiGLU intermediate channels shared by w1/w2/w3 of one expert (None if not an expert)."""
    if "hot_key" not in params:
        return None
    width = params["hot_width"]
    n_hot = max(1, width // params["hot_frac"])
    return np.sort(_rng(seed, params["hot_key"] + ".hot").choice(width, size=n_hot, replace=False))


def _linear_strips(rng: np.random.Generator, seed: int, params: dict, col_block: int) -> Iterator[np.ndarray]:
    """Yield float32 row strips (``_STRIP_ROWS`` rows) of a random quantizable linear weight ``[out, inp]``:
    ``N(0,1)/sqrt(inp)`` times ``2**U(-0.5,0.5)`` per (strip x ``col_block``) block, with hot SwiGLU channels."""
    out, inp = params["out"], params["inp"]
    hot = _hot_channels(seed, params)
    col_gain = None
    if hot is not None and params.get("hot_cols"):
        col_gain = np.ones(inp, np.float32)
        col_gain[hot] /= _HOT_GAIN
    row_gain = None
    if hot is not None and params.get("hot_rows"):
        row_gain = np.ones(out, np.float32)
        row_gain[hot] *= _HOT_GAIN
    std = np.float32(1 / math.sqrt(inp))
    nb = math.ceil(inp / col_block)
    for r0 in range(0, out, _STRIP_ROWS):
        r1 = min(out, r0 + _STRIP_ROWS)
        w = rng.standard_normal((r1 - r0, inp), dtype=np.float32) * std
        if col_block == FP8_BLOCK:
            jitter = np.exp2(rng.uniform(-0.5, 0.5, size=(1, nb))).astype(np.float32)
        else:
            jitter = np.exp2(rng.uniform(-0.5, 0.5, size=(r1 - r0, nb))).astype(np.float32)
        w *= np.repeat(jitter, col_block, axis=1)[:, :inp]
        if row_gain is not None:
            w *= row_gain[r0:r1, None]
        if col_gain is not None:
            w *= col_gain[None, :]
        yield w


def _produce(grp: _Group, seed: int) -> Iterator[tuple[str, bytes | memoryview]]:
    """Yield ``(tensor name, next chunk of its raw little-endian bytes)`` for every tensor of ``grp``; the chunks of
    one tensor come in order, so a writer can stream them to the tensor's file offset."""
    rng = _rng(seed, grp.key)
    p = grp.params
    if grp.kind == "fp8":
        wname, sname = grp.tensors[0][0], grp.tensors[1][0]
        for w in _linear_strips(rng, seed, p, FP8_BLOCK):
            q, s = quantize_fp8_blocks(w)
            yield wname, q.tobytes()
            yield sname, s.tobytes()
    elif grp.kind == "fp4":
        wname, sname = grp.tensors[0][0], grp.tensors[1][0]
        for w in _linear_strips(rng, seed, p, FP4_BLOCK):
            q, s = quantize_fp4_rows(w)
            yield wname, q.tobytes()
            yield sname, s.tobytes()
    elif grp.kind == "bf16":
        name, _, shape = grp.tensors[0]
        rows, cols = shape
        for r0 in range(0, rows, _STRIP_ROWS):
            n = min(rows, r0 + _STRIP_ROWS) - r0
            w = rng.standard_normal((n, cols), dtype=np.float32) * np.float32(p["std"])
            yield name, w.astype(ml_dtypes.bfloat16).tobytes()
    elif grp.kind == "norm":
        name, _, shape = grp.tensors[0]
        w = np.clip(1.0 + 0.15 * rng.standard_normal(shape, dtype=np.float32), 0.5, 1.5)
        yield name, w.astype(ml_dtypes.bfloat16).tobytes()
    elif grp.kind == "f32":
        name, _, shape = grp.tensors[0]
        if p["dist"] == "normal":
            w = rng.standard_normal(shape, dtype=np.float32) * np.float32(p["std"])
        elif p["dist"] == "uniform":
            w = rng.uniform(p["lo"], p["hi"], size=shape).astype(np.float32)
        elif p["dist"] == "hc_base":  # [pre(hc) | post(hc) | comb(hc*hc) row-major]; comb diagonal +1
            hc = p["hc"]
            w = 0.5 * rng.standard_normal(shape, dtype=np.float32)
            w[2 * hc + np.arange(hc) * (hc + 1)] += 1.0
        else:
            raise AssertionError(p["dist"])
        yield name, np.ascontiguousarray(w, dtype="<f4").tobytes()
    elif grp.kind == "tid2eid":
        name, _, (rows, k) = grp.tensors[0]
        n_exp = p["n_experts"]
        chunk = max(1, (1 << 22) // n_exp)
        for r0 in range(0, rows, chunk):
            n = min(rows, r0 + chunk) - r0
            ids = np.argsort(rng.random((n, n_exp)), axis=1)[:, :k]
            yield name, ids.astype("<i8").tobytes()
    else:
        raise AssertionError(grp.kind)


# ------------------------------------------------------------------------------------------------ sharding / writing
def _partition(sizes: list[int], n_parts: int) -> list[int]:
    """Contiguous split of ``sizes`` into ``n_parts`` non-empty parts minimizing the largest part; returns the part
    index of every item (deterministic: among optimal splits, the earliest cut points)."""
    n = len(sizes)
    if not 1 <= n_parts <= n:
        raise ValueError(f"cannot split {n} sharding units (embed, layers, head+MTP) into {n_parts} shards")
    pre = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_parts + 1)]  # best[k][j]: first j items in k parts
    cut = [[0] * (n + 1) for _ in range(n_parts + 1)]
    best[0][0] = 0
    for k in range(1, n_parts + 1):
        for j in range(k, n - (n_parts - k) + 1):
            for i in range(k - 1, j):
                cost = max(best[k - 1][i], int(pre[j] - pre[i]))
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    parts, j = [0] * n, n
    for k in range(n_parts, 0, -1):
        i = cut[k][j]
        for t in range(i, j):
            parts[t] = k - 1
        j = i
    return parts


def shard_file_name(i: int, n: int) -> str:
    """Official shard naming (1-based)."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _shard_header(tensors: list[tuple[str, str, tuple[int, ...]]]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes (JSON, padded with spaces to a multiple of 8) and ``name -> (begin, end)`` data offsets, in the
    layout ``safetensors.torch.save_file`` produces (dtype groups, then names)."""
    order = sorted(tensors, key=lambda t: (_DTYPE_WRITE_RANK[t[1]], t[0]))
    header: dict = {"__metadata__": {"format": "pt"}}
    offsets, pos = {}, 0
    for name, dtype, shape in order:
        nbytes = tensor_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets[name] = (pos, pos + nbytes)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw, offsets


def _fill_groups(path: Path, base: int, offsets: dict[str, tuple[int, int]], groups: list[_Group], seed: int) -> None:
    """Generate ``groups`` and write each tensor's chunks at its data offset in the (pre-sized) shard ``path``."""
    with open(path, "r+b") as f:
        for grp in groups:
            cursor = {name: offsets[name][0] for name, _, _ in grp.tensors}
            for name, chunk in _produce(grp, seed):
                f.seek(base + cursor[name])
                f.write(chunk)
                cursor[name] += len(chunk)
            for name, _, _ in grp.tensors:
                if cursor[name] != offsets[name][1]:
                    raise AssertionError(f"{name}: wrote {cursor[name] - offsets[name][0]} bytes, "
                                         f"expected {offsets[name][1] - offsets[name][0]}")


def _start_shard(path: Path, groups: list[_Group]) -> tuple[int, dict[str, tuple[int, int]]]:
    """Write the header of one safetensors file and size it; the data is filled in by ``_fill_groups`` (tensor
    offsets are fixed by the header, so groups can be generated in any order, or in parallel processes)."""
    raw, offsets = _shard_header([t for grp in groups for t in grp.tensors])
    total = max((end for _, end in offsets.values()), default=0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + total)
    return 8 + len(raw), offsets


def _fill_task(args) -> None:
    _fill_groups(*args)


def _write_json(path: Path, obj: dict, indent: int) -> None:
    """JSON as ``json.dump(obj, f, indent=indent)`` writes it (no trailing newline, like the golden files)."""
    path.write_text(json.dumps(obj, indent=indent))


def write_random_checkpoint(out_dir: str | Path, cfg: dict, seed: int, n_shards: int = 3,
                            layer_subset: Iterable[int] | None = None,
                            progress: Callable[[str], None] | None = None, workers: int = 1) -> Path:
    """Write a random checkpoint for HF config ``cfg`` (see ``hf_config_dict``) to ``out_dir`` in the official
    on-disk format; deterministic for a given ``seed`` (independent of ``n_shards``, ``layer_subset``, ``workers``).
    Returns the directory.

    ``layer_subset`` (main-layer indices; MTP block j = ``num_hidden_layers + j``) writes only those blocks plus the
    top-level tensors, e.g. to benchmark real V4-Flash layer shapes without writing 160 GB; ``config.json`` still
    describes the full model, so such a checkpoint is partial (``expected_tensors(cfg, layer_subset)`` lists it).
    Tensors are generated and written in 128-row strips, so memory stays at a few strips per process even for
    multi-GB tensors. ``workers > 1`` generates tensor groups in that many forked processes (each writes its own
    tensors' byte ranges). Cost is dominated by drawing normals: one V4-Flash layer (~3.7 GB, 96% FP4 experts)
    takes about 3 CPU-minutes (measured ~0.24 s per 2048x4096 expert matrix), so use ``workers`` ~ cores.
    ``progress`` (optional) is called with a shard's file name when its tensors start being written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _validate(cfg)
    groups = _all_groups(cfg, layer_subset)
    units = sorted({grp.unit for grp in groups})
    unit_bytes = {u: 0 for u in units}
    for grp in groups:
        unit_bytes[grp.unit] += sum(tensor_nbytes(dt, sh) for _, dt, sh in grp.tensors)
    part = dict(zip(units, _partition([unit_bytes[u] for u in units], n_shards)))
    weight_map: dict[str, str] = {}
    total = 0
    tasks = []
    for s in range(n_shards):
        fname = shard_file_name(s, n_shards)
        shard_groups = [grp for grp in groups if part[grp.unit] == s]
        base, offsets = _start_shard(out / fname, shard_groups)
        tasks += [(out / fname, base, offsets, [grp], seed) for grp in shard_groups]
        for name, (b, e) in offsets.items():
            weight_map[name] = fname
            total += e - b
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            last = None
            for task, _ in zip(tasks, pool.map(_fill_task, tasks, chunksize=4)):
                if progress is not None and task[0].name != last:
                    last = task[0].name
                    progress(last)
    else:
        last = None
        for task in tasks:
            if progress is not None and task[0].name != last:
                last = task[0].name
                progress(last)
            _fill_task(task)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out / "model.safetensors.index.json", index, indent=2)
    _write_json(out / "config.json", cfg, indent=2)
    _write_json(out / "generation_config.json", generation_config_dict(cfg), indent=2)
    (out / "inference").mkdir(exist_ok=True)
    _write_json(out / "inference" / "config.json", inference_config_dict(cfg), indent=4)
    return out


# ------------------------------------------------------------------------------------------------ readers
def read_safetensors_header(path: str | Path) -> tuple[dict, int]:
    """Parse a safetensors file header without reading the data: ``(header dict, byte offset of the data)``."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return header, 8 + n


class CheckpointReader:
    """Random access to the tensors of a sharded safetensors checkpoint directory: the index and each shard header
    are parsed once, tensor data is read through a read-only memory map (so multi-GB shards cost nothing)."""

    def __init__(self, ckpt_dir: str | Path):
        self.dir = Path(ckpt_dir)
        self.index = json.loads((self.dir / "model.safetensors.index.json").read_text())
        self.weight_map: dict[str, str] = self.index["weight_map"]
        self._shards: dict[str, tuple[dict, np.memmap]] = {}

    def _shard(self, fname: str) -> tuple[dict, np.memmap]:
        if fname not in self._shards:
            header, base = read_safetensors_header(self.dir / fname)
            self._shards[fname] = (header, np.memmap(self.dir / fname, dtype=np.uint8, mode="r", offset=base))
        return self._shards[fname]

    def names(self) -> list[str]:
        """All tensor names of the checkpoint, sorted."""
        return sorted(self.weight_map)

    def meta(self, name: str) -> tuple[str, tuple[int, ...]]:
        """``(safetensors dtype, shape)`` of one tensor."""
        m = self._shard(self.weight_map[name])[0][name]
        return m["dtype"], tuple(m["shape"])

    def __getitem__(self, name: str) -> np.ndarray:
        """The tensor as a numpy array of its on-disk dtype (``F8_E4M3`` -> ``float8_e4m3fn``, ``F8_E8M0`` ->
        ``float8_e8m0fnu``, ``I8`` -> int8, ``BF16`` -> ``bfloat16``, ...), copied out of the memory map."""
        header, data = self._shard(self.weight_map[name])
        m = header[name]
        b, e = m["data_offsets"]
        return np.array(data[b:e]).view(NUMPY_DTYPES[m["dtype"]]).reshape(m["shape"])


def load_tensor(ckpt_dir: str | Path, name: str) -> np.ndarray:
    """Read one tensor of a sharded checkpoint (see ``CheckpointReader``; use that class for many tensors)."""
    return CheckpointReader(ckpt_dir)[name]


def e8m0_to_float(scale: np.ndarray) -> np.ndarray:
    """e8m0 scale bytes (``float8_e8m0fnu`` or uint8) -> float32 ``2**(byte - 127)`` (exact)."""
    byte = np.asarray(scale).view(np.uint8).astype(np.int64)
    return np.ldexp(np.float32(1), byte - 127).astype(np.float32)


def dequantize_fp8(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``F8_E4M3 [out, in]`` + ``F8_E8M0 [ceil(out/128), ceil(in/128)]`` -> float32 (exact)."""
    w = np.asarray(weight).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    s = e8m0_to_float(scale)
    s = np.repeat(np.repeat(s, FP8_BLOCK, axis=0), FP8_BLOCK, axis=1)[: w.shape[0], : w.shape[1]]
    return w * s


def dequantize_fp4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``I8 [out, in/2]`` packed e2m1 (low nibble = even element) + ``F8_E8M0 [out, in/32]`` -> float32 (exact)."""
    u8 = np.asarray(packed).view(np.uint8)
    vals = np.stack([FP4_E2M1_VALUES[u8 & 0xF], FP4_E2M1_VALUES[u8 >> 4]], axis=-1).reshape(u8.shape[0], -1)
    return vals * np.repeat(e8m0_to_float(scale), FP4_BLOCK, axis=1)
