# shellcheck shell=bash
# The paper's GPT-2 small setting (Table 1 of arXiv 2604.00421), shared by every row script in this
# folder (dense.sh learned.sh self.sh fixed_random.sh random.sh) and by examples/multinode/*.
# Sourced, not run. The rows differ only in msr_router_args below.
#
# From the paper: GPT-2 small (12 layers, hidden 768, 12 heads, sequence 1024, GPT-2 BPE, learned
# positions, tied embeddings), OpenWebText, every layer's FFN an MoE layer of 8 experts top-2, no
# load-balancing loss, bias-free linear and LayerNorm, vocabulary padded to 50,304 (these give the
# paper's 520,809,216 / 520,735,488 parameters). Everything else is marked "chosen here" below.
#
# Environment (defaults in brackets):
#   SCALE          paper | small | tiny [paper]. small: 4 layers, hidden 128, a 4k SentencePiece
#                  vocabulary, separate train/valid/test files (data/small, DATA_DIR; made by
#                  examples/data/prepare_shakespeare_small.py): the CPU-sized router table.
#                  tiny: a 2-layer, hidden-64 model for CPU/CI runs
#                  (seconds on mock data, about a minute on Shakespeare), on mock tokens (DATA_PATH=mock: NullTokenizer, vocabulary 127) or a
#                  real GPT-2 BPE prefix such as data/shakespeare_text_document
#                  (examples/data/prepare_shakespeare.sh).
#   DATA_PATH      Megatron .bin/.idx prefix [paper: data/owt/openwebtext_train_text_document,
#                  written by `bash examples/data/prepare_openwebtext.sh data/owt`; tiny: mock]
#   OUT_DIR        outputs: OUT_DIR/<row>/{checkpoints,tensorboard}, OUT_DIR/logs/ [runs/gpt2-SCALE]
#   NNODES         nodes [1]; NODE_RANK this node's index [0]
#   GPUS_PER_NODE  processes per node [CUDA_VISIBLE_DEVICES count, else `nvidia-smi -L` count, else 1]
#   TP             tensor-model-parallel size [1]; it must divide GPUS_PER_NODE (Megatron's
#                  order: TP ranks adjacent, inside a node) and the heads, FFN and vocabulary
#   EP             expert-model-parallel size [largest divisor of the expert count that is
#                  <= GPUS_PER_NODE / TP and divides the data-parallel size: all-to-all stays in
#                  a node]
#   LAUNCHER       torchrun | deepspeed | python [torchrun; python when 1 process in total].
#                  deepspeed here is single-node; see examples/multinode/ for the others.
#   MASTER_ADDR    rendezvous host [127.0.0.1]; MASTER_PORT [29500]
#   DRY_RUN        1: print the exact command instead of running it [0]
#   PYTHON         interpreter [.venv/bin/python if present, else python3]
#   Overrides of chosen values: TRAIN_ITERS GLOBAL_BATCH MICRO_BATCH LR MIN_LR WARMUP ZERO_STAGE
#                  SPLIT LOG_INTERVAL EVAL_INTERVAL EVAL_ITERS SAVE_INTERVAL
#   Extra arguments to a row script are appended to the trainer's (later flags win).
# Logs: every launch appends to OUT_DIR/logs/<row>_node${NODE_RANK}.log (tee).

MSR_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MSR_ROWS=(dense learned self fixed_random random)
# Extra rows (not in the paper's Table 1): the field's routers and balancing as baselines, and the
# 2 x 2 design {coordinates, rotation} x {same subspace in every layer, one per layer}:
#   hash                   Roller et al. hash layers, a random token-id table per layer
#   hash_balanced          the same, ids assigned greedily by training-split frequency
#   self_bias              self-routing + aux-loss-free expert bias (none of the anchors has it)
#   learned_bias           learned router + expert bias (Megatron core's aux-loss-free default)
#   learned_sigmoid_bias   DeepSeek-V3 routing: sigmoid scores + expert bias
#   self_shared            self-routing + one shared expert of the dense FFN size
#   self_per_layer         self-routing, disjoint coordinates per layer
#   fixed_random_orthogonal         a random rotation per layer (norm-matched rows)
#   fixed_random_orthogonal_shared  one random rotation for every layer
#   ablations (examples/ablations.sh): self_first, fixed_random_shared, learned_aux (Switch aux
#   loss 0.01), {self,learned}_e{4,16}: 4 or 16 experts, top-k and expert FFN size unchanged
MSR_EXTRA_ROWS=(hash hash_balanced self_bias learned_bias learned_sigmoid_bias self_shared
  self_per_layer fixed_random_orthogonal fixed_random_orthogonal_shared
  self_first fixed_random_shared learned_aux self_e4 self_e16 learned_e4 learned_e16)

