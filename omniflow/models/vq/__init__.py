"""VQ tokenizers (VQ-VAE dVAE-style, VQ-VAE-2, OptVQ, VQGAN), quantizers and their losses."""
from ...runtime.lazy import lazy_exports

# The registry imports every family and LPIPS (seconds at start-up); users of the quantizers alone,
# such as the text heads, should not pay for it, nor scripts before they parse their flags.
__getattr__, __all__ = lazy_exports(__name__, {
    ".base": ("VQConfigError", "VQEncoding", "VQTokenizer", "summarize_parameters"),
    ".registry": ("MODEL_TYPES", "build_vq_model", "load_vq_model", "model_family"),
})
