"""Validation of a VQ tokenizer over a whole split on every rank, and the best-model book-keeping.

:class:`VQValidator` computes PSNR, SSIM, LPIPS, rFID, the codebook usage and perplexity of the
codes over the whole validation set (sums, code counts and Inception statistics are reduced
over ranks, so ranks may hold different numbers of images) and an original |
reconstruction grid. :class:`BestMetrics` remembers the best value of each metric and which
step reached it, in ``best_metrics.jsonl``, so a resumed run knows what its exports must beat.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from accelerate import Accelerator
from torchvision.utils import make_grid

from omniflow.data.video import frames_to_model_input
from omniflow.metrics.image import FID_FEATURE_DIM, CodebookUsage, FIDMetric, GaussianStats, build_lpips, psnr, ssim
from omniflow.runtime.tracking import progress

from .base import VQTokenizer

logger = logging.getLogger("omniflow")

# metric -> whether larger is better
BEST_METRICS = {"psnr": True, "ssim": True, "lpips": False, "rfid": False}
_SUMMED = ("mse", "vq_loss", "psnr", "ssim", "lpips")


class VQValidator:
    """Metrics of a tokenizer on a validation loader; every rank calls :meth:`evaluate` together."""

    def __init__(self, accelerator: Accelerator, codebook_sizes: list[int], *, lpips_net: str = "alex",
                 lpips_weights_path: str | None = None, compute_fid: bool = True,
                 fid_weights_path: str | None = None, num_grid_images: int = 8) -> None:
        self.accelerator = accelerator
        self.codebook_sizes = codebook_sizes
        self.num_grid_images = num_grid_images
        self.lpips = build_lpips(lpips_net, lpips_weights_path).to(accelerator.device)
        self.fid = None
        if compute_fid:
            self.fid = FIDMetric(fid_weights_path, accelerator.device, input_range=(-1.0, 1.0),
                                 all_gather=accelerator.gather)
        self._real_stats_ready = False  # the validation images never change: their statistics are kept
        # which networks the perceptual metrics ran: a weights file, or "random (seed 0)"
        self.weights = {"lpips_weights": self.lpips.weights, **({"rfid_weights": self.fid.weights} if self.fid else {})}

    def _reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum") if self.accelerator.num_processes > 1 else tensor

    @torch.no_grad()
    def evaluate(self, model: VQTokenizer, loader: Iterable) -> tuple[dict[str, float], torch.Tensor | None]:
        """(metrics, grid): metrics identical on every rank; the grid (3, H, W) in [0, 1] on the main rank.

        ``model`` is the bare module (not its DDP wrapper): validation runs no collective per batch.
        """
        device = self.accelerator.device
        was_training = model.training
        model.eval()
        sums = torch.zeros(len(_SUMMED) + 1, dtype=torch.float64, device=device)  # + image count
        usage = [CodebookUsage(size, device) for size in self.codebook_sizes]
        if self.fid is not None:
            self.fid.fake = GaussianStats(FID_FEATURE_DIM, device)
        shown: list[torch.Tensor] = []
        for batch in progress(loader, desc="validation", unit="batch", disable=not self.accelerator.is_main_process):
            x = frames_to_model_input(batch["frames"].to(device, non_blocking=True))
            with self.accelerator.autocast():
                vq_loss, recon, _, indices = model(x)
            recon = recon.float().clamp(-1, 1)
            x01, recon01 = (x + 1) / 2, (recon + 1) / 2
            per_image = torch.stack([
                (recon - x).pow(2).flatten(1).mean(1).double(), vq_loss.double().expand(len(x)),
                psnr(recon01, x01, 1.0), ssim(recon01, x01, 1.0), self.lpips(recon, x).double()], dim=1)
            sums += torch.cat([per_image.sum(0), per_image.new_tensor([len(x)])])
            for counter, level_indices in zip(usage, indices if isinstance(indices, tuple) else (indices,)):
                counter.update(level_indices)
            if self.fid is not None:
                if not self._real_stats_ready:
                    self.fid.update(x, real=True)
                self.fid.update(recon, real=False)
            if len(shown) < 2 * self.num_grid_images:
                shown += [image for pair in zip(x01, recon01) for image in pair]
        sums = self._reduce(sums)
        count = sums[-1].item()
        metrics = {name: (sums[i] / max(count, 1)).item() for i, name in enumerate(_SUMMED)}
        metrics["loss"] = metrics["mse"] + metrics["vq_loss"]
        metrics.update(self._codebook_metrics(usage))
        if self.fid is not None:
            self._real_stats_ready = True
            if count >= 2:
                metrics["rfid"] = self.fid.compute()
            else:
                logger.warning("rFID skipped: the validation set has %d image(s), it needs at least 2", count)
        model.train(was_training)
        grid = None
        if self.accelerator.is_main_process and shown:
            grid = pairs_grid(shown[: 2 * self.num_grid_images])
        return metrics, grid

    def _codebook_metrics(self, usage: list[CodebookUsage]) -> dict[str, float]:
        """Usage, perplexity and used codes per level (suffix ``_level<l>``), unsuffixed: the mean over levels."""
        levels = [counter.compute(self._reduce) for counter in usage]
        out = {f"codebook_{key}" if key != "perplexity" else key: sum(level[key] for level in levels) / len(levels)
               for key in ("usage", "perplexity", "used_codes")}
        if len(levels) > 1:
            for i, level in enumerate(levels):
                out.update({f"codebook_usage_level{i}": level["usage"], f"perplexity_level{i}": level["perplexity"],
                            f"codebook_used_codes_level{i}": level["used_codes"]})
        return out


def pairs_grid(images: list[torch.Tensor]) -> torch.Tensor:
    """Alternating original, reconstruction images in [0, 1] -> one (3, H, W) grid, a pair per row."""
    return make_grid(torch.stack(images).cpu(), nrow=2, padding=2, pad_value=1.0)


@torch.no_grad()
def reconstruction_grid(model: VQTokenizer, x: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """Original | reconstruction grid of a batch in [-1, 1] (eval mode: codebook statistics untouched)."""
    was_training = model.training
    model.eval()
    with accelerator.autocast():
        recon = model(x)[1].float().clamp(-1, 1)
    model.train(was_training)
    return pairs_grid([image for pair in zip((x.float() + 1) / 2, (recon + 1) / 2) for image in pair])


class BestMetrics:
    """Best value per metric in :data:`BEST_METRICS`; improvements are appended to ``best_metrics.jsonl``."""

    FILE = "best_metrics.jsonl"

    def __init__(self, output_dir: str | Path, is_main: bool,
                 broadcast: Callable[[list], list] | None = None) -> None:
        self.path = Path(output_dir) / self.FILE
        self.is_main = is_main
        self.broadcast = broadcast  # e.g. accelerate's broadcast_object_list: rank 0's decision for every rank
        self.best: dict[str, tuple[float, int]] = {}  # metric -> (value, step)

    def restore(self, checkpoint_dir: str | Path | None, step: int) -> None:
        """Resume: the bests reached up to ``step`` by the run that wrote ``checkpoint_dir``.

        Without a checkpoint (a fresh start) the history file is emptied: an earlier run's
        records in the same directory must not count.
        """
        source = Path(checkpoint_dir).parent / self.FILE if checkpoint_dir is not None else None
        records = []
        if source is not None and source.is_file():
            records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
            records = [r for r in records if r["step"] <= step]
        for record in records:  # only improvements are recorded: the last one of each metric is its best
            self.best[record["metric"]] = (record["value"], record["step"])
        if self.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in records))

    def _better(self, name: str, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if name not in self.best:
            return True
        old = self.best[name][0]
        return value > old if BEST_METRICS[name] else value < old

    def update(self, step: int, metrics: dict[str, float]) -> list[str]:
        """Record the metrics of ``step``; returns the names that improved, rank 0's list on every rank (the
        exports that follow are collective; on node-local disks only node 0 holds the history)."""
        improved = [name for name in BEST_METRICS if name in metrics and self._better(name, metrics[name])]
        if self.broadcast is not None:
            improved = self.broadcast([improved])[0]
        for name in improved:
            self.best[name] = (metrics[name], step)
            if self.is_main:
                with self.path.open("a") as f:
                    f.write(json.dumps({"metric": name, "value": metrics[name], "step": step}) + "\n")
        return improved
