#!/usr/bin/env bash
# The paper's Table 1 at a chosen scale: train every router variant (dense, learned, self,
# fixed-random, random) with examples/gpt2/<row>.sh, evaluate each with tools/eval_lm.py, analyse
# the MoE rows' routing with tools/analyze_routing.py, and print one comparison table (a row per
# router: task metrics, mean normalised routing entropy, mean max-expert fraction).
#   bash examples/paper_table.sh                # SCALE=tiny: CPU, Shakespeare, a few minutes
#   SCALE=paper bash examples/paper_table.sh    # the paper's setting: 5 x 10B tokens on GPUs
# On a cluster, train the rows with examples/multinode/* first (same OUT_DIR), then run this with
# SKIP_TRAIN=1 (training an already finished row is a no-op anyway: it resumes at the end).
#
# Environment (defaults in brackets):
#   SCALE           tiny | small | paper [tiny]; small runs the seeded sweep (examples/sweep.sh:
#                   SEEDS [0 1 2], every row x seed, 95% intervals and paired differences)
#   ROWS            rows, space-separated [dense learned self fixed_random random]
#   OUT_DIR         outputs [runs/paper_table-SCALE]
#   DATA_PATH       training prefix [tiny: data/shakespeare_text_document, made by
#                   examples/data/prepare_shakespeare.sh if missing; paper: settings.sh's]
#   ROUTING_DATA_PATH  tokens for the routing analysis [tiny: DATA_PATH; paper:
#                   data/owt/openwebtext_val_text_document, nanoGPT's held-out OpenWebText]
#   ROUTING_TOKENS  tokens routed per checkpoint [tiny: 16384; paper: 4430000, the paper's 4.43M]
#   TASKS           lm-eval tasks [tiny: shakespeare_next_line shakespeare_last_word
#                   shakespeare_passages (examples/tasks/, local); paper: hellaswag lambada_openai
#                   piqa wikitext winogrande (hub datasets, need internet or a filled HF cache)]
#   TASKS_DIR       extra task YAMLs (--include-path) [tiny: examples/tasks; paper: none]
#   EVAL_LIMIT      documents per task, for quick looks [all]
#   EVAL_BATCH      [16]; EVAL_DEVICE [cuda when nvidia-smi sees a GPU, else cpu]
#   SKIP_TRAIN      1: evaluate the checkpoints already in OUT_DIR [0]
#   DRY_RUN         1: print every command instead of running it [0]
#   Launch knobs (NNODES GPUS_PER_NODE EP LAUNCHER MASTER_ADDR ... TRAIN_ITERS ...) pass through to
#   the row scripts (examples/gpt2/settings.sh).
# Outputs: OUT_DIR/<row>/checkpoints, OUT_DIR/logs/, OUT_DIR/eval/<row>.{json,csv},
#   OUT_DIR/routing/ (routing.json, routing.csv, entropy.png, max_fraction.png, heat maps),
#   OUT_DIR/paper_table.{md,csv,json}.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

export SCALE="${SCALE:-tiny}"
ROWS="${ROWS:-dense learned self fixed_random random}"
if [ "$SCALE" = small ]; then
  # The small table: a seeded, paired sweep with 95% intervals (examples/sweep.sh ->
  # tools/sweep.py), sized for one 2-core CPU machine (README, "The small table").
  export ROWS SEEDS="${SEEDS:-0 1 2}" OUT_DIR="${OUT_DIR:-$ROOT/runs/paper_table-small}"
  exec bash "$ROOT/examples/sweep.sh"
fi
export OUT_DIR="${OUT_DIR:-$ROOT/runs/paper_table-$SCALE}"
DRY_RUN="${DRY_RUN:-0}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHON
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1; then
  EVAL_DEVICE="${EVAL_DEVICE:-cuda}"
else
  EVAL_DEVICE="${EVAL_DEVICE:-cpu}"
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
EVAL_BATCH="${EVAL_BATCH:-16}"

case "$SCALE" in
  tiny)
    export DATA_PATH="${DATA_PATH:-$ROOT/data/shakespeare_text_document}"
    ROUTING_DATA_PATH="${ROUTING_DATA_PATH:-$DATA_PATH}"
    ROUTING_TOKENS="${ROUTING_TOKENS:-16384}"
    TASKS="${TASKS:-shakespeare_next_line shakespeare_last_word shakespeare_passages}"
    TASKS_DIR="${TASKS_DIR-$ROOT/examples/tasks}"
    ;;
  paper)
    export DATA_PATH="${DATA_PATH:-$ROOT/data/owt/openwebtext_train_text_document}"
    ROUTING_DATA_PATH="${ROUTING_DATA_PATH:-$ROOT/data/owt/openwebtext_val_text_document}"
    ROUTING_TOKENS="${ROUTING_TOKENS:-4430000}"
    TASKS="${TASKS:-hellaswag lambada_openai piqa wikitext winogrande}"
    TASKS_DIR="${TASKS_DIR:-}"
    ;;
  *) echo "paper_table.sh: SCALE must be tiny, small or paper, got '$SCALE'" >&2; exit 2 ;;
