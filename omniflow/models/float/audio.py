"""FLOAT condition encoders: frozen wav2vec2 audio features + a trained projection, and a
wav2vec2 speech-emotion classifier giving a 7-way emotion vector."""
from __future__ import annotations

import math
from typing import Callable, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model
from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2PreTrainedModel

from ...runtime.errors import DataError
from ...runtime.hub import from_pretrained_kwargs, resolve_model_path
from ...runtime.weights import load_pretrained
from .config import EMOTION_LABELS, FloatConfig
from .io import FloatPretrainedMixin

PREDICT_EMOTION = (None, "s2e")  # labels that mean "predict the emotion from the speech"


class AudioFeatureError(DataError):
    """Audio or audio features that do not fit the audio encoder."""


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def freeze(module: ModuleT) -> ModuleT:
    module.requires_grad_(False)
    return module.eval()


def uninitialised(factory: Callable[[], ModuleT]) -> ModuleT:
    """A module built without running its weight initialisation (allocated on the meta device,
    then as empty CPU memory), for modules whose every weight is loaded from a file next.
    Saves seconds per large wav2vec2; the modules built here hold no buffers."""
    with torch.device("meta"):
        module = factory()
    return module.to_empty(device="cpu")


def audio_projection(feature_dim: int, dim_out: int) -> nn.Sequential:
    """The trained audio head: Linear -> LayerNorm -> SiLU over the stacked wav2vec2 features."""
    return nn.Sequential(nn.Linear(feature_dim, dim_out), nn.LayerNorm(dim_out), nn.SiLU())


def load_audio_backbone(name_or_path: str) -> Wav2Vec2Model:
    """The frozen wav2vec2 of a folder or hub id (e.g. ``facebook/wav2vec2-base-960h``), found
    by :func:`omniflow.runtime.hub.resolve_model_path`: offline, a missing model names the
    ``download_models.py --models wav2vec2_base`` command."""
    return load_pretrained(Wav2Vec2Model, resolve_model_path(name_or_path), **from_pretrained_kwargs())


def load_emotion_classifier(name_or_path: str) -> "SpeechEmotionClassifier":
    """The speech-emotion classifier of a folder or hub id (``download_models.py --models wav2vec2_emotion``)."""
    return load_pretrained(SpeechEmotionClassifier, resolve_model_path(name_or_path), **from_pretrained_kwargs())


class WaveformNormalizer:
    """Raw mono waveforms -> the input the wav2vec2 models expect (per-clip zero mean, unit
    variance), with the feature extractor settings of the model's folder."""

    def __init__(self, name_or_path: str):
        folder = resolve_model_path(name_or_path)
        self.extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder, **from_pretrained_kwargs())
        self.sampling_rate = self.extractor.sampling_rate

    def __call__(self, waveform: np.ndarray, sampling_rate: int) -> torch.Tensor:
        """(N,) float waveform at ``sampling_rate`` -> (1, N) normalised tensor."""
        if sampling_rate != self.sampling_rate:
            raise AudioFeatureError(f"audio at {sampling_rate} Hz; the wav2vec2 feature extractor expects "
                                    f"{self.sampling_rate} Hz (resample it first)")
        values = self.extractor(np.asarray(waveform, dtype=np.float32), sampling_rate=sampling_rate,
                                return_tensors="pt").input_values
        return values.reshape(1, -1)


def frames_for_samples(num_samples: int, sampling_rate: int, fps: float) -> int:
    """Video frames covering ``num_samples`` audio samples (the last partial frame counts)."""
    return math.ceil(num_samples * fps / sampling_rate)


