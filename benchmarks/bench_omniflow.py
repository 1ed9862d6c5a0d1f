"""OmniFlow benchmark: parameter counts of the release-sized model and the transformer's forward cost.

    python benchmarks/bench_omniflow.py                # CUDA: full size, bf16, batch 8; CPU: tiny config
    python benchmarks/bench_omniflow.py --json_out bench.json

Parameter counts come from the assumed OmniFlow-v0.5 configs (``configs/omniflow_v05``) built on the meta
device (no memory). On CUDA the full-size transformer is materialised with random weights in bf16 and
one image->text denoising forward (512 px image at t=0, 32 noisy text rows, audio absent at t=1000) is
timed per batch, with peak memory. On CPU the tiny config is timed instead. The forward is timed ``--repeats``
times ``--iters`` forwards (one torch thread unless ``--threads``, offline): median and range.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import LlamaConfig, T5Config, T5EncoderModel

from omniflow.models.omniflow.text_vae import OmniFlowTextVAE
from omniflow.models.omniflow.transformer import AUDIO_LATENT_SHAPE, OmniFlowTransformer
from omniflow.runtime.benchmarking import Spread, add_benchmark_flags, benchmark_settings

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--full_config_dir", type=Path, default=REPO / "configs" / "omniflow_v05",
                        help="release-sized configs (transformer.json, text_vae.json, flan_t5_large_encoder.json)")
    parser.add_argument("--tiny_config_dir", type=Path, default=REPO / "configs" / "omniflow_tiny",
                        help="tiny configs, timed when there is no GPU")
    parser.add_argument("--batch_size", type=int, default=8, help="samples per forward")
    parser.add_argument("--image_size", type=int, default=512, help="image side in pixels (latents are 1/8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards first")
    parser.add_argument("--iters", type=int, default=5, help="timed forwards")
    parser.add_argument("--json_out", type=Path, default=None, help="also write the results as JSON here")
    add_benchmark_flags(parser)
    return parser.parse_args(argv)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(config_dir: Path) -> dict[str, int]:
    with init_empty_weights():
        text_vae = OmniFlowTextVAE(LlamaConfig.from_json_file(config_dir / "text_vae.json"))
        transformer = OmniFlowTransformer.from_transformer_config(
            OmniFlowTransformer.load_config(config_dir / "transformer.json"), text_vae.vae_dim
        )
        t5 = T5EncoderModel(T5Config.from_json_file(config_dir / "flan_t5_large_encoder.json"))
    decoder = count(text_vae.model) + count(text_vae.lm_head)
    return {
        "transformer (MMDiT)": count(transformer),
        "text VAE decoder (Llama)": decoder,
        "text VAE Q-Former + projections": count(text_vae) - decoder,
        "T5 encoder (flan-t5-large)": count(t5),
    }


def inputs(transformer: OmniFlowTransformer, batch: int, image_size: int, device, dtype) -> dict:
    cfg = transformer.config
    latent = image_size // 8
    text = torch.zeros(batch, 32, cfg.joint_attention_dim, device=device, dtype=dtype)
    text[..., : transformer.text_latent_dim] = torch.randn(batch, 32, transformer.text_latent_dim, device=device)
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, latent, latent, device=device, dtype=dtype),
        encoder_hidden_states=text,
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, device=device, dtype=dtype),
        timestep=torch.zeros(batch, device=device),
        timestep_text=torch.full((batch,), 500.0, device=device),
        timestep_audio=torch.full((batch,), 1000.0, device=device),
        audio_hidden_states=torch.randn(batch, *AUDIO_LATENT_SHAPE, device=device, dtype=dtype),
    )


def time_forward(config_dir: Path, args, device: torch.device, dtype: torch.dtype, image_size: int) -> dict:
    text_vae_config = json.loads((config_dir / "text_vae.json").read_text())
    with torch.device(device):
        transformer = OmniFlowTransformer.from_transformer_config(
            OmniFlowTransformer.load_config(config_dir / "transformer.json"), text_vae_config["vae_config"]["vae_dim"]
        )
    # Parameters are created on the device; the sin-cos position buffers are built on the CPU, so move them too.
    transformer = torch.nn.Module.to(transformer, device=device, dtype=dtype).eval()
    batch = inputs(transformer, args.batch_size, image_size, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(args.iters):
            transformer(**batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / args.iters

    with torch.inference_mode():
        for _ in range(args.warmup):
            transformer(**batch)
        seconds = Spread.of(timed() for _ in range(args.repeats))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "config": config_dir.name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "batch": args.batch_size, "image_px": image_size,
        "ms_per_forward": round(seconds.median * 1000, 2),
        "ms_range": f"{seconds.low * 1000:.2f}-{seconds.high * 1000:.2f}", "peak_gib": "-" if peak is None else round(peak, 2),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with benchmark_settings(args.threads):
        run(args)


def run(args: argparse.Namespace) -> None:
    counts = parameter_counts(args.full_config_dir)
    print(f"| component ({args.full_config_dir.name}) | parameters |\n|---|---:|")
    for name, n in counts.items():
        print(f"| {name} | {n / 1e6:,.1f} M |")
    print(f"| total | {sum(counts.values()) / 1e6:,.1f} M |\n")
    if torch.cuda.is_available():
        timing = time_forward(args.full_config_dir, args, torch.device("cuda"), torch.bfloat16, args.image_size)
    else:
        tiny_side = json.loads((args.tiny_config_dir / "transformer.json").read_text())["sample_size"] * 8
        timing = time_forward(args.tiny_config_dir, args, torch.device("cpu"), torch.float32, tiny_side)
    print("| config | device | dtype | batch | image px | ms / forward, median (range) | peak GiB |\n"
          "|---|---|---|---:|---:|---:|---:|")
    print("| {config} | {device} | {dtype} | {batch} | {image_px} | {ms_per_forward} ({ms_range}) | {peak_gib} |"
          .format(**timing))
    if args.json_out:
        args.json_out.write_text(json.dumps({"parameters": counts, "forward": timing}, indent=2) + "\n")


if __name__ == "__main__":
    main()
