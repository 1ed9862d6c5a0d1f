"""VQ tokenizers (VQ-VAE dVAE-style, VQ-VAE-2, OptVQ, VQGAN), quantizers and their losses."""

from .base import VQConfigError, VQEncoding, VQTokenizer, summarize_parameters
from .registry import MODEL_TYPES, build_vq_model

__all__ = ["MODEL_TYPES", "VQConfigError", "VQEncoding", "VQTokenizer", "build_vq_model", "summarize_parameters"]
