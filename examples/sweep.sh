#!/usr/bin/env bash
# A seeded, paired router sweep with 95% intervals (tools/sweep.py): rows x seeds x scales through
# the row scripts, held-out loss at fixed token counts, local tasks, routing analysis, one table.
#   SCALE=small SEEDS="0 1 2" bash examples/sweep.sh           # CPU: the small table
#   FAMILY=vit bash examples/sweep.sh                          # Table 2 rows on the digits
#   SCALE=paper ROWS="learned self" SEEDS="0 1" bash examples/sweep.sh   # GPUs (this node)
#   DRY_RUN=1 bash examples/sweep.sh                           # print every command
# Environment (defaults in brackets):
#   FAMILY   gpt | vit [gpt]; vit: examples/deit rows on IMAGE_ROOT [digits: data/digits]
#   SCALE    one or more of tiny small paper [small]; vit: digits or a label [digits]
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
FAMILY="${FAMILY:-gpt}"
if [ "$FAMILY" = vit ]; then
  SCALE="${SCALE:-digits}"
  ROWS="${ROWS:-dense learned self}"
else
  SCALE="${SCALE:-small}"
  ROWS="${ROWS:-dense learned self fixed_random random}"
fi
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
if [ "$FAMILY" = vit ]; then
  # Table 2 (dense, learned, self; DeiT recipe, MoE every other block, 4 experts top-2) through
  # the same sweep. SCALE=digits: scikit-learn's bundled 8x8 digits upsampled to 32 px (no
  # download; a pipeline check: it saturates) with a 4-block, width-96 ViT; any other SCALE is a
  # label for IMAGE_ROOT (an ImageFolder root or a Hugging Face dataset) and the DeiT-S recipe.
  args+=(--family vit)
  if [ "${scales[0]}" = digits ]; then
    IMAGE_ROOT="${IMAGE_ROOT:-$ROOT/data/digits}"
    if [ "${DRY_RUN:-0}" != 1 ] && [ "${AGGREGATE_ONLY:-0}" != 1 ]; then
      "$PYTHON" "$ROOT/examples/data/prepare_digits.py" --out-dir "$IMAGE_ROOT"
    fi
    TRAIN_ARGS="${TRAIN_ARGS:---img-size 32 --patch-size 4 --num-layers 4 --hidden-size 96 --num-attention-heads 3 --moe-layer-freq [0,1]*2 --epochs 12 --warmup-epochs 1 --lr 1e-3 --no-lr-scale --num-workers 0 --no-model-ema --no-repeated-aug --aa none --log-interval 22}"
    export GLOBAL_BATCH="${GLOBAL_BATCH:-64}" MICRO_BATCH="${MICRO_BATCH:-$((64 / NPROC))}"
    args+=(--ep "${EP:-$NPROC}")  # EP over every process (4 experts: NPROC 1, 2 or 4)
  fi
  args+=(--image-root "${IMAGE_ROOT:?set IMAGE_ROOT to an ImageFolder root}"
    --routing-tokens "${ROUTING_TOKENS:-23400}" --train-args "${TRAIN_ARGS:-}")
  if [ "${DRY_RUN:-0}" = 1 ]; then args+=(--dry-run); fi
  exec "$PYTHON" "$ROOT/tools/sweep.py" "${args[@]}"
fi
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
