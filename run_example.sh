#!/usr/bin/env bash
# The main job in one go: train a text decoder head, generate before/after, score both.
#
#   ./run_example.sh            (PYTHON=... to choose the interpreter; default .venv/bin/python)
#
# With models/OmniFlow-v0.5: the README's example (baseline MLP head, 1 epoch, batch 4, lr 1e-4) on
# configs/data_config.json (local data from scripts/download_data.py), output
# checkpoints/text_decoder_head_test/mlp_head/. Without it: the embedded default, built offline
# (the sample data, and a tiny OmniFlow, random but for a text decoder fitted to the sample texts and
# a transformer pre-trained on captioning the sample photos): a memorisation check on 4 photos and 4
# sentences, captioned and rewritten before and after training (a tiny backbone trained on 21 photos
# cannot generalise), about 4 minutes on 2 CPU cores from scratch.
# Every run starts its output folder afresh; the tiny model and sample data are built once.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS

if [ -d models/OmniFlow-v0.5 ]; then
  MODEL=(--model_path models/OmniFlow-v0.5 --models_dir models)
  DATA=configs/data_config.json
  OUT=checkpoints/text_decoder_head_test/mlp_head
  TRAIN=(--batch_size 4 --num_epochs 1 --lr 1e-4 --mixed_precision bf16 --gradient_checkpointing
         --log_interval 100 --eval_interval 500 --save_interval 2000)
  GENERATE=(--max_samples 50 --batch_size 4)
else
  echo "models/OmniFlow-v0.5 not found: running the embedded default (tiny OmniFlow + sample data, built offline; the head memorises 4 photo captions and 4 Sonnet sentences and is scored on texts sampled for those same examples: a check that it learns, not a benchmark)"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # the tiny models gain nothing from more threads
  $PYTHON -m omniflow.text_job.example | sed '/^model/d'  # builds data/sample and models/tiny-fitted once
  TINY=models/tiny-fitted
  MODEL=(--model_path $TINY/OmniFlow-tiny --models_dir $TINY/models)
  DATA=configs/text_head/tiny_example_data.json
  OUT=checkpoints/text_decoder_head_test/tiny_mlp_head
  TRAIN=(--batch_size 4 --max_train_steps 500 --lr 1e-2 --report_to none --validation_inference_steps 10
         --log_interval 100 --eval_interval 250 --save_interval 250)
  GENERATE=(--strength 0.1 --num_inference_steps 10 --max_new_tokens 40)
fi

rm -rf "$OUT"
$PYTHON scripts/train_text.py "${MODEL[@]}" --data_config "$DATA" --use_text_decoder_head --text_decoder_head_dim 64 \
  "${TRAIN[@]}" --output_dir "$OUT"
$PYTHON scripts/generate_text.py "${MODEL[@]}" --data_config "$DATA" "${GENERATE[@]}" --checkpoint none \
  --output "$OUT/before.json"
$PYTHON scripts/generate_text.py "${MODEL[@]}" --data_config "$DATA" "${GENERATE[@]}" --checkpoint "$OUT/best_*" \
  --output "$OUT/after.json"
$PYTHON scripts/eval_text.py --predictions "$OUT/before.json" "$OUT/after.json" --by_task --output_json "$OUT/eval_results.json"
echo "before.json: the released text_output (no head); after.json: the trained head ($OUT/best_head). $((SECONDS - start)) s"
