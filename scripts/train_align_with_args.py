"""Train the VAE latent alignment module (SPEC section 4) on the shared runtime.

    python scripts/train_align_with_args.py --load_config configs/align/sd15_to_flux.json \\
        --train_data_dir data/align/train --eval_data_dir data/align/eval
    accelerate launch --config_file accelerate_configs/<cfg>.yaml scripts/train_align_with_args.py ...

Two frozen ``AutoencoderKL``s (``--vae1_path``/``--vae2_path`` with their subfolders) and the
trainable ``AlignModule`` that maps one VAE's latent (and/or the image) into the other's latent
space (``--direction``). ``--cache_latents`` encodes every image with both VAEs once (on the main
process, the others wait) and trains from the stored latents, so epochs skip the VAE encoders.

The seed's flag names and how they map onto the runtime (``TrainingOptions``): the first four are
other spellings of the runtime's options, on the command line and as config-file keys.

    --save_dir DIR          = --output_dir (checkpoints, exports, metrics.jsonl, config.json)
    --log_dir DIR           = --logging_dir (TensorBoard; relative to the output dir unless absolute)
    --precision P           = --mixed_precision bf16|fp16|no, which also takes float32 (= no), bfloat16
                            and float16; the frozen VAEs run in that dtype, the module trains in float32
                            under autocast
    --num_workers N         = --dataloader_num_workers
    --epochs N              training length, unless --max_train_steps is set
    --save_frequency E      sets --checkpointing_steps to E epochs of optimizer steps
    --eval_frequency E      evaluate every E epochs (and at the start); 0: never
    --visualize_frequency E write image grids every E epochs (and at the start); 0: never
    --warmup_steps N        linear warm-up over N optimizer steps, then StepLR: the rate is multiplied
    --scheduler_step_size E by --scheduler_gamma every E epochs; one LambdaLR stepped per optimizer step
    --device auto|cpu|cuda  cpu makes accelerate use the CPU; cuda fails when there is no GPU
    --load_config FILE      JSON of option values (also --config); flags on the command line override it
    --config_save_path FILE also write the resolved options there (the run always writes config.json)

Flags on the command line beat the config file whichever spelling either uses. Outputs in the output dir:
``checkpoint-<step>/`` (resume with ``--resume_from_checkpoint latest|PATH``), ``final/`` and
``best/`` (lowest eval loss): the exported module, ``model.safetensors`` + ``config.json`` naming
the VAEs, loadable by ``omniflow.models.align.load_aligned_pipeline`` and ``scripts/eval_align.py``;
``visualizations/*.png`` (also in TensorBoard); ``metrics.jsonl`` with the loss, learning rate,
gradient norm, eval latent MSE/cosine and per-channel mean/std of predicted and target latents.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from omniflow.data.layouts import DATASET_TYPES
from omniflow.models.align_options import DIRECTIONS, INPUT_TYPES, LOSS_TYPES
from omniflow.runtime.errors import ConfigError, run_main
from omniflow.runtime.options import parse_options, save_config
from omniflow.runtime.training_options import TrainingOptions

logger = logging.getLogger("omniflow")

# the seed's names of runtime options, and the seed's spellings of --mixed_precision values
SEED_NAMES = {"output_dir": ["--save_dir"], "logging_dir": ["--log_dir"], "mixed_precision": ["--precision"],
              "dataloader_num_workers": ["--num_workers"]}
PRECISIONS = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}


@dataclass
class AlignOptions:
    # VAEs and direction
    vae1_path: str = field(default="stable-diffusion-v1-5/stable-diffusion-v1-5", metadata={
        "help": "first VAE: local folder, Hub id or download_models.py name"})
    vae2_path: str = field(default="black-forest-labs/FLUX.1-dev", metadata={"help": "second VAE, as --vae1_path"})
    vae1_subfolder: Optional[str] = field(default="vae", metadata={"help": "subfolder of --vae1_path holding the VAE"})
    vae2_subfolder: Optional[str] = field(default="vae", metadata={"help": "subfolder of --vae2_path holding the VAE"})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Hugging Face Hub cache directory"})
    direction: str = field(default="vae1_to_vae2", metadata={
        "help": "which latent space is mapped into which", "choices": list(DIRECTIONS)})
    # alignment module
    hidden_channels: int = field(default=64, metadata={"help": "width of the alignment module"})
    out_channels: int = field(default=16, metadata={"help": "latent channels of the target VAE"})
    num_blocks: int = field(default=2, metadata={"help": "residual blocks after the fusion"})
    downsample_times: int = field(default=3, metadata={"help": "stride-2 stages of the image stem (2**n = VAE factor)"})
    input_types: list[str] = field(default_factory=lambda: list(INPUT_TYPES), metadata={
        "help": "what the module reads", "choices": list(INPUT_TYPES)})
    # data
    train_data_dir: Optional[str] = field(default=None, metadata={"help": "folder of training images (required)"})
    eval_data_dir: Optional[str] = field(default=None, metadata={
        "help": "folder of evaluation images; without it there is no eval and no best/ export"})
    dataset_type: str = field(default="default", metadata={
        "help": "default: any nested image folder; imagenet: one sub-folder per class", "choices": list(DATASET_TYPES)})
    resolution: int = field(default=512, metadata={"help": "images are resized and center-cropped to this square"})
    train_batch_size: int = field(default=8, metadata={"help": "micro-batch size per process"})
    eval_batch_size: int = field(default=8, metadata={"help": "eval (and latent caching) batch size per process"})
    cache_latents: bool = field(default=False, metadata={
        "help": "encode the images with both VAEs once and train from the stored latents"})
    latent_cache_dir: Optional[str] = field(default=None, metadata={
        "help": "where --cache_latents keeps its train/ and eval/ caches (default: <output_dir>/latent_cache)"})
    # training, optimiser, scheduler, loss
    epochs: int = field(default=200, metadata={"help": "epochs to train unless --max_train_steps is set"})
    warmup_steps: int = field(default=100, metadata={"help": "linear learning-rate warm-up, in optimizer steps"})
    device: str = field(default="auto", metadata={"help": "auto, or force cpu / cuda", "choices": ["auto", "cpu", "cuda"]})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    scheduler_step_size: int = field(default=50, metadata={"help": "StepLR period, in epochs"})
    scheduler_gamma: float = field(default=0.5, metadata={"help": "StepLR factor per period"})
    loss_type: str = field(default="mse", metadata={"help": "latent-space loss", "choices": list(LOSS_TYPES)})
    loss_weight: float = field(default=1.0, metadata={"help": "factor on the loss"})
    # logging, checkpoints, visualisation, config files
    eval_frequency: int = field(default=1, metadata={"help": "epochs between evaluations (0: never)"})
    save_frequency: Optional[int] = field(default=None, metadata={
        "help": "epochs between checkpoints; sets --checkpointing_steps"})
    visualize_frequency: int = field(default=5, metadata={"help": "epochs between image grids (0: never)"})
    num_visualize_samples: int = field(default=4, metadata={"help": "images in each grid"})
    config_save_path: Optional[str] = field(default=None, metadata={"help": "also write the resolved options here"})

    def validate(self) -> None:
        if not self.train_data_dir:
            raise ConfigError("--train_data_dir is required (a folder of images)")
        positive = ("resolution", "train_batch_size", "eval_batch_size", "epochs", "scheduler_step_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_frequency", "visualize_frequency", "num_visualize_samples", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.save_frequency is not None and self.save_frequency < 1:
            raise ConfigError(f"--save_frequency must be >= 1, got {self.save_frequency}")
        for name in ("learning_rate", "scheduler_gamma"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name} must be > 0, got {getattr(self, name)}")


def parse_args(args: list[str] | None = None) -> tuple[AlignOptions, TrainingOptions]:
    return parse_options(AlignOptions, TrainingOptions, args=args, config_flags=("--load_config", "--config"),
                         aliases=SEED_NAMES, synonyms={"mixed_precision": PRECISIONS},
                         description="Train the VAE latent alignment module.")


def select_device(device: str) -> None:
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # read by accelerate when the Accelerator is built
    elif device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available (use --device auto or cpu)")


def warmup_step_lr(warmup_steps: int, step_size: int, gamma: float):
    """LambdaLR factor: linear warm-up to 1 over ``warmup_steps``, then x ``gamma`` every ``step_size`` steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return gamma ** ((step - warmup_steps) // step_size)

    return factor


def main() -> None:
    opts, train_opts = parse_args()
    if train_opts.gradient_checkpointing:
        raise ConfigError("--gradient_checkpointing is not implemented by train_align_with_args.py: the VAEs are "
                          "frozen and encode without gradients, the alignment module's activations are small; "
                          "lower --train_batch_size or use --cache_latents")
    import torch  # after the flags: --help and a wrong flag do not wait for it

    from omniflow.models.align import AlignPipeline
    from omniflow.models.align_training import AlignTrainer, build_loaders, check_resolution, predict_batch
    from omniflow.runtime.launch import autocast_dtype, frozen_init_context
    from omniflow.runtime.run import TrainingRun, optimizer_steps

    select_device(opts.device)
    run = TrainingRun(train_opts, opts, micro_batch_size=opts.train_batch_size)
    acc = run.accelerator

    torch.manual_seed(train_opts.seed)  # identical initial module weights on every rank
    with frozen_init_context(acc):
        pipeline = AlignPipeline.from_pretrained(
            opts.vae1_path, opts.vae2_path, opts.vae1_subfolder, opts.vae2_subfolder, opts.cache_dir,
            vae_dtype=autocast_dtype(acc), direction=opts.direction, loss_type=opts.loss_type,
            loss_weight=opts.loss_weight, hidden_channels=opts.hidden_channels, out_channels=opts.out_channels,
            num_blocks=opts.num_blocks, downsample_times=opts.downsample_times, input_types=opts.input_types)
    check_resolution(pipeline, opts.resolution)
    pipeline.to(run.device)

    loader, eval_loader, visual_source = build_loaders(opts, train_opts, pipeline, run)

    accumulation = train_opts.gradient_accumulation_steps
    steps_per_epoch = optimizer_steps(len(loader), 1, accumulation)
    max_steps = train_opts.max_train_steps or optimizer_steps(len(loader), opts.epochs, accumulation)
    if opts.save_frequency:
        train_opts.checkpointing_steps = opts.save_frequency * steps_per_epoch
    eval_every = opts.eval_frequency * steps_per_epoch if eval_loader is not None else 0
    visualize_every = opts.visualize_frequency * steps_per_epoch if opts.num_visualize_samples else 0
    logger.info("%d optimizer steps (%d per epoch), checkpoints every %d, eval every %d, grids every %d",
                max_steps, steps_per_epoch, train_opts.checkpointing_steps, eval_every, visualize_every)

    optimizer = torch.optim.AdamW(pipeline.module.parameters(), lr=opts.learning_rate, weight_decay=opts.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_step_lr(
        opts.warmup_steps, opts.scheduler_step_size * steps_per_epoch, opts.scheduler_gamma))
    pipeline.module, optimizer, scheduler = run.prepare(pipeline.module, optimizer, scheduler)
    trainer = AlignTrainer(run, pipeline, opts, eval_loader, opts.cache_latents, visual_source)
    run.start(loader)
    if opts.config_save_path and run.is_main:
        save_config(opts.config_save_path, opts, train_opts)

    if eval_every and run.step == 0:  # the untrained module's baseline
        trainer.evaluate()
    if visualize_every and run.step == 0:
        trainer.visualize()
    for batch in run.batches(loader, max_steps):
        with run.accumulate(pipeline.module):
            pred, target = predict_batch(pipeline, batch, opts.cache_latents)
            loss = pipeline.loss(pred, target)
            run.backward_and_step(loss, pipeline.module, optimizer, scheduler)
        run.end_step({"loss": loss}, samples=len(target))
        if run.at_interval(eval_every):
            trainer.evaluate()
        if run.at_interval(visualize_every):
            trainer.visualize()
    if eval_every and run.step % eval_every:
        trainer.evaluate()  # the final weights compete for best/ too
    trainer.export("final")
    run.finish()


if __name__ == "__main__":
    run_main(main)
