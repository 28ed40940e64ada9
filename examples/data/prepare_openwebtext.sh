#!/usr/bin/env bash
# Production data: tokenizes the Hugging Face `openwebtext` dataset with GPT-2 BPE into Megatron
# train and val prefixes, using nanoGPT's held-out split (train_test_split(test_size=0.0005,
# seed=2357, shuffle=True), "test" renamed "val"). Writes
#   OUT_DIR/openwebtext_train_text_document.{bin,idx}  (about 9B tokens)
#   OUT_DIR/openwebtext_val_text_document.{bin,idx}    (about 4M tokens)
# OUT_DIR is the first argument, else $OUT_DIR, default data/. Needs the hub (or a local copy:
# DATASET may name a local directory) and about 55 GB of disk for the download and cache.
# Environment: PYTHON (default ./.venv/bin/python), WORKERS (default: all cores), DATASET.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
WORKERS="${WORKERS:-$(nproc)}"
DATASET="${DATASET:-openwebtext}"
OUT_DIR="${1:-${OUT_DIR:-$ROOT/data}}"

mkdir -p "$OUT_DIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
for part in train val; do
  "$PYTHON" "$ROOT/tools/preprocess_data.py" \
    --hf-dataset "$DATASET" \
    --hf-split train \
    --hf-val-size 0.0005 \
    --hf-val-seed 2357 \
    --hf-keep "$part" \
    --json-keys text \
    --output-prefix "$OUT_DIR/openwebtext_$part" \
    --tokenizer-type GPT2BPETokenizer \
    --append-eod \
    --workers "$WORKERS" \
    --log-interval 100000
done
echo "data prefixes: $OUT_DIR/openwebtext_train_text_document $OUT_DIR/openwebtext_val_text_document"
