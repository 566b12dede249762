"""Random DeepSeek-V4 checkpoints written in the official HF-release on-disk format (numpy + ml_dtypes only).

Why: the JAX model is checked against oracles (the transformers port in float32, the official code) that all load
the *same* directory, so it must look exactly like a real release (spec section 12): FP8 e4m3 linears with 128x128
e8m0 block scales, routed experts as packed e2m1 FP4 (``I8 [out, in/2]``, low nibble = even element) with 1x32 e8m0
scales, an ``I64`` ``tid2eid`` per hash layer, the MTP block, sharded safetensors files and their index.

Nothing here declares a tensor: names, shapes and on-disk dtypes come from the one declaration table
(``dsv4_jax.modeling.weights``: ``weight_decls``, ``disk_tensors``), the FP8/FP4 packing from
``dsv4_jax.modeling.quant`` (``quantize_fp8_weight_np`` / ``quantize_fp4_weight_np``: scale ``2**e`` with ``e``
the smallest integer such that ``amax <= 448 * 2**e`` resp. ``6 * 2**e``, values rounded to nearest even). This
module adds the random values and the file layout; :func:`plan_checkpoint` gives the layout (files, headers,
offsets) without writing, and a test checks it against ``/work/shared/spec/tensor_inventory.json`` (real V4-Flash /
V4-Pro) tensor for tensor. Also: ``hf_config_dict`` (the HF ``config.json``, golden ``tiny`` values by default),
``inference_config_dict`` (official ``ModelArgs``), ``expected_tensors``, ``write_random_checkpoint`` (streams tensor
by tensor) and a numpy reader (``CheckpointReader``, ``load_tensor``).

Random values follow the golden ``tiny`` checkpoint's statistics (README section 3), chosen by the declaration's
``init`` (:func:`_linear_strips`, :func:`_plain_values`); each checkpoint entry has its own generator seeded by
``(seed, crc32(base name))``, so values do not depend on the shard layout or on ``layer_subset``. "Hot" SwiGLU
channels (``swiglu_in`` / ``swiglu_out``: expert rows x 8 / columns / 8) make ``swiglu_limit`` really clamp.

Files: ``config.json`` (HF fields, golden key order), ``generation_config.json``, ``inference/config.json``, shards
``model-0000i-of-0000N.safetensors`` (header metadata ``{"format": "pt"}``, tensors laid out as
``safetensors.torch.save_file`` does: dtype groups I64, F32, BF16, F8_E8M0, F8_E4M3, I8, then by name; header padded
with spaces to a multiple of 8) and ``model.safetensors.index.json`` (``metadata.total_size``, name-sorted
``weight_map``). The embedding goes to the first shard, ``head``/``norm``/``hc_head_*`` and the MTP block to the
last, main layers in order in between (a contiguous split that balances shard bytes). With the golden config and 3
shards the headers, offsets, index and config files are byte-identical to the golden tiny checkpoint's.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import multiprocessing
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from dsv4_jax.config import Config
from dsv4_jax.convert.safetensors_io import SafetensorsCheckpoint
from dsv4_jax.modeling.quant import quantize_fp4_weight_np, quantize_fp8_weight_np
from dsv4_jax.modeling.weights import Decl, disk_tensors, iter_decls, weight_decls

# ------------------------------------------------------------------------------------------------ format constants
DTYPE_ITEMSIZE = {"I64": 8, "F32": 4, "BF16": 2, "F8_E8M0": 1, "F8_E4M3": 1, "I8": 1}
# Order in which `safetensors` writes dtype groups (descending Rust `Dtype` enum), used for the data layout.
_DTYPE_WRITE_RANK = {"I64": 0, "F32": 1, "BF16": 2, "F8_E8M0": 3, "F8_E4M3": 4, "I8": 5}
NUMPY_DTYPES = {"I64": np.dtype("<i8"), "F32": np.dtype("<f4"), "BF16": np.dtype(ml_dtypes.bfloat16),
                "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
                "I8": np.dtype(np.int8)}
FP8_BLOCK = 128  # weight scale block (rows and columns) of the FP8 linears
FP4_BLOCK = 32  # weight scale block (columns) of the FP4 routed experts
_STRIP_ROWS = 128  # rows generated per random draw; fixed so that values do not depend on memory settings
_HOT_FRAC = {"fp8": 16, "fp4": 32}  # 1/16 of the shared expert's channels are hot, 1/32 of a routed expert's
_HOT_GAIN = 8.0

# ------------------------------------------------------------------------------------------------ configs
# Field set and key order of the golden tiny `ckpt/config.json` (itself the field set of the HF release).
_TINY_HF_CONFIG: dict = {
    "architectures": ["DeepseekV4ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
    "eos_token_id": 1, "expert_dtype": "fp4", "hc_eps": 1e-06, "hc_mult": 4, "hc_sinkhorn_iters": 20, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 256, "index_head_dim": 128, "index_n_heads": 4, "index_topk": 4,
    "initializer_range": 0.02, "max_position_embeddings": 1048576, "model_type": "deepseek_v4",
    "moe_intermediate_size": 256, "n_routed_experts": 8, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 4, "num_experts_per_tok": 2, "num_hidden_layers": 5, "num_hash_layers": 2,
    "num_key_value_heads": 1, "num_nextn_predict_layers": 1, "o_groups": 2, "o_lora_rank": 64, "q_lora_rank": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 65536,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus", "sliding_window": 16,
    "swiglu_limit": 10.0, "tie_word_embeddings": False, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.57.1", "use_cache": True, "vocab_size": 1024, "compress_rope_theta": 160000,
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
    release). The result is validated by :meth:`dsv4_jax.config.Config.from_hf_dict` (the model's own checks).
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
    _model_config(cfg)
    return cfg


def _model_config(cfg: dict) -> Config:
    """The model config of an HF ``config.json`` dict (``ValueError`` naming the field when it is inconsistent)."""
    return Config.from_hf_dict(cfg, source="synthetic checkpoint config")


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


# ------------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class _Group:
    """One checkpoint entry generated from one random stream: an FP8/FP4 weight with its scale, or one tensor."""

    key: str  # base name (one expert's name for stacked experts): the random stream and the shard unit
    decl: Decl
    tensors: tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, safetensors dtype, shape) as written
    unit: int  # sharding unit: 0 = embed, 1..n_layers = main layers, n_layers + 1 = head tail + MTP


def _block_of(key: str, n_layers: int) -> int | None:
    """Block index of a tensor (main layer i -> i, MTP block j -> n_layers + j); None for top-level tensors."""
    head, _, rest = key.partition(".")
    if head in ("layers", "mtp"):
        return int(rest.split(".", 1)[0]) + (n_layers if head == "mtp" else 0)
    return None


def _groups(cfg: Config, layer_subset: Iterable[int] | None) -> list[_Group]:
    """Every checkpoint entry in declaration order (top level, main layers, MTP), restricted to ``layer_subset``."""
    n_blocks = cfg.n_layers + cfg.n_mtp_layers
    keep = None if layer_subset is None else {int(i) for i in layer_subset}
    bad = sorted(i for i in (keep or ()) if not 0 <= i < n_blocks)
    if bad:
        raise ValueError(f"layer_subset entries {bad} outside [0, {n_blocks}) (MTP block j is layer "
                         "num_hidden_layers + j)")
    out = []
    for d in iter_decls(weight_decls(cfg)):
        block = _block_of(d.key, cfg.n_layers)
        if keep is not None and block is not None and block not in keep:
            continue
        unit = 0 if d.key == "embed.weight" else cfg.n_layers + 1 if block is None else min(block, cfg.n_layers) + 1
        out += [_Group(key, d, tuple(ts), unit) for key, ts in disk_tensors(d)]
    return out


def expected_tensors(cfg: dict, layer_subset: Iterable[int] | None = None) -> list[tuple[str, str, tuple[int, ...]]]:
    """``[(name, safetensors dtype, shape)]`` of an official DeepSeek-V4 checkpoint for the HF config ``cfg``, in
    declaration order (``dsv4_jax.modeling.weights``: top level, main layers, MTP; stacked experts expert by
    expert). ``layer_subset`` (layer indices, MTP block j = ``num_hidden_layers + j``) keeps only those blocks;
    top-level tensors are always listed."""
    return [t for g in _groups(_model_config(cfg), layer_subset) for t in g.tensors]


def tensor_nbytes(dtype: str, shape: Iterable[int]) -> int:
    """Bytes of a tensor in a safetensors file."""
    return DTYPE_ITEMSIZE[dtype] * math.prod(shape)


@dataclass(frozen=True)
class ShardPlan:
    """One safetensors file of a planned checkpoint: its header and where each tensor's bytes go."""

    file: str  # official name, e.g. model-00001-of-00003.safetensors
    header: bytes  # JSON, padded with spaces to a multiple of 8
    offsets: dict[str, tuple[int, int]]  # tensor name -> (begin, end) in the data section
    groups: tuple[_Group, ...]

    @property
    def data_start(self) -> int:
        return 8 + len(self.header)

    @property
    def data_bytes(self) -> int:
        return max((end for _, end in self.offsets.values()), default=0)


