"""Reading weight files, so that one that cannot be read is a single error naming it.

The libraries name neither the file nor the problem in a type a script reports as a user error:
safetensors raises ``SafetensorError`` (a plain Exception) for a truncated or corrupt file, and
``torch.load(weights_only=True)`` raises ``UnpicklingError`` for a pickle that holds objects (we
never unpickle code) and ``RuntimeError`` for a cut zip. The loaders of models, metrics and data
shards read their files through :func:`read_weights_file`, :func:`open_safetensors` or, for a
transformers/diffusers folder, :func:`load_pretrained`; each raises :class:`CheckpointError` (or
the given error type) naming the file.
"""
from __future__ import annotations

import os
import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .errors import CheckpointError

# The weight files of a transformers/diffusers folder: single, sharded, or a variant (model.fp16.safetensors).
PRETRAINED_WEIGHTS = re.compile(
    r"^(pytorch_model|model|diffusion_pytorch_model)(-\d+-of-\d+)?(\.\w+)?\.(bin|safetensors)$")
# What from_pretrained raises for an unreadable weight file (diffusers wraps it in an OSError); also
# raised for other reasons, so a failure is blamed on a file only once that file is shown unreadable.
_LOAD_FAILURES = (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError)


def unreadable(path: str | os.PathLike, err: Exception, error: type[Exception] = CheckpointError) -> Exception:
    """The one-line error for a file that safetensors or torch could not read."""
    text = str(err)
    code = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if code:
        return error(f"{path}: not a weights-only checkpoint: it pickles {code.group(1)}, and omniflow never "
                     "unpickles code (save the state_dict, or safetensors)")
    detail = text.split("WeightsUnpickler error:")[-1]  # torch's advice on weights_only comes first
    first = next((line.strip() for line in detail.splitlines() if line.strip()), "")
    sentence = first.split(". ")[0]  # torch goes on about how checkpoints get corrupted
    return error(f"{path}: truncated, corrupt or not a weights file ({type(err).__name__}: {sentence})")


def read_weights_file(path: str | os.PathLike, device: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """What a ``.safetensors`` file or a weights-only torch file holds (a dict of tensors, for a state dict).

    ``mmap`` maps a zip-format torch file, so its tensors are read when used."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device=str(device))
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as err:  # only the libraries' readers run here, and they raise many types
        raise unreadable(path, err) from None


@contextmanager
def open_safetensors(path: str | os.PathLike, framework: str = "pt",
                     error: type[Exception] = CheckpointError) -> Iterator[Any]:
    """``safe_open``; a file whose header is unreadable or does not cover the file (truncated) raises ``error``."""
    try:
        handle = safe_open(str(path), framework=framework)
    except SafetensorError as err:
        raise unreadable(path, err, error) from None
    with handle:
        yield handle


def _check_readable(path: str | os.PathLike) -> None:
    """Raise the error of :func:`read_weights_file` if ``path`` cannot be read (of safetensors, the header)."""
    if Path(path).suffix == ".safetensors":
        with open_safetensors(path):
            return
    read_weights_file(path)


def load_pretrained(cls, folder: str | os.PathLike, **kwargs):
    """``cls.from_pretrained(folder, **kwargs)`` for a local transformers or diffusers folder; when it fails
    because a weight file cannot be read, the error names that file. Other failures pass through."""
    try:
        return cls.from_pretrained(str(folder), **kwargs)
    except _LOAD_FAILURES:
        where = Path(folder) / (kwargs.get("subfolder") or "")
        for path in sorted(where.glob("*")):
            if PRETRAINED_WEIGHTS.match(path.name):
                _check_readable(path)
        raise
