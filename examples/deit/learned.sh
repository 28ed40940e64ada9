#!/usr/bin/env bash
# Table 2, learned-router row: DeiT-S/16 MoE (every 2nd block, 4 experts, top-2) with a learned
# linear router. Extra flags are appended; DRY_RUN=1 prints the command (see settings.sh).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=settings.sh
source "$HERE/settings.sh"
deit_run learned --router-type learned -- "$@"
