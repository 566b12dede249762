"""Generation safety (issue 10): non-finite logits are reported (row, step) instead of decoded as tokens; load-time
value checks name the tensor, file and index; ``max_len`` beyond the model's context is refused; every kind of
incomplete checkpoint directory is refused by ``check_checkpoint_dir`` with the way out.

Generation tests use the built-in tiny random model (``demo_model``, float32) with a fixed seed and the shapes of
``test_generate.py`` (batch 3, max_len 256, prefill chunk 64, 7 steps per stream call), so they share its compiled
programs. The faults are placed so that exactly one row meets them: layer 0 is hash-routed, so a ``tid2eid`` entry of
one token id decides which (possibly broken) expert that token reaches; the id is chosen among the tokens that only
one row ever feeds in the clean run. Oracle: the same request on the clean model; the broken run must give the other
rows exactly these tokens, the bad row exactly their prefix up to the failing step, and compile nothing new.
Checkpoint tests patch bytes of small copies of the golden tiny checkpoint (and of its conversion).
"""

import fcntl
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import dsv4_jax as d
from dsv4_jax import sharding as sh
from dsv4_jax.checkpoint import check_checkpoint_dir
from dsv4_jax.convert import cli, layout
from dsv4_jax.convert.safetensors_io import CheckpointError, SafetensorsCheckpoint
from dsv4_jax.errors import NonFiniteError, UserInputError
from dsv4_jax.generate import _check, compiled_programs, demo_model, prefill
from dsv4_jax.sampling import SamplingConfig

SEED = 1234
CHUNKS = (64,)
MAX_LEN = 256
LENS = (3, 21, 100)
NEW = 40
STEPS = 7
GREEDY = SamplingConfig.greedy()
BAD_ROW = 1


# ------------------------------------------------------------------------------------------ generation
@pytest.fixture(scope="module")
def model():
    cfg, w = demo_model(seed=SEED)
    rng = np.random.default_rng(SEED)
    prompts = [[cfg.bos_token_id] + rng.integers(2, cfg.vocab_size, n - 1).tolist() for n in LENS]
    return cfg, w, prompts


def gen(cfg, w, prompts, **kw):
    return d.generate(w, cfg, prompts, NEW, GREEDY, max_len=MAX_LEN, stop_tokens=(), prefill_chunks=CHUNKS, **kw)


def stream(cfg, w, prompts):
    return d.generate_stream(w, cfg, prompts, NEW, GREEDY, max_len=MAX_LEN, stop_tokens=(), prefill_chunks=CHUNKS,
                             steps_per_call=STEPS)


def with_layer0_moe(w, **changes):
    """``w`` with fields of layer 0's MoE (the hash-routed one) replaced."""
    layer0 = w.layers[0].replace(ffn=w.layers[0].ffn.replace(**changes))
    return w.replace(layers=(layer0,) + tuple(w.layers[1:]))


def fed_tokens(prompts, outs):
    """Per row, the token ids the model reads: the prompt, then every generated token but the last."""
    return [p + g[:-1] for p, g in zip(prompts, outs)]


@pytest.fixture(scope="module")
def nan_expert(model):
    """A model whose layer-0 expert ``e`` has NaN weights (e8m0 scale code 255) and is reached by one token id ``x``
    only, which only row ``BAD_ROW`` reads (first as its generated token ``s``, fed at step ``s + 1``).

    Returns (clean weights, broken weights, clean tokens, s)."""
    cfg, w, prompts = model
    moe = w.layers[0].ffn
    e = cfg.n_routed_experts - 1
    tid = np.asarray(moe.tid2eid)
    spare = (e + 1) % cfg.n_routed_experts
    tid = np.where(tid == e, np.where(tid == spare, (e + 2) % cfg.n_routed_experts, spare), tid)  # nobody reaches e
    clean_w = with_layer0_moe(w, tid2eid=jnp.asarray(tid))
    clean = gen(cfg, clean_w, prompts)
    fed = fed_tokens(prompts, clean)
    others = {t for b, f in enumerate(fed) if b != BAD_ROW for t in f}
    g = clean[BAD_ROW]
    own = fed[BAD_ROW]
    s = next(s for s in range(3, NEW - 2) if g[s] not in others and g[s] not in own[:len(prompts[BAD_ROW]) + s])
    x = g[s]
    tid[x] = [e, spare]
    broken = with_layer0_moe(w, tid2eid=jnp.asarray(tid), w1=moe.w1.replace(scale=moe.w1.scale.at[e].set(255)))
    return clean_w, broken, clean, s


