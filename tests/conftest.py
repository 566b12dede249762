"""Shared fixtures: the golden data folder (``../shared/golden`` next to the repo) and its tiny checkpoint."""

import os
from pathlib import Path

# 8 simulated CPU devices for the sharding tests; must be set before JAX starts its backends
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

import dsv4_jax  # noqa: E402, F401  (sets the numerics XLA flag before any JAX backend starts)

# programs compiled by one pytest worker are reused by the other (and by the next run on the same machine)
jax.config.update("jax_compilation_cache_dir", os.environ.get("DSV4_JAX_CACHE", "/tmp/dsv4-jax-test-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GOLDEN = Path(os.environ.get("DSV4_GOLDEN", SHARED / "golden" / "tiny"))  # DSV4_GOLDEN: another copy


def golden_path() -> Path:
    if not (GOLDEN / "ckpt" / "config.json").is_file():
        pytest.skip(f"golden data not found at {GOLDEN} (the repo must sit next to shared/)")
    return GOLDEN


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return golden_path()
