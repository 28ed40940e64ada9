#!/usr/bin/env bash
# A seeded, paired router sweep with 95% intervals (tools/sweep.py): rows x seeds x scales through
# the row scripts, held-out loss at fixed token counts, local tasks, routing analysis, one table.
#   SCALE=small SEEDS="0 1 2" bash examples/sweep.sh           # CPU: the small table
#   SCALE=paper ROWS="learned self" SEEDS="0 1" bash examples/sweep.sh   # GPUs (this node)
#   DRY_RUN=1 bash examples/sweep.sh                           # print every command
# Environment (defaults in brackets):
#   SCALE    one or more of tiny small paper [small]
#   ROWS     row scripts of examples/gpt2 [dense learned self fixed_random random]
#   SEEDS    [0 1 2]   (5+ for claims about small loss differences)
#   OUT_DIR  [runs/sweep]; a re-run skips finished runs and rebuilds the same table
#   NPROC    processes per run [2 on CPU: EP=2 on 2 processes; GPUs: settings.sh's count]
#   EP       expert-parallel size [settings.sh's default for NPROC]
#   TASKS    lm-eval tasks [small/tiny: the local Shakespeare tasks; paper: the paper's five]
#   EVAL_TOKENS  held-out evaluation every this many training tokens [scale's default]
#   ROUTING_DATA_PATH, ROUTING_TOKENS  routing analysis input [small: the test split, 65536]
#   TABLE_DIR  where the table and figures go [OUT_DIR/table]
#   AGGREGATE_ONLY=1 RUNS="dir ..."   only build the table from run directories made anywhere
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SCALE="${SCALE:-small}"
ROWS="${ROWS:-dense learned self fixed_random random}"
SEEDS="${SEEDS:-0 1 2}"
OUT_DIR="${OUT_DIR:-$ROOT/runs/sweep}"
read -r -a scales <<< "$SCALE"
read -r -a rows <<< "$ROWS"
read -r -a seeds <<< "$SEEDS"
gpus=0
if command -v nvidia-smi > /dev/null 2>&1; then gpus="$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)"; fi
if [ "${gpus:-0}" -gt 0 ]; then NPROC="${NPROC:-$gpus}"; DEVICE=cuda; else NPROC="${NPROC:-2}"; DEVICE=cpu; export DS_ACCELERATOR=cpu; fi
args=(--rows "${rows[@]}" --seeds "${seeds[@]}" --scale "${scales[@]}" --out-dir "$OUT_DIR"
  --nproc "$NPROC" --python "$PYTHON")
if [ -n "${EP:-}" ]; then args+=(--ep "$EP"); fi
if [ -n "${TABLE_DIR:-}" ]; then args+=(--table-dir "$TABLE_DIR"); fi
case "${scales[0]}" in
  paper)
    TASKS="${TASKS:-hellaswag lambada_openai piqa wikitext winogrande}"
    ROUTING_DATA_PATH="${ROUTING_DATA_PATH:-$ROOT/data/owt/openwebtext_val_text_document}"
    ROUTING_TOKENS="${ROUTING_TOKENS:-4430000}" ;;
  small)
    if [ "${DRY_RUN:-0}" != 1 ] && [ "${AGGREGATE_ONLY:-0}" != 1 ]; then
      "$PYTHON" "$ROOT/examples/data/prepare_shakespeare_small.py"
    fi
    TASKS="${TASKS:-shakespeare_next_line shakespeare_last_word shakespeare_passages}"
    args+=(--tasks-dir "$ROOT/examples/tasks")
    ROUTING_DATA_PATH="${ROUTING_DATA_PATH:-$ROOT/data/small/test_text_document}"
    ROUTING_TOKENS="${ROUTING_TOKENS:-65536}" ;;
  *)
    TASKS="${TASKS:-}"
    ROUTING_DATA_PATH="${ROUTING_DATA_PATH:-}"
    ROUTING_TOKENS="${ROUTING_TOKENS:-4096}" ;;
esac
read -r -a tasks <<< "$TASKS"
if [ "${#tasks[@]}" -gt 0 ]; then args+=(--tasks "${tasks[@]}" --eval-batch 16); fi
if [ -n "$ROUTING_DATA_PATH" ]; then
  args+=(--routing-data "$ROUTING_DATA_PATH" --routing-tokens "$ROUTING_TOKENS")
fi
if [ -n "${EVAL_TOKENS:-}" ]; then args+=(--eval-tokens "$EVAL_TOKENS"); fi
args+=(--device "$DEVICE")
if [ "${DRY_RUN:-0}" = 1 ]; then args+=(--dry-run); fi
if [ "${AGGREGATE_ONLY:-0}" = 1 ]; then
  read -r -a runs <<< "${RUNS:-$OUT_DIR}"
  args+=(--aggregate-only --runs "${runs[@]}")
fi
exec "$PYTHON" "$ROOT/tools/sweep.py" "${args[@]}"
