"""Training throughput of the text decoder head job: samples/s, tokens/s and peak memory.

    python benchmarks/bench_text.py                      # CPU: the tiny OmniFlow and the embedded sample data
    python benchmarks/bench_text.py --model_path models/OmniFlow-v0.5 --batch_sizes 8 16 32   # CUDA, bf16

One step = what train_text.py does per batch: frozen transformer forward (no gradient), head stack,
teacher-forced frozen decoder with gradients into the head, AdamW step. Data are real examples
(sample photos and Sonnet lines) already decoded; the timing excludes data loading.
Prints a table (markdown) for BENCHMARKS.md.
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from omniflow.data.sample_text import write_sample_text_data  # noqa: E402
from omniflow.data.text import DataConfig, build_train_dataset, collate_examples  # noqa: E402
from omniflow.models.text_heads import TextHeadOptions  # noqa: E402
from omniflow.text_job.model import TextJobModel  # noqa: E402


def sample_batches(root: Path, batch_size: int, count: int) -> list[dict]:
    folders = write_sample_text_data(root / "data")
    config = DataConfig.from_dict({"datasets": [
        {"name": "photos", "task": "image_to_text", "source": str(folders["photos"])},
        {"name": "sonnets", "task": "text", "source": str(folders["shakespeare"])}], "image_size": 64})
    dataset = build_train_dataset(config)
    return [collate_examples([dataset[(i * batch_size + j) % len(dataset)] for j in range(batch_size)])
            for i in range(count)]


def bench(job: TextJobModel, batches: list[dict], warmup: int, device) -> dict:
    stack = job.new_head_stack(TextHeadOptions(use_text_decoder_head=True)).to(device)
    optimizer = torch.optim.AdamW([p for p in stack.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    samples = tokens = 0
    for i, batch in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, samples, tokens = time.perf_counter(), 0, 0
        with autocast:
            out = job.head_terms(stack, batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        samples, tokens = samples + len(batch["text"]), tokens + out.num_tokens
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    steps = len(batches) - warmup
    return {"steps_per_min": 60 * steps / elapsed, "samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=None, help="OmniFlow folder; default: build the tiny one")
    parser.add_argument("--models_dir", default="models")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[8])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_path, models_dir = args.model_path, args.models_dir
        if model_path is None:
            subprocess.run([sys.executable, str(REPO / "scripts/make_tiny_omniflow.py"), "--output_dir", str(tmp / "m")],
                           check=True, capture_output=True)
            model_path, models_dir = tmp / "m/OmniFlow-tiny", tmp / "m/models"
        job = TextJobModel.load(model_path, {"text", "image_to_text"}, models_dir=models_dir, training=True,
                                device=device, dtype=dtype)
        print(f"model {model_path}, device {device}, dtype {dtype}, {args.steps} timed steps after {args.warmup}")
        print("| batch | steps/min | samples/s | tokens/s | peak GPU mem (GiB) |\n|---|---|---|---|---|")
        for batch_size in args.batch_sizes:
            result = bench(job, sample_batches(tmp, batch_size, args.steps + args.warmup), args.warmup, device)
            print(f"| {batch_size} | {result['steps_per_min']:.0f} | {result['samples_per_s']:.1f} | "
                  f"{result['tokens_per_s']:.0f} | {result['peak_mem_gb']:.2f} |")


if __name__ == "__main__":
    main()