def test_nan_weight_reported_for_one_row_at_its_step(model, nan_expert):
    cfg, _, prompts = model
    clean_w, broken, clean, s = nan_expert
    before = compiled_programs()
    with pytest.raises(NonFiniteError) as e:
        gen(cfg, broken, prompts)
    err = e.value
    assert err.rows == (BAD_ROW,) and err.step == s + 1 and err.steps == {BAD_ROW: s + 1}
    assert f"row {BAD_ROW} (prompt {BAD_ROW}) at step {s + 1}" in str(err)
    # nothing emitted from the NaN logits (no token 0): the bad row keeps its clean prefix, the others run to the end
    assert err.tokens[BAD_ROW] == clean[BAD_ROW][:s + 1]
    assert [t for b, t in enumerate(err.tokens) if b != BAD_ROW] == [t for b, t in enumerate(clean) if b != BAD_ROW]
    assert compiled_programs() == before  # same programs as the healthy run


def test_nan_weight_in_stream(model, nan_expert):
    cfg, _, prompts = model
    _, broken, clean, s = nan_expert
    items = []
    with pytest.raises(NonFiniteError) as e:
        for item in stream(cfg, broken, prompts):
            items.append(item)
    rows = [sum((item[b] for item in items), []) for b in range(len(prompts))]
    assert rows == e.value.tokens and e.value.rows == (BAD_ROW,) and e.value.step == s + 1
    assert rows[BAD_ROW] == clean[BAD_ROW][:s + 1] and rows[0] == clean[0] and len(items) > 1


def test_prefill_nan_from_out_of_range_tid2eid(model):
    """A ``tid2eid`` entry outside [0, n_routed_experts) for a token of one prompt only: that row's prefill logits
    are NaN (step 0, no token at all), the other rows are generated as with the clean model."""
    cfg, w, prompts = model
    clean = gen(cfg, w, prompts)
    fed = fed_tokens(prompts, clean)
    others = {t for b, f in enumerate(fed) if b != BAD_ROW for t in f}
    x = next(t for t in prompts[BAD_ROW][1:] if t not in others)
    tid = np.asarray(w.layers[0].ffn.tid2eid).copy()
    tid[x, 0] = cfg.n_routed_experts
    broken = with_layer0_moe(w, tid2eid=jnp.asarray(tid))
    with pytest.raises(NonFiniteError, match=f"row {BAD_ROW} \\(prompt {BAD_ROW}\\) at step 0") as e:
        gen(cfg, broken, prompts)
    assert e.value.rows == (BAD_ROW,) and e.value.step == 0 and e.value.tokens[BAD_ROW] == []
    assert [t for b, t in enumerate(e.value.tokens) if b != BAD_ROW] == [t for b, t in enumerate(clean) if b != BAD_ROW]
    items = []
    with pytest.raises(NonFiniteError):
        for item in stream(cfg, broken, prompts):
            items.append(item)
    assert items[0][BAD_ROW] == [] and all(item[BAD_ROW] == [] for item in items)


def test_every_row_bad(model):
    """A NaN in the final norm: every row fails at step 0; nothing is decoded (generate returns no garbage)."""
    cfg, w, prompts = model
    broken = w.replace(norm=w.norm.at[3].set(jnp.nan))
    with pytest.raises(NonFiniteError) as e:
        gen(cfg, broken, prompts)
    assert e.value.rows == (0, 1, 2) and e.value.step == 0 and e.value.tokens == [[], [], []]


