"""``scripts/gpu_session.sh``, the one script every device call runs, checked without a device: device time is
scarce (30 minutes a session), so a typo in a stage must fail here, not on the GPU.

* the script parses (``bash -n``);
* the stages its header lists are exactly the stages it handles;
* every benchmark variant it names exists: module constants (``dsv4_jax.kernels.mhc:FUSE_POST=True``: the module
  imports and has the attribute) and tile knobs (``DSV4_MOE_TILE=BN=8,num_warps=4``: each key is one the knob's
  reader accepts, :func:`dsv4_jax.kernels.env_tiles`);
* every test file and script it runs exists.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_session.sh"
TEXT = SCRIPT.read_text()


def test_script_parses():
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_listed_stages_are_the_handled_ones():
    header = re.search(r"#\s+stages: (.*?)\n#\s+\(", TEXT, re.S)
    assert header, "the header's stage list is missing"
    listed = set(header.group(1).replace("#", " ").split())
    handled = set(re.findall(r"^\s{4}(\w+)\)", TEXT, re.M))
    assert listed == handled, f"listed only: {sorted(listed - handled)}, handled only: {sorted(handled - listed)}"


def test_module_variants_exist():
    found = set(re.findall(r"(dsv4_jax\.kernels\.\w+):(\w+)=", TEXT))
    assert found, "no module variants found (the pattern no longer matches the script)"
    for module, attr in sorted(found):
        assert hasattr(importlib.import_module(module), attr), f"{module} has no {attr} (gpu_session.sh variant)"


def _tile_keys() -> dict[str, tuple[str, ...]]:
    from dsv4_jax.kernels import bf16_proj, fp4_moe, fp8_linear, indexer, indexer_prefill, mhc, router

    return {"DSV4_MOE_TILE": fp4_moe.TILE_KEYS, "DSV4_FP8_GEMV_TILE": fp8_linear.GEMV_TILE_KEYS,
            "DSV4_INDEX_TILE": indexer.SCORE_TILE_KEYS, "DSV4_MHC_TILE": mhc.TILE_KEYS,
            "DSV4_ROUTER_TILE": router.TILE_KEYS, "DSV4_PROJ_TILE": bf16_proj.TILE_KEYS,
            "DSV4_INDEX_PREFILL_TILE": indexer_prefill.PLAN_KEYS}


def test_tile_variants_use_known_keys():
    keys = _tile_keys()
    found = re.findall(r"(DSV4_[A-Z0-9_]+_TILE)=([A-Za-z0-9_=,]*)", TEXT)
    assert found, "no tile variants found (the pattern no longer matches the script)"
    for var, value in found:
        assert var in keys, f"gpu_session.sh sets {var}, which no kernel reads"
        for entry in filter(None, value.split(",")):
            key, _, val = entry.partition("=")
            assert key in keys[var] and val.lstrip("-").isdigit(), f"{var}={value!r}: {entry!r} is not a known KEY=INT"


def test_referenced_files_exist():
    paths = set(re.findall(r"\b((?:tests|scripts)/[\w/]+\.(?:py|sh))\b", TEXT))
    assert paths, "no files found (the pattern no longer matches the script)"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"gpu_session.sh runs files that do not exist: {missing}"
