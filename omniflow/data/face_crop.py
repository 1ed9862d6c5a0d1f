"""Face crops as FLOAT's official preprocessing makes them, from face boxes found by any detector.

The recipe (FLOAT's ``generate.py``): the square around the face box's centre whose half side is 1.6 times
the box's larger half side, cut from the frame with a black border where it leaves the frame, then resized to
the model's input size. A clip gets one crop for all its frames: the median of the boxes found in its sampled
frames, so that the motion the model learns is the head's, not the crop's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

FACE_DETECTORS = ("mtcnn", "none")  # see face_detect.py; none: the centre square, as before detection
MARGIN = 1.6  # half side of the crop / larger half side of the face box (official recipe)
Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels


@dataclass(frozen=True)
class SquareCrop:
    """A square of half side ``half`` px centred on (``cy``, ``cx``); it may reach outside the frame."""

    cy: int
    cx: int
    half: int

    @classmethod
    def around(cls, box: Box, margin: float = MARGIN) -> "SquareCrop":
        x1, y1, x2, y2 = box
        half = int(max((y2 - y1) / 2, (x2 - x1) / 2) * margin)
        return cls(int((y1 + y2) / 2), int((x1 + x2) / 2), max(half, 1))

    @property
    def side(self) -> int:
        return 2 * self.half

    def cut(self, frame: np.ndarray, size: int) -> np.ndarray:
        """The crop of an (h, w, 3) uint8 frame, black outside the frame, resized to (size, size, 3)."""
        h, w = frame.shape[:2]
        out = np.zeros((self.side, self.side, 3), dtype=np.uint8)
        top, left = self.cy - self.half, self.cx - self.half
        y1, y2 = max(top, 0), min(top + self.side, h)
        x1, x2 = max(left, 0), min(left + self.side, w)
        if y1 < y2 and x1 < x2:
            out[y1 - top:y2 - top, x1 - left:x2 - left] = frame[y1:y2, x1:x2]
        if self.side == size:
            return out
        resample = Image.Resampling.BOX if self.side > size else Image.Resampling.BICUBIC
        return np.asarray(Image.fromarray(out).resize((size, size), resample))


def clip_crop(boxes: Sequence[Box | None], min_found: float = 0.5, margin: float = MARGIN) -> SquareCrop | None:
    """One crop for a clip from the face boxes of its sampled frames (None where no face was found): the
    median centre and half side of the frames' crops; None when faces were found in fewer than ``min_found``
    of the frames."""
    found = [SquareCrop.around(box, margin) for box in boxes if box is not None]
    if not boxes or len(found) < min_found * len(boxes):
        return None
    return SquareCrop(int(np.median([c.cy for c in found])), int(np.median([c.cx for c in found])),
                      int(np.median([c.half for c in found])))
