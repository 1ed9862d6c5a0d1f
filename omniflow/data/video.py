"""Video-clip and image-frame datasets for the VQ tokenizers.

Items are ``{"frames": uint8 (d, h, w, 3), "path": str, "skipped": int}``. Frames stay uint8
until they reach the device, where :func:`frames_to_model_input` turns a batch
(b, d, h, w, 3) into model input (b*d, 3, h, w) in [-1, 1].

Videos are decoded with PyAV: only ``sequence_length`` frames from a random start, reached by
seeking to the preceding keyframe, and scaled by the decoder's scaler (cover the target size,
then centre-crop). The random start depends only on (seed, epoch, index, attempt), so a
resumed run reads exactly the clips an uninterrupted one would. An unreadable or too-short
file is skipped: another file is drawn (deterministically) and the item's ``skipped`` field
counts the skips, so the training script can sum and log them across workers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

PathLike = str | os.PathLike
Size = int | tuple[int, int] | None


class DataFolderError(FileNotFoundError):
    """A data folder is missing or holds no usable files."""


class UnusableFileError(ValueError):
    """One file cannot provide an item (corrupt, no video stream, too few frames)."""


def list_files(roots: PathLike | Iterable[PathLike], extensions: Sequence[str]) -> list[str]:
    """Sorted files under one or more folders (recursively) whose suffix is in ``extensions``."""
    roots = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
    found: list[str] = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise DataFolderError(f"data folder not found: {root}")
        found += [str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in extensions]
    if not found:
        raise DataFolderError(f"no files with suffix {', '.join(extensions)} under {', '.join(map(str, roots))}")
    return sorted(found)


def list_videos(roots: PathLike | Iterable[PathLike]) -> list[str]:
    return list_files(roots, VIDEO_EXTENSIONS)


def list_images(roots: PathLike | Iterable[PathLike]) -> list[str]:
    return list_files(roots, IMAGE_EXTENSIONS)


def _as_hw(size: Size) -> tuple[int, int] | None:
    if size is None:
        return None
    height, width = (size, size) if isinstance(size, int) else size
    if height < 1 or width < 1:
        raise ValueError(f"frame size must be positive, got {size}")
    return height, width


def _cover_size(src_h: int, src_w: int, out_h: int, out_w: int) -> tuple[int, int]:
    """Smallest (h, w) with the source aspect ratio that covers (out_h, out_w)."""
    scale = max(out_h / src_h, out_w / src_w)
    return max(out_h, round(src_h * scale)), max(out_w, round(src_w * scale))


def _center_crop(array: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    top, left = (array.shape[0] - out_h) // 2, (array.shape[1] - out_w) // 2
    return array[top:top + out_h, left:left + out_w]


def load_image_uint8(path: PathLike, size: Size = None) -> np.ndarray:
    """RGB image as uint8 (h, w, 3); resized to cover ``size`` (h, w) and centre-cropped."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            hw = _as_hw(size)
            if hw is not None:
                cover_h, cover_w = _cover_size(image.height, image.width, *hw)
                image = image.resize((cover_w, cover_h), Image.Resampling.BICUBIC)
            array = np.array(image)  # a writable copy: torch.from_numpy refuses read-only arrays
    except (OSError, UnidentifiedImageError) as err:
        raise UnusableFileError(f"cannot read image {path}: {err}") from err
    return np.ascontiguousarray(_center_crop(array, *hw)) if hw is not None else array


