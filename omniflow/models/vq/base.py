"""The contract every VQ tokenizer follows, config-argument checking and a parameter table."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn as nn

Codes = Union[torch.Tensor, tuple[torch.Tensor, ...]]


class VQConfigError(ValueError):
    """A VQ model or loss configuration value is missing, unknown or invalid."""


@dataclass
class VQEncoding:
    """Result of ``encode``. Multi-level models hold tuples ordered finest level first."""

    quantized: Codes  # what ``decode`` takes
    loss: torch.Tensor  # VQ loss (codebook + beta * commitment), fp32 scalar
    perplexity: torch.Tensor  # scalar; mean over levels for multi-level models
    indices: Codes  # (B, h, w) int64 per level, what ``decode_indices`` takes


class VQTokenizer(nn.Module):
    """Base class: ``forward(x) -> (vq_loss, recon, perplexity, indices)`` for x in [-1, 1].

    Subclasses implement ``encode``, ``decode``, ``decode_indices``, ``get_last_layer`` and set
    ``in_channels``, ``downsample_factor`` (image height and width must be divisible by it;
    for multi-level models the coarsest level's factor), ``codebook_sizes`` (one per level,
    finest first) and ``config`` (the resolved ``model_args``).
    """

    model_type: str = ""
    in_channels: int
    downsample_factor: int
    codebook_sizes: list[int]
    config: dict[str, Any]

    def encode(self, x: torch.Tensor) -> VQEncoding:
        raise NotImplementedError

    def decode(self, quantized: Codes) -> torch.Tensor:
        raise NotImplementedError

    def decode_indices(self, indices: Codes) -> torch.Tensor:
        raise NotImplementedError

    def get_last_layer(self) -> nn.Parameter:
        """Weight of the decoder's output layer (for the adaptive GAN weight)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Codes]:
        encoding = self.encode(x)
        return encoding.loss, self.decode(encoding.quantized), encoding.perplexity, encoding.indices

    def check_input(self, x: torch.Tensor) -> None:
        """One clear error for a wrongly shaped batch instead of a deep conv traceback."""
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"{type(self).__name__} expects images (B, {self.in_channels}, H, W) with H and W "
                f"divisible by {f}, got shape {tuple(x.shape)}")

    def export_config(self) -> dict[str, Any]:
        """JSON-ready ``{"model_type", "model_args"}`` that ``build_vq_model`` rebuilds from."""
        return {"model_type": self.model_type, "model_args": dict(self.config)}


def resolve_args(where: str, given: Mapping[str, Any], defaults: Mapping[str, Any],
                 aliases: Mapping[str, str] | None = None,
                 types: Mapping[str, type | tuple[type, ...]] | None = None) -> dict[str, Any]:
    """Merge ``given`` over ``defaults``; unknown keys fail naming the closest valid key.

    ``aliases`` maps the older names used by the seed configs (``vocab_size``...) to ours.
    Values are checked against the default's type; ``types`` gives the accepted types of keys
    whose default is None (unchecked otherwise).
    """
    aliases, types = aliases or {}, types or {}
    resolved = dict(defaults)
    seen: dict[str, str] = {}
    for key, value in given.items():
        name = aliases.get(key, key)
        if name not in defaults:
            close = difflib.get_close_matches(key, [*defaults, *aliases], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise VQConfigError(f"{where}: unknown key {key!r}{hint} (valid keys: {', '.join(sorted(defaults))})")
        if name in seen:
            raise VQConfigError(f"{where}: {seen[name]!r} and {key!r} both set {name!r}; keep one")
        seen[name] = key
        _check_type(where, key, value, defaults[name])
        if name in types and value is not None and not _is_instance(value, _as_tuple(types[name])):
            raise VQConfigError(f"{where}: {key!r} must be {_type_names(types[name])}, got {value!r}")
        resolved[name] = value
    return resolved


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _type_names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in _as_tuple(types))


def _is_instance(value: Any, types: tuple[type, ...]) -> bool:
    """isinstance where bools are not ints and ints are acceptable floats (JSON has one number type)."""
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types) or (float in types and isinstance(value, int))


def _check_type(where: str, key: str, value: Any, default: Any) -> None:
    if default is None or value is None:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, (Sequence, Mapping)):
        ok = isinstance(value, type(default)) or (isinstance(default, Sequence) and isinstance(value, (list, tuple)))
    else:
        ok = True
    if not ok:
        raise VQConfigError(f"{where}: {key!r} must be {type(default).__name__}, got {value!r}")


def summarize_parameters(model: nn.Module) -> str:
    """Markdown table of parameter and buffer counts per top-level child module."""
    rows = [("module", "parameters", "trainable", "buffer elements")]
    totals = [0, 0, 0]
    for name, child in model.named_children():
        counts = _count(child)
        totals = [a + b for a, b in zip(totals, counts)]
        rows.append((name, *(f"{c:,}" for c in counts)))
    own = [p for p in model.parameters(recurse=False)]
    if own:
        counts = (sum(p.numel() for p in own), sum(p.numel() for p in own if p.requires_grad), 0)
        totals = [a + b for a, b in zip(totals, counts)]
        rows.append(("(own)", *(f"{c:,}" for c in counts)))
    rows.append(("total", *(f"{c:,}" for c in totals)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _count(module: nn.Module) -> tuple[int, int, int]:
    params = list(module.parameters())
    return (sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad),
            sum(b.numel() for b in module.buffers()))


# Quantizer options every family accepts (see quantizers.VectorQuantizer).
QUANTIZER_OPTIONS: dict[str, Any] = {"l2_normalize": False, "code_dim": None, "dead_code_steps": 0,
                                     "init_from_data": True}


def quantizer_options(args: Mapping[str, Any]) -> dict[str, Any]:
    return {key: args[key] for key in QUANTIZER_OPTIONS}
