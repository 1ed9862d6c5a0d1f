"""The runtime options every training script shares (diffusers example-script names), in a module that imports
neither torch nor accelerate: a script parses its flags (and answers ``--help``) before loading them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .errors import ConfigError

REPORT_TO = ("tensorboard", "wandb", "all", "none")


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
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "start afresh in an --output_dir that holds an earlier run: its checkpoints, logs and exports are "
                "removed when training starts"})
    logging_steps: int = field(default=10, metadata={
        "help": "log averaged loss terms every N optimizer steps", "aliases": ["--log_interval"]})
    report_to: str = field(default="tensorboard", metadata={"help": "experiment tracker", "choices": list(REPORT_TO)})
    logging_dir: str = field(default="logs", metadata={"help": "tracker directory, relative to output_dir"})
    tracker_project_name: str = field(default="omniflow", metadata={"help": "project name for the trackers"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "data loading worker processes"})
    ddp_timeout: int = field(default=1800, metadata={
        "help": "seconds a collective waits for the other ranks before this rank stops (a rank that died or "
                "hangs); raise it when one rank works alone longer (e.g. a long validation on rank 0)"})

    def validate(self) -> None:
        for name in ("gradient_accumulation_steps", "checkpointing_steps", "logging_steps", "ddp_timeout"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ConfigError(f"--max_train_steps must be >= 1, got {self.max_train_steps}")
