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
#   CONFIG_FILE        the run's options as JSON (default: configs/float/example_config.json, the release-size
#                      model with bf16, batch 8, lr 1e-4, checkpoints every 2000 steps resumed from the latest)
#   PYTHON             the interpreter (default: python)
# Precedence: CONFIG_FILE < the data/output folders above < flags given to this script.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-multi_gpu}
NUM_GPUS=${NUM_GPUS:-$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")}
DATA_DIR=${DATA_DIR:-data/float}
VAL_DATA_DIR=${VAL_DATA_DIR:-data/float_val}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/float_rectified_flow}

CONFIG_FILE=${CONFIG_FILE:-configs/float/example_config.json}

args=(--config-file "$CONFIG_FILE" --data_dir "$DATA_DIR" --output_dir "$OUTPUT_DIR")
if [[ -f "$VAL_DATA_DIR/manifest.json" ]]; then
    args+=(--val_data_dir "$VAL_DATA_DIR" --early_stopping_patience 10)
fi
if [[ -n "${FLOAT_CKPT:-}" ]]; then
    args+=(--pretrained_float "$FLOAT_CKPT" --export_release)
fi

exec "$PYTHON" -m accelerate.commands.launch --config_file "accelerate_configs/${ACCELERATE_CONFIG}.yaml" \
    --num_processes "$NUM_GPUS" scripts/train_rectified_flow.py "${args[@]}" "$@"
