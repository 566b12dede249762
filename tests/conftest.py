"""Shared fixtures: the golden data folder (``../shared/golden`` next to the repo) and its tiny checkpoint."""

import os
from pathlib import Path

# 8 simulated CPU devices for the sharding tests; must be set before JAX starts its backends
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

import dsv4_jax  # noqa: E402, F401  (sets the numerics XLA flag before any JAX backend starts)

# programs compiled by a pytest worker are reused by the next run on the same machine. One folder per worker: JAX's
# on-disk cache aborted the process (a fatal error in get_executable_and_time) while two processes wrote and read the
# same entry (seen twice on 2026-11-29 with several test runs sharing one folder).
_worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.environ.get("DSV4_JAX_CACHE", "/tmp/dsv4-jax-test-cache"), _worker))
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
