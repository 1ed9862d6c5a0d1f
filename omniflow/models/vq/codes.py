"""Codes files: the code indices of a compressed video, entropy-coded.

A codes file is a safetensors file with one tensor per level, ``level<l>``: the level's (frames, h_l, w_l)
indices coded losslessly by :mod:`omniflow.models.vq.entropy` (``coding``: range-coded under the
``temporal`` or ``adaptive`` prior, or ``packed`` at the codebook's bit width), and a JSON header in its
metadata (key ``omniflow_vq_codes``): the coding, the model export it was coded with, frame count, coded
size, fps and the source file's name and size. It holds everything ``compress_video.py --decode`` needs to
rebuild the video. Files of format 1 (indices stored raw, at the narrowest integer width) still load.
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

from . import entropy

HEADER_KEY = "omniflow_vq_codes"
FORMAT = "omniflow-vq-codes/2"
RAW_FORMAT = "omniflow-vq-codes/1"  # indices stored raw (earlier files)


class CodesFileError(DataError):
    """A codes file that is unreadable, has no header, or whose levels do not match the header."""


def save_codes(path: str | os.PathLike, levels: list[np.ndarray], codebook_sizes: list[int],
               header: dict[str, Any], coding: str = "temporal") -> Path:
    """Write ``levels`` (one (frames, h, w) index array per level), coded with ``coding``, and ``header``."""
    if len(levels) != len(codebook_sizes):
        raise CodesFileError(f"{len(levels)} index levels but {len(codebook_sizes)} codebook sizes")
    if coding not in entropy.CODINGS:
        raise CodesFileError(f"coding {coding!r} is not one of {entropy.CODINGS}")
    tensors = {}
    for level, (indices, size) in enumerate(zip(levels, codebook_sizes)):
        if indices.size and (indices.min() < 0 or indices.max() >= size):
            raise CodesFileError(f"level {level} indices leave [0, {size})")
        tensors[f"level{level}"] = np.ascontiguousarray(entropy.encode(indices, size, coding))
    full_header = {"format": FORMAT, **header, "coding": coding, "codebook_sizes": list(codebook_sizes),
                   "frames": len(levels[0]), "level_shapes": [list(indices.shape[1:]) for indices in levels]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={HEADER_KEY: json.dumps(full_header)})
    return path


def read_payload(path: str | os.PathLike) -> list[np.ndarray]:
    """The coded level tensors of a codes file, as stored (what its bits per pixel are made of)."""
    with safe_open(str(path), framework="numpy") as f:
        return [f.get_tensor(key) for key in sorted(f.keys())]


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
    if header["format"] == RAW_FORMAT:
        return [a.astype(np.int64) for a in levels], header
    if header["format"] != FORMAT or header.get("coding") not in entropy.CODINGS:
        raise CodesFileError(f"{path}: format {header['format']!r}, coding {header.get('coding')!r}: not readable "
                             f"here ({FORMAT} with one of {entropy.CODINGS})")
    return [entropy.decode(data, (header["frames"], *shape), size, header["coding"])
            for data, shape, size in zip(levels, header["level_shapes"], header["codebook_sizes"])], header
