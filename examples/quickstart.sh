#!/usr/bin/env bash
# Quickstart: set up ./.venv, tokenise the bundled Shakespeare corpus with GPT-2 BPE, and train a
# small self-routing MoE GPT (4 layers, hidden 256, 8 experts top-2, no router parameters) for a
# few minutes -- on CPU when there is no GPU, on every local GPU otherwise. It reports the
# validation loss and, per MoE layer, the normalised routing entropy and max expert fraction.
# Environment: ITERS (default 200), OUT (default runs/quickstart-<time>), NPROC (default: GPUs or 1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
PY="$ROOT/.venv/bin/python"
DATA="$ROOT/data/shakespeare_text_document"
if [ ! -f "$DATA.idx" ] || [ ! -f "$DATA.bin" ]; then
  bash examples/data/prepare_shakespeare.sh "$DATA"
fi
ITERS="${ITERS:-200}"
OUT="${OUT:-$ROOT/runs/quickstart-$(date +%Y%m%d-%H%M%S)}"
GPUS="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
NPROC="${NPROC:-$(( GPUS > 0 ? GPUS : 1 ))}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-$([ "$GPUS" -gt 0 ] && echo cuda || echo cpu)}"
ARGS=(
  --num-layers 4 --hidden-size 256 --num-attention-heads 4 --seq-length 128
  --num-experts 8 --moe-router-topk 2 --router-type self
  --disable-bias-linear --disable-bias-layernorm
  --data-path "$DATA" --split "98,2,0" --tokenizer-type GPT2BPETokenizer
  --micro-batch-size 4 --global-batch-size $(( 4 * NPROC ))
  --train-iters "$ITERS" --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 20 --lr-decay-style cosine
  --weight-decay 0.1 --clip-grad 1.0 --log-interval 20 --eval-interval "$ITERS" --eval-iters 10
  --save "$OUT/checkpoints" --save-interval "$ITERS" --tensorboard-dir "$OUT/tensorboard"
)
echo "[quickstart] training on $NPROC process(es), outputs in $OUT"
if [ "$NPROC" -gt 1 ]; then
  "$ROOT/.venv/bin/torchrun" --standalone --nproc-per-node "$NPROC" pretrain_gpt.py "${ARGS[@]}"
else
  "$PY" pretrain_gpt.py "${ARGS[@]}"
fi
echo "[quickstart] done: checkpoints in $OUT/checkpoints, TensorBoard logs in $OUT/tensorboard"
