"""Launching on several nodes: the multi-node accelerate configs and the SLURM launcher."""
import os
import re
import shlex
import shutil
import subprocess

import pytest
import yaml

from runtime_helpers import REPO, launch_two_machines, logged_steps
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
def test_two_machines_with_node_local_output_folders_checkpoint_and_resume_exactly(tmp_path):
    """Each "machine" gets its own --output_dir (node-local scratch disks): both complete their checkpoints,
    node 0 alone holds logs and exports, and `latest` resumes from the newest step complete on both."""
    data = write_vq_data(tmp_path / "data")
    config = tiny_config("vqgan_vqmodel", tmp_path, data, {"batch_size": 2}, num_steps=6, save_interval=2,
                         validation_interval=2, compute_fid=False)  # best_* exports decided on rank 0 for all
    reference = tmp_path / "one_machine"
    train_vq(config, reference, processes=2)
    disks = [tmp_path / "node0" / "run", tmp_path / "node1" / "run"]
    for result in launch_two_machines(TRAIN_SCRIPT, "--config", config, "--logging_steps", 1, output_dirs=disks):
        assert result.returncode == 0, result.stderr[-3000:]
    assert "is node-local" in (disks[0] / "train.log").read_text()
    for disk in disks:
        assert sorted(p.name for p in disk.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert (disks[0] / "final").is_dir() and not (disks[1] / "final").exists()
    assert not (disks[1] / "metrics.jsonl").exists()
    assert training_terms(disks[0]) == training_terms(reference)

    # node 1 lost its newest checkpoint (say the node died before its rename): both resume from step 4
    shutil.rmtree(disks[1] / "checkpoint-6")
    for result in launch_two_machines(TRAIN_SCRIPT, "--config", config, "--logging_steps", 1,
                                      "--resume_from_checkpoint", "latest", output_dirs=disks):
        assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in (disks[0] / "train.log").read_text() and "at step 4" in (disks[0] / "train.log").read_text()
    assert training_terms(disks[0]) == training_terms(reference)
    assert validation_metrics(disks[0]) == validation_metrics(reference)