SCALE="${SCALE:-paper}"
case "$SCALE" in
  paper | small | tiny) ;;
  *) echo "settings.sh: SCALE must be paper, small or tiny, got '$SCALE'" >&2; return 2 ;;
esac

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$MSR_ROOT/.venv/bin/python" ]; then PYTHON="$MSR_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

# Processes per node: the visible GPUs, else 1 (CPU).
msr_detect_gpus() {
  local n=0
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    local ids
    IFS=',' read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"
    n="${#ids[@]}"
  elif command -v nvidia-smi > /dev/null 2>&1; then
    n="$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)"
  fi
  if [ "${n:-0}" -gt 0 ]; then echo "$n"; else echo 1; fi
}

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
GPUS_PER_NODE="${GPUS_PER_NODE:-$(msr_detect_gpus)}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
DRY_RUN="${DRY_RUN:-0}"
WORLD_SIZE_TOTAL=$((NNODES * GPUS_PER_NODE))
TP="${TP:-1}"
if ! [[ "$TP" =~ ^[1-9][0-9]*$ ]] || [ $((GPUS_PER_NODE % TP)) -ne 0 ]; then
  echo "settings.sh: TP=$TP must be a positive divisor of GPUS_PER_NODE=$GPUS_PER_NODE" >&2
  return 2
fi
DP_SIZE=$((WORLD_SIZE_TOTAL / TP))
if [ -z "${LAUNCHER:-}" ]; then
  if [ "$WORLD_SIZE_TOTAL" -eq 1 ]; then LAUNCHER=python; else LAUNCHER=torchrun; fi
