"""``param.json``: the seed project's VQ training config, read and checked key by key.

    {"model_type": "VQVAE2", "use_images": true, "scaling_rates": [4, 2],
     "model_args": {...}, "data_args": {...}, "train_args": {...},
     "data_process": {"train": "data/train", "valid": "data/valid"},
     "use_wandb": false, "project_name": "vq"}

``model_args`` belong to the model family (the model checks them); a top-level
``scaling_rates`` is merged into them. ``train_args`` takes the seed's names and, under their
own names, the runtime's ``TrainingOptions`` (``mixed_precision``, ``max_grad_norm``...); the
seed names that mean a runtime option are translated (``num_steps`` -> ``max_train_steps``,
``folder_name`` -> ``output_dir``, ``save_interval`` -> ``checkpointing_steps``...). Any unknown
or mistyped key fails with one line naming the file, the section and the key.

With a taming ``lossconfig`` the optimisers default to taming's: one learning rate (``disc_lr`` =
``lr``) and Adam betas (0.5, 0.9) for the autoencoder and the discriminator.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omniflow.runtime.errors import ConfigError
from omniflow.runtime.options import load_config_file
from omniflow.runtime.run import TrainingOptions

from omniflow.data.video import ImageFrameDataset, VideoClipDataset, list_images, list_videos

from .base import VQConfigError, VQTokenizer, resolve_args
from .losses import VQGANLoss, build_vq_loss
from .registry import build_vq_model, families_accepting, model_arg_names, model_family

logger = logging.getLogger("omniflow")


class ParamConfigError(ConfigError):
    """A ``param.json`` key that is unknown, mistyped, misplaced or inconsistent."""


_TOP_DEFAULTS: dict[str, Any] = {
    "model_type": "VqVae", "use_images": False, "scaling_rates": None, "model_args": {}, "data_args": {},
    "train_args": {}, "data_process": {}, "use_wandb": False, "project_name": None,
}
_TOP_TYPES = {"scaling_rates": list, "project_name": str}

_DATA_DEFAULTS: dict[str, Any] = {
    "batch_size": 4, "val_batch_size": None, "image_size": None, "sequence_length": None, "seed": None,
    "num_threads": None, "training_data_files": None, "validation_data_files": None,
    # The seed's DALI settings: accepted so its configs load, unused (accelerate assigns devices and shards).
    "device_id": None, "shard_id": None, "num_shards": None, "initial_prefetch_size": None,
}
_DATA_TYPES = {"val_batch_size": int, "sequence_length": int, "seed": int, "num_threads": int,
               "training_data_files": list, "validation_data_files": list, "device_id": int, "shard_id": int,
               "num_shards": int, "initial_prefetch_size": int}
_UNUSED_DATA_KEYS = ("device_id", "shard_id", "num_shards", "initial_prefetch_size")

_TRAIN_DEFAULTS: dict[str, Any] = {
    "num_steps": None, "lr": 1e-4, "beta1": 0.9, "beta2": 0.999, "lr_decay": 0.99, "lr_decay_steps": 1000,
    "folder_name": None, "checkpoint_path": None, "save_interval": None, "wandb_log_interval": None,
    "wandb_image_interval": None,
    "device": "auto", "validation_interval": 1000,
    # losses (the non-taming path; a taming lossconfig sets these itself)
    "use_taming_loss": None, "use_gan": True, "disc_start": 20000, "disc_factor": 1.0, "disc_weight": 1.0,
    "disc_loss": "hinge", "pixel_loss": None, "pixel_loss_factor": 1.0, "perceptual_loss_factor": None,
    "codebook_weight": 1.0, "adaptive_weight": True, "disc_every": 3,
    "disc_lr": 1e-5, "disc_beta1": 0.5, "disc_beta2": 0.9, "lpips_net": "vgg", "lpips_weights_path": None,
    # validation
    "val_lpips_net": "alex", "val_lpips_weights_path": None, "compute_fid": True, "fid_weights_path": None,
    "num_grid_images": 8,
}
_TRAIN_TYPES = {"num_steps": int, "folder_name": str, "checkpoint_path": str, "save_interval": int,
                "wandb_log_interval": int, "wandb_image_interval": int, "use_taming_loss": bool, "pixel_loss": str, "perceptual_loss_factor": float,
                "lpips_weights_path": str, "val_lpips_weights_path": str, "fid_weights_path": str}
# Optimiser settings of taming's VQModel.configure_optimizers (one lr, Adam betas (0.5, 0.9) for both networks):
# the defaults when a taming lossconfig is used ("disc_lr" follows "lr"); train_args may still set each.
_TAMING_OPTIMIZER = {"beta1": 0.5, "beta2": 0.9, "disc_lr": None, "disc_beta1": 0.5, "disc_beta2": 0.9}
# Loss keys a taming lossconfig governs; set in train_args as well they are ignored (with a warning).
_TAMING_GOVERNED = ("use_gan", "disc_start", "disc_factor", "disc_weight", "disc_loss", "pixel_loss",
                    "pixel_loss_factor", "perceptual_loss_factor", "codebook_weight")

# (section, seed name) -> TrainingOptions field
_RUNTIME_ALIASES = {
    ("train_args", "num_steps"): "max_train_steps", ("train_args", "folder_name"): "output_dir",
    ("train_args", "checkpoint_path"): "resume_from_checkpoint", ("train_args", "save_interval"): "checkpointing_steps",
    ("train_args", "wandb_log_interval"): "logging_steps", ("data_args", "seed"): "seed",
    ("data_args", "num_threads"): "dataloader_num_workers",
}


def _runtime_types() -> dict[str, type]:
    """TrainingOptions field -> the JSON type its value must have (Optional stripped)."""
    hints = typing.get_type_hints(TrainingOptions)
    types = {}
    for f in dataclasses.fields(TrainingOptions):
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
        types[f.name] = args[0] if args else hints[f.name]
    return types


_RUNTIME_TYPES = _runtime_types()


@dataclass
class VQParams:
    """A checked ``param.json``: every section resolved over its defaults."""

    source: str
    model_type: str
    family: str  # canonical family name of model_type
    model_args: dict[str, Any]
    use_images: bool
    data: dict[str, Any]
    train: dict[str, Any]
    train_sources: list[str]  # folders (data_process) or files (data_args.*_data_files)
    valid_sources: list[str]
    sources_are_folders: bool
    runtime: dict[str, Any]  # TrainingOptions values set by this file
    given_train_keys: frozenset[str]

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.data["image_size"]
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def sequence_length(self) -> int:
        return self.data["sequence_length"] or (1 if self.use_images else 8)

    @property
    def uses_taming_loss(self) -> bool:
        return bool(self.model_args.get("lossconfig")) and self.train["use_taming_loss"] is not False

    def resolved(self) -> dict[str, Any]:
        """The file with every default filled in (written next to the run's outputs)."""
        sources = ({"train": self.train_sources, "valid": self.valid_sources} if self.sources_are_folders else {})
        return {"model_type": self.model_type, "use_images": self.use_images, "model_args": self.model_args,
                "data_args": self.data, "train_args": self.train, "data_process": sources}


def _section(source: str, name: str, given: Any, defaults: Mapping[str, Any],
             types: Mapping[str, type | tuple[type, ...]]) -> dict[str, Any]:
    if not isinstance(given, Mapping):
        raise ParamConfigError(f"{source}: {name} must be a JSON object, got {type(given).__name__}")
    try:
        return resolve_args(f"{source} {name}", given, defaults, types=types)
    except VQConfigError as err:
        raise ParamConfigError(str(err)) from None


def _model_args(source: str, model_type: str, family: str, given: Any, scaling_rates: list | None) -> dict[str, Any]:
    if not isinstance(given, Mapping):
        raise ParamConfigError(f"{source}: model_args must be a JSON object, got {type(given).__name__}")
    accepted = model_arg_names(model_type)
    for key in given:
        others = families_accepting(key)
        if key not in accepted and others:
            raise ParamConfigError(
                f"{source}: model_args key {key!r} belongs to {'/'.join(others)}, not to {family} (model_type "
                f"{model_type!r}); the seed's shared example mixes families: start from configs/vq/<family>.json")
    args = dict(given)
    if scaling_rates is not None:
        if "scaling_rates" not in accepted:
            raise ParamConfigError(f"{source}: top-level scaling_rates applies to VQVAE2/VQVAE2_OptVQ, not to {family}")
        if "scaling_rates" in args and list(args["scaling_rates"]) != scaling_rates:
            raise ParamConfigError(f"{source}: scaling_rates {scaling_rates} (top level) and {args['scaling_rates']} "
                                   "(model_args) disagree; keep one")
        args["scaling_rates"] = scaling_rates
    return args


def _data_sources(source: str, data_process: Any, data: dict[str, Any]) -> tuple[list[str], list[str], bool]:
    """(train, valid, are_folders): data_process folders win over data_args file lists, as in the seed."""
    process = _section(source, "data_process", data_process, {"train": None, "valid": None, "vaild": None},
                       {"train": (str, list), "valid": (str, list), "vaild": (str, list)})
    if process["valid"] is not None and process["vaild"] is not None:
        raise ParamConfigError(f"{source}: data_process has both 'valid' and 'vaild' (the seed's spelling); keep one")

    def as_list(value: str | list | None) -> list[str]:
        return [] if value is None else [value] if isinstance(value, str) else [str(v) for v in value]

    if process["train"] is not None:
        return as_list(process["train"]), as_list(process["valid"] or process["vaild"]), True
    if data["training_data_files"]:
        return as_list(data["training_data_files"]), as_list(data["validation_data_files"]), False
    raise ParamConfigError(f"{source}: no training data; set data_process.train (a folder) or "
                           "data_args.training_data_files (a list of files)")


def _runtime_values(source: str, top: dict[str, Any], data: dict[str, Any], train: dict[str, Any],
                    given_train: Mapping[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    sections = {"data_args": data, "train_args": train}
    for (section, seed_name), option in _RUNTIME_ALIASES.items():
        value = sections[section][seed_name]
        if value is None:
            continue
        if given_train.get(option) is not None:
            raise ParamConfigError(f"{source}: {section}.{seed_name} and train_args.{option} set the same option; keep one")
        values[option] = value
    values.update({key: value for key, value in given_train.items() if key in _RUNTIME_TYPES and value is not None})
    if top["use_wandb"]:
        if importlib.util.find_spec("wandb") is None:
            raise ParamConfigError(f"{source}: use_wandb is true but the wandb package is not installed "
                                   "(pip install wandb, or set use_wandb to false)")
        values.setdefault("report_to", "all")
    if top["project_name"]:
        values["tracker_project_name"] = top["project_name"]
    return values


def load_param_json(path: str | Path) -> VQParams:
    """Read and check ``param.json``; raises :class:`ParamConfigError` naming the bad key."""
    source = str(path)
    raw = load_config_file(path)
    top = _section(source, "(top level)", raw, _TOP_DEFAULTS, _TOP_TYPES)
    try:
        family = model_family(top["model_type"])
    except VQConfigError as err:
        raise ParamConfigError(f"{source}: {err}") from None
    model_args = _model_args(source, top["model_type"], family, top["model_args"], top["scaling_rates"])
    data = _section(source, "data_args", top["data_args"], _DATA_DEFAULTS,
                    {**_DATA_TYPES, "image_size": (int, list)})
    train = _section(source, "train_args", top["train_args"], {**_TRAIN_DEFAULTS, **dict.fromkeys(_RUNTIME_TYPES)},
                     {**_TRAIN_TYPES, **_RUNTIME_TYPES})
    given_train = dict(top["train_args"])
    for key in ("lr", "disc_lr", "lr_decay", "lr_decay_steps"):  # checked here, before any model is built
        if not (isinstance(train[key], (int, float)) and train[key] > 0):
            raise ParamConfigError(f"{source}: train_args.{key} must be a number > 0, got {train[key]!r}")
    unused = [key for key in _UNUSED_DATA_KEYS if data[key] is not None]
    if unused:
        logger.info("%s: data_args %s are not used here (accelerate assigns devices and shards)", source, unused)
    size = data["image_size"] = 256 if data["image_size"] is None else data["image_size"]
    if isinstance(size, list) and (len(size) != 2 or not all(isinstance(s, int) for s in size)):
        raise ParamConfigError(f"{source}: data_args.image_size must be an int or [height, width], got {size}")
    train_sources, valid_sources, folders = _data_sources(source, top["data_process"], data)
    if train["use_taming_loss"] and not model_args.get("lossconfig"):
        raise ParamConfigError(f"{source}: train_args.use_taming_loss is true but model_args has no lossconfig")
    if model_args.get("lossconfig") and train["use_taming_loss"] is not False:
        for key, value in _TAMING_OPTIMIZER.items():
            if key not in given_train:
                train[key] = train["lr"] if value is None else value
    return VQParams(source=source, model_type=top["model_type"], family=family, model_args=model_args,
                    use_images=top["use_images"], data=data, train=train, train_sources=train_sources,
                    valid_sources=valid_sources, sources_are_folders=folders,
                    runtime=_runtime_values(source, top, data, train, given_train),
                    given_train_keys=frozenset(given_train))


def loss_settings(params: VQParams, in_channels: int) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(taming lossconfig or None, VQGANLoss keyword arguments) for this config.

    Taming models with a ``lossconfig`` use it (unless ``use_taming_loss`` is false); other
    models map the seed's train_args: ``pixel_loss_factor`` -> ``pixel_weight``,
    ``perceptual_loss_factor`` -> ``perceptual_weight``. Without a GAN the seed trained on
    MSE + VQ loss only, so then the pixel loss defaults to MSE and the perceptual weight to 0.
    """
    train = params.train
    shared = {"disc_every": train["disc_every"], "adaptive_weight": train["adaptive_weight"]}
    if params.uses_taming_loss:
        ignored = [key for key in _TAMING_GOVERNED if key in params.given_train_keys]
        if ignored:
            logger.warning("%s: train_args %s ignored: the taming lossconfig sets the loss (set "
                           "train_args.use_taming_loss to false to use train_args instead)", params.source, ignored)
        return params.model_args["lossconfig"], shared
    use_gan = train["use_gan"]
    perceptual = train["perceptual_loss_factor"]
    return None, {
        **shared, "use_gan": use_gan, "disc_start": train["disc_start"], "disc_factor": train["disc_factor"],
        "disc_weight": train["disc_weight"], "disc_loss": train["disc_loss"],
        "pixel_loss": train["pixel_loss"] or ("l1" if use_gan else "mse"), "pixel_weight": train["pixel_loss_factor"],
        "perceptual_weight": (1.0 if use_gan else 0.0) if perceptual is None else perceptual,
        "codebook_weight": train["codebook_weight"], "disc_in_channels": in_channels,
    }


def build_training_loss(params: VQParams, in_channels: int) -> VQGANLoss:
    """The ``VQGANLoss`` this config trains with (LPIPS from ``lpips_net``/``lpips_weights_path``)."""
    lossconfig, kwargs = loss_settings(params, in_channels)
    try:
        return build_vq_loss(lossconfig, lpips_net=params.train["lpips_net"],
                             lpips_weights_path=params.train["lpips_weights_path"], **kwargs)
    except VQConfigError as err:
        raise ParamConfigError(f"{params.source}: {err}") from None


def build_model(params: VQParams) -> VQTokenizer:
    """The tokenizer of ``model_type``/``model_args``; a bad model key fails naming the file."""
    try:
        model = build_vq_model(params.model_type, params.model_args)
    except VQConfigError as err:
        raise ParamConfigError(f"{params.source}: {err}") from None
    factor = model.downsample_factor
    if any(side % factor for side in params.image_size):
        raise ParamConfigError(f"{params.source}: data_args.image_size {list(params.image_size)} must be divisible by "
                               f"the model's downsampling factor {factor}")
    return model


def build_dataset(params: VQParams, split: str, seed: int) -> ImageFrameDataset | VideoClipDataset | None:
    """Frames of the ``"train"`` or ``"valid"`` split (None when the config names no validation data)."""
    sources = params.train_sources if split == "train" else params.valid_sources
    if not sources:
        return None
    if params.sources_are_folders:
        files = (list_images if params.use_images else list_videos)(sources)
    else:
        files = sources
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            key = "training_data_files" if split == "train" else "validation_data_files"
            raise FileNotFoundError(f"{params.source}: data_args.{key} names a missing file: {missing[0]}")
    if params.use_images:
        return ImageFrameDataset(files, params.image_size, params.sequence_length, seed)
    return VideoClipDataset(files, params.sequence_length, params.image_size, seed)
