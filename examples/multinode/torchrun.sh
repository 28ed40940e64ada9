#!/usr/bin/env bash
# One Table 1 row on many nodes with torchrun's c10d rendezvous. Run it on every node with the
# same environment except NODE_RANK, e.g. on 2 nodes of 8 GPUs:
#   node0$ NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 ROW=self bash examples/multinode/torchrun.sh
#   node1$ NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 ROW=self bash examples/multinode/torchrun.sh
# Each node's torchrun starts GPUS_PER_NODE processes; ranks are assigned at the rendezvous, which
# the torchrun agent on MASTER_ADDR hosts (a c10d store on MASTER_PORT).
#
# Environment (defaults in brackets; model, data and the rest as in examples/gpt2/settings.sh):
#   ROW            dense | learned | self | fixed_random | random [self]
#   NNODES         nodes [2]; NODE_RANK this node, 0..NNODES-1 [0] (names its log)
#   GPUS_PER_NODE  processes per node [visible GPUs, else 1]
#   EP             expert-model-parallel size [largest divisor of the experts <= GPUS_PER_NODE]
#   SCALE          paper | tiny [paper]; DATA_PATH, OUT_DIR as in settings.sh
#   MASTER_ADDR    rendezvous host, reachable from every node [127.0.0.1: one machine only]
#   MASTER_PORT    rendezvous port [29500]; RDZV_ID rendezvous id, same on all nodes [msr-ROW]
#   MAX_RESTARTS   torchrun --max-restarts: restart every worker after a failure, resuming from
#                  the latest checkpoint (--load) [0]; tested on one node; on several nodes
#                  torchrun counts restarts per node, see docs/RELIABILITY.md before raising it
#   DRY_RUN        1: print the torchrun command instead of running it [0]
# Extra arguments go to pretrain_gpt.py. Log: OUT_DIR/logs/<row>_node${NODE_RANK}.log (appended).
# On SIGTERM torchrun forwards the signal to its workers, which save a checkpoint and exit
# (--exit-signal-handler); it gives them 30 s before SIGKILL. Re-running resumes (--load).
set -euo pipefail

ROW="${ROW:-self}"
export NNODES="${NNODES:-2}"
if [ "$NNODES" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  echo "torchrun.sh: MASTER_ADDR is not set; using 127.0.0.1 (all nodes on this machine)" >&2
fi
# shellcheck source=examples/gpt2/settings.sh
source "$(dirname "${BASH_SOURCE[0]}")/../gpt2/settings.sh"
ROW="$(msr_row_name "$ROW")"
RDZV_ID="${RDZV_ID:-msr-$ROW}"

msr_trainer_args "$ROW" "$@"
CMD=(
  "$(msr_tool torchrun)"
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE"
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID"
  --max-restarts "${MAX_RESTARTS:-0}"
  "$MSR_ROOT/pretrain_gpt.py" "${TRAINER_ARGS[@]}"
)
cd "$MSR_ROOT"
msr_run "$LOG_DIR/${ROW}_node${NODE_RANK}.log" "${CMD[@]}"
