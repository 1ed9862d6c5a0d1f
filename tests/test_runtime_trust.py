"""A run never lies and is never hijacked: pickle-free checkpoints, exact-or-refused resumes,
one run per output folder, one-line failures on full disks and read-only folders, signals on
one rank of two. Each test drives the real runtime through the tests/assets training job."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from omniflow.runtime.checkpoint import list_checkpoints
from omniflow.runtime.export import load_export
from runtime_helpers import REPO, SCRIPT, assert_pickle_free, env, losses, metrics, train, train_deepspeed

pytestmark = pytest.mark.slow


class RunsCommand:
    """A pickle that runs a shell command when loaded: what an attacker puts into a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


def refuse(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run failed with exit 2 and one ``error:`` line holding every fragment."""
    line = last_line(result)
    assert result.returncode == 2 and line.startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in line, line
    return line


def rewrite_manifest(checkpoint: Path, rank: int = 0) -> None:
    """What an attacker who edits files also does: make the manifest match the edited files."""
    import hashlib

    path = checkpoint / f"manifest_rank{rank}.json"
    manifest = json.loads(path.read_text())
    for name in manifest:
        data = (checkpoint / name).read_bytes()
        manifest[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def run12(tmp_path_factory):
    """12 steps with checkpoints at 4, 8 and 12."""
    out = tmp_path_factory.mktemp("run12")
    train(out, "--checkpointing_steps", "4")
    return out


def copy_run(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


# -- 2. nothing in a checkpoint is unpickled ------------------------------------------------------
def test_checkpoints_hold_only_json_and_safetensors(run12):
    for checkpoint in list_checkpoints(run12):
        assert_pickle_free(checkpoint)
    assert {p.name for p in (run12 / "checkpoint-4").iterdir()} >= {
        "model.safetensors", "optimizer.json", "optimizer.safetensors", "scheduler.json", "state_loss_history.json",
        "rng_rank0.json", "rng_rank0.safetensors", "train_state_rank0.json", "manifest_rank0.json"}


def test_pickles_planted_in_a_checkpoint_never_run(run12, tmp_path):
    """accelerate's file names (custom state, RNG, optimizer) hold code: resuming ignores them and is exact."""
    out = copy_run(run12, tmp_path / "run")
    marker = tmp_path / "executed"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
        (out / "checkpoint-4" / name).write_bytes(pickle.dumps(RunsCommand(marker)))
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics(run12) if m["step"] <= 4))
    shutil.rmtree(out / "checkpoint-8"), shutil.rmtree(out / "checkpoint-12")
    train(out, "--resume_from_checkpoint", "latest", "--checkpointing_steps", "4")
    assert not marker.exists()
    assert losses(out) == losses(run12)


def test_a_pickle_based_checkpoint_is_refused(tmp_path):
    """A checkpoint in accelerate's pickle layout (what earlier versions wrote) is never loaded."""
    old = tmp_path / "old" / "checkpoint-4"
    old.mkdir(parents=True)
    marker = tmp_path / "executed"
    (old / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(RunsCommand(marker)))
    result = train(tmp_path / "new", "--resume_from_checkpoint", old, check=False)
    refuse(result, str(old), "custom_checkpoint_0.pkl", "not loaded")
    assert not marker.exists()


