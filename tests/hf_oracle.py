"""Float32 oracle for tests: the PyPI ``transformers`` DeepSeek-V4 port run on an official-format checkpoint.

``hf_logits(ckpt_dir, tokens)`` loads the checkpoint directory (official HF-release layout: ``embed.weight``,
``layers.{i}.attn.wq_a.weight`` + ``.scale``, packed FP4 experts, ... as written by
``dsv4_jax.convert.synthetic.write_random_checkpoint`` or the golden ``tiny/ckpt``) into
``DeepseekV4ForCausalLM`` with ``FineGrainedFP8Config(dequantize=True)`` in float32 on CPU, runs ONE forward over
the whole ``[B, S]`` token array without a cache and returns the logits of every position ``[B, S, V]`` (float32).
``check_hf_load(ckpt_dir)`` proves the load is complete and exact (every non-MTP file tensor, dequantized with
numpy, equals the HF parameter it maps to, and every HF parameter/persistent buffer is covered).

What the HF model needs / does (transformers 5.24.0, ``models/deepseek_v4/modeling_deepseek_v4.py``):

* transformers >= 5.10.1 (first with the shared-expert SwiGLU clamp; 5.9.0 fixed the hc_post comb direction; 5.8.0
  has both bugs; older releases have no deepseek_v4) and a torch with ``float8_e8m0fnu`` (the ``F8_E8M0`` scales).
  ``load_hf_model`` raises ``RuntimeError`` otherwise.
* Attention is eager-only (``_supports_sdpa = _supports_flash_attn = _supports_flex_attn = False``), the sink needs
  the eager path; we pass ``attn_implementation="eager"`` explicitly. Experts are forced to the ``"eager"``
  implementation (the default may pick ``grouped_mm``; same math) so the per-expert loop is the one documented.
* Quantized weights: ``FineGrainedFP8Config(dequantize=True)`` renames ``X.scale`` -> ``X.weight_scale_inv`` and
  dequantizes FP8 (128x128 e8m0 blocks) and the packed FP4 experts (``I8``, low nibble first, 1x32 e8m0 blocks,
  block size inferred from the scale grid) exactly; ``dtype=torch.float32`` makes every parameter float32 (bf16
  weights are up-cast exactly). The 3 routed-expert tensors are merged into ``gate_up_proj [E, 2I, D]``
  (= ``cat(w1, w3)``) and ``down_proj [E, D, I]``.
* MTP weights (``mtp.*``) are silently ignored (``_keys_to_ignore_on_load_unexpected``): the port has no MTP block.
* Hash routing IS applied: ``layers.{i}.ffn.gate.tid2eid`` (I64) is loaded into ``mlp.gate.tid2eid`` and indexed
  with ``input_ids`` for ``i < num_hash_layers`` (so ``input_ids``, not ``inputs_embeds``, must be passed).
* The HF config loader folds the official fields: ``compress_ratios`` -> ``layer_types``, ``num_hash_layers`` ->
  ``mlp_layer_types``, ``qk_rope_head_dim`` -> ``partial_rotary_factor``, ``rope_scaling`` -> nested
  ``rope_parameters {"main": default theta 10000, "compress": yarn theta 160000, attention_factor 1.0}``,
  root ``expert_dtype`` -> ``quantization_config``. ``compress_ratios`` values other than 0/4/128 are rejected.
* ``use_cache=False``: every compressor then runs stateless over the whole prompt (complete windows only, fresh
  overlap state). A single prefill with ``use_cache=True`` gives identical logits (measured max |diff| 0.0).
* Structure checked against the spec (exploration on the golden tiny ckpt and a W=8 variant, S=300, B=2): the
  per-layer attention masks equal the reference index sets exactly (window ``j in (i-W, i]``; HCA entry w visible
  iff ``w < (i+1)//128``; CSA ``min(index_topk, (i+1)//4)`` causal picks), main compressor outputs (m=4 and 128)
  match a float64 re-implementation of spec section 7 (overlap halves, empty first window, ape, rope at ``w*m``)
  to 4e-6 relative, and the indexer picks (its own compressor, q rope, weighted relu scores, causal top-k) match a
  float64 re-implementation of spec section 8 except rows with exact ties (below).
* Numerics differ from the official code in float32 by rounding and by what the port leaves out: no FP8 activation
  quantization of GEMM inputs, no FP8 snapping of KV / compressed KV, no Hadamard + FP4 snapping in the indexer,
  routing weight applied after ``w2`` (linear, same math), eps ``1e-20`` in the router denominator.
* Indexer ties: with few indexer heads many blocks score exactly 0 (``relu`` kills every head), and once a query
  has more than ``index_topk`` complete blocks (``S > 4 * index_topk + 3``) torch's CPU ``topk`` breaks those ties
  in an unspecified order (13/600 rows differ from lowest-id-first on the golden tiny ckpt at S=300). For
  1e-4 comparisons use ``index_topk >= S // 4`` (every valid block selected) or many indexer heads.
* ``hf_logits`` runs torch with one thread by default (see its docstring).
"""

from __future__ import annotations

import contextlib
import functools
import re
from pathlib import Path

