"""How fast the four text heads learn: configs/text_head/*.json trained by train_text.py on run_example.sh's
embedded default, scaled down only in batch and steps, for each learning rate and seed.

    python benchmarks/bench_vq_heads.py                                   # 4 variants x lr 1e-4, 1e-3 x seed 0
    python benchmarks/bench_vq_heads.py --seeds 0 1 2 --variants baseline vq
    python benchmarks/bench_vq_heads.py --extra_flags "--vq_dead_code_steps 100 --vq_restart_pool 0"  # the old VQ

The learning measure is the cross-entropy drop from the first training step to the final validation (on the
training examples: the default is a memorisation check), and its ratio to the baseline's drop at the same lr
and seed. The runs use the tiny OmniFlow in models/tiny-fitted and the sample data in data/sample, built as
run_example.sh builds them when missing. CPU, one thread per run, offline.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny-fitted"
SAMPLE = REPO / "data" / "sample"
DATA_CONFIG = REPO / "configs" / "text_head" / "tiny_example_data.json"
VARIANTS = ("baseline", "refiner", "vq", "vq_refiner")


def ensure_embedded_default(env: dict) -> None:
    """The sample data and the fitted tiny OmniFlow, built by run_example.sh's builder when missing."""
    subprocess.run([sys.executable, "-m", "omniflow.text_job.example", "--root", str(REPO)], check=True, env=env,
                   cwd=REPO, stdout=subprocess.DEVNULL)


def train(variant: str, lr: str, seed: int, args, out: Path, env: dict) -> dict:
    """One scaled-down run; returns its first training row and its last validation row."""
    command = [sys.executable, "scripts/train_text.py", "--config", f"configs/text_head/{variant}.json",
               "--model_path", str(TINY / "OmniFlow-tiny"), "--models_dir", str(TINY / "models"),
               "--data_config", str(args.data_config), "--batch_size", str(args.batch_size),
               "--max_train_steps", str(args.steps), "--lr_warmup_steps", "0", "--lr", lr, "--seed", str(seed),
               "--mixed_precision", "no", "--no-gradient_checkpointing", "--report_to", "none", "--log_interval", "1",
               "--eval_interval", str(args.steps), "--output_dir", str(out), *shlex.split(args.extra_flags)]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{variant} lr {lr} seed {seed} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    options = json.loads((out / "final_head" / "config.json").read_text())["options"]
    return {"first": next(r for r in rows if "ce" in r), "val": [r for r in rows if "val/ce" in r][-1],
            "num_codes": options["vq_codebook_size"]}


def table(results: list[dict]) -> str:
    lines = ["| variant | lr | seed | first train CE | final val CE | drop | drop / baseline's | val codes used | "
             "val code perplexity |", "|---|---|---|---|---|---|---|---|---|"]
    baseline = {(r["lr"], r["seed"]): r["drop"] for r in results if r["variant"] == "baseline"}
    for r in results:
        ratio = r["drop"] / baseline[r["lr"], r["seed"]] if (r["lr"], r["seed"]) in baseline else float("nan")
        usage, perplexity = r["val"].get("val/vq_usage"), r["val"].get("val/vq_perplexity")
        codes = f"{round(usage * r['num_codes'])} of {r['num_codes']}" if usage is not None else "-"
        lines.append(f"| {r['variant']} | {r['lr']} | {r['seed']} | {r['first']['ce']:.2f} | {r['val']['val/ce']:.2f} | "
                     f"{r['drop']:.2f} | {ratio:.2f} | {codes} | "
                     f"{'-' if perplexity is None else f'{perplexity:.1f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--lrs", nargs="+", default=["1e-4", "1e-3"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--data_config", type=Path, default=DATA_CONFIG)
    parser.add_argument("--extra_flags", default="", help="more train_text.py flags for every run, one string")
    parser.add_argument("--json_out", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    ensure_embedded_default(env)
    variants = ["baseline", *[v for v in args.variants if v != "baseline"]]  # ratios need the baseline
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for lr in args.lrs:
            for seed in args.seeds:
                for variant in variants:
                    run = train(variant, lr, seed, args, Path(tmp) / f"{variant}_{lr}_{seed}", env)
                    results.append({"variant": variant, "lr": lr, "seed": seed, **run,
                                    "drop": run["first"]["ce"] - run["val"]["val/ce"]})
    print(table(results))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
