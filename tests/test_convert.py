"""``dsv4-convert``: the golden tiny checkpoint converted, restored (one device and a mesh) bit for bit equal to the
official directory and reproducing the golden logits; every bad input refused before anything is written, with the
culprit named; interrupted or failed conversions never look finished and resume to the same bytes."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import test_golden as tg

import dsv4_jax as d
from dsv4_jax.convert import cli, layout, writer
from dsv4_jax.convert.safetensors_io import CheckpointError

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *args) -> tuple[int, str]:
    rc = cli.main([str(a) for a in args] + ["--quiet"])
    return rc, capsys.readouterr().err


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_pytree(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.sharding == y.sharding
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


@pytest.fixture(scope="module")
def src(golden_dir):
    return golden_dir / "ckpt"


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "out"
    assert cli.main([str(src), str(out), "--quiet"]) == 0
    return out


@pytest.fixture
def broken(src, tmp_path):
    """A writable copy of the golden checkpoint to damage."""
    dst = tmp_path / "src"
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    dst.chmod(0o755)
    return dst


# ------------------------------------------------------------------------------------------ happy path
def test_converted_equals_official_bit_for_bit(src, converted, capsys):
    cfg = d.Config.from_pretrained(src)
    official = d.load_weights(src, cfg)
    assert_same_pytree(d.load_weights(converted), official)  # config.json read from the converted directory
    with pytest.raises(CheckpointError, match=r"does not match the config:\n  layers.0.ffn.w1.packed: uint8"):
        d.load_weights(converted, cfg.with_(moe_inter_dim=512))
    manifest = json.loads((converted / layout.MANIFEST).read_text())
    assert manifest["total_bytes"] == sum(x.nbytes for x in jax.tree_util.tree_leaves(official))
    assert (converted / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()
    assert (converted / "inference" / "config.json").is_file()
    # stacked experts: one chunk (file) per expert, so expert-parallel restores read only their experts
    meta = json.loads((converted / "weights" / "layers.0" / "ffn.w1.packed" / "zarr.json").read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"][0] == 1 and meta["codecs"][0]["name"] == "bytes"
    # a second run finds it complete; --verify re-reads everything against the checksums recorded from the source
    rc, err = run_cli(capsys, src, converted, "--verify")
    assert rc == 0 and "already holds" in err and "equals the crc32 recorded from the source" in err
    assert "the source was not re-read" in err


def test_converted_reproduces_golden_logits(golden_dir, converted):
    cfg = tg._cfg(golden_dir)
    w = d.load_weights(converted, cfg)
    z = np.load(golden_dir / "cases" / "b1_len009.npz")
    mean, agree = tg.compare(tg.run_case(cfg, w, z), tg.golden_logits(z))
    assert mean <= 0.25 and agree >= 0.72, f"mean |dlogit| {mean:.3f}, argmax agreement {agree}"


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_restore_onto_a_mesh(src, converted):
    from dsv4_jax import sharding as sh

    cfg = d.Config.from_pretrained(src)
    mesh = sh.make_mesh(4, 2)
    ws = d.load_weights(converted, cfg, mesh=mesh)
    assert_same_pytree(ws, d.load_weights(src, cfg, mesh=mesh))
    w1 = ws.layers[0].ffn.w1.packed
    assert {s.data.shape[0] for s in w1.addressable_shards} == {cfg.n_routed_experts // 8}


# ------------------------------------------------------------------------------------------ bad inputs
def _rewrite_header(shard: Path, fn) -> None:
    """Edit a shard's header JSON in place, keeping its length (padding with spaces)."""
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    fn(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= n
    shard.write_bytes(data[:8] + raw + b" " * (n - len(raw)) + data[8 + n:])


def _shard_of(ckpt: Path, name: str) -> Path:
    return ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][name]


