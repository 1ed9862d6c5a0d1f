"""``TrainingRun``: the loop machinery every training script shares.

A script builds its models, optimizer and loader, then::

    run = TrainingRun(train_opts, model_opts)
    model, optimizer, scheduler = run.prepare(model, optimizer, scheduler)
    run.resume(loader)
    for batch in run.batches(loader, max_steps):
        with run.accumulate(model):
            terms = compute_loss(model, batch)          # dict with a "loss" entry
            run.backward_and_step(terms["loss"], model, optimizer, scheduler)
        run.end_step(terms, samples=len(batch))
    run.finish()

``end_step`` counts optimizer steps, stops on NaN/Inf with the step and every loss term named,
logs averages (``metrics.jsonl``, TensorBoard/W&B, the log file), saves checkpoints every
``--checkpointing_steps`` and when SIGTERM/SIGINT arrives, on all ranks together.
"""
from __future__ import annotations

import logging
import math
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from tqdm.auto import tqdm

from .checkpoint import CheckpointManager, resolve_checkpoint
from .errors import ConfigError, NonFiniteLossError
from .export import export_weights
from .launch import REPORT_TO, build_accelerator, set_deepspeed_micro_batch
from .options import options_dict, save_config
from .tracking import MetricsWriter, Throughput, setup_logging

logger = logging.getLogger("omniflow")


