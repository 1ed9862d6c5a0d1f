"""Run the coordinate-MLP job (tests/assets) as a subprocess, as a user would."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "assets" / "train_coordinate_mlp.py"
COMMON = ["--logging_steps", "1", "--report_to", "none", "--max_train_steps", "12", "--batch_size", "8"]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def launch(script: Path, processes: int = 1) -> tuple[list[str], dict]:
    """The command and environment that run ``script``: plain python for one process, else torchrun through
    accelerate with gloo on the CPU (see accelerate_configs/cpu.yaml)."""
    if processes == 1:
        return [sys.executable, str(script)], env()
    return ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
             "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
            {**env(), "ACCELERATE_USE_CPU": "true"})


def run_script(script: Path, *args, processes: int = 1, check: bool = True, **popen) -> subprocess.CompletedProcess:
    """Runs ``script args`` as a user would (see :func:`launch`); a failure shows the end of its stderr."""
    cmd, run_env = launch(script, processes)
    result = subprocess.run([*cmd, *map(str, args)], env=run_env, capture_output=True, text=True,
                            **{"cwd": REPO, "timeout": 600, **popen})
    if check and result.returncode != 0:
        raise AssertionError(f"{script.name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one stderr line of a user-facing error (exit status 2, no traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def truncated(path: Path) -> Path:
    """``path`` cut to half its length, as an interrupted download or copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def train(output_dir, *extra, processes: int = 1, check: bool = True, **popen) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, "--output_dir", output_dir, *COMMON, *extra, processes=processes, check=check, **popen)


def assert_pickle_free(checkpoint: Path) -> None:
    """Every file of a checkpoint is JSON or safetensors, but DeepSpeed's engine files, which must load
    with ``torch.load(weights_only=True)`` and the runtime's allowlist (its ``latest`` tag file and
    ``zero_to_*.py`` scripts are never loaded)."""
    from omniflow.runtime.checkpoint import DEEPSPEED_TAG, load_deepspeed_file

    files = [p for p in Path(checkpoint).rglob("*") if p.is_file()]
    assert files, checkpoint
    for path in files:
        if path.suffix in (".json", ".safetensors") or path.name == "latest" or path.name.startswith("zero_to_"):
            continue
        assert path.parent.name.startswith(DEEPSPEED_TAG) and path.suffix == ".pt", f"unexpected file {path}"
        load_deepspeed_file(str(path))


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(output_dir) -> dict[int, tuple[float, float]]:
    return {m["step"]: (m["loss"], m["lr"]) for m in metrics(output_dir)}


def train_deepspeed(output_dir, stage: int, *extra) -> subprocess.CompletedProcess:
    """One CPU process under DeepSpeed ZeRO-<stage> through our accelerate config."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / f"accelerate_configs/zero{stage}.yaml"), "--num_processes", "1", "--main_process_port", "0", str(SCRIPT),
           "--output_dir", str(output_dir), "--mixed_precision", "no", *COMMON, *extra]
    result = subprocess.run(cmd, env={**env(), "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True,
                            timeout=600, cwd=REPO)
    if result.returncode != 0:
        raise AssertionError(f"DeepSpeed training failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_machines(script, *args, output_dirs=None, stop_when=None,
                        timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """``script args`` as two "machines" on this host (CPU, gloo, one process each), node 0 at 127.0.0.1;
    ``output_dirs``: a different ``--output_dir`` per machine (node-local disks); ``stop_when``: once this
    returns True, SIGTERM goes to both machines' launchers (as SLURM signals every node before its time limit),
    which pass it to their processes."""
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--machine_rank",
         str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
         "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *map(str, args),
         *(["--output_dir", str(output_dirs[rank])] if output_dirs else [])],
        env={**env(), "ACCELERATE_USE_CPU": "true"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=REPO) for rank in (0, 1)]
    results = []
    try:
        if stop_when is not None:
            deadline = time.monotonic() + timeout
            while not stop_when() and time.monotonic() < deadline and all(p.poll() is None for p in procs):
                time.sleep(0.02)
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:  # a hung "machine" must not outlive the test
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def logged_steps(output_dir) -> list[int]:
    """The steps of metrics.jsonl's rows so far (none while the file does not exist)."""
    path = Path(output_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]  # the last may be half written
