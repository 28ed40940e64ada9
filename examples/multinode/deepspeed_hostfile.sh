#!/usr/bin/env bash
# One Table 1 row on many nodes with the `deepspeed` launcher and a hostfile. Run it once, on the
# first host of the hostfile: the launcher reaches every host over passwordless ssh (pdsh by
# default) and starts `python -m deepspeed.launcher.launch --node_rank=<i>` there, which starts
# one process per slot. Every node needs this repository and its .venv at the same path.
#   HOSTS="node0 node1" GPUS_PER_NODE=8 ROW=self bash examples/multinode/deepspeed_hostfile.sh
#   HOSTFILE=/job/hostfile ROW=learned bash examples/multinode/deepspeed_hostfile.sh
#
# Environment (defaults in brackets; model, data and the rest as in examples/gpt2/settings.sh):
#   ROW            dense | learned | self | fixed_random | random [self]
#   HOSTFILE       DeepSpeed hostfile, lines "host slots=N" [written to OUT_DIR/hostfile from HOSTS]
#   HOSTS          hosts for the generated hostfile, space-separated (used when HOSTFILE is unset)
#   NNODES         nodes to use, the first ones of the hostfile [all of them]
#   GPUS_PER_NODE  processes per node [the first host's slots; with HOSTS: visible GPUs, else 1]
#   EP             expert-model-parallel size [largest divisor of the experts <= GPUS_PER_NODE]
#   SCALE          paper | tiny [paper]; DATA_PATH, OUT_DIR as in settings.sh
#   MASTER_ADDR    address of the rank-0 host, reachable from all [the first host]
#   MASTER_PORT    [29500]
#   DS_LAUNCHER    the launcher's multi-node backend: pdsh | openmpi | mvapich | slurm ... [pdsh]
#   SSH_PORT       ssh port for pdsh [ssh's default]
#   EXPORT_VARS    variables passed to every node [DS_ACCELERATOR OMP_NUM_THREADS NCCL_DEBUG
#                  NCCL_SOCKET_IFNAME NCCL_IB_HCA GLOO_SOCKET_IFNAME CUDA_DEVICE_MAX_CONNECTIONS
#                  HF_HOME TIKTOKEN_CACHE_DIR; those set]. The launcher itself only forwards
#                  PYTHON*, MLFLOW*, MV2*, UCX* variables, so the others go through a DeepSpeed
#                  environment file (DS_ENV_FILE=OUT_DIR/<row>.deepspeed_env) unless DS_ENV_FILE
#                  is set already (then ~/.deepspeed_env-style files are yours to manage).
#   DRY_RUN        1: print the hostfile and the deepspeed command instead of running it [0]
# Extra arguments go to pretrain_gpt.py.
# Logs: pdsh prefixes every remote line with "host: "; each line goes to the log of its node,
# OUT_DIR/logs/<row>_node<i>.log (i = the host's position in the hostfile); the launcher's own
# lines go to node 0's log. Run it from the first host so that node 0's log is its own.
set -euo pipefail

ROW="${ROW:-self}"

