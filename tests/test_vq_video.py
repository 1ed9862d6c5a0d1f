import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from omniflow.data.video import (DataFolderError, ImageFrameDataset, VideoClipDataset, frames_to_model_input,
                                 list_images, list_videos, model_output_to_uint8, read_clip)
from vq_helpers import panning_frames, photo_uint8, write_video

N_FRAMES = 24


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    (root / "sub").mkdir()
    frames = panning_frames(N_FRAMES)
    good_h264 = write_video(root / "pan_h264.mp4", frames, "libx264")
    good_mpeg4 = write_video(root / "sub" / "pan_mpeg4.mp4", frames, "mpeg4")
    short = write_video(root / "short.mp4", frames[:3], "libx264")
    truncated = root / "truncated.mp4"
    truncated.write_bytes(good_h264.read_bytes()[: good_h264.stat().st_size // 3])
    (root / "notes.txt").write_text("not a video")
    return {"root": root, "frames": frames, "h264": good_h264, "mpeg4": good_mpeg4, "short": short,
            "truncated": truncated}


def _half_size(frame):
    h, w, c = frame.shape
    return frame.reshape(h // 2, 2, w // 2, 2, c).mean(axis=(1, 3))


def _source_positions(clip, frames):
    """Index of the original frame each decoded frame matches best."""
    reference = np.stack([_half_size(f) for f in frames])
    return [int(np.abs(reference - frame.astype(np.float64)).mean(axis=(1, 2, 3)).argmin()) for frame in clip]


@pytest.mark.parametrize("codec", ["h264", "mpeg4"])
def test_clips_are_consecutive_frames_from_a_seeded_random_start(videos, codec):
    dataset = VideoClipDataset([videos[codec]], sequence_length=5, size=(32, 48), seed=7)
    starts = set()
    for epoch in range(4):
        dataset.set_epoch(epoch)
        item = dataset[0]
        clip = item["frames"]
        assert clip.dtype == torch.uint8 and clip.shape == (5, 32, 48, 3) and item["skipped"] == 0
        positions = _source_positions(clip.numpy(), videos["frames"])
        assert positions == list(range(positions[0], positions[0] + 5)), positions
        starts.add(positions[0])
        torch.testing.assert_close(dataset[0]["frames"], clip)  # same (seed, epoch, index) -> same clip
    assert len(starts) > 1 and max(starts) > 4  # random starts, reached past the first keyframe interval


def test_read_clip_without_generator_starts_at_the_first_frame(videos):
    clip = read_clip(videos["h264"], 3, size=None)
    assert clip.shape == (3, 64, 96, 3)
    assert np.abs(clip[0].astype(int) - videos["frames"][0].astype(int)).mean() < 8


def test_corrupt_and_short_videos_are_skipped_and_counted(videos, caplog):
    files = [videos["truncated"], videos["short"], videos["h264"]]
    dataset = VideoClipDataset(files, sequence_length=5, size=16, seed=3)
    with caplog.at_level(logging.WARNING, logger="omniflow.data.video"):
        items = [dataset[i] for i in range(3)]
    for item in items:
        assert item["path"] == str(videos["h264"]) and item["frames"].shape == (5, 16, 16, 3)
    assert items[0]["skipped"] >= 1 and items[1]["skipped"] >= 1 and items[2]["skipped"] == 0
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "truncated.mp4" in messages and "fewer than sequence_length=5" in messages

    # A fresh worker that has not seen the bad files yet draws exactly the same items.
    fresh = VideoClipDataset(files, sequence_length=5, size=16, seed=3)
    for i in (1, 0):
        again = fresh[i]
        torch.testing.assert_close(again["frames"], items[i]["frames"])
        assert again["skipped"] == items[i]["skipped"]


def test_only_unusable_files_raise_a_clear_error(videos):
    dataset = VideoClipDataset([videos["truncated"], videos["short"]], sequence_length=5, max_retries=3)
    with pytest.raises(DataFolderError, match="4 files in a row were unusable"):
        dataset[0]


def test_loader_batch_becomes_model_input_on_device(videos):
    dataset = VideoClipDataset([videos["h264"], videos["mpeg4"]], sequence_length=4, size=(32, 48), seed=0)
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert batch["frames"].shape == (2, 4, 32, 48, 3) and batch["skipped"].tolist() == [0, 0]
    images = frames_to_model_input(batch["frames"])
    assert images.shape == (8, 3, 32, 48) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    # frame 5 of the batch is clip 1, frame 1, channel order preserved
    torch.testing.assert_close(images[5], batch["frames"][1, 1].permute(2, 0, 1).float() / 127.5 - 1)
    torch.testing.assert_close(model_output_to_uint8(images).reshape(2, 4, 32, 48, 3), batch["frames"])
    with pytest.raises(ValueError, match="expected uint8 frames"):
        frames_to_model_input(images)


def test_listing_finds_videos_recursively_and_reports_bad_folders(videos, tmp_path):
    found = list_videos(videos["root"])
    assert found == sorted(found) and str(videos["mpeg4"]) in found and not any(f.endswith(".txt") for f in found)
    with pytest.raises(DataFolderError, match="data folder not found"):
        list_videos(tmp_path / "nowhere")
    with pytest.raises(DataFolderError, match="no files with suffix .mp4"):
        list_videos(tmp_path)


def test_image_folder_frames(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(photo_uint8("astronaut", 64, 64)).save(tmp_path / "a" / "astronaut.png")
    Image.fromarray(photo_uint8("chelsea", 60, 90)).save(tmp_path / "chelsea.jpg", quality=95)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    files = list_images(tmp_path)
    assert [f.rsplit("/", 1)[-1] for f in files] == ["astronaut.png", "broken.png", "chelsea.jpg"]

    dataset = ImageFrameDataset(files, size=32)
    first = dataset[0]["frames"]
    assert first.shape == (1, 32, 32, 3) and first.dtype == torch.uint8
    expected = np.asarray(Image.fromarray(photo_uint8("astronaut", 64, 64)).resize((32, 32), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(first[0].numpy(), expected)
    assert dataset[2]["frames"].shape == (1, 32, 32, 3)  # 60x90 covers 32x32 and is centre-cropped
    broken = dataset[1]
    assert broken["skipped"] >= 1 and broken["path"] != files[1]


def test_image_mode_sequences_draw_seeded_random_images(tmp_path):
    names = ("astronaut", "coffee", "rocket", "chelsea")
    for name in names:
        Image.fromarray(photo_uint8(name, 32, 32)).save(tmp_path / f"{name}.png")
    files = list_images(tmp_path)
    dataset = ImageFrameDataset(files, size=32, sequence_length=3, seed=5)
    drawn = set()
    for epoch in range(3):
        dataset.set_epoch(epoch)
        item = dataset[1]
        assert item["frames"].shape == (3, 32, 32, 3) and item["path"] == files[1]
        np.testing.assert_array_equal(item["frames"][0].numpy(), np.asarray(Image.open(files[1])))
        torch.testing.assert_close(dataset[1]["frames"], item["frames"])
        for frame in item["frames"][1:].numpy():
            drawn.add(next(i for i, f in enumerate(files) if np.array_equal(frame, np.asarray(Image.open(f)))))
    assert len(drawn) > 1
