"""``TrainingRun``: the loop machinery every training script shares.

A script builds its models, optimizer and loader, then::

    run = TrainingRun(train_opts, model_opts)   # checks --output_dir; writes nothing yet
    model, optimizer, scheduler = run.prepare(model, optimizer, scheduler)
    run.start(loader)                           # config.json, logs, trackers; restores a checkpoint
    for batch in run.batches(loader, max_steps):
        with run.accumulate(model):
            terms = compute_loss(model, batch)          # dict with a "loss" entry
            run.backward_and_step(terms["loss"], model, optimizer, scheduler)
        run.end_step(terms, samples=len(batch))
    run.finish()

``end_step`` counts optimizer steps, stops on NaN/Inf with the step and every loss term named and
logs averages (``metrics.jsonl``, TensorBoard/W&B, the log file). Checkpoints are saved every
``--checkpointing_steps`` and when SIGTERM/SIGINT arrives, on all ranks together, when the loop
asks for the next batch: whatever the script did after ``end_step`` (validation, exports) is in them.

An output folder holds one run: a folder with an earlier run's checkpoints or metrics is refused
unless the run resumes it or ``--overwrite_output_dir`` is given (then that run's outputs are
removed when this one starts). Nothing is written before :meth:`TrainingRun.start`, so a run that
fails while loading its models leaves the folder as it was.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .checkpoint import (CheckpointManager, all_ranks_ok, checkpoint_step, list_checkpoints,
                         output_shared_between_nodes, resolve_checkpoint)
from .errors import CheckpointError, ConfigError, NonFiniteLossError
from .export import CONFIG_NAME, WEIGHTS_NAME, export_weights
from .failures import FailureWatch
from .launch import build_accelerator, set_deepspeed_micro_batch
from .options import options_dict, save_config
from .tracking import MetricsWriter, Throughput, attach_log_file, buffer_logs, progress, setup_logging
from .training_options import TrainingOptions

logger = logging.getLogger("omniflow")


class TrainingRun:
    def __init__(self, opts: TrainingOptions, *other_options: Any, micro_batch_size: int | None = None):
        self.opts = opts
        self.output_dir = Path(opts.output_dir)
        self._options = (*other_options, opts)
        self.accelerator = acc = build_accelerator(
            self.output_dir, mixed_precision=opts.mixed_precision,
            gradient_accumulation_steps=opts.gradient_accumulation_steps, report_to=opts.report_to,
            logging_dir=opts.logging_dir, seed=opts.seed, allow_tf32=opts.allow_tf32, ddp_timeout_s=opts.ddp_timeout)
        self.step = 0
        FailureWatch.start(acc, self.output_dir, lambda: self.step, opts.ddp_timeout)
        setup_logging(None, acc.is_main_process)
        self._early_logs = buffer_logs() if acc.is_main_process else None  # train.log is opened by start()
        if micro_batch_size is not None:
            set_deepspeed_micro_batch(acc, micro_batch_size)
        logger.info("%d process(es), device %s, mixed precision %s", acc.num_processes, acc.device,
                    acc.mixed_precision)
        self.checkpoints = CheckpointManager(acc, self.output_dir, opts.checkpoints_total_limit)
        self._resume_path = self._check_output_dir()
        if self._resume_path is not None:
            self.checkpoints.verify(self._resume_path)  # before models load: a bad checkpoint fails in seconds
        self.metrics = MetricsWriter(acc, self.output_dir)
        self.throughput = Throughput(acc)
        self.stopped_by_signal = False
        self._loader = None
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._pending_signal: int | None = None
        self._exit_signal: int | None = None
        # (step, names, values) of the micro-steps whose terms are not yet checked for NaN/inf: kept on the device
        # and checked at logging and checkpoint steps, so that training never waits for the GPU in between
        self._unchecked: list[tuple[int, list[str], torch.Tensor]] = []
        self._save_due = False
        self._grad_norms: dict[str, Any] = {}
        self._derived: dict[str, Callable[[dict[str, float]], float]] = {}
        self._lrs: dict[str, float] = {}
        self._bar = None
        self._pid = os.getpid()
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
        """``accelerator.prepare``; the prepared models, optimizers and schedulers go into every checkpoint."""
        prepared = self.accelerator.prepare(*objects)
        self.checkpoints.track(*(prepared if isinstance(prepared, tuple) else (prepared,)))
        return prepared

    def register_state(self, name: str, obj: Any) -> None:
        """Checkpoint ``obj`` (``state_dict``/``load_state_dict`` of tensors, numbers, strings) with the run."""
        self.checkpoints.register(name, obj)

    def _check_output_dir(self) -> Path | None:
        """Refuse a folder that holds another run (HF Trainer's rule) or cannot be written; returns the
        checkpoint to resume (None: start from scratch)."""
        out, opts = self.output_dir, self.opts
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--output_dir {out} is a file, not a folder")
        resume = resolve_checkpoint(out, opts.resume_from_checkpoint)
        # "latest" without a checkpoint restarts a run that was stopped before its first save.
        continues_this_folder = opts.resume_from_checkpoint == "latest" or (
            resume is not None and resume.resolve().parent == out.resolve())
        earlier = earlier_run_outputs(out)
        if earlier and not continues_this_folder and not opts.overwrite_output_dir:
            raise ConfigError(
                f"--output_dir {out} holds an earlier run ({', '.join(earlier[:3])}): resume it with "
                "--resume_from_checkpoint latest, choose a new --output_dir, or pass --overwrite_output_dir "
                "to replace it")
        try:
            out.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=out).close()
        except OSError as err:
            raise ConfigError(f"--output_dir {out} is not writable ({err.strerror or err})") from None
        if not output_shared_between_nodes(self.accelerator, out):
            self.checkpoints.use_node_local_disks()
            logger.info("--output_dir %s is node-local (not shared between the nodes): each node keeps its own "
                        "checkpoints; logs and exports are written on node 0", out)
            if opts.resume_from_checkpoint == "latest":
                resume = self._newest_on_every_node()
        return resume

    def _newest_on_every_node(self) -> Path | None:
        """``latest`` on node-local disks: the newest step every node completed, found on every node's disk."""
        acc = self.accelerator
        local = list_checkpoints(self.output_dir)
        newest = torch.tensor([checkpoint_step(local[-1]) if local else -1], device=acc.device)
        if acc.num_processes > 1:
            torch.distributed.all_reduce(newest, op=torch.distributed.ReduceOp.MIN)
        step = int(newest.item())
        if step < 0:
            return None
        path = self.output_dir / f"checkpoint-{step}"
        if not all_ranks_ok(acc, path.is_dir()):
            raise CheckpointError(f"no checkpoint is complete on every node's --output_dir (the nodes' newest "
                                  f"common step {step} is missing on some): resume from a shared copy")
        return path

    def start(self, loader=None) -> int:
        """Begin writing the run: config.json, train.log, trackers; restore the checkpoint to resume, if
        any (models, optimizers, schedulers, registered states, RNG, data position). Returns the step."""
        acc, out = self.accelerator, self.output_dir
        self._loader = loader
        resume = self._resume_path
        if self.checkpoints.leader:  # rank 0, and on node-local disks each node's first process
            if resume is None or resume.resolve().parent != out.resolve():
                if earlier_run_outputs(out):
                    logger.warning("starting afresh: removing the outputs of the earlier run in %s", out)
                clear_run_outputs(out, self.opts.logging_dir)
            elif checkpoint_step(resume) is not None:
                for later in list_checkpoints(out):
                    if checkpoint_step(later) > checkpoint_step(resume):
                        logger.warning("removing %s: this run continues from %s instead", later, resume.name)
                        shutil.rmtree(later)
            self.checkpoints.remove_incomplete()
        if acc.is_main_process:
            attach_log_file(out, self._early_logs)
            save_config(out / "config.json", *self._options)
            logger.info("config written to %s", out / "config.json")
        acc.wait_for_everyone()
        if resume is not None:
            state = self.checkpoints.load(resume)
            self.step = int(state["step"])
            window = state.get("log_window", {})
            self._sums, self._counts, self._lrs = window.get("sums", {}), window.get("counts", {}), window.get("lrs", {})
            if loader is not None and "loader" in state:
                loader.load_state_dict(state["loader"])
        elif self.opts.resume_from_checkpoint:
            logger.info("no checkpoint in %s: starting from scratch", out)
        self.metrics.truncate_after(self.step)
        if acc.log_with:
            # TensorBoard hides the events an interrupted run wrote after the resumed step.
            acc.init_trackers(self.opts.tracker_project_name, config=_scalars(options_dict(*self._options)),
                              init_kwargs={"tensorboard": {"purge_step": self.step + 1}})
        return self.step

    # -- the loop -------------------------------------------------------------------------------
    def batches(self, loader, max_steps: int) -> Iterator[Any]:
        """Micro-batches until ``max_steps`` optimizer steps are done (or a signal stops the run)."""
        self._loader = loader
        if self.is_main:
            self._bar = progress(total=max_steps, initial=self.step, desc="train")
        try:
            yield from self._batches(loader, max_steps)
            self._stop_if_non_finite()  # before the script's final exports
        finally:  # also on an error: the bar's last line must not follow the error message
            self._close_bar()
        if self.stopped_by_signal:
            self.accelerator.end_training()
            sys.exit(128 + self._exit_signal)

    def _batches(self, loader, max_steps: int) -> Iterator[Any]:
        while self.step < max_steps and not self.stopped_by_signal:
            # A checkpoint taken on an epoch's last batch resumes into an exhausted epoch: that is
            # not an empty data set, only one that yields nothing from the start of an epoch is.
            fresh_epoch = getattr(loader, "batch_in_epoch", 0) == 0
            empty = True
            for batch in loader:
                empty = False
                yield self._to_device(batch)
                # The script's work after end_step (validation, best-model exports, EMA) is done by now:
                # a checkpoint taken here holds all of this step.
                if self._save_due:
                    self.save_checkpoint()
                    self._save_due = False
                if self.step >= max_steps or self.stopped_by_signal:
                    break
            if empty and fresh_epoch:
                raise ConfigError("the training data yielded no batch (too few samples for the batch size?)")

    def accumulate(self, *models):
        return self.accelerator.accumulate(*models)

    def backward_and_step(self, loss: torch.Tensor, model: torch.nn.Module, optimizer, scheduler=None,
                          max_grad_norm: float | None = None, lr_name: str = "lr") -> torch.Tensor | None:
        """Backward; on a sync step clip, step the optimizer, then the scheduler (once, if not skipped).

        The learning rate used for this step and the gradient norm before clipping are logged by the
        next :meth:`end_step` (as ``lr_name`` and ``grad_norm``, or ``grad_norm_<x>`` for ``lr_<x>``).
        """
        acc = self.accelerator
        self._lrs[lr_name] = optimizer.param_groups[0]["lr"]
        acc.backward(loss)
        grad_norm = None
        if acc.sync_gradients:
            clip = self.opts.max_grad_norm if max_grad_norm is None else max_grad_norm
            # An infinite clip still measures the norm (DeepSpeed clips inside its step and reports it).
            grad_norm = acc.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)
        optimizer.step()
        if acc.sync_gradients and not acc.optimizer_step_was_skipped:
            if scheduler is not None:
                scheduler.step()
            if grad_norm is not None:  # an fp16 step skipped for overflow has an infinite norm by design
                self._grad_norms[lr_name.replace("lr", "grad_norm", 1)] = grad_norm
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def derive(self, name: str, compute: Callable[[dict[str, float]], float]) -> None:
        """Log ``name = compute(averaged terms)`` with each log line (e.g. perplexity = exp(mean CE): the
        mean of per-step exp(CE) is dominated by the worst step)."""
        self._derived[name] = compute

    def end_step(self, terms: dict[str, Any], samples: int, tokens: int = 0, **extra: Any) -> bool:
        """Book-keeping after each micro-batch. Returns True when an optimizer step just completed.

        Tensor terms stay on the device (summed there in float64); the host reads them only at logging and
        checkpoint steps, where a NaN/inf term of any earlier step stops the run naming that step."""
        values = {k: v.detach().double() if isinstance(v, torch.Tensor) else float(v)
                  for k, v in {**terms, **extra, **self._grad_norms}.items() if v is not None}
        self._grad_norms = {}
        self._watch(values)
        self.throughput.update(samples, tokens)
        self._accumulate(values)
        if not self.accelerator.sync_gradients:
            return False
        self.step += 1
        signum, _ = self._sync_flags(False)
        log_due = self.step % self.opts.logging_steps == 0
        self._save_due = self.step % self.opts.checkpointing_steps == 0 or bool(signum)
        if log_due or self._save_due or len(self._unchecked) >= 256:
            self._stop_if_non_finite()
        if self._bar is not None:
            self._bar.update(1)
        if log_due:
            self._flush_logs()
        if signum:
            self.stopped_by_signal, self._exit_signal = True, signum
            logger.warning("stopped by signal %d at step %d; resume with --resume_from_checkpoint latest", signum,
                           self.step)
        return True

    def at_interval(self, every: int | None) -> bool:
        """True right after an optimizer step whose number is a multiple of ``every``."""
        return bool(every) and self.accelerator.sync_gradients and self.step > 0 and self.step % every == 0

    def log(self, values: dict[str, float]) -> None:
        """Log extra values (e.g. validation metrics) at the current step."""
        self.metrics.log(values, self.step)
        logger.info("step %d: %s", self.step, _fmt(values))

    def save_checkpoint(self) -> Path:
        self._stop_if_non_finite()
        # The terms averaged since the last log line, so that a resumed run logs the same averages.
        sums = {k: float(v) for k, v in self._sums.items()}
        state = {"log_window": {"sums": sums, "counts": self._counts, "lrs": self._lrs}}
        if self._loader is not None:
            state["loader"] = self._loader.state_dict()
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

    def _watch(self, values: dict[str, Any]) -> None:
        """Queue this micro-step's tensor terms for the next non-finite check; a non-finite float is queued as is."""
        step = self.step + 1
        names = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
        if names:
            self._unchecked.append((step, names, torch.stack([values[k].reshape(()) for k in names])))
        bad_floats = {k: v for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)}
        if bad_floats:
            values_on_host = torch.tensor(list(bad_floats.values()), dtype=torch.float64)
            self._unchecked.append((step, list(bad_floats), values_on_host))

    def _stop_if_non_finite(self) -> None:
        """One host sync: raise NonFiniteLossError naming the first step with a NaN/inf term, on every rank."""
        pending, self._unchecked = self._unchecked, []
        first = None
        if pending:
            finite = torch.stack([torch.isfinite(t).all().to(self.device) for _, _, t in pending]).tolist()
            first = next((entry for entry, ok in zip(pending, finite) if not ok), None)
        _, any_bad = self._sync_flags(first is not None)
        if not any_bad:
            return
        self._close_bar()
        if first is None:
            raise NonFiniteLossError(self._non_finite_message(self.step, None))
        step, names, stacked = first
        raise NonFiniteLossError(self._non_finite_message(step, dict(zip(names, stacked.cpu().tolist()))))

    def _accumulate(self, values: dict[str, float]) -> None:
        # Counted per key: a term logged on some micro-steps only (a discriminator every 3rd step)
        # is averaged over the steps that produced it.
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
            self._counts[k] = self._counts.get(k, 0) + 1

    def _flush_logs(self) -> None:
        keys = sorted(self._sums)
        means = {}
        if keys:  # one device -> host copy for every term
            t = torch.stack([torch.as_tensor(self._sums[k], dtype=torch.float64, device=self.device) / self._counts[k]
                             for k in keys])
            if self.accelerator.num_processes > 1:
                t = self.accelerator.reduce(t, reduction="mean")
            means = dict(zip(keys, t.tolist()))
        if self._bar is not None and "loss" in means:
            self._bar.set_postfix(loss=f"{means['loss']:.4f}", refresh=False)
        means.update({name: compute(means) for name, compute in self._derived.items()})
        means.update(self._lrs)
        means.update(self.throughput.rates())
        self.log(means)
        self._sums, self._counts, self._lrs = {}, {}, {}

    def _sync_flags(self, bad: bool) -> tuple[int, bool]:
        """(the signal to stop for, 0 if none; whether any rank saw a non-finite term), agreed by all ranks:
        a SIGTERM that reaches one rank stops every rank at the same step."""
        signum = self._pending_signal or 0
        if self.accelerator.num_processes == 1:
            return signum, bad
        flags = torch.tensor([signum, int(bad)], device=self.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return int(flags[0]), bool(flags[1])

    def _non_finite_message(self, step: int, terms: dict[str, float] | None) -> str:
        shown = ", ".join(f"{k}={v:.6g}" for k, v in (terms or {}).items()) or "on another rank"
        message = f"non-finite loss at step {step}: {shown}"
        kept = list_checkpoints(self.output_dir)
        if not kept:
            return f"{message}; no checkpoint was saved in {self.output_dir}"
        message += f"; the last checkpoint is {kept[-1]}"
        if checkpoint_step(kept[-1]) == step - 1:
            message += (f", which holds the update of step {step - 1}, the one just before this loss: if that "
                        "update overflowed, resuming from it repeats this; resume from an earlier checkpoint or "
                        "with a lower learning rate")
        return message

    def _on_signal(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            # A forked child (a data worker) inherits this handler but holds no run to save: it must stop as
            # signalled, else a parent that terminates it (multiprocessing.Pool's exit) waits for ever.
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self._pending_signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self._pending_signal = signum
        logger.warning("received signal %d: saving a checkpoint after this step", signum)


def earlier_run_outputs(output_dir: Path) -> list[str]:
    """Names in ``output_dir`` that show an earlier run: its checkpoints and its metrics log."""
    found = [p.name for p in list_checkpoints(output_dir)]
    return found + (["metrics.jsonl"] if (output_dir / "metrics.jsonl").is_file() else [])


def clear_run_outputs(output_dir: Path, logging_dir: str) -> None:
    """Remove what a run writes into its folder: checkpoints, logs, config, exports (folders holding
    model.safetensors + config.json), samples and visualisations. Anything else is left alone."""
    if not output_dir.is_dir():
        return
    tracker_dir = (output_dir / logging_dir).resolve()
    for entry in output_dir.iterdir():
        is_export = (entry / WEIGHTS_NAME).is_file() and (entry / CONFIG_NAME).is_file()
        if (checkpoint_step(entry) is not None or entry.name.startswith("checkpoint-") and entry.suffix == ".tmp"
                or entry.name in RUN_FILES or is_export or entry.resolve() == tracker_dir):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


RUN_FILES = ("metrics.jsonl", "train.log", "config.json", "best_metrics.jsonl", "samples", "visualizations")


def _scalars(config: dict) -> dict:
    """Trackers take only scalars; lists become strings."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}


def _fmt(values: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def optimizer_steps(num_batches_per_epoch: int, num_epochs: int, accumulation: int) -> int:
    """Optimizer steps in ``num_epochs`` epochs (accumulation windows may span epoch ends)."""
    return max(1, num_epochs * num_batches_per_epoch // accumulation)


__all__ = ["TrainingOptions", "TrainingRun", "clear_run_outputs", "earlier_run_outputs", "optimizer_steps"]
