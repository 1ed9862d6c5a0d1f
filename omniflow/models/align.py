"""VAE latent alignment: a small conv net that maps one diffusers VAE's latent space into another's.

``AlignModule`` is the trainable part. It reads the source VAE's latent, the image, or both:
the image goes through a stride-2 conv stem ``downsample_times`` times to reach latent
resolution, the latent through a 3x3 conv; both are fused by a 1x1 conv, refined by residual
blocks, and projected to the target channels. With a latent input a linear 1x1 shortcut maps
the source latent straight to the target channels and the (zero-initialised) conv head learns a
correction on top, so training starts from a linear channel mix instead of from zero.

``AlignPipeline`` holds the two frozen ``AutoencoderKL``s and the module. All latents here are
*scaled* latents as the diffusion models see them, ``z = (mean - shift) * scale`` (see
:func:`latent_affine`), and are taken from ``latent_dist.mean`` rather than a sample, so
training targets are deterministic.

VAEs load through :func:`omniflow.runtime.hub.resolve_model_path` (local folder, Hub id or
``download_models.py`` name). A trained module is exported as ``model.safetensors`` plus a
``config.json`` from :func:`export_config` and rebuilt by :func:`load_aligned_pipeline`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from omniflow.data.images import to_model_range
from omniflow.runtime.errors import CheckpointError, ConfigError
from omniflow.runtime.export import CONFIG_NAME, load_export, load_state_dict_strict
from omniflow.runtime.hub import resolve_model_path
from omniflow.runtime.paths import path_to_record, resolve_recorded
from omniflow.runtime.weights import load_pretrained

from .align_options import DIRECTIONS, INPUT_TYPES, LOSS_TYPES



class AlignConfigError(ConfigError):
    """Alignment options that do not fit each other or the two VAEs."""


class VAELoadError(CheckpointError):
    """A VAE folder that exists but does not load as an ``AutoencoderKL`` (names the path and subfolder)."""


@dataclass(frozen=True)
class VAESource:
    """Where a VAE comes from: a local folder or Hub id, plus an optional subfolder."""

    path: str
    subfolder: str | None = None

    def __str__(self) -> str:
        return f"{self.path} (subfolder {self.subfolder})" if self.subfolder else self.path


def load_vae(path_or_id: str, subfolder: str | None = None, cache_dir: str | None = None,
             dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """Load a frozen ``AutoencoderKL`` from a local folder, a Hub id or a ``download_models.py`` name.

    The folder comes from :func:`omniflow.runtime.hub.resolve_model_path`, so a model that is
    neither local nor downloadable (offline, gated) raises its one-line ``MissingModelError``
    naming the ``download_models.py`` command.
    """
    folder = resolve_model_path(path_or_id, subfolder or None, cache_dir)
    try:
        vae = load_pretrained(AutoencoderKL, folder, torch_dtype=dtype)
    except (OSError, ValueError) as err:  # diffusers reports missing/broken files as OSError
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VAELoadError(f"cannot load AutoencoderKL from {VAESource(path_or_id, subfolder)}: {reason}") from err
    return vae.eval().requires_grad_(False)


def _vae_name(vae: AutoencoderKL) -> str:
    return str(vae.config.get("_name_or_path") or "<VAE built in memory>")


def vae_downsample_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell along one side (8 for SD1.5 and FLUX)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_affine(vae: AutoencoderKL) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shift, scale)`` with ``z = (mean - shift) * scale``, each broadcastable to ``[B, C, H, W]``.

    Follows the VAE config: ``scaling_factor`` always; ``shift_factor`` when set (FLUX, SD3);
    per-channel ``latents_mean``/``latents_std`` when set (SDXL-style pipelines use
    ``(mean - latents_mean) * scaling_factor / latents_std``).
    """
    cfg = vae.config
    channel_stats = cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None
    if channel_stats and cfg.get("shift_factor") is not None:
        raise AlignConfigError(f"VAE {_vae_name(vae)} sets both shift_factor and latents_mean/std; "
                               "only one latent normalisation is supported")
    if channel_stats:
        shift = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1)
        scale = cfg.scaling_factor / torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1)
        return shift, scale
    shift = cfg.get("shift_factor") or 0.0
    return torch.tensor(float(shift)), torch.tensor(float(cfg.scaling_factor))


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (or uint8) -> scaled float32 latents from the posterior mean."""
    if images.dtype == torch.uint8:
        images = to_model_range(images)
    mean = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean.float()
    shift, scale = (t.to(mean.device) for t in latent_affine(vae))
    return (mean - shift) * scale


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> float32 images in about [-1, 1] (inverse of :func:`encode_latents`)."""
    latents = latents.float()
    shift, scale = (t.to(latents.device) for t in latent_affine(vae))
    return vae.decode((latents / scale + shift).to(vae.device, vae.dtype)).sample.float()


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResidualBlock(nn.Module):
    """Pre-norm residual block: x + conv(silu(norm(conv(silu(norm(x))))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            _group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            _group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class AlignModule(nn.Module):
    """Maps a source latent and/or an image to a target latent (see the module docstring)."""

    def __init__(self, latent_channels: int | None, out_channels: int = 16, hidden_channels: int = 64,
                 num_blocks: int = 2, downsample_times: int = 3,
                 input_types: tuple[str, ...] | list[str] = INPUT_TYPES):
        super().__init__()
        input_types = tuple(input_types)
        if not input_types or len(set(input_types)) < len(input_types) or not set(input_types) <= set(INPUT_TYPES):
            raise AlignConfigError(f"input_types must be a non-empty subset of {INPUT_TYPES}, got {input_types}")
        if "latent" in input_types and not latent_channels:
            raise AlignConfigError("input_types includes 'latent' but latent_channels is not set")
        if min(out_channels, hidden_channels, num_blocks) < 1 or downsample_times < 0:
            raise AlignConfigError("out_channels, hidden_channels and num_blocks must be >= 1 and "
                                   f"downsample_times >= 0, got {out_channels}, {hidden_channels}, "
                                   f"{num_blocks}, {downsample_times}")
        self.input_types = input_types
        self.latent_channels = latent_channels if "latent" in input_types else None
        self.out_channels, self.hidden_channels = out_channels, hidden_channels
        self.num_blocks, self.downsample_times = num_blocks, downsample_times
        h = hidden_channels
        if "image" in input_types:
            stages = [m for _ in range(downsample_times) for m in (nn.Conv2d(h, h, 3, stride=2, padding=1),
                                                                    ResidualBlock(h))]
            self.image_stem = nn.Sequential(nn.Conv2d(3, h, 3, padding=1), *stages)
        if "latent" in input_types:
            self.latent_stem = nn.Conv2d(latent_channels, h, 3, padding=1)
            self.shortcut = nn.Conv2d(latent_channels, out_channels, 1)
        self.fuse = nn.Conv2d(2 * h, h, 1) if len(input_types) == 2 else nn.Identity()
        self.blocks = nn.Sequential(*(ResidualBlock(h) for _ in range(num_blocks)))
        self.head = nn.Sequential(_group_norm(h), nn.SiLU(), nn.Conv2d(h, out_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    @property
    def config(self) -> dict:
        """Constructor arguments, JSON-serialisable (for exports)."""
        return {"latent_channels": self.latent_channels, "out_channels": self.out_channels,
                "hidden_channels": self.hidden_channels, "num_blocks": self.num_blocks,
                "downsample_times": self.downsample_times, "input_types": list(self.input_types)}

    def forward(self, image: torch.Tensor | None = None, latent: torch.Tensor | None = None) -> torch.Tensor:
        features = []
        if "image" in self.input_types:
            if image is None:
                raise ValueError("AlignModule was built with input_types including 'image' but got no image")
            step = 2 ** self.downsample_times
            if image.shape[-2] % step or image.shape[-1] % step:
                raise AlignConfigError(f"image size {tuple(image.shape[-2:])} is not divisible by "
                                 f"2**downsample_times = {step}")
            features.append(self.image_stem(image))
        if "latent" in self.input_types:
            if latent is None:
                raise ValueError("AlignModule was built with input_types including 'latent' but got no latent")
            features.append(self.latent_stem(latent))
        if len(features) == 2 and features[0].shape[-2:] != features[1].shape[-2:]:
            raise ValueError(f"image features {tuple(features[0].shape[-2:])} and latent "
                             f"{tuple(features[1].shape[-2:])} differ in spatial size")
        out = self.head(self.blocks(self.fuse(torch.cat(features, dim=1))))
        return out + self.shortcut(latent) if "latent" in self.input_types else out


def latent_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "mse",
                loss_weight: float = 1.0) -> torch.Tensor:
    """``loss_weight`` times the chosen latent-space loss (computed in float32).

    ``weighted_l1`` is an L1 loss whose channels are weighted by the inverse of the target's
    per-channel standard deviation in the batch (weights detached, normalised to mean 1, each
    channel's std floored at 1% of the mean std). Latent channels of e.g. FLUX differ several-fold
    in spread; without the weights the wide channels dominate and the narrow ones stay poorly
    aligned, although the decoder is sensitive to all of them.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} does not match "
                         f"target latent shape {tuple(target.shape)}")
    pred, target = pred.float(), target.float()
    if loss_type == "mse":
        loss = F.mse_loss(pred, target)
    elif loss_type == "l1":
        loss = F.l1_loss(pred, target)
    elif loss_type == "weighted_l1":
        weights = channel_weights(target.detach().std(dim=(0, 2, 3), keepdim=True))
        loss = (weights * (pred - target).abs()).mean()
    else:
        raise AlignConfigError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    return loss_weight * loss


