"""Pieces of the FLOAT trainer (scripts/train_rectified_flow.py): the model to fine-tune, its optimizer and EMA,
seeded validation, samples and exports."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import send_to_device
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch.optim.swa_utils import AveragedModel

from ...data.core import ResumableLoader
from ...data.float_shards import FloatWindowDataset
from ...flow import ConditionDropout, RectifiedFlow
from ...runtime.errors import CheckpointError, ConfigError
from ...runtime.export import CONFIG_NAME, WEIGHTS_NAME, export_weights
from ...runtime.noise import sample_generators
from ...runtime.run import TrainingRun
from ...runtime.weights import open_safetensors
from .cli import is_export_folder, resolve_release_checkpoint
from .config import FloatConfig
from .generator import TRAINED_GROUPS, FloatMotionGenerator

logger = logging.getLogger("omniflow")


def pretrained_weights(source: str) -> tuple[Path, bool]:
    """The weights file ``--pretrained_float`` names, and whether it holds the motion auto-encoder: a released
    float.pth (file, folder or hub name) or its safetensors layout does; an export of train_rectified_flow.py
    (the folder, or its model.safetensors) holds the FMT and the audio projection only."""
    if is_export_folder(source):
        kind = json.loads((Path(source) / CONFIG_NAME).read_text()).get("model_type")
        if kind != FloatMotionGenerator.model_type:
            raise CheckpointError(f"{source}: an export of model_type {kind!r}, not {FloatMotionGenerator.model_type!r} "
                                  f"(train_rectified_flow.py's)")
        return Path(source) / WEIGHTS_NAME, False
    path = resolve_release_checkpoint(source)
    if path.suffix != ".safetensors":
        return path, True  # a released float.pth holds every part
    with open_safetensors(path) as handle:
        return path, any(k.startswith("motion_autoencoder.") for k in handle.keys())


def motion_autoencoder_source(opts) -> str | None:
    """Where the frozen motion auto-encoder (sample rendering, --export_release) comes from:
    ``--motion_autoencoder``, else ``--pretrained_float`` when it holds one; None when neither does."""
    if opts.motion_autoencoder:
        return opts.motion_autoencoder
    if not opts.pretrained_float or pretrained_weights(opts.pretrained_float)[1]:
        return opts.pretrained_float
    if opts.export_release:
        raise ConfigError(f"--pretrained_float {opts.pretrained_float} holds the FMT and the audio projection only "
                          f"(an export of train_rectified_flow.py): give --motion_autoencoder (the released "
                          f"float.pth) for the motion auto-encoder that --export_release writes")
    logger.warning("--pretrained_float %s holds no motion auto-encoder and --motion_autoencoder is not given: "
                   "samples are saved as motion latents, not rendered", opts.pretrained_float)
    return None


def build_model(opts, config: FloatConfig) -> FloatMotionGenerator:
    model = FloatMotionGenerator(config)
    if opts.pretrained_float:
        path, complete = pretrained_weights(opts.pretrained_float)
        if not complete:
            logger.info("--pretrained_float %s is an export of train_rectified_flow.py: the FMT and the audio "
                        "projection come from %s, the motion auto-encoder from %s", opts.pretrained_float, path,
                        f"--motion_autoencoder {opts.motion_autoencoder}" if opts.motion_autoencoder else "nowhere")
        counts = model.load_release(path)
        listed = lambda groups: ", ".join(f"{g}* ({counts[g]} tensors)" for g in groups if g in counts) or "nothing"
        logger.info("fine-tuning from %s: loaded strictly %s = %d parameters; in the file, not trained here: %s",
                    path, listed(TRAINED_GROUPS), sum(p.numel() for p in model.parameters()),
                    listed([g for g in counts if g not in TRAINED_GROUPS]))
    return model


def build_optimizer(opts, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    kind = torch.optim.AdamW if opts.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=opts.learning_rate, betas=(opts.beta1, opts.beta2), weight_decay=opts.weight_decay)


def ema_of(model: torch.nn.Module, decay: float) -> AveragedModel:
    """An fp32 EMA copy of ``model``: the first update copies the weights, update n uses the
    decay min(decay, (1 + n) / (10 + n)), so early averages are not dominated by the initial weights."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        weight = 1.0 - min(decay, (1 + n) / (10 + n))
        for a, c in zip(averaged, current):
            a.lerp_(c.to(a.dtype), weight)

    return AveragedModel(model, multi_avg_fn=update).requires_grad_(False).eval()


