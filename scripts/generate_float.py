"""Talking-portrait video from a reference image and speech with FLOAT.

The portrait is cut to FLOAT's official face crop (1.6x the face box MTCNN finds; ``--face_detector none``:
the centre square) and refused without a face; the motion latents are sampled window by window
with the ODE method, evaluation count and guidance scales given; the video is written as MP4
(H.264, or MPEG-4 when H.264 cannot be encoded) with the speech muxed in as AAC. A JSON report
next to the video gives frames, windows, velocity evaluations and the compute time.

Checkpoints: a released ``float.pth`` (file, folder or hub name; sized by ``--config``), the same
layout as ``.safetensors`` (``train_rectified_flow.py --export_release``), or an export folder of
``train_rectified_flow.py`` (FMT + audio projection; add ``--motion_autoencoder float.pth``).

    python scripts/generate_float.py --ref_path face.png --aud_path speech.wav --ckpt_path checkpoints/float.pth \
        --res_video_path out.mp4 --nfe 10 --a_cfg_scale 2 --emotion S2E
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from omniflow.data.face_crop import FACE_DETECTORS, SquareCrop
from omniflow.models.float.cli import PresetOptions, is_export_folder, resolve_release_checkpoint
from omniflow.models.float.config import EMOTION_LABELS, ODE_METHODS, FloatConfig
from omniflow.runtime.errors import ConfigError, DataError, run_main
from omniflow.runtime.export import CONFIG_NAME, load_export
from omniflow.runtime.options import parse_options
from omniflow.runtime.paths import resolve_recorded

if TYPE_CHECKING:  # imported after the flags are parsed
    import torch

    from omniflow.models.float import FLOAT

logger = logging.getLogger("omniflow")
# FloatConfig fields a flag may override (None: keep the checkpoint's / preset's value)
OVERRIDES = ("wav2vec_model_path", "audio2emotion_path", "nfe", "torchdiffeq_ode_method", "ode_atol", "ode_rtol",
             "a_cfg_scale", "e_cfg_scale", "r_cfg_scale")


@dataclass
class GenerateOptions:
    ref_path: str = field(default="", metadata={"help": "reference portrait image (a face-centred photo)"})
    aud_path: str = field(default="", metadata={"help": "speech audio (any format FFmpeg reads)"})
    res_video_path: str = field(default="outputs/float.mp4", metadata={"help": "output MP4",
                                                                        "aliases": ["--output"]})
    ckpt_path: str = field(default="float", metadata={
        "help": "released float.pth (file, folder or hub name), its .safetensors layout, or an export folder",
        "aliases": ["--checkpoint"]})
    motion_autoencoder: Optional[str] = field(default=None, metadata={
        "help": "released float.pth or MotionAutoEncoder export; needed with an FMT export"})
    emotion: str = field(default="S2E", metadata={
        "help": "emotion label, or S2E to predict it from the speech", "aliases": ["--emo"],
        "choices": ["S2E", *EMOTION_LABELS]})
    seed: int = field(default=0, metadata={"help": "noise seed"})
    wav2vec_model_path: Optional[str] = field(default=None, metadata={"help": "override: wav2vec2 folder or hub id"})
    audio2emotion_path: Optional[str] = field(default=None, metadata={
        "help": "override: speech-emotion classifier folder or hub id"})
    nfe: Optional[int] = field(default=None, metadata={"help": "velocity evaluations per window (fixed-step methods)"})
    torchdiffeq_ode_method: Optional[str] = field(default=None, metadata={"help": "ODE solver", "choices": list(ODE_METHODS)})
    ode_atol: Optional[float] = field(default=None, metadata={"help": "absolute tolerance of dopri5"})
    ode_rtol: Optional[float] = field(default=None, metadata={"help": "relative tolerance of dopri5"})
    a_cfg_scale: Optional[float] = field(default=None, metadata={"help": "audio guidance scale"})
    e_cfg_scale: Optional[float] = field(default=None, metadata={"help": "emotion guidance scale"})
    r_cfg_scale: Optional[float] = field(default=None, metadata={"help": "reference guidance scale"})
    face_detector: str = field(default="mtcnn", metadata={
        "help": "face detector for the crop (mtcnn: facenet-pytorch's MTCNN); none: the centre square",
        "choices": list(FACE_DETECTORS)})
    min_face_size: int = field(default=64, metadata={
        "help": "refuse a portrait whose face crop (the centre square with --face_detector none) is smaller than "
                "this many source pixels"})
    render_batch_size: Optional[int] = field(default=None, metadata={
        "help": "frames per motion-decoder call (default: 16 on CUDA, 1 on CPU, where batching was slower)"})
    save_motion: bool = field(default=False, metadata={"help": "also save the motion latents (.safetensors)"})
    device: Optional[str] = field(default=None, metadata={"help": "torch device (default: cuda if available)"})

    def validate(self) -> None:
        if not self.ref_path or not self.aud_path:
            raise ConfigError("--ref_path and --aud_path are required")
        if self.render_batch_size is not None and self.render_batch_size < 1:
            raise ConfigError(f"--render_batch_size must be >= 1, got {self.render_batch_size}")


def overridden(config: FloatConfig, opts: GenerateOptions) -> FloatConfig:
    changes = {name: getattr(opts, name) for name in OVERRIDES if getattr(opts, name) is not None}
    config = dataclasses.replace(config, **changes)
    config.validate()
    return config


def motion_state(source: str, config: FloatConfig) -> dict[str, torch.Tensor]:
    """The motion auto-encoder's released-layout weights from a release file or its export."""
    from omniflow.models.float import MotionAutoEncoder, read_release_checkpoint
    if is_export_folder(source):
        return MotionAutoEncoder.from_pretrained(source).release_state_dict()
    state = read_release_checkpoint(resolve_release_checkpoint(source))
    return {k: v for k, v in state.items() if k.startswith(MotionAutoEncoder.release_prefix)}


