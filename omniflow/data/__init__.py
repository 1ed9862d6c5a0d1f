"""Data builders: Hugging Face datasets (streaming or local files) with resumable positions."""
from .core import ResumableLoader, load_hf_dataset

__all__ = ["ResumableLoader", "load_hf_dataset"]