class AudioEncoder(FloatPretrainedMixin, nn.Module):
    """Waveform (B, N) -> per-frame audio condition (B, T, dim_out).

    The frozen wav2vec2 convolutional features are linearly resampled to the video frame rate
    before its transformer runs; the 12 layer outputs are concatenated layer-major (or only the
    last is used) and projected by Linear -> LayerNorm -> SiLU, the one trained part.
    """

    model_type = "float_audio_encoder"
    release_prefix = "audio_encoder."
    optional_release_groups = ("wav2vec2.",)

    def __init__(self, backbone: Wav2Vec2Model, dim_out: int, feature_dim: int, only_last_features: bool = False,
                 sampling_rate: int = 16000, fps: float = 25.0):
        super().__init__()
        self.wav2vec2 = freeze(backbone)
        self.only_last_features = only_last_features
        self.sampling_rate, self.fps = sampling_rate, fps
        self.audio_projection = audio_projection(feature_dim, dim_out)

    @classmethod
    def from_config(cls, config: FloatConfig, backbone: Wav2Vec2Model) -> "AudioEncoder":
        return cls(backbone, config.dim_a, config.audio_feature_dim, config.only_last_features,
                   config.sampling_rate, config.fps)

    @classmethod
    def from_release(cls, checkpoint, config: FloatConfig, backbone: Wav2Vec2Model | None = None) -> "AudioEncoder":
        """Projection (and wav2vec2, if the file holds it) from a released ``float.pth``;
        the backbone defaults to :func:`load_audio_backbone` of ``config.wav2vec_model_path``."""
        backbone = backbone or load_audio_backbone(config.wav2vec_model_path)
        encoder = cls.from_config(config, backbone)
        encoder.load_release(checkpoint)
        return encoder

    def export_config(self) -> dict:
        proj = self.audio_projection[0]
        return {"backbone": self.wav2vec2.config.to_dict(), "dim_out": proj.out_features,
                "feature_dim": proj.in_features, "only_last_features": self.only_last_features,
                "sampling_rate": self.sampling_rate, "fps": self.fps}

    @classmethod
    def from_export_config(cls, values: dict) -> "AudioEncoder":
        values = dict(values)
        backbone_config = Wav2Vec2Config.from_dict(values.pop("backbone"))
        return cls(uninitialised(lambda: Wav2Vec2Model(backbone_config)), **values)

    def train(self, mode: bool = True) -> "AudioEncoder":
        super().train(mode)
        self.wav2vec2.eval()  # frozen: no dropout, layer drop or spec-augment masking
        return self

    def fit_length(self, audio: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Right-pad (repeating the last sample) or crop the waveform to exactly ``num_frames`` frames."""
        target = round(num_frames * self.sampling_rate / self.fps)
        if audio.shape[-1] < target:
            return F.pad(audio[:, None], (0, target - audio.shape[-1]), mode="replicate")[:, 0]
        return audio[:, :target]

    @torch.no_grad()
    def features(self, audio: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(B, N) normalised waveform -> (B, num_frames, 12 * hidden) wav2vec2 features."""
        if audio.dim() != 2:
            raise AudioFeatureError(f"audio must be (batch, samples), got shape {tuple(audio.shape)}")
        model = self.wav2vec2
        conv = model.feature_extractor(self.fit_length(audio, num_frames))  # (B, C, ~2T)
        conv = F.interpolate(conv, size=num_frames, mode="linear", align_corners=True).transpose(1, 2)
        hidden, _ = model.feature_projection(conv)
        if self.only_last_features:
            return model.encoder(hidden).last_hidden_state
        layer_outputs: list[torch.Tensor] = []

        def record(_module, _inputs, output):
            layer_outputs.append(output[0] if isinstance(output, tuple) else output)

        handles = [layer.register_forward_hook(record) for layer in model.encoder.layers]
        try:
            model.encoder(hidden)
        finally:
            for handle in handles:
                handle.remove()
        return torch.cat(layer_outputs, dim=-1)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        expected = self.audio_projection[0].in_features
        if features.shape[-1] != expected:
            raise AudioFeatureError(f"audio features have width {features.shape[-1]} but the audio projection "
                                    f"expects {expected} (FloatConfig.audio_feature_dim)")
        return self.audio_projection(features.to(self.audio_projection[0].weight.dtype))

    def forward(self, audio: torch.Tensor, num_frames: int) -> torch.Tensor:
        return self.project(self.features(audio, num_frames))


class EmotionHead(nn.Module):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(getattr(config, "final_dropout", 0.0))
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(pooled)))))


