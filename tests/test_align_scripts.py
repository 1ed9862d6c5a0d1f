"""End-to-end tests of scripts/train_align_with_args.py and scripts/eval_align.py.

Two tiny real AutoencoderKLs (4 and 16 latent channels) saved with save_pretrained and loaded by
path, real photos from write_sample_images, the scripts run as subprocesses on the CPU.
"""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from align_helpers import vae_dirs  # noqa: F401 (fixture)
from PIL import Image
from runtime_helpers import REPO, assert_pickle_free, metrics, run_script
from safetensors.torch import load_file

from omniflow.data.images import ImageFolderDataset, write_sample_images
from omniflow.metrics.image import psnr
from omniflow.models.align import AlignPipeline, load_aligned_pipeline
from omniflow.models.align_report import to_unit
from omniflow.models.align_training import predict_batch
from omniflow.runtime.state_files import load_state

TRAIN = REPO / "scripts" / "train_align_with_args.py"
EVAL = REPO / "scripts" / "eval_align.py"
TINY_CONFIG = REPO / "configs" / "align" / "tiny.json"

pytestmark = pytest.mark.slow


def train_lines(output_dir) -> dict[int, dict]:
    return {m["step"]: m for m in metrics(output_dir) if "loss" in m}


def eval_lines(output_dir) -> dict[int, dict]:
    return {m["step"]: m for m in metrics(output_dir) if "eval/loss" in m}


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """8 training and 5 eval photos (odd: 2 processes get 3 + 2), flat and in the ImageNet class-folder layout."""
    root = tmp_path_factory.mktemp("align_images")
    photos = write_sample_images(root / "all", 32, 13)
    folders = {}
    for split, chosen in (("train", photos[:8]), ("eval", photos[8:])):
        for i, photo in enumerate(chosen):
            for layout, sub in (("default", ""), ("imagenet", f"class_{i % 2}")):
                folder = root / f"{split}_{layout}" / sub
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copy(photo, folder / photo.name)
                folders[f"{split}_{layout}"] = root / f"{split}_{layout}"
    return folders


def tiny_args(vae_dirs, images, output_dir, layout: str = "default") -> list:
    return ["--load_config", TINY_CONFIG, "--vae1_path", vae_dirs["vae1"], "--vae2_path", vae_dirs["vae2"],
            "--train_data_dir", images[f"train_{layout}"], "--eval_data_dir", images[f"eval_{layout}"],
            "--save_dir", output_dir]


@pytest.fixture(scope="module")
def full_run(vae_dirs, images, tmp_path_factory) -> Path:
    """3 epochs of 4 steps from images (no cache), TensorBoard on, checkpoints at 6 and 12. It runs in the
    VAEs' folder and names them by relative paths: the exports must load from anywhere else."""
    out = tmp_path_factory.mktemp("align_runs") / "full"
    work = vae_dirs["vae1"].parent
    relative = {key: folder.relative_to(work) for key, folder in vae_dirs.items()}
    run_script(TRAIN, *tiny_args(relative, images, out), "--checkpointing_steps", "6", "--report_to", "tensorboard",
               cwd=work)
    return out


