"""``build_vq_model``: one entry point for every VQ family, under the seed configs' names."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

from .base import VQConfigError, VQTokenizer
from .dvae import VqVae
from .vqgan import TamingVQGAN
from .vqvae2 import VQVAE2, VQVAE2OptVQ

# Names are case-sensitive on purpose: "VqVae2" is the dVAE-style model while "vqvae2"
# is the hierarchical VQ-VAE-2, as in the seed project's adapter table.
_BUILDERS: dict[str, Callable[[Mapping[str, Any]], VQTokenizer]] = {
    **dict.fromkeys(["VqVae", "vq_vae", "vqvae", "VqVae2"], VqVae),
    **dict.fromkeys(["VQVAE2", "vqvae2"], VQVAE2),
    **dict.fromkeys(["VQVAE2_OptVQ", "vqvae2optvq"], VQVAE2OptVQ),
    **dict.fromkeys(["TamingVQGAN", "taming_vqgan", "VQGAN", "vqgan"], TamingVQGAN),
    **dict.fromkeys(["EMAVQ", "emavq"], lambda args: TamingVQGAN(args, default_variant="EMAVQ")),
}
MODEL_TYPES = tuple(_BUILDERS)


def build_vq_model(model_type: str, model_args: Mapping[str, Any] | None = None) -> VQTokenizer:
    """Build a VQ tokenizer from ``param.json``'s ``model_type`` and ``model_args``."""
    if model_type not in _BUILDERS:
        close = difflib.get_close_matches(model_type, MODEL_TYPES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise VQConfigError(f"unknown model_type {model_type!r}{hint} (known: {', '.join(MODEL_TYPES)})")
    if model_args is not None and not isinstance(model_args, Mapping):
        raise VQConfigError(f"model_args must be a JSON object, got {type(model_args).__name__}")
    return _BUILDERS[model_type](dict(model_args or {}))
