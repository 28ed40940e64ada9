#!/usr/bin/env bash
# GPU throughput report (under 5 minutes on one H100/H200): bench_moe in bf16 at GPT-2 small
# shapes, then short GPT-2 small training runs (dense, and MoE with 8 experts top-2 in every layer,
# seq 1024, bf16, mock data) printing tokens/s and MFU. Report only: no pass/fail.
# Environment: PYTHON (default ./.venv/bin/python), OUT (default runs/gpu_report), ITERS (30).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="${OUT:-$ROOT/runs/gpu_report}"
ITERS="${ITERS:-30}"
mkdir -p "$OUT"
export DS_ACCELERATOR=cuda
"$PYTHON" -c 'import torch; print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__)' \
  | tee "$OUT/device.txt"
date -u +"date: %Y-%m-%d %H:%M UTC" | tee -a "$OUT/device.txt"
"$PYTHON" tools/bench_moe.py --dtype bf16 --tokens 8192 --reps 10 --json "$OUT/bench_moe.json" \
  | tee "$OUT/bench_moe.txt"
COMMON=(
  --num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 1024
  --disable-bias-linear --disable-bias-layernorm --bf16 --mock-data
  --tokenizer-type NullTokenizer --vocab-size 50256 --micro-batch-size 16
  --train-iters "$ITERS" --log-interval 10 --eval-interval 100000 --lr 6e-4
)
for variant in dense moe; do
  extra=()
  if [ "$variant" = moe ]; then
    extra=(--num-experts 8 --moe-router-topk 2 --router-type self)
  fi
  echo "== GPT-2 small $variant, bf16, seq 1024 =="
  "$PYTHON" pretrain_gpt.py "${COMMON[@]}" "${extra[@]}" 2>&1 | tee "$OUT/train_$variant.log" \
    | grep -E "iteration .*tokens/s" || true
done
echo "== summary (last logged interval) =="
for variant in dense moe; do
  line="$(grep -E "tokens/s" "$OUT/train_$variant.log" | tail -n 1)"
  tps="$(sed -E 's/.*tokens\/s ([0-9]+).*/\1/' <<< "$line")"
  mfu="$(sed -E 's/.*MFU ([0-9.]+%).*/\1/' <<< "$line")"
  echo "$variant: tokens/s $tps, MFU $mfu"
done | tee "$OUT/summary.txt"
