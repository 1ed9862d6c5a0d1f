"""Evaluate an exported alignment module (``final/`` or ``best/`` of a training run).

    python scripts/eval_align.py --checkpoint outputs/align_sd15_to_flux/best \\
        --eval_data_dir data/align/eval --output_dir outputs/align_eval --save_visualizations

Loads the export (``model.safetensors`` + ``config.json``, which names both VAEs), encodes every
eval image with both VAEs, predicts the target latent and decodes it with the target VAE.
Writes ``<output_dir>/metrics.json``:

    latent                               MSE, cosine similarity, loss, per-channel mean/std
    aligned_vs_original                  PSNR / SSIM / LPIPS of the decoded prediction vs the image
    aligned_vs_target_reconstruction     ... vs the target VAE's own reconstruction (alignment error alone)
    target_reconstruction_vs_original    the target VAE's ceiling
    source_reconstruction_vs_original    the source VAE, for reference

PSNR/SSIM are on images in [0, 1]. ``lpips_weights`` names the LPIPS backbone's file, or
``random (seed 0)`` when none was found (offline without ``--lpips_weights`` or
``python download_models.py --models lpips_alex``): LPIPS then uses a backbone built from that fixed seed,
comparable between runs but not with published LPIPS (``lpips_pretrained_backbone`` is then false). ``--save_visualizations`` writes the comparison and
latent-channel grids of the first ``--num_visualize_samples`` images to ``visualizations/``.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from omniflow.data.layouts import DATASET_TYPES
from omniflow.runtime.errors import ConfigError, run_main
from omniflow.runtime.options import parse_options

logger = logging.getLogger("omniflow")

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "float32": "float32"}  # --precision -> torch dtype name
# metrics.json section -> (view compared, reference view); "target"/"source" are resolved per direction
PAIRS = {"aligned_vs_original": ("aligned", "original"),
         "aligned_vs_target_reconstruction": ("aligned", "target"),
         "target_reconstruction_vs_original": ("target", "original"),
         "source_reconstruction_vs_original": ("source", "original")}


@dataclass
class EvalOptions:
    checkpoint: Optional[str] = field(default=None, metadata={
        "help": "exported module: a final/ or best/ folder of a training run, or its model.safetensors"})
    eval_data_dir: Optional[str] = field(default=None, metadata={"help": "folder of evaluation images"})
    output_dir: str = field(default="outputs/align_eval", metadata={"help": "where metrics.json and grids go"})
    save_visualizations: bool = field(default=False, metadata={"help": "write comparison and latent grids"})
    num_visualize_samples: int = field(default=8, metadata={"help": "images in the grids"})
    dataset_type: str = field(default="default", metadata={"help": "image folder layout", "choices": list(DATASET_TYPES)})
    resolution: Optional[int] = field(default=None, metadata={"help": "image size (default: the training resolution)"})
    batch_size: int = field(default=8, metadata={"help": "images per batch"})
    num_workers: int = field(default=0, metadata={"help": "data loading worker processes"})
    precision: str = field(default="float32", metadata={"help": "dtype of the frozen VAEs", "choices": list(DTYPES)})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when available), cpu or cuda",
                                                  "choices": ["auto", "cpu", "cuda"]})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Hugging Face Hub cache directory"})
    lpips_net: str = field(default="alex", metadata={"help": "LPIPS backbone", "choices": ["alex", "vgg"]})
    lpips_weights: Optional[str] = field(default=None, metadata={
        "help": "torchvision alexnet/vgg16 state dict for LPIPS (else torch hub's cache or a download)"})

    def validate(self) -> None:
        for name in ("checkpoint", "eval_data_dir"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        if self.batch_size < 1 or self.num_visualize_samples < 0:
            raise ConfigError("--batch_size must be >= 1 and --num_visualize_samples >= 0")


def evaluate(opts: EvalOptions) -> dict:
    # Imported once the flags are valid: --help and a wrong flag answer without loading torch.
    import torch
    from torch.utils.data import DataLoader

    from omniflow.data.images import build_image_dataset
    from omniflow.metrics.image import build_lpips
    from omniflow.models.align import load_aligned_pipeline
    from omniflow.models.align_report import ImagePairMetrics, LatentMetrics, alignment_grids, alignment_views, save_png

    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    torch.set_grad_enabled(False)  # an evaluation: no gradients anywhere in this process
    device = torch.device("cuda" if opts.device != "cpu" and torch.cuda.is_available() else "cpu")
    pipeline, export = load_aligned_pipeline(opts.checkpoint, opts.cache_dir, getattr(torch, DTYPES[opts.precision]))
    pipeline.to(device).module.eval()
    resolution = opts.resolution or export["resolution"]
    dataset = build_image_dataset(opts.eval_data_dir, opts.dataset_type, resolution)
    loader = DataLoader(dataset, batch_size=opts.batch_size, num_workers=opts.num_workers)
    lpips = build_lpips(opts.lpips_net, opts.lpips_weights, input_range=(0.0, 1.0)).to(device)
    latents = LatentMetrics(pipeline.target_vae.config.latent_channels, device, pipeline.loss_type,
                            pipeline.loss_weight)
    pairs = {name: ImagePairMetrics(lpips) for name in PAIRS}
    roles = {"target": f"{pipeline.target_key}_reconstruction", "source": f"{pipeline.source_key}_reconstruction"}
    for batch in loader:
        views, pred, target = alignment_views(pipeline, batch["image"])
        latents.update(pred, target)
        for name, (a, b) in PAIRS.items():
            pairs[name].update(views[roles.get(a, a)], views[roles.get(b, b)])
        logger.info("evaluated %d/%d images", pairs["aligned_vs_original"].count, len(dataset))
    if opts.save_visualizations and opts.num_visualize_samples:
        images = torch.stack([dataset[i]["image"] for i in range(min(opts.num_visualize_samples, len(dataset)))])
        for name, grid in alignment_grids(pipeline, images).items():
            save_png(grid, Path(opts.output_dir) / "visualizations" / f"{name}.png")
    return {"checkpoint": str(opts.checkpoint), "eval_data_dir": str(opts.eval_data_dir), "resolution": resolution,
            "training_step": export.get("step"), "pipeline": export["pipeline"], "options": asdict(opts),
            "latent": latents.compute(), **{name: m.compute() for name, m in pairs.items()},
            "lpips_pretrained_backbone": lpips.pretrained_backbone, "lpips_weights": lpips.weights}


def main() -> None:
    opts = parse_options(EvalOptions, description="Evaluate an exported VAE alignment module.")
    from omniflow.runtime.tracking import setup_logging

    setup_logging(opts.output_dir, is_main=True, log_name="eval.log")
    results = evaluate(opts)
    path = Path(opts.output_dir) / "metrics.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)
    summary = {name: results[name] for name in PAIRS}
    logger.info("latent mse %.5g cosine %.4f; %s; written to %s", results["latent"]["latent_mse"],
                results["latent"]["latent_cosine"], json.dumps(summary), path)


if __name__ == "__main__":
    run_main(main)
