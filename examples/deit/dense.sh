#!/usr/bin/env bash
# Table 2, dense row: DeiT-S/16 without experts. Extra flags after the script name are appended
# (e.g. `--epochs 1`). DRY_RUN=1 prints the command; see settings.sh for the environment.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=settings.sh
source "$HERE/settings.sh"
deit_run dense -- "$@"
