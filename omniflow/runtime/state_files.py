"""Pickle-free state files: ``<name>.json`` holds the structure, ``<name>.safetensors`` the tensors.

Optimizer, scheduler, RNG and script states (best metrics, EMA weights, early stopping) are nests
of dicts, lists, tuples, numbers, strings, tensors and numpy arrays. Writing them this way means
loading a checkpoint never runs code from it: JSON and safetensors carry only data.

In the JSON, a tensor is ``{"__tensor__": key}`` (a key of the safetensors file), a tuple is
``{"__tuple__": [...]}``, a numpy array ``{"__ndarray__": [...], "dtype": "uint32"}`` and a dict
whose keys are not all plain strings ``{"__dict__": [[key, value], ...]}`` (optimizer states are
keyed by parameter index).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

_TAGS = ("__tensor__", "__tuple__", "__ndarray__", "__dict__")


def own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no memory (safetensors refuses shared storage, e.g. tied weights)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel():
            tensor = tensor.clone()
        seen.add(ptr)
        out[key] = tensor
    return out


def save_state(tree: Any, stem: str | Path) -> list[Path]:
    """Write ``tree`` to ``<stem>.json`` + ``<stem>.safetensors``; returns both paths."""
    stem = Path(stem)
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(tree, tensors, stem.name)
    json_path, tensor_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    save_file(own_storage(tensors), str(tensor_path))
    json_path.write_text(json.dumps(structure))
    return [json_path, tensor_path]


def load_state(stem: str | Path) -> Any:
    """Read what :func:`save_state` wrote; a missing or damaged file is a :class:`CheckpointError`."""
    stem = Path(stem)
    json_path, tensor_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    for path in (json_path, tensor_path):
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
    try:
        structure = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{json_path}: not a readable state file ({err})") from None
    tensors = read_safetensors(tensor_path)
    try:
        return _decode(structure, tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{json_path}: malformed state ({type(err).__name__}: {err})") from None


def read_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=device)
    except Exception as err:  # safetensors raises its own (plain Exception) types for damaged files
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in value):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {"__dict__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                             for k, v in value.items()]}
    raise TypeError(f"{where}: a {type(value).__name__} cannot be stored in a state file")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__ndarray__" in value:
        return np.asarray(value["__ndarray__"], dtype=value["dtype"])
    if "__dict__" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__dict__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}
