"""FLOAT: audio-driven talking portrait by flow matching in a motion latent space.

Pipeline: the portrait is encoded into an appearance code ``s_r``, its own motion ``r_s`` and a
feature pyramid; the audio becomes a per-frame condition ``wa`` and an emotion vector ``we``;
the FMT samples a motion latent per frame window by window; every frame is rendered from
``s_r + motion``.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2Model

from ...flow.guidance import GuidanceScales
from .audio import (AudioEncoder, EmotionEncoder, SpeechEmotionClassifier, frames_for_samples, load_audio_backbone,
                    load_emotion_classifier, uninitialised)
from .config import FloatConfig, FloatConfigError
from .fmt import FlowMatchingTransformer
from .io import FloatPretrainedMixin
from .motion import MotionAutoEncoder


class FLOAT(FloatPretrainedMixin, nn.Module):
    """The full model with the released module names: ``motion_autoencoder``, ``audio_encoder``,
    ``emotion_encoder`` and ``fmt``. The two wav2vec2 models and the motion auto-encoder are
    frozen; the FMT and the audio projection are trained."""

    model_type = "float"
    release_prefix = ""
    optional_release_groups = ("audio_encoder.wav2vec2.", "emotion_encoder.wav2vec2_for_emotion.")

    def __init__(self, config: FloatConfig, audio_backbone: Wav2Vec2Model, emotion_classifier: SpeechEmotionClassifier):
        super().__init__()
        config.validate()
        self.config = config
        self.motion_autoencoder = MotionAutoEncoder.from_config(config).requires_grad_(False)
        self.audio_encoder = AudioEncoder.from_config(config, audio_backbone)
        self.emotion_encoder = EmotionEncoder(emotion_classifier)
        if len(self.emotion_encoder.labels) != config.dim_e:
            raise FloatConfigError(f"dim_e={config.dim_e} but the emotion classifier has "
                                   f"{len(self.emotion_encoder.labels)} labels")
        self.fmt = FlowMatchingTransformer(config)

    @classmethod
    def build(cls, config: FloatConfig, audio_backbone_config: Wav2Vec2Config,
              emotion_config: Wav2Vec2Config) -> "FLOAT":
        """A freshly initialised model (no pretrained weights)."""
        return cls(config, Wav2Vec2Model(audio_backbone_config), SpeechEmotionClassifier(emotion_config))

    @classmethod
    def from_release(cls, checkpoint: str | os.PathLike, config: FloatConfig | None = None) -> "FLOAT":
        """Load a released-style ``float.pth``. The wav2vec2 models come from
        ``config.wav2vec_model_path`` / ``config.audio2emotion_path``; wav2vec2 weights held by
        the checkpoint itself replace theirs."""
        config = config or FloatConfig()
        model = cls(config, load_audio_backbone(config.wav2vec_model_path),
                    load_emotion_classifier(config.audio2emotion_path))
        model.load_release(checkpoint)
        return model

    def export_config(self) -> dict:
        return {"float": self.config.to_dict(),
                "audio_backbone": self.audio_encoder.wav2vec2.config.to_dict(),
                "emotion_classifier": self.emotion_encoder.wav2vec2_for_emotion.config.to_dict()}

    @classmethod
    def from_export_config(cls, values: dict) -> "FLOAT":
        audio, emotion = (Wav2Vec2Config.from_dict(values[k]) for k in ("audio_backbone", "emotion_classifier"))
        # the export holds every wav2vec2 weight: skip their (slow) random initialisation
        return cls(FloatConfig.from_dict(values["float"]), uninitialised(lambda: Wav2Vec2Model(audio)),
                   uninitialised(lambda: SpeechEmotionClassifier(emotion)))

    def train(self, mode: bool = True) -> "FLOAT":
        super().train(mode)
        self.motion_autoencoder.eval()  # frozen
        return self

    # ---- conditions -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(B, 3, H, W) in [-1, 1] -> (appearance code s_r, reference motion r_s, feature pyramid)."""
        s_r, coeffs, feats = self.motion_autoencoder.encode(img)
        return s_r, self.motion_autoencoder.dec.direction(coeffs), feats

    def num_frames(self, num_samples: int) -> int:
        return frames_for_samples(num_samples, self.config.sampling_rate, self.config.fps)

    def audio_condition(self, audio: torch.Tensor | None = None,
                        audio_features: torch.Tensor | None = None) -> torch.Tensor:
        """Per-frame audio condition (B, T, dim_a) from a normalised waveform (B, N), or from its
        precomputed wav2vec2 features (B, T, audio_feature_dim)."""
        if audio_features is not None:
            return self.audio_encoder.project(audio_features)
        if audio is None:
            raise ValueError("give audio or audio_features")
        return self.audio_encoder(audio, self.num_frames(audio.shape[-1]))

    # ---- generation -------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, r_s: torch.Tensor, wa: torch.Tensor, we: torch.Tensor, *, scales: GuidanceScales | None = None,
               nfe: int | None = None, method: str | None = None, seed: int | None = None,
               repeat_window_noise: bool = False) -> torch.Tensor:
        """Motion latents (B, T, dim_w) for reference motion r_s (B, dim_w), audio condition
        wa (B, T, dim_a) and emotion we (B, 1, dim_e). Unset options come from the config;
        see :func:`omniflow.flow.sample_in_windows` for ``seed`` / ``repeat_window_noise``."""
        c = self.config
        return self.fmt.sample(wa, r_s, we, c.sampler(nfe, method), scales or c.guidance_scales(), seed=seed,
                               repeat_window_noise=repeat_window_noise)

    @torch.no_grad()
    def decode(self, s_r: torch.Tensor, feats: list[torch.Tensor], motion: torch.Tensor,
               batch_size: int = 1) -> torch.Tensor:
        """Render (B, T, 3, H, W) frames: frame t from ``s_r + motion[:, t]``, ``batch_size`` frames per decoder
        call. Each frame is computed on its own (per-sample modulated convolutions): batching only fills a GPU;
        on CPUs it was slower (BENCHMARKS.md)."""
        if batch_size < 1:
            raise ValueError(f"render batch size must be >= 1, got {batch_size}")
        b, t = motion.shape[:2]
        chunks = []
        for start in range(0, t, batch_size):
            k = min(batch_size, t - start)
            latents = (s_r[:, None] + motion[:, start:start + k]).reshape(b * k, -1)
            repeated = [f[:, None].expand(b, k, *f.shape[1:]).reshape(b * k, *f.shape[1:]) for f in feats]
            frames = self.motion_autoencoder.decode(latents, repeated)[0]
            chunks.append(frames.reshape(b, k, *frames.shape[1:]))
        return torch.cat(chunks, dim=1)

    @torch.no_grad()
    def inference(self, img: torch.Tensor, audio: torch.Tensor, *, emotion: str | None = None,
                  audio_features: torch.Tensor | None = None, render_batch_size: int = 1,
                  **sample_options) -> dict[str, torch.Tensor]:
        """Talking-portrait frames for a portrait (B, 3, H, W) and a normalised waveform (B, N).

        emotion: one of the classifier's labels, or None / 'S2E' to predict it from the whole
        clip. ``audio_features`` replaces the wav2vec2 pass with cached features. Frames are
        rendered ``render_batch_size`` at a time. Other keyword arguments go to :meth:`sample`.
        Returns ``video`` (B, T, 3, H, W), ``motion`` and ``r_s``.
        """
        s_r, r_s, feats = self.encode_image(img)
        wa = self.audio_condition(audio, audio_features)
        we = self.emotion_encoder.condition(audio, emotion)
        motion = self.sample(r_s, wa, we, **sample_options)
        return {"video": self.decode(s_r, feats, motion, render_batch_size), "motion": motion, "r_s": r_s}
