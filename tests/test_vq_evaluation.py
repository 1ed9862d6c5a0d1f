"""Best-model book-keeping across resumes, loading exports, and the discriminator wrapper of the GAN loss."""

import json
import math

import pytest
import torch

from omniflow.models.vq import load_vq_model
from omniflow.models.vq.evaluation import BestMetrics
from omniflow.models.vq.losses import VQGANLoss
from omniflow.runtime.errors import CheckpointError
from omniflow.runtime.export import export_weights
from vq_helpers import photo_batch


def test_best_metrics_follow_each_direction_and_skip_non_finite(tmp_path):
    best = BestMetrics(tmp_path, is_main=True)
    assert best.update(100, {"psnr": 20.0, "lpips": 0.30, "ssim": 0.5, "mse": 0.1}) == ["psnr", "ssim", "lpips"]
    assert best.update(200, {"psnr": 19.0, "lpips": 0.25, "ssim": 0.5, "rfid": math.nan}) == ["lpips"]
    assert best.update(300, {"psnr": 21.0, "lpips": 0.26, "rfid": 80.0}) == ["psnr", "rfid"]
    records = [json.loads(line) for line in (tmp_path / BestMetrics.FILE).read_text().splitlines()]
    assert [(r["metric"], r["step"]) for r in records] == [
        ("psnr", 100), ("ssim", 100), ("lpips", 100), ("lpips", 200), ("psnr", 300), ("rfid", 300)]


def test_resume_restores_the_bests_reached_before_the_checkpoint(tmp_path):
    first = BestMetrics(tmp_path / "run", is_main=True)
    (tmp_path / "run").mkdir()
    first.update(100, {"psnr": 20.0, "lpips": 0.30})
    first.update(200, {"psnr": 22.0, "lpips": 0.35})
    first.update(300, {"psnr": 25.0, "lpips": 0.20})
    resumed = BestMetrics(tmp_path / "resumed", is_main=True)
    resumed.restore(tmp_path / "run" / "checkpoint-200", step=200)
    assert resumed.best == {"psnr": (22.0, 200), "lpips": (0.30, 100)}
    assert resumed.update(250, {"psnr": 23.0, "lpips": 0.31}) == ["psnr"]  # 25.0 came after the checkpoint
    lines = (tmp_path / "resumed" / BestMetrics.FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [100, 100, 200, 250]
    fresh = BestMetrics(tmp_path / "run", is_main=True)
    fresh.restore(None, step=0)  # a new run in the same directory starts without the old records
    assert fresh.best == {} and (tmp_path / "run" / BestMetrics.FILE).read_text() == ""


def test_loading_an_export_that_is_not_a_vq_model_fails_clearly(tmp_path):
    export_weights({"w": torch.zeros(2)}, {"layers": [2, 2]}, tmp_path / "mlp")
    with pytest.raises(CheckpointError, match="lacks \\['model_type', 'model_args'\\]; not a VQ tokenizer export"):
        load_vq_model(tmp_path / "mlp")


class CallCounter(torch.nn.Module):
    """Stands where DDP would: wraps the discriminator and counts the calls that go through it."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_discriminator_loss_runs_through_the_given_wrapper():
    torch.manual_seed(0)
    loss = VQGANLoss(perceptual_weight=0.0, disc_ndf=8, disc_num_layers=2)
    x = photo_batch(32)
    recon = x.flip(0)
    wrapper = CallCounter(loss.discriminator)
    through_wrapper, _ = loss.discriminator_loss(x, recon, step=0, discriminator=wrapper)
    direct, _ = loss.discriminator_loss(x, recon, step=0)
    assert wrapper.calls == 2  # real and reconstructed images both go through the wrapper
    torch.testing.assert_close(through_wrapper, direct)
    through_wrapper.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())
