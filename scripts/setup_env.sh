#!/usr/bin/env bash
# Create (or reuse) the project virtualenv in .venv and install dsv4-jax into it.
# Usage: source scripts/setup_env.sh [extras]   e.g. "test" -> pip install -e '.[test]'
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
if [ ! -x "$root/.venv/bin/python" ]; then
  "$py" -m venv "$root/.venv"
  "$root/.venv/bin/python" -m pip install -q --no-cache-dir --upgrade pip
fi
extras="${1:-}"
spec="$root"
[ -n "$extras" ] && spec="$root[$extras]"
stamp="$root/.venv/.dsv4-installed-${extras:-base}"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  # torch==2.13.0 (CPU) resolves from the machine's local wheel; everything else from PyPI. No pip cache: the
  # downloaded wheels would be kept a second time beside the venv (CI machines have had little disk).
  if ! "$root/.venv/bin/python" -m pip install -q --no-cache-dir -e "$spec"; then
    echo "setup_env.sh: pip install -e '$spec' failed; free disk where it writes:" >&2
    df -h "$root" "${TMPDIR:-/tmp}" >&2 || true
    exit 1
  fi
  touch "$stamp"
fi
