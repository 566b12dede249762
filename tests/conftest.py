"""Shared fixtures: the golden data folder (``../shared/golden`` next to the repo) and its tiny checkpoint."""

from pathlib import Path

import pytest

import dsv4_jax  # noqa: F401  (sets the XLA flags before any JAX backend starts)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GOLDEN = SHARED / "golden" / "tiny"


def golden_path() -> Path:
    if not (GOLDEN / "ckpt" / "config.json").is_file():
        pytest.skip(f"golden data not found at {GOLDEN} (the repo must sit next to shared/)")
    return GOLDEN


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return golden_path()
