#!/usr/bin/env bash
# Table 1 row "fixed_random": the paper's GPT-2 small setting (settings.sh) with --router-type fixed-random (frozen random projection).
# Usage: bash examples/gpt2/fixed_random.sh [extra pretrain_gpt.py flags]; environment as in settings.sh
# (SCALE=tiny for a CPU-sized run, DRY_RUN=1 to print the command).
set -euo pipefail
# shellcheck source=examples/gpt2/settings.sh
source "$(dirname "${BASH_SOURCE[0]}")/settings.sh"
msr_main fixed_random "$@"
