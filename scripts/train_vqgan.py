"""Train a VQ tokenizer (VQ-VAE dVAE-style, VQ-VAE-2, OptVQ, VQGAN/EMAVQ) from a ``param.json``.

    python scripts/train_vqgan.py --config configs/vq/vqgan_f16.json [--device cuda:0]
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml scripts/train_vqgan.py --config ...

``param.json`` (the seed project's layout, see ``omniflow/models/vq/params.py`` and
``configs/vq/``) sets the model, the data and the run. The runtime's flags (``--output_dir``,
``--max_train_steps``, ``--checkpointing_steps``, ``--resume_from_checkpoint``,
``--mixed_precision``...) override its ``train_args`` when given on the command line:
defaults < param.json < command line.

Each step trains the autoencoder (reconstruction + LPIPS + VQ + adaptive-weight GAN loss) with
one Adam optimizer and, from ``disc_start`` on (when the generator's adversarial loss starts too),
every ``disc_every`` (3) steps the PatchGAN discriminator with another. With a taming lossconfig both
use ``lr`` and betas (0.5, 0.9), as taming does; no gradient is clipped unless ``max_grad_norm`` is
set (train_args or the flag). The effective settings are logged at start. The autoencoder's learning rate decays by ``lr_decay`` every
``lr_decay_steps`` (1000) steps. Validation (PSNR, SSIM, LPIPS, rFID, codebook usage and
perplexity over the whole validation set) runs every ``validation_interval`` steps and at the
end; each new best PSNR/SSIM/LPIPS/rFID is exported to ``<output_dir>/best_<metric>/``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Optional

from omniflow.runtime.errors import ConfigError, run_main
from omniflow.runtime.options import parse_options
from omniflow.runtime.training_options import TrainingOptions

if TYPE_CHECKING:
    from omniflow.models.vq.params import VQParams

logger = logging.getLogger("omniflow")

DEFAULT_NUM_STEPS = 100_000  # the seed's default when neither num_steps nor --max_train_steps is set
NO_CLIPPING = {"max_grad_norm": 0.0}  # taming and the seed clip no gradients: train_args or the flag may
DEEPSPEED_REFUSAL = (
    "train_vqgan.py does not run under DeepSpeed: its bf16 engine would cast the codebooks and their EMA "
    "statistics to bf16. Launch with DDP instead: accelerate launch --config_file accelerate_configs/multi_gpu.yaml "
    "scripts/train_vqgan.py ... (bf16 autocast, quantizers kept in fp32)")


@dataclass
class VQScriptOptions:
    config: str = field(default="param.json", metadata={"help": "training config in the param.json layout "
                                                                "(see configs/vq/)"})
    device: Optional[str] = field(default=None, metadata={
        "help": "auto|cpu|cuda|cuda:N for a single process; overrides train_args.device"})
    channels_last: bool = field(default=False, metadata={
        "help": "channels_last memory format for the networks and batches (pays with bf16 on GPUs; "
                "benchmarks/bench_vq.py times it)"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the encoder(s), decoder(s) and discriminator in place (checkpoints keep their keys)"})


def refuse_deepspeed() -> None:
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError(DEEPSPEED_REFUSAL)


def select_device(device: str) -> None:
    """Apply ``--device`` before the accelerator exists: ``cpu`` forces the CPU, ``cuda:N`` picks GPU N."""
    if device in ("auto", "cuda"):
        return
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
        return
    match = re.fullmatch(r"cuda:(\d+)", device)
    if match is None:
        raise ConfigError(f"device {device!r}: expected auto, cpu, cuda or cuda:N")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"device {device!r} picks the GPU of a single process; under accelerate launch choose "
                          "GPUs with --gpu_ids or CUDA_VISIBLE_DEVICES")
    index = int(match.group(1))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(index)]
    if visible and index >= len(ids):
        raise ConfigError(f"device {device!r}: only {len(ids)} GPU(s) visible (CUDA_VISIBLE_DEVICES={visible})")
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[index] if visible else ids[0]


def lr_factor(step: int, gamma: float, every: int) -> float:
    return gamma ** (step // every)


def parse_args() -> tuple[VQParams, VQScriptOptions, TrainingOptions]:
    """param.json first (its values become defaults), then every flag on top of it."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=VQScriptOptions.config)
    params = None
    if not any(arg in ("-h", "--help") for arg in sys.argv[1:]):  # the help text needs no param.json (nor torch)
        from omniflow.models.vq.params import load_param_json

        params = load_param_json(pre.parse_known_args()[0].config)
    opts, train_opts = parse_options(VQScriptOptions, TrainingOptions, config_flags=("--options_file",),
                                     config_values={**NO_CLIPPING, **(params.runtime if params else {})},
                                     description=__doc__.splitlines()[0])
    return params, opts, train_opts


