"""Talking-head videos -> FLOAT training shards (see ``omniflow/data/float_shards.py``).

For every video under ``--input_dir``: the frames are resampled to ``--fps`` and cut to
``--input_size`` squares, encoded into motion latents by the frozen motion auto-encoder; the
audio track is resampled to ``--sampling_rate`` and turned into per-frame wav2vec2 features
(before FLOAT's trained projection); the emotion comes from ``--emotion_labels`` or the
speech-emotion classifier. Unreadable, silent or too short clips are skipped and listed in the
manifest with the reason.

    python scripts/preprocess_float.py --input_dir videos/ --output_dir data/float \
        --motion_autoencoder checkpoints/float.pth
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from omniflow.data.float_media import iter_video_frames, loudness_dbfs, read_audio
from omniflow.data.float_shards import ClipRecord, clip_id_for, read_json_object, write_clip, write_manifest
from omniflow.data.video import VIDEO_EXTENSIONS, list_files
from omniflow.models.float import (EMOTION_LABELS, AudioEncoder, EmotionEncoder, FloatConfig, WaveformNormalizer,
                                   load_audio_backbone, load_emotion_classifier)
from omniflow.models.float.audio import frames_for_samples
from omniflow.models.float.cli import PresetOptions, load_motion_autoencoder, parse_float_options
from omniflow.runtime.errors import ConfigError, DataError, run_main
from omniflow.runtime.paths import path_to_record
from omniflow.runtime.tracking import setup_logging

logger = logging.getLogger("omniflow")
FACE_DETECTORS = ("face_alignment",)  # FLOAT's own crops come from face_alignment
FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class PreprocessOptions:
    input_dir: str = field(default="", metadata={"help": "folder of talking-head videos with audio (searched recursively)"})
    output_dir: str = field(default="data/float", metadata={"help": "where manifest.json and clips/ are written"})
    motion_autoencoder: str = field(default="float", metadata={
        "help": "released float.pth (file, folder or hub name) or a MotionAutoEncoder export folder"})
    emotion_labels: Optional[str] = field(default=None, metadata={
        "help": "JSON object {clip id, file name or stem: emotion label}; clips without a label get the "
                "classifier's prediction"})
    min_loudness_db: float = field(default=-50.0, metadata={
        "help": "clips whose audio RMS level (dBFS) is below this are skipped as silent"})
    batch_size: int = field(default=16, metadata={"help": "frames per motion-encoder batch"})
    feature_dtype: str = field(default="float16", metadata={
        "help": "storage dtype of the audio features", "choices": list(FEATURE_DTYPES)})
    device: Optional[str] = field(default=None, metadata={"help": "torch device (default: cuda if available, else cpu)"})

    def validate(self) -> None:
        if not self.input_dir:
            raise DataError("--input_dir is required")
        if self.batch_size < 1:
            raise DataError(f"--batch_size must be >= 1, got {self.batch_size}")


class ClipEncoder:
    """The frozen encoders, loaded once; the emotion classifier only when a clip needs it."""

    def __init__(self, config: FloatConfig, opts: PreprocessOptions, device: torch.device):
        self.config, self.opts, self.device = config, opts, device
        self.motion = load_motion_autoencoder(opts.motion_autoencoder, config).to(device)
        backbone = load_audio_backbone(config.wav2vec_model_path)
        width = backbone.config.hidden_size * (1 if config.only_last_features else backbone.config.num_hidden_layers)
        if width != config.audio_feature_dim:
            raise ConfigError(f"the wav2vec2 at {config.wav2vec_model_path} gives {width}-wide features but "
                              f"audio_feature_dim is {config.audio_feature_dim}; pass --audio_feature_dim {width}")
        self.audio = AudioEncoder.from_config(config, backbone).to(device).eval()
        self.normalize = WaveformNormalizer(config.wav2vec_model_path)
        self._emotion: EmotionEncoder | None = None

    @property
    def emotion(self) -> EmotionEncoder:
        if self._emotion is None:
            encoder = EmotionEncoder(load_emotion_classifier(self.config.audio2emotion_path))
            if encoder.labels != EMOTION_LABELS:
                raise ConfigError(f"the emotion classifier at {self.config.audio2emotion_path} has labels "
                                  f"{list(encoder.labels)}, expected {list(EMOTION_LABELS)}")
            self._emotion = encoder.to(self.device).eval()
        return self._emotion

    @torch.no_grad()
    def motion_latents(self, frames: Iterator[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, dim_w) motion latents of the frames, and the first frame (3, S, S) uint8."""
        latents, first, batch = [], None, []

        def flush():
            images = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(self.device)
            codes, _ = self.motion.enc(images.float() / 127.5 - 1)
            latents.append(self.motion.motion_of(codes).float().cpu())
            batch.clear()

        for frame in frames:
            first = torch.from_numpy(frame).permute(2, 0, 1).contiguous() if first is None else first
            batch.append(frame)
            if len(batch) == self.opts.batch_size:
                flush()
        if batch:
            flush()
        return torch.cat(latents), first

    @torch.no_grad()
    def audio_features(self, waveform: torch.Tensor, num_frames: int) -> torch.Tensor:
        return self.audio.features(waveform.to(self.device), num_frames)[0].cpu()


