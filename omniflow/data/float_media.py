"""Audio/video input and output for FLOAT (PyAV; resampling with scipy).

* :func:`read_audio`: any audio or video file -> mono float32 waveform at a given rate;
* :func:`iter_video_frames`: a video resampled to a frame rate (each output time shows the
  latest source frame), cut to a face crop or the centre square and resized;
* :func:`sample_video_frames`: a frame every so many seconds (what a face detector looks at);
* :func:`write_video`: frames (+ a waveform) -> an MP4 with H.264 (MPEG-4 Part 2 when this
  FFmpeg has no H.264 encoder) video and AAC audio.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np
from PIL import Image
from scipy.signal import resample_poly

from ..runtime.errors import DataError
from .face_crop import SquareCrop

logger = logging.getLogger("omniflow")
PathLike = str | os.PathLike
VIDEO_CODECS = ("libx264", "h264", "mpeg4")  # first one this FFmpeg build can encode is used


class MediaError(DataError):
    """A media file that cannot be decoded, lacks the stream we need, or is unusable for a stated reason;
    ``kind`` (``unreadable``, ``no_face``, ``face_too_small``, ...) is what manifest.json counts skips by."""

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind


def resample(waveform: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling (scipy) of a 1-D waveform from ``rate`` to ``target_rate`` Hz."""
    if rate == target_rate:
        return waveform
    g = math.gcd(int(rate), int(target_rate))
    return resample_poly(waveform, target_rate // g, rate // g).astype(np.float32)


@dataclass
class DecodeLoss:
    """Packets of one stream that its decoder rejected as damaged (skipped, as the ffmpeg command line does),
    and the media time they held."""

    stream: str
    packets: int = 0
    seconds: float = 0.0

    def check(self, path: PathLike, total_seconds: float, max_fraction: float) -> None:
        """Log the loss; :class:`MediaError` (kind ``damaged``) when it exceeds ``max_fraction`` of the stream."""
        if not self.packets:
            return
        share = self.seconds / max(total_seconds, 1e-9)
        if share > max_fraction:
            raise MediaError(f"{path}: {self.packets} damaged {self.stream} packet(s) lose {self.seconds:.3f} s, "
                             f"{share:.1%} of the {self.stream} (> --max_lost_fraction {max_fraction})",
                             kind="damaged")
        logger.warning("%s: %d damaged %s packet(s) skipped, %.3f s lost (%s)", path, self.packets, self.stream,
                       self.seconds, "filled with silence" if self.stream == "audio" else "the frame before is held")


def _decoded(container, stream, loss: DecodeLoss) -> Iterator[tuple[av.frame.Frame | None, int, float]]:
    """(frame, rejected, seconds) for every frame of ``stream``, decoded packet by packet, where ``rejected``
    packets (counted in ``loss.packets``) of ``seconds`` duration came since the frame before and were
    skipped; a last (None, rejected, seconds) when rejected packets end the stream. Damage the demuxer cannot
    get past still raises."""
    rejected, seconds = 0, 0.0
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.FFmpegError:
            loss.packets += 1
            rejected += 1
            seconds += float(packet.duration * packet.time_base) if packet.duration and packet.time_base else 0.0
            continue
        for frame in frames:
            yield frame, rejected, seconds
            rejected, seconds = 0, 0.0
    if rejected:
        yield None, rejected, seconds


def _video_frames(container, stream, loss: DecodeLoss) -> Iterator[av.VideoFrame]:
    """The frames of a video stream, skipping packets the decoder rejects; their time (the larger of the
    timestamps' gap and the packets' durations: B-frame reordering can hide a gap) goes into ``loss``."""
    period = 1 / float(stream.average_rate or stream.guessed_rate or 25)
    previous = None
    for frame, rejected, seconds in _decoded(container, stream, loss):
        time = None if frame is None else frame.time
        if rejected:
            gap = time - previous - period if time is not None and previous is not None else 0.0
            loss.seconds += max(gap, seconds)
        if frame is not None:
            previous = time if time is not None else previous
            yield frame


def read_audio(path: PathLike, sampling_rate: int, loss: DecodeLoss | None = None) -> np.ndarray:
    """The first audio stream of ``path`` as a mono float32 waveform in [-1, 1] at ``sampling_rate``.

    A damaged packet is skipped and its time filled with silence, so what follows stays in sync; it is
    counted in ``loss`` (given: the caller checks it) or logged."""
    own = loss is None
    loss = DecodeLoss("audio") if own else loss
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"{path}: no audio stream")
            stream = container.streams.audio[0]
            # decode to float mono at the source rate; the rate change is done by scipy below
            to_mono = av.AudioResampler(format="flt", layout="mono", rate=stream.rate)
            rate = stream.rate
            chunks, emitted, decoded, start = [], 0, 0, None
            for frame, rejected, rejected_seconds in _decoded(container, stream, loss):
                time = None if frame is None else frame.time
                if rejected:  # fill the lost time with silence: the timestamps' gap (a damaged demux can
                    # merge packets, so their durations may undercount), else the packets' durations
                    lost = (max(time - start - emitted / rate, 0.0) if time is not None and start is not None
                            else rejected_seconds)
                    chunks.append(np.zeros(round(lost * rate), np.float32))
                    emitted += len(chunks[-1])
                    loss.seconds += len(chunks[-1]) / rate
                if frame is not None:
                    start = time if start is None else start
                    chunks += [f.to_ndarray().reshape(-1) for f in to_mono.resample(frame)]
                    emitted += frame.samples
                    decoded += frame.samples
            chunks += [f.to_ndarray().reshape(-1) for f in to_mono.resample(None)]
    except (av.FFmpegError, OSError) as err:
        raise MediaError(f"{path}: cannot decode audio ({type(err).__name__}: {err})") from None
    if not decoded:
        raise MediaError(f"{path}: the audio stream holds no samples"
                         + (f" that decode ({loss.packets} damaged packets)" if loss.packets else ""))
    waveform = np.concatenate(chunks).astype(np.float32)
    if own:
        loss.check(path, len(waveform) / rate, 1.0)
    return resample(waveform, rate, sampling_rate)


