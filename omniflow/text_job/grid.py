"""The text-head experiment grid (the user's seed 004): the four heads trained on the same data and seed,
compared side by side. ``scripts/run_text_grid.py`` runs the steps; this module keeps the grid's folder
and writes its report.

A grid folder holds ``grid_config.json`` (the settings it was started with: a rerun with other settings
is refused), one training output folder per variant, ``predictions/<variant>.json`` (and
``released.json``, the released ``text_output``), ``runs.jsonl`` (wall time and peak memory of every
training process the grid started), ``eval.json`` (eval_text.py's scores), ``grid.md`` and ``curves.png``.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import time
from pathlib import Path

from ..runtime.errors import ConfigError, DataError
from ..runtime.reports import write_json_atomic
from .checkpoints import BEST_HEAD, FINAL_HEAD, head_config

VARIANTS = ("baseline", "refiner", "vq", "vq_refiner")
RELEASED = "released"  # the released text_output, generated without a head
SCORES = {"bleu_4": "BLEU-4", "meteor": "METEOR", "rouge": "ROUGE-L", "cider": "CIDEr-D"}
CONFIG_NAME = "grid_config.json"
RUNS_NAME = "runs.jsonl"


class GridFolder:
    """Paths of a grid folder and its bookkeeping."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def variant(self, name: str) -> Path:
        return self.root / name

    def predictions(self, name: str) -> Path:
        return self.root / "predictions" / f"{name}.json"

    def finished(self, name: str) -> bool:
        return (self.variant(name) / FINAL_HEAD / "config.json").is_file()

    def claim(self, settings: dict) -> None:
        """Start the grid, or continue one started with the same settings; another grid's folder is refused."""
        path = self.root / CONFIG_NAME
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: not JSON ({err.msg} at line {err.lineno})") from None
            changed = [key for key in sorted(set(old) | set(settings)) if old.get(key) != settings.get(key)]
            if changed:
                key = changed[0]
                raise ConfigError(f"{self.root} holds a grid with other settings ({key}: {old.get(key)!r}, now "
                                  f"{settings.get(key)!r}): rerun with the same settings to resume it, or choose "
                                  "a new --output_dir")
            return
        if self.root.is_dir() and any(self.root.iterdir()):
            raise ConfigError(f"--output_dir {self.root} is not empty and holds no {CONFIG_NAME}: choose a new folder")
        write_json_atomic(path, settings)

    def run_training(self, name: str, command: list[str]) -> int:
        """Run one training process of ``name``; append its wall time and peak memory (the largest resident
        set of one process: it or a rank it launched) to ``runs.jsonl``. Returns the exit status."""
        start = time.perf_counter()
        process = subprocess.Popen(command)
        peak_kb = 0
        while process.poll() is None:
            peak_kb = max([peak_kb, *map(_peak_rss_kb, _process_tree(process.pid))])
            time.sleep(0.5)
        record = {"variant": name, "seconds": round(time.perf_counter() - start, 2),
                  "peak_rss_gb": peak_kb / 2**20 if peak_kb else None, "exit": process.returncode}
        with (self.root / RUNS_NAME).open("a") as f:
            f.write(json.dumps(record) + "\n")
        return process.returncode

    def runs(self, name: str) -> list[dict]:
        path = self.root / RUNS_NAME
        lines = path.read_text().splitlines() if path.is_file() else []
        return [record for record in map(json.loads, filter(None, lines)) if record["variant"] == name]


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc; elsewhere just ``pid``)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, queue = [], [pid]
    while queue:
        tree.append(queue.pop())
        queue += children.get(tree[-1], [])
    return tree


