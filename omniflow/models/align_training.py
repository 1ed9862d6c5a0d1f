"""Pieces of the alignment trainer (scripts/train_align_with_args.py): training data (images or their latent
cache), the loss inputs of a batch, and the evaluation, visualisation and export steps around the loop."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from accelerate.utils import send_to_device
from torch.utils.data import Dataset

from ..data.core import ResumableLoader
from ..data.images import ImageFolderDataset, build_image_dataset
from ..data.latent_cache import load_or_build_latent_cache
from ..runtime.errors import ConfigError
from ..runtime.run import TrainingOptions, TrainingRun
from .align import AlignPipeline, export_config, vae_downsample_factor
from .align_report import LatentMetrics, alignment_grids, channel_scalars, save_png

logger = logging.getLogger("omniflow")


class BestEval:
    """The lowest eval loss so far; checkpointed so that a resumed run keeps the right ``best/``."""

    def __init__(self):
        self.loss, self.step = math.inf, -1

    def state_dict(self) -> dict:
        return {"loss": self.loss, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.loss, self.step = float(state["loss"]), int(state["step"])


def predict_batch(pipeline: AlignPipeline, batch: dict, cached: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted, target) latents of a batch; a cached batch carries both VAEs' latents (no encoder runs)."""
    images = batch.get("image")
    if cached:
        return pipeline.predict(images, batch[pipeline.source_key]), batch[pipeline.target_key]
    return pipeline.predict(images), pipeline.encode_target(images)


def training_data(images: ImageFolderDataset, pipeline: AlignPipeline, opts, run: TrainingRun,
                  split: str) -> Dataset:
    """The image folder itself, or its latent cache (built on the main process while the others wait)."""
    if not opts.cache_latents:
        return images
    root = Path(opts.latent_cache_dir) if opts.latent_cache_dir else run.output_dir / "latent_cache"
    with run.accelerator.main_process_first():
        return load_or_build_latent_cache(images, pipeline, root / split, batch_size=opts.eval_batch_size,
                                          num_workers=run.opts.dataloader_num_workers)


def check_resolution(pipeline: AlignPipeline, resolution: int) -> None:
    factor = max(vae_downsample_factor(vae) for vae in pipeline.vaes.values())
    if resolution % factor:
        raise ConfigError(f"--resolution {resolution} is not a multiple of the VAEs' downsampling factor {factor}")


def build_loaders(opts, train_opts: TrainingOptions, pipeline: AlignPipeline, run: TrainingRun):
    """Training loader, eval loader (None without --eval_data_dir) and the images the grids show."""
    acc = run.accelerator
    ranks = {"rank": acc.process_index, "world_size": acc.num_processes,
             "num_workers": train_opts.dataloader_num_workers}
    train_images = build_image_dataset(opts.train_data_dir, opts.dataset_type, opts.resolution)
    loader = ResumableLoader(training_data(train_images, pipeline, opts, run, "train"), opts.train_batch_size,
                             seed=train_opts.seed, **ranks)
    if not opts.eval_data_dir:
        return loader, None, train_images
    eval_images = build_image_dataset(opts.eval_data_dir, opts.dataset_type, opts.resolution)
    eval_loader = ResumableLoader(training_data(eval_images, pipeline, opts, run, "eval"), opts.eval_batch_size,
                                  shuffle=False, drop_last=False, **ranks)
    return loader, eval_loader, eval_images


class AlignTrainer:
    """The evaluation, visualisation and export steps around the runtime's loop."""

    def __init__(self, run: TrainingRun, pipeline: AlignPipeline, opts, eval_loader, cached: bool,
                 visual_source: ImageFolderDataset):
        self.run, self.pipeline, self.opts = run, pipeline, opts
        self.eval_loader, self.cached, self.visual_source = eval_loader, cached, visual_source
        self.best = BestEval()
        run.register_state("best_eval", self.best)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Eval loss, latent MSE/cosine and channel statistics over the eval set, each image once on one rank."""
        acc, pipeline = self.run.accelerator, self.pipeline
        pipeline.module.eval()
        metrics = LatentMetrics(pipeline.target_vae.config.latent_channels, self.run.device, pipeline.loss_type,
                                pipeline.loss_weight)
        for batch in self.eval_loader:
            metrics.update(*predict_batch(pipeline, send_to_device(batch, self.run.device), self.cached))
        pipeline.module.train()
        stats = metrics.compute(lambda t: acc.reduce(t, reduction="sum"))
        headline = {"eval/loss": stats["loss"], "eval/latent_mse": stats["latent_mse"],
                    "eval/latent_cosine": stats["latent_cosine"]}
        logger.info("step %d: %s", self.run.step, " ".join(f"{k}={v:.4g}" for k, v in headline.items()))
        self.run.metrics.log({**headline, **channel_scalars(stats, "eval_latent/")}, self.run.step)  # file + trackers
        if stats["loss"] < self.best.loss:
            self.best.loss, self.best.step = stats["loss"], self.run.step
            eval_summary = {k: v for k, v in stats.items() if not isinstance(v, list)}
            self.export("best", eval=eval_summary)
        return stats

    @torch.no_grad()
    def visualize(self) -> None:
        """Comparison and latent-channel grids of the first eval (else training) images (PNG + TensorBoard)."""
        pipeline, run = self.pipeline, self.run
        count = min(self.opts.num_visualize_samples, len(self.visual_source))
        images = torch.stack([self.visual_source[i]["image"] for i in range(count)])
        pipeline.module.eval()
        grids = alignment_grids(pipeline, images)
        pipeline.module.train()
        if not run.is_main:
            return
        for name, grid in grids.items():
            save_png(grid, run.output_dir / "visualizations" / f"{name}_step{run.step:07d}.png")
            run.metrics.log_images(f"align/{name}", grid.unsqueeze(0), run.step)

    def export(self, name: str, **extra) -> None:
        config = export_config(self.pipeline, self.opts.resolution, step=self.run.step, **extra)
        self.run.export(self.pipeline.module, config, self.run.output_dir / name)
