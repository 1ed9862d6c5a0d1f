"""Codes files: the code indices of a compressed video, stored at the narrowest integer width.

A codes file is a safetensors file with one tensor per level, ``level<l>`` of shape
(frames, h_l, w_l) in uint8/uint16/uint32 (the smallest type that holds ``codebook_size - 1``),
and a JSON header in its metadata (key ``omniflow_vq_codes``): the model export it was coded
with, frame count, coded size, fps and the source file's name and size. It holds everything
``compress_video.py --decode`` needs to rebuild the video.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from omniflow.runtime.errors import DataError

HEADER_KEY = "omniflow_vq_codes"
FORMAT = "omniflow-vq-codes/1"


class CodesFileError(DataError):
    """A codes file that is unreadable, has no header, or whose levels do not match the header."""


def index_dtype(codebook_size: int) -> np.dtype:
    """The narrowest unsigned integer type that holds indices ``0 .. codebook_size - 1``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if codebook_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise CodesFileError(f"codebook size {codebook_size} does not fit 32-bit indices")


def save_codes(path: str | os.PathLike, levels: list[np.ndarray], codebook_sizes: list[int],
               header: dict[str, Any]) -> Path:
    """Write ``levels`` (one (frames, h, w) index array per level) and ``header`` to ``path``."""
    if len(levels) != len(codebook_sizes):
        raise CodesFileError(f"{len(levels)} index levels but {len(codebook_sizes)} codebook sizes")
    tensors = {}
    for level, (indices, size) in enumerate(zip(levels, codebook_sizes)):
        if indices.size and (indices.min() < 0 or indices.max() >= size):
            raise CodesFileError(f"level {level} indices leave [0, {size})")
        tensors[f"level{level}"] = np.ascontiguousarray(indices.astype(index_dtype(size)))
    full_header = {"format": FORMAT, **header, "codebook_sizes": list(codebook_sizes),
                   "level_shapes": [list(t.shape[1:]) for t in tensors.values()]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={HEADER_KEY: json.dumps(full_header)})
    return path


def load_codes(path: str | os.PathLike) -> tuple[list[np.ndarray], dict[str, Any]]:
    """(levels as int64 arrays, header) from a codes file written by :func:`save_codes`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"codes file not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            arrays = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise CodesFileError(f"{path}: not a readable codes file ({err})") from None
    if HEADER_KEY not in metadata:
        raise CodesFileError(f"{path}: no {HEADER_KEY!r} header; not written by compress_video.py")
    header = json.loads(metadata[HEADER_KEY])
    levels = [arrays.get(f"level{level}") for level in range(len(header["codebook_sizes"]))]
    if any(a is None for a in levels) or len(arrays) != len(levels):
        raise CodesFileError(f"{path}: levels {sorted(arrays)} do not match the header's "
                             f"{len(header['codebook_sizes'])} codebook(s)")
    return [a.astype(np.int64) for a in levels], header