@torch.no_grad()
def validate(run: TrainingRun, model, loader: ResumableLoader, flow: RectifiedFlow, seed: int) -> float:
    """Mean loss of ``model`` over the validation windows, each scored once on one rank, with no condition
    dropout and its own noise and time (seeded by its index): the same number for any batch size and
    process count, at every validation."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=run.device)
    no_dropout = ConditionDropout({})
    for indices, batch in loader.indexed():
        batch, generators = send_to_device(batch, run.device), sample_generators(seed, indices, run.device)
        with run.accelerator.autocast():
            loss = model(flow, no_dropout, batch, generator=generators)["loss"]
        # the loss is a mean over equally sized windows: x windows is their sum
        total += torch.tensor([loss.item() * len(indices), len(indices)], device=run.device)
    model.train(was_training)
    total = run.accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1].clamp(min=1)).item()


def read_sample_source(dataset: FloatWindowDataset, frames: int) -> dict[str, torch.Tensor]:
    """The first clip's features, motion, emotion and first frame, cut to ``frames``."""
    clip = dataset.clips[0]
    with safe_open(str(dataset.data_dir / clip.shard), "pt") as shard:
        return {"audio": shard.get_slice("audio_features")[:frames].float(),
                "motion": shard.get_slice("motion")[:frames].float(),
                "emotion": shard.get_tensor("emotion").float(), "image": shard.get_tensor("reference_image")}


@torch.no_grad()
def write_sample(run: TrainingRun, generator: FloatMotionGenerator, source: dict, motion_ae, seed: int) -> Path:
    """Sampled motion latents (safetensors), and rendered frames (PNG + tracker) with a motion decoder."""
    device = run.device
    motion = generator.sample(source["audio"][None].to(device), source["motion"][:1].to(device),
                              source["emotion"][None].to(device), seed=seed)[0].float().cpu()
    out = run.output_dir / "samples" / f"step-{run.step:06d}"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"motion": motion.contiguous(), "target_motion": source["motion"].contiguous()},
              str(out.with_suffix(".safetensors")))
    if motion_ae is not None:
        image = source["image"][None].to(device).float() / 127.5 - 1
        code, _, feats = motion_ae.encode(image)
        shown = motion[:: max(1, len(motion) // 8)][:8].to(device)
        frames = torch.cat([motion_ae.decode(code + m[None], feats)[0] for m in shown])
        frames = ((frames.clamp(-1, 1) + 1) / 2).cpu()
        strip = (frames.permute(2, 0, 3, 1).reshape(frames.shape[2], -1, 3) * 255).round().byte().numpy()
        Image.fromarray(np.ascontiguousarray(strip)).save(out.with_suffix(".png"))
        run.metrics.log_images("samples/frames", frames, run.step)
    return out


def export(run: TrainingRun, model, ema: AveragedModel | None, name: str, step: int, motion_ae=None) -> Path:
    """``<output_dir>/<name>``: model.safetensors + config.json of the EMA (else the trained)
    weights, and with a motion auto-encoder ``float_release.safetensors`` in the released
    ``float.pth`` layout. All ranks call it."""
    out = run.output_dir / name
    weights = ema.module if ema is not None else run.accelerator.unwrap_model(model)
    config = {"model_type": weights.model_type, **weights.export_config(),
              "weights": "ema" if ema is not None else "trained", "step": step}
    if ema is None:
        run.export(model, config, out)  # gathers ZeRO-sharded weights on every rank
    elif run.is_main:
        export_weights(weights.state_dict(), config, out)
        logger.info("exported EMA weights to %s", out)
    if motion_ae is not None and run.is_main:
        state = {**motion_ae.release_state_dict(), **weights.release_state_dict()}
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / "float_release.safetensors"))
        logger.info("released-layout weights written to %s", out / "float_release.safetensors")
    run.accelerator.wait_for_everyone()
    return out
