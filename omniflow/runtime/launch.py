"""Accelerator construction shared by every training script.

``python scripts/X.py`` runs one process (CPU or one GPU); ``accelerate launch --config_file
accelerate_configs/<cfg>.yaml scripts/X.py`` runs DDP or DeepSpeed ZeRO-2/3. The launch config
decides the distributed mode; ``--mixed_precision`` overrides its precision when given.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed

from .errors import ConfigError

logger = logging.getLogger("omniflow")


def trackers_for(report_to: str) -> list[str]:
    names = {"all": ["tensorboard", "wandb"], "none": []}.get(report_to, [report_to])
    modules = {"tensorboard": "tensorboard", "wandb": "wandb"}
    for name in names:
        if importlib.util.find_spec(modules[name]) is None:
            raise ConfigError(f"--report_to {report_to}: the {name!r} package is not installed (pip install {name})")
    return names


def build_accelerator(
    output_dir: str | Path,
    *,
    mixed_precision: str | None = None,
    gradient_accumulation_steps: int = 1,
    report_to: str = "tensorboard",
    logging_dir: str = "logs",
    seed: int | None = 0,
    allow_tf32: bool = True,
    ddp_timeout_s: int | None = None,
) -> Accelerator:
    """An Accelerator whose schedulers step once per optimizer step, whatever the process count.

    accelerate's default steps a prepared scheduler ``num_processes`` times per call; we keep
    schedules in optimizer steps instead (``step_scheduler_with_optimizer=False``) and step
    them ourselves only after a real optimizer step. ``ddp_timeout_s``: how long a collective waits for the
    other ranks (torch's default otherwise: 10 minutes with NCCL, 30 with gloo).
    """
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
    output_dir = Path(output_dir)
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / logging_dir))
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=trackers_for(report_to) or None,
        project_config=project,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=ddp_timeout_s))] if ddp_timeout_s else None,
    )
    if seed is not None:
        # Different per rank so that noise/dropout differ between ranks; data order is seeded separately.
        set_seed(seed, device_specific=True)
    return accelerator


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def set_deepspeed_micro_batch(accelerator: Accelerator, micro_batch_size: int) -> None:
    """Fill DeepSpeed's ``"auto"`` micro-batch size: our loaders are not passed to ``prepare``."""
    if uses_deepspeed(accelerator):
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
        if config.get("train_batch_size") == "auto":
            config["train_batch_size"] = (
                micro_batch_size * accelerator.num_processes * accelerator.gradient_accumulation_steps
            )


@contextlib.contextmanager
def frozen_init_context(accelerator: Accelerator):
    """Context for building frozen models so that ZeRO-3 does not partition them.

    Under ZeRO-3 with ``zero3_init_flag`` transformers' ``from_pretrained`` builds every model inside
    ``deepspeed.zero.Init`` (sharded across ranks); frozen encoders/decoders are not trained and must
    stay whole on every rank. accelerate's ``zero3_init_context_manager(enable=False)`` re-registers
    the stage-3 config with transformers, so we unregister it ourselves and restore it on exit.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or not plugin.zero3_init_flag:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def autocast_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype frozen modules should be kept in to match the mixed-precision setting."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
