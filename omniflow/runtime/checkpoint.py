"""Training-state checkpoints: atomic, per-rank data positions, pruning, ``latest`` resume.

Layout: ``<output_dir>/checkpoint-<step>/`` holds what ``accelerator.save_state`` writes (models,
optimizers, schedulers, RNG states of every rank) plus ``train_state_rank<r>.json`` (step, epoch,
data position of rank r). Each save goes to ``checkpoint-<step>.tmp`` first and is renamed only
after every rank finished writing, so a crash mid-save never touches the last good checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from .errors import CheckpointError

logger = logging.getLogger("omniflow")

_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (``.tmp`` leftovers are ignored)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(output_dir: str | os.PathLike, resume_from: str | None) -> Path | None:
    """``latest`` -> newest complete checkpoint (None if there is none); a path -> that path."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from}: no such checkpoint directory")
    return path


class CheckpointManager:
    def __init__(self, accelerator: Accelerator, output_dir: str | os.PathLike, total_limit: int | None = None):
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.total_limit = total_limit
        if accelerator.is_main_process:
            for stale in self.output_dir.glob("checkpoint-*.tmp"):
                logger.warning("removing incomplete checkpoint %s (a save was interrupted)", stale)
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()

    def save(self, step: int, train_state: dict) -> Path:
        """Save on every rank (DeepSpeed shards its state per rank); returns the final directory."""
        acc = self.accelerator
        final = self.output_dir / f"checkpoint-{step}"
        tmp = self.output_dir / f"checkpoint-{step}.tmp"
        if final.is_dir():
            return final
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        state_file = tmp / f"train_state_rank{acc.process_index}.json"
        state_file.write_text(json.dumps({**train_state, "step": step, "num_processes": acc.num_processes}))
        acc.wait_for_everyone()
        if acc.is_main_process:
            os.replace(tmp, final)
            self._prune()
            logger.info("saved checkpoint %s", final)
        acc.wait_for_everyone()
        return final

    def load(self, path: str | os.PathLike) -> dict:
        """Restore the accelerator state; return this rank's train state (step, epoch, data position)."""
        acc = self.accelerator
        path = Path(path)
        own = path / f"train_state_rank{acc.process_index}.json"
        first = path / "train_state_rank0.json"
        if not first.is_file():
            raise CheckpointError(f"{path} is not a training checkpoint (no train_state_rank0.json)")
        state = json.loads((own if own.is_file() else first).read_text())
        if state.get("num_processes", acc.num_processes) != acc.num_processes:
            logger.warning(
                "checkpoint %s was written by %d processes, resuming with %d: the data order will differ",
                path, state["num_processes"], acc.num_processes,
            )
            state.pop("loader", None)
        try:
            acc.load_state(str(path))
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{path}: cannot restore training state ({err})") from None
        logger.info("resumed from %s at step %d", path, state["step"])
        return state

    def _prune(self) -> None:
        if not self.total_limit:
            return
        for old in list_checkpoints(self.output_dir)[: -self.total_limit]:
            shutil.rmtree(old, ignore_errors=True)
            logger.info("removed old checkpoint %s (--checkpoints_total_limit %d)", old, self.total_limit)
