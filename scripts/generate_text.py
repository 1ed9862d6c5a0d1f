"""Generate texts with OmniFlow and a trained text decoder head (or the released text_output).

    python scripts/generate_text.py --model_path models/OmniFlow-v0.5 \
        --checkpoint 'checkpoints/baseline_head/best_*' --data_config configs/data_config.json \
        --output predictions.json --batch_size 4

Real sampling, never teacher forcing: the text latent starts from noise (image->text, audio->text) or
from the source text's latent noised to --strength (text->text), flow steps follow with the head as
the x0 predictor (a 64-d head) and as the source of the final decoder prefix, optionally with
classifier-free guidance, then KV-cached greedy or beam decoding. --checkpoint none scores the
released model. Writes a JSON list of {"id", "task", "dataset", "prediction", "references"}.
"""
import logging
from dataclasses import dataclass, field, replace
from typing import Optional

from omniflow.runtime.errors import ConfigError, run_main
from omniflow.runtime.options import parse_options
from omniflow.runtime.reports import write_json_atomic
from omniflow.text_job.checkpoints import load_head_for, resolve_head_checkpoint

logger = logging.getLogger("omniflow")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # --dtype -> torch dtype name


@dataclass
class GenerateOptions:
    model_path: str = field(default="", metadata={"help": "OmniFlow folder (e.g. models/OmniFlow-v0.5)"})
    models_dir: str = field(default="models", metadata={"help": "folder of the external models (T5, CLIP, ...)"})
    checkpoint: str = field(default="none", metadata={
        "help": "head export folder, its safetensors file, a training output folder (uses best_head/), a glob "
                "such as 'checkpoints/x/best_*', or none (the released text_output)"})
    data_config: str = field(default="", metadata={"help": "data config JSON naming the sets to caption"})
    output: str = field(default="predictions.json", metadata={"help": "where the predictions are written"})
    split: Optional[str] = field(default=None, metadata={
        "help": "split to read from every set (default: each set's eval_split)"})
    max_samples: Optional[int] = field(default=None, metadata={"help": "first N examples of each set"})
    batch_size: int = field(default=4, metadata={"help": "examples per sampling batch"})
    num_inference_steps: int = field(default=28, metadata={"help": "flow steps over the text latent"})
    guidance_scale: Optional[float] = field(default=None, metadata={
        "help": "classifier-free guidance scale (default 1: none; the heads are trained on conditional inputs)"})
    strength: float = field(default=0.6, metadata={
        "help": "text->text: how far the source latent is noised before denoising (0: a text-VAE round trip)"})
    num_beams: int = field(default=1, metadata={"help": "1: greedy decoding, > 1: beam search"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens generated per text at most"})
    seed: int = field(default=0, metadata={"help": "seed of the sampling noise"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA if present), cpu, cuda, cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "model dtype: auto (bf16 on CUDA, fp32 on CPU)",
                                                 "choices": ["auto", *DTYPES]})

    def validate(self) -> None:
        for name in ("model_path", "data_config"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        for name in ("batch_size", "num_inference_steps", "num_beams", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.strength <= 1.0:
            raise ConfigError(f"--strength must lie in [0, 1], got {self.strength}")


def evaluation_sets(opts: GenerateOptions) -> tuple[set[str], dict]:
    """The tasks and the evaluation datasets (by set name) of the data config, on the chosen split."""
    from omniflow.data.text import build_eval_datasets, load_data_config

    config = load_data_config(opts.data_config)
    specs = [replace(spec, eval_split=opts.split or spec.eval_split) for spec in config.datasets]
    specs = [replace(spec, max_samples=opts.max_samples or spec.max_samples) for spec in specs if spec.eval_split]
    if not specs:
        raise ConfigError(f"{opts.data_config}: no dataset has an eval_split; pass --split")
    return {spec.task for spec in specs}, build_eval_datasets(replace(config, datasets=specs))


def main():
    opts = parse_options(GenerateOptions, description=__doc__.split("\n\n")[0])
    # Imported once the flags are valid: --help and a wrong flag answer in a fraction of a second.
    import torch

    from omniflow.data import ResumableLoader
    from omniflow.data.text import collate_examples
    from omniflow.runtime.tracking import progress, setup_logging
    from omniflow.text_job.model import TextJobModel

    setup_logging(None, True)
    device = torch.device(opts.device if opts.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[opts.dtype] if opts.dtype != "auto" else
                    "bfloat16" if device.type == "cuda" else "float32")
    head_path = resolve_head_checkpoint(opts.checkpoint)
    tasks, sets = evaluation_sets(opts)
    job = TextJobModel.load(opts.model_path, tasks, models_dir=opts.models_dir, training=False, device=device,
                            dtype=dtype)
    stack = None
    if head_path is not None:
        stack = load_head_for(head_path, job.transformer.config.joint_attention_dim, job.text_vae.vae_dim,
                              job.text_vae.hidden_size, device)
    logger.info("generating with %s", head_path or "the released text_output (no head)")
    records = []
    for k, (name, dataset) in enumerate(sets.items()):
        loader = ResumableLoader(dataset, opts.batch_size, collate_fn=collate_examples, shuffle=False,
                                 drop_last=False)
        batches = progress(loader, total=None if loader.iterable else len(loader), desc=f"generate {name}",
                           unit="batch")
        for index, batch in enumerate(batches):
            generator = torch.Generator().manual_seed(opts.seed + 10_000 * k + index)
            texts = job.generate(batch, stack, guidance_scale=opts.guidance_scale, strength=opts.strength,
                                 generator=generator, num_inference_steps=opts.num_inference_steps,
                                 max_new_tokens=opts.max_new_tokens, num_beams=opts.num_beams)
            records += [{"id": i, "task": task, "dataset": name, "prediction": text.strip(), "references": refs}
                        for i, task, text, refs in zip(batch["id"], batch["task"], texts, batch["references"])]
        logger.info("%s: %d texts", name, sum(r["dataset"] == name for r in records))
    write_json_atomic(opts.output, records)
    print(f"wrote {len(records)} predictions to {opts.output}")


if __name__ == "__main__":
    run_main(main)