import numpy as np

MIN_TRANSFORMERS = "5.10.1"


def _require_versions() -> None:
    """Raise a clear error when the installed transformers/torch cannot run DeepSeek-V4 faithfully."""
    import torch
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise RuntimeError(
            f"transformers {transformers.__version__} is too old for the DeepSeek-V4 oracle: need >= "
            f"{MIN_TRANSFORMERS} (5.8.0 mixes hc streams with comb instead of comb^T and does not clamp the shared "
            "expert, 5.9.0 still lacks the clamp, < 5.8.0 has no deepseek_v4 at all)")
    if not hasattr(torch, "float8_e8m0fnu"):
        raise RuntimeError(f"torch {torch.__version__} has no float8_e8m0fnu (needed for the F8_E8M0 scales)")


def _cache_key(ckpt_dir: str | Path) -> tuple[str, float]:
    path = Path(ckpt_dir).resolve()
    return str(path), (path / "model.safetensors.index.json").stat().st_mtime


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, _mtime: float):
    import torch
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config
    from transformers.utils import logging as hf_logging

    _require_versions()
    hf_logging.disable_progress_bar()
    model, info = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=FineGrainedFP8Config(dequantize=True),
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",
        output_loading_info=True,
    )
    problems = {k: sorted(v) for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"transformers did not load {path} cleanly: {problems}")
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_hf_model(ckpt_dir: str | Path):
    """The float32, eval-mode ``DeepseekV4ForCausalLM`` for ``ckpt_dir`` (cached per directory and index mtime).

    Raises ``RuntimeError`` for too-old transformers/torch or when loading reports missing / unexpected /
    mismatched keys (MTP keys are ignored by the port itself and never reported)."""
    return _load_cached(*_cache_key(ckpt_dir))


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Temporarily run torch with ``n`` intra-op threads (``None``: leave the setting alone)."""
    import torch

    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def hf_logits(ckpt_dir: str | Path, tokens: np.ndarray, num_threads: int | None = 1) -> np.ndarray:
    """All-position float32 logits ``[B, S, V]`` of the transformers port for integer ``tokens [B, S]`` (or
    ``[S]``, treated as B=1): one forward over the whole sequence, no cache, no grad.

    ``num_threads`` (default 1) is the torch thread count during the call: the oracle runs tiny models, and on a
    shared CPU torch's OpenMP threads spin against other processes (measured: 8 s per tiny forward with 2 threads on
    2 busy cores vs 0.24 s with 1). Pass ``None`` to keep torch's own setting for large models."""
    import torch

    toks = np.asarray(tokens)
    if toks.ndim == 1:
        toks = toks[None]
    if toks.ndim != 2 or not np.issubdtype(toks.dtype, np.integer):
        raise ValueError(f"tokens must be an integer array [B, S], got {toks.dtype} {toks.shape}")
    with torch_threads(num_threads):
        model = load_hf_model(ckpt_dir)
        vocab = model.config.vocab_size
        if toks.size and (toks.min() < 0 or toks.max() >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab})")
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(toks.astype(np.int64)), use_cache=False)
    return out.logits.float().numpy()


# ------------------------------------------------------------------------------------------------ load check
_RENAMES = [  # official module path -> HF module path, applied in order to "<module path>." (note the final dot)
    (r"^layers\.(\d+)\.", r"model.layers.\1."),
    (r"\.attn_norm\.$", ".input_layernorm."), (r"\.ffn_norm\.$", ".post_attention_layernorm."),
    (r"\.attn\.indexer\.compressor\.", ".self_attn.compressor.indexer."),
    (r"\.attn\.indexer\.wq_b\.$", ".self_attn.compressor.indexer.q_b_proj."),
    (r"\.attn\.indexer\.weights_proj\.$", ".self_attn.compressor.indexer.scorer.weights_proj."),
    (r"\.attn\.", ".self_attn."), (r"\.ffn\.", ".mlp."),
    (r"\.wq_a\.$", ".q_a_proj."), (r"\.wq_b\.$", ".q_b_proj."), (r"\.wkv\.$", ".kv_proj."),
    (r"\.wgate\.$", ".gate_proj."), (r"\.wo_a\.$", ".o_a_proj."), (r"\.wo_b\.$", ".o_b_proj."),
    (r"\.q_norm\.$", ".q_a_norm."), (r"(compressor|indexer)\.norm\.$", r"\1.kv_norm."),
    (r"shared_experts\.w1\.$", "shared_experts.gate_proj."), (r"shared_experts\.w2\.$", "shared_experts.down_proj."),
    (r"shared_experts\.w3\.$", "shared_experts.up_proj."),
]
_LEAF_RENAMES = {"attn_sink": "sinks", "ape": "position_bias", "bias": "e_score_correction_bias"}
_TOP = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
        "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
        "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale"}


