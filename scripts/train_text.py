"""Train a text decoder head on a frozen OmniFlow (the user's experiment grid).

    python scripts/train_text.py --model_path models/OmniFlow-v0.5 --data_config configs/data_config.json \
        --use_text_decoder_head --text_decoder_head_dim 64 [--use_latent_refiner] [--use_vq_codebook] \
        --batch_size 8 --num_epochs 1 --lr 1e-4 --output_dir checkpoints/baseline_head

Only the head stack trains; the transformer (run without gradients) and the text-VAE decoder (gradients
flow through it to the head, its weights stay frozen) are loaded frozen. Loss per batch: shifted
next-token cross-entropy of the frozen decoder on the target text (padding masked) + lambda * MSE to the
target's text latent + the VQ loss (see omniflow/text_job/model.py). Every --eval_interval steps (and at
the end) the validation splits are scored; the lowest validation loss is exported to
<output_dir>/best_head/, the last step to <output_dir>/final_head/ (safetensors + config.json), and texts
sampled for the first --num_validation_samples examples of each set go to <output_dir>/samples/step-N.json.
"""
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omniflow.models.text_head_options import TextHeadOptions
from omniflow.runtime.errors import ConfigError, run_main
from omniflow.runtime.options import parse_options
from omniflow.runtime.training_options import TrainingOptions
from omniflow.text_job.checkpoints import BEST_HEAD, FINAL_HEAD, head_config

logger = logging.getLogger("omniflow")


