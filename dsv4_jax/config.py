"""Model configuration: a frozen, hashable dataclass built from the checkpoint's HF ``config.json``.

The config is a static argument of every jitted function, so it must be hashable (tuples, no lists) and must never
hold device state (no mesh). ``numerics`` decides the precision of the whole forward pass in one place:
``"reference"`` reproduces the official code (bf16 activations, FP8/FP4 activation simulations), ``"float32"`` runs
everything in float32 with the simulations off (the oracle mode). ``release`` selects the behaviour of the first
official release (``"initial"``: shared expert without SwiGLU clamp, KV FP8 snapping off) or the current one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax.numpy as jnp

NUMERICS = ("reference", "float32")
RELEASES = ("current", "initial")
MOE_DISPATCH = ("auto", "gather", "all_to_all")
KERNELS = ("auto", "reference", "triton")


@dataclasses.dataclass(frozen=True)
class Config:
    """DeepSeek-V4 hyper-parameters (official ``ModelArgs`` names) plus the runtime numerics switches."""

    vocab_size: int = 129280
    dim: int = 4096
    n_layers: int = 43
    n_mtp_layers: int = 1
    n_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4, 0)
    compress_rope_theta: float = 160000.0
    rope_theta: float = 10000.0
    original_seq_len: int = 65536
    rope_factor: float = 16.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    moe_inter_dim: int = 2048
    route_scale: float = 1.5
    n_hash_layers: int = 3
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    bos_token_id: int = 0
    eos_token_id: int = 1
    numerics: str = "reference"
    release: str = "current"
    # Reproduce torch's CPU bf16 rsqrt quirk (scalar tail loop rounds sqrt first) in the q per-head norm. Only for
    # comparing with the golden data, which the official code produced on CPU; GPUs round rsqrt correctly.
    cpu_rsqrt_tail: bool = False
    # How a mesh exchanges tokens with the routed experts: "gather" (every device sees all tokens, partial sums are
    # reduced), "all_to_all" (each token goes only to the devices owning its experts) or "auto" (all-to-all for
    # batches with at least one (token, expert) pair per expert on average when the mesh has more devices than a
    # token has experts, where it moves fewer bytes). Same results either way up to fp32 summation order.
    moe_dispatch: str = "auto"
    # Which implementation the hot ops use (``dsv4_jax.kernels``): "reference" (pure XLA: the spec, the CPU path),
    # "triton" (every Triton kernel through jax-triton; GPUs only) or "auto" (on GPUs with jax-triton, the kernels
    # validated on a GPU: FP8 linear, wo_a, FP4 MoE; the reference elsewhere and for sparse attention, whose kernel
    # has only run under the interpreter). Same function within fp32 summation order; with "auto" an H200 meets
    # golden criteria 1-3 (docs/performance.md, 2026-11-29). On a CPU "auto" is the reference, bit for bit.
    kernels: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when the hyper-parameters are inconsistent."""

        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"invalid DeepSeek-V4 config: {msg}")

        need(self.numerics in NUMERICS, f"numerics={self.numerics!r}, expected one of {NUMERICS}")
        need(self.release in RELEASES, f"release={self.release!r}, expected one of {RELEASES}")
        need(self.moe_dispatch in MOE_DISPATCH, f"moe_dispatch={self.moe_dispatch!r}, expected one of {MOE_DISPATCH}")
        need(self.kernels in KERNELS, f"kernels={self.kernels!r}, expected one of {KERNELS}")
        need(len(self.compress_ratios) == self.n_layers + self.n_mtp_layers,
             f"compress_ratios has {len(self.compress_ratios)} entries, expected n_layers + n_mtp_layers = "
             f"{self.n_layers + self.n_mtp_layers}")
        need(all(r in (0, 4, 128) for r in self.compress_ratios),
             f"compress_ratios must contain only 0, 4 or 128, got {sorted(set(self.compress_ratios))}")
        need(all(r == 0 for r in self.compress_ratios[self.n_layers:]), "MTP layers must have compress ratio 0")
        need(self.n_mtp_layers in (0, 1), f"n_mtp_layers={self.n_mtp_layers}: only 0 or 1 is supported")
        need(0 < self.rope_head_dim < self.head_dim and self.rope_head_dim % 2 == 0,
             f"rope_head_dim={self.rope_head_dim} must be even and smaller than head_dim={self.head_dim}")
        need(self.n_heads % self.o_groups == 0, f"n_heads={self.n_heads} not divisible by o_groups={self.o_groups}")
        need(self.n_shared_experts == 1, f"n_shared_experts={self.n_shared_experts}: the model has exactly one")
        need(0 < self.n_activated_experts <= self.n_routed_experts,
             f"n_activated_experts={self.n_activated_experts} must be in [1, n_routed_experts]")
        need(0 <= self.n_hash_layers <= self.n_layers, f"n_hash_layers={self.n_hash_layers} > n_layers")
        need(self.hc_mult >= 1 and self.hc_sinkhorn_iters >= 1, "hc_mult and hc_sinkhorn_iters must be >= 1")
        need(self.index_head_dim & (self.index_head_dim - 1) == 0,
             f"index_head_dim={self.index_head_dim} must be a power of two (Hadamard transform)")
        need(self.index_head_dim > self.rope_head_dim, "index_head_dim must exceed rope_head_dim")
        need((self.head_dim - self.rope_head_dim) % 64 == 0,
             f"head_dim - rope_head_dim = {self.head_dim - self.rope_head_dim} must be a multiple of 64 "
             "(KV FP8 simulation block)")
        need(self.index_head_dim % 32 == 0, "index_head_dim must be a multiple of 32 (FP4 simulation block)")
        need(self.window_size >= 1 and self.index_topk >= 1, "window_size and index_topk must be >= 1")

    # ------------------------------------------------------------------ derived
    @property
    def act_dtype(self):
        """Activation dtype: bf16 in reference numerics, fp32 in the float32 oracle mode."""
        return jnp.bfloat16 if self.numerics == "reference" else jnp.float32

    @property
    def simulate(self) -> bool:
        """Whether the FP8/FP4 activation simulations of the official kernels are on."""
        return self.numerics == "reference"

    @property
    def kv_fp8_sim(self) -> bool:
        """KV FP8 snapping: on in the current release, an identity in the initial one (spec 3.2)."""
        return self.simulate and self.release == "current"

    @property
    def shared_expert_clamp(self) -> bool:
        return self.release == "current"

    @property
    def max_position_embeddings(self) -> int:
        """Longest context the release supports: the YaRN-extended length ``original_seq_len * rope_factor``
        (1,048,576 for V4-Flash/Pro, the HF ``max_position_embeddings``)."""
        return int(self.original_seq_len * self.rope_factor)

    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    def ratio(self, layer: int) -> int:
        """Compress ratio of main layer ``layer`` (0 = window only, 4 = CSA, 128 = HCA); MTP layers follow."""
        return self.compress_ratios[layer]

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.n_hash_layers

    def with_(self, **kw) -> Config:
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ presets
    @classmethod
    def v4_flash(cls, **kw) -> Config:
        return cls(**kw)

    @classmethod
    def v4_pro(cls, **kw) -> Config:
        base = dict(dim=7168, n_layers=61, n_heads=128, q_lora_rank=1536, o_groups=16,
                    compress_ratios=(128, 128) + (4, 128) * 29 + (4, 0), index_topk=1024, n_routed_experts=384,
                    moe_inter_dim=3072, route_scale=2.5)
        base.update(kw)
        return cls(**base)

    @classmethod
    def tiny(cls, **kw) -> Config:
        """The golden tiny config: the three attention kinds, hash and learned routing, an MTP layer."""
        base = dict(vocab_size=1024, dim=256, n_layers=5, n_heads=4, head_dim=128, rope_head_dim=64, q_lora_rank=128,
                    o_groups=2, o_lora_rank=64, window_size=16, compress_ratios=(0, 4, 128, 4, 128, 0),
                    index_n_heads=4, index_head_dim=128, index_topk=4, n_routed_experts=8, n_activated_experts=2,
                    moe_inter_dim=256, route_scale=1.5, n_hash_layers=2)
        base.update(kw)
        return cls(**base)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides) -> Config:
        """Build a config from an HF ``config.json`` dict; unknown or inconsistent fields, and fields of the wrong
        JSON type (``"hidden_size": "256"``, ``"num_hidden_layers": 5.0``), raise ``ValueError`` naming ``source``
        and the field."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object of config fields, got {_json_kind(d)}")
        d = dict(d)
        unknown = sorted(set(d) - set(_HF_FIELDS) - set(_HF_IGNORED) - set(_HF_CHECKED))
        if unknown:
            raise ValueError(f"{source}: unknown config field(s) {unknown}; this loader knows the DeepSeek-V4 fields "
                             "only (refusing to guess what they mean)")
        _check_types(d, source)
        for key, want in _HF_CHECKED.items():
            try:
                ok = want(d[key]) if key in d else True
            except (AttributeError, TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"{source}: field {key}={d[key]!r} is not supported by DeepSeek-V4")
        missing = [k for k in _HF_REQUIRED if k not in d]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {missing}")
        kw: dict[str, Any] = {}
        for hf_name, ours in _HF_FIELDS.items():
            if hf_name in d and ours is not None:
                kw[ours] = d[hf_name]
        rs = d.get("rope_scaling") or {}
        unknown_rs = sorted(set(rs) - {"type", "rope_type", "factor", "original_max_position_embeddings",
                                        "beta_fast", "beta_slow"})
        if unknown_rs or rs.get("type", rs.get("rope_type", "yarn")) != "yarn":
            raise ValueError(f"{source}: unsupported rope_scaling {rs!r} (expected YaRN with factor, "
                             "original_max_position_embeddings, beta_fast, beta_slow)")
        for hf_name, ours in (("factor", "rope_factor"), ("original_max_position_embeddings", "original_seq_len"),
                              ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow")):
            if hf_name in rs:
                kw[ours] = rs[hf_name]
        kw["n_mtp_layers"] = d.get("num_nextn_predict_layers", 1)
        n_layers = kw["n_layers"]
        ratios = kw.get("compress_ratios")
        if ratios is None:
            raise ValueError(f"{source}: missing compress_ratios")
        if len(ratios) == n_layers:  # some configs omit the MTP entry
            ratios = list(ratios) + [0] * kw["n_mtp_layers"]
        kw["compress_ratios"] = tuple(ratios)
        if "max_position_embeddings" in d and d["max_position_embeddings"] < kw.get("original_seq_len", 0):
            raise ValueError(f"{source}: max_position_embeddings={d['max_position_embeddings']} is smaller than "
                             f"rope_scaling.original_max_position_embeddings={kw['original_seq_len']}")
        kw.update(overrides)
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> Config:
        """Read ``config.json`` from a checkpoint directory (official HF release or converted)."""
        p = Path(path)
        f = p / "config.json" if p.is_dir() else p
        if not f.is_file():
            raise FileNotFoundError(f"no config.json at {f}")
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(f), **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF ``config.json`` fields for this config (inverse of :meth:`from_hf_dict`)."""
        d: dict[str, Any] = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4"}
        for hf_name, ours in _HF_FIELDS.items():
            if ours is not None:
                v = getattr(self, ours)
                d[hf_name] = list(v) if isinstance(v, tuple) else v
        d["num_nextn_predict_layers"] = self.n_mtp_layers
        d["rope_scaling"] = {"type": "yarn", "factor": self.rope_factor,
                             "original_max_position_embeddings": self.original_seq_len,
                             "beta_fast": self.beta_fast, "beta_slow": self.beta_slow}
        d.update(num_key_value_heads=1, hidden_act="silu", scoring_func="sqrtsoftplus", norm_topk_prob=True,
                 topk_method="noaux_tc", tie_word_embeddings=False, expert_dtype="fp4",
                 quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "scale_fmt": "ue8m0", "weight_block_size": [128, 128]})
        return d

    def describe(self) -> str:
        kinds = {0: "SWA", 4: "CSA", 128: "HCA"}
        sched = " ".join(kinds[r] + ("#" if self.is_hash_layer(i) else "")
                         for i, r in enumerate(self.compress_ratios[: self.n_layers]))
        return (f"DeepSeek-V4 dim={self.dim} layers={self.n_layers} heads={self.n_heads} experts="
                f"{self.n_routed_experts}x{self.n_activated_experts} vocab={self.vocab_size} numerics={self.numerics} "
                f"release={self.release}\n  layers: {sched} (# = hash routed)")


