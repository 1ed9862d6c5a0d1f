"""Paths that exports and manifests record, so that they load from any working directory.

:func:`path_to_record` is what a writer stores: an existing local path made absolute, a Hub id or
``download_models.py`` name as given. :func:`resolve_recorded` is what a reader applies to files
written before that, which hold paths relative to the working directory of the run that wrote them.
"""
from __future__ import annotations

import os
from pathlib import Path

from .hub import MODELS


def path_to_record(name_or_path: str | os.PathLike) -> str:
    """An existing local path as an absolute one (symlinks kept), anything else (a Hub id) as given."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name in MODELS or not path.exists():  # a registry name wins over a folder of that name, as when loading
        return name
    return os.path.abspath(path)


def resolve_recorded(name_or_path: str, record_file: str | os.PathLike) -> str:
    """A path read from ``record_file``; a relative one that does not exist from here is looked up from the
    folders above ``record_file`` (the writing run usually worked in one of them), else kept as given."""
    path = Path(name_or_path).expanduser()
    if name_or_path in MODELS or path.is_absolute() or path.exists():
        return name_or_path
    for folder in Path(record_file).resolve().parents:
        if (folder / path).exists():
            return str(folder / path)
    return name_or_path