# The hosts (and slots) from HOSTFILE, or HOSTS.
HOST_NAMES=()
HOST_SLOTS=()
if [ -n "${HOSTFILE:-}" ]; then
  if [ ! -f "$HOSTFILE" ]; then
    echo "deepspeed_hostfile.sh: HOSTFILE $HOSTFILE does not exist" >&2
    exit 2
  fi
  HOSTFILE="$(cd "$(dirname "$HOSTFILE")" && pwd)/$(basename "$HOSTFILE")"  # launched from the repo
  while read -r line || [ -n "$line" ]; do
    if [[ "$line" =~ ^([^[:space:]#]+)[[:space:]]+slots=([0-9]+) ]]; then
      HOST_NAMES+=("${BASH_REMATCH[1]}")
      HOST_SLOTS+=("${BASH_REMATCH[2]}")
    fi
  done < "$HOSTFILE"
  if [ "${#HOST_NAMES[@]}" -eq 0 ]; then
    echo "deepspeed_hostfile.sh: no 'host slots=N' line in $HOSTFILE" >&2
    exit 2
  fi
  GPUS_PER_NODE="${GPUS_PER_NODE:-${HOST_SLOTS[0]}}"
elif [ -n "${HOSTS:-}" ]; then
  read -r -a HOST_NAMES <<< "$HOSTS"
else
  echo "deepspeed_hostfile.sh: set HOSTFILE (lines 'host slots=N') or HOSTS='node0 node1'" >&2
  exit 2
fi
NNODES="${NNODES:-${#HOST_NAMES[@]}}"
if [ "$NNODES" -gt "${#HOST_NAMES[@]}" ]; then
  echo "deepspeed_hostfile.sh: NNODES=$NNODES but there are ${#HOST_NAMES[@]} hosts" >&2
  exit 2
fi
MASTER_ADDR="${MASTER_ADDR:-${HOST_NAMES[0]}}"
NODE_RANK=0

# shellcheck source=examples/gpt2/settings.sh
source "$(dirname "${BASH_SOURCE[0]}")/../gpt2/settings.sh"
ROW="$(msr_row_name "$ROW")"
msr_trainer_args "$ROW" "$@"

HOSTFILE_LINES=()
if [ -n "${HOSTFILE:-}" ]; then
  mapfile -t HOSTFILE_LINES < "$HOSTFILE"
else
  for h in "${HOST_NAMES[@]}"; do HOSTFILE_LINES+=("$h slots=$GPUS_PER_NODE"); done
  HOSTFILE="$OUT_DIR/hostfile"
fi

CMD=("$(msr_tool deepspeed)" --hostfile "$HOSTFILE" --num_nodes "$NNODES" --num_gpus "$GPUS_PER_NODE"
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --launcher "${DS_LAUNCHER:-pdsh}")
if [ -n "${SSH_PORT:-}" ]; then CMD+=(--ssh_port "$SSH_PORT"); fi
CMD+=("$MSR_ROOT/pretrain_gpt.py" "${TRAINER_ARGS[@]}")

# Variables every node needs, through DeepSpeed's environment file ("NAME=value" lines).
ENV_LINES=()
WRITE_ENV_FILE=0
if [ -z "${DS_ENV_FILE:-}" ]; then
  WRITE_ENV_FILE=1
  read -r -a export_vars <<< "${EXPORT_VARS:-DS_ACCELERATOR OMP_NUM_THREADS NCCL_DEBUG \
NCCL_SOCKET_IFNAME NCCL_IB_HCA GLOO_SOCKET_IFNAME CUDA_DEVICE_MAX_CONNECTIONS HF_HOME \
TIKTOKEN_CACHE_DIR}"
  for v in "${export_vars[@]}"; do
    if [ -n "${!v:-}" ]; then ENV_LINES+=("$v=${!v}"); fi
  done
  export DS_ENV_FILE="$OUT_DIR/$ROW.deepspeed_env"
fi

if [ "$DRY_RUN" = 1 ]; then
  echo "# hostfile $HOSTFILE:"
  printf '#   %s\n' "${HOSTFILE_LINES[@]}"
  if [ "${#ENV_LINES[@]}" -gt 0 ]; then
    echo "# DS_ENV_FILE $DS_ENV_FILE:"
    printf '#   %s\n' "${ENV_LINES[@]}"
  fi
  msr_quote "${CMD[@]}"
  exit 0
fi

mkdir -p "$OUT_DIR" "$LOG_DIR"
if [ ! -f "$HOSTFILE" ]; then printf '%s\n' "${HOSTFILE_LINES[@]}" > "$HOSTFILE"; fi
if [ "$WRITE_ENV_FILE" = 1 ]; then
  # (no blank line: the launcher splits every line at its first "=")
  : > "$DS_ENV_FILE"
  if [ "${#ENV_LINES[@]}" -gt 0 ]; then printf '%s\n' "${ENV_LINES[@]}" > "$DS_ENV_FILE"; fi
fi

# Split the merged output into one log per node by pdsh's "host: " prefix.
split_logs() {
  awk -v dir="$LOG_DIR" -v row="$ROW" -v hosts="${HOST_NAMES[*]:0:NNODES}" '
    BEGIN { n = split(hosts, h, " "); for (i = 1; i <= n; i++) node[h[i]] = i - 1 }
    {
      print; fflush()
      i = 0; line = $0
      p = index($0, ": ")
      if (p > 1 && (substr($0, 1, p - 1) in node)) { i = node[substr($0, 1, p - 1)]; line = substr($0, p + 2) }
      f = dir "/" row "_node" i ".log"
      print line >> f; fflush(f)
    }'
}

cd "$MSR_ROOT"
for ((i = 0; i < NNODES; i++)); do
  printf '==== %s %s: %s\n' "$(date '+%F %T')" "${HOST_NAMES[$i]}" "${CMD[*]}" >> "$LOG_DIR/${ROW}_node$i.log"
done
"${CMD[@]}" 2>&1 | split_logs
