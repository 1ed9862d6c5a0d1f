"""End-to-end behaviour of the shared runtime on a small real model (tests/assets)."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from omniflow.runtime.checkpoint import list_checkpoints, resolve_checkpoint
from omniflow.runtime.export import load_export
from runtime_helpers import REPO, env, losses, metrics, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    train(out, "--checkpointing_steps", "6", "--report_to", "tensorboard")
    return out


def test_run_outputs(full_run):
    rows = metrics(full_run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"loss", "lr", "samples_per_s"} <= set(rows[0])
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert json.loads((full_run / "config.json").read_text())["max_train_steps"] == 12
    assert "step 12" in (full_run / "train.log").read_text()
    assert list((full_run / "logs").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    state, config = load_export(full_run / "final")
    assert config["layers"] == [2, 64, 64, 3]
    trained = load_file(str(full_run / "checkpoint-12" / "model.safetensors"))
    assert state.keys() == trained.keys() and all(torch.equal(state[k], trained[k]) for k in state)


def test_resume_reproduces_uninterrupted_run(full_run, tmp_path):
    train(tmp_path, "--resume_from_checkpoint", str(full_run / "checkpoint-6"))
    resumed = losses(tmp_path)
    assert sorted(resumed) == list(range(7, 13))
    assert resumed == {s: v for s, v in losses(full_run).items() if s > 6}
    # The script's registered state (lowest loss so far) came back with the checkpoint.
    assert load_export(tmp_path / "final")[1] == load_export(full_run / "final")[1]


def test_streaming_resume_with_two_workers_reproduces_uninterrupted_run(tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    train(full, "--streaming", "--dataloader_num_workers", "2", "--checkpointing_steps", "6")
    train(half, "--streaming", "--dataloader_num_workers", "2", "--resume_from_checkpoint", str(full / "checkpoint-6"))
    assert losses(half) == {s: v for s, v in losses(full).items() if s > 6}


def test_two_processes_resume_and_lr_schedule(full_run, tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    train(full, "--checkpointing_steps", "6", processes=2)
    assert sorted(p.name for p in (full / "checkpoint-6").glob("train_state_rank*.json")) == [
        "train_state_rank0.json", "train_state_rank1.json"]
    train(half, "--resume_from_checkpoint", str(full / "checkpoint-6"), processes=2)
    assert losses(half) == {s: v for s, v in losses(full).items() if s > 6}
    # The schedule is in optimizer steps whatever the process count.
    assert [lr for _, lr in losses(full).values()] == [lr for _, lr in losses(full_run).values()]


def test_sigterm_saves_then_resume_continues(full_run, tmp_path):
    cmd = [sys.executable, str(REPO / "tests/assets/train_coordinate_mlp.py"), "--output_dir", str(tmp_path),
           "--logging_steps", "1", "--report_to", "none", "--max_train_steps", "12", "--batch_size", "8",
           "--checkpointing_steps", "1000", "--sleep_per_step", "0.5"]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((tmp_path / "metrics.jsonl").is_file() and len(metrics(tmp_path)) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    saved = list_checkpoints(tmp_path)
    assert len(saved) == 1 and int(saved[0].name.split("-")[1]) < 12
    train(tmp_path, "--resume_from_checkpoint", "latest", "--checkpointing_steps", "1000")
    assert losses(tmp_path) == losses(full_run)


def test_nan_loss_stops_with_step_and_terms(tmp_path):
    result = train(tmp_path, "--checkpointing_steps", "4", "--nan_at_step", "6", check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "non-finite loss at step 6: loss=nan" in last and str(tmp_path) in last
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4"]


def test_checkpoints_total_limit(tmp_path):
    train(tmp_path, "--checkpointing_steps", "3", "--checkpoints_total_limit", "2")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-12"]


def test_bad_resume_path_is_one_line(tmp_path):
    result = train(tmp_path, "--resume_from_checkpoint", str(tmp_path / "nope"), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: FileNotFoundError: --resume_from_checkpoint")


KILL_MID_SAVE = r"""
import os, sys, torch
import omniflow.runtime.checkpoint as ckpt
from omniflow.runtime.launch import build_accelerator
out = sys.argv[1]
acc = build_accelerator(out, report_to="none")
model = torch.nn.Linear(4, 4)
optimizer = torch.optim.AdamW(model.parameters())
manager = ckpt.CheckpointManager(acc, out)
manager.track(*acc.prepare(model, optimizer))
manager.save(2, {"epoch": 0})
real_save_state = ckpt.save_state
def die_after_writing(tree, stem):
    real_save_state(tree, stem)
    os._exit(9)  # the process dies in the middle of the checkpoint write (weights written, the rest not)
ckpt.save_state = die_after_writing
manager.save(4, {"epoch": 0})
"""


def test_kill_mid_save_keeps_last_good_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(tmp_path)], env=env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 9, result.stderr
    assert (tmp_path / "checkpoint-4.tmp").is_dir()
    assert resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-2"
    # A real run resuming "latest" from this directory starts from step 2's state and clears the leftover.
    train(tmp_path, "--resume_from_checkpoint", "latest", "--max_train_steps", "3", "--checkpointing_steps", "100",
          check=False)
    assert not (tmp_path / "checkpoint-4.tmp").exists()


def test_resume_from_a_checkpoint_at_an_epoch_end(tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    train(full, "--image_size", "8", "--checkpointing_steps", "8")  # 64 samples / batch 8: epoch ends at step 8
    train(half, "--image_size", "8", "--resume_from_checkpoint", str(full / "checkpoint-8"))
    assert losses(half) == {s: v for s, v in losses(full).items() if s > 8}