def test_max_len_beyond_context_refused(model):
    cfg, w, _ = model
    small = cfg.with_(original_seq_len=64, rope_factor=2.0)  # context 128
    assert small.max_position_embeddings == 128
    before = compiled_programs()
    msg = ("max_len=256 exceeds the model's max_position_embeddings=128 .*rope_scaling.original_max_position_"
           "embeddings=64 x factor=2")
    with pytest.raises(UserInputError, match="generate: " + msg):
        d.generate(w, small, [[0, 5]], 4, GREEDY, max_len=256)
    with pytest.raises(UserInputError, match=msg):
        next(d.generate_stream(w, small, [[0, 5]], 4, GREEDY, max_len=256))
    with pytest.raises(UserInputError, match=msg):
        prefill(w, small, [[0, 5]], 4, GREEDY, max_len=256)
    with pytest.raises(UserInputError, match="init_state: " + msg):
        d.init_state(small, 1, 256)
    # default cache length: refused when prompt + new tokens exceed the context, else capped at it
    with pytest.raises(UserInputError, match=r"longest prompt \(100 tokens\) \+ max_new_tokens=40 = 140 tokens "
                                             r"exceeds"):
        d.generate(w, small, [[0] * 100], 40, GREEDY)
    assert _check(small, [[0] * 3], 120, None, CHUNKS)[1] == 128  # bucket_len(123) = 128
    assert _check(small.with_(original_seq_len=50), [[0] * 3], 60, None, CHUNKS)[1] == 100  # bucket 128 > 100
    # an explicit max_len shorter than a prompt + max_new_tokens (at the context limit: shorten the prompt)
    with pytest.raises(UserInputError, match=r"row 0 needs 100 prompt \+ 40 new tokens = 140 > max_len=128; lower "
                                             r"max_new_tokens to 28 or shorten the prompt"):
        d.generate(w, small, [[0] * 100], 40, GREEDY, max_len=128)
    assert compiled_programs() == before  # all refused before any compute


# ------------------------------------------------------------------------------------------ load-time checks
@pytest.fixture
def ckpt_copy(golden_dir, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(golden_dir / "ckpt", out)
    return out


def patch_official(path: Path, name: str, index: tuple, value) -> Path:
    """Write ``value`` at ``index`` of tensor ``name`` in a (copied) official checkpoint; returns the shard."""
    info = SafetensorsCheckpoint(path).tensors[name]
    a = np.memmap(info.file, np.uint8, "r+", offset=info.start, shape=(info.nbytes,))
    dt = {"I64": np.int64, "F8_E8M0": np.uint8, "BF16": ml_dtypes.bfloat16, "F32": np.float32}[info.dtype]
    a.view(dt).reshape(info.shape)[index] = value
    a.flush()
    return info.file


@pytest.mark.parametrize("name,index,value,says", [
    ("layers.0.ffn.gate.tid2eid", (5, 1), 8, r"hash-routing entry tid2eid\[5, 1\] = 8 \(an expert of token id 5\) "
                                             r"is outside \[0, n_routed_experts=8\)"),
    ("layers.1.ffn.gate.tid2eid", (7, 0), -1, r"hash-routing entry tid2eid\[7, 0\] = -1"),
    ("layers.2.ffn.experts.5.w2.scale", (1, 2), 255, r"e8m0 scale byte 255 .* at index \[1, 2\]"),
    ("layers.3.attn.wq_b.scale", (0, 0), 255, r"e8m0 scale byte 255 .* at index \[0, 0\]"),
    ("layers.1.attn_norm.weight", (7,), np.nan, r"non-finite value nan at index \[7\]"),
    ("layers.4.ffn.gate.bias", (2,), -np.inf, r"non-finite value -inf at index \[2\]"),
    ("hc_head_fn", (1, 9), np.inf, r"non-finite value inf at index \[1, 9\]"),
    ("layers.2.attn.attn_sink", (3,), np.inf, r"non-finite value inf at index \[3\]"),
], ids=["tid2eid-high", "tid2eid-neg", "expert-scale", "fp8-scale", "norm", "bias", "hc", "sink"])
def test_load_checks_name_tensor_file_index(ckpt_copy, name, index, value, says):
    shard = patch_official(ckpt_copy, name, index, value)
    with pytest.raises(CheckpointError, match=f"{shard}: tensor {name}: {says}"):
        d.load_weights(ckpt_copy)
    if name in ("layers.2.ffn.experts.5.w2.scale", "layers.2.attn.attn_sink"):
        # on a mesh the second device reads experts 4-7 / heads 2-3: the index is still the tensor's own
        with pytest.raises(CheckpointError, match=f"tensor {name}: {says}"):
            d.load_weights(ckpt_copy, mesh=sh.make_mesh(data=1, model=2, devices=jax.devices()[:2]))


@pytest.fixture(scope="module")
def converted(golden_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "out"
    assert cli.main([str(golden_dir / "ckpt"), str(out), "--quiet"]) == 0
    return out


@pytest.fixture
def conv_copy(converted, tmp_path):
    out = tmp_path / "conv"
    shutil.copytree(converted, out)
    return out


def test_load_checks_converted(conv_copy):
    # expert 5 of layers.2.ffn.w2.scale [8, 256, 8] is chunk c/5/0/0 (one chunk per expert), bytes [256, 8]
    chunk = conv_copy / "weights" / "layers.2" / "ffn.w2.scale" / "c" / "5" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[1 * 8 + 2] = 255
    chunk.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"ffn.w2.scale: tensor layers.2.ffn.experts.5.w2.scale: e8m0 scale "
                                              r"byte 255 .* at index \[1, 2\]"):
        d.load_weights(conv_copy)


# ------------------------------------------------------------------------------------------ directory checks
def test_check_checkpoint_dir_kinds(golden_dir, converted, tmp_path):
    assert check_checkpoint_dir(golden_dir / "ckpt") == "official"
    assert check_checkpoint_dir(converted) == "converted"
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    (tmp_path / "no_weights").mkdir()
    shutil.copy(golden_dir / "ckpt" / "config.json", tmp_path / "no_weights")
    for p, says in [(tmp_path / "missing", "no such directory"), (tmp_path / "file", "is a file, not a directory"),
                    (tmp_path / "empty", "the directory is empty"), (tmp_path / "other", "no config.json"),
                    (tmp_path / "no_weights", "has config.json but no model.safetensors.index.json and no ")]:
        with pytest.raises(CheckpointError, match=f"{p}: {says}"):
            check_checkpoint_dir(p)
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'missing'}: no such directory"):
        d.load_weights(tmp_path / "missing")  # load_weights runs the same check first


