"""``dsv4-convert`` never loses data and never reports a false success (issue 10).

* ``--overwrite`` deletes only the converter's own files; a source and an output directory that overlap (either way,
  through symlinks too) are refused with both paths named, before anything changes.
* An output that claims to be complete but is damaged (manifest, unit marker, array, plan, copied file) is reported,
  naming the damaged file, and repaired from the source: exit 0 only once it is complete again.
* ``--verify`` says what it compared (the stored bytes against the checksums recorded at conversion time);
  ``--verify-source`` re-reads the source and catches a shard changed since.
* A config field of the wrong JSON type names the file, the field and the expected type; the free-space refusal
  states its margin.

Every test checks the exit status, that the message names the file/field/path at fault, and that nothing outside
the converter's own files changed (a digest of the directory tree before and after). One conversion of the golden
tiny checkpoint per module is copied for each test.
"""

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import test_convert as tc

import dsv4_jax as d
from dsv4_jax.convert import layout
from dsv4_jax.convert.safetensors_io import CheckpointError

# the golden checkpoint, and one conversion of it per module (test_convert's fixtures)
src, converted, run_cli = tc.src, tc.converted, tc.run_cli


def digest(root: Path, skip=frozenset()) -> dict[str, str]:
    """Every path under ``root`` (relative) -> sha256 of its bytes, ``dir``, or its link target; paths in ``skip``
    left out."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if rel in skip:
                continue
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def writable_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    for p in [dst, *dst.rglob("*")]:
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


@pytest.fixture(scope="module")
def owned(converted):
    """Relative paths a conversion of the golden checkpoint writes (the converter's own files)."""
    return frozenset(digest(converted)) | {layout.LOCK}


@pytest.fixture
def conv(converted, tmp_path):
    """A copy of the module's conversion, with files of the user's own next to (and inside) the converter's."""
    out = writable_copy(converted, tmp_path / "out")
    (out / "notes.txt").write_text("my notes")
    (out / "mine").mkdir()
    (out / "mine" / "data.bin").write_bytes(bytes(range(256)))
    (out / "weights" / "README.user").write_text("kept inside weights/ too")
    return out


@pytest.fixture
def src_copy(src, tmp_path):
    return writable_copy(src, tmp_path / "src")


USER_FILES = ("notes.txt", "mine", "mine/data.bin", "weights/README.user")


def assert_user_files_intact(out: Path, before: dict) -> None:
    for rel in USER_FILES:
        assert (out / rel).exists(), f"{rel} was deleted"
    assert digest(out, before["skip"]) == before["tree"]


def snapshot(out: Path, owned: frozenset) -> dict:
    return {"skip": owned, "tree": digest(out, owned)}


# ------------------------------------------------------------------------------------------ 1. --overwrite
def test_overwrite_deletes_only_the_converters_files(src, src_copy, converted, owned, tmp_path, capsys):
    """A conversion of another source (with one more copied file) overwritten by the golden one: the old copied file
    goes (the converter wrote it), the user's files stay byte for byte, and the result equals a fresh conversion."""
    (src_copy / "tokenizer_extra.json").write_text("{}")
    cfg = json.loads((src_copy / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (src_copy / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert run_cli(capsys, src_copy, out)[0] == 0
    (out / "notes.txt").write_text("my notes")
    (out / "mine").mkdir()
    (out / "mine" / "data.bin").write_bytes(bytes(range(256)))
    (out / "weights" / "README.user").write_text("kept inside weights/ too")
    before = snapshot(out, owned | {"tokenizer_extra.json"})
    rc, err = run_cli(capsys, src, out)
    assert rc == 1 and "different checkpoint" in err and "only the converter's files" in err
    assert_user_files_intact(out, before)
    rc, err = run_cli(capsys, src, out, "--overwrite")
    assert rc == 0 and f"{out}: --overwrite: deleted the previous conversion" in err, err
    assert not (out / "tokenizer_extra.json").exists()
    assert_user_files_intact(out, before)
    assert digest(out, digest(out).keys() - owned) == digest(converted)  # the converter's part: a fresh conversion


def test_overwrite_with_unreadable_manifest_deletes_only_layout_paths(src, conv, converted, owned, capsys):
    """Without a readable manifest the converter cannot prove it wrote the copied files: only paths of its own layout
    (manifest, weights/plan.json, unit directories and markers) go; the copied files are overwritten in place."""
    (conv / layout.MANIFEST).write_text("{")
    (conv / "weights" / layout.PLAN).write_text("[")
    before = snapshot(conv, owned)
    rc, err = run_cli(capsys, src, conv)
    assert rc == 1 and f"{conv}: damaged conversion: " in err
    assert "weights/plan.json is unreadable" in err and "dsv4_manifest.json is unreadable" in err
    assert "--overwrite" in err
    assert_user_files_intact(conv, before)
    rc, err = run_cli(capsys, src, conv, "--overwrite")
    assert rc == 0 and "kept" in err and "notes.txt" in err, err
    assert_user_files_intact(conv, before)
    assert digest(conv, digest(conv).keys() - owned) == digest(converted)


@pytest.mark.parametrize("how", ["src_inside_out", "src_inside_out_via_symlink", "out_inside_src",
                                 "out_is_src_via_symlink"])
def test_overlapping_source_and_output_are_refused(src, converted, tmp_path, capsys, how):
    """``cp -r conv o; cp -r ckpt o/src; dsv4-convert o/src o --overwrite`` used to delete o/src."""
    if how.startswith("src_inside_out"):
        top = writable_copy(converted, tmp_path / "o")
        s = writable_copy(src, top / "src")
        o = top
        if how.endswith("symlink"):
            (tmp_path / "link").symlink_to(top, target_is_directory=True)
            o = tmp_path / "link"
        word = "contains"
    else:
        top = s = writable_copy(src, tmp_path / "ckpt")
        if how == "out_inside_src":
            o = writable_copy(converted, s / "conv")
            word = "lies inside"
        else:
            (tmp_path / "alias").symlink_to(s, target_is_directory=True)
            o = tmp_path / "alias"
            word = "is"
    before = digest(tmp_path)
    rc, err = run_cli(capsys, s, o, "--overwrite")
    assert rc == 1 and err.startswith("dsv4-convert: error: ") and "Traceback" not in err
    assert f"{o}: the output directory {word} the source directory {s}" in err, err
    assert str(top.resolve()) in err
    assert digest(tmp_path) == before  # nothing created, nothing deleted


# ------------------------------------------------------------------------------------------ 2. damaged output
def _corrupt_manifest(out):
    (out / layout.MANIFEST).write_text("{")
    return "dsv4_manifest.json: unreadable"


def _delete_marker(out):
    (out / "weights" / "layers.2.done.json").unlink()
    return "weights/layers.2.done.json: missing"


def _garbage_marker(out):
    (out / "weights" / "mtp.0.done.json").write_bytes(b"\xff\x00")
    return "weights/mtp.0.done.json: unreadable"


def _foreign_marker(out):
    f = out / "weights" / "layers.1.done.json"
    m = json.loads(f.read_text())
    m["plan_sha256"] = "0" * 64
    f.write_text(json.dumps(m))
    return "weights/layers.1.done.json: belongs to another conversion"


def _marker_lacks_a_checksum(out):
    f = out / "weights" / "top.done.json"
    m = json.loads(f.read_text())
    m["crc32"].pop("embed.weight")
    f.write_text(json.dumps(m))
    return "weights/top.done.json: does not hold one checksum per source tensor"


def _missing_chunk(out):
    (out / "weights" / "layers.3" / "attn.wq_b.q" / "c" / "0" / "0").unlink()
    return "weights/layers.3/attn.wq_b.q: 1 of 1 chunk file(s) missing"


def _missing_array(out):
    shutil.rmtree(out / "weights" / "layers.0" / "ffn.w2.scale")
    return "weights/layers.0/ffn.w2.scale/zarr.json: missing"


def _missing_copied_file(out):
    (out / "config.json").unlink()
    return "listed file(s) missing: config.json"


def _missing_plan(out):
    (out / "weights" / layout.PLAN).unlink()
    return "weights/plan.json: missing or unreadable"


@pytest.mark.parametrize("damage", [_corrupt_manifest, _delete_marker, _garbage_marker, _foreign_marker,
                                    _marker_lacks_a_checksum, _missing_chunk, _missing_array, _missing_copied_file,
                                    _missing_plan])
def test_damaged_output_is_reported_and_repaired(src, conv, converted, owned, capsys, damage):
    culprit = damage(conv)
    before = snapshot(conv, owned)
    rc, err = run_cli(capsys, src, conv)
    assert rc == 0 and "already holds" not in err, err
    assert f"{conv}: damaged conversion, repairing it from the source" in err and culprit in err, err
    assert "repaired: wrote" in err
    assert_user_files_intact(conv, before)
    assert digest(conv, digest(conv).keys() - owned) == digest(converted)  # repaired to the same bytes
    rc, err = run_cli(capsys, src, conv)
    assert rc == 0 and "already holds this complete conversion" in err


def test_loader_names_a_corrupted_manifest(conv):
    (conv / layout.MANIFEST).write_text("{")
    with pytest.raises(CheckpointError, match=r"dsv4_manifest.json: corrupted manifest .* repairs it"):
        d.load_weights(conv)


# ------------------------------------------------------------------------------------------ 3. --verify
def _flip_first_byte_of_a_tensor(ckpt: Path) -> tuple[str, Path]:
    """Change one data byte of a source tensor (the header, and so the source fingerprint, stay the same)."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    name = "layers.2.attn.wq_a.weight"
    shard = ckpt / index[name]
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    start = 8 + n + json.loads(data[8:8 + n])[name]["data_offsets"][0]
    data[start] ^= 0x01
    shard.write_bytes(bytes(data))
    return name, shard


def test_verify_says_what_it_compared_and_verify_source_rereads(src_copy, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(capsys, src_copy, out)[0] == 0
    name, shard = _flip_first_byte_of_a_tensor(src_copy)
    before_out, before_src = digest(out), digest(src_copy)
    rc, err = run_cli(capsys, src_copy, out, "--verify")
    assert rc == 0  # the stored bytes do equal what was converted ...
    assert "matches the source" not in err  # ... but that is not a statement about the source as it is now
    assert "equals the crc32 recorded from the source when it was converted" in err
    assert "the source was not re-read: --verify-source" in err
    rc, err = run_cli(capsys, src_copy, out, "--verify-source")
    assert rc == 1 and "verification failed for 1 tensor(s)" in err, err
    assert f"{name} in {shard}: the source changed since the conversion" in err
    assert digest(out) == before_out and digest(src_copy) == before_src  # verification writes nothing
    shard.write_bytes(_unflip(shard, name))
    rc, err = run_cli(capsys, src_copy, out, "--verify-source")
    assert rc == 0 and "every source tensor, re-read now, has that same crc32" in err


def _unflip(shard: Path, name: str) -> bytes:
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n + json.loads(data[8:8 + n])[name]["data_offsets"][0]] ^= 0x01
    return bytes(data)


# ------------------------------------------------------------------------------------------ 4. config types, space
@pytest.mark.parametrize("field,value,expected", [
    ("hidden_size", "256", "'hidden_size' is \"256\" (a string), expected an integer"),
    ("num_hidden_layers", 5.0, "'num_hidden_layers' is 5.0 (a floating-point number), expected an integer"),
    ("num_attention_heads", True, "'num_attention_heads' is true (a boolean), expected an integer"),
    ("compress_ratios", [0, 4, 128, 4, 128.0, 0], "'compress_ratios' is [0, 4, 128, 4, 128.0, 0] (a list), "
     "expected a list of integers"),
    ("rope_theta", "10000", "'rope_theta' is \"10000\" (a string), expected a number"),
    ("rope_scaling", {"type": "yarn", "factor": "16"}, "'rope_scaling.factor' is \"16\" (a string), expected a number"),
])
def test_config_field_of_the_wrong_type(src_copy, tmp_path, capsys, field, value, expected):
    cfg = json.loads((src_copy / "config.json").read_text())
    cfg[field] = value
    (src_copy / "config.json").write_text(json.dumps(cfg))
    before = digest(tmp_path)
    out = tmp_path / "out"
    rc, err = run_cli(capsys, src_copy, out)
    assert rc == 1 and "Traceback" not in err and "TypeError" not in err
    assert err.startswith(f"dsv4-convert: error: {src_copy / 'config.json'}: field {expected}"), err
    assert digest(tmp_path) == before and not out.exists()


def test_free_space_refusal_states_its_margin(src, converted, tmp_path, capsys, monkeypatch):
    from collections import namedtuple

    needed = json.loads((converted / layout.MANIFEST).read_text())["total_bytes"]
    margin = int(needed * 0.01) + (64 << 20)
    usage = namedtuple("usage", "total used free")
    free = needed + margin - 1  # one byte short of what the refusal says it needs
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 40, 0, free))
    out = tmp_path / "out"
    rc, err = run_cli(capsys, src, out)
    assert rc == 1 and f"{out}: not enough free disk space" in err
    assert (f"needs {needed / 1e9:.2f} GB more plus a safety margin of 1% + 64 MiB ({(needed + margin) / 1e9:.2f} "
            f"GB in all), {free / 1e9:.2f} GB are free") in err, err
    assert not list((out / "weights").glob("*.done.json")) and not (out / layout.MANIFEST).exists()


def test_overwrite_never_deletes_or_writes_through_a_symlinked_folder(src, conv, tmp_path, capsys):
    """OUT/inference replaced by a link to the user's folder: the manifest lists inference/config.json, but neither
    --overwrite nor the copy of the non-weight files may touch the linked folder: refused before any change."""
    mine = tmp_path / "my_inference"
    shutil.move(conv / "inference", mine)
    (conv / "inference").symlink_to(mine, target_is_directory=True)
    before = digest(mine)
    rc, err = run_cli(capsys, src, conv, "--overwrite")
    assert rc == 1 and f"{conv / 'inference'}: is a link to {mine}, outside the output directory" in err, err
    assert digest(mine) == before and (conv / "inference").is_symlink()
    assert (conv / layout.MANIFEST).is_file()  # refused before anything was deleted