def channel_weights(std: torch.Tensor) -> torch.Tensor:
    """``weighted_l1``'s channel weights: inverse target std (floored at 1% of the mean std), mean 1."""
    weights = 1.0 / std.clamp_min(0.01 * std.mean())
    return weights / weights.mean()


def set_latent_loss(squared_error: torch.Tensor, absolute_error: torch.Tensor, target_std: torch.Tensor,
                    elements: torch.Tensor, loss_type: str = "mse", loss_weight: float = 1.0) -> torch.Tensor:
    """:func:`latent_loss` of a whole set from its per-channel sums of squared and absolute errors,
    with the set's per-channel target std in place of a batch's (``weighted_l1``)."""
    per_channel = {"mse": squared_error, "l1": absolute_error,
                   "weighted_l1": absolute_error * channel_weights(target_std)}[loss_type]
    return loss_weight * per_channel.sum() / elements


class AlignPipeline:
    """Two frozen VAEs plus the trainable :class:`AlignModule` for one direction.

    Not an ``nn.Module`` on purpose: only ``pipeline.module`` is trained, so only it goes to the
    optimizer and ``accelerator.prepare`` (the frozen VAEs stay out of DDP/ZeRO wrapping; a
    prepared module may be assigned back to ``pipeline.module``).
    Images may be uint8 or float in [-1, 1]; latents are scaled (see the module docstring).
    """

    def __init__(self, vae1: AutoencoderKL, vae2: AutoencoderKL, *, direction: str = "vae1_to_vae2",
                 loss_type: str = "mse", loss_weight: float = 1.0, vae1_source: VAESource | None = None,
                 vae2_source: VAESource | None = None, hidden_channels: int = 64, out_channels: int = 16,
                 num_blocks: int = 2, downsample_times: int = 3,
                 input_types: tuple[str, ...] | list[str] = INPUT_TYPES):
        if direction not in DIRECTIONS:
            raise AlignConfigError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
        if loss_type not in LOSS_TYPES:
            raise AlignConfigError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
        self.vaes = {"vae1": vae1.eval().requires_grad_(False), "vae2": vae2.eval().requires_grad_(False)}
        self.sources = {"vae1": vae1_source or VAESource(_vae_name(vae1)),
                        "vae2": vae2_source or VAESource(_vae_name(vae2))}
        self.direction, self.loss_type, self.loss_weight = direction, loss_type, loss_weight
        self.source_key, self.target_key = ("vae1", "vae2") if direction == "vae1_to_vae2" else ("vae2", "vae1")
        source, target = self.source_vae, self.target_vae
        for vae in (source, target):
            latent_affine(vae)  # refuses an ambiguous latent normalisation now rather than mid-run
        target_name = f"{self.target_key} {self.sources[self.target_key]}"
        if out_channels != target.config.latent_channels:
            raise AlignConfigError(f"out_channels={out_channels} but the target VAE {target_name} has "
                                   f"latent_channels={target.config.latent_channels}; set out_channels "
                                   f"to {target.config.latent_channels}")
        factor = vae_downsample_factor(target)
        if "image" in input_types and 2 ** downsample_times != factor:
            raise AlignConfigError(f"downsample_times={downsample_times} gives 1/{2 ** downsample_times} "
                                   f"resolution but the target VAE {target_name} downsamples by {factor}")
        if "latent" in input_types and vae_downsample_factor(source) != factor:
            raise AlignConfigError(f"the source VAE {self.sources[self.source_key]} downsamples by "
                                   f"{vae_downsample_factor(source)} but the target VAE {target_name} by {factor}")
        self.module = AlignModule(source.config.latent_channels, out_channels, hidden_channels,
                                  num_blocks, downsample_times, input_types)
        # kept here: a DDP/DeepSpeed wrapper assigned to self.module hides the module's attributes
        self.input_types, self.module_config = self.module.input_types, self.module.config

    @classmethod
    def from_pretrained(cls, vae1_path: str, vae2_path: str, vae1_subfolder: str | None = None,
                        vae2_subfolder: str | None = None, cache_dir: str | None = None,
                        vae_dtype: torch.dtype = torch.float32, **kwargs) -> "AlignPipeline":
        """Load both VAEs with :func:`load_vae` and build the pipeline (``kwargs`` as ``__init__``).
        Local VAE folders are recorded as absolute paths: exports then load from any working directory."""
        sources = (VAESource(path_to_record(vae1_path), vae1_subfolder),
                   VAESource(path_to_record(vae2_path), vae2_subfolder))
        vae1, vae2 = (load_vae(s.path, s.subfolder, cache_dir, vae_dtype) for s in sources)
        return cls(vae1, vae2, vae1_source=sources[0], vae2_source=sources[1], **kwargs)

    @classmethod
    def from_config(cls, config: dict, cache_dir: str | None = None,
                    vae_dtype: torch.dtype = torch.float32) -> "AlignPipeline":
        """Rebuild from :attr:`config` (loads the VAEs; the module weights are loaded separately)."""
        module = {k: v for k, v in config["module"].items() if k != "latent_channels"}  # read from the VAE
        vae1, vae2 = config["vae1"], config["vae2"]
        return cls.from_pretrained(vae1["path"], vae2["path"], vae1["subfolder"], vae2["subfolder"], cache_dir,
                                   vae_dtype, direction=config["direction"], loss_type=config["loss_type"],
                                   loss_weight=config["loss_weight"], **module)

    @property
    def config(self) -> dict:
        """Everything needed to rebuild this pipeline, JSON-serialisable."""
        return {"vae1": asdict(self.sources["vae1"]), "vae2": asdict(self.sources["vae2"]),
                "direction": self.direction, "loss_type": self.loss_type, "loss_weight": self.loss_weight,
                "module": self.module_config}

    @property
    def source_vae(self) -> AutoencoderKL:
        return self.vaes[self.source_key]

    @property
    def target_vae(self) -> AutoencoderKL:
        return self.vaes[self.target_key]

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def to(self, device: torch.device | str) -> "AlignPipeline":
        """Move the module and both VAEs (VAEs keep their dtype)."""
        self.module.to(device)
        for vae in self.vaes.values():
            vae.to(device)
        return self

    def encode_source(self, images: torch.Tensor) -> torch.Tensor:
        return encode_latents(self.source_vae, images)

    def encode_target(self, images: torch.Tensor) -> torch.Tensor:
        return encode_latents(self.target_vae, images)

    def decode_source(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.source_vae, latents)

    def decode_target(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.target_vae, latents)

    def predict(self, images: torch.Tensor | None, source_latent: torch.Tensor | None = None) -> torch.Tensor:
        """The aligned (target-space) latent; encodes the source latent when it is needed and not given."""
        image = None
        if "image" in self.input_types:
            if images is None:
                raise ValueError("this alignment module takes images, but predict() got images=None")
            image = (to_model_range(images) if images.dtype == torch.uint8 else images).to(self.device)
        if "latent" in self.input_types and source_latent is None:
            if images is None:
                raise ValueError("predict() needs images or source_latent")
            source_latent = self.encode_source(images)
        latent = None if source_latent is None or "latent" not in self.input_types else source_latent.to(self.device)
        return self.module(image=image, latent=latent)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return latent_loss(pred, target, self.loss_type, self.loss_weight)

    def training_loss(self, images: torch.Tensor | None, source_latent: torch.Tensor | None = None,
                      target_latent: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of one batch; pass cached latents to skip the VAE encodes."""
        if target_latent is None:
            if images is None:
                raise ValueError("training_loss() needs images or target_latent")
            target_latent = self.encode_target(images)
        return self.loss(self.predict(images, source_latent), target_latent.to(self.device))


EXPORT_FORMAT = "omniflow-align-v1"


def export_config(pipeline: AlignPipeline, resolution: int, **extra) -> dict:
    """The ``config.json`` of an exported module: how to rebuild the pipeline, plus ``extra`` facts."""
    return {"format": EXPORT_FORMAT, "pipeline": pipeline.config, "resolution": resolution, **extra}


def load_aligned_pipeline(path: str | Path, cache_dir: str | None = None,
                          vae_dtype: torch.dtype = torch.float32) -> tuple[AlignPipeline, dict]:
    """Rebuild a pipeline from an export (folder or its ``model.safetensors``); returns it and the config.

    The VAEs load from the paths recorded in the export; no training state is needed.
    """
    state, config = load_export(path)
    if config.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path}: config.json has format {config.get('format')!r}, "
                              f"not an alignment export ({EXPORT_FORMAT})")
    record = Path(path) / CONFIG_NAME if Path(path).is_dir() else Path(path).with_name(CONFIG_NAME)
    for key in ("vae1", "vae2"):
        config["pipeline"][key]["path"] = resolve_recorded(config["pipeline"][key]["path"], record)
    pipeline = AlignPipeline.from_config(config["pipeline"], cache_dir, vae_dtype)
    load_state_dict_strict(pipeline.module, state, str(path))
    return pipeline, config
