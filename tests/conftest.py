"""Shared fixtures: the golden data folder (``../shared/golden`` next to the repo) and its tiny checkpoint."""

import gc
import os
import platform
from pathlib import Path

# 8 simulated CPU devices for the sharding tests; must be set before JAX starts its backends
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# One LLVM codegen thread per compile (no numeric effect; on a 2-core machine running 2 workers it gains nothing).
if "xla_cpu_parallel_codegen_split_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ["XLA_FLAGS"] + " --xla_cpu_parallel_codegen_split_count=1").strip()

# One instruction set for XLA's CPU code on every test machine, so that a run's numbers do not depend on the host:
# the golden end-to-end test (criterion 2) is statistical over a model that is chaotic at the bit level, and its
# short-prompt pool sits at the README's bound. Measured on one 2-core AMD EPYC (AVX2, 2026-12-02), current release,
# short pool argmax agreement (bound >= 0.84): native AVX2 + FMA codegen 0.830 (fails by one token of 100), AVX
# 0.870, SSE4.2 0.840; the sessions before ran on hosts whose codegen passed. AVX (no FMA contraction) is on every
# x86-64 CI host of the last decade. DSV4_TEST_ISA overrides it ("native": XLA's own choice).
_isa = os.environ.get("DSV4_TEST_ISA", "AVX" if platform.machine().lower() in ("x86_64", "amd64") else "native")
if _isa != "native" and "xla_cpu_max_isa" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ["XLA_FLAGS"] + f" --xla_cpu_max_isa={_isa}").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

import dsv4_jax  # noqa: E402, F401  (sets the numerics XLA flag before any JAX backend starts)

# JAX's persistent compilation cache is OFF in the tests unless DSV4_JAX_CACHE names a folder. scripts/test.sh (CI)
# sets it to a fresh empty folder per run, shared by the pytest workers: a program compiled by one test is loaded, not
# recompiled, by any later test that builds it, in either worker (the same executable: same results). A size limit
# turns on JAX's file lock around every read and write of an entry: without it a worker once read an entry another
# was still writing and aborted (b06376c), which is why each worker had its own folder until 2026-12-01.
# Programs that compile in 0.2 s or more are cached (JAX's default is 1 s): the random-weight programs of
# ``init_weights`` (one per leaf shape and config, ~0.3-1 s each, 160 in a run) and the state constructors recur
# across modules and workers. Measured on the 2-core machine: writing an entry costs ~17 % of a small program's
# compile, loading one saves ~80 %; the tiny eager-op programs below 0.2 s stay uncached.
if os.environ.get("DSV4_JAX_CACHE"):
    jax.config.update("jax_compilation_cache_dir", os.environ["DSV4_JAX_CACHE"])
    jax.config.update("jax_compilation_cache_max_size", 16 * 2**30)  # never reached in a run; enables the lock
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
else:
    jax.config.update("jax_enable_compilation_cache", False)

# Module order for the 2 pytest workers (scripts/test.sh: --dist loadscope --no-loadscope-reorder: a module runs
# whole on one worker, so its module fixtures, e.g. the interpreter subprocesses, run once): longest first, each
# module to the worker that frees up first, so that the run ends on short modules. test_golden comes first: the
# programs it compiles are loaded from the shared compile cache by test_state_formats and test_convert, which run
# later. Seconds per module measured on the 2-core CI machine (2026-12-02, both workers busy, after the cuts of that
# day; ~1880 s in all, ~940 s per worker); unknown modules go last.
MODULE_ORDER = ("test_golden", "test_speculative", "test_sharding", "test_generate", "test_cli", "test_state_formats",
                "test_kernels_sm90", "test_kernels_golden", "test_consistency", "test_kernels_fp8", "test_on_mesh",
                "test_indexer_blocked", "test_kernels_fp4_moe", "test_kernels_fp4_moe_mma", "test_kernels_sparse_attn",
                "test_kernels_indexer", "test_kernels_mhc", "test_kernels_compressor", "test_moe_dispatch",
                "test_generate_safety", "test_convert_hardening", "test_convert", "test_oracle_hf",
                "test_kernels_attn_proj", "test_kernels_indexer_query", "test_quant", "test_sampling",
                "test_synthetic_ckpt", "test_kernels_hadamard", "test_kernels_router", "test_chat",
                "test_kernels_act_words", "test_kernels_compressor_indexer", "test_config_weights",
                "test_kernels_common", "test_xla_triton")


def pytest_collection_modifyitems(config, items):
    """Reorder the modules as :data:`MODULE_ORDER` says (the tests inside a module keep their order)."""
    rank = {name: i for i, name in enumerate(MODULE_ORDER)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).stem, len(rank)))  # stable: module order kept


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


def random_weights(cfg, seed: int):
    """Random weights for ``cfg``: a random checkpoint in the official format (``write_random_checkpoint``, numpy)
    read back by ``load_weights``, as ``generate.demo_model`` makes its weights. On the 2-core CI machine this takes
    ~0.5 s where ``d.init_weights`` (one compiled program per tensor shape; itself run by the README test) took
    ~6-12 s per config."""
    import tempfile

    import dsv4_jax as d
    from dsv4_jax.convert.synthetic import hf_config_dict, write_random_checkpoint

    with tempfile.TemporaryDirectory(prefix="dsv4_test_w_") as tmp:
        write_random_checkpoint(tmp, {**hf_config_dict(), **cfg.to_hf_dict()}, seed=seed)
        return d.load_weights(tmp, cfg)


def _memory_mappings() -> int:
    """This process's memory mappings (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


MAX_MAPPINGS = 30000  # half of Linux's default vm.max_map_count (65530)


@pytest.fixture(autouse=True)
def _release_compiled_programs(request):
    """Drop JAX's compiled programs after a test module, and after any test that leaves the process with more than
    ``MAX_MAPPINGS`` memory mappings.

    Every XLA CPU executable keeps ~3 memory mappings of JIT code until it is freed, and JAX caches every program
    it compiled: a pytest worker reached Linux's ``vm.max_map_count`` (65530) late in the run, LLVM's next mapping
    failed, and the worker died inside XLA's compiler (a segfault or an abort in ``backend_compile_and_load`` or in
    the compile-cache write, 2026-11-29/30, in whichever test compiled then; watched: 65513 mappings, then 'node
    down'). Measured: 200 small jitted functions add 664 mappings, ``jax.clear_caches`` gives 586 back. With the
    module-level release, the largest module (``test_golden.py``) peaked at 25,367 in a worker; the per-test check
    keeps a growing module from reaching the limit."""
    yield
    last = request.node.nextitem is None or request.node.nextitem.module is not request.node.module
    if last or _memory_mappings() > MAX_MAPPINGS:
        jax.clear_caches()
        gc.collect()