def test_training_lowers_the_latent_loss_and_reports(full_run, vae_dirs):
    train, evals = train_lines(full_run), eval_lines(full_run)
    assert sorted(train) == list(range(1, 13)) and sorted(evals) == [0, 4, 8, 12]
    assert evals[12]["eval/loss"] < 0.5 * evals[0]["eval/loss"], evals
    assert evals[12]["eval/latent_cosine"] > evals[0]["eval/latent_cosine"] + 0.2
    assert train[11]["loss"] + train[12]["loss"] < train[1]["loss"] + train[2]["loss"]
    assert all(0 < m["grad_norm"] < float("inf") for m in train.values())
    # warm-up over 2 steps, then x0.7 every epoch (4 steps) counted from the end of the warm-up
    lrs = [round(train[s]["lr"], 6) for s in (1, 2, 4, 6, 7, 10, 11)]
    assert lrs == [0.0015, 0.003, 0.003, 0.003, 0.0021, 0.0021, 0.00147]
    channel_stats = [k for k in evals[12] if k.startswith("eval_latent/")]
    assert len(channel_stats) == 4 * 16 and "eval_latent/target_std_c15" in channel_stats

    best, final = (json.loads((full_run / name / "config.json").read_text()) for name in ("best", "final"))
    best_step = min(evals, key=lambda s: evals[s]["eval/loss"])
    assert (best["step"], best["eval"]["loss"]) == (best_step, pytest.approx(evals[best_step]["eval/loss"]))
    assert final["step"] == 12 and final["pipeline"]["module"]["out_channels"] == 16
    assert final["pipeline"]["vae2"] == {"path": str(vae_dirs["vae2"]), "subfolder": "vae"}  # recorded absolute

    for step in (0, 12):  # grids at the start and every 3 epochs: 2 images x 5 views of 32 px
        with Image.open(full_run / "visualizations" / f"comparison_step{step:07d}.png") as grid:
            assert grid.size == (5 * 34 + 2, 2 * 34 + 2)
        with Image.open(full_run / "visualizations" / f"latents_step{step:07d}.png") as grid:
            assert grid.size == (16 * 17 + 1, 2 * 3 * 17 + 1)  # 16 channels; 3 rows per image; 16 px latents
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((full_run / "logs").rglob("events.out.tfevents*")).parent),
                              size_guidance={"images": 0})
    events.Reload()
    assert {"align/comparison", "align/latents"} <= set(events.Tags()["images"])
    assert {"loss", "grad_norm", "eval/loss", "eval_latent/pred_std_c00"} <= set(events.Tags()["scalars"])


