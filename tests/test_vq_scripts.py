"""scripts/train_vqgan.py end to end on real photos and videos: every family trains, validates,
exports its best models, resumes exactly, runs under 2-process DDP with bf16, refuses DeepSpeed."""

import json
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from omniflow.data.video import ImageFrameDataset, frames_to_model_input, list_images
from omniflow.metrics.image import CodebookUsage, FIDMetric, packaged_fid_inception, psnr
from omniflow.models.vq import load_vq_model
from omniflow.models.vq.params import load_param_json
from runtime_helpers import assert_pickle_free
from vq_helpers import (REPO, TRAIN_SCRIPT, metric_records, script_env, tiny_config, train_vq, training_terms,
                        validation_metrics, write_vq_data)

pytestmark = pytest.mark.slow

STEPS = 16
FAMILIES = {"dvae": "VqVae", "vqvae2": "VQVAE2", "vqvae2_optvq": "VQVAE2_OptVQ", "vqgan_vqmodel": "TamingVQGAN",
            "emavq": "EMAVQ"}
WITH_GAN = {"vqvae2_optvq", "vqgan_vqmodel", "emavq"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_vq_data(tmp_path_factory.mktemp("vq_data"))


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Train each family once, lazily: ``runs(name)`` -> output directory."""
    done = {}

    def get(name):
        if name not in done:
            work = tmp_path_factory.mktemp(name)
            config = tiny_config(name, work, data, num_steps=STEPS, save_interval=STEPS // 2,
                                 validation_interval=STEPS, compute_fid=name == "vqgan_vqmodel",
                                 folder_name=str(work / "not_used"))
            train_vq(config, work / "out")  # --output_dir on the command line beats folder_name
            done[name] = work / "out"
        return done[name]

    return get


def test_the_f16_vqgan_config_trains_with_taming_s_optimisers(data, tmp_path):
    """The shipped f16 VQGAN config (tiny widths) without betas or disc_lr: taming's optimisation by default."""
    config = tiny_config("vqgan_f16", tmp_path, data, num_steps=4, validation_interval=100, save_interval=100,
                         wandb_image_interval=2)
    spec = json.loads(config.read_text())
    for key in ("beta1", "beta2", "disc_lr"):
        spec["train_args"].pop(key, None)
    config.write_text(json.dumps(spec))
    lr, disc_start = spec["train_args"]["lr"], spec["model_args"]["lossconfig"]["params"]["disc_start"]
    out = tmp_path / "out"
    train_vq(config, out, "--report_to", "tensorboard")
    line = next(line for line in (out / "train.log").read_text().splitlines() if "training settings: " in line)
    settings = json.loads(line.split("training settings: ", 1)[1])
    assert settings["autoencoder"] == {"lr": lr, "betas": [0.5, 0.9]}  # taming's VQModel.configure_optimizers
    assert settings["discriminator"] == {"lr": lr, "betas": [0.5, 0.9], "start": disc_start, "every": 3}
    assert settings["max_grad_norm"] is None and settings["beta_on"].startswith("commitment term")
    assert settings["lpips_loss_weights"] == "random (seed 0)"  # offline here, and said so
    terms = training_terms(out)
    assert all(terms[s]["lr_disc"] == terms[s]["lr"] == lr for s in terms)
    assert "g_loss" in terms[disc_start + 1] and "d_loss" in terms[disc_start + 1]  # together, at disc_start
    assert not {"g_loss", "d_loss"} & set(terms[disc_start])
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*"))),
                              size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("train/original_reconstruction")] == [2, 4]  # the seed's image interval


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_trains_validates_and_exports(runs, data, name):
    out = runs(name)
    assert not (out.parent / "not_used").exists()
    terms = training_terms(out)
    assert sorted(terms) == list(range(1, STEPS + 1))  # num_steps from param.json
    pixel = [terms[s]["pixel"] for s in sorted(terms)]
    assert np.mean(pixel[-4:]) < 0.9 * pixel[0], pixel  # 4 training photos: every batch shows the same images
    # the discriminator trains from disc_start=2 (logged as step 3, with the generator's first g_loss), every 3rd
    assert ("d_loss" in terms[STEPS - 1]) is ("d_loss" in terms[3]) is ("g_loss" in terms[3]) is (name in WITH_GAN)
    assert "d_loss" not in terms[STEPS] and "g_loss" not in terms[2]

    val = validation_metrics(out)[STEPS]
    assert {"psnr", "ssim", "lpips", "mse", "loss", "codebook_usage", "perplexity", "codebook_used_codes"} <= set(val)
    assert ("rfid" in val) is (name == "vqgan_vqmodel")
    assert all(np.isfinite(v) for v in val.values())
    assert 0 < val["codebook_usage"] <= 1 and 1 <= val["perplexity"] <= val["codebook_used_codes"]

    resolved = load_param_json(out / "param.json")  # the resolved config written beside the run loads again
    assert resolved.model_args == load_param_json(out.parent / f"{name}.json").model_args
    summary = (out / "model_summary.md").read_text()
    assert summary.startswith(f"# {json.loads((out / 'param.json').read_text())['model_type']}")
    assert "| total" in summary and "bits per image" in summary
    assert ("Discriminator" in summary) is ("Perceptual" in summary) is (name in WITH_GAN)
    assert (out / "samples" / f"val_step{STEPS:07d}.png").is_file()
    grid = Image.open(out / "samples" / f"val_step{STEPS:07d}.png")
    rows = 2 if name == "vqvae2" else 4  # num_grid_images=4; the video set has one 2-frame clip
    assert grid.width == 2 * 32 + 3 * 2 and grid.height == rows * 32 + (rows + 1) * 2  # original | reconstruction

    # The best exports load without the training state and reproduce the logged PSNR.
    model, config = load_vq_model(out / "best_psnr")
    assert config["step"] == STEPS and config["best_metric"] == "psnr" and config["image_size"] == [32, 32]
    # which networks the perceptual numbers came from, in the metrics and in the export
    record = next(r for r in metric_records(out) if "val/psnr" in r)
    assert record["val_weights/lpips_weights"] == config["val_metrics"]["lpips_weights"] == "random (seed 0)"
    if name == "vqgan_vqmodel":
        assert record["val_weights/rfid_weights"] == config["val_metrics"]["rfid_weights"] == str(
            packaged_fid_inception() or "random (seed 0)")
    for metric in ("ssim", "lpips"):
        assert (out / f"best_{metric}" / "model.safetensors").is_file()
    if FAMILIES[name] != "VQVAE2":  # image families: recompute PSNR over the validation photos
        dataset = ImageFrameDataset(list_images(data / "valid"), (32, 32))
        x = frames_to_model_input(torch.stack([dataset[i]["frames"] for i in range(len(dataset))]))
        with torch.no_grad():
            recon = model(x)[1].clamp(-1, 1)
        assert psnr((recon + 1) / 2, (x + 1) / 2, 1.0).mean().item() == pytest.approx(val["psnr"], abs=1e-4)


