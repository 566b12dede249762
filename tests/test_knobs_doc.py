"""``docs/knobs.md`` lists every knob: each ``DSV4_*`` environment variable the package, its tests and its scripts
read (found in their source), each key of each tile variable (the tuples the package checks them against), and each
module switch it names exists. A knob added without its line in the reference fails here."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "knobs.md").read_text()


def _section(var: str) -> str:
    """The text of the ``### `VAR` ...`` section of the reference (up to the next heading)."""
    m = re.search(rf"^### `{var}`.*?(?=^##)", DOC, re.M | re.S)
    assert m, f"docs/knobs.md has no section for {var}"
    return m.group(0)


def test_every_environment_variable_is_listed():
    found = set()
    for path in [*(ROOT / "dsv4_jax").rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        found |= set(re.findall(r"[\"'](DSV4_[A-Z0-9_]+)[\"']", path.read_text()))
    assert len(found) >= 8, f"the pattern found only {sorted(found)}"
    missing = sorted(v for v in found if f"`{v}`" not in DOC)
    assert not missing, f"docs/knobs.md does not list {missing}"


def test_every_tile_key_is_listed():
    from dsv4_jax.kernels import bf16_proj, fp4_moe, fp8_linear, indexer, indexer_prefill, mhc, router

    tables = {"DSV4_MOE_TILE": fp4_moe.TILE_KEYS, "DSV4_FP8_GEMV_TILE": fp8_linear.GEMV_TILE_KEYS,
              "DSV4_INDEX_TILE": indexer.SCORE_TILE_KEYS, "DSV4_INDEX_PREFILL_TILE": indexer_prefill.PLAN_KEYS,
              "DSV4_MHC_TILE": mhc.TILE_KEYS, "DSV4_ROUTER_TILE": router.TILE_KEYS,
              "DSV4_PROJ_TILE": bf16_proj.TILE_KEYS}
    for var, keys in tables.items():
        text = _section(var)
        missing = [k for k in keys if f"`{k}`" not in text]
        assert not missing, f"docs/knobs.md, section {var}: keys {missing} not listed"


def test_module_switches_exist():
    found = re.findall(r"`(dsv4_jax\.kernels\.\w+)\.(\w+)`", DOC)
    found += [(m, a) for m, attrs in re.findall(r"`(dsv4_jax\.kernels\.\w+)\.(\w+(?:`, `\w+)+)`", DOC)
              for a in attrs.split("`, `")]
    assert len(found) >= 5, found
    for module, attr in found:
        assert hasattr(importlib.import_module(module), attr), f"docs/knobs.md names {module}.{attr}, which is gone"