# HF name -> Config field (None: accepted and validated elsewhere / informational)
_HF_FIELDS: dict[str, str | None] = {
    "vocab_size": "vocab_size", "hidden_size": "dim", "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads", "head_dim": "head_dim", "qk_rope_head_dim": "rope_head_dim",
    "q_lora_rank": "q_lora_rank", "o_groups": "o_groups", "o_lora_rank": "o_lora_rank",
    "sliding_window": "window_size", "compress_ratios": "compress_ratios",
    "compress_rope_theta": "compress_rope_theta", "rope_theta": "rope_theta", "index_n_heads": "index_n_heads",
    "index_head_dim": "index_head_dim", "index_topk": "index_topk", "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts", "num_experts_per_tok": "n_activated_experts",
    "moe_intermediate_size": "moe_inter_dim", "routed_scaling_factor": "route_scale",
    "num_hash_layers": "n_hash_layers", "swiglu_limit": "swiglu_limit", "hc_mult": "hc_mult",
    "hc_sinkhorn_iters": "hc_sinkhorn_iters", "hc_eps": "hc_eps", "rms_norm_eps": "norm_eps",
    "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
    "rope_scaling": None, "num_nextn_predict_layers": None, "max_position_embeddings": None,
}
_HF_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "compress_ratios")
# informational fields that do not change the computation
_HF_IGNORED = ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
               "initializer_range", "attention_dropout", "_name_or_path", "auto_map")