def test_tensorboard_gets_losses_and_the_image_grid(runs):
    events = EventAccumulator(str(next((runs("dvae") / "logs").rglob("events.out.tfevents.*")))).Reload()
    assert {"loss", "val/psnr", "lr"} <= set(events.Tags()["scalars"])
    assert "val/original_reconstruction" in events.Tags()["images"]


def test_resume_with_active_discriminator_reproduces_the_run(runs, tmp_path):
    full = runs("vqgan_vqmodel")
    checkpoint = full / f"checkpoint-{STEPS // 2}"
    saved = {p.name for p in checkpoint.iterdir()}
    assert {"model.safetensors", "model_1.safetensors", "optimizer.safetensors", "optimizer_1.safetensors",
            "scheduler.json"} <= saved
    assert_pickle_free(checkpoint)
    # a second run into the same folder without resuming is refused: it would mix with the first
    refused = train_vq(full.parent / "vqgan_vqmodel.json", full, check=False)
    assert refused.returncode == 2 and f"--output_dir {full} holds an earlier run" in refused.stderr
    train_vq(full.parent / "vqgan_vqmodel.json", tmp_path / "half", "--resume_from_checkpoint", str(checkpoint))
    expected = {s: t for s, t in training_terms(full).items() if s > STEPS // 2}
    resumed = training_terms(tmp_path / "half")
    assert sorted(resumed) == sorted(expected)
    assert any("d_loss" in t for t in resumed.values())
    assert resumed == expected
    assert validation_metrics(tmp_path / "half") == validation_metrics(full)


def test_ddp_two_processes_bf16_metrics_cover_the_whole_validation_set(data, tmp_path):
    config = tiny_config("vqgan_vqmodel", tmp_path, data, {"batch_size": 2}, num_steps=4, validation_interval=4,
                         compute_fid=True)
    spec = json.loads(config.read_text())
    spec["model_args"]["lossconfig"]["params"]["disc_start"] = 0
    config.write_text(json.dumps(spec))
    result = train_vq(config, tmp_path / "out", "--mixed_precision", "bf16", processes=2)
    assert "2 process(es)" in result.stderr and "mixed precision bf16" in result.stderr
    terms = training_terms(tmp_path / "out")
    assert "d_loss" in terms[1] and "d_loss" in terms[4]  # the discriminator trained under DDP
    val = validation_metrics(tmp_path / "out")[4]

    # One process over all 5 validation photos must find what the two ranks (3 + 2 photos) reported.
    model, _ = load_vq_model(tmp_path / "out" / "final")
    dataset = ImageFrameDataset(list_images(data / "valid"), (32, 32))
    x = frames_to_model_input(torch.stack([dataset[i]["frames"] for i in range(len(dataset))]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            _, recon, _, indices = model(x)
    finally:
        torch.set_num_threads(threads)
    recon = recon.float().clamp(-1, 1)
    usage = CodebookUsage(32)
    usage.update(indices)
    expected = {**usage.compute(), "mse": (recon - x).pow(2).mean().item(),
                "psnr": psnr((recon + 1) / 2, (x + 1) / 2, 1.0).mean().item()}
    fid = FIDMetric(device="cpu", input_range=(-1.0, 1.0))
    fid.update(x, real=True)
    fid.update(recon, real=False)
    assert val["codebook_used_codes"] == expected["used_codes"] == len(torch.unique(indices))
    assert val["codebook_usage"] == expected["usage"] and val["perplexity"] == pytest.approx(expected["perplexity"])
    for key in ("psnr", "mse"):  # bf16 reconstructions of other batch compositions
        assert val[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-4), key
    assert val["rfid"] == pytest.approx(fid.compute(), rel=1e-3)  # statistics of 5 images: a near-singular sqrtm


def test_deepspeed_launch_is_refused_naming_the_ddp_config(data, tmp_path):
    config = tiny_config("dvae", tmp_path, data)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "accelerate_configs/zero2.yaml"), "--num_processes", "1", "--main_process_port", "0", str(TRAIN_SCRIPT),
           "--config", str(config), "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(cmd, env={**script_env(), "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode != 0
    refusal = [line for line in result.stderr.splitlines() if line.startswith("error: ConfigError")]
    assert len(refusal) == 1 and "DeepSpeed" in refusal[0] and "accelerate_configs/multi_gpu.yaml" in refusal[0]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_bad_param_key_is_one_line_naming_section_and_key(data, tmp_path, monkeypatch, capsys):
    config = tiny_config("dvae", tmp_path, data, lr_decy=0.5)
    monkeypatch.setattr(sys, "argv", [str(TRAIN_SCRIPT), "--config", str(config)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "train_args" in lines[0] and "'lr_decy'" in lines[0] and "did you mean 'lr_decay'" in lines[0]


def test_bench_vq_on_cpu_runs_the_tiny_config_and_says_so(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_vq.py"), "--device", "cpu", "--variants", "fp32", "bf16_cl",
                             "--warmup", "0", "--steps", "3", "--out", str(tmp_path / "bench.json")],
                            env=script_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "configs/vq/tiny/vqgan_f16.json at 32 px, batch 4" in result.stdout
    assert "CPU run (no CUDA device or --device cpu): tiny config" in result.stdout
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [r["variant"] for r in report["results"]] == ["fp32", "bf16_cl"]
    assert all(r["steps_per_s"] > 0 and r["peak_mem_gib"] is None for r in report["results"])
    assert "| fp32 |" in result.stdout and "1.00x" in result.stdout


def test_channels_last_run_trains_and_says_so(data, tmp_path):
    config = tiny_config("vqgan_f16", tmp_path, data, num_steps=2, validation_interval=100)
    result = train_vq(config, tmp_path / "run", "--channels_last")
    assert "speed options: channels_last=True, compiled: none" in result.stderr
    terms = training_terms(tmp_path / "run")
    assert sorted(terms) == [1, 2] and all(np.isfinite(v) for t in terms.values() for v in t.values())
