"""Run several VQ trainings at once, each on its own GPU(s), with per-task logs and a status table.

    python scripts/launch_multitask.py --tasks multitask.json [--log_dir outputs/multitask] [--dry_run] \\
        [-- --report_to none ...]

``multitask.json`` maps each ``param.json`` (paths relative to the tasks file) to its devices:

    {"vqgan_f16.json": 0, "emavq_f16.json": [1, 2], "tiny/dvae.json": "cpu",
     "vqvae2.json": {"gpus": [3], "args": ["--max_train_steps", "5000"]}}

One GPU or ``"cpu"``: ``python scripts/train_vqgan.py --config X``; several GPUs: ``accelerate
launch`` with ``accelerate_configs/multi_gpu.yaml`` on that many processes. Every task sees only
its GPUs through ``CUDA_VISIBLE_DEVICES``; its output goes to ``<log_dir>/<task>.log``. Arguments
after ``--`` are passed to every task. The status table (task, GPUs, pid, state, elapsed time,
progress read from the task's progress bar) is printed every ``--status_interval`` seconds and at
the end; the exit status is 0 only when every task succeeded. SIGINT/SIGTERM are passed on to the
tasks, which save a checkpoint before they stop. Uses only the standard library.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "scripts" / "train_vqgan.py"
DDP_CONFIG = REPO / "accelerate_configs" / "multi_gpu.yaml"
PROGRESS = re.compile(r"train:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


class TaskFileError(ValueError):
    """The tasks file is missing, malformed or assigns a GPU twice."""


@dataclass
class Task:
    name: str
    config: Path
    gpus: list[int] | None  # None: CPU
    args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    started: float = 0.0
    ended: float | None = None

    def command(self, common_args: list[str], port: int) -> list[str]:
        script = [str(TRAIN_SCRIPT), "--config", str(self.config)]
        if self.gpus is None:
            head = [sys.executable, *script, "--device", "cpu"]
        elif len(self.gpus) == 1:
            head = [sys.executable, *script]
        else:
            head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG),
                    "--num_processes", str(len(self.gpus)), "--main_process_port", str(port), *script]
        return [*head, *self.args, *common_args]

    def env(self) -> dict[str, str]:
        visible = "" if self.gpus is None else ",".join(map(str, self.gpus))
        return {**os.environ, "CUDA_VISIBLE_DEVICES": visible}


def _devices(name: str, value: object) -> tuple[list[int] | None, list[str]]:
    args: list[str] = []
    if isinstance(value, dict):
        unknown = set(value) - {"gpus", "args"}
        if unknown:
            raise TaskFileError(f"task {name!r}: unknown keys {sorted(unknown)} (expected 'gpus' and 'args')")
        args = value.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise TaskFileError(f"task {name!r}: 'args' must be a list of strings, got {args!r}")
        value = value.get("gpus", "cpu")
    if value == "cpu":
        return None, args
    gpus = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(gpus, list) or not gpus or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0
                                                          for g in gpus):
        raise TaskFileError(f"task {name!r}: devices must be a GPU index, a list of them or \"cpu\", got {value!r}")
    return gpus, args


def load_tasks(path: Path) -> list[Task]:
    if not path.is_file():
        raise TaskFileError(f"tasks file not found: {path}")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TaskFileError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(spec, dict) or not spec:
        raise TaskFileError(f"{path}: expected a JSON object mapping param.json paths to GPUs")
    tasks, owner = [], {}
    for key, value in spec.items():
        config = (path.parent / key).resolve()
        if not config.is_file():
            raise TaskFileError(f"{path}: task config not found: {config}")
        name = config.stem if config.stem not in {t.name for t in tasks} else f"{config.stem}_{len(tasks)}"
        gpus, args = _devices(key, value)
        for gpu in gpus or []:
            if gpu in owner:
                raise TaskFileError(f"{path}: GPU {gpu} is assigned to both {owner[gpu]!r} and {key!r}")
            owner[gpu] = key
        tasks.append(Task(name, config, gpus, args))
    return tasks


def _elapsed(task: Task) -> str:
    if not task.started:
        return "-"
    seconds = int((task.ended or time.time()) - task.started)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _progress(log: Path) -> str:
    if not log.is_file():
        return "-"
    with log.open("rb") as f:
        f.seek(max(0, log.stat().st_size - 20_000))
        matches = PROGRESS.findall(f.read().decode("utf-8", "replace"))
    return f"{matches[-1][0]}/{matches[-1][1]}" if matches else "-"


def _state(task: Task) -> str:
    if task.process is None:
        return "pending"
    code = task.process.poll()
    return "running" if code is None else "done" if code == 0 else f"failed (rc {code})"


def status_table(tasks: list[Task], log_dir: Path) -> str:
    rows = [("task", "gpus", "pid", "state", "elapsed", "progress")]
    for t in tasks:
        rows.append((t.name, "cpu" if t.gpus is None else ",".join(map(str, t.gpus)),
                     str(t.process.pid) if t.process else "-", _state(t), _elapsed(t), _progress(log_dir / f"{t.name}.log")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--tasks", required=True, help="JSON mapping param.json paths to GPU(s) or \"cpu\"")
    parser.add_argument("--log_dir", default="outputs/multitask", help="per-task logs go here (default: %(default)s)")
    parser.add_argument("--dry_run", action="store_true", help="print each task's environment and command, run nothing")
    parser.add_argument("--status_interval", type=float, default=60.0, help="seconds between status tables")
    parser.add_argument("--base_port", type=int, default=29600, help="first rendezvous port of multi-GPU tasks")
    opts = parser.parse_args(own)
    try:
        tasks = load_tasks(Path(opts.tasks))
    except TaskFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log_dir = Path(opts.log_dir)
    commands = {t.name: t.command(common, opts.base_port + i) for i, t in enumerate(tasks)}
    if opts.dry_run:
        for t in tasks:
            print(f"[{t.name}] CUDA_VISIBLE_DEVICES={t.env()['CUDA_VISIBLE_DEVICES']} {shlex.join(commands[t.name])}"
                  f"  > {log_dir / (t.name + '.log')}")
        return 0

    log_dir.mkdir(parents=True, exist_ok=True)
    for t in tasks:
        with (log_dir / f"{t.name}.log").open("w") as log:
            t.process = subprocess.Popen(commands[t.name], env=t.env(), stdout=log, stderr=subprocess.STDOUT)
        t.started = time.time()

    def forward(signum, frame) -> None:
        for t in tasks:
            if t.process.poll() is None:
                t.process.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    last_table = time.time()
    while any(t.process.poll() is None for t in tasks):
        time.sleep(min(1.0, opts.status_interval))
        for t in tasks:
            if t.ended is None and t.process.poll() is not None:
                t.ended = time.time()
        if time.time() - last_table >= opts.status_interval:
            print(status_table(tasks, log_dir), flush=True)
            last_table = time.time()
    for t in tasks:
        t.ended = t.ended or time.time()
    print(status_table(tasks, log_dir), flush=True)
    return 0 if all(t.process.returncode == 0 for t in tasks) else 1


if __name__ == "__main__":
    sys.exit(main())
