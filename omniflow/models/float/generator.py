"""The trained part of FLOAT: the Flow Matching Transformer and the audio projection.

Training reads precomputed wav2vec2 features and motion latents (``scripts/preprocess_float.py``),
so it needs neither the frozen wav2vec2 models nor the motion auto-encoder. Parameter names are
the released ones (``fmt.*``, ``audio_encoder.audio_projection.*``): a released ``float.pth``
loads into it, and its weights drop into a :class:`~omniflow.models.float.FLOAT`.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn

from ...flow.guidance import GuidanceScales
from ...flow.rectified_flow import ConditionDropout, RectifiedFlow
from ...flow.sampler import FlowSampler
from ...runtime.noise import Generators
from .audio import AudioFeatureError, audio_projection
from .config import FloatConfig
from .fmt import FlowMatchingTransformer
from .io import CheckpointMismatchError, FloatPretrainedMixin, load_strict, read_release_checkpoint

TRAINED_GROUPS = ("fmt.", "audio_encoder.audio_projection.")
RELEASE_GROUPS = TRAINED_GROUPS + ("motion_autoencoder.", "audio_encoder.wav2vec2.",
                                   "emotion_encoder.wav2vec2_for_emotion.")


class FloatMotionGenerator(FloatPretrainedMixin, nn.Module):
    """FMT + audio projection: audio features -> motion latents, and the rectified-flow loss."""

    model_type = "float_motion_generator"
    release_prefix = ""  # the parameter names are already the released ones

    def __init__(self, config: FloatConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.fmt = FlowMatchingTransformer(config)
        self.audio_encoder = nn.ModuleDict({"audio_projection": audio_projection(config.audio_feature_dim,
                                                                                 config.dim_a)})

    def export_config(self) -> dict:
        return {"float": self.config.to_dict()}

    @classmethod
    def from_export_config(cls, values: dict) -> "FloatMotionGenerator":
        return cls(FloatConfig.from_dict(values["float"]))

    def load_release(self, checkpoint: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Strictly load the FMT and the audio projection of a released-layout checkpoint (other
        parts are ignored). Returns the number of tensors per part of the file (``RELEASE_GROUPS``)."""
        source = "checkpoint dict" if isinstance(checkpoint, Mapping) else str(checkpoint)
        state = checkpoint if isinstance(checkpoint, Mapping) else read_release_checkpoint(checkpoint)
        trained = {k: v for k, v in state.items() if k.startswith(TRAINED_GROUPS)}
        if not trained:
            raise CheckpointMismatchError(f"{source} holds no {' / '.join(g + '*' for g in TRAINED_GROUPS)} keys")
        load_strict(self, trained, source)
        counts: dict[str, int] = {}
        for key in state:
            group = next((g for g in RELEASE_GROUPS if key.startswith(g)), "other")
            counts[group] = counts.get(group, 0) + 1
        return counts

    def project_audio(self, features: torch.Tensor) -> torch.Tensor:
        head = self.audio_encoder["audio_projection"]
        if features.shape[-1] != head[0].in_features:
            raise AudioFeatureError(f"audio features have width {features.shape[-1]} but the audio projection "
                                    f"expects {head[0].in_features} (FloatConfig.audio_feature_dim)")
        return head(features.to(head[0].weight.dtype))

    def forward(self, flow: RectifiedFlow, dropout: ConditionDropout, batch: Mapping[str, torch.Tensor],
                generator: Generators = None) -> dict[str, torch.Tensor]:
        """Loss terms on a batch of :class:`~omniflow.data.float_shards.FloatWindowDataset` windows.

        Windows at a clip start (``has_prev`` 0) get zero previous frames and zero previous
        audio condition, as the first window of a generated sequence does. ``generator`` may be
        one per window (validation).
        """
        keep = batch["has_prev"].reshape(-1, 1, 1).to(batch["motion"].dtype)
        wa = self.project_audio(batch["audio"])
        prev_wa = self.project_audio(batch["prev_audio"]) * keep.to(wa.dtype)
        loss = self.fmt.training_loss(flow, dropout, batch["motion"], wa, batch["reference_motion"],
                                      batch["emotion"][:, None], batch["prev_motion"] * keep, prev_wa,
                                      generator=generator)
        return {"loss": loss.total, "flow": loss.flow, "velocity": loss.velocity}

    @torch.no_grad()
    def sample(self, audio_features: torch.Tensor, reference_motion: torch.Tensor, emotion: torch.Tensor,
               sampler: FlowSampler | None = None, scales: GuidanceScales | None = None,
               seed: int | None = None) -> torch.Tensor:
        """Motion latents (B, T, dim_w) for features (B, T, F), reference motion (B, dim_w) and
        emotion (B, dim_e); sampler and guidance default to the config's."""
        wa = self.project_audio(audio_features)
        return self.fmt.sample(wa, reference_motion, emotion.reshape(emotion.shape[0], 1, -1),
                               sampler or self.config.sampler(), scales or self.config.guidance_scales(), seed=seed)
