"""Text-head training throughput: the step of train_text.py (frozen OmniFlow forward without gradients,
head, teacher-forced frozen decoder with gradients to the head, AdamW), timed per batch size.

    python benchmarks/bench_text.py                 # CPU: the tiny config; CUDA: also the full-size config
    python benchmarks/bench_text.py --batch_sizes 8 16 32 --json_out bench_text.json

Models have random weights: the tiny config (``configs/omniflow_tiny``, fp32) and, on CUDA, the assumed
release-sized OmniFlow-v0.5 (``configs/omniflow_v05``, bf16, decoder gradient checkpointing). Batches are
text-task batches of Sonnet sentences (pooled vector zero, image and audio absent at t = 1000), so the
image VAE and CLIP are not timed; the transformer's cost is that of image->text at the same image size.
Tokenizers are the tiny ones (trained here on Shakespeare), so target lengths differ from TinyLlama's;
tokens/s counts the scored target tokens. Each batch size is timed ``--repeats`` times ``--iters`` steps (one
torch thread unless ``--threads``, offline): medians, and the range of samples/s.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, T5Config, T5EncoderModel

from omniflow.data.sample_text import sonnet_sentences
from omniflow.models.omniflow.loading import OmniFlowComponents
from omniflow.models.omniflow.pipeline import OmniFlowPipeline
from omniflow.runtime.benchmarking import Spread, add_benchmark_flags, benchmark_settings, peak_bf16_flops
from omniflow.models.omniflow.layout import TINY_CONFIG_DIR
from omniflow.models.omniflow.scheduler import FlowMatchEulerScheduler
from omniflow.models.omniflow.text_vae import OmniFlowTextVAE
from omniflow.models.omniflow.tiny import shakespeare_lines, train_tokenizers
from omniflow.models.omniflow.transformer import OmniFlowTransformer
from omniflow.models.text_heads import TextHeadOptions
from omniflow.text_job.model import TextJobModel

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {  # name -> (config folder, T5 encoder config file)
    "omniflow_tiny": (TINY_CONFIG_DIR, "t5_encoder.json"),
    "omniflow_v05": (REPO / "configs" / "omniflow_v05", "flan_t5_large_encoder.json"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 16, 32], help="batch sizes to time")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--iters", type=int, default=5, help="timed steps per batch size")
    parser.add_argument("--json_out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None,
                        help="configs to time (default: omniflow_tiny on the CPU, and omniflow_v05 on CUDA)")
    add_benchmark_flags(parser)
    return parser.parse_args(argv)


def random_job(name: str, device: torch.device, dtype: torch.dtype) -> TextJobModel:
    """A frozen OmniFlow with random weights built from a config folder, wrapped for the text job."""
    config_dir, t5_file = CONFIGS[name]
    sizes = json.loads((TINY_CONFIG_DIR / "tokenizers.json").read_text())
    vae_tokenizer, t5_tokenizer, _ = train_tokenizers(shakespeare_lines(sizes["corpus_chars"]), sizes)
    with torch.device(device):
        text_vae = OmniFlowTextVAE(LlamaConfig.from_json_file(config_dir / "text_vae.json"))
        text_vae.attach_encoder(T5EncoderModel(T5Config.from_json_file(config_dir / t5_file)), t5_tokenizer)
        transformer = OmniFlowTransformer.from_transformer_config(
            OmniFlowTransformer.load_config(config_dir / "transformer.json"), text_vae.vae_dim)
    for module in (text_vae, transformer):  # position buffers are built on the CPU: move everything
        torch.nn.Module.to(module, device=device, dtype=dtype).eval().requires_grad_(False)
    parts = OmniFlowComponents(transformer=transformer, text_vae=text_vae, vae_tokenizer=vae_tokenizer,
                               scheduler=FlowMatchEulerScheduler())
    return TextJobModel(OmniFlowPipeline(parts), max_length=77)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


def time_training(job: TextJobModel, batch_size: int, args, sentences: list[str]) -> dict:
    device = job.device
    stack = job.new_head_stack(TextHeadOptions(use_text_decoder_head=True)).to(device).train()
    optimizer = torch.optim.AdamW([p for p in stack.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def steps(first: int, count: int) -> tuple[int, float]:
        """(scored tokens, seconds) of ``count`` training steps from step ``first``."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tokens, start = 0, time.perf_counter()
        for step in range(first, first + count):
            texts = [sentences[(step * batch_size + i) % len(sentences)] for i in range(batch_size)]
            with autocast:
                out = job.head_terms(stack, {"task": ["text"] * batch_size, "text": texts})
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += out.num_tokens
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return tokens, time.perf_counter() - start

    with FlopCounterMode(display=False) as counter:  # one step's FLOPs (it warms up too)
        steps(0, 1)
    flops = counter.get_total_flops()
    steps(1, max(args.warmup - 1, 0))
    runs = [steps(args.warmup + r * args.iters, args.iters) for r in range(args.repeats)]
    rate = Spread.of(batch_size * args.iters / seconds for _, seconds in runs)
    tokens_per_s = Spread.of(tokens / seconds for tokens, seconds in runs).median
    return {"batch": batch_size, "samples_per_s": round(rate.median, 2),
            "samples_per_s_range": [round(rate.low, 2), round(rate.high, 2)], "tokens_per_s": round(tokens_per_s, 1),
            "steps_per_min": round(60 * rate.median / batch_size, 1), "peak_gib": round(peak_memory_gib(device), 2),
            **mfu(flops, batch_size / rate.median, device)}


def mfu(flops: int, step_seconds: float, device: torch.device) -> dict:
    """TFLOP per step (counted by torch's FlopCounterMode) and, on a known GPU, model FLOP utilisation."""
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return {"tflop_per_step": flops / 1e12, "mfu": None if peak is None else round(flops / step_seconds / peak, 4)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with benchmark_settings(args.threads):
        run(args)


def run(args: argparse.Namespace) -> None:
    devices = {"omniflow_tiny": (torch.device("cpu"), torch.float32),
               "omniflow_v05": (torch.device("cuda"), torch.bfloat16)}
    names = args.configs or ["omniflow_tiny", *(["omniflow_v05"] if torch.cuda.is_available() else [])]
    runs = [(name, *devices[name]) for name in names]
    sentences = sonnet_sentences()
    results = []
    print("| config | device | dtype | batch | samples/s, median (range) | tokens/s | steps/min | TFLOP / step | MFU "
          "| peak memory GiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, device, dtype in runs:
        job = random_job(name, device, dtype)
        if device.type == "cuda":
            job.text_vae.enable_gradient_checkpointing()
            job.text_vae.model.train()
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        memory = "allocated" if device.type == "cuda" else "process RSS"
        for batch_size in args.batch_sizes:
            row = {"config": name, "device": label, "dtype": str(dtype).removeprefix("torch."), "memory": memory,
                   **time_training(job, batch_size, args, sentences)}
            results.append(row)
            low, high = row["samples_per_s_range"]
            shown = "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}"
            print("| {config} | {device} | {dtype} | {batch} | {samples_per_s} ({low}-{high}) | {tokens_per_s} | "
                  "{steps_per_min} | {tflop_per_step:.3g} | {shown} | {peak_gib} ({memory}) |".format(
                      **row, low=low, high=high, shown=shown), flush=True)
        del job
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
