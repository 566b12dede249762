"""``docs/knobs.md`` lists every knob: each ``DSV4_*`` environment variable the package, its tests and its scripts
read (found in their source), each key of each tile variable (the tuples the package checks them against), and each
module switch it names exists. A knob added without its line in the reference fails here."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_gpu_session import _tile_keys  # noqa: E402  (the tile variables and the key tuples each is checked against)

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
    for var, keys in _tile_keys().items():
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