def _peak_rss_kb(pid: int) -> int:
    """The process's peak resident set (VmHWM: of its own address space, unlike getrusage's ru_maxrss, which
    keeps the RSS of the parent that forked it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)


def read_metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def training_stats(grid: GridFolder, name: str) -> dict:
    """Trainable parameters, median samples/s over the logged intervals (so that validation or a resume
    does not count), peak memory (CUDA: the largest allocation logged; CPU: the processes' resident set)
    and the wall time of the grid's training processes of ``name``."""
    rows = read_metrics(grid.variant(name))
    rates = [row["samples_per_s"] for row in rows if "samples_per_s" in row]
    cuda = [row["peak_mem_gb"] for row in rows if "peak_mem_gb" in row]
    runs = grid.runs(name)
    rss = [r["peak_rss_gb"] for r in runs if r.get("peak_rss_gb")]
    head = head_config(grid.variant(name) / BEST_HEAD)
    return {"trainable_parameters": head.get("trainable_parameters"),
            "samples_per_s": statistics.median(rates) if rates else None,
            "peak_memory": (max(cuda), "GPU") if cuda else (max(rss), "RSS") if rss else None,
            "wall_s": sum(r["seconds"] for r in runs) if runs else None}


def _number(value, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def write_grid_table(grid: GridFolder, variants: list[str], scores: dict) -> Path:
    """``grid.md``: one row per variant (and the released text_output) with its cost and scores, overall
    and per task. ``scores`` is eval_text.py's JSON, its columns named ``<variant>.json``."""
    labels = scores["labels"]
    metric_header = " | ".join(labels.get(key, label) for key, label in SCORES.items())
    stats = {name: training_stats(grid, name) for name in variants}
    base_rate = stats.get("baseline", {}).get("samples_per_s")
    lines = [f"# Text-head grid: {grid.root}", "",
             "Training time is relative to the baseline's (its median samples/s over logged intervals); peak memory "
             "is CUDA's largest allocation on a GPU, the largest resident set (RSS) of one training process on a CPU. "
             "Scores: eval_text.py "
             + ("(the COCO caption toolkit)." if scores.get("coco_toolkit") else "(substitutes: no Java on PATH)."),
             "", "| variant | trainable parameters | training time (x baseline) | samples/s | peak memory (GB) | "
             f"wall (s) | {metric_header} |", "|---" * (6 + len(SCORES)) + "|"]

    def metric_cells(table: dict, name: str) -> str:
        row = table.get(f"{name}.json", {})
        return " | ".join(_number(row.get(key)) for key in SCORES)

    for name in [RELEASED, *variants]:
        if name == RELEASED:
            cost = "released text_output (no head) | - | - | - | -"
        else:
            s = stats[name]
            rate, memory = s["samples_per_s"], s["peak_memory"]
            relative = base_rate / rate if base_rate and rate else None
            cost = " | ".join([f"{s['trainable_parameters']:,}" if s["trainable_parameters"] else "n/a",
                               f"{_number(relative, 2)}x", _number(rate, 2),
                               f"{memory[0]:.2f} ({memory[1]})" if memory else "n/a", _number(s["wall_s"], 0)])
        lines.append(f"| {name} | {cost} | {metric_cells(scores['overall'], name)} |")
    for task, table in scores.get("by_task", {}).items():
        lines += ["", f"## {task}", "", f"| variant | {metric_header} |", "|---" * (1 + len(SCORES)) + "|"]
        lines += [f"| {name} | {metric_cells(table, name)} |" for name in [RELEASED, *variants]]
    path = grid.root / "grid.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def write_curves(grid: GridFolder, variants: list[str]) -> Path:
    """``curves.png``: validation loss and token accuracy against step, every variant in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in variants:
        rows = [row for row in read_metrics(grid.variant(name)) if "val/loss" in row]
        steps = [row["step"] for row in rows]
        axes[0].plot(steps, [row["val/loss"] for row in rows], marker="o", label=name)
        axes[1].plot(steps, [row["val/token_accuracy"] for row in rows], marker="o", label=name)
    for ax, title in zip(axes, ("validation loss", "validation token accuracy")):
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.tight_layout()
    path = grid.root / "curves.png"
    tmp = path.with_name("curves.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    os.replace(tmp, path)
    return path


__all__ = ["GridFolder", "RELEASED", "SCORES", "VARIANTS", "training_stats", "write_curves", "write_grid_table"]