fi
OUT_DIR="${OUT_DIR:-$MSR_ROOT/runs/gpt2-$SCALE}"
case "$OUT_DIR" in /*) ;; *) OUT_DIR="$PWD/$OUT_DIR" ;; esac  # the launch runs from MSR_ROOT
LOG_DIR="$OUT_DIR/logs"

# No GPU: DeepSpeed's CPU accelerator and gloo.
if [ -z "${CUDA_VISIBLE_DEVICES:-}" ] && ! command -v nvidia-smi > /dev/null 2>&1; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
export PYTHONUNBUFFERED=1
export PYTHONPATH="$MSR_ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ "$SCALE" = paper ]; then
  # --- from the paper ---
  NUM_LAYERS=12 HIDDEN=768 HEADS=12 SEQ_LEN=1024 NUM_EXPERTS=8 TOPK=2
  DATA_PATH="${DATA_PATH:-$MSR_ROOT/data/owt/openwebtext_train_text_document}"
  # --- chosen here (the paper gives no optimiser recipe, batch, budget, dropout or split) ---
  # Batch: 512 x 1024 = 524,288 tokens per step (~0.5M: nanoGPT's GPT-2 124M recipe uses
  # 491,520; Karpathy's build-nanogpt/llm.c GPT-2 124M reproduction uses exactly 524,288).
  GLOBAL_BATCH="${GLOBAL_BATCH:-512}"
  # Micro-batch 8 per GPU (fits 80 GB with bf16 + ZeRO-2; accumulation is derived).
  MICRO_BATCH="${MICRO_BATCH:-8}"
  # Budget: 19,073 steps x 524,288 = 10.0B tokens, about one epoch of OpenWebText's 9B
  # (build-nanogpt's 10B-token GPT-2 124M run; nanoGPT's 300B is out of reach for five rows).
  TRAIN_ITERS="${TRAIN_ITERS:-19073}"
  # Optimiser: nanoGPT / build-nanogpt GPT-2 124M: AdamW lr 6e-4 cosine to 6e-5, weight decay
  # 0.1, betas 0.9/0.95, eps 1e-8, gradient clip 1.0.
  LR="${LR:-6e-4}" MIN_LR="${MIN_LR:-6e-5}"
  # Warm-up 715 steps = 375M tokens, GPT-3's warm-up (as build-nanogpt; nanoGPT uses 2000 of 600k).
  WARMUP="${WARMUP:-715}"
  # Dropout 0 (nanoGPT for pre-training). bf16 (nanoGPT's default dtype). ZeRO-2 (Megatron-
  # DeepSpeed's MoE examples; stage 3 is not supported with DeepSpeed MoE).
  ZERO_STAGE="${ZERO_STAGE:-2}"
  PRECISION_ARGS=(--bf16)
  # Split of the training prefix: 0.2% of documents (~18M tokens) held out for validation loss;
  # nanoGPT's separate val file (openwebtext_val_text_document) stays unseen for routing analysis.
  SPLIT="${SPLIT:-998,2,0}"
  # Cadence: validation every 1000 steps over 20 global batches (10.5M tokens); log every 10;
  # checkpoint every 1000 (and on SIGTERM).
  LOG_INTERVAL="${LOG_INTERVAL:-10}" EVAL_INTERVAL="${EVAL_INTERVAL:-1000}"
  EVAL_ITERS="${EVAL_ITERS:-20}" SAVE_INTERVAL="${SAVE_INTERVAL:-1000}"
elif [ "$SCALE" = small ]; then
  # small: sized by measurement for one 2-core CPU machine (README, "The small table"): 4
  # layers, hidden 128, 8 experts top-2 in every layer, bias-free; a 4,096-piece SentencePiece
  # vocabulary trained on the training text (at GPT-2 BPE the output layer would dominate the
  # FLOPs); train / valid / test are separate files (examples/data/prepare_shakespeare_small.py).
  NUM_LAYERS=4 HIDDEN=128 HEADS=4 SEQ_LEN=128 NUM_EXPERTS=8 TOPK=2
  DATA_DIR="${DATA_DIR:-$MSR_ROOT/data/small}"
  DATA_PATH="${DATA_PATH:-$DATA_DIR/train_text_document}"  # (the split files below are used)
  GLOBAL_BATCH="${GLOBAL_BATCH:-16}" MICRO_BATCH="${MICRO_BATCH:-8}"
  TRAIN_ITERS="${TRAIN_ITERS:-300}"
  # One learning rate for every row, tuned once on dense (README); nothing tuned per router.
  LR="${LR:-1e-3}" MIN_LR="${MIN_LR:-1e-4}" WARMUP="${WARMUP:-40}"
  ZERO_STAGE="${ZERO_STAGE:-2}"
  PRECISION_ARGS=()
  SPLIT="${SPLIT:-100,0,0}"
  LOG_INTERVAL="${LOG_INTERVAL:-20}" EVAL_INTERVAL="${EVAL_INTERVAL:-100}"
  EVAL_ITERS="${EVAL_ITERS:-16}" SAVE_INTERVAL="${SAVE_INTERVAL:-$TRAIN_ITERS}"
else
  # tiny: same structure (8 experts top-2 in every layer, bias-free, padded vocab), CPU-sized.
  NUM_LAYERS=2 HIDDEN=64 HEADS=4 SEQ_LEN=64 NUM_EXPERTS=8 TOPK=2
  DATA_PATH="${DATA_PATH:-mock}"
  GLOBAL_BATCH="${GLOBAL_BATCH:-4}" MICRO_BATCH="${MICRO_BATCH:-2}"
  TRAIN_ITERS="${TRAIN_ITERS:-50}"
  LR="${LR:-5e-3}" MIN_LR="${MIN_LR:-5e-4}" WARMUP="${WARMUP:-5}"
  ZERO_STAGE="${ZERO_STAGE:-2}"
  PRECISION_ARGS=()
  # 95/5: with examples/data/prepare_shakespeare.sh's 100-line documents, the last ~9,400 lines
  # (the source of examples/tasks/) are validation documents, never trained on.
  SPLIT="${SPLIT:-95,5,0}"
  LOG_INTERVAL="${LOG_INTERVAL:-10}" EVAL_INTERVAL="${EVAL_INTERVAL:-$TRAIN_ITERS}"
  EVAL_ITERS="${EVAL_ITERS:-2}" SAVE_INTERVAL="${SAVE_INTERVAL:-$TRAIN_ITERS}"
fi

case "$DATA_PATH" in /* | mock) ;; *) DATA_PATH="$PWD/$DATA_PATH" ;; esac

# Expert-parallel size: the largest divisor of NUM_EXPERTS <= GPUS_PER_NODE dividing the world.
msr_default_ep() {
  local d best=1
  for ((d = 1; d <= NUM_EXPERTS; d++)); do
    if [ $((NUM_EXPERTS % d)) -eq 0 ] && [ "$d" -le $((GPUS_PER_NODE / TP)) ] \
      && [ $((DP_SIZE % d)) -eq 0 ]; then
      best="$d"
    fi
  done
  echo "$best"
}
EP="${EP:-$(msr_default_ep)}"

# Normalise a row name (fixed-random and fixed_random are the same row).
msr_row_name() {
  local r
  case "$1" in
    fixed-random) echo fixed_random; return 0 ;;
  esac
  for r in "${MSR_ROWS[@]}" "${MSR_EXTRA_ROWS[@]}"; do
    if [ "$1" = "$r" ]; then echo "$1"; return 0; fi
  done
  echo "unknown row '$1': expected one of ${MSR_ROWS[*]} ${MSR_EXTRA_ROWS[*]}" >&2
  return 2
}

# ROUTER_ARGS for a Table 1 row: the only flags that differ between rows.
msr_router_args() {
  local row
  row="$(msr_row_name "$1")" || return 2
  local moe=(--num-experts "$NUM_EXPERTS" --moe-router-topk "$TOPK" --moe-aux-loss-coeff 0
    --expert-model-parallel-size "$EP")
  local bias=(--moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-3)
  case "$row" in
    dense) ROUTER_ARGS=() ;;
    fixed_random) ROUTER_ARGS=("${moe[@]}" --router-type fixed-random) ;;
    hash) ROUTER_ARGS=("${moe[@]}" --router-type hash) ;;
    hash_balanced) ROUTER_ARGS=("${moe[@]}" --router-type hash --hash-assignment balanced) ;;
    self_bias) ROUTER_ARGS=("${moe[@]}" --router-type self "${bias[@]}") ;;
    learned_bias) ROUTER_ARGS=("${moe[@]}" --router-type learned "${bias[@]}") ;;
    learned_sigmoid_bias) ROUTER_ARGS=("${moe[@]}" --router-type learned
      --moe-router-score-function sigmoid "${bias[@]}") ;;
    self_shared) ROUTER_ARGS=("${moe[@]}" --router-type self
      --moe-shared-expert-intermediate-size $((4 * HIDDEN))) ;;
    self_per_layer) ROUTER_ARGS=("${moe[@]}" --router-type self --self-route-dims per-layer) ;;
    fixed_random_orthogonal) ROUTER_ARGS=("${moe[@]}" --router-type fixed-random
      --fixed-random-init orthogonal) ;;
    fixed_random_orthogonal_shared) ROUTER_ARGS=("${moe[@]}" --router-type fixed-random
      --fixed-random-init orthogonal --fixed-random-shared) ;;
    self_first) ROUTER_ARGS=("${moe[@]}" --router-type self --self-route-dims first) ;;
    fixed_random_shared) ROUTER_ARGS=("${moe[@]}" --router-type fixed-random
      --fixed-random-shared) ;;
    learned_aux) ROUTER_ARGS=(--num-experts "$NUM_EXPERTS" --moe-router-topk "$TOPK"
      --moe-aux-loss-coeff 0.01 --expert-model-parallel-size "$EP" --router-type learned) ;;
    self_e4 | self_e16 | learned_e4 | learned_e16)
      local n="${row##*_e}" ep="$EP"
      while [ $((n % ep)) -ne 0 ]; do ep=$((ep / 2)); done  # EP must divide the expert count
      ROUTER_ARGS=(--num-experts "$n" --moe-router-topk "$TOPK" --moe-aux-loss-coeff 0
        --expert-model-parallel-size "$ep" --router-type "${row%_e*}") ;;
    *) ROUTER_ARGS=("${moe[@]}" --router-type "$row") ;;
  esac
}

# TRAINER_ARGS: every argument of pretrain_gpt.py for ROW, then any extra arguments.
msr_trainer_args() {
  local row
  row="$(msr_row_name "$1")" || return 2
  shift
  msr_router_args "$row" || return 2
  local data_args
  if [ "$SCALE" = small ]; then
    data_args=(--train-data-path "$DATA_DIR/train_text_document"
      --valid-data-path "$DATA_DIR/valid_text_document"
      --test-data-path "$DATA_DIR/test_text_document"
      --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA_DIR/sp.model")
  elif [ "$DATA_PATH" = mock ]; then
    data_args=(--mock-data --tokenizer-type NullTokenizer --vocab-size 127)
  else
    data_args=(--data-path "$DATA_PATH" --split "$SPLIT" --tokenizer-type GPT2BPETokenizer)
  fi
  TRAINER_ARGS=(
    --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS"
    --seq-length "$SEQ_LEN" --max-position-embeddings "$SEQ_LEN"
    --disable-bias-linear --disable-bias-layernorm --make-vocab-size-divisible-by 128
    --hidden-dropout 0 --attention-dropout 0
    "${ROUTER_ARGS[@]}"
    --zero-stage "$ZERO_STAGE"
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS"
    --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$WARMUP" --lr-decay-style cosine
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0
    "${PRECISION_ARGS[@]}" --seed 1234
    "${data_args[@]}"
    --log-interval "$LOG_INTERVAL" --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS"
    --save "$OUT_DIR/$row/checkpoints" --load "$OUT_DIR/$row/checkpoints"
    --save-interval "$SAVE_INTERVAL" --tensorboard-dir "$OUT_DIR/$row/tensorboard"
    --run-summary "$OUT_DIR/$row/summary.json"
    --exit-signal-handler
    "$@"
  )
  if [ "$TP" -gt 1 ]; then TRAINER_ARGS+=(--tensor-model-parallel-size "$TP"); fi
}

# The executable beside PYTHON (torchrun, deepspeed), else the one on PATH.
msr_tool() {
  local dir
  dir="$(dirname "$(command -v "$PYTHON")")"
  if [ -x "$dir/$1" ]; then echo "$dir/$1"; else echo "$1"; fi
}

# LAUNCH_CMD: the whole command for this node with LAUNCHER (row scripts).
msr_launch_cmd() {
  msr_trainer_args "$@" || return 2
  case "$LAUNCHER" in
    torchrun)
      LAUNCH_CMD=("$(msr_tool torchrun)" --nnodes "$NNODES" --node-rank "$NODE_RANK"
        --nproc-per-node "$GPUS_PER_NODE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
        "$MSR_ROOT/pretrain_gpt.py" "${TRAINER_ARGS[@]}") ;;
    deepspeed)
      if [ "$NNODES" -ne 1 ]; then
        echo "LAUNCHER=deepspeed here is single-node: use examples/multinode/deepspeed_hostfile.sh" >&2
        return 2
      fi
      LAUNCH_CMD=("$(msr_tool deepspeed)" --num_nodes 1 --num_gpus "$GPUS_PER_NODE"
        --master_port "$MASTER_PORT" "$MSR_ROOT/pretrain_gpt.py" "${TRAINER_ARGS[@]}") ;;
    python)
      if [ "$WORLD_SIZE_TOTAL" -ne 1 ]; then
        echo "LAUNCHER=python runs 1 process; NNODES*GPUS_PER_NODE is $WORLD_SIZE_TOTAL" >&2
        return 2
      fi
      LAUNCH_CMD=("$PYTHON" "$MSR_ROOT/pretrain_gpt.py" "${TRAINER_ARGS[@]}") ;;
    *)
      echo "LAUNCHER must be torchrun, deepspeed or python, got '$LAUNCHER'" >&2
      return 2
      ;;
  esac
}

# msr_quote ARGS...: one line a shell (or Python's shlex.split) reads back as ARGS.
msr_quote() {
  local a line=""
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then line+="$a "; else line+="$(printf '%q' "$a") "; fi
  done
  echo "${line% }"
}

# msr_run LOG CMD...: print CMD (DRY_RUN=1), or run it with its output appended to LOG (tee).
msr_run() {
  local log="$1"
  shift
  if [ "$DRY_RUN" = 1 ]; then
    echo "# layout: world $WORLD_SIZE_TOTAL = TP $TP x DP $DP_SIZE; EP $EP" >&2
    msr_quote "$@"
    return 0
  fi
  mkdir -p "$(dirname "$log")"
  printf '==== %s %s: %s\n' "$(date '+%F %T')" "$(hostname)" "$*" >> "$log"
  "$@" 2>&1 | tee -a "$log"
}

# msr_main ROW [EXTRA...]: what each row script does.
msr_main() {
  local row
  row="$(msr_row_name "$1")" || return 2
  shift
  msr_launch_cmd "$row" "$@" || return 2
  cd "$MSR_ROOT" || return 2
  msr_run "$LOG_DIR/${row}_node${NODE_RANK}.log" "${LAUNCH_CMD[@]}"
}