@dataclass
class TrainingOptions:
    """Runtime options shared by every training script (diffusers example-script names)."""

    output_dir: str = field(default="outputs/run", metadata={"help": "directory for checkpoints, logs, exports"})
    seed: int = field(default=0, metadata={"help": "random seed (data order, initialisation, noise)"})
    mixed_precision: Optional[str] = field(default=None, metadata={
        "help": "no|fp16|bf16; default: what the accelerate launch config says", "choices": ["no", "fp16", "bf16"]})
    allow_tf32: bool = field(default=True, metadata={"help": "TF32 matmuls on Ampere+ GPUs"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_train_steps: Optional[int] = field(default=None, metadata={
        "help": "optimizer steps to train; overrides the epoch count when set"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 disables)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations to save memory"})
    checkpointing_steps: int = field(default=500, metadata={
        "help": "save a resumable checkpoint every N optimizer steps", "aliases": ["--save_interval"]})
    checkpoints_total_limit: Optional[int] = field(default=None, metadata={"help": "keep at most N checkpoints"})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={
        "help": "'latest' or a checkpoint directory to resume from"})
    logging_steps: int = field(default=10, metadata={
        "help": "log averaged loss terms every N optimizer steps", "aliases": ["--log_interval"]})
    report_to: str = field(default="tensorboard", metadata={"help": "experiment tracker", "choices": list(REPORT_TO)})
    logging_dir: str = field(default="logs", metadata={"help": "tracker directory, relative to output_dir"})
    tracker_project_name: str = field(default="omniflow", metadata={"help": "project name for the trackers"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "data loading worker processes"})

    def validate(self) -> None:
        for name in ("gradient_accumulation_steps", "checkpointing_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ConfigError(f"--max_train_steps must be >= 1, got {self.max_train_steps}")


class TrainingRun:
    def __init__(self, opts: TrainingOptions, *other_options: Any, micro_batch_size: int | None = None):
        self.opts = opts
        self.output_dir = Path(opts.output_dir)
        self.accelerator = acc = build_accelerator(
            self.output_dir, mixed_precision=opts.mixed_precision,
            gradient_accumulation_steps=opts.gradient_accumulation_steps, report_to=opts.report_to,
            logging_dir=opts.logging_dir, seed=opts.seed, allow_tf32=opts.allow_tf32)
        setup_logging(self.output_dir, acc.is_main_process)
        if micro_batch_size is not None:
            set_deepspeed_micro_batch(acc, micro_batch_size)
        if acc.is_main_process:
            save_config(self.output_dir / "config.json", *other_options, opts)
            logger.info("config written to %s", self.output_dir / "config.json")
        if acc.log_with:
            acc.init_trackers(opts.tracker_project_name, config=_scalars(options_dict(*other_options, opts)))
        logger.info("%d process(es), device %s, mixed precision %s", acc.num_processes, acc.device,
                    acc.mixed_precision)
        self.checkpoints = CheckpointManager(acc, self.output_dir, opts.checkpoints_total_limit)
        self.metrics = MetricsWriter(acc, self.output_dir)
        self.throughput = Throughput(acc)
        self.step = 0
        self.stopped_by_signal = False
        self._loader = None
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._pending_signal: int | None = None
        self._bad_terms: dict[str, float] | None = None
        self._lrs: dict[str, float] = {}
        self._bar = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    # -- set-up ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def prepare(self, *objects):
        return self.accelerator.prepare(*objects)

    def resume(self, loader=None) -> int:
        """Restore the latest/given checkpoint (models, optimizers, schedulers, RNG, data position)."""
        self._loader = loader
        path = resolve_checkpoint(self.output_dir, self.opts.resume_from_checkpoint)
        if path is None:
            if self.opts.resume_from_checkpoint:
                logger.info("no checkpoint in %s: starting from scratch", self.output_dir)
            return 0
        state = self.checkpoints.load(path)
        self.step = int(state["step"])
        if loader is not None and "loader" in state:
            loader.load_state_dict(state["loader"])
        self.metrics.truncate_after(self.step)
        return self.step

    # -- the loop -------------------------------------------------------------------------------
    def batches(self, loader, max_steps: int) -> Iterator[Any]:
        """Micro-batches until ``max_steps`` optimizer steps are done (or a signal stops the run)."""
        self._loader = loader
        if self.is_main:
            self._bar = tqdm(total=max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        while self.step < max_steps and not self.stopped_by_signal:
            # A checkpoint taken on an epoch's last batch resumes into an exhausted epoch: that is
            # not an empty data set, only one that yields nothing from the start of an epoch is.
            fresh_epoch = getattr(loader, "batch_in_epoch", 0) == 0
            empty = True
            for batch in loader:
                empty = False
                yield self._to_device(batch)
                if self.step >= max_steps or self.stopped_by_signal:
                    break
            if empty and fresh_epoch:
                raise ConfigError("the training data yielded no batch (too few samples for the batch size?)")
        self._close_bar()
        if self.stopped_by_signal:
            self.accelerator.end_training()
            sys.exit(128 + self._pending_signal)

    def accumulate(self, *models):
        return self.accelerator.accumulate(*models)

    def backward_and_step(self, loss: torch.Tensor, model: torch.nn.Module, optimizer, scheduler=None,
                          max_grad_norm: float | None = None, lr_name: str = "lr") -> torch.Tensor | None:
        """Backward; on a sync step clip, step the optimizer, then the scheduler (once, if not skipped).

        The learning rate used for this step is logged as ``lr_name`` by the next :meth:`end_step`.
        """
        acc = self.accelerator
        self._lrs[lr_name] = optimizer.param_groups[0]["lr"]
        acc.backward(loss)
        grad_norm = None
        clip = self.opts.max_grad_norm if max_grad_norm is None else max_grad_norm
        if acc.sync_gradients and clip > 0:
            grad_norm = acc.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if scheduler is not None and acc.sync_gradients and not acc.optimizer_step_was_skipped:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def end_step(self, terms: dict[str, Any], samples: int, tokens: int = 0, **extra: Any) -> bool:
        """Book-keeping after each micro-batch. Returns True when an optimizer step just completed."""
        values = {k: float(v.detach().float().item() if isinstance(v, torch.Tensor) else v)
                  for k, v in {**terms, **extra}.items() if v is not None}
        bad = not all(math.isfinite(v) for v in values.values())
        if bad:
            self._bad_terms = values
        self.throughput.update(samples, tokens)
        if not self.accelerator.sync_gradients:
            self._accumulate(values)
            return False
        self.step += 1
        stop, any_bad = self._sync_flags(self._bad_terms is not None)
        if any_bad:
            self._close_bar()
            bad_terms = self._bad_terms or {}
            shown = ", ".join(f"{k}={v:.6g}" for k, v in bad_terms.items()) or "on another rank"
            raise NonFiniteLossError(
                f"non-finite loss at step {self.step}: {shown}; the last good checkpoint is kept in {self.output_dir}")
        self._accumulate(values)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}")
        if self.step % self.opts.logging_steps == 0:
            self._flush_logs()
        if self.step % self.opts.checkpointing_steps == 0 or stop:
            self.save_checkpoint()
        if stop:
            self.stopped_by_signal = True
            logger.warning("stopped by signal at step %d; resume with --resume_from_checkpoint latest", self.step)
        return True

    def at_interval(self, every: int | None) -> bool:
        """True right after an optimizer step whose number is a multiple of ``every``."""
        return bool(every) and self.accelerator.sync_gradients and self.step > 0 and self.step % every == 0

    def log(self, values: dict[str, float]) -> None:
        """Log extra values (e.g. validation metrics) at the current step."""
        self.metrics.log(values, self.step)
        logger.info("step %d: %s", self.step, _fmt(values))

    def save_checkpoint(self) -> Path:
        state = {"loader": self._loader.state_dict()} if self._loader is not None else {}
        return self.checkpoints.save(self.step, state)

    def export(self, model: torch.nn.Module, config: dict, out_dir: str | Path) -> Path | None:
        """Gather the weights (all ranks: ZeRO-3 shards them) and write safetensors + JSON on rank 0."""
        acc = self.accelerator
        state = acc.get_state_dict(model)
        path = None
        if acc.is_main_process:
            path = export_weights(state, config, out_dir)
            logger.info("exported weights to %s", path)
        acc.wait_for_everyone()
        return path

    def finish(self) -> None:
        if self._counts:
            self._flush_logs()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()

    # -- internals ------------------------------------------------------------------------------
    def _to_device(self, batch):
        from accelerate.utils import send_to_device

        return send_to_device(batch, self.device, non_blocking=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _accumulate(self, values: dict[str, float]) -> None:
        # Counted per key: a term logged on some micro-steps only (a discriminator every 3rd step)
        # is averaged over the steps that produced it.
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
            self._counts[k] = self._counts.get(k, 0) + 1

    def _flush_logs(self) -> None:
        means = {k: v / self._counts[k] for k, v in self._sums.items()}
        if self.accelerator.num_processes > 1 and means:
            keys = sorted(means)
            t = torch.tensor([means[k] for k in keys], dtype=torch.float64, device=self.device)
            t = self.accelerator.reduce(t, reduction="mean")
            means = dict(zip(keys, t.tolist()))
        means.update(self._lrs)
        means.update(self.throughput.rates())
        self.log(means)
        self._sums, self._counts, self._lrs = {}, {}, {}

    def _sync_flags(self, bad: bool) -> tuple[bool, bool]:
        stop = self._pending_signal is not None
        if self.accelerator.num_processes == 1:
            return stop, bad
        flags = torch.tensor([float(stop), float(bad)], device=self.device)
        flags = self.accelerator.reduce(flags, reduction="sum")
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def _on_signal(self, signum, frame) -> None:
        if self._pending_signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self._pending_signal = signum
        logger.warning("received signal %d: saving a checkpoint after this step", signum)


def _scalars(config: dict) -> dict:
    """Trackers take only scalars; lists become strings."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}


def _fmt(values: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def optimizer_steps(num_batches_per_epoch: int, num_epochs: int, accumulation: int) -> int:
    """Optimizer steps in ``num_epochs`` epochs (accumulation windows may span epoch ends)."""
    return max(1, num_epochs * num_batches_per_epoch // accumulation)


__all__ = ["TrainingOptions", "TrainingRun", "optimizer_steps"]
