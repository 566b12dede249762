#!/usr/bin/env bash
# Create (or reuse) the project virtualenv in .venv and install dsv4-jax into it.
# Usage: source scripts/setup_env.sh [extras]   e.g. "test" -> pip install -e '.[test]'
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
if [ ! -x "$root/.venv/bin/python" ]; then
  "$py" -m venv "$root/.venv"
  "$root/.venv/bin/python" -m pip install -q --upgrade pip
fi
extras="${1:-}"
spec="$root"
[ -n "$extras" ] && spec="$root[$extras]"
stamp="$root/.venv/.dsv4-installed-${extras:-base}"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  # torch==2.13.0 (CPU) resolves from the machine's local wheel; everything else from PyPI
  "$root/.venv/bin/python" -m pip install -q -e "$spec"
  touch "$stamp"
fi
