"""FLOAT training data: per-clip safetensors shards, their manifest, and training windows.

``scripts/preprocess_float.py`` writes, under one folder::

    manifest.json             settings, one record per clip, and the skipped inputs with reasons
    clips/<clip id>.safetensors

Each shard holds, for T frames at the manifest's fps: ``motion`` (T, dim_w) motion latents of
the frames, ``audio_features`` (T, F) stacked wav2vec2 hidden states (before the trained
projection), ``emotion`` (dim_e,) a one-hot label or the classifier's probabilities, and
``reference_image`` (3, S, S) uint8, the clip's first frame.

:class:`FloatWindowDataset` cuts them into FMT training windows: ``num_prev`` previous frames +
``window`` current frames, with a reference frame of the same clip. Random windows depend only
on (seed, epoch, index), so a resumed run reads exactly what an uninterrupted one would.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset

from ..runtime.errors import DataError
from ..runtime.weights import open_safetensors

logger = logging.getLogger("omniflow")

MANIFEST_NAME = "manifest.json"
SHARD_FORMAT = "float-clips-v1"
SHARD_KEYS = ("motion", "audio_features", "emotion", "reference_image")


@dataclass
class ClipRecord:
    id: str
    source: str
    shard: str  # relative to the data folder
    frames: int
    fps: float
    emotion: str  # the given label, or the classifier's most probable one
    emotion_source: str  # "label" or "classifier"
    lost_audio_seconds: float = 0.0  # skipped as damaged (audio: filled with silence; video: frame before held)
    lost_video_seconds: float = 0.0


def clip_id_for(path: str | os.PathLike, taken: set[str]) -> str:
    """A file-name-safe id from the file's stem, made unique within ``taken``."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).stem) or "clip"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def write_clip(data_dir: Path, clip_id: str, tensors: dict[str, torch.Tensor], fps: float) -> str:
    """Write one clip shard; returns its path relative to ``data_dir``."""
    missing = [k for k in SHARD_KEYS if k not in tensors]
    if missing:
        raise ValueError(f"clip {clip_id}: shard tensors {missing} missing")
    relative = f"clips/{clip_id}.safetensors"
    (data_dir / "clips").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(data_dir / relative),
              metadata={"format": SHARD_FORMAT, "clip_id": clip_id, "fps": str(fps)})
    return relative


def write_manifest(data_dir: Path, settings: dict, clips: list[ClipRecord], skipped: list[dict]) -> Path:
    path = Path(data_dir) / MANIFEST_NAME
    body = {"format": SHARD_FORMAT, **settings, "clips": [asdict(c) for c in clips], "skipped": skipped}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def check_shard(path: Path) -> None:
    """A clip shard must be readable and hold every tensor in :data:`SHARD_KEYS` (only its header is read)."""
    with open_safetensors(path, error=DataError) as shard:
        missing = [k for k in SHARD_KEYS if k not in shard.keys()]
    if missing:
        raise DataError(f"{path}: clip shard lacks the tensors {missing}")


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON file holding an object; malformed content is a DataError naming the file and line."""
    try:
        value = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object")
    return value


def read_manifest(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {data_dir} (run scripts/preprocess_float.py first)")
    manifest = read_json_object(path)
    if manifest.get("format") != SHARD_FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r}, expected {SHARD_FORMAT!r}")
    return manifest


class FloatWindowDataset(Dataset):
    """Training windows from preprocessed clips.

    An item is ``motion``/``audio`` (window, .) for the current frames, ``prev_motion``/
    ``prev_audio`` (num_prev, .) for the frames before them, ``has_prev`` (1.0, or 0.0 at a clip
    start, where the previous frames are zeros as in generation), ``reference_motion`` (dim_w,)
    of a reference frame of the same clip, ``emotion`` (dim_e,), and ``clip``/``start``/
    ``reference`` indices.

    Each clip gives ``frames // window`` items per epoch. ``random_windows``: start and
    reference frame are drawn from (seed, epoch, index), the start from 0 (a clip start) or any
    frame with ``num_prev`` frames before it. Otherwise (validation) the windows tile each clip
    from frame 0 and the reference is frame 0.
    """

    def __init__(self, data_dir: str | os.PathLike, num_prev: int, window: int, *, seed: int = 0,
                 random_windows: bool = True):
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(data_dir)
        self.num_prev, self.window = num_prev, window
        self.seed, self.epoch, self.random_windows = seed, 0, random_windows
        records = [ClipRecord(**c) for c in self.manifest["clips"]]
        self.clips = [c for c in records if c.frames >= window]
        for short in (c for c in records if c.frames < window):
            logger.warning("clip %s: %d frames, shorter than one window (%d): not used", short.id, short.frames,
                           window)
        if not self.clips:
            raise DataError(f"{self.data_dir}: no clip has a full window of {window} frames "
                            f"({len(records)} clip(s) in {MANIFEST_NAME})")
        for clip in self.clips:  # headers only: a truncated shard fails here, not when training reaches it
            check_shard(self.data_dir / clip.shard)
        self.items = [(c, slot) for c, clip in enumerate(self.clips) for slot in range(clip.frames // window)]

    @property
    def feature_dim(self) -> int:
        return int(self.manifest["audio_feature_dim"])

    @property
    def motion_dim(self) -> int:
        return int(self.manifest["dim_w"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def _window_and_reference(self, index: int) -> tuple[int, int, int]:
        c, slot = self.items[index]
        frames = self.clips[c].frames
        if not self.random_windows:
            return c, slot * self.window, 0
        rng = np.random.default_rng([self.seed, self.epoch, index])
        # a clip start, or a start with a full set of previous frames (never a partial one)
        later = max(0, frames - self.window - self.num_prev + 1)
        pick = int(rng.integers(later + 1))
        start = 0 if pick == later else self.num_prev + pick
        return c, start, int(rng.integers(frames))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        c, start, reference = self._window_and_reference(index)
        clip = self.clips[c]
        p, n = self.num_prev, self.window
        has_prev = start >= p > 0
        first = start - p if has_prev else start
        with open_safetensors(self.data_dir / clip.shard, error=DataError) as shard:
            motion = shard.get_slice("motion")[first:start + n].float()
            audio = shard.get_slice("audio_features")[first:start + n].float()
            reference_motion = shard.get_slice("motion")[reference:reference + 1][0].float()
            emotion = shard.get_tensor("emotion").float()
        if not has_prev:
            motion = torch.cat([motion.new_zeros(p, motion.shape[1]), motion])
            audio = torch.cat([audio.new_zeros(p, audio.shape[1]), audio])
        return {"motion": motion[p:], "audio": audio[p:], "prev_motion": motion[:p], "prev_audio": audio[:p],
                "has_prev": torch.tensor(float(has_prev)), "reference_motion": reference_motion,
                "emotion": emotion, "clip": torch.tensor(c), "start": torch.tensor(start),
                "reference": torch.tensor(reference)}