def _is(*values):
    """Accepts exactly one of ``values``, of the same JSON type (``true`` is not ``1``)."""
    return lambda v: any(type(v) is type(x) and v == x for x in values)


# ------------------------------------------------------------------------------------------ JSON field types
_KIND_TEXT = {"int": "an integer", "float": "a number", "str": "a string", "tuple[int, ...]": "a list of integers",
              "dict": "a JSON object"}
# HF fields that are not Config fields (or are nested in rope_scaling) -> their kind
_HF_EXTRA_KINDS = {"num_nextn_predict_layers": "int", "max_position_embeddings": "int", "rope_scaling": "dict|null",
                   "quantization_config": "dict", "rope_scaling.factor": "float",
                   "rope_scaling.original_max_position_embeddings": "int", "rope_scaling.beta_fast": "float",
                   "rope_scaling.beta_slow": "float", "rope_scaling.type": "str", "rope_scaling.rope_type": "str"}


def _json_kind(v) -> str:
    """How ``v`` reads in a JSON file."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    return {int: "an integer", float: "a floating-point number", str: "a string", list: "a list",
            dict: "a JSON object"}.get(type(v), type(v).__name__)


def _has_kind(v, kind: str) -> bool:
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if kind == "str":
        return isinstance(v, str)
    if kind == "tuple[int, ...]":
        return isinstance(v, (list, tuple)) and all(_has_kind(x, "int") for x in v)
    if kind == "dict|null":
        return v is None or isinstance(v, dict)
    return isinstance(v, dict)


def _check_types(d: dict, source: str) -> None:
    """Every known field of the HF dict ``d`` has the JSON type its Config field needs (bools are not integers,
    integers are accepted where a number is expected, lists where lists are expected); else one ``ValueError``
    naming the file, the field, its value and the expected type."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(Config)}
    want = {hf: kinds[ours] for hf, ours in _HF_FIELDS.items() if ours is not None}
    want.update(_HF_EXTRA_KINDS)
    items = list(d.items())
    if isinstance(d.get("rope_scaling"), dict):
        items += [(f"rope_scaling.{k}", v) for k, v in d["rope_scaling"].items()]
    for key, v in items:
        kind = want.get(key)
        if kind is not None and not _has_kind(v, kind):
            text = " or ".join(_KIND_TEXT.get(k, k) for k in kind.split("|"))
            raise ValueError(f"{source}: field {key!r} is {json.dumps(v)[:60]} ({_json_kind(v)}), expected {text}"
                             + (" (a finite one)" if kind == "float" and isinstance(v, float) else ""))


_HF_CHECKED: dict[str, Any] = {
    "num_key_value_heads": _is(1), "hidden_act": _is("silu"), "scoring_func": _is("sqrtsoftplus"),
    "norm_topk_prob": _is(True), "topk_method": _is("noaux_tc"), "tie_word_embeddings": _is(False),
    "attention_bias": _is(False), "expert_dtype": _is("fp4"),
    "quantization_config": lambda q: (q.get("quant_method") == "fp8" and q.get("fmt", "e4m3") == "e4m3"
                                      and list(q.get("weight_block_size", [128, 128])) == [128, 128]
                                      and q.get("scale_fmt", "ue8m0") == "ue8m0"),
}


def yarn_ramp_bounds(cfg: Config, base: float) -> tuple[int, int]:
    """YaRN correction range (spec 5): dims below ``lo`` keep their frequency, above ``hi`` are divided by factor."""
    dim = cfg.rope_head_dim

    def corr(n_rot):
        return dim * math.log(cfg.original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    lo = max(math.floor(corr(cfg.beta_fast)), 0)
    hi = min(math.ceil(corr(cfg.beta_slow)), dim - 1)
    return lo, hi
