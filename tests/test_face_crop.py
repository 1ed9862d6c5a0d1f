"""omniflow.data.face_crop: FLOAT's official crop around a face box, and one crop per clip."""
import numpy as np

from omniflow.data.face_crop import SquareCrop, clip_crop


def test_the_crop_is_centred_on_the_box_with_the_official_margin():
    crop = SquareCrop.around((40, 30, 80, 90))  # x1, y1, x2, y2: 40 wide, 60 high
    assert (crop.cy, crop.cx, crop.half, crop.side) == (60, 60, 48, 96)  # half = 1.6 x 30


def test_cutting_keeps_the_pixels_inside_and_is_black_outside():
    frame = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    inside = SquareCrop(10, 15, 5)
    assert np.array_equal(inside.cut(frame, 10), frame[5:15, 10:20])
    corner = SquareCrop(2, 3, 4)  # rows -2..6, columns -1..7
    cut = corner.cut(frame, 8)
    assert np.array_equal(cut[2:, 1:], frame[:6, :7]) and not cut[:2].any() and not cut[:, :1].any()
    assert SquareCrop(10, 15, 5).cut(frame, 64).shape == (64, 64, 3)


def test_a_clip_gets_the_median_crop_of_its_frames_or_none():
    boxes = [(40, 30, 80, 90), (42, 30, 82, 90), None, (44, 32, 84, 92), (0, 0, 10, 10)]  # one miss, one outlier
    crop = clip_crop(boxes)
    assert (crop.cy, crop.cx, crop.half) == (60, 61, 48)  # medians of (60, 60, 62, 5), (60, 62, 64, 5), (48, 48, 48, 8)
    assert clip_crop([None, None, (40, 30, 80, 90)]) is None  # a face in fewer than half of the frames
    assert clip_crop([]) is None
