"""Train FLOAT's Flow Matching Transformer (+ audio projection) with rectified flow.

Reads the shards of ``scripts/preprocess_float.py`` (motion latents and wav2vec2 features are
precomputed: the frozen wav2vec2 models and motion auto-encoder do not run here). Each sample is
a window of ``num_prev_frames`` previous + ``int(wav2vec_sec * fps)`` current frames; the loss
covers the current frames only. Runs on the shared runtime (bf16, DDP / DeepSpeed ZeRO-2 via
``accelerate launch``, gradient accumulation and checkpointing, exact resume, metrics.jsonl,
TensorBoard / W&B), keeps an EMA of the trained weights, validates, stops early, writes samples
and exports the weights.

    python scripts/train_rectified_flow.py --config small --data_dir data/float --val_data_dir data/float_val
    python scripts/train_rectified_flow.py --config-file my.json --batch-size 4 --pretrained_float checkpoints/float.pth
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from omniflow.models.float.cli import PresetOptions, load_motion_autoencoder, parse_float_options
from omniflow.models.float.config import FloatConfig
from omniflow.runtime.errors import ConfigError, DataError, run_main
from omniflow.runtime.paths import resolve_recorded
from omniflow.runtime.training_options import TrainingOptions

if TYPE_CHECKING:
    from omniflow.data.float_shards import FloatWindowDataset

logger = logging.getLogger("omniflow")
SCHEDULERS = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass
class FloatTrainOptions:
    data_dir: str = field(default="data/float", metadata={"help": "folder written by scripts/preprocess_float.py"})
    val_data_dir: Optional[str] = field(default=None, metadata={
        "help": "preprocessed validation folder (windows tiled from frame 0); none: no validation"})
    pretrained_float: Optional[str] = field(default=None, metadata={
        "help": "fine-tune from a released float.pth (file, folder or hub name) or an export of this script "
                "(folder or its model.safetensors): strict load of the FMT and the audio projection"})
    motion_autoencoder: Optional[str] = field(default=None, metadata={
        "help": "released float.pth or MotionAutoEncoder export, to render samples and write the released "
                "layout (default: --pretrained_float when it holds one; an export does not)"})
    # optimisation (seed names)
    batch_size: int = field(default=8, metadata={"help": "windows per process and micro-batch",
                                                  "aliases": ["--batch-size"]})
    num_epochs: int = field(default=100, metadata={"help": "epochs when --max_train_steps is unset",
                                                   "aliases": ["--num-epochs"]})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate", "aliases": ["--learning-rate"]})
    weight_decay: float = field(default=1e-5, metadata={"help": "weight decay"})
    optimizer: str = field(default="adamw", metadata={"help": "optimizer", "choices": ["adamw", "adam"]})
    beta1: float = field(default=0.9, metadata={"help": "Adam beta1"})
    beta2: float = field(default=0.999, metadata={"help": "Adam beta2"})
    lr_scheduler: str = field(default="cosine", metadata={"help": "learning-rate schedule after the warm-up",
                                                          "choices": list(SCHEDULERS)})
    lr_warmup_epochs: float = field(default=5.0, metadata={"help": "linear warm-up length in epochs"})
    lr_min: float = field(default=1e-6, metadata={"help": "final learning rate of the cosine schedule"})
    # rectified flow
    loss_type: str = field(default="mse", metadata={"help": "velocity loss", "choices": ["mse", "l1"]})
    time_sampling: str = field(default="uniform", metadata={"help": "distribution of the flow time t",
                                                            "choices": ["uniform", "logit_normal"]})
    velocity_weight: float = field(default=1.0, metadata={
        "help": "weight of the loss on frame-to-frame differences of the velocity"})
    # EMA, validation, samples, export
    use_ema: bool = field(default=True, metadata={"help": "keep an EMA of the trained weights (exported, validated)"})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay (warmed up as (1+n)/(10+n))"})
    eval_interval: int = field(default=500, metadata={"help": "validate every N optimizer steps"})
    max_val_batches: Optional[int] = field(default=None, metadata={
        "help": "validate on the first N x --batch_size windows only (the same ones for any number of processes)"})
    early_stopping_patience: int = field(default=0, metadata={
        "help": "stop after N validations without improvement (0: never)"})
    early_stopping_min_delta: float = field(default=0.0, metadata={
        "help": "a validation loss must beat the best by more than this to count as an improvement"})
    sample_interval: int = field(default=1000, metadata={
        "help": "every N steps save sampled motion latents (and frames when a motion auto-encoder is loaded); 0: never"})
    sample_frames: int = field(default=0, metadata={"help": "frames per sample (0: two windows)"})
    export_release: bool = field(default=False, metadata={
        "help": "also write final/float_release.safetensors in the released float.pth layout (needs the motion "
                "auto-encoder)"})
    resume: Optional[str] = field(default=None, metadata={"help": "seed spelling of --resume_from_checkpoint"})
    input_nc: int = field(default=3, metadata={"help": "image channels (RGB)", "choices": [3]})

    def validate(self) -> None:
        for name in ("batch_size", "num_epochs", "eval_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_val_batches is not None and self.max_val_batches < 1:
            raise ConfigError(f"--max_val_batches must be >= 1, got {self.max_val_batches}")
        if self.learning_rate < 0 or self.lr_min < 0:
            raise ConfigError("--learning_rate and --lr_min must be >= 0")
        if self.early_stopping_patience and not self.val_data_dir:
            raise ConfigError("--early_stopping_patience needs --val_data_dir")
        if self.export_release and not (self.motion_autoencoder or self.pretrained_float):
            raise ConfigError("--export_release needs the motion auto-encoder: give --motion_autoencoder or "
                              "--pretrained_float")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"--ema_decay must be in (0, 1), got {self.ema_decay}")


class EarlyStopping:
    """Best validation loss and validations since it improved; checkpointed with the run."""

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta
        self.best, self.best_step, self.bad = math.inf, 0, 0

    def update(self, loss: float, step: int) -> bool:
        """Record a validation loss; True when it is a new best."""
        if loss < self.best - self.min_delta:
            self.best, self.best_step, self.bad = loss, step, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.bad = state["best"], state["best_step"], state["bad"]


def check_data(dataset: FloatWindowDataset, config: FloatConfig, where: str) -> None:
    """The shards must have been made for this model's sizes."""
    m = dataset.manifest
    wanted = {"dim_w": config.dim_w, "audio_feature_dim": config.audio_feature_dim, "fps": config.fps,
              "sampling_rate": config.sampling_rate}
    for key, value in wanted.items():
        if m.get(key) != value:
            raise DataError(f"{where}/manifest.json: {key} is {m.get(key)!r} but the model expects {value!r} "
                            f"(preprocess with the same FLOAT options)")
    if len(m["emotion_labels"]) != config.dim_e:
        raise DataError(f"{where}/manifest.json: {len(m['emotion_labels'])} emotion labels but dim_e={config.dim_e}")


