#!/usr/bin/env bash
# The paper's open questions as one-command studies, each a paired table of the sweep
# (tools/sweep.py; same seeds, same data order, rows trained once and shared between studies):
#   coordinates  self-routing reads the last / first / per-layer-disjoint N coordinates
#   projection   fixed-random per layer vs shared, Gaussian vs orthogonal (norm-matched rows);
#                with self / self_per_layer the 2 x 2 {coordinates, rotation} x {same, own subspace}
#   balancing    learned: none vs Switch aux loss (0.01) vs expert bias vs sigmoid + bias;
#                self vs self + expert bias
#   hash         hash routing (random, balanced) against self and learned: content-free but
#                token-consistent routing
#   experts      4 / 8 / 16 experts at equal active compute: top-k (2) and the expert FFN size
#                (the dense FFN size) are held equal, so each token's FLOPs are the same and total
#                expert parameters grow with the expert count; self and learned
#   SCALE=small SEEDS="0 1 2" STUDIES="coordinates balancing" bash examples/ablations.sh
#   DRY_RUN=1 bash examples/ablations.sh
# Environment: STUDIES [all five], and everything examples/sweep.sh reads (SCALE [small], SEEDS,
# OUT_DIR [runs/ablations], NPROC, EP, TASKS, DRY_RUN ...). Tables: OUT_DIR/table-<study>/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export OUT_DIR="${OUT_DIR:-$ROOT/runs/ablations}"
STUDIES="${STUDIES:-coordinates projection balancing hash experts}"
declare -A STUDY_ROWS=(
  [coordinates]="self self_first self_per_layer"
  [projection]="fixed_random fixed_random_shared fixed_random_orthogonal fixed_random_orthogonal_shared self self_per_layer"
  [balancing]="learned learned_aux learned_bias learned_sigmoid_bias self self_bias"
  [hash]="hash hash_balanced self learned"
  [experts]="self_e4 self self_e16 learned_e4 learned learned_e16"
)
read -r -a studies <<< "$STUDIES"
for study in "${studies[@]}"; do
  if [ -z "${STUDY_ROWS[$study]:-}" ]; then
    echo "ablations.sh: unknown study '$study' (coordinates projection balancing hash experts)" >&2
    exit 2
  fi
  echo "==== study $study: ${STUDY_ROWS[$study]}"
  ROWS="${STUDY_ROWS[$study]}" TABLE_DIR="$OUT_DIR/table-$study" bash "$ROOT/examples/sweep.sh"
done
