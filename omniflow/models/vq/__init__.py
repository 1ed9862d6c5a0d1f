"""VQ tokenizers (VQ-VAE dVAE-style, VQ-VAE-2, OptVQ, VQGAN), quantizers and their losses."""
from importlib import import_module

from .base import VQConfigError, VQEncoding, VQTokenizer, summarize_parameters

# The registry imports every family and LPIPS (seconds at start-up); users of the quantizers alone,
# such as the text heads, should not pay for it, so its names load on first use.
_REGISTRY_NAMES = ("MODEL_TYPES", "build_vq_model", "load_vq_model", "model_family")


def __getattr__(name: str):
    if name in _REGISTRY_NAMES:
        return getattr(import_module(".registry", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["VQConfigError", "VQEncoding", "VQTokenizer", "summarize_parameters", *_REGISTRY_NAMES]