def loudness_dbfs(waveform: np.ndarray) -> float:
    """RMS level in dB relative to full scale (-inf for digital silence)."""
    rms = float(np.sqrt(np.mean(np.square(waveform, dtype=np.float64)))) if waveform.size else 0.0
    return 20 * math.log10(rms) if rms > 0 else -math.inf


def square_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop of an (H, W, 3) uint8 image, resized to (size, size, 3)."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(image[top:top + side, left:left + side])
    if side != size:
        crop = crop.resize((size, size), Image.Resampling.BICUBIC)
    return np.array(crop)  # writable, for torch.from_numpy


def video_frame_size(path: PathLike) -> tuple[int, int]:
    """(height, width) of the first video stream's frames; :class:`MediaError` when there is none."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            stream = container.streams.video[0]
            return stream.height, stream.width
    except (av.FFmpegError, OSError) as err:
        raise MediaError(f"{path}: cannot decode video ({type(err).__name__}: {err})") from None


def check_face_size(side: int, min_face_size: int, what: str, measured: str = "face crop") -> None:
    """Refuse a face crop (or a frame, whose face can only be smaller) of ``side`` px below ``min_face_size``:
    upscaled to the model's size it shows no face."""
    if side < min_face_size:
        raise MediaError(f"{what}: its {measured} is {side} px, below --min_face_size {min_face_size} px (too small "
                         f"to show a face; it would only be upscaled)", kind="face_too_small")


def sample_video_frames(path: PathLike, interval: float) -> list[tuple[int, np.ndarray]]:
    """(source frame index, (h, w, 3) uint8 frame) of the first frame and then one frame every ``interval``
    seconds of the first video stream; :class:`MediaError` for an unreadable file or one without frames."""
    samples, due = [], None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 25)
            # damage is counted when the clip's frames are read
            for index, frame in enumerate(_video_frames(container, stream, DecodeLoss("video"))):
                t = frame.time if frame.time is not None else index / rate
                if due is None or t >= due - 1e-6:
                    samples.append((index, frame.to_ndarray(format="rgb24")))
                    due = t + interval
    except (av.FFmpegError, OSError) as err:
        raise MediaError(f"{path}: cannot decode video ({type(err).__name__}: {err})") from None
    if not samples:
        raise MediaError(f"{path}: the video stream holds no frames")
    return samples


def iter_video_frames(path: PathLike, fps: float, size: int, crop: SquareCrop | None = None,
                      loss: DecodeLoss | None = None) -> Iterator[np.ndarray]:
    """Frames of the first video stream at ``fps``, as (size, size, 3) uint8 squares: ``crop`` cut from each
    frame, or (None) the centre square.

    Output frame k shows the latest source frame whose time is <= k / fps, counted from the
    first frame; the last source frame lasts one source frame period. A damaged packet is skipped (the
    frame before it is held), counted in ``loss`` (given: the caller checks it once the frames are read) or
    logged. Raises :class:`MediaError` for an unreadable file or one without video.
    """
    eps = 1e-6
    own = loss is None
    loss = DecodeLoss("video") if own else loss
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or Fraction(fps)
            k, shown, start, last = 0, None, None, 0.0
            for index, frame in enumerate(_video_frames(container, stream, loss)):
                t = frame.time if frame.time is not None else index / float(rate)
                start = t if start is None else start
                last = t - start
                while shown is not None and k / fps < last - eps:
                    yield shown
                    k += 1
                image = frame.to_ndarray(format="rgb24")
                shown = square_crop(image, size) if crop is None else crop.cut(image, size)
            if shown is None:
                raise MediaError(f"{path}: the video stream holds no frames")
            while k / fps < last + 1 / float(rate) - eps:
                yield shown
                k += 1
    except (av.FFmpegError, OSError) as err:
        raise MediaError(f"{path}: cannot decode video ({type(err).__name__}: {err})") from None
    if own:
        loss.check(path, k / fps, 1.0)


def _video_stream(container, fps: float, size: tuple[int, int]):
    for name in VIDEO_CODECS:
        try:
            stream = container.add_stream(name, rate=Fraction(fps).limit_denominator(1001))
        except (av.FFmpegError, ValueError):
            continue
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        return stream
    raise MediaError(f"this FFmpeg build can encode none of {VIDEO_CODECS}")


def write_video(path: PathLike, frames: np.ndarray, fps: float, audio: np.ndarray | None = None,
                sampling_rate: int = 16000) -> Path:
    """Write (T, H, W, 3) uint8 ``frames`` at ``fps`` (H, W even) and an optional mono float
    waveform as an MP4 with H.264 (or MPEG-4) video and AAC audio."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        video = _video_stream(container, fps, frames.shape[1:3])
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=sampling_rate)
            sound.layout = "mono"
        for image in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")))
        container.mux(video.encode())
        if sound is not None:
            frame = av.AudioFrame.from_ndarray(np.asarray(audio, np.float32)[None], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = sampling_rate, 0
            container.mux(sound.encode(frame))
            container.mux(sound.encode())
    return path
