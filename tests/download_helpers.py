"""Shared helpers for the hub / download tests: load the scripts, stand in for the Hub client.

The only thing replaced is `huggingface_hub.snapshot_download` (and `datasets.load_dataset` at
the data script's call site): the stand-ins write real files where the real client would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "download"
SECRET = "hf_TESTsecret0123456789abcdef"  # a fake token value; must never be printed


def load_script(relative: str):
    """Import a repo script (download_models.py, scripts/download_data.py) as a module."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def write_small_model(folder: Path, repo_id: str) -> None:
    """A config and a safetensors weight file, in each subfolder that allow_patterns name."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_name_or_path": repo_id, "hidden_size": 4}))
    save_file({"weight": np.arange(8, dtype=np.float32).reshape(2, 4)}, str(folder / "model.safetensors"))


def fake_snapshot_download(log_path: Path | None = None, populate=write_small_model):
    """A snapshot_download stand-in that writes files like the real one and logs its calls."""

    def snapshot_download(repo_id, *, local_dir=None, cache_dir=None, token=None, allow_patterns=None,
                          ignore_patterns=None, force_download=False, local_files_only=False, **_):
        if local_files_only:
            from huggingface_hub.errors import LocalEntryNotFoundError
            raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")
        if local_dir is not None:
            target = Path(local_dir)
        else:
            target = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "abc123"
        subfolders = sorted({p.split("/")[0] for p in allow_patterns or () if "/" in p})
        for sub in subfolders or [""]:
            populate(target / sub, repo_id)
        if log_path is not None:
            with open(log_path, "a") as log:
                log.write(json.dumps({"repo_id": repo_id, "allow_patterns": allow_patterns,
                                      "ignore_patterns": ignore_patterns, "force_download": force_download,
                                      "token_is_secret": token == SECRET, "local_dir": str(local_dir)}) + "\n")
        return str(target)

    return snapshot_download


def run_download_models_with_fake_hub() -> None:
    """Entry point for subprocess tests: download_models.py's main with the Hub client replaced."""
    import huggingface_hub

    huggingface_hub.snapshot_download = fake_snapshot_download(Path(os.environ["FAKE_HUB_LOG"]))
    sys.exit(load_script("download_models.py").main(sys.argv[1:]))


if __name__ == "__main__":
    run_download_models_with_fake_hub()
