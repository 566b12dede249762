#!/usr/bin/env bash
# Set up .venv with the test extras if needed, lint, and run the test suite on 2 pytest workers (CPU; 8 simulated
# devices where needed). Arguments go to pytest (e.g. a test file, -k EXPR). The 12 slowest tests are listed at
# the end: CI must stay under 30 minutes on 2 cores.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh" test
cd "$root"
"$root/.venv/bin/python" -m ruff check --line-length 120 dsv4_jax scripts tests
exec "$root/.venv/bin/python" -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist worksteal --durations=12 "$@"
