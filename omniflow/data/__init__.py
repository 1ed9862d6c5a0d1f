"""Data builders: Hugging Face datasets (streaming or local files) with resumable positions."""
from importlib import import_module

# core imports torch; scripts that only read names of this package (download_data.py) should not pay for it.
_CORE_NAMES = ("ResumableLoader", "load_hf_dataset")


def __getattr__(name: str):
    if name in _CORE_NAMES:
        return getattr(import_module(".core", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_CORE_NAMES)
