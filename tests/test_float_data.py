"""FLOAT data: clip shards cut into training windows, the epoch-aware loader, media decoding."""
from __future__ import annotations

import math

import av
import numpy as np
import pytest
import torch

from omniflow.data import ResumableLoader
from omniflow.data.float_media import MediaError, iter_video_frames, loudness_dbfs, read_audio, write_video
from omniflow.data.float_shards import (ClipRecord, FloatWindowDataset, clip_id_for, write_clip,
                                        write_manifest)
from omniflow.runtime.errors import DataError

P, L, W, F = 3, 4, 2, 5  # previous frames, window, motion width, feature width


def _clip(offset: float, frames: int) -> dict[str, torch.Tensor]:
    """Frame t of the clip carries the value offset + t in every channel."""
    t = offset + torch.arange(frames, dtype=torch.float32)[:, None]
    return {"motion": t.expand(frames, W).clone(), "audio_features": t.expand(frames, F).half(),
            "emotion": torch.eye(7)[3], "reference_image": torch.zeros(3, 8, 8, dtype=torch.uint8)}


@pytest.fixture
def data_dir(tmp_path):
    clips = []
    for name, offset, frames in (("a", 0.0, 13), ("b", 100.0, 9), ("short", 200.0, 3)):
        shard = write_clip(tmp_path, name, _clip(offset, frames), 25.0)
        clips.append(ClipRecord(name, f"{name}.mp4", shard, frames, 25.0, "happy", "label"))
    write_manifest(tmp_path, {"dim_w": W, "audio_feature_dim": F}, clips, [{"source": "x.mp4", "reason": "silent"}])
    return tmp_path


def test_windows_hold_previous_frames_and_a_reference_of_the_same_clip(data_dir):
    ds = FloatWindowDataset(data_dir, P, L, seed=1)
    assert [c.id for c in ds.clips] == ["a", "b"]  # "short" has no full window
    assert len(ds) == 13 // L + 9 // L == 5
    seen = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            base = 100.0 * int(item["clip"])
            start, has_prev = int(item["start"]), bool(item["has_prev"])
            seen.add((epoch, start))
            assert start == 0 or start >= P, "a window never gets a partial set of previous frames"
            assert has_prev == (start > 0)
            assert torch.equal(item["motion"][:, 0], base + start + torch.arange(L, dtype=torch.float32))
            assert torch.equal(item["audio"][:, 0], item["motion"][:, 0])
            expected_prev = base + start - P + torch.arange(P, dtype=torch.float32) if has_prev else torch.zeros(P)
            assert torch.equal(item["prev_motion"][:, 0], expected_prev)
            assert torch.equal(item["prev_audio"][:, 0], expected_prev)
            assert item["reference_motion"][0] == base + int(item["reference"])
    assert len({start for _, start in seen}) > 3, "starts are drawn, not fixed"


def test_windows_depend_only_on_seed_epoch_and_index(data_dir):
    first, second = FloatWindowDataset(data_dir, P, L, seed=1), FloatWindowDataset(data_dir, P, L, seed=1)
    first.set_epoch(2)
    second.set_epoch(2)
    assert all(torch.equal(first[i]["motion"], second[i]["motion"]) for i in (4, 0, 2))
    starts = lambda ds: [int(ds[i]["start"]) * 100 + int(ds[i]["reference"]) for i in range(len(ds))]
    second.set_epoch(3)
    assert starts(first) != starts(second)


def test_validation_windows_tile_each_clip_from_its_first_frame(data_dir):
    ds = FloatWindowDataset(data_dir, P, L, random_windows=False)
    items = [ds[i] for i in range(len(ds))]
    assert [(int(x["clip"]), int(x["start"]), int(x["reference"])) for x in items] == [
        (0, 0, 0), (0, 4, 0), (0, 8, 0), (1, 0, 0), (1, 4, 0)]
    assert [float(x["has_prev"]) for x in items] == [0.0, 1.0, 1.0, 0.0, 1.0]


def test_bad_data_folders_are_reported(data_dir, tmp_path_factory):
    with pytest.raises(DataError, match="no clip has a full window of 20 frames"):
        FloatWindowDataset(data_dir, P, 20)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="preprocess_float.py"):
        FloatWindowDataset(empty, P, L)
    (empty / "manifest.json").write_text('{"format": "float-clips-v1",\n "clips": [}')
    with pytest.raises(DataError, match="manifest.json: invalid JSON at line 2"):
        FloatWindowDataset(empty, P, L)
    (empty / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(DataError, match="format 'other'"):
        FloatWindowDataset(empty, P, L)
    assert clip_id_for("dir/my clip!.mp4", taken := {"my_clip_"}) == "my_clip__2" and "my_clip__2" in taken


def test_loader_resumed_at_an_epoch_end_continues_like_an_uninterrupted_one(data_dir):
    make = lambda: ResumableLoader(FloatWindowDataset(data_dir, P, L, seed=3), 2, seed=3)
    whole = make()
    epochs = [[b["start"].tolist() for b in whole] for _ in range(3)]
    assert epochs[1] != epochs[2], "new windows every epoch"
    resumed = make()
    for _ in zip(range(len(resumed)), resumed):  # stop right after the last batch of epoch 0
        pass
    state = resumed.state_dict()
    restored = make()
    restored.load_state_dict(state)
    assert [b["start"].tolist() for b in restored] == epochs[1]


# ---- media ------------------------------------------------------------------------------------

def test_video_is_resampled_to_the_target_frame_rate(tmp_path):
    # 1 s at 30 fps; frame k has brightness 8k
    frames = np.stack([np.full((40, 60, 3), 8 * k, np.uint8) for k in range(30)])
    path = write_video(tmp_path / "ramp.mp4", frames, 30)
    out = list(iter_video_frames(path, 25, 16))
    assert len(out) == 25 and out[0].shape == (16, 16, 3)
    shown = [round(float(f.mean()) / 8) for f in out]
    assert shown == [math.floor(j * 30 / 25 + 1e-9) for j in range(25)]


def test_audio_is_decoded_to_mono_and_resampled(tmp_path):
    rate = 48000
    t = np.arange(rate) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    path = write_video(tmp_path / "tone.mp4", np.zeros((25, 16, 16, 3), np.uint8), 25, tone, rate)
    audio = read_audio(path, 16000)
    assert abs(len(audio) - 16000) < 1100  # AAC frames pad the end
    spectrum = np.abs(np.fft.rfft(audio[2000:14000]))
    assert abs(np.argmax(spectrum) * 16000 / 12000 - 440) < 3
    assert loudness_dbfs(audio[2000:14000]) == pytest.approx(20 * math.log10(0.5 / math.sqrt(2)), abs=0.5)
    assert loudness_dbfs(np.zeros(100, np.float32)) == -math.inf


def test_unreadable_media_raise_one_media_error(tmp_path):
    silent_video = write_video(tmp_path / "video_only.mp4", np.zeros((5, 16, 16, 3), np.uint8), 25)
    with pytest.raises(MediaError, match="no audio stream"):
        read_audio(silent_video, 16000)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00" * 512)
    with pytest.raises(MediaError, match="cannot decode video"):
        list(iter_video_frames(garbage, 25, 16))
    with av.open(str(silent_video)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
