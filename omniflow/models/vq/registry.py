"""``build_vq_model``: one entry point for every VQ family, under the seed configs' names."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any

import torch

from . import dvae, vqgan, vqvae2
from .base import VQConfigError, VQTokenizer
from .dvae import VqVae
from .vqgan import TamingVQGAN
from .vqvae2 import VQVAE2, VQVAE2OptVQ

# Names are case-sensitive on purpose: "VqVae2" is the dVAE-style model while "vqvae2"
# is the hierarchical VQ-VAE-2, as in the seed project's adapter table.
_FAMILY_OF: dict[str, str] = {
    **dict.fromkeys(["VqVae", "vq_vae", "vqvae", "VqVae2"], "VqVae"),
    **dict.fromkeys(["VQVAE2", "vqvae2"], "VQVAE2"),
    **dict.fromkeys(["VQVAE2_OptVQ", "vqvae2optvq"], "VQVAE2_OptVQ"),
    **dict.fromkeys(["TamingVQGAN", "taming_vqgan", "VQGAN", "vqgan"], "TamingVQGAN"),
    **dict.fromkeys(["EMAVQ", "emavq"], "EMAVQ"),
}
MODEL_TYPES = tuple(_FAMILY_OF)

# family -> (class, constructor keywords, accepted model_args keys)
_FAMILIES: dict[str, tuple[type[VQTokenizer], dict[str, Any], frozenset[str]]] = {
    "VqVae": (VqVae, {}, frozenset({*dvae.DEFAULTS, *dvae.ALIASES})),
    "VQVAE2": (VQVAE2, {}, frozenset({*VQVAE2.DEFAULTS, *vqvae2.ALIASES})),
    "VQVAE2_OptVQ": (VQVAE2OptVQ, {}, frozenset({*VQVAE2OptVQ.DEFAULTS, *vqvae2.ALIASES})),
    "TamingVQGAN": (TamingVQGAN, {}, frozenset({*vqgan.DEFAULTS, *vqgan.ALIASES})),
    "EMAVQ": (TamingVQGAN, {"default_variant": "EMAVQ"}, frozenset({*vqgan.DEFAULTS, *vqgan.ALIASES})),
}


def model_family(model_type: str) -> str:
    """Canonical family name of a ``model_type`` alias (``vqvae2optvq`` -> ``VQVAE2_OptVQ``)."""
    if model_type not in _FAMILY_OF:
        close = difflib.get_close_matches(model_type, MODEL_TYPES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise VQConfigError(f"unknown model_type {model_type!r}{hint} (known: {', '.join(MODEL_TYPES)})")
    return _FAMILY_OF[model_type]


def model_arg_names(model_type: str) -> frozenset[str]:
    """Every ``model_args`` key the family of ``model_type`` accepts (aliases included)."""
    return _FAMILIES[model_family(model_type)][2]


def families_accepting(key: str) -> list[str]:
    return [family for family, (_, _, names) in _FAMILIES.items() if key in names]


def build_vq_model(model_type: str, model_args: Mapping[str, Any] | None = None) -> VQTokenizer:
    """Build a VQ tokenizer from ``param.json``'s ``model_type`` and ``model_args``."""
    cls, kwargs, _ = _FAMILIES[model_family(model_type)]
    if model_args is not None and not isinstance(model_args, Mapping):
        raise VQConfigError(f"model_args must be a JSON object, got {type(model_args).__name__}")
    return cls(dict(model_args or {}), **kwargs)


def load_vq_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[VQTokenizer, dict[str, Any]]:
    """A trained tokenizer from an export directory (``model.safetensors`` + ``config.json``), in eval mode.

    Returns the model and the export's config (``model_type``, ``model_args`` and whatever the
    training script added, e.g. ``image_size`` and the validation metrics).
    """
    from omniflow.runtime.errors import CheckpointError
    from omniflow.runtime.export import load_export, load_state_dict_strict

    state, config = load_export(path, device)
    missing = [key for key in ("model_type", "model_args") if key not in config]
    if missing:
        raise CheckpointError(f"{path}: config.json lacks {missing}; not a VQ tokenizer export")
    model = build_vq_model(config["model_type"], config["model_args"]).to(device)
    load_state_dict_strict(model, state, str(path))
    return model.eval(), config
