#!/usr/bin/env bash
# Table 1 row "dense": the paper's GPT-2 small setting (settings.sh) with no MoE (every block a dense FFN).
# Usage: bash examples/gpt2/dense.sh [extra pretrain_gpt.py flags]; environment as in settings.sh
# (SCALE=tiny for a CPU-sized run, DRY_RUN=1 to print the command).
set -euo pipefail
# shellcheck source=examples/gpt2/settings.sh
source "$(dirname "${BASH_SOURCE[0]}")/settings.sh"
msr_main dense "$@"