@pytest.mark.parametrize("stage", [2])
def test_deepspeed_files_are_loaded_weights_only(stage, tmp_path):
    """DeepSpeed's engine unpickles its .pt files with code allowed; ours does not, even when an attacker
    also fixes the manifest."""
    full = tmp_path / "full"
    train_deepspeed(full, stage, "--checkpointing_steps", "6")
    checkpoint = full / "checkpoint-6"
    assert_pickle_free(checkpoint)
    marker = tmp_path / "executed"
    states = checkpoint / "pytorch_model" / "mp_rank_00_model_states.pt"
    states.write_bytes(pickle.dumps(RunsCommand(marker)))
    rewrite_manifest(checkpoint)
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / f"accelerate_configs/zero{stage}.yaml"),
         "--num_processes", "1", "--main_process_port", "0", str(SCRIPT), "--output_dir", str(tmp_path / "resumed"),
         "--mixed_precision", "no",
         "--report_to", "none", "--max_train_steps", "12", "--batch_size", "8", "--resume_from_checkpoint", str(checkpoint)],
        env={**env(), "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode != 0 and not marker.exists()
    assert f"error: CheckpointError: {states}: not a weights-only DeepSpeed file" in result.stderr


# -- 3. a resume is exact or it fails -------------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "rng_rank0.json": ("deleted", lambda p, other: p.unlink()),
    "rng_rank0.safetensors": ("truncated", lambda p, other: _truncate(p)),
    "optimizer.safetensors": ("replaced", lambda p, other: shutil.copy(other / p.name, p)),
    "model.safetensors": ("truncated", lambda p, other: _truncate(p)),
    "state_loss_history.json": ("replaced", lambda p, other: shutil.copy(other / p.name, p)),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_a_damaged_checkpoint_stops_the_resume_naming_the_file(run12, tmp_path, name):
    out = copy_run(run12, tmp_path / "run")
    how, damage = DAMAGE[name]
    damage(out / "checkpoint-4" / name, out / "checkpoint-8")
    result = train(out, "--resume_from_checkpoint", out / "checkpoint-4", check=False)
    refuse(result, str(out / "checkpoint-4" / name), "cannot be restored")
    assert (out / "checkpoint-8").is_dir() and metrics(out) == metrics(run12)  # nothing was touched


def test_a_resume_mid_logging_window_logs_the_same_averages(tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    train(full, "--logging_steps", "5", "--checkpointing_steps", "6")
    train(half, "--logging_steps", "5", "--resume_from_checkpoint", full / "checkpoint-6")
    assert sorted(losses(half)) == [10, 12] and losses(half) == {s: v for s, v in losses(full).items() if s > 6}


def test_a_torn_last_metrics_line_is_dropped_on_resume(run12, tmp_path):
    out = copy_run(run12, tmp_path / "run")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 13, "loss": 0.0')  # what kill -9 leaves mid-write
    result = train(out, "--resume_from_checkpoint", "latest", "--max_train_steps", "14", "--checkpointing_steps", "4")
    assert "dropping a torn last line" in result.stderr
    assert [m["step"] for m in metrics(out)] == list(range(1, 15))


# -- 4. one run per output folder -----------------------------------------------------------------
def test_a_used_output_dir_is_refused_and_left_untouched(run12, tmp_path):
    out = copy_run(run12, tmp_path / "run")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = train(out, "--max_train_steps", "4", "--checkpointing_steps", "2", check=False)
    refuse(result, f"--output_dir {out} holds an earlier run", "--overwrite_output_dir")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_overwrite_output_dir_replaces_the_earlier_run(run12, tmp_path):
    out = copy_run(run12, tmp_path / "run")
    (out / "notes.txt").write_text("the user's own file")
    train(out, "--max_train_steps", "6", "--checkpointing_steps", "3", "--overwrite_output_dir")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-6"]
    assert [m["step"] for m in metrics(out)] == list(range(1, 7))
    assert load_export(out / "final")[1]["steps_seen"] == 6
    assert (out / "notes.txt").read_text() == "the user's own file"
    # "latest" now continues this run, not the one that was replaced
    train(out, "--max_train_steps", "8", "--checkpointing_steps", "3", "--resume_from_checkpoint", "latest")
    assert load_export(out / "final")[1]["steps_seen"] == 8


def test_a_failed_start_writes_nothing(run12, tmp_path):
    out = copy_run(run12, tmp_path / "run")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = train(out, "--overwrite_output_dir", "--init_weights", tmp_path / "nope", check=False)
    assert result.returncode == 2 and last_line(result).startswith("error: FileNotFoundError")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resuming_an_earlier_checkpoint_drops_the_later_ones(run12, tmp_path):
    out = copy_run(run12, tmp_path / "run")
    train(out, "--resume_from_checkpoint", out / "checkpoint-4", "--checkpointing_steps", "6")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6", "checkpoint-12"]
    assert losses(out) == losses(run12)


def test_latest_without_a_checkpoint_restarts_cleanly(tmp_path):
    """A run stopped before its first save is started afresh by ``--resume_from_checkpoint latest``."""
    train(tmp_path, "--max_train_steps", "3", "--checkpointing_steps", "100")
    shutil.rmtree(tmp_path / "final")
    train(tmp_path, "--max_train_steps", "5", "--checkpointing_steps", "100", "--resume_from_checkpoint", "latest")
    assert [m["step"] for m in metrics(tmp_path)] == list(range(1, 6))


# -- 5. failures that are one line ----------------------------------------------------------------
@pytest.fixture
def read_only_dir(tmp_path):
    """A folder no process can write into, even root's: a read-only tmpfs mount, else an immutable folder."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    for setup, teardown in ((["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"], ["umount"]),
                            (["chattr", "+i"], ["chattr", "-i"])):
        if shutil.which(setup[0]) and subprocess.run([*setup, folder], capture_output=True).returncode == 0:
            try:
                (folder / "probe").touch()
            except OSError:
                yield folder
                subprocess.run([*teardown, folder], check=True)
                return
            subprocess.run([*teardown, folder], check=True)
    pytest.skip("no way to make a read-only folder here (mount and chattr are not permitted)")


def test_read_only_output_dir_is_one_line(read_only_dir):
    result = train(read_only_dir / "run", check=False)
    refuse(result, f"--output_dir {read_only_dir / 'run'} is not writable")


def _file_size_limit(limit: int):
    """What a full disk does to writes, for one process: files cannot grow past ``limit`` bytes."""
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_during_a_save_keeps_the_last_good_checkpoint(run12, tmp_path):
    out = copy_run(run12, tmp_path / "run")
    shutil.rmtree(out / "checkpoint-12"), shutil.rmtree(out / "final")
    model_bytes = (out / "checkpoint-8" / "model.safetensors").stat().st_size
    result = train(out, "--resume_from_checkpoint", "latest", "--checkpointing_steps", "4", check=False,
                   preexec_fn=_file_size_limit(model_bytes + 4096))  # the optimizer moments do not fit
    line = refuse(result, f"cannot write {out / 'checkpoint-12'}", f"the last good checkpoint is {out / 'checkpoint-8'}")
    assert "File too large" in line
    assert not list(out.glob("*.tmp")) and [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-8"]
    train(out, "--resume_from_checkpoint", "latest", "--checkpointing_steps", "4")
    assert losses(out) == losses(run12)


def test_the_nan_message_names_the_checkpoint_that_holds_the_bad_update(tmp_path):
    result = train(tmp_path, "--checkpointing_steps", "4", "--nan_at_step", "5", check=False)
    refuse(result, "non-finite loss at step 5: loss=nan", f"the last checkpoint is {tmp_path / 'checkpoint-4'}",
           "holds the update of step 4")


def _rank_processes(launcher: psutil.Process) -> dict[int, psutil.Process]:
    found = {}
    for child in launcher.children(recursive=True):
        try:
            rank = child.environ().get("RANK")
            if rank is not None and "train_coordinate_mlp" in " ".join(child.cmdline()):
                found[int(rank)] = child
        except psutil.Error:
            continue
    return found


def test_sigterm_to_one_rank_stops_both_at_the_same_step(run12, tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), "--output_dir", str(tmp_path),
           "--logging_steps", "1", "--report_to", "none", "--max_train_steps", "12", "--batch_size", "8",
           "--checkpointing_steps", "1000", "--sleep_per_step", "0.5"]
    proc = subprocess.Popen(cmd, env={**env(), "ACCELERATE_USE_CPU": "true"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not ((tmp_path / "metrics.jsonl").is_file() and len(metrics(tmp_path)) >= 3):
        time.sleep(0.1)
    ranks = _rank_processes(psutil.Process(proc.pid))
    assert sorted(ranks) == [0, 1]
    ranks[1].send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert "TypeError" not in stderr and "stopped by signal 15 at step" in stderr, stderr[-3000:]
    saved = list_checkpoints(tmp_path)
    assert len(saved) == 1 and sorted(p.name for p in saved[0].glob("train_state_rank*.json")) == [
        "train_state_rank0.json", "train_state_rank1.json"]
    full = tmp_path.parent / f"{tmp_path.name}_full"
    train(full, "--checkpointing_steps", "1000", processes=2)
    train(tmp_path, "--resume_from_checkpoint", "latest", "--checkpointing_steps", "1000", processes=2)
    assert losses(tmp_path) == losses(full)
