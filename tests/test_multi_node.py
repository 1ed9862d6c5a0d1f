"""Launching on several nodes: the multi-node accelerate configs and the SLURM launcher."""
import os
import re
import shlex
import shutil
import subprocess
import time

import pytest
import yaml

from omniflow.runtime.checkpoint import list_checkpoints
from runtime_helpers import COMMON, REPO, SCRIPT, launch_two_machines, logged_steps, losses, train
from vq_helpers import TRAIN_SCRIPT, tiny_config, train_vq, training_terms, validation_metrics, write_vq_data

MULTI_NODE = ("multi_node_ddp", "multi_node_zero2", "multi_node_zero3")


@pytest.mark.parametrize("name", MULTI_NODE)
def test_multi_node_configs_load_as_accelerate_reads_them(name):
    from accelerate.commands.config.config_args import ClusterConfig

    path = REPO / "accelerate_configs" / f"{name}.yaml"
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_machines > 1 and config.same_network is False and config.rdzv_backend == "static"
    if name == "multi_node_ddp":
        assert (config.distributed_type, config.mixed_precision) == ("MULTI_GPU", "bf16")
    else:
        ds = config.deepspeed_config
        assert config.distributed_type == "DEEPSPEED" and ds["deepspeed_multinode_launcher"] == "standard"
        assert (REPO / ds["deepspeed_config_file"]).is_file() and ds["deepspeed_config_file"].endswith(
            f"zero{name[-1]}.json")
        assert yaml.safe_load((REPO / ds["deepspeed_config_file"]).read_text())["bf16"]["enabled"] == "auto"