def _add_tensor_shard(ckpt: Path, name: str) -> None:
    """An extra shard holding one unexpected tensor, listed in the index."""
    body = np.zeros(16, np.uint8).tobytes()
    header = json.dumps({name: {"dtype": "BF16", "shape": [8], "data_offsets": [0, 16]}}).encode()
    header += b" " * (-len(header) % 8)
    (ckpt / "model-extra.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + body)
    idx = json.loads((ckpt / "model.safetensors.index.json").read_text())
    idx["weight_map"][name] = "model-extra.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(idx))


def _missing_shard(ckpt):
    shard = _shard_of(ckpt, "layers.2.attn.wq_a.weight")
    shard.unlink()
    return [shard.name, "shard file is missing"]


def _truncated(ckpt):
    shard = _shard_of(ckpt, "layers.2.attn.wq_a.weight")
    shard.write_bytes(shard.read_bytes()[:-1000])
    return [shard.name, "truncated file: tensor"]


def _corrupted_header(ckpt):
    shard = _shard_of(ckpt, "embed.weight")
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{]"
    shard.write_bytes(bytes(data))
    return [shard.name, "corrupted header"]


def _wrong_dtype(ckpt):
    name = "layers.1.attn.attn_sink"
    shard = _shard_of(ckpt, name)
    _rewrite_header(shard, lambda h: h[name].update(dtype="I32"))
    return [name, shard.name, "I32", "expected F32"]


def _wrong_shape(ckpt):
    name = "layers.2.attn.wq_a.weight"  # same byte count, transposed shape: only the shape check can catch it
    shard = _shard_of(ckpt, name)
    _rewrite_header(shard, lambda h: h[name].update(shape=h[name]["shape"][::-1]))
    return [name, shard.name]


def _config_mismatch(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["moe_intermediate_size"] = 512
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ["config.json", "layers.0.ffn.experts.0.w1.weight", "expected I8[512, 128]"]


def _unexpected_mtp_tensor(ckpt):
    _add_tensor_shard(ckpt, "mtp.0.emb.weight")
    return ["unexpected (1): mtp.0.emb.weight"]


def _no_config(ckpt):
    (ckpt / "config.json").unlink()
    return ["config.json: missing"]


@pytest.mark.parametrize("damage", [_missing_shard, _truncated, _corrupted_header, _wrong_dtype, _wrong_shape,
                                    _config_mismatch, _unexpected_mtp_tensor, _no_config])
def test_bad_input_is_refused_before_writing(broken, tmp_path, capsys, damage):
    culprits = damage(broken)
    out = tmp_path / "out"
    rc, err = run_cli(capsys, broken, out)
    assert rc == 1 and err.startswith("dsv4-convert: error: ") and "Traceback" not in err
    for c in culprits:
        assert c in err, f"{c!r} not named in: {err}"
    assert not out.exists()  # validation happens before anything is written


# ------------------------------------------------------------------------------------------ interruptions
def _process_report(pid: int) -> str:
    """Signal masks and per-thread kernel wait channels of a live process (Linux /proc), for a hang's diagnosis."""
    proc = Path(f"/proc/{pid}")
    try:
        lines = (proc / "status").read_text().splitlines()
        masks = [ln for ln in lines if ln.startswith(("SigBlk", "SigIgn", "SigCgt"))]
        waits = sorted({(t / "wchan").read_text() for t in (proc / "task").iterdir()})
        return f"{', '.join(masks)}; thread wait channels {waits}"
    except OSError as e:
        return f"no /proc report ({e})"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_kill_then_rerun_gives_the_same_bytes(src, converted, tmp_path, capsys, sig):
    out = tmp_path / "out"
    env = dict(os.environ, **{writer.TEST_DELAY_ENV: "30"})
    # `python -m dsv4_jax.convert` with Ctrl-C's handler installed as an interactive start has it: a suite started in
    # the background by a non-interactive shell (`nohup ... &`) runs with SIGINT ignored, a child inherits that, and
    # the signal was lost (seen: SigIgn 0x1001007 in a hung child's /proc status)
    main = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "sys.argv[0] = 'dsv4_jax.convert'; runpy.run_module('dsv4_jax.convert', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", main, str(src), str(out), "--quiet"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180  # generous: a loaded 2-core machine (other test workers) is slow
        while not (out / "weights" / "top.done.json").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "conversion never committed its first unit"
            time.sleep(0.05)
        # the next unit is under way (its writes overlap the first unit's); add junk: it must be redone on resume
        (out / "weights" / "layers.0").mkdir(exist_ok=True)
        (out / "weights" / "layers.0" / "junk").write_bytes(b"partial")
    finally:
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            why = _process_report(proc.pid)  # where it is stuck, and whether it ignores SIGINT (inherited SIG_IGN)
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"the converter did not exit within 180 s of {sig!r}; {why}; its stderr: {err[-2000:]}")
    if sig == signal.SIGINT:  # Ctrl-C: a clean message and exit status 130
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not (out / layout.MANIFEST).exists()
    with pytest.raises(CheckpointError, match="incomplete converted checkpoint"):
        d.load_weights(out)
    rc, err = run_cli(capsys, src, out)
    assert rc == 0 and "1 unit(s) kept from an earlier run" in err
    assert tree_bytes(out) == tree_bytes(converted)


def test_write_failure_leaves_no_finished_looking_output(src, converted, tmp_path, capsys, monkeypatch):
    """A write fails in the third unit: no manifest, and the units finished before it keep their markers, also when
    their commit (a filesystem sync) is still running at the failure (CI saw that race: the first unit's marker was
    missing; a slow sync makes it certain here)."""
    out = tmp_path / "out"
    calls = {"n": 0}
    real, real_sync = writer._crc, writer._sync_filesystem

    def failing_crc(a):  # the disk "fills up" in the middle of the third unit
        calls["n"] += 1
        if calls["n"] == 200:
            raise OSError(28, "No space left on device")
        return real(a)

    def slow_sync(path):
        time.sleep(1.0)
        real_sync(path)

    monkeypatch.setattr(writer, "_crc", failing_crc)
    monkeypatch.setattr(writer, "_sync_filesystem", slow_sync)
    rc, err = run_cli(capsys, src, out)
    assert rc == 1 and "No space left on device" in err
    assert not (out / layout.MANIFEST).exists() and (out / "weights" / "top.done.json").exists()
    monkeypatch.setattr(writer, "_crc", real)
    rc, err = run_cli(capsys, src, out)
    assert rc == 0 and "kept from an earlier run" in err
    assert tree_bytes(out) == tree_bytes(converted)


def test_space_check_and_lock(src, tmp_path, capsys, monkeypatch):
    import fcntl
    from collections import namedtuple

    out = tmp_path / "out"
    out.mkdir()
    with open(out / layout.LOCK, "a+") as f:  # another conversion holds the directory
        fcntl.flock(f, fcntl.LOCK_EX)
        rc, err = run_cli(capsys, src, out)
        assert rc == 1 and f"{out}: another dsv4-convert process is writing this directory" in err
        assert os.listdir(out) == [layout.LOCK] and (out / layout.LOCK).stat().st_size == 0  # nothing written
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 1 << 20))
    rc, err = run_cli(capsys, src, out)
    assert rc == 1 and "not enough free disk space" in err and "GB more" in err and "margin of 1% + 64 MiB" in err
    assert not (out / layout.MANIFEST).exists() and not list((out / "weights").glob("*.done.json"))


