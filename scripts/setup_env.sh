#!/usr/bin/env bash
# Creates ./.venv (or $VENV) with every pinned dependency and the package in editable mode.
# Idempotent: reinstalls only when setup.py changed since the last successful install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
STAMP="$VENV/.megatron_selfroute_installed"
HASH="$(sha256sum "$ROOT/setup.py" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
  echo "[setup_env] installing pinned dependencies into $VENV (a few minutes on first run)"
  # torch and torchvision first, as a pair, so no later resolution swaps torch.
  "$VENV/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1"
  "$VENV/bin/pip" install -q -e "${ROOT}[vision,eval,dev]"
  echo "$HASH" > "$STAMP"
fi