def test_the_slurm_launcher_gives_each_node_its_rank_and_the_totals():
    assert subprocess.run(["bash", "-n", str(REPO / "slurm" / "train.sbatch")]).returncode == 0
    env = {**os.environ, "DRY_RUN": "1", "SLURM_NNODES": "4", "SLURM_NODEID": "3", "MASTER_ADDR": "10.0.0.7",
           "GPUS_PER_NODE": "8", "ACCELERATE_CONFIG": "multi_node_zero2", "PYTHON": "python3"}
    result = subprocess.run([str(REPO / "slurm" / "launch_node.sh"), "scripts/train_vqgan.py", "--config", "a b.json"],
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == [
        "python3", "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/multi_node_zero2.yaml",
        "--num_machines", "4", "--machine_rank", "3", "--num_processes", "32", "--main_process_ip", "10.0.0.7",
        "--main_process_port", "29500", "scripts/train_vqgan.py", "--config", "a b.json"]
    missing = subprocess.run([str(REPO / "slurm" / "launch_node.sh")], env={"PATH": os.environ["PATH"]},
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode != 0 and "run under srun" in missing.stderr


@pytest.mark.slow
def test_two_machines_stopped_by_sigterm_resume_like_one_machine_with_two_processes(tmp_path):
    """train_vqgan.py (tiny VQGAN with its discriminator) as 2 machines x 1 process sharing one output folder,
    SIGTERM to both machines once a step is logged: both stop at the same step with a checkpoint, and the resumed
    run logs (once) the per-step losses and validations of 1 machine x 2 processes."""
    data = write_vq_data(tmp_path / "data")
    config = tiny_config("vqgan_vqmodel", tmp_path, data, {"batch_size": 2}, num_steps=8, save_interval=4,
                         validation_interval=4, compute_fid=False)
    one_machine = tmp_path / "one_machine"
    train_vq(config, one_machine, processes=2)
    two = tmp_path / "two_machines"
    args = [TRAIN_SCRIPT, "--config", config, "--output_dir", two, "--logging_steps", 1]
    stopped = launch_two_machines(*args, stop_when=lambda: logged_steps(two))
    step = int(re.search(r"stopped by signal 15 at step (\d+)", stopped[0].stderr)[1])
    assert 0 < step < 8 and all(result.returncode != 0 for result in stopped), stopped[0].stderr[-3000:]
    assert f"checkpoint-{step}" in [p.name for p in two.glob("checkpoint-*")]
    assert sorted(logged_steps(two)) == sorted([*range(1, step + 1), *([4] if step >= 4 else [])])  # validation at 4

    for result in launch_two_machines(*args, "--resume_from_checkpoint", "latest"):
        assert result.returncode == 0, result.stderr[-3000:]
    assert training_terms(two) == training_terms(one_machine)  # every step, both losses, logged once
    assert validation_metrics(two) == validation_metrics(one_machine)
    assert sorted(p.name for p in two.glob("checkpoint-*")) == sorted({f"checkpoint-{s}" for s in (step, 4, 8)})


@pytest.mark.slow
def test_two_machines_with_node_local_output_folders_stop_on_sigterm_and_resume_exactly(tmp_path):
    """Each "machine" gets its own --output_dir (node-local scratch disks), SIGTERM to both once step 3 is logged:
    both complete their checkpoints, node 0 alone holds logs and exports, and `latest` resumes from the newest
    step complete on both."""
    data = write_vq_data(tmp_path / "data")
    config = tiny_config("vqgan_vqmodel", tmp_path, data, {"batch_size": 2}, num_steps=6, save_interval=2,
                         validation_interval=2, compute_fid=False)  # best_* exports decided on rank 0 for all
    reference = tmp_path / "one_machine"
    train_vq(config, reference, processes=2)
    disks = [tmp_path / "node0" / "run", tmp_path / "node1" / "run"]
    args = [TRAIN_SCRIPT, "--config", config, "--logging_steps", 1]
    stopped = launch_two_machines(*args, output_dirs=disks, stop_when=lambda: 3 in logged_steps(disks[0]))
    step = int(re.search(r"stopped by signal 15 at step (\d+)", stopped[0].stderr)[1])
    assert 3 <= step < 6 and all(result.returncode != 0 for result in stopped), stopped[0].stderr[-3000:]
    assert "is node-local" in (disks[0] / "train.log").read_text()
    for disk in disks:
        assert [p.name for p in list_checkpoints(disk)] == sorted({"checkpoint-2", f"checkpoint-{step}"},
                                                                  key=lambda name: int(name.split("-")[1]))
    assert not (disks[1] / "metrics.jsonl").exists() and not (disks[1] / "train.log").exists()

    # node 1 lost its newest checkpoint (say the node died before its rename): both resume from step 2
    shutil.rmtree(disks[1] / f"checkpoint-{step}")
    for result in launch_two_machines(*args, "--resume_from_checkpoint", "latest", output_dirs=disks):
        assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {disks[0] / 'checkpoint-2'} at step 2" in (disks[0] / "train.log").read_text()
    for disk in disks:
        assert [p.name for p in list_checkpoints(disk)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert (disks[0] / "final").is_dir() and not (disks[1] / "final").exists()
    assert training_terms(disks[0]) == training_terms(reference)
    assert validation_metrics(disks[0]) == validation_metrics(reference)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """The coordinate-MLP job, 12 steps, one machine x 2 processes, checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("two_process_run")
    train(out, "--checkpointing_steps", "2", processes=2)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("rank0", ["in_a_collective", "busy_alone"])
def test_a_rank_that_raises_stops_the_other_machine_with_one_line_naming_it(two_process_run, tmp_path, rank0):
    """Rank 1 (node 1) raises in step 5. Rank 0 stops within seconds, whether its collective breaks (gloo sees the
    socket close) or it is busy alone (as a rank blocked in an NCCL collective, which only a timeout would end):
    one line names rank 1 and the last checkpoint, which resumes exactly."""
    hang = ["--hang_at_step", "5", "--hang_rank", "0"] if rank0 == "busy_alone" else []  # until SIGTERM
    started = time.monotonic()
    results = launch_two_machines(SCRIPT, "--output_dir", tmp_path, *COMMON, "--checkpointing_steps", "2",
                                  "--fail_at_step", "5", "--fail_rank", "1", *hang, timeout=120)
    assert time.monotonic() - started < 120 and all(result.returncode != 0 for result in results)
    assert "RuntimeError: test hook: rank 1 fails in step 5" in results[1].stderr
    lines = [line for line in results[0].stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, results[0].stderr[-3000:]
    assert re.fullmatch(
        r"error: rank 1 \(node 1, host .+\) failed after step 4: RuntimeError: test hook: rank 1 fails in step 5; "
        r"rank 0 \(node 0, host .+\) stopped with it after step 4; the last complete checkpoint is "
        + re.escape(str(tmp_path / "checkpoint-4")) + r" \(--resume_from_checkpoint latest\)", lines[0]), lines[0]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    if rank0 == "in_a_collective":
        train(tmp_path, "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest", processes=2)
        assert losses(tmp_path) == losses(two_process_run)


@pytest.mark.slow
def test_a_rank_that_hangs_stops_the_others_after_ddp_timeout(tmp_path):
    """Rank 1 stands still in step 5 without a word: rank 0's next collective gives up after --ddp_timeout and
    says so in one line with the last checkpoint (then the launcher stops rank 1)."""
    started = time.monotonic()
    result = train(tmp_path, "--checkpointing_steps", "2", "--hang_at_step", "5", "--hang_rank", "1",
                   "--ddp_timeout", "10", processes=2, check=False, timeout=120)
    assert time.monotonic() - started < 120 and result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert re.fullmatch(
        r"error: rank 0 \(node 0, host .+\) stopped after step 4: a collective with the other ranks failed \(.*"
        r"Timed out.*\); no rank reported an error: one died, hangs or lost its node \(collectives wait "
        r"--ddp_timeout 10 s\); the last complete checkpoint is " + re.escape(str(tmp_path / "checkpoint-4"))
        + r" \(--resume_from_checkpoint latest\)", lines[0]), lines[0]