@dataclass
class TextTrainOptions:
    model_path: str = field(default="", metadata={
        "help": "OmniFlow folder (models/OmniFlow-v0.5: python download_models.py --models omniflow)"})
    models_dir: str = field(default="models", metadata={
        "help": "where download_models.py put the external models (flan-t5-large, CLIP, AudioLDM2 VAE)"})
    data_config: str = field(default="", metadata={"help": "data config JSON (e.g. configs/data_config.json)"})
    batch_size: int = field(default=16, metadata={"help": "micro-batch size per process"})
    num_epochs: int = field(default=3, metadata={"help": "epochs over the training mix (unless --max_train_steps)"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    lr_warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps before the cosine decay"})
    max_length: Optional[int] = field(default=None, metadata={
        "help": "tokens per target text, BOS and EOS included (default: the data config's max_length)"})
    eval_interval: int = field(default=500, metadata={
        "help": "validate every N optimizer steps (and at the end); the best head goes to best_head/"})
    max_eval_samples: Optional[int] = field(default=256, metadata={
        "help": "validation examples per evaluation set (null: all)"})
    num_validation_samples: int = field(default=4, metadata={
        "help": "at each evaluation, texts sampled (not teacher-forced) for the first N examples of each evaluation "
                "set, logged with their references to <output_dir>/samples/step-N.json and the tracker (0: none)"})
    validation_inference_steps: int = field(default=28, metadata={"help": "flow steps of those samples"})
    noise_shift: float = field(default=1.0, metadata={
        "help": "shift of the training noise levels, as the scheduler's shift: 1 = uniform sigma (OmniFlow's "
                "training), < 1 favours low noise (where the final decoder prefix is read), > 1 high noise"})

    def validate(self) -> None:
        for name, hint in (("model_path", "the OmniFlow folder, e.g. models/OmniFlow-v0.5"),
                           ("data_config", "e.g. configs/data_config.json")):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required ({hint})")
        for name in ("batch_size", "num_epochs", "eval_interval", "validation_inference_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.num_validation_samples < 0:
            raise ConfigError(f"--num_validation_samples must be >= 0, got {self.num_validation_samples}")
        if not self.lr > 0 or not self.noise_shift > 0:
            raise ConfigError(f"--lr and --noise_shift must be > 0, got {self.lr} and {self.noise_shift}")


def previous_best(output_dir: Path, resumed_step: int) -> float:
    """Validation loss of an existing best_head/ written at or before the resumed step (else +inf)."""
    folder = output_dir / BEST_HEAD
    if resumed_step == 0 or not (folder / "config.json").is_file():
        return math.inf
    config = head_config(folder)
    return config["val_loss"] if config.get("step", math.inf) <= resumed_step else math.inf


def main():
    opts, head_opts, train_opts = parse_options(TextTrainOptions, TextHeadOptions, TrainingOptions,
                                                description=__doc__.split("\n\n")[0])
    if not head_opts.use_text_decoder_head:
        raise ConfigError("nothing to train: without --use_text_decoder_head the head is the released text_output "
                          "(score it with generate_text.py --checkpoint none)")
    # Imported once the flags are valid: --help and a wrong flag answer in a fraction of a second.
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from omniflow.data import ResumableLoader
    from omniflow.data.text import collate_examples, load_data_config, train_records
    from omniflow.runtime.launch import autocast_dtype, frozen_init_context
    from omniflow.runtime.paths import path_to_record
    from omniflow.runtime.run import TrainingRun, optimizer_steps
    from omniflow.text_job.model import TextJobModel
    from omniflow.text_job.validation import eval_loaders, sample_batches, sample_texts, validate

    config = load_data_config(opts.data_config)
    if any(spec.streaming for spec in config.datasets if spec.train_split) and not train_opts.max_train_steps:
        raise ConfigError(f"{opts.data_config} streams its training data (no epoch length): give --max_train_steps")
    run = TrainingRun(train_opts, opts, head_opts, micro_batch_size=opts.batch_size)
    run.derive("perplexity", lambda means: math.exp(min(means["ce"], 50.0)))
    acc = run.accelerator
    tasks = {spec.task for spec in config.datasets}
    with frozen_init_context(acc):
        job = TextJobModel.load(opts.model_path, tasks, models_dir=opts.models_dir, training=True, device=run.device,
                                dtype=autocast_dtype(acc), max_length=opts.max_length or config.max_length,
                                noise_shift=opts.noise_shift)
    if train_opts.gradient_checkpointing:
        job.text_vae.enable_gradient_checkpointing()
        job.text_vae.model.train()  # checkpointing acts in train mode; the LM has no dropout
    torch.manual_seed(train_opts.seed)  # identical head initialisation on every rank
    stack = job.new_head_stack(head_opts)
    trainable = [p for p in stack.parameters() if p.requires_grad]
    logger.info("head stack: %d trainable parameters (%s head)", sum(p.numel() for p in trainable), stack.kind)

    train_set, decode = train_records(config, seed=train_opts.seed)  # a stream decodes in the loader's workers
    loader = ResumableLoader(train_set, opts.batch_size, collate_fn=collate_examples, transform=decode,
                             seed=train_opts.seed, rank=acc.process_index, world_size=acc.num_processes,
                             num_workers=train_opts.dataloader_num_workers)
    evaluation = eval_loaders(config, opts.batch_size, opts.max_eval_samples, acc.process_index, acc.num_processes)
    samples = sample_batches(config, opts.num_validation_samples)
    max_steps = train_opts.max_train_steps or optimizer_steps(len(loader), opts.num_epochs,
                                                              train_opts.gradient_accumulation_steps)
    optimizer = torch.optim.AdamW(trainable, lr=opts.lr, weight_decay=opts.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, opts.lr_warmup_steps, max_steps)
    model, optimizer, scheduler = run.prepare(stack, optimizer, scheduler)
    best = previous_best(run.output_dir, run.start(loader))
    export_config = {**stack.config(), "model_path": path_to_record(opts.model_path),
                     "data_config": path_to_record(opts.data_config),
                     "trainable_parameters": sum(p.numel() for p in trainable)}

    def evaluate_and_keep_best() -> None:
        nonlocal best
        if not evaluation:
            return
        values = validate(job, model, evaluation, run, train_opts.seed)
        run.log(values)
        if samples:
            run.metrics.log_texts("samples", sample_texts(
                job, model, samples, run, train_opts.seed, opts.validation_inference_steps,
                opts.max_length or config.max_length), run.step)
        if values["val/loss"] < best:
            best = values["val/loss"]
            run.export(model, {**export_config, "step": run.step, "val_loss": best}, run.output_dir / BEST_HEAD)

    for batch in run.batches(loader, max_steps):
        with run.accumulate(model), acc.autocast():
            out = job.head_terms(model, batch)
            run.backward_and_step(out.loss, model, optimizer, scheduler)
        run.end_step(out.terms, samples=len(batch["text"]), tokens=out.num_tokens)
        if run.at_interval(opts.eval_interval):
            evaluate_and_keep_best()
    if run.step % opts.eval_interval:
        evaluate_and_keep_best()
    run.export(model, {**export_config, "step": run.step, "val_loss": None}, run.output_dir / FINAL_HEAD)
    if run.is_main:
        logger.info("heads: %s (best validation loss %.4f), %s", run.output_dir / BEST_HEAD, best,
                    run.output_dir / FINAL_HEAD)
    run.finish()


if __name__ == "__main__":
    run_main(main)
