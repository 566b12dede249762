#!/usr/bin/env bash
# Set up .venv if needed and run the main job (generation). With no --ckpt it uses a tiny built-in random model.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh" ""
exec "$root/.venv/bin/python" "$root/scripts/generate.py" "$@"
