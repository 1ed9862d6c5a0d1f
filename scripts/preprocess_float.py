"""Talking-head videos -> FLOAT training shards (see ``omniflow/data/float_shards.py``).

For every video under ``--input_dir``: the frames are resampled to ``--fps`` and cut to
``--input_size`` squares around the face (FLOAT's official crop: 1.6x the face box, one crop per clip,
the median of MTCNN's boxes every half second; ``--face_detector none``: the centre square), encoded into motion latents by the frozen motion auto-encoder; the
audio track is resampled to ``--sampling_rate`` and turned into per-frame wav2vec2 features
(before FLOAT's trained projection); the emotion comes from ``--emotion_labels`` or the
speech-emotion classifier. Damaged packets are skipped as the ffmpeg command line does, their seconds
recorded per clip (``lost_audio_seconds``, ``lost_video_seconds``). Unreadable, silent or too short clips,
clips losing more than ``--max_lost_fraction`` of their audio or video to damage, and clips without a face in at
least half of the sampled frames or with a face crop below ``--min_face_size`` px, are skipped and listed
in the manifest with the reason (``skipped``) and counted by kind (``skipped_counts``).

    python scripts/preprocess_float.py --input_dir videos/ --output_dir data/float \
        --motion_autoencoder checkpoints/float.pth
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omniflow.data.face_crop import FACE_DETECTORS
from omniflow.models.float.cli import PresetOptions, parse_float_options
from omniflow.models.float.config import EMOTION_LABELS, FloatConfig
from omniflow.runtime.errors import DataError, run_main
from omniflow.runtime.paths import path_to_record

logger = logging.getLogger("omniflow")
FEATURE_DTYPES = ("float32", "float16", "bfloat16")  # torch dtype names


@dataclass
class PreprocessOptions:
    input_dir: str = field(default="", metadata={"help": "folder of talking-head videos with audio (searched recursively)"})
    output_dir: str = field(default="data/float", metadata={"help": "where manifest.json and clips/ are written"})
    motion_autoencoder: str = field(default="float", metadata={
        "help": "released float.pth (file, folder or hub name) or a MotionAutoEncoder export folder"})
    emotion_labels: Optional[str] = field(default=None, metadata={
        "help": "JSON object {clip id, file name or stem: emotion label}; clips without a label get the "
                "classifier's prediction"})
    min_loudness_db: float = field(default=-50.0, metadata={
        "help": "clips whose audio RMS level (dBFS) is below this are skipped as silent"})
    face_detector: str = field(default="mtcnn", metadata={
        "help": "face detector for the crop (mtcnn: facenet-pytorch's MTCNN); none: the centre square",
        "choices": list(FACE_DETECTORS)})
    min_face_size: int = field(default=64, metadata={
        "help": "clips whose face crop (the centre square with --face_detector none) is smaller than this many "
                "source pixels are skipped"})
    max_lost_fraction: float = field(default=0.05, metadata={
        "help": "damaged audio or video packets are skipped (audio: silence in their place; video: the frame "
                "before is held) and their seconds recorded per clip; a clip losing more than this fraction of "
                "its audio or video is skipped"})
    batch_size: int = field(default=16, metadata={"help": "frames per motion-encoder batch"})
    feature_dtype: str = field(default="float16", metadata={
        "help": "storage dtype of the audio features", "choices": list(FEATURE_DTYPES)})
    device: Optional[str] = field(default=None, metadata={"help": "torch device (default: cuda if available, else cpu)"})

    def validate(self) -> None:
        if not self.input_dir:
            raise DataError("--input_dir is required")
        if not 0 <= self.max_lost_fraction <= 1:
            raise DataError(f"--max_lost_fraction must be in [0, 1], got {self.max_lost_fraction}")
        if self.batch_size < 1:
            raise DataError(f"--batch_size must be >= 1, got {self.batch_size}")


def main(argv: list[str] | None = None) -> Path:
    opts, _, config = parse_float_options(PreprocessOptions, PresetOptions, FloatConfig, args=argv)
    out = Path(opts.output_dir)
    import torch  # after the flags: --help and a wrong flag do not wait for it

    from omniflow.data.float_shards import ClipRecord, clip_id_for, write_clip, write_manifest
    from omniflow.data.video import VIDEO_EXTENSIONS, list_files
    from omniflow.models.float.clips import ClipEncoder, encode_clip, read_labels
    from omniflow.runtime.tracking import setup_logging

    setup_logging(out, True, "preprocess.log")
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if opts.face_detector == "none":
        logger.info("--face_detector none: frames are centre-cropped to a square and resized to %d px; give "
                    "face-centred videos", config.input_size)
    videos = list_files(opts.input_dir, VIDEO_EXTENSIONS)
    labels = read_labels(opts.emotion_labels)
    encoder = ClipEncoder(config, opts, device)
    clips, skipped, taken = [], [], set()
    for video in videos:
        clip_id = clip_id_for(video, taken)
        name = Path(video)
        label = labels.get(clip_id, labels.get(name.name, labels.get(name.stem)))
        try:
            tensors, emotion, source, lost = encode_clip(encoder, video, label)
        except DataError as err:
            reason = str(err).removeprefix(f"{video}: ")
            logger.warning("skipped %s: %s", video, reason)
            skipped.append({"source": video, "reason": reason, "kind": getattr(err, "kind", "invalid")})
            continue
        shard = write_clip(out, clip_id, tensors, config.fps)
        frames = len(tensors["motion"])
        clips.append(ClipRecord(id=clip_id, source=video, shard=shard, frames=frames, fps=config.fps,
                                emotion=emotion, emotion_source=source, **lost))
        logger.info("%s: %d frames, emotion %s (%s)", clip_id, frames, emotion, source)
    settings = {"fps": config.fps, "sampling_rate": config.sampling_rate, "input_size": config.input_size,
                "dim_w": config.dim_w, "audio_feature_dim": config.audio_feature_dim,
                "only_last_features": config.only_last_features, "emotion_labels": list(EMOTION_LABELS),
                "motion_autoencoder": path_to_record(opts.motion_autoencoder),  # absolute: readable from anywhere
                "wav2vec_model_path": path_to_record(config.wav2vec_model_path),
                "audio2emotion_path": path_to_record(config.audio2emotion_path),
                "face_detector": opts.face_detector,
                "skipped_counts": dict(sorted(Counter(s["kind"] for s in skipped).items()))}
    manifest = write_manifest(out, settings, clips, skipped)
    logger.info("%d clip(s) written, %d skipped; manifest %s", len(clips), len(skipped), manifest)
    return manifest


if __name__ == "__main__":
    run_main(main)