esac
read -r -a rows <<< "$ROWS"
rows=("${rows[@]/fixed-random/fixed_random}")
read -r -a tasks <<< "$TASKS"

# run CMD...: print it (DRY_RUN=1) or run it.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    local a line=""
    for a in "$@"; do
      if [[ "$a" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then line+="$a "; else line+="$(printf '%q' "$a") "; fi
    done
    echo "${line% }"
  else
    "$@"
  fi
}

# 1. data (tiny): the Shakespeare prefix.
if [ "$SCALE" = tiny ] && { [ ! -f "$DATA_PATH.bin" ] || [ ! -f "$DATA_PATH.idx" ]; }; then
  run mkdir -p "$(dirname "$DATA_PATH")"
  run bash "$ROOT/examples/data/prepare_shakespeare.sh" "$DATA_PATH"
fi

# 2. train every row (a finished row resumes at its last iteration and stops at once).
for row in "${rows[@]}"; do
  script="$ROOT/examples/gpt2/$row.sh"
  if [ ! -f "$script" ]; then
    echo "paper_table.sh: unknown row '$row' (no $script)" >&2
    exit 2
  fi
  if [ "${SKIP_TRAIN:-0}" != 1 ]; then
    echo "[paper_table] training $row ($SCALE) at ${SECONDS}s" >&2
    DRY_RUN="$DRY_RUN" bash "$script"
  fi
done

# 3. lm-eval on every row.
eval_args=(--tasks "${tasks[@]}" --batch-size "$EVAL_BATCH" --device "$EVAL_DEVICE")
if [ -n "$TASKS_DIR" ]; then eval_args+=(--include-path "$TASKS_DIR"); fi
if [ -n "${EVAL_LIMIT:-}" ]; then eval_args+=(--limit "$EVAL_LIMIT"); fi
moe_ckpts=()
moe_labels=()
for row in "${rows[@]}"; do
  ckpt="$OUT_DIR/$row/checkpoints"
  echo "[paper_table] evaluating $row at ${SECONDS}s" >&2
  run "$PYTHON" "$ROOT/tools/eval_lm.py" --load "$ckpt" "${eval_args[@]}" \
    --output "$OUT_DIR/eval/$row.json" --label "$row"
  if [ "$row" != dense ]; then
    moe_ckpts+=("$ckpt")
    moe_labels+=("$row")
  fi
done

# 4. routing analysis of the MoE rows over the same tokens.
if [ "${#moe_ckpts[@]}" -gt 0 ]; then
  echo "[paper_table] routing analysis of ${moe_labels[*]} at ${SECONDS}s" >&2
  run "$PYTHON" "$ROOT/tools/analyze_routing.py" --load "${moe_ckpts[@]}" --labels "${moe_labels[@]}" \
    --data-path "$ROUTING_DATA_PATH" --tokens "$ROUTING_TOKENS" --batch-size "$EVAL_BATCH" \
    --device "$EVAL_DEVICE" --output-dir "$OUT_DIR/routing" --no-progress
fi

# 5. one table: a row per router.
[ "$DRY_RUN" = 1 ] && exit 0
"$PYTHON" - "$OUT_DIR" "${rows[@]}" << 'PY'
import csv
import json
import os
import sys

out_dir, rows = sys.argv[1], sys.argv[2:]
routing = {}
path = os.path.join(out_dir, "routing", "routing.json")
if os.path.exists(path):
    with open(path) as f:
        routing = {r["label"]: r for r in json.load(f)}
table, columns = [], []
for row in rows:
    with open(os.path.join(out_dir, "eval", f"{row}.json")) as f:
        summary = json.load(f)["summary"]
    entry = {"router": row}
    for s in summary:
        if s["metric"] == "sample_len":  # a document count, not a score
            continue
        col = f"{s['task']} {s['metric']}"
        if col not in columns:
            columns.append(col)
        entry[col] = s["value"]
    r = routing.get(row)
    entry["mean normalised entropy"] = r["mean_normalized_entropy"] if r else None
    entry["mean max-expert fraction"] = r["mean_max_fraction"] if r else None
    table.append(entry)
columns = ["router"] + columns + ["mean normalised entropy", "mean max-expert fraction"]


def fmt(v):
    if v is None:
        return "-"
    return v if isinstance(v, str) else f"{v:.4f}"


lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
lines += ["| " + " | ".join(fmt(e.get(c)) for c in columns) + " |" for e in table]
text = "\n".join(lines)
print(text)
with open(os.path.join(out_dir, "paper_table.md"), "w") as f:
    f.write(text + "\n")
with open(os.path.join(out_dir, "paper_table.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=columns)
    w.writeheader()
    w.writerows(table)
with open(os.path.join(out_dir, "paper_table.json"), "w") as f:
    json.dump(table, f, indent=1)
print(f"wrote {out_dir}/paper_table.md, .csv, .json; routing figures in {out_dir}/routing/")
PY