def load_model(opts: GenerateOptions, preset: str) -> FLOAT:
    """A FLOAT from a released-layout file, a full FLOAT export, or an FMT export + motion auto-encoder."""
    from omniflow.models.float import FLOAT, FloatMotionGenerator
    if not is_export_folder(opts.ckpt_path):
        return FLOAT.from_release(resolve_release_checkpoint(opts.ckpt_path), overridden(FloatConfig.preset(preset), opts))
    state, values = load_export(opts.ckpt_path)
    kind = values.get("model_type")
    if kind == FLOAT.model_type:
        model = FLOAT.from_pretrained(opts.ckpt_path)
        model.config = overridden(model.config, opts)
        return model
    if kind != FloatMotionGenerator.model_type:
        raise ConfigError(f"{opts.ckpt_path}: model_type {kind!r} is not a FLOAT export")
    if not opts.motion_autoencoder:
        raise ConfigError(f"{opts.ckpt_path} holds the FMT and the audio projection only: give --motion_autoencoder "
                          f"(the released float.pth)")
    recorded = {name: resolve_recorded(values["float"][name], Path(opts.ckpt_path) / CONFIG_NAME)
                for name in ("wav2vec_model_path", "audio2emotion_path")}
    config = overridden(FloatConfig.from_dict({**values["float"], **recorded}), opts)
    # export keys are released names: with the motion auto-encoder they form a released-layout dict
    return FLOAT.from_release({**motion_state(opts.motion_autoencoder, config), **state}, config)


def read_portrait(path: str) -> np.ndarray:
    """The reference image as uint8 (h, w, 3); DataError when unreadable."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{path}: cannot read the reference image ({err})") from None


def portrait_crop(image: np.ndarray, opts: GenerateOptions, device) -> SquareCrop | None:
    """The face crop of the portrait (None: the centre square), refused without a face or below --min_face_size."""
    from omniflow.data.face_detect import face_detector, image_face_crop
    from omniflow.data.float_media import check_face_size
    detector = face_detector(opts.face_detector, device)
    check_face_size(min(image.shape[:2]), opts.min_face_size, opts.ref_path,
                    "face crop" if detector is None else "short side")
    if detector is None:
        return None
    crop = image_face_crop(detector, image, opts.ref_path)
    check_face_size(crop.side, opts.min_face_size, opts.ref_path)
    return crop


def main(argv: list[str] | None = None) -> dict:
    opts, preset = parse_options(GenerateOptions, PresetOptions, args=argv, config_flags=("--config-file",))
    out = Path(opts.res_video_path)
    portrait_image = read_portrait(opts.ref_path)
    import torch  # after the flags: --help and a wrong flag do not wait for it

    from omniflow.data.float_media import read_audio, square_crop, write_video
    from omniflow.flow.sampler import ADAPTIVE_METHODS
    from omniflow.models.float import WaveformNormalizer
    from omniflow.runtime.tracking import setup_logging

    setup_logging(None, True)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    crop = portrait_crop(portrait_image, opts, device)  # refused before the model loads
    model = load_model(opts, preset.config).to(device).eval()
    config = model.config
    waveform = read_audio(opts.aud_path, config.sampling_rate)
    audio = WaveformNormalizer(config.wav2vec_model_path)(waveform, config.sampling_rate).to(device)
    square = (square_crop(portrait_image, config.input_size) if crop is None
              else crop.cut(portrait_image, config.input_size).copy())  # writable, for torch.from_numpy
    portrait = torch.from_numpy(square).permute(2, 0, 1)[None].float()
    portrait = (portrait / 127.5 - 1).to(device)
    calls = []
    hook = model.fmt.register_forward_hook(lambda *_: calls.append(1))
    start = time.perf_counter()
    render_batch_size = opts.render_batch_size or (16 if device.type == "cuda" else 1)
    result = model.inference(portrait, audio, emotion=opts.emotion, seed=opts.seed, render_batch_size=render_batch_size)
    compute = time.perf_counter() - start
    hook.remove()
    frames = ((result["video"][0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    write_video(out, frames, config.fps, waveform, config.sampling_rate)
    windows = math.ceil(len(frames) / config.window)
    adaptive = config.torchdiffeq_ode_method in ADAPTIVE_METHODS
    # nfe: what ran, per window (dopri5 picks its own steps: a mean); what was asked for beside it
    solver = ({"ode_atol": config.ode_atol, "ode_rtol": config.ode_rtol} if adaptive else {"nfe_requested": config.nfe})
    report = {"video": str(out), "frames": len(frames), "fps": config.fps, "seconds": len(frames) / config.fps,
              "windows": windows, "method": config.torchdiffeq_ode_method, "nfe": len(calls) / windows, **solver,
              "velocity_evaluations": len(calls),
              "guidance": dataclasses.asdict(config.guidance_scales()), "emotion": opts.emotion, "seed": opts.seed,
              "render_batch_size": render_batch_size, "compute_seconds": compute,
              "video_seconds_per_compute_second": len(frames) / config.fps / compute}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    if opts.save_motion:
        from safetensors.torch import save_file
        save_file({"motion": result["motion"][0].cpu().contiguous()}, str(out.with_suffix(".motion.safetensors")))
    logger.info("%s: %d frames (%.2f s) in %.2f s of compute, %d velocity evaluations over %d window(s)", out,
                len(frames), report["seconds"], compute, len(calls), windows)
    return report


if __name__ == "__main__":
    run_main(main)
