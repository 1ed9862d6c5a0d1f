"""Under ZeRO-3 (zero3_init_flag), report whether from_pretrained partitions a model built inside
and outside ``frozen_init_context``. Run with accelerate launch + accelerate_configs/zero3.yaml."""
import json
import sys

from transformers import GPT2Config, GPT2LMHeadModel

from omniflow.runtime.launch import build_accelerator, frozen_init_context

folder, out_dir = sys.argv[1], sys.argv[2]
GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=8)).save_pretrained(folder)
accelerator = build_accelerator(out_dir, report_to="none")
with frozen_init_context(accelerator):
    frozen = GPT2LMHeadModel.from_pretrained(folder)
trainable = GPT2LMHeadModel.from_pretrained(folder)
print(json.dumps({
    "frozen_numel": frozen.transformer.wte.weight.numel(),
    "trainable_numel": trainable.transformer.wte.weight.numel(),
    "trainable_partitioned": hasattr(trainable.transformer.wte.weight, "ds_id"),
    "frozen_partitioned": hasattr(frozen.transformer.wte.weight, "ds_id"),
}))
