#!/usr/bin/env bash
# Example launch of FLOAT rectified-flow training with accelerate.
#
#   scripts/train_rectified_flow.sh [flags for train_rectified_flow.py, e.g. --config small --batch-size 4]
#
# Environment (all optional):
#   ACCELERATE_CONFIG  accelerate_configs/<name>.yaml: multi_gpu (DDP, default), zero2 (DeepSpeed ZeRO-2),
#                      single_gpu, cpu
#   NUM_GPUS           processes (default: the visible GPUs, at least 1)
#   DATA_DIR, VAL_DATA_DIR, OUTPUT_DIR   preprocessed training / validation data and the run folder
#   FLOAT_CKPT         a released float.pth: fine-tune from it (its motion auto-encoder renders the samples)
#   PYTHON             the interpreter (default: python)
# Flags given to this script come last and override the defaults below.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-multi_gpu}
NUM_GPUS=${NUM_GPUS:-$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")}
DATA_DIR=${DATA_DIR:-data/float}
VAL_DATA_DIR=${VAL_DATA_DIR:-data/float_val}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/float_rectified_flow}

args=(--data_dir "$DATA_DIR" --output_dir "$OUTPUT_DIR" --mixed_precision bf16 --batch_size 8
      --learning_rate 1e-4 --checkpointing_steps 2000 --checkpoints_total_limit 3 --resume_from_checkpoint latest
      --sample_interval 2000 --report_to tensorboard)
if [[ -f "$VAL_DATA_DIR/manifest.json" ]]; then
    args+=(--val_data_dir "$VAL_DATA_DIR" --eval_interval 1000 --early_stopping_patience 10)
fi
if [[ -n "${FLOAT_CKPT:-}" ]]; then
    args+=(--pretrained_float "$FLOAT_CKPT" --export_release)
fi

exec "$PYTHON" -m accelerate.commands.launch --config_file "accelerate_configs/${ACCELERATE_CONFIG}.yaml" \
    --num_processes "$NUM_GPUS" scripts/train_rectified_flow.py "${args[@]}" "$@"
