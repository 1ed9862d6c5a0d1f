"""download_models.py as a command: download, skip when complete, --force, offline failure."""

import json
import os
import subprocess
import sys

from download_helpers import ROOT, SECRET


def run_cli(args, tmp_path, fake_hub=True, offline=False):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_TOKEN": SECRET, "FAKE_HUB_LOG": str(tmp_path / "calls.jsonl"),
           "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HOME": str(tmp_path / "hf")}
    entry = [str(ROOT / "tests" / "download_helpers.py")] if fake_hub else [str(ROOT / "download_models.py")]
    result = subprocess.run([sys.executable, *entry, *args, "--output_dir", str(tmp_path / "models")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert SECRET not in result.stdout + result.stderr
    return result


def calls(tmp_path):
    path = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_download_then_skip_then_force(tmp_path):
    first = run_cli(["--models", "sd15_vae", "tinyllama"], tmp_path)
    assert first.returncode == 0, first.stderr
    made = calls(tmp_path)
    assert [c["repo_id"] for c in made] == ["stable-diffusion-v1-5/stable-diffusion-v1-5", "TinyLlama/TinyLlama_v1.1"]
    assert made[0]["allow_patterns"] == ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    assert all(c["token_is_secret"] and not c["force_download"] for c in made)
    vae = tmp_path / "models" / "stable-diffusion-v1-5"
    assert (vae / "vae" / "model.safetensors").exists()
    marker = json.loads((vae / ".omniflow_download.json").read_text())
    assert marker["repo_id"] == "stable-diffusion-v1-5/stable-diffusion-v1-5" and "vae/config.json" in marker["files"]
    assert "downloaded" in first.stdout

    second = run_cli(["--models", "sd15_vae", "tinyllama"], tmp_path)
    assert second.returncode == 0 and len(calls(tmp_path)) == 2  # nothing fetched again
    assert second.stdout.count("skipped") == 2

    (vae / "vae" / "config.json").unlink()  # an incomplete folder is fetched again
    third = run_cli(["--models", "sd15_vae"], tmp_path)
    assert third.returncode == 0 and len(calls(tmp_path)) == 3 and "downloaded" in third.stdout

    forced = run_cli(["--models", "sd15_vae", "--force"], tmp_path)
    assert forced.returncode == 0 and calls(tmp_path)[-1]["force_download"] is True


def test_repo_override_and_raw_hub_ids(tmp_path):
    result = run_cli(["--models", "float", "--repo_id", "mirror/float-weights"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path)[-1]["repo_id"] == "mirror/float-weights"
    assert (tmp_path / "models" / "float-weights" / "model.safetensors").exists()

    result = run_cli(["--models", "someone/extra-model"], tmp_path)
    assert result.returncode == 0 and calls(tmp_path)[-1]["allow_patterns"] is None

    result = run_cli(["--models", "no_such_model"], tmp_path)
    assert result.returncode != 0 and "unknown model 'no_such_model'" in result.stderr


def test_offline_fails_fast_with_one_line_per_model(tmp_path):
    result = run_cli(["--models", "t5_large", "clip_vit_l"], tmp_path, fake_hub=False, offline=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in result.stderr
    assert lines[0].startswith("download_models: t5_large failed: google/flan-t5-large is not complete")
    assert all("HF_HUB_OFFLINE=1" in line for line in lines)
    assert "failed" in result.stdout.splitlines()[-1]  # summary table


def test_default_selection_is_the_text_job_and_help_lists_models(tmp_path):
    result = run_cli([], tmp_path)
    assert result.returncode == 0, result.stderr
    repos = [c["repo_id"] for c in calls(tmp_path)]
    assert "jacklishufan/OmniFlow-v0.5" in repos and "google/flan-t5-large" in repos
    assert "black-forest-labs/FLUX.1-dev" not in repos
    help_text = subprocess.run([sys.executable, str(ROOT / "download_models.py"), "--help"], capture_output=True,
                               text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert "flux_vae" in help_text and "wav2vec2_emotion" in help_text


def test_metric_weights_land_where_the_metrics_look_for_them(tmp_path, monkeypatch):
    """`--models lpips_alex` fetches torchvision's AlexNet file into torch hub's checkpoint folder, where LPIPS
    then finds it (served here from a local file:// URL with random weights of the right layout)."""
    import importlib.util

    import torch
    from torchvision.models import alexnet

    from omniflow.metrics.image import build_lpips, cached_weights_path
    from omniflow.metrics.weights import METRIC_WEIGHTS

    spec = importlib.util.spec_from_file_location("download_models", ROOT / "download_models.py")
    download_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(download_models)
    with torch.device("meta"):
        layout = alexnet().features.state_dict()
    served = tmp_path / "served" / "alexnet-owt-7be5be79.pth"
    served.parent.mkdir()
    torch.save({f"features.{k}": torch.randn(v.shape) for k, v in layout.items()}, served)
    monkeypatch.setitem(METRIC_WEIGHTS, "lpips_alex", served.as_uri())
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    old_hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        assert download_models.download_metric_weights("lpips_alex", force=False)[0] == "downloaded"
        assert download_models.download_metric_weights("lpips_alex", force=False)[0] == "skipped"
        assert cached_weights_path("lpips_alex").read_bytes() == served.read_bytes()
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        metric = build_lpips("alex")
        assert metric.pretrained_backbone and metric.weights == str(cached_weights_path("lpips_alex"))
        status, detail = download_models.download_metric_weights("lpips_vgg", force=False)
        assert status == "failed" and "HF_HUB_OFFLINE=1 forbids downloading" in detail
    finally:
        torch.hub.set_dir(old_hub)
