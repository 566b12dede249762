"""``scripts/generate.py`` as a new user meets it: every bad argument or input gives one paragraph naming the
argument, file or line at fault, the documented exit status (2 usage/input, 1 checkpoint/model) and no traceback
(``--debug`` shows it); the built-in model takes text and writes text; the README's Python snippets run.

Error cases run ``main(argv)`` in this process (no model is built for the ones found before loading, so nothing
compiles); the traceback check and the end-to-end run use a subprocess, as a user would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "generate.py"


def _load_cli():
    spec = importlib.util.spec_from_file_location("dsv4_generate_cli_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cli = _load_cli()


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """``main(argv)`` in this process (JAX's cache settings untouched): exit status, stdout, stderr."""
    try:
        code = cli.main([str(a) for a in argv], setup_cache=False)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_paragraph(err: str, *needles: str) -> str:
    """stderr ends with one ``generate.py: error: ...`` line that contains every needle; no traceback."""
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("generate.py: error: "), err
    for n in needles:
        assert n in last, f"{n!r} not in {last!r}"
    return last


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A small random checkpoint in the official format (vocabulary 512, two layers, no tokenizer.json)."""
    from dsv4_jax.convert.synthetic import hf_config_dict, write_random_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    write_random_checkpoint(path, hf_config_dict(vocab_size=512, num_hidden_layers=2), seed=0)
    return path


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("argv, needle", [
    (["--temperature", "-1"], "--temperature must be >= 0 (0 = greedy)"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--top-k", "-3"], "--top-k must be an int >= 0 (0 = off)"),
    (["--top-k", "2.5"], "'2.5' is not an int; --top-k must be"),
    (["--top-p", "0"], "--top-p must be in (0, 1] (1 = off)"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be an int >= 1"),
    (["--steps-per-call", "0"], "--steps-per-call must be an int >= 1"),
])
def test_sampling_arguments_out_of_range(capsys, argv, needle):
    code, out, err = run_main(capsys, *argv)
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("generate.py: error: argument ") and needle in last, err


def test_exclusive_prompt_sources(capsys, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("hi\n")
    code, _, err = run_main(capsys, "--prompt", "x", "--batch-file", f)
    assert code == 2
    assert_one_paragraph(err, "--prompt and --batch-file")


# ------------------------------------------------------------------------------------------ --batch-file
def test_batch_file_missing(capsys, tmp_path):
    missing = tmp_path / "nope.txt"
    code, _, err = run_main(capsys, "--batch-file", missing)
    assert code == 2
    assert_one_paragraph(err, f"--batch-file {missing}: no such file")


def test_batch_file_not_utf8(capsys, tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("first prompt\n\nthe caf\u00e9\n".encode("latin-1"))  # 0xe9 on line 3, column 8
    code, _, err = run_main(capsys, "--batch-file", f)
    assert code == 2
    assert_one_paragraph(err, f"--batch-file {f} line 3", "not valid UTF-8", "0xe9", "column 8")


def test_batch_file_blank(capsys, tmp_path):
    f = tmp_path / "blank.txt"
    f.write_text("\n   \n")
    code, _, err = run_main(capsys, "--batch-file", f)
    assert code == 2
    assert_one_paragraph(err, "no prompts")


def test_text_line_without_tokenizer(capsys, tiny_ckpt, tmp_path):
    f = tmp_path / "mixed.txt"
    f.write_text("0 5 7\nhello world\n")
    code, _, err = run_main(capsys, "--ckpt", tiny_ckpt, "--batch-file", f)
    assert code == 2
    assert_one_paragraph(err, f"--batch-file {f} line 2", "'hello world' is not a list of token ids",
                         "no tokenizer.json")
    code, _, err = run_main(capsys, "--ckpt", tiny_ckpt, "--chat", "--prompt", "hi")
    assert code == 2
    assert_one_paragraph(err, "--chat needs a tokenizer")


def test_token_id_outside_vocabulary(capsys, tiny_ckpt):
    code, _, err = run_main(capsys, "--ckpt", tiny_ckpt, "--prompt", "0 5 99999")
    assert code == 2
    assert_one_paragraph(err, "--prompt: token id 99999 (position 2)", "[0, 512)")


# ------------------------------------------------------------------------------------------ lengths
def test_prompt_longer_than_cache(capsys, tiny_ckpt):
    code, _, err = run_main(capsys, "--ckpt", tiny_ckpt, "--prompt", " ".join(["7"] * 20), "--max-len", "16",
                            "--max-new-tokens", "4")
    assert code == 2
    assert_one_paragraph(err, "--prompt: 20 prompt tokens + --max-new-tokens 4 = 24 exceeds --max-len 16; shorten "
                              "the prompt or raise --max-len")


def test_beyond_max_position_embeddings(capsys, tiny_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "short")
    conf = json.loads((ckpt / "config.json").read_text())
    conf["rope_scaling"].update(original_max_position_embeddings=16, factor=2)
    conf["max_position_embeddings"] = 32
    (ckpt / "config.json").write_text(json.dumps(conf))
    f = tmp_path / "rows.txt"
    f.write_text("0 1 2\n" + " ".join(["3"] * 30) + "\n")
    code, _, err = run_main(capsys, "--ckpt", ckpt, "--batch-file", f, "--max-new-tokens", "4")
    assert code == 2
    assert_one_paragraph(err, f"--batch-file {f} line 2: 30 prompt tokens + --max-new-tokens 4 = 34 exceeds the "
                              f"max_position_embeddings of {ckpt} (32); lower --max-new-tokens to 2")
    code, _, err = run_main(capsys, "--ckpt", ckpt, "--prompt", "0 1", "--max-len", "64")
    assert code == 2
    assert_one_paragraph(err, "--max-len 64 exceeds the max_position_embeddings", "(32)")


def test_builtin_max_len_beyond_max_position_embeddings(capsys):
    code, _, err = run_main(capsys, "--max-len", "2000000")
    assert code == 2
    assert_one_paragraph(err, "--max-len 2000000 exceeds the max_position_embeddings of the built-in model (1048576)")


# ------------------------------------------------------------------------------------------ checkpoints
def test_ckpt_missing(capsys, tmp_path):
    code, _, err = run_main(capsys, "--ckpt", tmp_path / "absent")
    assert code == 2
    assert_one_paragraph(err, f"--ckpt {tmp_path / 'absent'}: no such directory")


def test_ckpt_empty(capsys, tmp_path):
    code, _, err = run_main(capsys, "--ckpt", tmp_path)
    assert code == 1
    assert_one_paragraph(err, str(tmp_path), "empty")


def test_ckpt_missing_shard(capsys, tiny_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "partial")
    shard = sorted(ckpt.glob("model-*.safetensors"))[-1]
    shard.unlink()
    code, _, err = run_main(capsys, "--ckpt", ckpt, "--prompt", "0 1 2")
    assert code == 1
    assert_one_paragraph(err, shard.name)


def test_ckpt_partial_conversion(capsys, tiny_ckpt, tmp_path):
    """An interrupted ``dsv4-convert`` (every unit written but not the manifest, which comes last): the message says
    the conversion is incomplete and gives the command that finishes it."""
    from dsv4_jax.convert import layout
    from dsv4_jax.convert.writer import convert

    out = tmp_path / "conv"
    convert(tiny_ckpt, out)
    (out / layout.MANIFEST).unlink()
    code, _, err = run_main(capsys, "--ckpt", out, "--prompt", "0 1 2")
    assert code == 1
    assert_one_paragraph(err, str(out), "incomplete", "dsv4-convert")


@pytest.mark.parametrize("edit, needle", [
    (lambda text: "{", "not valid JSON"),
    (lambda text: text.replace('"hidden_size": 256', '"hidden_size": 256, "hidden_sizes": 3'), "hidden_sizes"),
    (lambda text: text.replace('"hidden_size": 256', '"hidden_size": "256"'), ""),
])
def test_bad_config(capsys, tiny_ckpt, tmp_path, edit, needle):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "badconf")
    text = json.dumps(json.loads((ckpt / "config.json").read_text()))
    assert '"hidden_size": 256' in text
    (ckpt / "config.json").write_text(edit(text))
    code, _, err = run_main(capsys, "--ckpt", ckpt, "--prompt", "0 1 2")
    assert code == 1
    assert_one_paragraph(err, str(ckpt / "config.json"), needle)


@pytest.mark.parametrize("name, content, needle", [
    ("tokenizer.json", "{", "cannot be loaded"),
    ("generation_config.json", '{"temperature": -2}', "temperature=-2"),
])
def test_bad_tokenizer_or_generation_config(capsys, tiny_ckpt, tmp_path, name, content, needle):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "badfile")
    (ckpt / name).write_text(content)
    code, _, err = run_main(capsys, "--ckpt", ckpt, "--prompt", "0 1 2")
    assert code == 1
    assert_one_paragraph(err, str(ckpt / name), needle)


def test_bad_tensor(capsys, tiny_ckpt, tmp_path):
    """A shard cut short: the message names the shard file (no compile happens: loading fails first)."""
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "trunc")
    shard = sorted(ckpt.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    code, _, err = run_main(capsys, "--ckpt", ckpt, "--prompt", "0 1 2")
    assert code == 1
    assert_one_paragraph(err, shard.name)


def test_unwritable_compile_cache(capsys, tiny_ckpt, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    # setup_cache=True: the folder is checked (and refused) before any JAX setting changes
    code = cli.main(["--ckpt", str(tiny_ckpt), "--prompt", "0 1", "--compile-cache", str(blocker / "sub")])
    _, err = capsys.readouterr()
    assert code == 2
    assert_one_paragraph(err, f"--compile-cache {blocker / 'sub'}: cannot write", "--compile-cache off")


def test_non_finite_logits_reported(capsys, tiny_ckpt, tmp_path, monkeypatch):
    """Generation raising ``NonFiniteError`` (rows, step) is one paragraph naming the batch-file line of the row."""
    from dsv4_jax.errors import NonFiniteError

    def broken(*args, **kwargs):
        raise NonFiniteError("non-finite logits in row 1 at step 3 (a NaN or Inf weight?)", rows=(1,), step=3)
        yield  # a generator, like generate_stream

    monkeypatch.setattr(cli.d, "generate_stream", broken)
    f = tmp_path / "rows.txt"
    f.write_text("0 1 2\n0 3 4\n")
    code, _, err = run_main(capsys, "--ckpt", tiny_ckpt, "--batch-file", f)
    assert code == 1
    assert_one_paragraph(err, "non-finite logits in row 1 at step 3", f"--batch-file {f} line 2")


def test_interrupt_exits_130(capsys, tiny_ckpt, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(cli.d, "generate_stream", interrupted)
    code, _, err = run_main(capsys, "--ckpt", tiny_ckpt, "--prompt", "0 1 2")
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "generate.py: interrupted"


def test_batch_rows_are_what_generate_gives(capsys, tiny_ckpt, tmp_path):
    """The printed rows of a batch (token ids: this checkpoint has no tokenizer) are exactly ``generate_stream``'s
    tokens for the same prompts, seed and sampling (same programs: compiled once in this process)."""
    import dsv4_jax as d

    rng = np.random.default_rng(3)
    prompts = [[0] + rng.integers(2, 512, n).tolist() for n in (2, 9, 5)]
    f = tmp_path / "ids.txt"
    f.write_text("\n".join(" ".join(map(str, p)) for p in prompts) + "\n")
    argv = ["--ckpt", tiny_ckpt, "--batch-file", f, "--numerics", "float32", "--max-new-tokens", "10", "--seed", "5",
            "--temperature", "0.8", "--top-k", "50", "--steps-per-call", "4"]
    code, out, err = run_main(capsys, *argv)
    assert code == 0, err
    cfg = d.Config.from_pretrained(tiny_ckpt, numerics="float32")
    stream = d.generate_stream(d.load_weights(tiny_ckpt, cfg), cfg, prompts, 10,
                               d.SamplingConfig(temperature=0.8, top_k=50), seed=5, max_len=128, steps_per_call=4)
    want = [[] for _ in prompts]
    for new in stream:
        for b, toks in enumerate(new):
            want[b] += toks
    assert all(len(w) >= 1 for w in want)
    for b, row in enumerate(want):
        assert f"[{b}] {' '.join(map(str, row))}" in out.splitlines(), out
    assert "decode " in err and "time to first token" in err and "batch 3, max_len 128" in err


# ------------------------------------------------------------------------------------------ as a user runs it
def _script(*argv, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, argv)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_traceback_only_with_debug(tmp_path):
    missing = tmp_path / "nope.txt"
    p = _script("--batch-file", missing)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == f"generate.py: error: --batch-file {missing}: no such file"
    p = _script("--batch-file", missing, "--debug")
    assert p.returncode != 0 and "Traceback" in p.stderr and "UserInputError" in p.stderr


def test_builtin_model_text_in_text_out(tmp_path):
    """The first thing a newcomer types: text goes in, (random) text comes out, with the warning and the timings.
    A second run with the same cache folder loads every program from it and writes the same text."""
    cache = tmp_path / "cache"
    argv = ("--prompt", "Hello", "--max-new-tokens", "12", "--compile-cache", cache)
    runs = [_script(*argv) for _ in range(2)]
    for p in runs:
        assert p.returncode == 0, p.stderr
        assert "RANDOM weights" in p.stderr and "time to first token" in p.stderr and "tok/s" in p.stderr
    lines = runs[0].stdout.splitlines()
    assert lines[0] == "prompt: <\uff5cbegin\u2581of\u2581sentence\uff5c>Hello", runs[0].stdout
    text = "\n".join(lines[1:])
    assert text.strip() and not re.fullmatch(r"[\d\s]+", text), text  # decoded text, not token ids
    assert runs[1].stdout == runs[0].stdout  # same seed, same weights, same tokens
    first = re.search(r"(\d+) programs: (\d+) from the cache, (\d+) compiled", runs[0].stderr).groups()
    second = re.search(r"(\d+) programs: (\d+) from the cache, (\d+) compiled", runs[1].stderr).groups()
    assert int(first[2]) > 0 and int(second[2]) == 0 and int(second[1]) == int(second[0]) > 0, (first, second)
    assert any(cache.iterdir())


def test_demo_head_holds_bf16_values():
    """The built-in model hands the head over as float32 (faster on CPU); its values must be exactly the bf16 ones,
    so the logits are those of the bf16 checkpoint tensor."""
    import jax.numpy as jnp

    from dsv4_jax.demo import demo_config, demo_weights

    cfg = demo_config(1000)
    w = demo_weights(cfg, seed=0)
    head = np.asarray(w.head)
    assert head.dtype == np.float32 and head.shape == (1000, cfg.dim)
    np.testing.assert_array_equal(np.asarray(jnp.asarray(head).astype(jnp.bfloat16).astype(jnp.float32)), head)
    assert np.abs(head).max() > 0


# ------------------------------------------------------------------------------------------ README
def readme_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


@pytest.mark.slow
def test_readme_python_snippets_run():
    """Every ```python block of README.md, in order, in one namespace (as a reader pastes them); conftest gives
    this process 8 CPU devices for the mesh snippet."""
    snippets = readme_snippets()
    assert len(snippets) >= 2
    ns: dict = {"__name__": "__readme__"}
    for i, src in enumerate(snippets):
        exec(compile(src, f"README.md python block {i}", "exec"), ns)
    logits = np.asarray(ns["logits"])
    assert logits.shape == (2, 4, ns["cfg"].vocab_size) and np.isfinite(logits).all()
