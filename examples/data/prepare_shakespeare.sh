#!/usr/bin/env bash
# Quickstart data: cuts data/shakespeare.txt into jsonl documents of 100 lines and tokenizes them
# with the bundled GPT-2 BPE into the Megatron dataset prefix DATA_PREFIX (first argument, else
# $DATA_PREFIX, default data/shakespeare_text_document), i.e. DATA_PREFIX.bin and DATA_PREFIX.idx.
# The prefix must end in _text_document, the name preprocess_data gives the "text" key.
# Environment: PYTHON (default ./.venv/bin/python), WORKERS (default 2).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
WORKERS="${WORKERS:-2}"
DATA_PREFIX="${1:-${DATA_PREFIX:-$ROOT/data/shakespeare_text_document}}"

case "$DATA_PREFIX" in
  *_text_document) ;;
  *) echo "prepare_shakespeare: prefix must end in _text_document: $DATA_PREFIX" >&2; exit 2 ;;
esac
OUTPUT_PREFIX="${DATA_PREFIX%_text_document}"

TMP_DIR="$(mktemp -d)"
trap 'rm -rf "$TMP_DIR"' EXIT

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -m megatron_selfroute.data.corpus "$ROOT/data/shakespeare.txt" \
  "$TMP_DIR/shakespeare.jsonl" --lines-per-doc 100
"$PYTHON" "$ROOT/tools/preprocess_data.py" \
  --input "$TMP_DIR/shakespeare.jsonl" \
  --output-prefix "$OUTPUT_PREFIX" \
  --json-keys text \
  --tokenizer-type GPT2BPETokenizer \
  --append-eod \
  --workers "$WORKERS"
echo "data prefix: $DATA_PREFIX"
