"""Compress a video with a trained VQ tokenizer: video -> codes file -> reconstructed video.

    python scripts/compress_video.py --model outputs/vq/vqgan_f16/best_psnr --input clip.mp4 \\
        [--codes clip.vqcodes.safetensors] [--output clip_recon.mp4] [--size 256 256] [--report report.json]
    python scripts/compress_video.py --decode --codes clip.vqcodes.safetensors --output clip_recon.mp4

Compressing prints a JSON report: bits per pixel of the codes file, of its entropy-coded payload and of
the indices packed at their bit width (before entropy coding), the source's own video bits for the same
frames, compression ratios against those source bytes and against raw RGB, and the PSNR of the
reconstruction (before and after the output video's own encoding). Decoding is exact: the codes file
gives back the very indices, so the same frames. ``--decode`` rebuilds the
video from the codes file alone: its header names the model export, size, frame count and fps.
Frames are coded at ``--size`` (default: the source size cropped to a multiple of the model's
downsampling factor).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omniflow.models.vq.entropy import CODINGS  # numpy only: --help stays light
from omniflow.runtime.errors import ConfigError, DataError, run_main
from omniflow.runtime.options import parse_options


@dataclass
class CompressOptions:
    model: Optional[str] = field(default=None, metadata={
        "help": "VQ export directory (best_psnr/, final/...); with --decode it overrides the codes file's model"})
    input: Optional[str] = field(default=None, metadata={"help": "video to compress"})
    codes: Optional[str] = field(default=None, metadata={
        "help": "codes file to write (default: <output stem>.vqcodes.safetensors) or, with --decode, to read"})
    output: Optional[str] = field(default=None, metadata={
        "help": "reconstructed video to write (default: <input stem>_recon.mp4 beside the input)"})
    decode: bool = field(default=False, metadata={"help": "rebuild the video from --codes alone"})
    size: Optional[list[int]] = field(default=None, metadata={
        "help": "coded frame size H W (default: source size cropped to a multiple of the downsampling factor)"})
    max_frames: Optional[int] = field(default=None, metadata={"help": "compress only the first N frames"})
    batch_size: int = field(default=8, metadata={"help": "frames per model call"})
    device: str = field(default="auto", metadata={"help": "auto|cpu|cuda|cuda:N"})
    entropy_coding: str = field(default="temporal", metadata={
        "help": "lossless coding of the codes: range coding under the temporal (previous frame + adaptive "
                "histogram) or adaptive (histogram) prior, or packed at the codebook's bit width",
        "choices": list(CODINGS)})
    crf: int = field(default=18, metadata={"help": "x264 quality of the output video (0: lossless luma)"})
    report: Optional[str] = field(default=None, metadata={"help": "also write the report as JSON to this file"})

    def validate(self) -> None:
        if self.decode and not self.codes:
            raise ConfigError("--decode needs --codes FILE")
        if not self.decode and not (self.model and self.input):
            raise ConfigError("compressing needs --model EXPORT_DIR and --input VIDEO (or use --decode --codes FILE)")
        if self.size is not None and len(self.size) != 2:
            raise ConfigError(f"--size takes H W, got {self.size}")


def main() -> None:
    opts = parse_options(CompressOptions, description=__doc__.splitlines()[0])
    from omniflow.data.video import UnusableFileError  # after the flags: torch loads here
    from omniflow.models.vq.video_codec import compress, decode, pick_device

    device = pick_device(opts.device)
    try:
        report = decode(opts, device) if opts.decode else compress(opts, device)
    except UnusableFileError as err:
        raise DataError(str(err)) from None
    text = json.dumps(report, indent=2)
    print(text)
    if opts.report:
        Path(opts.report).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.report).write_text(text + "\n")


if __name__ == "__main__":
    run_main(main)