def hf_param_name(name: str) -> str:
    """HF state-dict name of an official (non-expert, non-MTP) tensor name, e.g. ``layers.2.attn.wq_a.weight`` ->
    ``model.layers.2.self_attn.q_a_proj.weight`` (written independently of transformers' conversion mapping)."""
    if name in _TOP:
        return _TOP[name]
    m = re.match(r"^(layers\.\d+)\.hc_(attn|ffn)_(fn|base|scale)$", name)
    if m:
        return f"model.{m[1]}.{m[2]}_hc.{m[3]}"
    module, leaf = name.rsplit(".", 1)
    module += "."
    for pat, rep in _RENAMES:
        module = re.sub(pat, rep, module)
    return module + _LEAF_RENAMES.get(leaf, leaf)


# ------------------------------------------------------------------------------------------------ numpy decoding
# The oracle's own decoding of the checkpoint formats (independent of dsv4_jax.modeling.quant): e2m1 code -> value.
E2M1_VALUES = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)


def e8m0_to_float(scale: np.ndarray) -> np.ndarray:
    """e8m0 scale bytes (``float8_e8m0fnu`` or uint8) -> float32 ``2**(byte - 127)`` (exact)."""
    byte = np.asarray(scale).view(np.uint8).astype(np.int64)
    return np.ldexp(np.float32(1), byte - 127).astype(np.float32)


def dequantize_fp8(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``F8_E4M3 [out, in]`` + ``F8_E8M0 [ceil(out/128), ceil(in/128)]`` -> float32 (exact)."""
    import ml_dtypes

    w = np.asarray(weight).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    s = np.repeat(np.repeat(e8m0_to_float(scale), 128, axis=0), 128, axis=1)[: w.shape[0], : w.shape[1]]
    return w * s


def dequantize_fp4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``I8 [out, in/2]`` packed e2m1 (low nibble = even element) + ``F8_E8M0 [out, in/32]`` -> float32 (exact)."""
    u8 = np.asarray(packed).view(np.uint8)
    vals = np.stack([E2M1_VALUES[u8 & 0xF], E2M1_VALUES[u8 >> 4]], axis=-1).reshape(u8.shape[0], -1)
    return vals * np.repeat(e8m0_to_float(scale), 32, axis=1)


def check_hf_load(ckpt_dir: str | Path) -> dict:
    """Verify that the HF model holds exactly the checkpoint: every non-MTP tensor of the files, dequantized here in
    numpy (FP8 128x128 and FP4 1x32 e8m0 blocks, bf16 up-cast), must equal the HF float32 parameter/buffer it maps
    to (routed experts: ``gate_up_proj[e] = cat(w1, w3)``, ``down_proj[e] = w2``), bit for bit, and every HF
    parameter and persistent buffer must be covered. Returns counts; raises ``AssertionError`` on any mismatch."""
    import torch

    from dsv4_jax.convert.synthetic import CheckpointReader

    ckpt = Path(ckpt_dir)
    with torch_threads(1):
        model = load_hf_model(ckpt)
    state = {k: v for k, v in model.state_dict().items()}
    reader = CheckpointReader(ckpt)
    names = reader.names()
    covered: set[str] = set()
    n_cmp = n_mtp = 0
    inter = model.config.moe_intermediate_size

    def compare(hf_name: str, want: np.ndarray, rows: slice | None = None, expert: int | None = None):
        nonlocal n_cmp
        if hf_name not in state:
            raise AssertionError(f"HF model has no tensor {hf_name}")
        got = state[hf_name]
        if expert is not None:
            got = got[expert]
        if rows is not None:
            got = got[rows]
        got = got.numpy() if got.dtype == torch.int64 else got.float().numpy()
        if got.shape != want.shape or not np.array_equal(got, want.astype(got.dtype)):
            diff = np.abs(got.astype(np.float64) - want).max() if got.shape == want.shape else "shape"
            raise AssertionError(f"{hf_name}: HF value differs from the checkpoint (max |diff| {diff}, "
                                 f"shapes {got.shape} vs {want.shape})")
        covered.add(hf_name)
        n_cmp += 1

    for name in names:
        if name.startswith("mtp."):
            n_mtp += 1
            continue
        if name.endswith(".scale") and not re.search(r"hc_(attn|ffn|head)_scale$", name):
            continue  # consumed with its weight
        raw = reader[name]
        if name.endswith(".weight") and raw.dtype.name in ("float8_e4m3fn", "int8"):
            scale = reader[name[: -len(".weight")] + ".scale"]
            value = dequantize_fp4(raw, scale) if raw.dtype == np.int8 else dequantize_fp8(raw, scale)
        elif raw.dtype == np.int64:
            value = raw
        else:
            value = raw.astype(np.float32)
        m = re.match(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight$", name)
        if m:
            base = f"model.layers.{m[1]}.mlp.experts."
            e, w = int(m[2]), m[3]
            if w == "w2":
                compare(base + "down_proj", value, expert=e)
            else:
                compare(base + "gate_up_proj", value, rows=slice(0, inter) if w == "w1" else slice(inter, None),
                        expert=e)
            continue
        compare(hf_param_name(name), value)
    missing = sorted(set(state) - covered)
    if missing:
        raise AssertionError(f"HF tensors not filled from the checkpoint: {missing[:10]} ({len(missing)})")
    return {"compared": n_cmp, "hf_tensors": len(state), "mtp_ignored": n_mtp}