def _frame_count(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    if stream.frames:
        return stream.frames
    rate = stream.average_rate or stream.guessed_rate
    if stream.duration is not None and stream.time_base is not None and rate:
        return int(stream.duration * stream.time_base * rate)
    if container.duration is not None and rate:
        return int(Fraction(container.duration, av.time_base) * rate)
    return 0


def _first_video_stream(container, path: PathLike):
    if not container.streams.video:
        raise UnusableFileError(f"{path} has no video stream")
    return container.streams.video[0]


def read_clip(path: PathLike, num_frames: int, size: Size = None,
              rng: np.random.Generator | None = None) -> np.ndarray:
    """Decode ``num_frames`` consecutive frames from a random start (first frame without ``rng``).

    Returns uint8 (num_frames, h, w, 3). Raises :class:`UnusableFileError` for a corrupt file,
    a file without video, or one with fewer than ``num_frames`` frames.
    """
    try:
        with av.open(str(path)) as container:
            stream = _first_video_stream(container, path)
            stream.thread_type = "AUTO"
            total = _frame_count(container, stream)
            if total < num_frames:
                raise UnusableFileError(f"{path} has {total} frames, fewer than sequence_length={num_frames}")
            start = int(rng.integers(0, total - num_frames + 1)) if rng is not None else 0
            frames = _decode_from(container, stream, start, num_frames, _as_hw(size))
    except av.FFmpegError as err:
        raise UnusableFileError(f"cannot decode {path}: {err}") from err
    if len(frames) < num_frames:
        raise UnusableFileError(f"{path} ended after {len(frames)} of {num_frames} frames from frame {start}")
    return np.stack(frames)


def _decode_from(container: av.container.InputContainer, stream: av.video.stream.VideoStream, start: int,
                 num_frames: int, hw: tuple[int, int] | None) -> list[np.ndarray]:
    rate = stream.average_rate or stream.guessed_rate
    if not rate or stream.time_base is None:
        raise UnusableFileError("video stream has no frame rate or time base")
    frame_ticks = 1 / (rate * stream.time_base)  # one frame in time-base units
    first_pts = stream.start_time or 0
    target = first_pts + start * frame_ticks
    if start > 0:
        # Lands on the keyframe at or before the target; decoding forward reaches the exact frame.
        container.seek(int(target), stream=stream, backward=True, any_frame=False)
    frames: list[np.ndarray] = []
    for frame in container.decode(stream):
        if frame.pts is not None and frame.pts < target - frame_ticks / 2:
            continue
        frames.append(_frame_to_array(frame, hw))
        if len(frames) == num_frames:
            break
    return frames


def _frame_to_array(frame: av.VideoFrame, hw: tuple[int, int] | None) -> np.ndarray:
    if hw is None:
        return frame.to_ndarray(format="rgb24")
    cover_h, cover_w = _cover_size(frame.height, frame.width, *hw)
    scaled = frame.reformat(width=cover_w, height=cover_h, format="rgb24", interpolation="AREA")
    return np.ascontiguousarray(_center_crop(scaled.to_ndarray(), *hw))


def video_info(path: PathLike) -> dict[str, object]:
    """``{"frames", "fps" (Fraction), "height", "width"}`` of a video file's first video stream."""
    try:
        with av.open(str(path)) as container:
            stream = _first_video_stream(container, path)
            return {"frames": _frame_count(container, stream), "fps": stream.average_rate or stream.guessed_rate,
                    "height": stream.height, "width": stream.width}
    except av.FFmpegError as err:
        raise UnusableFileError(f"cannot read {path}: {err}") from err


def video_stream_bytes(path: PathLike, frames: int | None = None) -> int:
    """Bytes of the first video stream's packets of its first ``frames`` frames in presentation order (all:
    None): what the source spends on exactly the frames a codec is compared on, without audio or container."""
    try:
        with av.open(str(path)) as container:
            stream = _first_video_stream(container, path)
            packets = [(p.pts if p.pts is not None else index, p.size)
                       for index, p in enumerate(container.demux(stream)) if p.size]
    except av.FFmpegError as err:
        raise UnusableFileError(f"cannot read {path}: {err}") from err
    return sum(size for _, size in sorted(packets)[:frames])


def iter_frames(path: PathLike, size: Size = None, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Every frame (or the first ``max_frames``) as uint8 (h, w, 3), scaled to cover ``size`` and centre-cropped."""
    hw = _as_hw(size)
    try:
        with av.open(str(path)) as container:
            stream = _first_video_stream(container, path)
            stream.thread_type = "AUTO"
            for count, frame in enumerate(container.decode(stream)):
                if max_frames is not None and count >= max_frames:
                    return
                yield _frame_to_array(frame, hw)
    except av.FFmpegError as err:
        raise UnusableFileError(f"cannot decode {path}: {err}") from err


def write_video(path: PathLike, frames: Iterable[np.ndarray], fps: Fraction | float, codec: str = "libx264",
                crf: int = 18) -> int:
    """Encode uint8 (h, w, 3) frames as yuv420p video (``crf``: x264 quality, 0 = lossless luma); returns the count."""
    count = 0
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(100_000),
                                      options={"crf": str(crf)} if codec.startswith("libx264") else {})
        stream.pix_fmt = "yuv420p"
        for array in frames:
            if count == 0:
                stream.height, stream.width = array.shape[:2]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")))
            count += 1
        container.mux(stream.encode())
    return count


class _SkippingDataset(Dataset):
    """Shared retry logic: an unusable file is replaced by another, drawn from a seeded generator."""

    def __init__(self, files: Sequence[PathLike], sequence_length: int, size: Size, seed: int,
                 max_retries: int) -> None:
        if not files:
            raise DataFolderError("dataset got an empty file list")
        if sequence_length < 1:
            raise ValueError(f"sequence_length must be >= 1, got {sequence_length}")
        self.files = [str(f) for f in files]
        self.sequence_length = sequence_length
        self.size = _as_hw(size)
        self.seed = seed
        self.epoch = 0
        self.max_retries = max_retries
        self._known_bad: set[str] = set()  # per worker; only saves re-decoding, never changes results

    def set_epoch(self, epoch: int) -> None:
        """New random starts per epoch; call before each epoch (non-persistent workers see it)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: str, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def _load_with_retries(self, index: int, key: tuple[int, ...]) -> tuple[np.ndarray, str, int]:
        """(array, path, skipped) from file ``index`` or, if unusable, from seeded replacements.

        Each attempt's generator depends only on (seed, epoch, *key, attempt), and the
        replacement is drawn before the file is read, so results never depend on which files
        this worker already knew to be bad.
        """
        candidate = index
        for attempt in range(self.max_retries + 1):
            rng = np.random.default_rng([self.seed, self.epoch, *key, attempt])
            replacement = int(rng.integers(len(self.files)))
            path = self.files[candidate]
            if path not in self._known_bad:
                try:
                    return self._load(path, rng), path, attempt
                except UnusableFileError as err:
                    self._known_bad.add(path)
                    log.warning("skipping %s", err)
            candidate = replacement
        raise DataFolderError(f"{self.max_retries + 1} files in a row were unusable (item {index}, last {path})")


class VideoClipDataset(_SkippingDataset):
    """Clips of ``sequence_length`` frames, uint8 (d, h, w, 3), from random starts in video files."""

    def __init__(self, files: Sequence[PathLike], sequence_length: int, size: Size = None, seed: int = 0,
                 max_retries: int = 8) -> None:
        super().__init__(files, sequence_length, size, seed, max_retries)

    def _load(self, path: str, rng: np.random.Generator) -> np.ndarray:
        return read_clip(path, self.sequence_length, self.size, rng)

    def __getitem__(self, index: int) -> dict[str, object]:
        clip, path, skipped = self._load_with_retries(index, (index,))
        return {"frames": torch.from_numpy(clip), "path": path, "skipped": skipped}


class ImageFrameDataset(_SkippingDataset):
    """Images as pseudo-clips, uint8 (d, h, w, 3), so image and video batches share one layout.

    Item ``i`` is image ``i`` followed by ``sequence_length - 1`` images drawn at random
    (seeded per epoch and index), as the seed project's image mode did; the default is one.
    """

    def __init__(self, files: Sequence[PathLike], size: Size = None, sequence_length: int = 1, seed: int = 0,
                 max_retries: int = 8) -> None:
        super().__init__(files, sequence_length, size, seed, max_retries)

    def _load(self, path: str, rng: np.random.Generator) -> np.ndarray:
        return load_image_uint8(path, self.size)

    def __getitem__(self, index: int) -> dict[str, object]:
        others = np.random.default_rng([self.seed, self.epoch, index]).integers(len(self.files),
                                                                                 size=self.sequence_length - 1)
        loaded = [self._load_with_retries(int(pick), (index, slot)) for slot, pick in enumerate([index, *others])]
        frames = np.stack([array for array, _, _ in loaded])
        return {"frames": torch.from_numpy(frames), "path": loaded[0][1], "skipped": sum(s for _, _, s in loaded)}


def frames_to_model_input(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (b, d, h, w, c) -> (b*d, c, h, w) in [-1, 1]; call it after moving the batch to the device."""
    if frames.dtype != torch.uint8 or frames.ndim != 5:
        raise ValueError(f"expected uint8 frames (b, d, h, w, c), got {frames.dtype} {tuple(frames.shape)}")
    b, d, h, w, c = frames.shape
    images = frames.reshape(b * d, h, w, c).permute(0, 3, 1, 2).to(dtype)
    return images / 127.5 - 1.0


def model_output_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(n, c, h, w) in [-1, 1] -> uint8 (n, h, w, c), clamped and rounded."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