def plan_checkpoint(cfg: dict, n_shards: int = 3, layer_subset: Iterable[int] | None = None) -> list[ShardPlan]:
    """The files of the checkpoint :func:`write_random_checkpoint` writes for HF config ``cfg``: shard names,
    headers (names, dtypes, shapes, offsets) and the tensors of each, without generating or writing any data."""
    groups = _groups(_model_config(cfg), layer_subset)
    units = sorted({g.unit for g in groups})
    unit_bytes = dict.fromkeys(units, 0)
    for g in groups:
        unit_bytes[g.unit] += sum(tensor_nbytes(dt, sh) for _, dt, sh in g.tensors)
    part = dict(zip(units, _partition([unit_bytes[u] for u in units], n_shards)))
    plans = []
    for s in range(n_shards):
        mine = tuple(g for g in groups if part[g.unit] == s)
        header, offsets = _shard_header([t for g in mine for t in g.tensors])
        plans.append(ShardPlan(shard_file_name(s, n_shards), header, offsets, mine))
    return plans


# ------------------------------------------------------------------------------------------------ random values
def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode())])


def _linear_strips(g: _Group, rng: np.random.Generator, seed: int) -> Iterator[np.ndarray]:
    """Float32 row strips (``_STRIP_ROWS`` rows) of a random FP8/FP4 linear weight ``[out, inp]``: ``N(0,1)/sqrt(inp)``
    times ``2**U(-0.5,0.5)`` per (strip x scale-block columns) block; for expert weights 1/16 (shared expert) or
    1/32 (routed expert) of the intermediate channels are hot."""
    d = g.decl
    out, inp = d.shape
    col_block = FP8_BLOCK if d.kind == "fp8" else FP4_BLOCK
    row_gain = col_gain = None
    if d.init in ("swiglu_in", "swiglu_out"):  # hot channels: rows of w1/w3 times 8, columns of w2 divided by 8
        width = out if d.init == "swiglu_in" else inp
        hot_rng = _rng(seed, g.key.rsplit(".", 1)[0] + ".hot")  # e.g. layers.3.ffn.experts.7: one expert's w1/2/3
        gain = np.ones(width, np.float32)
        gain[hot_rng.choice(width, size=max(1, width // _HOT_FRAC[d.kind]), replace=False)] = (
            _HOT_GAIN if d.init == "swiglu_in" else 1 / _HOT_GAIN)
        row_gain, col_gain = (gain, None) if d.init == "swiglu_in" else (None, gain)
    std = np.float32(1 / math.sqrt(inp))
    nb = math.ceil(inp / col_block)
    for r0 in range(0, out, _STRIP_ROWS):
        r1 = min(out, r0 + _STRIP_ROWS)
        w = rng.standard_normal((r1 - r0, inp), dtype=np.float32) * std
        jitter_rows = 1 if d.kind == "fp8" else r1 - r0  # one 128-row block per strip, or 1x32 blocks
        jitter = np.exp2(rng.uniform(-0.5, 0.5, size=(jitter_rows, nb))).astype(np.float32)
        w *= np.repeat(jitter, col_block, axis=1)[:, :inp]
        if row_gain is not None:
            w *= row_gain[r0:r1, None]
        if col_gain is not None:
            w *= col_gain[None, :]
        yield w


def _plain_values(d: Decl, shape: tuple[int, ...], rng: np.random.Generator, cfg: Config) -> np.ndarray:
    """Float32 values of a plain (BF16 / F32) tensor, or of a 128-row strip of a BF16 matrix, by ``d.init``: ``norm``
    ``1 + 0.15 N`` clipped to [0.5, 1.5], ``hc_scale`` ``U(0.5, 1)``, else ``std * N(0,1)`` with ``std`` below
    (``hc_base``: +1 on the comb diagonal at the attn/ffn sites, not the heads)."""
    if d.init == "norm":
        return np.clip(1.0 + 0.15 * rng.standard_normal(shape, dtype=np.float32), 0.5, 1.5)
    if d.init == "hc_scale":
        return rng.uniform(0.5, 1.0, size=shape).astype(np.float32)
    fan_in = d.shape[-1]
    std = {"linear": 1 / math.sqrt(fan_in), "hc_fn": 1 / math.sqrt(fan_in), "head": 2 / math.sqrt(fan_in),
           "embed": 1.0, "normal": 1.0, "ape": 0.5, "bias": 0.2, "hc_base": 0.5}.get(d.init)
    if std is None:
        raise ValueError(f"{d.key}: no random recipe for initializer {d.init!r}")
    w = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    if d.init == "hc_base" and shape[0] > cfg.hc_mult:  # [pre(hc) | post(hc) | comb(hc*hc)]: comb diagonal +1
        hc = cfg.hc_mult
        w[2 * hc + np.arange(hc) * (hc + 1)] += 1.0
    return w


def _produce(g: _Group, seed: int, cfg: Config) -> Iterator[tuple[str, bytes]]:
    """Yield ``(tensor name, next chunk of its raw little-endian bytes)`` for every tensor of ``g``; the chunks of
    one tensor come in order, so a writer can stream them to the tensor's file offset."""
    rng = _rng(seed, g.key)
    d, names = g.decl, [t[0] for t in g.tensors]
    name, _, shape = g.tensors[0]
    if d.kind in ("fp8", "fp4"):
        quantize = quantize_fp8_weight_np if d.kind == "fp8" else quantize_fp4_weight_np
        for w in _linear_strips(g, rng, seed):
            q, s = quantize(w.astype(np.float64))  # float64: exact scale exponents for the float32 values
            yield names[0], q.tobytes()
            yield names[1], s.tobytes()
    elif d.kind == "i32":  # tid2eid: distinct expert ids per row (the first k of a random permutation)
        rows, k = shape
        n_exp = cfg.n_routed_experts
        chunk = max(1, (1 << 22) // n_exp)
        for r0 in range(0, rows, chunk):
            ids = np.argsort(rng.random((min(rows, r0 + chunk) - r0, n_exp)), axis=1)[:, :k]
            yield name, ids.astype("<i8").tobytes()
    elif d.kind == "bf16" and len(shape) == 2:  # matrices in strips (the embedding is vocab x dim)
        for r0 in range(0, shape[0], _STRIP_ROWS):
            strip = (min(shape[0], r0 + _STRIP_ROWS) - r0, shape[1])
            yield name, _plain_values(d, strip, rng, cfg).astype(ml_dtypes.bfloat16).tobytes()
    else:
        yield name, _plain_values(d, shape, rng, cfg).astype(NUMPY_DTYPES[g.tensors[0][1]]).tobytes()


# ------------------------------------------------------------------------------------------------ sharding / writing
def _partition(sizes: list[int], n_parts: int) -> list[int]:
    """Contiguous split of ``sizes`` into ``n_parts`` non-empty parts minimizing the largest part; returns the part
    index of every item (deterministic: among optimal splits, the earliest cut points)."""
    n = len(sizes)
    if not 1 <= n_parts <= n:
        raise ValueError(f"cannot split {n} sharding units (embed, layers, head+MTP) into {n_parts} shards")
    pre = [0, *itertools.accumulate(sizes)]
    best = {(0, 0): (0, 0)}  # (k, j) -> (largest part, last cut) of the best split of the first j items in k parts
    for k in range(1, n_parts + 1):
        for j in range(k, n - n_parts + k + 1):
            best[k, j] = min((max(best[k - 1, i][0], pre[j] - pre[i]), i) for i in range(k - 1, j)
                             if (k - 1, i) in best)
    parts, j = [0] * n, n
    for k in range(n_parts, 0, -1):
        i = best[k, j][1]
        parts[i:j] = [k - 1] * (j - i)
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


def _fill_task(args: tuple[Path, ShardPlan, _Group, int, Config]) -> None:
    """Generate one group and write each of its tensors' chunks at its offset in the (pre-sized) shard file."""
    path, plan, g, seed, cfg = args
    cursor = {name: plan.offsets[name][0] for name, _, _ in g.tensors}
    with open(path, "r+b") as f:
        for name, chunk in _produce(g, seed, cfg):
            f.seek(plan.data_start + cursor[name])
            f.write(chunk)
            cursor[name] += len(chunk)
    for name, _, _ in g.tensors:
        if cursor[name] != plan.offsets[name][1]:
            raise AssertionError(f"{path}: {name}: wrote {cursor[name] - plan.offsets[name][0]} bytes, expected "
                                 f"{plan.offsets[name][1] - plan.offsets[name][0]}")


def _write_json(path: Path, obj: dict, indent: int) -> None:
    """JSON as ``json.dump(obj, f, indent=indent)`` writes it (no trailing newline, like the golden files)."""
    path.write_text(json.dumps(obj, indent=indent))


def write_random_checkpoint(out_dir: str | Path, cfg: dict, seed: int, n_shards: int = 3,
                            layer_subset: Iterable[int] | None = None,
                            progress: Callable[[str], None] | None = None, workers: int = 1) -> Path:
    """Write a random checkpoint for HF config ``cfg`` (see ``hf_config_dict``) to ``out_dir`` (returned) in the
    official on-disk format; deterministic for a given ``seed`` (independent of ``n_shards``, ``layer_subset``,
    ``workers``). ``layer_subset`` (main-layer indices; MTP block j = ``num_hidden_layers + j``) writes only those
    blocks plus the top-level tensors (e.g. real V4-Flash layers without writing 160 GB; ``config.json`` still
    describes the full model). Tensors are generated in 128-row strips (memory: a few strips per process);
    ``workers > 1`` generates them in that many forked processes, each writing its tensors' byte ranges (one
    V4-Flash layer, ~3.7 GB, takes a few CPU-minutes). ``progress(shard file name)`` is called as shards fill."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = _model_config(cfg)
    plans = plan_checkpoint(cfg, n_shards, layer_subset)
    tasks = []
    for plan in plans:
        with open(out / plan.file, "wb") as f:  # header now, data filled in by the tasks at fixed offsets
            f.write(struct.pack("<Q", len(plan.header)))
            f.write(plan.header)
            f.truncate(plan.data_start + plan.data_bytes)
        tasks += [(out / plan.file, plan, g, seed, model) for g in plan.groups]
    with contextlib.ExitStack() as stack:
        if workers > 1:
            ctx = multiprocessing.get_context("fork")
            done = stack.enter_context(ProcessPoolExecutor(workers, mp_context=ctx)).map(_fill_task, tasks, chunksize=4)
        else:
            done = map(_fill_task, tasks)  # lazy: runs task by task in the loop below
        last = None
        for task, _ in zip(tasks, done):
            if progress is not None and task[0].name != last:
                last = task[0].name
                progress(last)
    weight_map = {name: plan.file for plan in plans for name in plan.offsets}
    total = sum(e - b for plan in plans for b, e in plan.offsets.values())
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
    """Random access to the tensors of a sharded safetensors checkpoint directory (validated by
    :class:`~dsv4_jax.convert.safetensors_io.SafetensorsCheckpoint`), each as a numpy array of its on-disk dtype."""

    def __init__(self, ckpt_dir: str | Path):
        self.dir = Path(ckpt_dir)
        self._ckpt = SafetensorsCheckpoint(self.dir)

    def names(self) -> list[str]:
        """All tensor names of the checkpoint, sorted."""
        return sorted(self._ckpt.tensors)

    def __getitem__(self, name: str) -> np.ndarray:
        """The tensor as a numpy array of its on-disk dtype (``F8_E4M3`` -> ``float8_e4m3fn``, ``F8_E8M0`` ->
        ``float8_e8m0fnu``, ``I8`` -> int8, ``BF16`` -> ``bfloat16``, ...), copied out of the memory map."""
        raw = self._ckpt.read(name)
        return np.array(raw).view(NUMPY_DTYPES[self._ckpt.tensors[name].dtype])


def load_tensor(ckpt_dir: str | Path, name: str) -> np.ndarray:
    """Read one tensor of a sharded checkpoint (see ``CheckpointReader``; use that class for many tensors)."""
    return CheckpointReader(ckpt_dir)[name]
