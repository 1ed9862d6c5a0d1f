"""Final exports: weights as safetensors + a small JSON config, loadable without training state.

Torch and safetensors are imported where used: scripts read the layout's names before they load anything heavy."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointError

if TYPE_CHECKING:
    import torch

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def export_weights(state_dict: dict[str, torch.Tensor], config: dict, out_dir: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``out_dir`` atomically (tmp dir + rename)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # safetensors refuses shared storage; clone views (e.g. tied weights) into their own tensors.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def load_export(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read an export written by :func:`export_weights` (a directory, or its safetensors file)."""
    from .weights import read_weights_file

    path = Path(path)
    if path.is_dir():
        folder, weights = path, path / WEIGHTS_NAME
    elif path.is_file():
        folder, weights = path.parent, path
    else:  # never the parent folder's export: that is another model
        raise FileNotFoundError(f"no export at {path}: no such folder or file")
    if not weights.is_file():
        raise FileNotFoundError(f"export folder {folder} has no {WEIGHTS_NAME}")
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"export {folder} has no {CONFIG_NAME}")
    return read_weights_file(weights, device), json.loads(config_file.read_text())


def load_state_dict_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with one readable error naming missing/unexpected/mismatched keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(own.keys() & state.keys()) if own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
