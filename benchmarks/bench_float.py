"""FLOAT speed: FMT training throughput (samples/s, MFU) and generation speed.

On CUDA: the release size in bf16. Training runs the FMT + audio projection on random
windows (10 previous + 50 current frames) with the rectified-flow loss, AdamW and backward;
FLOPs are counted once with ``torch.utils.flop_counter`` and MFU is achieved FLOP/s over the
GPU's dense bf16 peak. Generation runs the whole FLOAT (wav2vec2 features, emotion, windowed
guided sampling at nfe 10, motion decoding) on random weights and reports seconds of 25 fps
video per second of compute. On CPU the same measurements run at a small size (``--config
tiny`` by default) in fp32, and the output says so. Both are timed ``--repeats`` times (one torch thread
unless ``--threads``); the table shows medians and ranges, ``--output`` writes every figure as JSON.

    python benchmarks/bench_float.py                 # CUDA: release size, bf16
    python benchmarks/bench_float.py --config small  # any device
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Wav2Vec2Config, Wav2Vec2Model

from omniflow.flow import ConditionDropout, RectifiedFlow
from omniflow.models.float import (EMOTION_LABELS, FLOAT, FloatConfig, FloatMotionGenerator, SpeechEmotionClassifier,
                                   release_backbone_configs)
from omniflow.runtime.benchmarking import Spread, add_benchmark_flags, benchmark_settings, peak_bf16_flops


def backbone_configs(preset: str) -> tuple[Wav2Vec2Config, Wav2Vec2Config]:
    """The released wav2vec2 architectures, or small random stand-ins for the small presets."""
    if preset == "release":
        return release_backbone_configs()
    hidden = 64 if preset == "small" else 32
    labels = dict(enumerate(EMOTION_LABELS))
    audio = Wav2Vec2Config(hidden_size=hidden, num_hidden_layers=12, num_attention_heads=4, intermediate_size=hidden * 2,
                           conv_dim=(64,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=16)
    emotion = Wav2Vec2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=16,
                             num_labels=len(labels), id2label=labels, label2id={v: k for k, v in labels.items()})
    return audio, emotion


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_batch(config: FloatConfig, batch: int, device) -> dict[str, torch.Tensor]:
    p, n = config.num_prev_frames, config.window
    return {"motion": torch.randn(batch, n, config.dim_w, device=device),
            "audio": torch.randn(batch, n, config.audio_feature_dim, device=device),
            "prev_motion": torch.randn(batch, p, config.dim_w, device=device),
            "prev_audio": torch.randn(batch, p, config.audio_feature_dim, device=device),
            "has_prev": torch.ones(batch, device=device), "reference_motion": torch.randn(batch, config.dim_w, device=device),
            "emotion": torch.softmax(torch.randn(batch, config.dim_e, device=device), -1)}


def bench_training(config: FloatConfig, batch: int, steps: int, device, dtype, repeats: int) -> dict:
    model = FloatMotionGenerator(config).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    flow, dropout = RectifiedFlow(), ConditionDropout.for_float()
    data = random_batch(config, batch, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step():
        with autocast:
            loss = model(flow, dropout, data)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    for _ in range(2):  # warm-up (kernels, allocator)
        step()

    def timed() -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        return (time.perf_counter() - start) / steps

    step_seconds = Spread.of(timed() for _ in range(repeats))
    seconds = step_seconds.median
    flops = counter.get_total_flops()
    out = {"batch": batch, "frames_per_sample": config.seq_len, "step_seconds": step_seconds.as_dict(),
           "samples_per_s": Spread(batch / seconds, batch / step_seconds.high, batch / step_seconds.low).as_dict(),
           "tflop_per_step": flops / 1e12, "achieved_tflops": flops / seconds / 1e12,
           "trained_parameters_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6}
    peak = peak_bf16_flops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    if peak is not None and dtype == torch.bfloat16:
        out["mfu"] = flops / seconds / peak
    return out


@torch.no_grad()
def bench_generation(config: FloatConfig, preset: str, seconds_of_audio: float, device, dtype, repeats: int,
                     render_batch_size: int) -> dict:
    audio_cfg, emotion_cfg = backbone_configs(preset)
    model = FLOAT(config, Wav2Vec2Model(audio_cfg), SpeechEmotionClassifier(emotion_cfg)).to(device).eval()
    image = torch.rand(1, 3, config.input_size, config.input_size, device=device) * 2 - 1
    audio = torch.randn(1, int(seconds_of_audio * config.sampling_rate), device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    frames = 0

    def timed() -> float:
        nonlocal frames
        sync(device)
        start = time.perf_counter()
        frames = model.inference(image, audio, nfe=10, seed=0, render_batch_size=render_batch_size)["video"].shape[1]
        sync(device)
        return time.perf_counter() - start

    with autocast:
        model.inference(image, audio[:, : config.sampling_rate], nfe=10, seed=0)  # warm-up
        compute = Spread.of(timed() for _ in range(repeats))
    video = frames / config.fps
    return {"video_seconds": video, "frames": frames, "compute_seconds": compute.as_dict(), "nfe": 10,
            "render_batch_size": render_batch_size,
            "video_seconds_per_compute_second": Spread(video / compute.median, video / compute.high,
                                                       video / compute.low).as_dict()}


def table(result: dict) -> str:
    train, gen = result["training"], result["generation"]
    mfu = f"{train['mfu']:.1%}" if "mfu" in train else "n/a"
    samples, video = Spread(**train["samples_per_s"]), Spread(**gen["video_seconds_per_compute_second"])
    return "\n".join([
        "| config | device | dtype | train batch | frames / sample | train samples/s, median (range) | TFLOP / step "
        "| MFU | generation: video s per compute s, median (range) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {result['config']} | {result['device']} | {result['dtype']} | {train['batch']} | "
        f"{train['frames_per_sample']} | {samples.format('.3g')} | {train['tflop_per_step']:.3g} | {mfu} | "
        f"{video.format('.3g')} ({gen['video_seconds']:.2f} s of video) |"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    cuda = torch.cuda.is_available()
    parser.add_argument("--config", default="release" if cuda else "tiny", choices=["release", "small", "tiny"],
                        help="FLOAT size preset (default: release on CUDA, tiny on CPU)")
    parser.add_argument("--batch_size", type=int, default=8 if cuda else 4, help="training windows per step")
    parser.add_argument("--steps", type=int, default=20 if cuda else 5, help="timed training steps")
    parser.add_argument("--audio_seconds", type=float, default=10.0 if cuda else 2.0, help="speech length generated")
    parser.add_argument("--render_batch_size", type=int, default=16 if cuda else 1,
                        help="frames per motion-decoder call in generation (default: 16 on CUDA, 1 on CPU)")
    parser.add_argument("--output", default=None, help="also write the results to this JSON file")
    add_benchmark_flags(parser)
    args = parser.parse_args(argv)
    with benchmark_settings(args.threads):
        return run(args, cuda)


def run(args: argparse.Namespace, cuda: bool) -> dict:
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = FloatConfig.preset(args.config)
    if args.config != "release":  # the stand-in wav2vec2 stacks 12 layers of its width
        config = dataclasses.replace(config, audio_feature_dim=12 * backbone_configs(args.config)[0].hidden_size)
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads)", "config": args.config, "dtype": str(dtype).split(".")[-1],
              "repeats": args.repeats,
              "training": bench_training(config, args.batch_size, args.steps, device, dtype, args.repeats),
              "generation": bench_generation(config, args.config, args.audio_seconds, device, dtype, args.repeats,
                                             args.render_batch_size)}
    if not cuda:
        result["note"] = (f"no CUDA device: the {args.config} configuration in fp32 on CPU, not the release size; "
                          "MFU is reported on CUDA only")
    print(table(result))
    if "note" in result:
        print(result["note"])
    if args.output:
        with open(args.output, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
