"""Training speed of the VQGAN tokenizer: steps/s, images/s and peak GPU memory per precision variant.

    python benchmarks/bench_vq.py                       # CUDA: f16 VQGAN, 256 px, batch 12
    python benchmarks/bench_vq.py --out bench_vq.json   # also write the results as JSON
    python benchmarks/bench_vq.py --device cpu          # the CPU variant (tiny config, 32 px), 1 thread

Each variant is timed ``--repeats`` times (a fresh model each time); the table shows the median and range.
Offline: the LPIPS backbone is random unless its ImageNet weights are in the torch hub cache (speed does not
depend on the values).

One full training step as in ``scripts/train_vqgan.py``: autoencoder forward, L1 + LPIPS + VQ +
adaptive-weight PatchGAN generator loss, backward, clipped Adam step; the discriminator trains
every 3rd step (active from step 0 here, so timed windows are multiples of 3 steps). The batch
is real photos already on the device: data loading is not timed. Variants, each on a fresh
model built from the same seed: ``fp32`` (eager), ``bf16_cl`` (bf16 autocast + channels_last),
``bf16_cl_compile`` (+ ``torch.compile`` of encoder, decoder and discriminator). On a CPU it runs
the tiny f16 config at 32 px instead and says so: those numbers only show that the code runs.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from omniflow.data.images import SAMPLE_PHOTOS  # noqa: E402
from omniflow.runtime.benchmarking import Spread, add_benchmark_flags, benchmark_settings  # noqa: E402
from omniflow.models.vq.params import build_model, build_training_loss, load_param_json  # noqa: E402

VARIANTS = ("fp32", "bf16_cl", "bf16_cl_compile")


def photo_batch(batch_size: int, size: int, device: torch.device) -> torch.Tensor:
    """``batch_size`` real photos from scikit-image, resized, as (B, 3, size, size) in [-1, 1]."""
    import skimage.data
    from PIL import Image

    images = []
    for i in range(batch_size):
        photo = np.asarray(getattr(skimage.data, SAMPLE_PHOTOS[i % len(SAMPLE_PHOTOS)])())
        photo = np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo[..., :3]
        side = min(photo.shape[:2])
        crop = Image.fromarray(np.ascontiguousarray(photo[:side, :side])).resize((size, size), Image.Resampling.BICUBIC)
        images.append(np.asarray(crop))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.to(device)


def build(params, variant: str, device: torch.device):
    torch.manual_seed(0)
    params = copy.deepcopy(params)
    if params.uses_taming_loss:
        params.model_args["lossconfig"].setdefault("params", {})["disc_start"] = 0
    else:
        params.train["disc_start"] = 0
    model = build_model(params).to(device)
    loss_fn = build_training_loss(params, model.in_channels).to(device)
    if variant != "fp32":
        model.to(memory_format=torch.channels_last)
        loss_fn.to(memory_format=torch.channels_last)
    if variant.endswith("compile"):
        model.encoder, model.decoder = torch.compile(model.encoder), torch.compile(model.decoder)
        loss_fn.discriminator = torch.compile(loss_fn.discriminator)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.9))
    disc_optimizer = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=1e-5, betas=(0.5, 0.9))
    return model, loss_fn, optimizer, disc_optimizer


def train_step(model, loss_fn, optimizer, disc_optimizer, x: torch.Tensor, step: int, autocast) -> None:
    with autocast():
        vq_loss, recon, _, _ = model(x)
        loss, _ = loss_fn.generator_loss(x, recon, vq_loss, step, model.get_last_layer())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    if loss_fn.discriminator_step_due(step):
        with autocast():
            d_loss, _ = loss_fn.discriminator_loss(x, recon, step)
        disc_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        disc_optimizer.step()


def measure(params, variant: str, x: torch.Tensor, warmup: int, steps: int) -> dict:
    device = x.device
    model, loss_fn, optimizer, disc_optimizer = build(params, variant, device)
    if variant != "fp32":
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = (contextlib.nullcontext if variant == "fp32"
                else lambda: torch.autocast(device.type, dtype=torch.bfloat16))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in range(warmup):
        train_step(model, loss_fn, optimizer, disc_optimizer, x, step, autocast)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
        train_step(model, loss_fn, optimizer, disc_optimizer, x, step, autocast)
    sync()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del model, loss_fn, optimizer, disc_optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"variant": variant, "ms_per_step": 1000 * seconds, "steps_per_s": 1 / seconds,
            "images_per_s": len(x) / seconds, "peak_mem_gib": peak}


def repeated(params, variant: str, x: torch.Tensor, warmup: int, steps: int, repeats: int) -> dict:
    """Medians of ``repeats`` runs of :func:`measure`, with the range of ms/step."""
    runs = [measure(params, variant, x, warmup, steps) for _ in range(repeats)]
    ms = Spread.of(r["ms_per_step"] for r in runs)
    seconds = ms.median / 1000
    return {"variant": variant, "ms_per_step": ms.median, "ms_per_step_range": [ms.low, ms.high],
            "steps_per_s": 1 / seconds, "images_per_s": len(x) / seconds, "repeats": repeats,
            "peak_mem_gib": None if runs[0]["peak_mem_gib"] is None else max(r["peak_mem_gib"] for r in runs)}


def table(results: list[dict]) -> str:
    base = results[0]["steps_per_s"]
    lines = ["| variant | ms/step, median (range) | steps/s | img/s | peak GPU mem (GiB) | speed-up vs fp32 |",
             "|---|---|---|---|---|---|"]
    for r in results:
        peak = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        low, high = r["ms_per_step_range"]
        lines.append(f"| {r['variant']} | {r['ms_per_step']:.1f} ({low:.1f}-{high:.1f}) | {r['steps_per_s']:.2f} "
                     f"| {r['images_per_s']:.1f} | {peak} | {r['steps_per_s'] / base:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto", help="cpu: the CPU variant even with a GPU")
    parser.add_argument("--config", help="param.json (default: configs/vq/vqgan_f16.json; CPU: its tiny variant)")
    parser.add_argument("--image_size", type=int, help="default 256 (CPU: 32)")
    parser.add_argument("--batch_size", type=int, help="default 12 (CPU: 4)")
    parser.add_argument("--warmup", type=int, help="untimed steps, compilation included (default 6, CPU: 3)")
    parser.add_argument("--steps", type=int, help="timed steps, a multiple of 3 (default 30, CPU: 6)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="default: all (CPU: no compile)")
    parser.add_argument("--out", help="write the results as JSON here")
    add_benchmark_flags(parser)
    args = parser.parse_args()
    with benchmark_settings(args.threads):
        run(args)


def run(args: argparse.Namespace) -> None:
    cuda = torch.cuda.is_available() and args.device != "cpu"
    defaults = ({"config": "configs/vq/vqgan_f16.json", "image_size": 256, "batch_size": 12, "warmup": 6,
                 "steps": 30, "variants": list(VARIANTS)} if cuda else
                {"config": "configs/vq/tiny/vqgan_f16.json", "image_size": 32, "batch_size": 4, "warmup": 3,
                 "steps": 6, "variants": list(VARIANTS[:2])})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, str(REPO / value) if key == "config" else value)
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    params = load_param_json(args.config)
    params.data["image_size"] = args.image_size
    x = photo_batch(args.batch_size, args.image_size, device)
    machine = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
                                                          f"{torch.get_num_threads()} threads)"
    print(f"# bench_vq: {os.path.relpath(args.config, REPO)} at {args.image_size} px, batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, {args.repeats} repeats, on {machine}")
    if not cuda:
        print("# CPU run (no CUDA device or --device cpu): tiny config; these numbers only show that the step runs")
    results = [repeated(params, variant, x, args.warmup, args.steps, args.repeats) for variant in args.variants]
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps({"config": args.config, "image_size": args.image_size,
                                              "batch_size": args.batch_size, "machine": machine,
                                              "threads": args.threads,
                                              "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
