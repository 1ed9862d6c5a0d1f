"""Run logging: a log file, ``metrics.jsonl``, accelerate trackers (TensorBoard/W&B), throughput."""
from __future__ import annotations

import json
import logging
import logging.handlers
import math
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .errors import DataError
from .reports import markdown_table, write_json_atomic

logger = logging.getLogger("omniflow")


_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")


def setup_logging(output_dir: str | Path | None, is_main: bool, log_name: str = "train.log") -> None:
    """INFO to stderr and ``<output_dir>/<log_name>`` on the main process, warnings only elsewhere."""
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if is_main else logging.WARNING)
    console.setFormatter(_FORMAT)
    logger.addHandler(console)
    if output_dir is not None and is_main:
        attach_log_file(output_dir, log_name=log_name)
    for noisy in ("diffusers", "datasets", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not sys.stderr.isatty():  # in a log file the libraries' bars ("Loading weights") are thousands of lines
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        for module, disable in (("huggingface_hub.utils", "disable_progress_bars"),
                                ("transformers.utils.logging", "disable_progress_bar"),
                                ("diffusers.utils.logging", "disable_progress_bar")):
            if module in sys.modules:
                getattr(sys.modules[module], disable)()
    # transformers warns with a key table whenever one tower of a two-tower CLIP checkpoint is loaded.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import datasets  # its per-split progress bars drown the training log

    datasets.disable_progress_bars()


def progress(iterable=None, *, total: int | None = None, desc: str = "", initial: int = 0, disable: bool = False,
             unit: str = "it"):
    """A tqdm bar on stderr; when stderr is not a terminal (a log file, a batch job) it writes a line at
    most every 30 s instead of at every step."""
    interactive = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, initial=initial, disable=disable, unit=unit,
                dynamic_ncols=interactive, mininterval=0.1 if interactive else 30.0, ascii=not interactive)


def buffer_logs() -> logging.handlers.MemoryHandler:
    """Keep log records in memory until :func:`attach_log_file` (a run writes no file before it starts)."""
    buffer = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
    buffer.setLevel(logging.DEBUG)
    logger.addHandler(buffer)
    return buffer


def attach_log_file(output_dir: str | Path, buffered: logging.handlers.MemoryHandler | None = None,
                    log_name: str = "train.log") -> None:
    """Log everything (DEBUG up) to ``<output_dir>/<log_name>``, starting with the ``buffered`` records."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(Path(output_dir) / log_name)
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(_FORMAT)
    if buffered is not None:
        buffered.setTarget(file_handler)
        buffered.flush()
        logger.removeHandler(buffered)
        buffered.close()
    logger.addHandler(file_handler)


class MetricsWriter:
    """Writes one JSON object per logged step to ``metrics.jsonl`` and forwards to the trackers."""

    def __init__(self, accelerator: Accelerator, output_dir: str | Path, filename: str = "metrics.jsonl"):
        self.accelerator = accelerator
        self.path = Path(output_dir) / filename

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so curves do not double back, and a torn
        last line (what a kill or a full disk leaves mid-write)."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number < len(lines):
                    raise DataError(f"{self.path}: line {number} is not JSON (only a torn last line is dropped)")
                logger.warning("%s: dropping a torn last line (%d characters)", self.path, len(line))
                break
            if record["step"] <= step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, values: dict[str, float], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.accelerator.log(values, step=step)

    def log_texts(self, name: str, records: list[dict], step: int) -> None:
        """Text records (e.g. sampled predictions with their references): ``<output_dir>/<name>/step-<step>.json``,
        a table in TensorBoard's text tab, a W&B table."""
        if not self.accelerator.is_main_process or not records:
            return
        write_json_atomic(self.path.parent / name / f"step-{step}.json", records)
        columns = list(dict.fromkeys(key for record in records for key in record))
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_text(name, markdown_table(columns, records), step)
            elif tracker.name == "wandb":
                import wandb

                rows = [[str(record.get(key, "")) for key in columns] for record in records]
                tracker.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def log_images(self, name: str, images: torch.Tensor, step: int) -> None:
        """``images``: (N, C, H, W) floats in [0, 1] or uint8."""
        if not self.accelerator.is_main_process:
            return
        images = images.detach().cpu()
        if images.dtype != torch.uint8:
            images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images(name, images, step, dataformats="NCHW")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({name: [wandb.Image(img.permute(1, 2, 0).numpy()) for img in images]}, step=step)


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Throughput:
    """Samples/s and tokens/s over the interval since the last :meth:`rates` call, summed over ranks."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.reset()

    def reset(self) -> None:
        self.samples = 0
        self.tokens = 0
        self.start = time.perf_counter()

    def update(self, samples: int, tokens: int = 0) -> None:
        self.samples += samples
        self.tokens += tokens

    def rates(self) -> dict[str, float]:
        counts = torch.tensor([self.samples, self.tokens], dtype=torch.float64, device=self.accelerator.device)
        counts = self.accelerator.reduce(counts, reduction="sum") if self.accelerator.num_processes > 1 else counts
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"samples_per_s": counts[0].item() / elapsed}
        if counts[1] > 0:
            out["tokens_per_s"] = counts[1].item() / elapsed
        if torch.cuda.is_available():
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.reset()
        return out
