"""Start-up cost of every script: the CPU time (user + system, children included) of ``scripts/<name> --help``,
the median of ``--repeats`` runs with their spread, one thread.

    python benchmarks/bench_startup.py                 # every script in scripts/
    python benchmarks/bench_startup.py --scripts train_text.py eval_text.py --repeats 5 --json_out startup.json

A script that imports torch, diffusers or transformers before parsing its arguments pays seconds here: a wrong
flag then fails only after those imports.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_seconds_of(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one run of ``command``; it must exit 0."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--scripts", nargs="+", default=sorted(p.name for p in (REPO / "scripts").glob("*.py")),
                        help="script file names under scripts/ (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per script")
    parser.add_argument("--json_out", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    rows = []
    print("| script | --help CPU s (median) | spread (min-max) | wall s (median) |\n|---|---|---|---|")
    for name in args.scripts:
        runs = [cpu_seconds_of([sys.executable, str(REPO / "scripts" / name), "--help"], env)
                for _ in range(args.repeats)]
        cpu, wall = [r[0] for r in runs], [r[1] for r in runs]
        rows.append({"script": name, "cpu_s": statistics.median(cpu), "cpu_min": min(cpu), "cpu_max": max(cpu),
                     "wall_s": statistics.median(wall)})
        print(f"| {name} | {rows[-1]['cpu_s']:.2f} | {min(cpu):.2f}-{max(cpu):.2f} | {rows[-1]['wall_s']:.2f} |",
              flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
