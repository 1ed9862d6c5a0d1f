#!/usr/bin/env bash
# The main job end to end: train a text decoder head, generate with it, score the generations.
#   With models/OmniFlow-v0.5 (python download_models.py --models omniflow clip_vit_l t5_large):
#     the user's example: baseline MLP head, 1 epoch, batch 4, lr 1e-4, on configs/data_config.json.
#   Without it: the embedded default, offline, a few minutes on 2 CPU cores: a tiny random OmniFlow
#     and a small sample set (scikit-image photos with their descriptions, lines of Shakespeare).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
export TOKENIZERS_PARALLELISM=false

if [ -d models/OmniFlow-v0.5 ]; then
    OUT=checkpoints/text_decoder_head_test/mlp_head
    "$PYTHON" scripts/train_text.py --model_path models/OmniFlow-v0.5 --data_config configs/data_config.json \
        --use_text_decoder_head --text_decoder_head_dim 64 --batch_size 4 --num_epochs 1 --lr 1e-4 --output_dir "$OUT"
    "$PYTHON" scripts/generate_text.py --model_path models/OmniFlow-v0.5 --checkpoint "$OUT/best_*" \
        --data_config configs/data_config.json --output "$OUT/predictions.json" --max_samples 200
    "$PYTHON" scripts/eval_text.py --predictions "$OUT/predictions.json" --by_task --output_json "$OUT/metrics.json"
    exit 0
fi

echo "models/OmniFlow-v0.5 not found: running the embedded default (tiny random OmniFlow + sample data, offline)"
TINY=models/tiny
OUT=checkpoints/embedded_example
[ -d "$TINY/OmniFlow-tiny" ] || "$PYTHON" scripts/make_tiny_omniflow.py --output_dir "$TINY" > /dev/null
[ -f data/sample/photos/train.jsonl ] || "$PYTHON" -m omniflow.data.sample_text --output_dir data/sample > /dev/null
rm -rf "$OUT"
MODEL=(--model_path "$TINY/OmniFlow-tiny" --models_dir "$TINY/models" --data_config configs/data_config_sample.json)
SAMPLING=(--num_inference_steps 8 --strength 0.3 --max_new_tokens 24 --batch_size 16)
"$PYTHON" scripts/train_text.py "${MODEL[@]}" --use_text_decoder_head --text_decoder_head_dim 64 \
    --batch_size 8 --max_train_steps 300 --lr 1e-2 --noise_shift 0.1 --eval_interval 150 \
    --max_eval_samples 32 --logging_steps 25 --report_to tensorboard --output_dir "$OUT/mlp_head"
"$PYTHON" scripts/generate_text.py "${MODEL[@]}" "${SAMPLING[@]}" --checkpoint none --output "$OUT/before_training.json"
"$PYTHON" scripts/generate_text.py "${MODEL[@]}" "${SAMPLING[@]}" --checkpoint "$OUT/mlp_head/best_*" \
    --output "$OUT/after_training.json"
"$PYTHON" - "$OUT/mlp_head/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if '"ce"' in line]
print(f"training cross-entropy of the head: {rows[0]['ce']:.3f} (step {rows[0]['step']}) -> "
      f"{rows[-1]['ce']:.3f} (step {rows[-1]['step']}); token accuracy {rows[0]['token_accuracy']:.3f} -> "
      f"{rows[-1]['token_accuracy']:.3f}")
PY
echo "Scores of real sampling on the sample validation sets. The backbone and decoder are tiny and random:"
echo "they cannot write readable text, so both rows stay near zero; the run shows the pipeline end to end."
"$PYTHON" scripts/eval_text.py --predictions "$OUT/before_training.json" "$OUT/after_training.json" --by_task \
    --output_json "$OUT/metrics.json"