def build_scheduler(opts: FloatTrainOptions, optimizer, steps_per_epoch: int, max_steps: int):
    from transformers import get_scheduler

    extra = {}
    if opts.lr_scheduler == "cosine":
        extra["min_lr_rate"] = opts.lr_min / opts.learning_rate if opts.learning_rate > 0 else 0.0
    return get_scheduler(SCHEDULERS[opts.lr_scheduler], optimizer,
                         num_warmup_steps=round(opts.lr_warmup_epochs * steps_per_epoch),
                         num_training_steps=max_steps, scheduler_specific_kwargs=extra)


def main(argv: list[str] | None = None) -> None:
    opts, preset, config, train_opts = parse_float_options(FloatTrainOptions, PresetOptions, FloatConfig,
                                                           TrainingOptions, args=argv)
    if opts.resume and not train_opts.resume_from_checkpoint:
        train_opts.resume_from_checkpoint = opts.resume
    import torch  # after the flags: --help and a wrong flag do not wait for it
    from torch.utils.data import Subset

    from omniflow.data import ResumableLoader
    from omniflow.data.float_shards import MANIFEST_NAME, FloatWindowDataset
    from omniflow.flow import ConditionDropout, RectifiedFlow
    from omniflow.models.float.training import (build_model, build_optimizer, ema_of, export, motion_autoencoder_source,
                                                read_sample_source, validate, write_sample)
    from omniflow.runtime.run import TrainingRun, optimizer_steps

    motion_source = motion_autoencoder_source(opts)  # before anything is written
    train_set = FloatWindowDataset(opts.data_dir, config.num_prev_frames, config.window, seed=train_opts.seed)
    check_data(train_set, config, opts.data_dir)
    # generation must use the wav2vec2 models that made the training features
    manifest = Path(opts.data_dir) / MANIFEST_NAME
    config.wav2vec_model_path = resolve_recorded(train_set.manifest["wav2vec_model_path"], manifest)
    config.audio2emotion_path = resolve_recorded(train_set.manifest["audio2emotion_path"], manifest)
    run = TrainingRun(train_opts, opts, preset, config, micro_batch_size=opts.batch_size)  # writes config.json
    acc = run.accelerator
    with torch.random.fork_rng(devices=[]):  # identical initial weights on every rank; rank RNGs untouched
        torch.manual_seed(train_opts.seed)
        model = build_model(opts, config)
    model.fmt.gradient_checkpointing = train_opts.gradient_checkpointing
    ema = ema_of(model, opts.ema_decay).to(run.device) if opts.use_ema else None  # fp32, before mixed precision
    loader = ResumableLoader(train_set, opts.batch_size, seed=train_opts.seed, rank=acc.process_index,
                         world_size=acc.num_processes, num_workers=train_opts.dataloader_num_workers)
    val_set = val_loader = None
    if opts.val_data_dir:
        val_set = FloatWindowDataset(opts.val_data_dir, config.num_prev_frames, config.window, random_windows=False)
        check_data(val_set, config, opts.val_data_dir)
        windows = val_set if opts.max_val_batches is None else Subset(
            val_set, range(min(len(val_set), opts.max_val_batches * opts.batch_size)))
        val_loader = ResumableLoader(windows, opts.batch_size, shuffle=False, drop_last=False, rank=acc.process_index,
                                     world_size=acc.num_processes)
    steps_per_epoch = optimizer_steps(len(loader), 1, train_opts.gradient_accumulation_steps)
    max_steps = train_opts.max_train_steps or optimizer_steps(len(loader), opts.num_epochs,
                                                              train_opts.gradient_accumulation_steps)
    optimizer = build_optimizer(opts, model)
    scheduler = build_scheduler(opts, optimizer, steps_per_epoch, max_steps)
    model, optimizer, scheduler = run.prepare(model, optimizer, scheduler)
    trained = acc.unwrap_model(model)
    if ema is not None:
        run.register_state("ema", ema)
    stopper = EarlyStopping(opts.early_stopping_patience, opts.early_stopping_min_delta)
    run.register_state("early_stopping", stopper)
    exported = ema.module if ema is not None else model  # what validation, samples and exports use
    motion_ae = load_motion_autoencoder(motion_source, config).to(run.device) if motion_source and run.is_main else None
    sample_source = None
    if opts.sample_interval and run.is_main:
        sample_source = read_sample_source(val_set or train_set, opts.sample_frames or 2 * config.window)
    run.start(loader)

    flow = RectifiedFlow(opts.loss_type, opts.time_sampling, velocity_weight=opts.velocity_weight)
    dropout = ConditionDropout.for_float(config.audio_dropout_prob, config.ref_dropout_prob,
                                         config.emotion_dropout_prob, config.prev_dropout_prob)
    logger.info("%d training windows (%d clips), %d steps of %d windows x %d process(es) x %d accumulation",
                len(train_set), len(train_set.clips), max_steps, opts.batch_size, acc.num_processes,
                train_opts.gradient_accumulation_steps)
    for batch in run.batches(loader, max_steps):
        with run.accumulate(model):
            terms = model(flow, dropout, batch)
            run.backward_and_step(terms["loss"], model, optimizer, scheduler)
        if acc.sync_gradients:
            # before end_step, which may save the checkpoint of this step: EMA and validation
            # state must be in it for an exact resume
            step = run.step + 1
            if ema is not None:
                ema.update_parameters(trained)
            if val_loader is not None and step % opts.eval_interval == 0:
                val_loss = validate(run, exported, val_loader, flow, train_opts.seed)
                improved = stopper.update(val_loss, step)
                run.metrics.log({"val/loss": val_loss, "val/best": stopper.best}, step)
                logger.info("step %d: val/loss=%.5f (best %.5f at step %d)", step, val_loss, stopper.best,
                            stopper.best_step)
                if improved:
                    export(run, model, ema, "best", step)
        run.end_step(terms, samples=len(batch["motion"]))
        if run.is_main and run.at_interval(opts.sample_interval):
            write_sample(run, acc.unwrap_model(exported), sample_source, motion_ae, train_opts.seed)
        if stopper.should_stop:
            logger.info("early stopping at step %d: no validation improvement in %d evaluations (best %.5f at "
                        "step %d)", run.step, stopper.bad, stopper.best, stopper.best_step)
            run.save_checkpoint()
            break
    export(run, model, ema, "final", run.step, motion_ae if opts.export_release else None)
    run.finish()


if __name__ == "__main__":
    run_main(main)
