"""Alignment training throughput (images/s) with and without the latent cache.

    python benchmarks/bench_align.py              # CUDA: SD1.5 -> FLUX VAEs, bf16, 512 px
    python benchmarks/bench_align.py --tiny       # the tiny test setting (the default without CUDA)

Both AutoencoderKLs are built from their config dicts with random weights (speed does not depend
on the values). Real photos (scikit-image's, resized) are read from a temporary folder. Each row
times optimizer steps of the alignment module after a warm-up (median of ``--repeats`` runs):
``images`` encodes every batch with both VAEs, ``latent cache`` reads the latents stored by
``build_latent_cache`` (whose one encoding pass is timed on its own, also ``--repeats`` times). Prints a
markdown table of medians and ranges; one torch thread unless ``--threads``; offline.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.utils import logging as diffusers_logging
from torch.utils.data import DataLoader

from omniflow.data.images import ImageFolderDataset, write_sample_images
from omniflow.data.latent_cache import build_latent_cache, open_latent_cache
from omniflow.models.align import AlignPipeline
from omniflow.runtime.benchmarking import Spread, add_benchmark_flags, benchmark_settings

_BLOCKS = {"block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
           "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "norm_num_groups": 32}
SD15_VAE = {**_BLOCKS, "latent_channels": 4, "scaling_factor": 0.18215, "sample_size": 512}
FLUX_VAE = {**_BLOCKS, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
            "use_quant_conv": False, "use_post_quant_conv": False, "sample_size": 1024}
_TINY_BLOCKS = {"block_out_channels": [16, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
                "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "norm_num_groups": 8}
TINY_VAE1 = {**_TINY_BLOCKS, "latent_channels": 4, "scaling_factor": 0.5}
TINY_VAE2 = {**_TINY_BLOCKS, "latent_channels": 16, "scaling_factor": 1.5, "shift_factor": 0.1}

SETTINGS = {
    "sd15_to_flux": {"vaes": (SD15_VAE, FLUX_VAE), "resolution": 512, "dtype": torch.bfloat16,
                     "module": {"hidden_channels": 64, "num_blocks": 2, "downsample_times": 3}},
    "tiny": {"vaes": (TINY_VAE1, TINY_VAE2), "resolution": 32, "dtype": torch.float32,
             "module": {"hidden_channels": 16, "num_blocks": 1, "downsample_times": 1}},
}


def build_pipeline(setting: dict, input_types: tuple[str, ...], device: torch.device) -> AlignPipeline:
    torch.manual_seed(0)
    vae1, vae2 = (AutoencoderKL(**config).to(device, setting["dtype"]) for config in setting["vaes"])
    return AlignPipeline(vae1, vae2, out_channels=vae2.config.latent_channels, input_types=input_types,
                         **setting["module"]).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def images_per_second(pipeline: AlignPipeline, dataset, batch_size: int, steps: int, warmup: int,
                      device: torch.device, dtype: torch.dtype, num_workers: int) -> float:
    """Optimizer steps over ``dataset`` (cycled); items with ``vae1``/``vae2`` latents skip the encoders."""
    optimizer = torch.optim.AdamW(pipeline.module.parameters(), lr=1e-4)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=num_workers,
                        persistent_workers=num_workers > 0)
    batches = (batch for _ in iter(int, 1) for batch in loader)  # endless
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items() if torch.is_tensor(v)}
        with autocast:
            loss = pipeline.training_loss(batch.get("image"), batch.get(pipeline.source_key),
                                          batch.get(pipeline.target_key))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def rows(pipeline: AlignPipeline, images: ImageFolderDataset, cache: Path, args, device: torch.device,
         dtype: torch.dtype, workers: int) -> list[tuple[str, Spread]]:
    """(data, images/s) for training from images, building the cache once, training from the cache."""
    def rate(data) -> Spread:
        return Spread.of(images_per_second(pipeline, data, args.batch_size, args.steps, args.warmup, device, dtype,
                                           workers) for _ in range(args.repeats))

    def build_rate(index: int) -> float:
        sync(device)
        start = time.perf_counter()
        build_latent_cache(images, pipeline, cache / str(index), batch_size=args.batch_size, num_workers=workers)
        sync(device)
        return len(images) / (time.perf_counter() - start)

    from_images = rate(images)
    build = Spread.of(build_rate(i) for i in range(args.repeats))
    from_cache = rate(open_latent_cache(cache / "0", images, pipeline))
    return [("images", from_images), ("latent cache", from_cache), ("(building the cache, once)", build)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--tiny", action="store_true", help="the tiny test setting (default without CUDA)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--num_workers", type=int, default=None, help="default: 4 on CUDA, 0 on CPU")
    parser.add_argument("--json_out", type=Path, default=None, help="also write the rows as JSON here")
    add_benchmark_flags(parser)
    args = parser.parse_args()
    with benchmark_settings(args.threads):
        run(args)


def run(args: argparse.Namespace) -> None:
    diffusers_logging.set_verbosity_error()  # its float32-modules note on .to(dtype) does not apply here
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = "tiny" if args.tiny or device.type == "cpu" else "sd15_to_flux"
    setting = SETTINGS[name]
    workers = args.num_workers if args.num_workers is not None else (4 if device.type == "cuda" else 0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    hardware = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU"
    print(f"setting {name}, {hardware}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{setting['resolution']} px, VAEs {str(setting['dtype']).removeprefix('torch.')}")
    print(f"{args.repeats} repeats of {args.steps} steps after {args.warmup} warm-up")
    print("| input_types | data | images/s, median (range) |\n|---|---|---|")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        write_sample_images(tmp, setting["resolution"], args.num_images)
        images = ImageFolderDataset(tmp, setting["resolution"])
        for input_types in (("image", "latent"), ("latent",)):
            pipeline = build_pipeline(setting, input_types, device)
            label = " ".join(input_types)
            cache = Path(tmp) / f"cache_{'_'.join(input_types)}"
            for data, value in rows(pipeline, images, cache, args, device, setting["dtype"], workers):
                print(f"| {label} | {data} | {value.format()} |")
                results.append({"setting": name, "device": hardware, "input_types": list(input_types), "data": data,
                                "images_per_s": value.as_dict()})
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
