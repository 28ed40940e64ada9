# shellcheck shell=bash
# DeiT-S/16 ImageNet-1K recipe shared by the Table-2 rows (dense.sh, learned.sh, self.sh); each
# row differs only in its router flags. Every value names its source:
#   [DeiT]    Touvron et al. 2021, "Training data-efficient image transformers" (Table 9) and
#             facebookresearch/deit main.py defaults
#   [paper]   the self-routing paper's Table-2 MoE setting (DeiT-S, MoE every 2nd block,
#             4 experts, top-2; V-MoE placement = Megatron-DeepSpeed --expert-interval 2)
#   [project] this codebase's choice where DeiT has no equivalent
# Sourced by the row scripts; they call `deit_run ROW [router flags...] -- [extra flags...]`
# (router flags make the model the MoE of DEIT_MOE; none = dense).
# Environment: DATA (ImageNet root with train/ and val/) or HF_DATASET (e.g. imagenet-1k),
# OUT (default runs/deit-ROW), NGPUS (default: visible GPUs, else 1), GLOBAL_BATCH, MICRO_BATCH,
# EP (expert-parallel size), TP (tensor-parallel size, default 1), BF16 (default 1; 0 = fp32, e.g. on CPU), DRY_RUN=1 (print the exact
# command instead of running it).

DEIT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEIT_PY="${PYTHON:-$DEIT_ROOT/.venv/bin/python}"

DEIT_RECIPE=(
  --model deit_small_patch16_224   # [DeiT] DeiT-S/16: dim 384, depth 12, heads 6, MLP 4x, 224 px
  --epochs 300                     # [DeiT] main.py --epochs 300
  --warmup-epochs 5                # [DeiT] main.py --warmup-epochs 5
  --lr 5e-4                        # [DeiT] base LR for 512 images, scaled by global batch / 512
  --min-lr 1e-5                    # [DeiT] main.py --min-lr 1e-5
  --lr-decay-style cosine          # [DeiT] main.py --sched cosine
  --weight-decay 0.05              # [DeiT] main.py --weight-decay 0.05 (AdamW)
  --adam-beta1 0.9 --adam-beta2 0.999 --adam-eps 1e-8  # [DeiT] timm AdamW defaults, --opt-eps 1e-8
  --clip-grad 0                    # [DeiT] main.py --clip-grad None
  --mixup 0.8 --cutmix 1.0         # [DeiT] main.py --mixup 0.8 --cutmix 1.0
  --smoothing 0.1                  # [DeiT] main.py --smoothing 0.1
  --reprob 0.25                    # [DeiT] main.py --reprob 0.25 (--remode pixel --recount 1)
  --aa rand-m9-mstd0.5-inc1        # [DeiT] main.py --aa rand-m9-mstd0.5-inc1
  --drop-path 0.1                  # [DeiT] main.py --drop-path 0.1
  --repeated-aug                   # [DeiT] main.py --repeated-aug (3 repeats)
  --model-ema --model-ema-decay 0.99996  # [DeiT] main.py model_ema default True, decay 0.99996
  --num-workers 10                 # [DeiT] main.py --num_workers 10
  --seed 0                         # [DeiT] main.py --seed 0
  --log-interval 50                # [project]
)
DEIT_MOE=(
  --num-experts 4 --moe-router-topk 2  # [paper] 4 experts, top-2
  --moe-layer-freq '[0,1]*6'           # [paper] MoE in blocks 1,3,...,11 ("every 2")
)

# deit_run ROW [router flags...] -- [extra flags...]: launch (or print) one Table-2 row.
deit_run() {
  local row="$1"
  shift
  local -a row_args=() extra=()
  while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do row_args+=("$1"); shift; done
  if [ "$#" -gt 0 ]; then shift; extra=("$@"); fi
  if [ "${#row_args[@]}" -gt 0 ]; then row_args=("${DEIT_MOE[@]}" "${row_args[@]}"); fi
  local ep="${EP:-1}"
  if [ "${#row_args[@]}" -eq 0 ]; then ep=1; fi  # dense: no experts to split
  local gpus
  gpus="${NGPUS:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}"
  [ "$gpus" -ge 1 ] || gpus=1
  local global="${GLOBAL_BATCH:-1024}"     # [DeiT] 1024 images per step (4 GPUs x 256)
  local micro="${MICRO_BATCH:-$(( global / gpus ))}"
  if [ $(( global % (micro * gpus) )) -ne 0 ]; then
    echo "error: GLOBAL_BATCH $global is not a multiple of MICRO_BATCH $micro x $gpus GPUs" >&2
    return 2
  fi
  local tp="${TP:-1}"
  local -a tp_args=()
  if ! [[ "$tp" =~ ^[1-9][0-9]*$ ]] || [ $(( gpus % tp )) -ne 0 ]; then
    echo "error: TP=$tp must be a positive divisor of the $gpus GPUs" >&2
    return 2
  fi
  if [ "$tp" -gt 1 ]; then tp_args=(--tensor-model-parallel-size "$tp"); fi
  local -a precision=()
  if [ "${BF16:-1}" = 1 ]; then precision=(--bf16); fi  # [project] bf16 (DeiT: AMP fp16)
  local out="${OUT:-$DEIT_ROOT/runs/deit-$row}"
  local -a data=()
  if [ -n "${HF_DATASET:-}" ]; then
    data=(--hf-dataset "$HF_DATASET")
  elif [ -n "${DATA:-}" ]; then
    data=(--data-path "$DATA")
  elif [ "${DRY_RUN:-0}" = 1 ]; then
    data=(--data-path /path/to/imagenet)
  else
    echo "error: set DATA=/path/to/imagenet (train/ and val/) or HF_DATASET=imagenet-1k" >&2
    return 2
  fi
  local -a cmd=("$DEIT_PY" -m torch.distributed.run --standalone --nproc-per-node "$gpus"
    "$DEIT_ROOT/pretrain_vit.py" "${DEIT_RECIPE[@]}" "${row_args[@]}" "${data[@]}"
    --batch-size "$micro" --global-batch-size "$global"
    --expert-model-parallel-size "$ep"
    "${precision[@]}"
    "${tp_args[@]}"
    --save "$out/checkpoints" --load "$out/checkpoints" --tensorboard-dir "$out/tensorboard"
    "${extra[@]}")
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "# layout: world $gpus = TP $tp x DP $(( gpus / tp )); EP $ep" >&2
    printf '%q ' "${cmd[@]}"
    printf '\n'
    return 0
  fi
  mkdir -p "$out"
  "${cmd[@]}" 2>&1 | tee -a "$out/train.log"
}
