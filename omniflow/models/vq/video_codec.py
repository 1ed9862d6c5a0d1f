"""Video codec of a trained VQ tokenizer (scripts/compress_video.py): frames -> code indices -> codes file, and
back to frames, with the reconstruction's PSNR pooled over the whole video."""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ...data.video import (frames_to_model_input, iter_frames, model_output_to_uint8, video_info, video_stream_bytes,
                           write_video)
from ...runtime.errors import CheckpointError, ConfigError, DataError
from ...runtime.tracking import progress
from .base import VQConfigError, VQTokenizer
from .codes import CodesFileError, load_codes, read_payload, save_codes
from .entropy import bit_width
from .registry import load_vq_model


def load_model(path: str, device: torch.device) -> VQTokenizer:
    try:
        return load_vq_model(path, device)[0]
    except VQConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _batches(frames: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    batch = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


@torch.no_grad()
def encode_frames(model: VQTokenizer, frames: Iterable[np.ndarray], batch_size: int) -> list[np.ndarray]:
    """Code indices per level, each (frames, h_l, w_l) int64."""
    device = model.get_last_layer().device
    levels: list[list[np.ndarray]] = []
    for batch in progress(_batches(frames, batch_size), desc="encode", unit="batch"):
        indices = model.encode(frames_to_model_input(torch.from_numpy(batch)[None].to(device))).indices
        indices = indices if isinstance(indices, tuple) else (indices,)
        levels = levels or [[] for _ in indices]
        for store, level in zip(levels, indices):
            store.append(level.cpu().numpy())
    if not levels:
        raise DataError("the input video has no frames")
    return [np.concatenate(store) for store in levels]


@torch.no_grad()
def decode_frames(model: VQTokenizer, levels: list[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Reconstructed uint8 (h, w, 3) frames from per-level code indices."""
    device = model.get_last_layer().device
    for start in progress(range(0, len(levels[0]), batch_size), desc="decode", unit="batch"):
        indices = tuple(torch.from_numpy(level[start:start + batch_size]).to(device) for level in levels)
        images = model.decode_indices(indices if len(indices) > 1 else indices[0])
        yield from model_output_to_uint8(images).cpu().numpy()


class PooledPSNR:
    """PSNR of a whole video: the squared error is pooled over all frames before the log."""

    def __init__(self) -> None:
        self.squared_error, self.values = 0.0, 0

    def add(self, reference: np.ndarray, test: np.ndarray) -> None:
        diff = reference.astype(np.float64) - test.astype(np.float64)
        self.squared_error += float((diff * diff).sum())
        self.values += diff.size

    def psnr(self) -> float:
        mse = self.squared_error / max(self.values, 1)
        return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def compared(frames: Iterable[np.ndarray], reference: Iterable[np.ndarray], meter: PooledPSNR) -> Iterator[np.ndarray]:
    for frame, ref in zip(frames, reference):
        meter.add(ref, frame)
        yield frame


def coded_size(opts, info: dict, factor: int) -> tuple[int, int]:
    height, width = opts.size or (info["height"] - info["height"] % factor, info["width"] - info["width"] % factor)
    if height < factor or width < factor or height % factor or width % factor:
        raise ConfigError(f"coded size {height}x{width} must be positive multiples of the model's downsampling "
                          f"factor {factor} (set --size)")
    return height, width


def compress(opts, device: torch.device) -> dict:
    model = load_model(opts.model, device)
    source = Path(opts.input)
    if not source.is_file():
        raise FileNotFoundError(f"--input video not found: {source}")
    info = video_info(source)
    height, width = coded_size(opts, info, model.downsample_factor)
    output = Path(opts.output or source.with_name(f"{source.stem}_recon.mp4"))
    codes_path = Path(opts.codes or output.with_name(f"{output.stem}.vqcodes.safetensors"))
    output.parent.mkdir(parents=True, exist_ok=True)

    levels = encode_frames(model, iter_frames(source, (height, width), opts.max_frames), opts.batch_size)
    frames = len(levels[0])
    header = {"model": str(Path(opts.model).resolve()), "frames": frames, "height": height, "width": width,
              "fps": str(Fraction(info["fps"])), "source": {"name": source.name, "bytes": source.stat().st_size,
                                                            "height": info["height"], "width": info["width"]}}
    save_codes(codes_path, levels, model.codebook_sizes, header, coding=opts.entropy_coding)

    reconstruction = PooledPSNR()
    reference = iter_frames(source, (height, width), opts.max_frames)
    write_video(output, compared(decode_frames(model, levels, opts.batch_size), reference, reconstruction),
                info["fps"], crf=opts.crf)
    written = PooledPSNR()
    for ref, frame in zip(iter_frames(source, (height, width), opts.max_frames), iter_frames(output)):
        written.add(ref, frame)

    pixels = frames * height * width
    codes_bytes = codes_path.stat().st_size
    index_bits = sum(level.size * bit_width(size) for level, size in zip(levels, model.codebook_sizes))
    payload_bytes = sum(tensor.nbytes for tensor in read_payload(codes_path))
    source_bytes = video_stream_bytes(source, frames)  # the source's video packets of the same frames
    return {
        "input": str(source), "codes": str(codes_path), "output": str(output), "frames": frames,
        "source_frames": info["frames"], "coded_size": [height, width], "coding": opts.entropy_coding,
        "source_file_bytes": header["source"]["bytes"], "source_video_bytes": source_bytes,
        "source_bits_per_source_pixel": source_bytes * 8 / (frames * info["height"] * info["width"]),
        "codes_bytes": codes_bytes, "bits_per_pixel": codes_bytes * 8 / pixels,
        "index_bits_per_pixel": index_bits / pixels, "entropy_coded_bits_per_pixel": payload_bytes * 8 / pixels,
        "compression_ratio_vs_source": source_bytes / codes_bytes,
        "compression_ratio_vs_raw_rgb": pixels * 3 / codes_bytes,
        "psnr": reconstruction.psnr(), "psnr_output_video": written.psnr(),
    }


def decode(opts, device: torch.device) -> dict:
    levels, header = load_codes(opts.codes)
    model = load_model(opts.model or header["model"], device)
    if list(model.codebook_sizes) != header["codebook_sizes"]:
        raise CodesFileError(f"{opts.codes}: coded with codebooks {header['codebook_sizes']}, the model "
                             f"{opts.model or header['model']} has {model.codebook_sizes}")
    codes_path = Path(opts.codes)
    output = Path(opts.output or codes_path.with_name(codes_path.name.split(".")[0] + "_decoded.mp4"))
    output.parent.mkdir(parents=True, exist_ok=True)
    count = write_video(output, decode_frames(model, levels, opts.batch_size), Fraction(header["fps"]), crf=opts.crf)
    return {"codes": str(codes_path), "output": str(output), "frames": count,
            "coded_size": [header["height"], header["width"]]}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
