#!/usr/bin/env bash
# Set up .venv with the test extras if needed, lint, and run the test suite on 2 pytest workers (CPU; 8 simulated
# devices where needed). Arguments go to pytest (e.g. a test file, -k EXPR). The 12 slowest tests are listed at
# the end: CI must stay under 30 minutes on 2 cores. JAX's persistent compilation cache starts empty in a fresh
# folder per run (DSV4_JAX_CACHE overrides it): tests that compile the same program share it (~4 of 25 minutes).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh" test
cd "$root"
"$root/.venv/bin/python" -m ruff check --line-length 120 dsv4_jax scripts tests
if [ -z "${DSV4_JAX_CACHE:-}" ]; then
  DSV4_JAX_CACHE="$(mktemp -d "${TMPDIR:-/tmp}/dsv4-test-cache.XXXXXX")"
  trap 'rm -rf "$DSV4_JAX_CACHE"' EXIT
fi
export DSV4_JAX_CACHE
# loadscope: each module whole on one worker (module fixtures run once), in tests/conftest.py's MODULE_ORDER
"$root/.venv/bin/python" -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadscope --no-loadscope-reorder \
  --durations=12 "$@"