def test_official_with_missing_shards(ckpt_copy):
    (ckpt_copy / "model-00002-of-00003.safetensors").unlink()
    (ckpt_copy / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003.safetensors: shard file is missing: 2 of the 3 "
                                              r"shards listed in model.safetensors.index.json are absent "
                                              r"\(model-00002-of-00003.safetensors, model-00003-of-00003"):
        check_checkpoint_dir(ckpt_copy)
    (ckpt_copy / "model.safetensors.index.json").write_text("{")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: corrupted index"):
        check_checkpoint_dir(ckpt_copy)


def test_partial_conversion_says_how_to_finish(golden_dir, conv_copy):
    """What an interrupted ``dsv4-convert`` leaves: some unit markers, no config.json, no manifest (both are written
    at the end). The message counts the units and gives the exact command that resumes."""
    src = (golden_dir / "ckpt").resolve()
    (conv_copy / layout.MANIFEST).unlink()
    (conv_copy / "config.json").unlink()
    for unit in ("layers.3", "layers.4", "mtp.0"):
        (conv_copy / "weights" / f"{unit}.done.json").unlink()
    with pytest.raises(CheckpointError) as e:
        check_checkpoint_dir(conv_copy)
    msg = str(e.value)
    assert msg.startswith(f"{conv_copy}: incomplete converted checkpoint: 4 of 7 units converted")
    assert "no config.json yet" in msg and f"`dsv4-convert {src} {conv_copy}`" in msg and "resumes" in msg
    with open(conv_copy / layout.LOCK, "a+") as f:  # a converter is still at work
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(CheckpointError, match="is writing this directory right now"):
            d.load_weights(conv_copy)
    # the plan is gone too (killed before it was written): the command names SRC
    (conv_copy / "weights" / layout.PLAN).unlink()
    with pytest.raises(CheckpointError, match=r"`dsv4-convert SRC .*` \(SRC: the official checkpoint"):
        check_checkpoint_dir(conv_copy)


def test_damaged_conversion(golden_dir, conv_copy):
    src = (golden_dir / "ckpt").resolve()
    (conv_copy / "weights" / "layers.1.done.json").unlink()
    with pytest.raises(CheckpointError, match=f"damaged converted checkpoint: 1 of its 7 units lack their data or "
                                              f"marker .*layers.1.* Run `dsv4-convert {src} {conv_copy}` again: it "
                                              "rewrites what is missing"):
        check_checkpoint_dir(conv_copy)
    (conv_copy / layout.MANIFEST).write_text("{")
    with pytest.raises(CheckpointError, match=f"{layout.MANIFEST}: corrupted manifest .* a damaged converted "
                                              f"checkpoint. To load it, rerunning `dsv4-convert {src} {conv_copy}` "
                                              "repairs it"):
        check_checkpoint_dir(conv_copy)
    (conv_copy / "weights" / layout.PLAN).unlink()  # source unknown: the converter needs --overwrite
    with pytest.raises(CheckpointError, match=r"plan is lost too: running `dsv4-convert SRC .*` \(SRC: .*\) with "
                                              "--overwrite"):
        check_checkpoint_dir(conv_copy)
    (conv_copy / layout.MANIFEST).write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a dsv4-jax converted checkpoint manifest"):
        d.load_weights(conv_copy)
