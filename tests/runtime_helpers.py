"""Run the coordinate-MLP job (tests/assets) as a subprocess, as a user would."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "assets" / "train_coordinate_mlp.py"
COMMON = ["--logging_steps", "1", "--report_to", "none", "--max_train_steps", "12", "--batch_size", "8"]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def train(output_dir, *extra, processes: int = 1, check: bool = True, **popen) -> subprocess.CompletedProcess:
    if processes == 1:
        cmd = [sys.executable, str(SCRIPT)]
        run_env = env()
    else:
        # torchrun through accelerate; gloo on CPU (see accelerate_configs/cpu.yaml)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT)]
        run_env = {**env(), "ACCELERATE_USE_CPU": "true"}
    cmd += ["--output_dir", str(output_dir), *COMMON, *extra]
    result = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=600, cwd=REPO, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(output_dir) -> dict[int, tuple[float, float]]:
    return {m["step"]: (m["loss"], m["lr"]) for m in metrics(output_dir)}


def train_deepspeed(output_dir, stage: int, *extra) -> subprocess.CompletedProcess:
    """One CPU process under DeepSpeed ZeRO-<stage> through our accelerate config."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / f"accelerate_configs/zero{stage}.yaml"), "--num_processes", "1", str(SCRIPT),
           "--output_dir", str(output_dir), "--mixed_precision", "no", *COMMON, *extra]
    result = subprocess.run(cmd, env={**env(), "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True,
                            timeout=600, cwd=REPO)
    if result.returncode != 0:
        raise AssertionError(f"DeepSpeed training failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result
