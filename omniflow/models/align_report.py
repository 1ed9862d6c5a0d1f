"""What training and evaluation report about an alignment: latent metrics and image grids.

:class:`LatentMetrics` accumulates latent MSE, cosine similarity and per-channel statistics
over batches (and ranks). :func:`alignment_views` decodes one batch every way worth looking
at; :func:`comparison_grid` and :func:`latent_channel_grid` lay them out as images in [0, 1].
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from omniflow.data.images import to_model_range
from omniflow.metrics.image import psnr, ssim
from omniflow.models.align import AlignPipeline, decode_latents, set_latent_loss

DIFFERENCE_GAIN = 4.0  # difference maps show |a - b| x 4 so that small errors are visible
VIEW_COLUMNS = ("original", "vae1_reconstruction", "vae2_reconstruction", "aligned", "difference")


class LatentMetrics:
    """Sums over batches (and ranks) of prediction/target latents ``[B, C, h, w]``; :meth:`compute` averages.

    Every value is a mean over the whole set, not over batch means, so it does not depend on how
    the set was batched or dealt to ranks: ``latent_mse``; ``latent_cosine``, the cosine similarity
    of each flattened predicted latent with its target averaged over images; channel statistics over
    all images and positions; ``loss``, the pipeline's loss over the set (:func:`set_latent_loss`).
    """

    def __init__(self, channels: int, device: torch.device | str = "cpu", loss_type: str = "mse",
                 loss_weight: float = 1.0):
        self.channels, self.loss_type, self.loss_weight = channels, loss_type, loss_weight
        # one float64 vector so that a single all-reduce sums everything across ranks: [cosine, images,
        # positions] + per channel: squared error, absolute error, pred sum, pred squares, target sum, target squares
        self.sums = torch.zeros(3 + 6 * channels, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.double(), target.double()
        error = pred - target
        cosine = F.cosine_similarity(pred.flatten(1), target.flatten(1), dim=1).sum()
        counts = torch.stack([cosine, cosine.new_tensor(len(pred)), cosine.new_tensor(pred[:, 0].numel())])
        channels = [t.sum(dim=(0, 2, 3)) for t in (error.pow(2), error.abs(), pred, pred.pow(2), target, target.pow(2))]
        self.sums += torch.cat([counts, *channels])

    def compute(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
        """Averages (after ``reduce_sum`` across ranks, e.g. ``lambda t: accelerator.reduce(t, "sum")``)."""
        s = reduce_sum(self.sums.clone()) if reduce_sum else self.sums
        cosine, images, positions = s[0], s[1].clamp_min(1), s[2].clamp_min(1)
        squared, absolute, pred_sum, pred_squares, target_sum, target_squares = s[3:].view(6, self.channels)
        stats = {}
        for name, total, squares in (("pred", pred_sum, pred_squares), ("target", target_sum, target_squares)):
            mean = total / positions
            stats[f"{name}_mean"], stats[f"{name}_std"] = mean, (squares / positions - mean.pow(2)).clamp_min(0).sqrt()
        elements = positions * self.channels
        loss = set_latent_loss(squared, absolute, stats["target_std"], elements, self.loss_type, self.loss_weight)
        return {"latent_mse": (squared.sum() / elements).item(), "latent_cosine": (cosine / images).item(),
                "loss": loss.item(), "num_images": int(s[1].item()),
                **{name: value.tolist() for name, value in stats.items()}}


def channel_scalars(stats: dict, prefix: str) -> dict[str, float]:
    """Per-channel lists of :meth:`LatentMetrics.compute` as flat scalars (``<prefix>pred_mean_c03``...)."""
    return {f"{prefix}{key}_c{i:02d}": value for key in ("pred_mean", "pred_std", "target_mean", "target_std")
            for i, value in enumerate(stats[key])}


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> float32 in [0, 1] (clamped)."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def difference_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Grey ``|a - b|`` (channel mean, x :data:`DIFFERENCE_GAIN`) as 3-channel images in [0, 1]."""
    diff = (a - b).abs().mean(dim=1, keepdim=True) * DIFFERENCE_GAIN
    return diff.clamp(0, 1).expand(-1, 3, -1, -1)


