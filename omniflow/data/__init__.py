"""Data builders: Hugging Face datasets (streaming or local files) with resumable positions."""
from ..runtime.lazy import lazy_exports

# core imports torch; scripts that only read names of this package (download_data.py) should not pay for it.
__getattr__, __all__ = lazy_exports(__name__, {".core": ("ResumableLoader", "load_hf_dataset")})