def main() -> None:
    params, opts, train_opts = parse_args()
    refuse_deepspeed()
    if train_opts.gradient_checkpointing:
        raise ConfigError("--gradient_checkpointing is not implemented by train_vqgan.py (it would not save memory "
                          "as asked); lower data_args.batch_size or use --mixed_precision bf16")
    import torch
    from accelerate.utils import broadcast_object_list
    from torchvision.utils import save_image

    from omniflow.data import ResumableLoader
    from omniflow.data.video import frames_to_model_input
    from omniflow.models.vq.evaluation import BestMetrics, VQValidator, reconstruction_grid
    from omniflow.models.vq.params import build_dataset, build_model, build_training_loss
    from omniflow.models.vq.training import apply_speed_options, model_summary, train_step, training_settings
    from omniflow.runtime.checkpoint import resolve_checkpoint
    from omniflow.runtime.run import TrainingRun

    select_device(opts.device or params.train["device"])
    train = params.train
    run = TrainingRun(train_opts, opts, micro_batch_size=params.data["batch_size"])
    acc = run.accelerator
    logger.info("CUDA_VISIBLE_DEVICES=%s", os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"))

    torch.manual_seed(train_opts.seed)  # identical initial weights on every rank
    model = build_model(params)
    loss_fn = build_training_loss(params, model.in_channels)
    summary = model_summary(params, model, loss_fn) if acc.is_main_process else None
    logger.info("training settings: %s", json.dumps(training_settings(params, train_opts.max_grad_norm, loss_fn)))
    if train["wandb_image_interval"]:
        logger.info("train_args.wandb_image_interval: the original | reconstruction grid of the training batch is "
                    "logged every %d steps", train["wandb_image_interval"])
    compiled = apply_speed_options(model, loss_fn, opts.channels_last, opts.compile)
    if opts.channels_last or compiled:
        logger.info("speed options: channels_last=%s, compiled: %s", opts.channels_last, ", ".join(compiled) or "none")

    train_set = build_dataset(params, "train", train_opts.seed)
    loader = ResumableLoader(train_set, params.data["batch_size"], seed=train_opts.seed, rank=acc.process_index,
                         world_size=acc.num_processes, num_workers=train_opts.dataloader_num_workers)
    val_set = build_dataset(params, "valid", train_opts.seed)
    max_steps = train_opts.max_train_steps or DEFAULT_NUM_STEPS

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=train["lr"],
                                 betas=(train["beta1"], train["beta2"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, gamma=train["lr_decay"], every=train["lr_decay_steps"]))
    loss_fn.to(acc.device)
    disc = disc_optimizer = None
    if loss_fn.discriminator is not None:
        disc_optimizer = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=train["disc_lr"],
                                          betas=(train["disc_beta1"], train["disc_beta2"]))
        model, disc, optimizer, disc_optimizer, scheduler = run.prepare(
            model, loss_fn.discriminator, optimizer, disc_optimizer, scheduler)
    else:
        model, optimizer, scheduler = run.prepare(model, optimizer, scheduler)
    bare_model = acc.unwrap_model(model)
    last_layer = bare_model.get_last_layer()  # the DDP wrapper has no get_last_layer

    validator, val_loader = None, None
    if val_set is not None:
        validator = VQValidator(acc, bare_model.codebook_sizes, lpips_net=train["val_lpips_net"],
                                lpips_weights_path=train["val_lpips_weights_path"], compute_fid=train["compute_fid"],
                                fid_weights_path=train["fid_weights_path"], num_grid_images=train["num_grid_images"])
        # each validation item exactly once over all ranks
        val_loader = ResumableLoader(val_set, params.data["val_batch_size"] or params.data["batch_size"],
                                     shuffle=False, drop_last=False, rank=acc.process_index,
                                     world_size=acc.num_processes, num_workers=train_opts.dataloader_num_workers)
    else:
        logger.info("no validation data (data_process.valid): validation and best-model exports are off")
    best = BestMetrics(run.output_dir, acc.is_main_process,
                       broadcast=broadcast_object_list if acc.num_processes > 1 else None)
    run.start(loader)
    if acc.is_main_process:
        (run.output_dir / "param.json").write_text(json.dumps(params.resolved(), indent=2) + "\n")
        (run.output_dir / "model_summary.md").write_text(summary)
        logger.info("model summary (also in %s):\n%s", run.output_dir / "model_summary.md", summary)
    best.restore(resolve_checkpoint(run.output_dir, train_opts.resume_from_checkpoint), run.step)
    export_config = {**bare_model.export_config(), "image_size": list(params.image_size)}

    def validate() -> None:
        metrics, grid = validator.evaluate(bare_model, val_loader)
        run.log({**{f"val/{name}": value for name, value in metrics.items()},
                 **{f"val_weights/{name}": value for name, value in validator.weights.items()}})
        if grid is not None:
            run.metrics.log_images("val/original_reconstruction", grid[None], run.step)
            (run.output_dir / "samples").mkdir(exist_ok=True)
            save_image(grid, run.output_dir / "samples" / f"val_step{run.step:07d}.png")
        for name in best.update(run.step, metrics):
            run.export(model, {**export_config, "step": run.step, "best_metric": name,
                               "val_metrics": {**metrics, **validator.weights}}, run.output_dir / f"best_{name}")

    validated_at = -1
    for batch in run.batches(loader, max_steps):
        x = frames_to_model_input(batch["frames"])  # NHWC frames permuted: already channels_last in memory
        terms = train_step(run, x, model, loss_fn, optimizer, scheduler, last_layer, disc, disc_optimizer)
        run.end_step({**terms, "skipped_files": batch["skipped"].sum()}, samples=len(x))
        if acc.is_main_process and run.at_interval(train["wandb_image_interval"]):
            grid = reconstruction_grid(bare_model, x[:train["num_grid_images"]], acc)
            run.metrics.log_images("train/original_reconstruction", grid[None], run.step)
        if validator is not None and run.at_interval(train["validation_interval"]):
            validate()
            validated_at = run.step
    if validator is not None and validated_at != run.step:
        validate()
    run.export(model, {**export_config, "step": run.step}, run.output_dir / "final")
    run.finish()


if __name__ == "__main__":
    run_main(main)
