"""VQ tokenizers (VQ-VAE dVAE-style, VQ-VAE-2, OptVQ, VQGAN), quantizers and their losses."""

from .base import VQConfigError, VQEncoding, VQTokenizer, summarize_parameters
from .registry import MODEL_TYPES, build_vq_model, load_vq_model, model_family

__all__ = ["MODEL_TYPES", "VQConfigError", "VQEncoding", "VQTokenizer", "build_vq_model", "load_vq_model",
           "model_family", "summarize_parameters"]