@torch.no_grad()
def alignment_views(pipeline: AlignPipeline, images: torch.Tensor,
                    source_latent: torch.Tensor | None = None,
                    target_latent: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Views of uint8 ``images`` in [0, 1] keyed by :data:`VIEW_COLUMNS`, plus the predicted and target latents.

    ``aligned`` is the predicted latent decoded by the target VAE; ``difference`` compares it with
    the target VAE's own reconstruction, so it shows the alignment error alone.
    """
    device = pipeline.device
    images = images.to(device)
    source = pipeline.encode_source(images) if source_latent is None else source_latent.to(device)
    target = pipeline.encode_target(images) if target_latent is None else target_latent.to(device)
    pred = pipeline.predict(images, source).float()
    latents = {pipeline.source_key: source, pipeline.target_key: target}
    views = {"original": to_unit(to_model_range(images))}
    for key in ("vae1", "vae2"):
        views[f"{key}_reconstruction"] = to_unit(decode_latents(pipeline.vaes[key], latents[key]))
    views["aligned"] = to_unit(pipeline.decode_target(pred))
    views["difference"] = difference_map(views["aligned"], views[f"{pipeline.target_key}_reconstruction"])
    return views, pred, target


def comparison_grid(views: dict[str, torch.Tensor]) -> torch.Tensor:
    """One row per image, one column per view in :data:`VIEW_COLUMNS` order -> ``[3, H, W]``."""
    columns = [views[name].cpu() for name in VIEW_COLUMNS]
    tiles = torch.stack(columns, dim=1).flatten(0, 1)  # image-major: row i holds image i's views
    return make_grid(tiles, nrow=len(columns), padding=2, pad_value=1.0)


def latent_channel_grid(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Latents ``[B, C, h, w]`` as a grid: per image, rows target, prediction, |difference|; one column per channel.

    Each channel is scaled by that image's target channel min/max, so target and prediction share a scale.
    """
    pred, target = pred.detach().float().cpu(), target.detach().float().cpu()
    lo = target.amin(dim=(2, 3), keepdim=True)
    span = (target.amax(dim=(2, 3), keepdim=True) - lo).clamp_min(1e-6)
    rows = torch.stack([(target - lo) / span, (pred - lo) / span, (pred - target).abs() / span], dim=1)
    tiles = rows.flatten(0, 2).clamp(0, 1).unsqueeze(1).expand(-1, 3, -1, -1)
    return make_grid(tiles, nrow=target.shape[1], padding=1, pad_value=1.0)


def alignment_grids(pipeline: AlignPipeline, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"comparison": ..., "latents": ...}`` grids ``[3, H, W]`` of uint8 ``images``."""
    views, pred, target = alignment_views(pipeline, images)
    return {"comparison": comparison_grid(views), "latents": latent_channel_grid(pred, target)}


def save_png(grid: torch.Tensor, path: str | Path) -> Path:
    """Write a ``[3, H, W]`` image in [0, 1] as PNG (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, str(path))
    return path


class ImagePairMetrics:
    """Mean PSNR, SSIM and (optionally) LPIPS between pairs of image batches in [0, 1]."""

    def __init__(self, lpips: torch.nn.Module | None = None):
        self.lpips = lpips
        self.sums: dict[str, float] = {}
        self.count = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        values = {"psnr": psnr(x, y, data_range=1.0), "ssim": ssim(x, y, data_range=1.0)}
        if self.lpips is not None:
            values["lpips"] = self.lpips(x, y)
        for name, per_image in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + per_image.double().sum().item()
        self.count += len(x)

    def compute(self) -> dict[str, float]:
        return {name: total / max(self.count, 1) for name, total in self.sums.items()}
