#!/usr/bin/env bash
# GPU report: a first hour on a GPU that checks itself (about 8 minutes on one H100/H200).
#   1. CUDA checks (pytest -m gpu tests/gpu): bf16 grouped GEMM and the expert loop against an
#      fp64 reference, no host sync in the single-GPU MoE layer nor in a training micro-batch,
#      deterministic mode; then tools/first_hour.py: fp32 losses here against the CPU losses
#      recorded in the repository, bf16 drift against fp32, --deterministic repeats.
#   2. tools/bench_moe.py in bf16 at GPT-2 small shapes (grouped expert compute, then the loop);
#      tools/bench_train.py (framework step vs a bare loop; small MoE, GPT-2 small MoE bf16).
#   3. Short GPT-2 small training runs (dense; MoE with 8 experts top-2 in every layer, self
#      router, automatic expert compute; the same MoE with the per-expert loop; dense and MoE
#      with --compile; seq 1024, bf16, mock data): tokens/s and MFU of the last logged interval.
# Pre-registered bounds print as PASS/FAIL (summary.md); the exit status is 1 when
# a stage failed (a failed check is a result, not a failure of the script).
# Everything lands in $OUT (8 files at most); summary.md is the table for docs/PERFORMANCE.md.
#
# Environment: PYTHON (./.venv/bin/python if present, else python3), OUT (runs/gpu_report),
# ITERS (40), MBS (16), WHEELS (./.whl: *.whl there are installed into a private folder first,
# see tools/offline_wheels.sh), STAGE_TIMEOUT (150 s per stage), COMPILE_TIMEOUT (240 s for the
# --compile runs), REPORT_BUDGET (540 s: a stage gets at most what is left of it, less 20 s for
# the summary, and is skipped when under 30 s are left, so summary.md is always written; a report
# cut short anyway is summarised by `python tools/gpu_summary.py OUT`), SMOKE=1 (tiny shapes on
# whatever device there is: tests the script itself on a CPU machine; the CUDA checks then run
# only if CUDA is present).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
OUT="${OUT:-$ROOT/runs/gpu_report}"
ITERS="${ITERS:-40}"
MBS="${MBS:-16}"
SMOKE="${SMOKE:-0}"
STAGE_TIMEOUT="${STAGE_TIMEOUT:-150}"
COMPILE_TIMEOUT="${COMPILE_TIMEOUT:-240}"
REPORT_BUDGET="${REPORT_BUDGET:-540}"
WHEELS="${WHEELS:-$ROOT/.whl}"
mkdir -p "$OUT"
# a stage that does not run must not leave an earlier report's numbers for the summary to read
rm -f "$OUT/first_hour.json" "$OUT/bench_moe.json" "$OUT/bench_train.json" "$OUT/summary.md"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
failed=()

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  site="$(mktemp -d)"
  echo "installing $(find "$WHEELS" -name '*.whl' | wc -l) wheels from $WHEELS into $site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    "$WHEELS"/*.whl || { echo "gpu_report: installing $WHEELS/*.whl failed" >&2; exit 2; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

# Preflight: one line naming the device and versions, or one line naming what is missing.
preflight_err="$(mktemp)"
if ! "$PYTHON" - 2> "$preflight_err" <<'PY' | grep '^device: ' > "$OUT/device.txt"
import importlib, sys
missing = []
for name in ("torch", "deepspeed", "numpy", "tiktoken", "tqdm", "psutil", "pytest"):
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    sys.exit("gpu_report: cannot import " + "; ".join(missing)
             + " (build wheels with tools/offline_wheels.sh, or set PYTHON)")
import deepspeed, torch
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA)"
print(f"device: {dev} | torch {torch.__version__} | cuda {torch.version.cuda} | "
      f"deepspeed {deepspeed.__version__} | python {sys.version.split()[0]}")
PY
then
  tail -n 1 "$preflight_err" >&2
  exit 2
fi
date -u +"date: %Y-%m-%d %H:%M UTC" >> "$OUT/device.txt"
if command -v nvidia-smi > /dev/null; then  # the card's state as found (clocks, power cap)
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
    --format=csv,noheader 2>/dev/null | sed 's/^/nvidia-smi: /' >> "$OUT/device.txt" || true
fi
if ! grep -q "no CUDA" "$OUT/device.txt"; then  # what every training stage needs, named early
  timeout 60 "$PYTHON" - >> "$OUT/device.txt" 2> /dev/null <<'PY' || echo "nccl: check crashed or timed out" >> "$OUT/device.txt"
import os, torch, torch.distributed as dist
cap = torch.cuda.get_device_capability()
print(f"capability: {cap[0]}.{cap[1]} | torch._grouped_mm: "
      f"{'present' if hasattr(torch, '_grouped_mm') else 'absent (the loop is used)'}")
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
try:  # the training stages' backend, at one rank
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    t = torch.ones(4, device="cuda")
    dist.all_reduce(t)
    torch.cuda.synchronize()
    dist.destroy_process_group()
    print("nccl: ok (one-rank all-reduce)")
except Exception as e:  # noqa: BLE001 - reported, the stages then show what follows
    print(f"nccl: FAILED ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
PY
fi
cat "$OUT/device.txt"
if grep -q "no CUDA" "$OUT/device.txt"; then
  if [ "$SMOKE" != 1 ]; then
    echo "gpu_report: no CUDA device (SMOKE=1 runs the script at tiny shapes on the CPU)" >&2
    exit 2
  fi
  export DS_ACCELERATOR=cpu
else
  export DS_ACCELERATOR=cuda
fi

# run_stage name log command...: each stage bounded by STAGE_TIMEOUT and what is left of
# REPORT_BUDGET; the report goes on after a failure. OK_RC (default "0") lists the exit codes
# that are results, not failures (first_hour.py exits 3 when a check fails).
run_stage() {
  local name="$1" log="$2"
  shift 2
  echo "== $name ==" | tee -a "$log"
  local left=$((REPORT_BUDGET - SECONDS - 20)) limit="$STAGE_TIMEOUT"
  if [ "$left" -lt 30 ]; then
    echo "!! $name skipped: REPORT_BUDGET=${REPORT_BUDGET}s is spent" | tee -a "$log"
    failed+=("$name (skipped: budget)")
    return 0
  fi
  [ "$left" -lt "$limit" ] && limit="$left"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc="${PIPESTATUS[0]}"
  case " ${OK_RC:-0} " in
    *" $rc "*) ;;
    *)
      echo "!! $name failed (exit $rc; 124 = over its ${limit}s)" | tee -a "$log"
      failed+=("$name (exit $rc, $(basename "$log"))")
      ;;
  esac
  return 0
}

: > "$OUT/gpu_checks.log"
if [ "$DS_ACCELERATOR" = cuda ]; then
  # cuBLAS reads its workspace setting once per process: set before the deterministic checks
  run_stage "CUDA checks" "$OUT/gpu_checks.log" env CUBLAS_WORKSPACE_CONFIG=:4096:8 \
    "$PYTHON" -m pytest -q -s -m gpu tests/gpu
else
  echo "CUDA checks not run: no CUDA device (SMOKE mode)" | tee "$OUT/gpu_checks.log"
fi

if [ "$SMOKE" = 1 ]; then
  FIRST_HOUR=(--steps 5 --no-reference)
  BENCH=(--tokens 256 --hidden 64 --ffn 128 --reps 2 --imbalance 0.37 --dtype bf16)
  BENCH_TRAIN=(--rounds 1 --steps 1 --warmup 1)
  BENCH_TRAIN_BIG=(--shape small --rounds 1 --steps 1 --warmup 1)
  SHAPE=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64
         --vocab-size 512 --peak-tflops 1)
  COMPILE=(--compile --compile-backend aot_eager)  # inductor costs minutes on a CPU
else
  FIRST_HOUR=()
  BENCH=(--tokens 16384 --reps 10 --dtype bf16)
  BENCH_TRAIN=()
  BENCH_TRAIN_BIG=(--shape gpt2-small --rounds 3 --steps 3)
  SHAPE=(--num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 1024
         --vocab-size 50257)
  COMPILE=(--compile)
fi
# First-hour numerics (tools/first_hour.py): fp32 here vs the recorded CPU losses, bf16 drift,
# --deterministic repeats; PASS/FAIL lines against its pre-registered bounds.
OK_RC="0 3" run_stage "first-hour numerics" "$OUT/gpu_checks.log" \
  env CUBLAS_WORKSPACE_CONFIG=:4096:8 "$PYTHON" tools/first_hour.py \
  "${FIRST_HOUR[@]+"${FIRST_HOUR[@]}"}" --json "$OUT/first_hour.json"

: > "$OUT/bench.log"
run_stage "bench_moe, bf16, grouped expert compute (auto)" "$OUT/bench.log" \
  "$PYTHON" tools/bench_moe.py "${BENCH[@]}" --json "$OUT/bench_moe.json"
run_stage "bench_moe, bf16, per-expert loop" "$OUT/bench.log" \
  "$PYTHON" tools/bench_moe.py "${BENCH[@]}" --expert-compute loop --dispatchers alltoall
run_stage "bench_train, small MoE" "$OUT/bench.log" "$PYTHON" tools/bench_train.py --moe \
  "${BENCH_TRAIN[@]+"${BENCH_TRAIN[@]}"}" --json "$OUT/bench_train.json"
run_stage "bench_train, GPT-2 small MoE, bf16" "$OUT/bench.log" "$PYTHON" tools/bench_train.py \
  --moe "${BENCH_TRAIN_BIG[@]}" -- --bf16

COMMON=("${SHAPE[@]}" --bf16 --mock-data --tokenizer-type NullTokenizer
        --micro-batch-size "$MBS" --train-iters "$ITERS" --log-interval 10
        --eval-interval 100000 --eval-iters 0 --lr 6e-4 --min-lr 6e-5 --lr-warmup-iters 10)
MOE=(--num-experts 8 --moe-router-topk 2 --router-type self)
: > "$OUT/train.log"
for variant in dense moe moe_loop dense_compile moe_compile; do
  extra=()
  case "$variant" in
    moe) extra=("${MOE[@]}") ;;
    moe_loop) extra=("${MOE[@]}" --moe-grouped-gemm loop) ;;
    dense_compile) extra=("${COMPILE[@]}") ;;
    moe_compile) extra=("${MOE[@]}" "${COMPILE[@]}") ;;
  esac
  limit="$STAGE_TIMEOUT"
  case "$variant" in *compile) limit="$COMPILE_TIMEOUT" ;; esac
  STAGE_TIMEOUT="$limit" run_stage "train $variant" "$OUT/train.log" \
    "$PYTHON" pretrain_gpt.py "${COMMON[@]}" ${extra[@]+"${extra[@]}"}
done

# summary.md: the last logged interval of each run (the first interval includes warm-up) and
# every pre-registered check as PASS/FAIL.
"$PYTHON" tools/gpu_summary.py "$OUT" "$SMOKE" | tee "$OUT/summary.md" \
  || failed+=("summary (see above)")
if [ "${#failed[@]}" -gt 0 ]; then
  printf 'failed stage: %s\n' "${failed[@]}" | tee -a "$OUT/summary.md"
  exit 1
fi
