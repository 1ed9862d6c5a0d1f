"""scripts/launch_multitask.py: GPU assignment through CUDA_VISIBLE_DEVICES, per-task logs, status table."""

import json
import subprocess
import sys

import pytest

from vq_helpers import REPO, script_env, tiny_config, training_terms, write_vq_data

LAUNCHER = REPO / "scripts" / "launch_multitask.py"


def launch(*args, timeout=300):
    return subprocess.run([sys.executable, str(LAUNCHER), *map(str, args)], env=script_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def test_dry_run_prints_each_task_with_its_devices(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.json").write_text("{}")
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps({"a.json": 0, "b.json": {"gpus": [1, 2], "args": ["--max_train_steps", "9"]},
                                 "c.json": "cpu"}))
    result = launch("--tasks", tasks, "--dry_run", "--log_dir", tmp_path / "logs", "--", "--report_to", "none")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["[a]"].startswith("CUDA_VISIBLE_DEVICES=0 ") and "train_vqgan.py --config" in lines["[a]"]
    assert lines["[b]"].startswith("CUDA_VISIBLE_DEVICES=1,2 ")
    assert "accelerate.commands.launch --config_file" in lines["[b]"] and "multi_gpu.yaml --num_processes 2" in lines["[b]"]
    assert "--max_train_steps 9 --report_to none" in lines["[b]"]
    assert lines["[c]"].startswith("CUDA_VISIBLE_DEVICES= ") and "--device cpu" in lines["[c]"]
    assert all(line.endswith(f"{tmp_path / 'logs' / name}.log") for name, line in zip("abc", lines.values()))
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(("spec", "message"), [
    ({"a.json": 0, "b.json": [1, 0]}, "GPU 0 is assigned to both 'a.json' and 'b.json'"),
    ({"a.json": "gpu0"}, "devices must be a GPU index, a list of them or \"cpu\""),
    ({"missing.json": 0}, "task config not found"),
    ({"a.json": {"gpus": 0, "argz": []}}, "unknown keys ['argz']"),
])
def test_bad_task_files_fail_with_one_line(tmp_path, spec, message):
    for name in ("a", "b"):
        (tmp_path / f"{name}.json").write_text("{}")
    (tmp_path / "tasks.json").write_text(json.dumps(spec))
    result = launch("--tasks", tmp_path / "tasks.json", "--dry_run")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and message in result.stderr


@pytest.mark.slow
def test_two_tiny_tasks_run_at_once_on_their_assigned_devices(tmp_path):
    data = write_vq_data(tmp_path / "data")
    tasks = {}
    for name, gpu in (("dvae", 0), ("vqgan_f16", 1)):
        config = tiny_config(name, tmp_path, data, folder_name=str(tmp_path / "runs" / name), num_steps=3,
                             validation_interval=1000)
        tasks[config.name] = gpu
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    result = launch("--tasks", tmp_path / "tasks.json", "--log_dir", tmp_path / "logs", "--status_interval", "1",
                    "--", "--report_to", "none", "--logging_steps", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    final_table = result.stdout.strip().splitlines()[-3:]
    assert final_table[0].split() == ["task", "gpus", "pid", "state", "elapsed", "progress"]
    rows = {row.split()[0]: row.split() for row in final_table[1:]}
    assert rows["dvae"][1] == "0" and rows["vqgan_f16"][1] == "1"
    assert rows["dvae"][3] == rows["vqgan_f16"][3] == "done" and rows["dvae"][-1] == "3/3"
    for name, gpu in (("dvae", 0), ("vqgan_f16", 1)):
        log = (tmp_path / "logs" / f"{name}.log").read_text()
        assert f"CUDA_VISIBLE_DEVICES={gpu}\n" in log  # what the child process saw
        assert sorted(training_terms(tmp_path / "runs" / name)) == [1, 2, 3]


def test_shipped_example_dry_runs():
    result = launch("--tasks", REPO / "configs/vq/multitask/example.json", "--dry_run")
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["[vqgan_f16]", "[emavq_f16]", "[vqvae2_optvq]",
                                                                        "[dvae]"]
    assert "CUDA_VISIBLE_DEVICES=2,3 " in result.stdout and "--mixed_precision bf16" in result.stdout
