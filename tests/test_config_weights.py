"""Config parsing, full-size abstract shapes against the tensor inventory, and load_weights error reporting."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import dsv4_jax as d
from dsv4_jax.convert.safetensors_io import CheckpointError
from dsv4_jax.convert.synthetic import (
    V4_FLASH_HF_OVERRIDES,
    V4_PRO_HF_OVERRIDES,
    hf_config_dict,
    write_random_checkpoint,
)
from dsv4_jax.modeling.weights import checkpoint_tensors

INVENTORY = Path(__file__).resolve().parents[2] / "shared" / "spec" / "tensor_inventory.json"


def test_golden_config_reads_hf_fields(golden_dir):
    cfg = d.Config.from_pretrained(golden_dir / "ckpt")
    assert (cfg.dim, cfg.n_layers, cfg.window_size, cfg.n_hash_layers, cfg.route_scale) == (256, 5, 16, 2, 1.5)
    assert cfg.compress_ratios == (0, 4, 128, 4, 128, 0)
    assert cfg == d.Config.tiny()  # the preset is the golden config
    assert hash(cfg) == hash(d.Config.tiny())
    assert d.Config.from_pretrained(golden_dir / "ckpt", release="initial").release == "initial"


def test_presets_match_hf_configs():
    for preset, over in ((d.Config.v4_flash(), V4_FLASH_HF_OVERRIDES), (d.Config.v4_pro(), V4_PRO_HF_OVERRIDES)):
        assert d.Config.from_hf_dict(hf_config_dict(**over)) == preset
        assert d.Config.from_hf_dict(preset.to_hf_dict()) == preset


def test_config_refuses_unknown_and_inconsistent_fields():
    hf = hf_config_dict()
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['hiden_size'\]"):
        d.Config.from_hf_dict({**hf, "hiden_size": 3})
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        d.Config.from_hf_dict({**hf, "num_key_value_heads": 2})
    with pytest.raises(ValueError, match="compress_ratios has 4 entries"):
        d.Config.from_hf_dict({**hf, "compress_ratios": [0, 4, 128, 0]})
    with pytest.raises(ValueError, match="only 0, 4 or 128"):
        d.Config.from_hf_dict({**hf, "compress_ratios": [0, 4, 64, 4, 128, 0]})
    with pytest.raises(ValueError, match="not divisible by o_groups"):
        d.Config.tiny(o_groups=3)
    with pytest.raises(ValueError, match="numerics"):
        d.Config.tiny(numerics="fp16")


@pytest.mark.parametrize("field,value,message", [
    ("hidden_size", "256", "field 'hidden_size' is \"256\" (a string), expected an integer"),
    ("num_hidden_layers", 5.0, "field 'num_hidden_layers' is 5.0 (a floating-point number), expected an integer"),
    ("n_routed_experts", False, "field 'n_routed_experts' is false (a boolean), expected an integer"),
    ("compress_ratios", "0,4,128", "field 'compress_ratios' is \"0,4,128\" (a string), expected a list of integers"),
    ("rms_norm_eps", None, "field 'rms_norm_eps' is null (null), expected a number"),
    ("rope_scaling", [16], "field 'rope_scaling' is [16] (a list), expected a JSON object or null"),
    ("quantization_config", "fp8", "field 'quantization_config' is \"fp8\" (a string), expected a JSON object"),
    ("num_key_value_heads", True, "field num_key_value_heads=True is not supported"),
])
def test_config_field_types_are_checked(field, value, message):
    """Wrong JSON types name the file, the field and the expected type (bools are not integers); integers are fine
    where a number is expected."""
    hf = hf_config_dict()
    with pytest.raises(ValueError) as e:
        d.Config.from_hf_dict({**hf, field: value}, source="ckpt/config.json")
    assert str(e.value).startswith(f"ckpt/config.json: {message}"), str(e.value)
    assert d.Config.from_hf_dict({**hf, "rope_theta": 10000, "rms_norm_eps": 1e-6}) == d.Config.from_hf_dict(hf)
    with pytest.raises(ValueError, match="ckpt/config.json: expected a JSON object of config fields, got a list"):
        d.Config.from_hf_dict([hf], source="ckpt/config.json")


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        d.Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        d.Config.from_pretrained(tmp_path)


@pytest.mark.parametrize("name,make", [("flash", d.Config.v4_flash), ("pro", d.Config.v4_pro)])
def test_full_size_shapes_match_inventory(name, make):
    """jax.eval_shape of init_weights for the real configs: every tensor of tensor_inventory.json, exact shapes."""
    if not INVENTORY.is_file():
        pytest.skip(f"{INVENTORY} not found")
    inv = json.loads(INVENTORY.read_text())[name]
    cfg = make()
    expected = checkpoint_tensors(cfg)
    assert len(expected) == inv["n_tensors"]
    names = {n: (dt, tuple(s)) for n, dt, s in expected}
    for group in [inv["top"]] + [k["tensors"] for k in inv["per_kind"].values()]:
        for n, dt, shape in group:
            assert names[n] == (dt, tuple(shape)), n
    abstract = jax.eval_shape(lambda k: d.init_weights(cfg, k), jax.random.key(0))
    # the abstract tree mirrors the checkpoint: layer 3 w1 of all experts stacked, packed FP4
    assert abstract.layers[3].ffn.w1.packed.shape == (cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim // 2)
    assert abstract.layers[3].attn.wq_b.q.shape == (cfg.n_heads * cfg.head_dim, cfg.q_lora_rank)
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract))
    # same bytes as the checkpoint, up to tid2eid (I64 on disk, int32 here)
    tid = sum(np.prod(s) * 4 for n, _, s in expected if n.endswith("tid2eid"))
    assert nbytes + tid == inv["total_bytes"]


@pytest.fixture
def small_ckpt(tmp_path):
    hf = hf_config_dict(num_hidden_layers=2, compress_ratios=[4, 128, 0], num_hash_layers=1, vocab_size=256)
    return write_random_checkpoint(tmp_path / "ckpt", hf, seed=3, n_shards=2), hf


def test_load_weights_round_trip(small_ckpt):
    path, hf = small_ckpt
    cfg = d.Config.from_pretrained(path)
    w = d.load_weights(path)
    from dsv4_jax.convert.synthetic import load_tensor

    np.testing.assert_array_equal(np.asarray(w.layers[0].attn.wq_a.q).view(np.uint8),
                                  load_tensor(path, "layers.0.attn.wq_a.weight").view(np.uint8))
    np.testing.assert_array_equal(np.asarray(w.layers[1].ffn.w2.packed[3]),
                                  load_tensor(path, "layers.1.ffn.experts.3.w2.weight").view(np.uint8))
    np.testing.assert_array_equal(np.asarray(w.layers[0].ffn.tid2eid), load_tensor(path, "layers.0.ffn.gate.tid2eid"))
    assert w.mtp[0].e_proj.q.shape == (cfg.dim, cfg.dim)


def _rewrite_index(path, fn):
    idx = json.loads((path / "model.safetensors.index.json").read_text())
    fn(idx["weight_map"])
    (path / "model.safetensors.index.json").write_text(json.dumps(idx))


def test_load_errors_name_the_culprit(small_ckpt, tmp_path):
    path, hf = small_ckpt
    cfg = d.Config.from_pretrained(path)
    # config that does not match the tensors: all problems listed in one error
    wrong = cfg.with_(n_routed_experts=cfg.n_routed_experts * 2)
    with pytest.raises(CheckpointError, match=r"missing \(") as e:
        d.load_weights(path, wrong)
    assert "layers.0.ffn.experts.8.w1.weight" in str(e.value) and "gate.weight: BF16" in str(e.value)
    # a missing shard
    broken = tmp_path / "missing"
    shutil.copytree(path, broken)
    shard = sorted(broken.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: shard file is missing"):
        d.load_weights(broken)
    # a truncated shard
    trunc = tmp_path / "trunc"
    shutil.copytree(path, trunc)
    shard = sorted(trunc.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=f"{shard.name}: truncated file: tensor"):
        d.load_weights(trunc)
    # a corrupted header
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{]"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name}: corrupted header"):
        d.load_weights(bad)
    # an unexpected tensor in the index (mapped to a shard that lacks it)
    extra = tmp_path / "extra"
    shutil.copytree(path, extra)
    _rewrite_index(extra, lambda m: m.__setitem__("layers.0.bogus", next(iter(m.values()))))
    with pytest.raises(CheckpointError, match="layers.0.bogus"):
        d.load_weights(extra)