class SpeechEmotionClassifier(Wav2Vec2PreTrainedModel):
    """wav2vec2 + pooled classification head (the layout of the released emotion checkpoint:
    ``wav2vec2.*``, ``classifier.dense``, ``classifier.out_proj``); returns logits."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__(config)
        self.pooling_mode = getattr(config, "pooling_mode", "mean")
        if self.pooling_mode not in ("mean", "sum", "max"):
            raise ValueError(f"emotion classifier: unknown pooling_mode {self.pooling_mode!r}")
        self.wav2vec2 = Wav2Vec2Model(config)
        self.classifier = EmotionHead(config)
        self.post_init()

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        hidden = self.wav2vec2(input_values).last_hidden_state
        if self.pooling_mode == "mean":
            pooled = hidden.mean(dim=1)
        elif self.pooling_mode == "sum":
            pooled = hidden.sum(dim=1)
        else:
            pooled = hidden.max(dim=1).values
        return self.classifier(pooled)


class EmotionEncoder(FloatPretrainedMixin, nn.Module):
    """Waveform -> emotion probabilities over the classifier's labels, or a one-hot label."""

    model_type = "float_emotion_encoder"
    release_prefix = "emotion_encoder."
    optional_release_groups = ("wav2vec2_for_emotion.",)

    def __init__(self, classifier: SpeechEmotionClassifier):
        super().__init__()
        self.wav2vec2_for_emotion = freeze(classifier)
        id2label = classifier.config.id2label
        self.labels = tuple(str(id2label[i]).lower() for i in range(len(id2label)))

    @classmethod
    def from_release(cls, checkpoint, config: FloatConfig,
                     classifier: SpeechEmotionClassifier | None = None) -> "EmotionEncoder":
        classifier = classifier or load_emotion_classifier(config.audio2emotion_path)
        encoder = cls(classifier)
        encoder.load_release(checkpoint)
        return encoder

    def export_config(self) -> dict:
        return {"classifier": self.wav2vec2_for_emotion.config.to_dict()}

    @classmethod
    def from_export_config(cls, values: dict) -> "EmotionEncoder":
        config = Wav2Vec2Config.from_dict(values["classifier"])
        return cls(uninitialised(lambda: SpeechEmotionClassifier(config)))

    def train(self, mode: bool = True) -> "EmotionEncoder":
        super().train(mode)
        self.wav2vec2_for_emotion.eval()
        return self

    @torch.no_grad()
    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, N) normalised waveform (the whole clip) -> (B, num_labels) probabilities."""
        return self.wav2vec2_for_emotion(audio).softmax(dim=-1)

    def one_hot(self, label: str, batch: int, device=None) -> torch.Tensor:
        name = label.lower()
        if name not in self.labels:
            raise ValueError(f"unknown emotion {label!r}; choose from {list(self.labels)} or 'S2E' to predict it")
        return F.one_hot(torch.full((batch,), self.labels.index(name), device=device), len(self.labels)).float()

    def condition(self, audio: torch.Tensor, emotion: str | None = None) -> torch.Tensor:
        """(B, 1, num_labels): predicted from the audio (emotion None or 'S2E'), else the label's one-hot."""
        if emotion is None or emotion.lower() in PREDICT_EMOTION:
            return self(audio)[:, None]
        return self.one_hot(emotion, audio.shape[0], audio.device)[:, None]


def release_backbone_configs() -> tuple[Wav2Vec2Config, Wav2Vec2Config]:
    """Architectures of the two released wav2vec2 models (wav2vec2-base-960h and the
    wav2vec2-large-xlsr emotion classifier), to build them without their folders, e.g. on the
    meta device. Weights still come from a checkpoint."""
    audio = Wav2Vec2Config()  # the library defaults are wav2vec2-base
    emotion = Wav2Vec2Config(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True,
        num_labels=len(EMOTION_LABELS), id2label=dict(enumerate(EMOTION_LABELS)),
        label2id={name: i for i, name in enumerate(EMOTION_LABELS)}, pooling_mode="mean", final_dropout=0.0)
    return audio, emotion
