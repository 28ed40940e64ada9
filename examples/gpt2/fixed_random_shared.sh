#!/usr/bin/env bash
# Extra row "fixed_random_shared" (not in the paper's Table 1; see MSR_EXTRA_ROWS in settings.sh for what it is):
# the paper's GPT-2 small setting (settings.sh) with this row's router and balancing flags.
# Usage: bash examples/gpt2/fixed_random_shared.sh [extra pretrain_gpt.py flags]; environment as in settings.sh
# (SCALE=tiny for a CPU-sized run, DRY_RUN=1 to print the command).
set -euo pipefail
# shellcheck source=examples/gpt2/settings.sh
source "$(dirname "${BASH_SOURCE[0]}")/settings.sh"
msr_main fixed_random_shared "$@"