def read_labels(path: Optional[str]) -> dict[str, str]:
    """{clip id, file name or stem: emotion label} from a JSON object."""
    labels = read_json_object(path) if path is not None else {}
    bad = {k: v for k, v in labels.items() if str(v).lower() not in EMOTION_LABELS}
    if bad:
        key, value = next(iter(bad.items()))
        raise DataError(f"{path}: key {key!r} has emotion {value!r}, not one of {list(EMOTION_LABELS)}")
    return {k: str(v).lower() for k, v in labels.items()}


def encode_clip(encoder: ClipEncoder, video: str, label: Optional[str]) -> tuple[dict[str, torch.Tensor], str, str]:
    """Shard tensors of one video, and its emotion label and source. Raises DataError to skip it."""
    config, opts = encoder.config, encoder.opts
    waveform = read_audio(video, config.sampling_rate)
    level = loudness_dbfs(waveform)
    if level < opts.min_loudness_db:
        raise DataError(f"silent audio ({level:.1f} dBFS < --min_loudness_db {opts.min_loudness_db})")
    motion, first = encoder.motion_latents(iter_video_frames(video, config.fps, config.input_size))
    frames = min(len(motion), frames_for_samples(len(waveform), config.sampling_rate, config.fps))
    if frames < config.window:
        raise DataError(f"{frames} frames with audio: shorter than one training window ({config.window} frames)")
    normalized = encoder.normalize(waveform, config.sampling_rate)
    features = encoder.audio_features(normalized, frames)
    if label is not None:
        emotion, source = torch.nn.functional.one_hot(torch.tensor(EMOTION_LABELS.index(label)),
                                                      len(EMOTION_LABELS)).float(), "label"
    else:
        emotion, source = encoder.emotion(normalized.to(encoder.device))[0].float().cpu(), "classifier"
        label = encoder.emotion.labels[int(emotion.argmax())]
    tensors = {"motion": motion[:frames], "audio_features": features.to(FEATURE_DTYPES[opts.feature_dtype]),
               "emotion": emotion, "reference_image": first}
    return tensors, label, source


def main(argv: list[str] | None = None) -> Path:
    opts, _, config = parse_float_options(PreprocessOptions, PresetOptions, FloatConfig, args=argv)
    out = Path(opts.output_dir)
    setup_logging(out, True, "preprocess.log")
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    installed = [name for name in FACE_DETECTORS if importlib.util.find_spec(name)]
    logger.info("no face crop (%s): frames are used as given, centre-cropped to a square and resized to %d px; "
                "give face-centred videos", f"{installed[0]} is installed but not used" if installed else
                f"no face detector is installed ({', '.join(FACE_DETECTORS)})", config.input_size)
    videos = list_files(opts.input_dir, VIDEO_EXTENSIONS)
    labels = read_labels(opts.emotion_labels)
    encoder = ClipEncoder(config, opts, device)
    clips, skipped, taken = [], [], set()
    for video in videos:
        clip_id = clip_id_for(video, taken)
        name = Path(video)
        label = labels.get(clip_id, labels.get(name.name, labels.get(name.stem)))
        try:
            tensors, emotion, source = encode_clip(encoder, video, label)
        except DataError as err:
            reason = str(err).removeprefix(f"{video}: ")
            logger.warning("skipped %s: %s", video, reason)
            skipped.append({"source": video, "reason": reason})
            continue
        shard = write_clip(out, clip_id, tensors, config.fps)
        frames = len(tensors["motion"])
        clips.append(ClipRecord(id=clip_id, source=video, shard=shard, frames=frames, fps=config.fps,
                                emotion=emotion, emotion_source=source))
        logger.info("%s: %d frames, emotion %s (%s)", clip_id, frames, emotion, source)
    settings = {"fps": config.fps, "sampling_rate": config.sampling_rate, "input_size": config.input_size,
                "dim_w": config.dim_w, "audio_feature_dim": config.audio_feature_dim,
                "only_last_features": config.only_last_features, "emotion_labels": list(EMOTION_LABELS),
                "motion_autoencoder": path_to_record(opts.motion_autoencoder),  # absolute: readable from anywhere
                "wav2vec_model_path": path_to_record(config.wav2vec_model_path),
                "audio2emotion_path": path_to_record(config.audio2emotion_path), "face_crop": False}
    manifest = write_manifest(out, settings, clips, skipped)
    logger.info("%d clip(s) written, %d skipped; manifest %s", len(clips), len(skipped), manifest)
    return manifest


if __name__ == "__main__":
    run_main(main)
