#!/usr/bin/env bash
# One node's part of a multi-node run, started by `srun` once per node (see slurm/train.sbatch): accelerate
# launch with this node's rank, the total process count and node 0's address, then the training script and
# its flags. Works for every training script in scripts/.
#
# Environment: SLURM_NNODES, SLURM_NODEID (set by srun), MASTER_ADDR (node 0's address), MASTER_PORT
# (default 29500), GPUS_PER_NODE (default: the GPUs torch sees), ACCELERATE_CONFIG (multi_node_ddp,
# multi_node_zero2, multi_node_zero3; default multi_node_ddp), PYTHON (default python),
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${SLURM_NNODES:?run under srun (or set SLURM_NNODES and SLURM_NODEID)}" "${SLURM_NODEID:?}" "${MASTER_ADDR:?}"
PYTHON=${PYTHON:-python}
MASTER_PORT=${MASTER_PORT:-29500}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-multi_node_ddp}
GPUS_PER_NODE=${GPUS_PER_NODE:-$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")}

cmd=("$PYTHON" -m accelerate.commands.launch --config_file "accelerate_configs/${ACCELERATE_CONFIG}.yaml"
     --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID"
     --num_processes "$((SLURM_NNODES * GPUS_PER_NODE))"
     --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
