"""Every GPU row of BENCHMARKS.md in one command, sized for a short loan of one H100/H200 without network.

    python benchmarks/gpu_suite.py --out_dir gpu_suite               # on the GPU machine: at most 540 s
    python benchmarks/gpu_suite.py --dry_run --out_dir /tmp/suite    # CPU, tiny configs, the same code paths

Parts, one after another, each a subprocess under its own time cap (a part whose cap no longer fits in what is
left of the budget is skipped with a line saying so):

    prepare   the tiny OmniFlow and the sample data the ZeRO runs train on (built offline)
    vq        bench_vq.py: VQGAN f16, 256 px, batch 12: fp32 eager, bf16 + channels_last, + torch.compile
    text_head bench_text.py: release-size OmniFlow text-head step, random weights, bf16, gradient checkpointing,
              batch 8/16/32: samples/s, MFU, peak memory
    float     bench_float.py: release-size FMT training (samples/s, MFU) and generation speed
    align     bench_align.py: SD1.5 -> FLUX.1 VAE configs at 512 px, with and without the latent cache
    zero2     train_text.py, 2 steps under accelerate_configs/zero2.yaml on the one GPU (tiny OmniFlow)
    zero3     the same under zero3.yaml

Writes ``<out_dir>/gpu_suite.json`` (every part's status, seconds and results) and ``<out_dir>/gpu_suite.md``
(the tables the parts printed, ready for BENCHMARKS.md). ``--dry_run`` runs each part with tiny settings on the
CPU (DeepSpeed's CPU accelerator for the ZeRO runs), so the suite is tested where there is no GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


@dataclass
class Part:
    name: str
    cap_s: int
    command: list[str]
    result_file: str | None = None  # JSON the command writes, relative to the output folder
    env: dict[str, str] = field(default_factory=dict)


def zero_run(stage: int, work: Path, dry_run: bool) -> Part:
    """Two optimizer steps of train_text.py under the ZeRO-<stage> launch config, one process."""
    tiny = work / "tiny"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / f"accelerate_configs/zero{stage}.yaml"), "--num_processes", "1", "--main_process_port", "0",
               str(REPO / "scripts/train_text.py"), "--model_path", str(tiny / "OmniFlow-tiny"),
               "--models_dir", str(tiny / "models"), "--data_config", "configs/text_head/tiny_example_data.json",
               "--use_text_decoder_head", "--max_train_steps", "2", "--batch_size", "2", "--eval_interval", "100",
               "--num_validation_samples", "0", "--max_eval_samples", "2", "--report_to", "none",
               "--output_dir", str(work / f"zero{stage}")]
    return Part(f"zero{stage}", 50 if not dry_run else 120, command, f"work/zero{stage}/metrics.jsonl",
                {"DS_ACCELERATOR": "cpu"} if dry_run else {})


def parts(out: Path, dry_run: bool) -> list[Part]:
    py = sys.executable
    work = out / "work"
    prepare = (f"import subprocess, sys; from pathlib import Path\n"
               f"if not Path('data/sample/photos/validation.jsonl').is_file():\n"
               f"    subprocess.run([sys.executable, '-m', 'omniflow.data.sample_text', '--output_dir', 'data/sample'],"
               f" check=True)\n"
               f"subprocess.run([sys.executable, 'scripts/make_tiny_omniflow.py', '--output_dir', {str(work / 'tiny')!r}],"
               f" check=True)\n")
    if dry_run:
        benches = [
            Part("vq", 120, [py, str(BENCH / "bench_vq.py"), "--device", "cpu", "--warmup", "0", "--steps", "3",
                             "--repeats", "1", "--out", str(out / "vq.json")], "vq.json"),
            Part("text_head", 120, [py, str(BENCH / "bench_text.py"), "--configs", "omniflow_tiny", "--batch_sizes",
                                    "2", "--warmup", "0", "--iters", "1", "--repeats", "1",
                                    "--json_out", str(out / "text_head.json")], "text_head.json"),
            Part("float", 120, [py, str(BENCH / "bench_float.py"), "--config", "tiny", "--batch_size", "2",
                                "--steps", "1", "--audio_seconds", "0.5", "--repeats", "1",
                                "--output", str(out / "float.json")], "float.json"),
            Part("align", 120, [py, str(BENCH / "bench_align.py"), "--tiny", "--steps", "2", "--warmup", "0",
                                "--repeats", "1", "--num_images", "8", "--json_out", str(out / "align.json")],
                 "align.json"),
        ]
    else:
        benches = [
            Part("vq", 110, [py, str(BENCH / "bench_vq.py"), "--out", str(out / "vq.json")], "vq.json"),
            Part("text_head", 110, [py, str(BENCH / "bench_text.py"), "--configs", "omniflow_v05",
                                    "--json_out", str(out / "text_head.json")], "text_head.json"),
            Part("float", 100, [py, str(BENCH / "bench_float.py"), "--output", str(out / "float.json")], "float.json"),
            Part("align", 80, [py, str(BENCH / "bench_align.py"), "--json_out", str(out / "align.json")],
                 "align.json"),
        ]
    return [Part("prepare", 40 if not dry_run else 120, [py, "-c", prepare]), *benches,
            zero_run(2, work, dry_run), zero_run(3, work, dry_run)]


def run_part(part: Part, out: Path, cap_s: float) -> dict:
    """Run one part in its own process group (accelerate launch starts children), killed at its cap."""
    log = out / f"{part.name}.log"
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **part.env}
    with open(log, "w") as stream:
        process = subprocess.Popen(part.command, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=cap_s)
            status = "ok" if code == 0 else f"failed (exit {code}, see {log.name})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = f"stopped at its cap of {cap_s:.0f} s"
    row = {"name": part.name, "status": status, "seconds": round(time.perf_counter() - start, 1), "cap_s": cap_s,
           "log": log.name, "tables": [line for line in log.read_text(errors="replace").splitlines()
                                       if line.startswith("|")]}
    result = out / part.result_file if part.result_file else None
    if status == "ok" and result is not None and result.is_file():
        text = result.read_text()
        if result.suffix == ".jsonl":  # a training log: its last training step
            row["result"] = [r for r in map(json.loads, filter(str.strip, text.splitlines())) if "loss" in r][-1]
        else:
            row["result"] = json.loads(text)
    return row


def markdown(report: dict) -> str:
    lines = [f"GPU suite on {report['device']}, {report['date']}{' (dry run: CPU, tiny configs)' if report['dry_run'] else ''}:",
             f"`{report['command']}`", ""]
    for row in report["parts"]:
        lines.append(f"**{row['name']}**: {row['status']} ({row['seconds']} s of {row['cap_s']:.0f} s)")
        if row.get("tables"):
            lines += ["", *row["tables"]]
        if row["name"].startswith("zero") and "result" in row:
            last = row["result"]
            lines.append(f"step {last['step']}: loss {last['loss']:.4f}, {last['samples_per_s']:.2f} samples/s")
        lines.append("")
    return "\n".join(lines)


def device_name(dry_run: bool) -> str:
    if dry_run:
        return f"CPU ({platform.processor() or platform.machine()})"
    import torch

    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device; run with --dry_run to try the suite on the CPU")
    return torch.cuda.get_device_name()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--out_dir", type=Path, default=Path("gpu_suite"), help="where the JSON, markdown and logs go")
    parser.add_argument("--dry_run", action="store_true", help="CPU, tiny configs: checks the suite itself")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="wall-clock budget of the whole suite (default 540 s; dry run 900 s)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these parts (prepare is kept for zero*)")
    args = parser.parse_args(argv)
    budget = args.budget_s or (900.0 if args.dry_run else 540.0)
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": device_name(args.dry_run), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "dry_run": args.dry_run, "budget_s": budget,
              "command": " ".join(["python benchmarks/gpu_suite.py", *(argv if argv is not None else sys.argv[1:])]),
              "parts": []}
    wanted = set(args.only) if args.only else None
    if wanted and any(name.startswith("zero") for name in wanted):
        wanted.add("prepare")
    deadline = time.perf_counter() + budget
    for part in parts(out, args.dry_run):
        if wanted is not None and part.name not in wanted:
            continue
        left = deadline - time.perf_counter()
        if part.cap_s > left:
            row = {"name": part.name, "status": f"skipped: its cap of {part.cap_s} s exceeds the {left:.0f} s left",
                   "seconds": 0.0, "cap_s": part.cap_s}
        else:
            row = run_part(part, out, part.cap_s)
        print(f"{row['name']}: {row['status']} ({row['seconds']} s)", flush=True)
        report["parts"].append(row)
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_suite.md").write_text(markdown(report))
    print(f"wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'}")
    return report


if __name__ == "__main__":
    main()
