#!/usr/bin/env bash
# Sets up ./.venv if needed, then runs the CPU test suite (full matrices: add `-m slow`).
# pytest's temporary files go to $MSR_TEST_BASETEMP (default ./.pytest_tmp, on the checkout's disk
# beside .venv rather than in a possibly small or shared /tmp); pytest empties that directory when
# it starts and this script removes it after a passing run, so a failed run's files stay for a look.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
VENV="${VENV:-$ROOT/.venv}"
BASETEMP="${MSR_TEST_BASETEMP:-$ROOT/.pytest_tmp}"
cd "$ROOT"
rc=0
"$VENV/bin/python" -m pytest -q --durations=15 --basetemp "$BASETEMP" "$@" || rc=$?
if [ "$rc" -eq 0 ]; then
  rm -rf "$BASETEMP"
fi
exit "$rc"
