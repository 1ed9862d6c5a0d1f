"""Options of the FLOAT model (audio-driven talking portrait by motion-latent flow matching).

Field names and defaults follow the released FLOAT options, so a released ``float.pth`` loads
with ``FloatConfig()``. Every field carries ``metadata["help"]`` for the shared option parser.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...runtime.errors import ConfigError

if TYPE_CHECKING:  # imported where used: the options parse without torch
    from ...flow.guidance import GuidanceScales
    from ...flow.sampler import FlowSampler

ODE_METHODS = ("euler", "midpoint", "rk4", "dopri5")
EMOTION_LABELS = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")


class FloatConfigError(ConfigError):
    """An inconsistent FLOAT option value."""


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class FloatConfig:
    # motion auto-encoder
    input_size: int = _opt(512, "square image size of the motion auto-encoder (power of two, >= 8)")
    dim_w: int = _opt(512, "motion latent / appearance code width (style width of the motion auto-encoder)")
    dim_m: int = _opt(20, "number of orthogonal motion basis directions (motion coefficients)")
    motion_channels: int = _opt(512, "motion auto-encoder width at <= 32 px; it halves at every doubling above "
                                     "32 px (release 512; the tiny reference file uses 64)")
    # conditions
    dim_a: int = _opt(512, "audio condition width (output of the audio projection)")
    dim_e: int = _opt(7, "emotion condition width (number of speech-emotion labels)")
    sampling_rate: int = _opt(16000, "audio sampling rate in Hz")
    fps: float = _opt(25.0, "video frame rate; the audio features are resampled to it")
    wav2vec_sec: float = _opt(2.0, "window length L in seconds; frames per window = int(wav2vec_sec * fps)")
    audio_marcing: int = _opt(2, "adjacent audio frames option of the released options file; kept so those "
                                 "files parse, the model does not read it")
    only_last_features: bool = _opt(False, "use only the last wav2vec2 layer instead of all 12 layers")
    audio_feature_dim: int = _opt(9216, "input width of the audio projection: wav2vec2 width x 12 layers "
                                        "(768 with only_last_features on wav2vec2-base)")
    # Hub ids: omniflow.runtime.hub finds them under models/ (download_models.py), in the Hub
    # cache, or downloads them; the release's ./checkpoints/<name> folders work as paths too.
    wav2vec_model_path: str = _opt("facebook/wav2vec2-base-960h",
                                   "folder or hub id of the frozen wav2vec2 audio encoder")
    audio2emotion_path: str = _opt("r-f/wav2vec-english-speech-emotion-recognition",
                                   "folder or hub id of the wav2vec2 speech-emotion classifier")
    # flow matching transformer
    dim_h: int = _opt(1024, "FMT hidden width")
    fmt_depth: int = _opt(8, "number of FMT blocks", aliases=["--fmt-depth"])
    num_heads: int = _opt(8, "attention heads per FMT block")
    mlp_ratio: float = _opt(4.0, "FMT MLP width / hidden width")
    num_prev_frames: int = _opt(10, "previous frames fed to the FMT for window-to-window continuity")
    attention_window: int = _opt(2, "each frame attends to frames t-w .. t+w in every FMT block")
    # condition dropout (training)
    audio_dropout_prob: float = _opt(0.1, "probability of dropping the audio condition of a training sample")
    ref_dropout_prob: float = _opt(0.1, "probability of dropping the reference condition of a training sample")
    emotion_dropout_prob: float = _opt(0.1, "probability of dropping the emotion condition of a training sample")
    prev_dropout_prob: float = _opt(0.5, "probability of dropping the previous frames (and their audio)")
    # sampling
    nfe: int = _opt(10, "number of velocity-field evaluations of the ODE solver per window "
                        "(fixed-step methods; dopri5 is adaptive and uses ode_atol/ode_rtol)")
    torchdiffeq_ode_method: str = _opt("euler", "torchdiffeq ODE solver", choices=ODE_METHODS)
    ode_atol: float = _opt(1e-5, "absolute tolerance of adaptive ODE solvers")
    ode_rtol: float = _opt(1e-5, "relative tolerance of adaptive ODE solvers")
    a_cfg_scale: float = _opt(2.0, "classifier-free guidance scale of the audio condition")
    e_cfg_scale: float = _opt(1.0, "classifier-free guidance scale of the emotion condition")
    r_cfg_scale: float = _opt(1.0, "classifier-free guidance scale of the reference (identity motion) condition")

    @property
    def window(self) -> int:
        """Frames generated per window (truncated like the release: 2.0 s x 25 fps = 50)."""
        return int(self.wav2vec_sec * self.fps)

    @property
    def seq_len(self) -> int:
        """FMT sequence length: previous frames + window."""
        return self.num_prev_frames + self.window

    def motion_channel_table(self) -> dict[int, int]:
        """Width of the motion auto-encoder at each resolution from 4 px to input_size."""
        sizes = [2 ** i for i in range(2, int(math.log2(self.input_size)) + 1)]
        return {s: self.motion_channels if s <= 32 else max(1, self.motion_channels * 32 // s) for s in sizes}

    def guidance_scales(self) -> GuidanceScales:
        from ...flow.guidance import GuidanceScales
        return GuidanceScales(audio=self.a_cfg_scale, emotion=self.e_cfg_scale, reference=self.r_cfg_scale)

    def sampler(self, nfe: int | None = None, method: str | None = None) -> FlowSampler:
        """The ODE sampler of these options; ``nfe`` / ``method`` override them."""
        from ...flow.sampler import FlowSampler
        return FlowSampler(method=method or self.torchdiffeq_ode_method, nfe=nfe or self.nfe, atol=self.ode_atol,
                           rtol=self.ode_rtol)

    def validate(self) -> None:
        problems = []
        if self.input_size < 8 or self.input_size & (self.input_size - 1):
            problems.append(f"input_size={self.input_size} must be a power of two >= 8")
        if self.dim_h % self.num_heads:
            problems.append(f"dim_h={self.dim_h} is not divisible by num_heads={self.num_heads}")
        if self.window < 1:
            problems.append(f"wav2vec_sec*fps={self.wav2vec_sec * self.fps} gives no frame per window")
        if self.num_prev_frames < 0 or self.attention_window < 0:
            problems.append("num_prev_frames and attention_window must be >= 0")
        if self.torchdiffeq_ode_method not in ODE_METHODS:
            problems.append(f"torchdiffeq_ode_method={self.torchdiffeq_ode_method!r} is not one of {ODE_METHODS}")
        if self.nfe < 1:
            problems.append(f"nfe={self.nfe} must be >= 1")
        for name in ("audio_dropout_prob", "ref_dropout_prob", "emotion_dropout_prob", "prev_dropout_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}={getattr(self, name)} is not a probability")
        if problems:
            raise FloatConfigError("FloatConfig: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "FloatConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise FloatConfigError(f"{source}: unknown FLOAT option(s) {unknown}")
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def preset(cls, name: str, **overrides) -> "FloatConfig":
        """``release`` (the published model), ``small`` (quick single-GPU runs) or ``tiny``
        (the shape of the tiny reference checkpoint used by the tests)."""
        if name not in PRESETS:
            raise FloatConfigError(f"unknown FLOAT preset {name!r}; choose from {sorted(PRESETS)}")
        config = dataclasses.replace(cls(), **{**PRESETS[name], **overrides})
        config.validate()
        return config


PRESETS: dict[str, dict] = {
    "release": {},
    "small": dict(input_size=256, dim_w=256, dim_a=256, dim_h=384, dim_m=20, motion_channels=256,
                  fmt_depth=4, num_heads=6, num_prev_frames=10),
    "tiny": dict(input_size=128, dim_w=32, dim_a=32, dim_h=48, dim_m=10, motion_channels=64,
                 fmt_depth=2, num_heads=4, num_prev_frames=5, wav2vec_sec=0.48),
}
