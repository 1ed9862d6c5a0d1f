"""Plumbing shared by the FLOAT scripts: size presets on the command line, released checkpoints
named by path or hub name, and the frozen motion auto-encoder.

Option precedence in every FLOAT script: dataclass defaults < the ``--config`` preset
(``release``, ``small``, ``tiny``) < the JSON file of ``--config-file`` < explicit flags.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ...runtime.errors import ConfigError
from ...runtime.export import CONFIG_NAME
from ...runtime.hub import resolve_model_path
from ...runtime.options import load_options_file, parse_options
from .config import PRESETS

if TYPE_CHECKING:  # the options parse without torch
    from .motion import MotionAutoEncoder

PRESET_FLAG = "--config"
CONFIG_FILE_FLAG = "--config-file"
RELEASE_FILE_NAME = "float.pth"


@dataclass
class PresetOptions:
    config: str = field(default="release", metadata={
        "help": "FLOAT size preset, applied before --config-file and the flags", "choices": sorted(PRESETS)})


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def preset_name(argv: Sequence[str]) -> str:
    """The preset named by ``--config`` on the command line, else by the config file's
    ``config`` key, else ``release``."""
    name = _flag_value(argv, PRESET_FLAG)
    config_file = _flag_value(argv, CONFIG_FILE_FLAG)
    if name is None and config_file is not None:
        name = load_options_file(config_file).get("config")
    name = name or "release"
    if name not in PRESETS:
        raise ConfigError(f"--config {name!r} is not a FLOAT preset; choose from {sorted(PRESETS)}")
    return name


def parse_float_options(*option_classes: type, args: Sequence[str] | None = None, description: str | None = None):
    """:func:`omniflow.runtime.options.parse_options` with the FLOAT preset layer; one of
    ``option_classes`` must define the ``config`` field (e.g. :class:`PresetOptions`)."""
    argv = list(sys.argv[1:] if args is None else args)
    name = preset_name(argv)
    return parse_options(*option_classes, args=argv, description=description, config_flags=(CONFIG_FILE_FLAG,),
                         config_values={**PRESETS[name], "config": name})


def resolve_release_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A released-layout FLOAT checkpoint: a file, a folder holding ``float.pth``, or a hub
    name/id whose download holds it (offline, a missing one names the download command)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    folder = path if path.is_dir() else resolve_model_path(str(name_or_path))
    candidate = folder / RELEASE_FILE_NAME
    if not candidate.is_file():
        raise FileNotFoundError(f"{folder} holds no {RELEASE_FILE_NAME}")
    return candidate


def is_export_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def load_motion_autoencoder(source: str | os.PathLike, config) -> MotionAutoEncoder:
    """The frozen motion auto-encoder from a released-layout checkpoint (sized by ``config``)
    or from its own export folder."""
    from .motion import MotionAutoEncoder
    if is_export_folder(source):
        model = MotionAutoEncoder.from_pretrained(source)
    else:
        model = MotionAutoEncoder.from_release(resolve_release_checkpoint(source), config)
    return model.requires_grad_(False).eval()
