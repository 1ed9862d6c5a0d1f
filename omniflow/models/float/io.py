"""Weights in and out of FLOAT modules.

Two formats:

* the released ``float.pth``: a flat ``{parameter name: tensor}`` dict of the whole model
  (prefixes ``motion_autoencoder.``, ``audio_encoder.``, ``emotion_encoder.``, ``fmt.``), read
  with ``torch.load(weights_only=True)`` (or the same dict saved as ``.safetensors``). wav2vec2
  weight-norm tensors use the torch < 2.1 names ``weight_g`` / ``weight_v``; the two wav2vec2
  groups may be absent (the model then keeps the weights read from their Hugging Face folders);
* our export: a folder with ``model.safetensors`` and ``config.json``
  (:func:`omniflow.runtime.export.export_weights`).

Loading is strict: a missing, unexpected or mis-shaped key is an error that names the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Mapping

import torch
from torch import nn

from ...runtime.errors import CheckpointError
from ...runtime.export import export_weights, load_export, load_state_dict_strict
from ...runtime.weights import read_weights_file

# torch >= 2.1 parametrised weight norm <-> the names in released (torch 2.0) checkpoints
WEIGHT_NORM_NAMES = {"weight_g": "parametrizations.weight.original0",
                     "weight_v": "parametrizations.weight.original1"}


class CheckpointMismatchError(CheckpointError):
    """A weight file whose keys or shapes do not fit the model."""


def _rename_suffix(state: Mapping[str, torch.Tensor], renames: Mapping[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        head, _, last = key.rpartition(".")
        out[f"{head}.{renames[last]}" if head and last in renames else key] = value
    return out


def release_to_module_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _rename_suffix(state, WEIGHT_NORM_NAMES)


def module_to_release_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    reverse = {v: k for k, v in WEIGHT_NORM_NAMES.items()}
    for key, value in state.items():
        for new, old in reverse.items():
            if key.endswith("." + new):
                key = key[: -len(new)] + old
        out[key] = value
    return out


def read_release_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A released-style ``float.pth`` (or the same dict as ``.safetensors``) as a flat dict of tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FLOAT checkpoint not found: {path}")
    state = read_weights_file(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"{path}: expected a flat dict of parameter name -> tensor")
    return state


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                optional_groups: tuple[str, ...] = ()) -> list[str]:
    """Load ``state`` into ``module``; every key must match by name and shape.

    A group prefix in ``optional_groups`` may be absent as a whole (the module keeps its own
    weights there) but not in part. Keys that name one of the module's rebuilt, non-persistent
    buffers are ignored. Returns the optional groups that were absent.
    """
    own = module.state_dict()
    rebuilt = {name for name, _ in module.named_buffers()} - set(own)
    state = {k: v for k, v in state.items() if k not in rebuilt}
    absent = tuple(g for g in optional_groups if not any(k.startswith(g) for k in state))
    kept = {k: v for k, v in own.items() if k.startswith(absent)} if absent else {}
    try:
        load_state_dict_strict(module, {**kept, **state}, source)
    except CheckpointError as err:
        raise CheckpointMismatchError(str(err)) from None
    return list(absent)


class FloatPretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` (safetensors + JSON) and released-checkpoint
    loading for a FLOAT module. Subclasses define ``model_type``, ``release_prefix`` (their
    prefix in ``float.pth``), ``export_config()`` and ``from_export_config(dict)``."""

    model_type: ClassVar[str]
    release_prefix: ClassVar[str]
    optional_release_groups: ClassVar[tuple[str, ...]] = ()

    def load_release(self, checkpoint: str | os.PathLike | Mapping[str, torch.Tensor]) -> list[str]:
        """Load this module's part of a released checkpoint (a path or an already-read dict).
        Returns the optional groups (e.g. ``wav2vec2.``) that the file did not hold."""
        source = "checkpoint dict" if isinstance(checkpoint, Mapping) else str(checkpoint)
        state = checkpoint if isinstance(checkpoint, Mapping) else read_release_checkpoint(checkpoint)
        prefix = self.release_prefix
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not part:
            raise CheckpointMismatchError(f"{source} holds no '{prefix}*' keys for {type(self).__name__}")
        return load_strict(self, release_to_module_names(part), source, self.optional_release_groups)

    def release_state_dict(self) -> dict[str, torch.Tensor]:
        """This module's weights under their released names (with the release prefix)."""
        state = module_to_release_names(self.state_dict())
        return {self.release_prefix + k: v for k, v in state.items()}

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` + ``config.json`` into ``directory`` (replaced as a whole)."""
        return export_weights(self.state_dict(), {"model_type": self.model_type, **self.export_config()}, directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu"):
        state, config = load_export(directory)
        kind = config.pop("model_type", None)
        if kind != cls.model_type:
            raise CheckpointMismatchError(f"{directory}: model_type {kind!r}, expected {cls.model_type!r}")
        module = cls.from_export_config(config)
        load_strict(module, state, str(Path(directory) / "model.safetensors"))
        return module.to(device)
