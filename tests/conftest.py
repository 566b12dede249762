"""Shared fixtures: the golden data folder (``../shared/golden`` next to the repo) and its tiny checkpoint."""

import os
from pathlib import Path

# 8 simulated CPU devices for the sharding tests; must be set before JAX starts its backends
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# One LLVM codegen thread per compile (no numeric effect). Pytest workers died in XLA's CPU compiler three times
# (2026-11-29/30: a segfault writing a compile-cache entry, then with the cache off an abort inside
# backend_compile_and_load, all in tests/test_speculative.py, which compiles the largest programs; not reproduced
# alone). Parallel codegen is the suspected race; on a 2-core machine running 2 workers it gains nothing.
if "xla_cpu_parallel_codegen_split_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ["XLA_FLAGS"] + " --xla_cpu_parallel_codegen_split_count=1").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

import dsv4_jax  # noqa: E402, F401  (sets the numerics XLA flag before any JAX backend starts)

# JAX's persistent compilation cache is OFF in the tests unless DSV4_JAX_CACHE names a folder (one subfolder per
# pytest worker). jaxlib 0.10.2 segfaulted while writing an entry (compilation_cache.put_executable_and_time, CPU,
# a speculative-decoding program) in two CI runs on 2026-11-29/30, and aborted reading an entry another process
# was writing when workers shared a folder; CI starts from an empty cache anyway.
if os.environ.get("DSV4_JAX_CACHE"):
    _worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.environ["DSV4_JAX_CACHE"], _worker))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
else:
    jax.config.update("jax_enable_compilation_cache", False)

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