def test_damaged_output_is_caught(src, converted, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    chunk = out / "weights" / "layers.3" / "attn.wq_b.q" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0xFF
    chunk.write_bytes(bytes(data))
    rc, err = run_cli(capsys, src, out, "--verify")
    assert rc == 1 and "layers.3.attn.wq_b.weight" in err and "attn.wq_b.q" in err and "crc32" in err
    chunk.unlink()
    with pytest.raises(CheckpointError, match="layers.3.attn.wq_b.q"):
        d.load_weights(out)


def test_refuses_foreign_or_mismatched_output_dirs(src, broken, converted, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    rc, err = run_cli(capsys, src, foreign)
    assert rc == 1 and "not a dsv4-convert output" in err and (foreign / "notes.txt").exists()
    # a converted directory of another checkpoint: refused unless --overwrite
    other = tmp_path / "other"
    shutil.copytree(converted, other)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5  # same tensors, different model
    (broken / "config.json").write_text(json.dumps(cfg))
    rc, err = run_cli(capsys, broken, other)
    assert rc == 1 and "different checkpoint" in err
    rc, err = run_cli(capsys, broken, other, "--overwrite")
    assert rc == 0
    assert json.loads((other / "config.json").read_text())["rms_norm_eps"] == 1e-5


def _read_only(monkeypatch, root: Path) -> None:
    """Make ``root`` read-only for this process: permissions for a normal user; root ignores them, so there a
    read-only filesystem is simulated (EROFS from every Python-level create/write under ``root``)."""
    if os.geteuid() != 0:
        for p in [root, *root.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        return
    import builtins
    import errno

    real_open, real_mkdir = builtins.open, os.mkdir

    def refuse(path):
        if Path(os.fspath(path)).absolute().is_relative_to(root):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    def ro_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def ro_mkdir(path, *args, **kwargs):
        refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", ro_open)
    monkeypatch.setattr(os, "mkdir", ro_mkdir)


def test_read_only_output(src, converted, tmp_path, capsys, monkeypatch):
    """A read-only output: one line naming the path, exit 1, nothing changed; a complete conversion on a read-only
    medium can still be checked and verified."""
    ro = tmp_path / "ro"
    ro.mkdir()
    done = ro / "done"
    shutil.copytree(converted, done)
    before = tree_bytes(ro)
    _read_only(monkeypatch, ro)
    try:
        rc, err = run_cli(capsys, src, ro / "new")
        assert rc == 1 and "Traceback" not in err
        assert err.strip() in (f"dsv4-convert: error: {ro / 'new'}: {why}" for why in ("Read-only file system",
                                                                                       "Permission denied")), err
        rc, err = run_cli(capsys, src, done, "--verify")
        assert rc == 0 and "already holds this complete conversion" in err and "verified" in err
    finally:
        monkeypatch.undo()
        for p in [ro, *ro.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert tree_bytes(ro) == before and not (ro / "new").exists()


@pytest.mark.parametrize("case", ["src_missing", "out_is_a_file", "config_not_json"])
def test_bad_paths_are_one_line_errors(broken, tmp_path, capsys, case):
    out = tmp_path / "out"
    src = broken
    if case == "src_missing":
        src, culprit = tmp_path / "nosuch", f"{tmp_path / 'nosuch'}: checkpoint directory does not exist"
    elif case == "out_is_a_file":
        out.write_text("a file")
        culprit = f"{out}: exists and is not a directory"
    else:
        (broken / "config.json").write_text("{")
        culprit = f"{broken / 'config.json'}: not valid JSON"
    before = tree_bytes(tmp_path)
    rc, err = run_cli(capsys, src, out)
    assert rc == 1 and err.startswith(f"dsv4-convert: error: {culprit}") and err.count("\n") == 1, err
    assert tree_bytes(tmp_path) == before
