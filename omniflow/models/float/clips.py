"""Frozen FLOAT encoders applied to one talking-head clip: motion latents of its frames, wav2vec2 audio
features resampled to the frame rate, and the emotion (a given label or the classifier's prediction)."""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

from ...data.face_detect import face_detector, video_face_crop
from ...data.float_media import (DecodeLoss, MediaError, check_face_size, iter_video_frames, loudness_dbfs, read_audio,
                                 sample_video_frames, video_frame_size)
from ...data.float_shards import read_json_object
from ...runtime.errors import ConfigError, DataError
from .audio import (AudioEncoder, EmotionEncoder, WaveformNormalizer, frames_for_samples, load_audio_backbone,
                    load_emotion_classifier)
from .cli import load_motion_autoencoder
from .config import EMOTION_LABELS, FloatConfig

FACE_SAMPLE_SECONDS = 0.5  # a clip's face crop is the median of boxes found this often


class ClipEncoder:
    """The frozen encoders, loaded once; the emotion classifier only when a clip needs it."""

    def __init__(self, config: FloatConfig, opts, device: torch.device):
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
        self.detector = face_detector(opts.face_detector, device)

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


def encode_clip(encoder: ClipEncoder, video: str,
                label: Optional[str]) -> tuple[dict[str, torch.Tensor], str, str, dict[str, float]]:
    """Shard tensors of one video, its emotion label and source, and the seconds of audio and video lost to
    damaged packets (skipped; within --max_lost_fraction). Raises DataError to skip it."""
    config, opts = encoder.config, encoder.opts
    audio_loss, video_loss = DecodeLoss("audio"), DecodeLoss("video")
    waveform = read_audio(video, config.sampling_rate, audio_loss)
    audio_loss.check(video, len(waveform) / config.sampling_rate, opts.max_lost_fraction)
    level = loudness_dbfs(waveform)
    if level < opts.min_loudness_db:
        raise MediaError(f"silent audio ({level:.1f} dBFS < --min_loudness_db {opts.min_loudness_db})", kind="silent")
    crop = None  # the centre square, whose side is the frames' short side
    check_face_size(min(video_frame_size(video)), opts.min_face_size, "the video",
                    "face crop" if encoder.detector is None else "frames' short side")
    if encoder.detector is not None:
        crop = video_face_crop(encoder.detector, sample_video_frames(video, FACE_SAMPLE_SECONDS), "the video")
        check_face_size(crop.side, opts.min_face_size, "the video")
    motion, first = encoder.motion_latents(iter_video_frames(video, config.fps, config.input_size, crop, video_loss))
    video_loss.check(video, len(motion) / config.fps, opts.max_lost_fraction)
    frames = min(len(motion), frames_for_samples(len(waveform), config.sampling_rate, config.fps))
    if frames < config.window:
        raise MediaError(f"{frames} frames with audio: shorter than one training window ({config.window} frames)",
                         kind="too_short")
    normalized = encoder.normalize(waveform, config.sampling_rate)
    features = encoder.audio_features(normalized, frames)
    if label is not None:
        emotion, source = torch.nn.functional.one_hot(torch.tensor(EMOTION_LABELS.index(label)),
                                                      len(EMOTION_LABELS)).float(), "label"
    else:
        emotion, source = encoder.emotion(normalized.to(encoder.device))[0].float().cpu(), "classifier"
        label = encoder.emotion.labels[int(emotion.argmax())]
    tensors = {"motion": motion[:frames], "audio_features": features.to(getattr(torch, opts.feature_dtype)),
               "emotion": emotion, "reference_image": first}
    lost = {"lost_audio_seconds": round(audio_loss.seconds, 6), "lost_video_seconds": round(video_loss.seconds, 6)}
    return tensors, label, source, lost
