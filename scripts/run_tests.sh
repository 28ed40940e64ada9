#!/usr/bin/env bash
# Sets up ./.venv if needed, then runs the CPU test suite (full matrices: add `-m slow`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
VENV="${VENV:-$ROOT/.venv}"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -q --durations=15 "$@"