def test_resume_from_a_checkpoint_is_exact(full_run, vae_dirs, images, tmp_path):
    resumed = tmp_path / "resumed"
    run_script(TRAIN, *tiny_args(vae_dirs, images, resumed), "--resume_from_checkpoint", full_run / "checkpoint-6",
               "--num_visualize_samples", "0")  # grids off: they must not change the training
    assert not (resumed / "visualizations").exists()
    # the best eval so far is part of the training state (a state the script registers with the run)
    assert_pickle_free(full_run / "checkpoint-6")
    best_state = load_state(full_run / "checkpoint-6" / "state_best_eval")
    best_step = min((s for s in eval_lines(full_run) if s <= 6), key=lambda s: eval_lines(full_run)[s]["eval/loss"])
    assert best_state == {"loss": eval_lines(full_run)[best_step]["eval/loss"], "step": best_step}
    full, again = train_lines(full_run), train_lines(resumed)
    assert sorted(again) == list(range(7, 13))
    for step in again:
        assert [again[step][k] for k in ("loss", "lr", "grad_norm")] == [full[step][k] for k in ("loss", "lr", "grad_norm")]
    assert {s: m["eval/loss"] for s, m in eval_lines(resumed).items()} == \
        {s: m["eval/loss"] for s, m in eval_lines(full_run).items() if s > 6}
    for name in ("final", "best"):
        ours, theirs = load_file(resumed / name / "model.safetensors"), load_file(full_run / name / "model.safetensors")
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_latent_cache_two_processes_resume_and_config_round_trip(vae_dirs, images, tmp_path):
    """2 DDP processes, latents cached by the main process; 2 steps per epoch, a checkpoint every epoch."""
    first, second, cache = tmp_path / "first", tmp_path / "second", tmp_path / "latents"
    saved, saved_again = tmp_path / "first.json", tmp_path / "second.json"
    run_script(TRAIN, *tiny_args(vae_dirs, images, first, "imagenet"), "--dataset_type", "imagenet",
               "--cache_latents", "--latent_cache_dir", cache, "--input_types", "latent", "--loss_type", "weighted_l1",
               "--max_train_steps", "4", "--save_frequency", "1", "--config_save_path", saved, processes=2)
    assert sorted(p.name for p in first.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    index_times = {split: (cache / split / "index.json").stat().st_mtime_ns for split in ("train", "eval")}
    # everything else comes from the saved file: VAEs, data, cache, module, loss, schedule
    run_script(TRAIN, "--load_config", saved, "--save_dir", second, "--resume_from_checkpoint",
               first / "checkpoint-2", "--config_save_path", saved_again, processes=2)
    full, again = train_lines(first), train_lines(second)
    assert sorted(again) == [3, 4]
    assert all(again[s]["loss"] == full[s]["loss"] and again[s]["lr"] == full[s]["lr"] for s in again)
    # the eval due at step 2 ran before that checkpoint was saved: it is not redone
    assert {s: m["eval/loss"] for s, m in eval_lines(second).items()} == \
        {s: m["eval/loss"] for s, m in eval_lines(first).items() if s > 2}
    assert index_times == {split: (cache / split / "index.json").stat().st_mtime_ns for split in ("train", "eval")}

    # The 5 eval images were dealt 3 + 2 to the ranks, all scored: one process finds what they reported.
    evaluated = tmp_path / "eval"
    run_script(EVAL, "--checkpoint", first / "best", "--eval_data_dir", images["eval_imagenet"], "--dataset_type",
               "imagenet", "--output_dir", evaluated)
    one = json.loads((evaluated / "metrics.json").read_text())["latent"]
    two = json.loads((first / "best" / "config.json").read_text())["eval"]
    assert one["num_images"] == two["num_images"] == 5
    for key in ("loss", "latent_mse", "latent_cosine"):  # float64 sums of float32 latents encoded in other batches
        assert one[key] == pytest.approx(two[key], rel=1e-5), key

    one, two = json.loads(saved.read_text()), json.loads(saved_again.read_text())
    changed = {k for k in one if one[k] != two[k]}
    assert changed == {"output_dir", "resume_from_checkpoint", "config_save_path"}
    assert (one["input_types"], one["loss_type"], one["dataset_type"]) == (["latent"], "weighted_l1", "imagenet")
    assert "save_dir" not in one and one["output_dir"] == str(first)  # seed names are saved as the runtime's
    assert json.loads((second / "final" / "config.json").read_text())["pipeline"]["loss_type"] == "weighted_l1"


def test_eval_writes_metrics_and_grids(full_run, images, tmp_path):
    out = tmp_path / "eval"
    run_script(EVAL, "--checkpoint", full_run / "best", "--eval_data_dir", images["eval_default"],
               "--output_dir", out, "--save_visualizations", "--num_visualize_samples", "3", "--batch_size", "3")
    results = json.loads((out / "metrics.json").read_text())
    best = json.loads((full_run / "best" / "config.json").read_text())
    # the training run's eval (batches of 4) and this script (batches of 3) agree on the latent metrics
    for key in ("loss", "latent_mse", "latent_cosine"):
        assert results["latent"][key] == pytest.approx(best["eval"][key], rel=1e-5), key
    assert results["latent"]["num_images"] == 5 and len(results["latent"]["pred_std"]) == 16
    sections = ("aligned_vs_original", "aligned_vs_target_reconstruction", "target_reconstruction_vs_original",
                "source_reconstruction_vs_original")
    for section in sections:
        assert set(results[section]) == {"psnr", "ssim", "lpips"}
        assert all(torch.isfinite(torch.tensor(v)) for v in results[section].values())
    assert results["lpips_weights"] == "random (seed 0)" and results["lpips_pretrained_backbone"] is False  # offline

    pipeline, _ = load_aligned_pipeline(full_run / "best")
    data = ImageFolderDataset(images["eval_default"], 32)
    photos = torch.stack([data[i]["image"] for i in range(len(data))])
    with torch.no_grad():
        aligned = to_unit(pipeline.decode_target(pipeline.predict(photos)))
        target_recon = to_unit(pipeline.decode_target(pipeline.encode_target(photos)))
    assert results["aligned_vs_original"]["psnr"] == pytest.approx(psnr(aligned, photos / 255.0, 1.0).mean().item(), rel=1e-4)
    assert results["aligned_vs_target_reconstruction"]["psnr"] == \
        pytest.approx(psnr(aligned, target_recon, 1.0).mean().item(), rel=1e-4)
    with Image.open(out / "visualizations" / "comparison.png") as grid:
        assert grid.size == (5 * 34 + 2, 3 * 34 + 2)
    assert (out / "visualizations" / "latents.png").is_file()


def test_wrong_out_channels_fails_in_one_line(vae_dirs, images, tmp_path):
    result = run_script(TRAIN, *tiny_args(vae_dirs, images, tmp_path / "bad"), "--out_channels", "8", check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(errors) == 1 and "AlignConfigError" in errors[0]
    assert "latent_channels=16" in errors[0] and "set out_channels to 16" in errors[0]


# ---- in-process checks of the script's pieces


@pytest.fixture(scope="module")
def train_script():
    return load_script(TRAIN)


def test_flags_beat_the_config_file_whichever_spelling(train_script, tmp_path):
    """configs/align/sd15_to_flux.json sets save_dir and precision: the runtime's flags still win, and the
    seed's flags win over the runtime's keys in a file."""
    config = REPO / "configs" / "align" / "sd15_to_flux.json"
    _, train_opts = train_script.parse_args(["--load_config", str(config)])
    assert (train_opts.output_dir, train_opts.mixed_precision) == ("outputs/align_sd15_to_flux", "bf16")
    _, train_opts = train_script.parse_args(["--load_config", str(config), "--output_dir", str(tmp_path),
                                             "--mixed_precision", "no"])
    assert (train_opts.output_dir, train_opts.mixed_precision) == (str(tmp_path), "no")
    runtime_names = tmp_path / "runtime_names.json"
    runtime_names.write_text(json.dumps({"output_dir": "x", "logging_dir": "x", "mixed_precision": "no",
                                         "dataloader_num_workers": 1}))
    _, train_opts = train_script.parse_args(["--load_config", str(runtime_names), "--train_data_dir", "x",
                                             "--save_dir", str(tmp_path), "--log_dir", "tb", "--precision", "bfloat16",
                                             "--num_workers", "3"])
    assert (train_opts.output_dir, train_opts.logging_dir, train_opts.mixed_precision,
            train_opts.dataloader_num_workers) == (str(tmp_path), "tb", "bf16", 3)
    assert train_script.parse_args(["--train_data_dir", "x", "--precision", "float32"])[1].mixed_precision == "no"


def test_warmup_then_step_schedule(train_script):
    factor = train_script.warmup_step_lr(warmup_steps=2, step_size=3, gamma=0.5)
    assert [factor(s) for s in range(9)] == [0.5, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.25]


def test_cached_batches_skip_the_vae_encoders(vae_dirs, images, monkeypatch):
    pipeline = AlignPipeline.from_pretrained(str(vae_dirs["vae1"]), str(vae_dirs["vae2"]), "vae", "vae",
                                             hidden_channels=16, num_blocks=1, downsample_times=1)
    data = ImageFolderDataset(images["train_default"], 32)
    photos = torch.stack([data[i]["image"] for i in range(2)])
    latents = {"vae1": pipeline.encode_source(photos), "vae2": pipeline.encode_target(photos)}
    expected = predict_batch(pipeline, {"image": photos}, cached=False)
    calls = []
    for vae in pipeline.vaes.values():
        monkeypatch.setattr(vae, "encode", lambda *a, **k: calls.append(1))
    pred, target = predict_batch(pipeline, {"image": photos, **latents}, cached=True)
    assert calls == [] and torch.equal(target, latents["vae2"])
    torch.testing.assert_close(pred, expected[0])
