"""DeepSpeed ZeRO configs: validated on CPU, and a real ZeRO-2/3 run + resume in one CPU process.

Two CPU processes under DeepSpeed are not tested: accelerate 1.15 counts one process there and
DeepSpeed's batch check fails; multi-GPU ZeRO runs are for the GPU machine.
"""
import importlib.util
import json

import pytest
import yaml

from omniflow.runtime.export import load_export
from runtime_helpers import REPO, losses, train_deepspeed

requires_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                        reason="deepspeed is not installed")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_configs_are_consistent(stage):
    launch = yaml.safe_load((REPO / f"accelerate_configs/zero{stage}.yaml").read_text())
    assert launch["distributed_type"] == "DEEPSPEED"
    ds = json.loads((REPO / launch["deepspeed_config"]["deepspeed_config_file"]).read_text())
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] == "auto"  # accelerate fills precision from --mixed_precision
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert ds[key] == "auto", key
    buckets = {k: v for k, v in ds["zero_optimization"].items() if k.endswith(("bucket_size", "threshold"))}
    assert buckets and all(isinstance(v, int) for v in buckets.values()), buckets
    assert launch["deepspeed_config"]["zero3_init_flag"] is (stage == 3)


@pytest.mark.parametrize("name", ["cpu", "single_gpu", "multi_gpu", "zero2", "zero3"])
def test_every_launch_config_is_bf16_or_deepspeed_auto(name):
    launch = yaml.safe_load((REPO / f"accelerate_configs/{name}.yaml").read_text())
    assert launch.get("mixed_precision", "bf16") == "bf16"


@pytest.mark.slow
@requires_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_training_resumes_exactly(stage, tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    train_deepspeed(full, stage, "--checkpointing_steps", "6")
    assert (full / "checkpoint-6" / "latest").is_file()  # DeepSpeed's own engine checkpoint
    train_deepspeed(half, stage, "--resume_from_checkpoint", str(full / "checkpoint-6"))
    assert losses(half) == {s: v for s, v in losses(full).items() if s > 6}
    state, _ = load_export(full / "final")  # ZeRO-3 gathers the partitioned weights for the export
    assert state["0.weight"].shape == (64, 2) and state["5.weight"].shape == (3, 64)


@pytest.mark.slow
@requires_deepspeed
def test_frozen_models_stay_whole_under_zero3(tmp_path):
    import subprocess
    import sys

    from runtime_helpers import env

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs/zero3.yaml"),
           "--num_processes", "1", "--main_process_port", "0", str(REPO / "tests/assets/zero3_frozen_probe.py"), str(tmp_path / "gpt2"), str(tmp_path)]
    result = subprocess.run(cmd, env={**env(), "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["trainable_partitioned"] and not report["frozen_partitioned"]
    assert report["frozen_numel"] == 50 * 16
