"""The FLOAT scripts end to end on CPU with the tiny configuration.

Inputs are real: two recorded speech clips (pocketsphinx-testdata) muxed as AAC at 48 kHz into
30 fps talking-head-like videos made from scikit-image's astronaut portrait, plus a silent and a
truncated (corrupt) video. The motion auto-encoder and emotion classifier are the tiny reference
fixtures; the wav2vec2 is a random one whose stacked layer outputs are 9216 wide, the input
width of the tiny reference checkpoint's audio projection, so that checkpoint can be fine-tuned.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.io import wavfile

from float_helpers import EMOTION_DIR, SPEECH, TINY_CHECKPOINT, tiny_config, write_talking_head, write_wide_wav2vec2
from omniflow.models.float import EMOTION_LABELS, MotionAutoEncoder
from omniflow.runtime.errors import DataError
import runtime_helpers
from runtime_helpers import REPO, assert_pickle_free, env, error_line

pytestmark = pytest.mark.slow

SCRIPTS = REPO / "scripts"
FULL_STEPS, RESUME_AT = 24, 12


def run_script(name: str, *args, processes: int = 1, cwd=REPO, check=True) -> subprocess.CompletedProcess:
    return runtime_helpers.run_script(SCRIPTS / name, *args, processes=processes, cwd=cwd, check=check)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("float_scripts")


@pytest.fixture(scope="module")
def wav2vec2(work):
    return write_wide_wav2vec2(work / "wav2vec2-wide")


@pytest.fixture(scope="module")
def model_args(wav2vec2):
    return ["--config", "tiny", "--wav2vec_model_path", wav2vec2, "--audio2emotion_path", EMOTION_DIR]


@pytest.fixture(scope="module")
def videos(work):
    folder = work / "videos"
    folder.mkdir()
    write_talking_head(folder / "clip_a.mp4", SPEECH[0])
    write_talking_head(folder / "clip_b.mp4", SPEECH[1], phase=1.0)
    write_talking_head(folder / "silent.mp4", None)
    write_talking_head(folder / "tiny.mp4", SPEECH[0], size=(12, 16))  # too small to show a face
    whole = (folder / "clip_a.mp4").read_bytes()
    (folder / "broken.mp4").write_bytes(whole[: len(whole) // 2])
    return folder


@pytest.fixture(scope="module")
def shards(work, videos, wav2vec2):
    """Preprocessed in ``work`` with the wav2vec2 named by a relative path; trained and generated from elsewhere."""
    labels = work / "labels.json"
    labels.write_text(json.dumps({"clip_a": "happy"}))
    out = work / "shards"
    run_script("preprocess_float.py", "--input_dir", videos, "--output_dir", out, "--motion_autoencoder",
               TINY_CHECKPOINT, "--emotion_labels", labels, "--config", "tiny", "--wav2vec_model_path",
               wav2vec2.relative_to(work), "--audio2emotion_path", EMOTION_DIR, cwd=work)
    return out


def train(shards, out, *extra, check=True):
    return run_script("train_rectified_flow.py", "--config", "tiny", "--data_dir", shards, "--output_dir", out,
                      "--batch_size", 4, "--logging_steps", 1, "--learning_rate", 1e-3, "--lr_warmup_epochs", 0,
                      "--ema_decay", 0.9, *extra, check=check)


@pytest.fixture(scope="module")
def trained(work, shards):
    """A run from scratch with validation, samples, TensorBoard and both exports."""
    out = work / "run_full"
    train(shards, out, "--max_train_steps", FULL_STEPS, "--checkpointing_steps", RESUME_AT, "--val_data_dir", shards,
          "--eval_interval", 6, "--sample_interval", RESUME_AT, "--motion_autoencoder", TINY_CHECKPOINT,
          "--export_release", "--gradient_checkpointing", "--report_to", "tensorboard")
    return out


# validation on the first 3 x 3 of the 10 windows: odd, so two processes get 5 + 4
VALIDATION_FLAGS = ["--batch_size", "3", "--max_val_batches", "3", "--eval_interval", "1"]


LAUNCHER_FLAGS = ["--config", "tiny", "--mixed_precision", "no", "--learning_rate", "0", "--max_train_steps", "6",
                  *VALIDATION_FLAGS, "--early_stopping_patience", "1", "--early_stopping_min_delta", "1e9",
                  "--sample_interval", "0", "--report_to", "none"]


@pytest.fixture(scope="module")
def fine_tuned(work, shards):
    """Through the example launcher (accelerate launch, CPU config): lr 0 from the tiny reference
    checkpoint, stopped early after the second validation."""
    out = work / "run_finetune"
    launcher_env = {**env(), "PYTHON": sys.executable, "ACCELERATE_CONFIG": "cpu", "NUM_GPUS": "1",
                    "DATA_DIR": str(shards), "VAL_DATA_DIR": str(shards), "OUTPUT_DIR": str(out),
                    "FLOAT_CKPT": str(TINY_CHECKPOINT)}
    result = subprocess.run(["bash", str(SCRIPTS / "train_rectified_flow.sh"), *LAUNCHER_FLAGS], env=launcher_env,
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def generate_main():
    spec = importlib.util.spec_from_file_location("generate_float", SCRIPTS / "generate_float.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    yield module.main
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def short_speech(work):
    """The first 0.9 s of a recorded sentence (23 frames: two tiny windows)."""
    rate, samples = wavfile.read(SPEECH[0])
    path = work / "speech_short.wav"
    wavfile.write(path, rate, samples[: int(0.9 * rate)])
    return path


@pytest.fixture(scope="module")
def portrait(work):
    from PIL import Image
    from skimage import data as skdata

    path = work / "astronaut.png"
    Image.fromarray(skdata.astronaut()).save(path)
    return path


# ---- preprocessing ----------------------------------------------------------------------------

def test_preprocess_writes_clip_shards_and_lists_skipped_clips(shards, videos, wav2vec2):
    manifest = json.loads((shards / "manifest.json").read_text())
    clips = {c["id"]: c for c in manifest["clips"]}
    # 1.96 s and 2.99 s of speech at 25 fps (the videos are 30 fps)
    assert {k: (c["frames"], c["fps"]) for k, c in clips.items()} == {"clip_a": (50, 25.0), "clip_b": (75, 25.0)}
    assert (clips["clip_a"]["emotion"], clips["clip_a"]["emotion_source"]) == ("happy", "label")
    assert clips["clip_b"]["emotion_source"] == "classifier"
    skipped = {s["source"].rsplit("/", 1)[1]: s["reason"] for s in manifest["skipped"]}
    assert skipped.keys() == {"broken.mp4", "silent.mp4", "tiny.mp4"}
    assert "cannot decode" in skipped["broken.mp4"] and "silent audio" in skipped["silent.mp4"]
    assert "its frames' short side is 12 px, below --min_face_size 64 px" in skipped["tiny.mp4"]
    assert manifest["skipped_counts"] == {"face_too_small": 1, "silent": 1, "unreadable": 1}
    assert manifest["face_detector"] == "mtcnn"
    assert manifest["wav2vec_model_path"] == str(wav2vec2)  # given relative to the folder it ran in

    a, b = (load_file(str(shards / clips[k]["shard"])) for k in ("clip_a", "clip_b"))
    assert a["motion"].shape == (50, 32) and a["audio_features"].shape == (50, 9216)
    assert a["audio_features"].dtype == torch.float16 and a["reference_image"].shape == (3, 128, 128)
    assert torch.equal(a["emotion"], torch.eye(7)[EMOTION_LABELS.index("happy")])
    assert b["emotion"].sum().item() == pytest.approx(1.0, abs=1e-5) and (b["emotion"] > 0).all()
    # motion latents are the motion auto-encoder's reading of each frame: frame 0 is stored whole
    motion_ae = MotionAutoEncoder.from_release(TINY_CHECKPOINT, tiny_config()).eval()
    with torch.no_grad():
        code, _ = motion_ae.enc(a["reference_image"][None].float() / 127.5 - 1)
        torch.testing.assert_close(motion_ae.motion_of(code)[0], a["motion"][0], atol=1e-4, rtol=1e-4)
    assert a["motion"].diff(dim=0).abs().sum(-1).gt(0).all(), "the moving portrait gives a different latent per frame"


# ---- training ---------------------------------------------------------------------------------

def test_training_loss_falls_with_validation_samples_and_exports(trained):
    records = metrics(trained)
    losses = [r["loss"] for r in records if "loss" in r]
    val = [r["val/loss"] for r in records if "val/loss" in r]
    assert len(losses) == FULL_STEPS and len(val) == FULL_STEPS // 6
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.1
    assert val[-1] < val[0]
    sample = load_file(str(trained / "samples" / f"step-{RESUME_AT:06d}.safetensors"))
    assert sample["motion"].shape == sample["target_motion"].shape == (24, 32)
    assert (trained / "samples" / f"step-{FULL_STEPS:06d}.png").is_file()
    assert any((trained / "logs").rglob("events.out.tfevents.*"))
    config = json.loads((trained / "final" / "config.json").read_text())
    assert (config["model_type"], config["weights"], config["step"]) == ("float_motion_generator", "ema", FULL_STEPS)
    release = load_file(str(trained / "final" / "float_release.safetensors"))
    assert {k.split(".")[0] for k in release} == {"motion_autoencoder", "audio_encoder", "fmt"}
    assert tensors_equal({k: v for k, v in release.items() if not k.startswith("motion_autoencoder.")},
                         load_file(str(trained / "final" / "model.safetensors")))


def test_resume_from_a_checkpoint_is_exact(trained, shards, work):
    resumed = work / "run_resumed"
    train(shards, resumed, "--max_train_steps", FULL_STEPS, "--checkpointing_steps", RESUME_AT, "--val_data_dir",
          shards, "--eval_interval", 6, "--sample_interval", 0, "--gradient_checkpointing", "--report_to", "none",
          "--resume_from_checkpoint", trained / f"checkpoint-{RESUME_AT}")
    assert_pickle_free(trained / f"checkpoint-{RESUME_AT}")  # EMA and early-stopping state included
    assert {"state_ema.safetensors", "state_early_stopping.json"} <= {
        p.name for p in (trained / f"checkpoint-{RESUME_AT}").iterdir()}
    full = {(r["step"], k): v for r in metrics(trained) for k, v in r.items() if k in ("loss", "val/loss", "val/best")}
    again = {(r["step"], k): v for r in metrics(resumed) for k, v in r.items() if k in ("loss", "val/loss", "val/best")}
    assert min(step for step, _ in again) == RESUME_AT + 1
    assert again == {key: v for key, v in full.items() if key[0] > RESUME_AT}
    for name in ("final", "best"):  # EMA weights, and the best-validation export
        assert tensors_equal(load_file(str(trained / name / "model.safetensors")),
                             load_file(str(resumed / name / "model.safetensors"))), name


def test_two_processes_validate_each_window_once_as_one_process_does(fine_tuned, shards, tmp_path):
    """The same constant weights (learning rate 0) validated on 2 ranks (5 + 4 windows, each with the noise of
    its index): the loss of the one-process run, up to float32 sums over other batches."""
    out = tmp_path / "ddp"
    run_script("train_rectified_flow.py", "--config", "tiny", "--data_dir", shards, "--val_data_dir", shards,
               "--output_dir", out, "--pretrained_float", TINY_CHECKPOINT, "--learning_rate", "0", "--max_train_steps",
               "1", *VALIDATION_FLAGS, "--sample_interval", "0", "--report_to", "none", processes=2)
    one, two = ({r["step"]: r["val/loss"] for r in metrics(run) if "val/loss" in r} for run in (fine_tuned, out))
    assert two[1] == pytest.approx(one[1], rel=1e-5)


def test_fine_tuning_loads_the_released_checkpoint_strictly_and_stops_early(fine_tuned):
    log = (fine_tuned / "train.log").read_text()
    assert "loaded strictly fmt.* (33 tensors), audio_encoder.audio_projection.* (4 tensors)" in log
    assert "early stopping at step 2" in log
    assert max(r["step"] for r in metrics(fine_tuned)) == 2
    reference = torch.load(TINY_CHECKPOINT, weights_only=True)
    exported = load_file(str(fine_tuned / "final" / "model.safetensors"))
    assert len(exported) == 37 and all(torch.equal(v, reference[k]) for k, v in exported.items())
    release = load_file(str(fine_tuned / "final" / "float_release.safetensors"))  # the launcher asks for it
    assert all(torch.equal(v, reference[k]) for k, v in release.items())


def test_fine_tuning_from_our_own_export_takes_the_motion_autoencoder_from_its_flag(trained, shards, work):
    export = trained / "final"
    out = work / "run_from_export"
    train(shards, out, "--pretrained_float", export, "--motion_autoencoder", TINY_CHECKPOINT, "--export_release",
          "--learning_rate", 0, "--max_train_steps", 1, "--sample_interval", 0, "--report_to", "none")
    assert (f"--pretrained_float {export} is an export of train_rectified_flow.py: the FMT and the audio projection "
            f"come from {export / 'model.safetensors'}, the motion auto-encoder from --motion_autoencoder "
            f"{TINY_CHECKPOINT}") in (out / "train.log").read_text()
    assert tensors_equal(load_file(str(out / "final" / "model.safetensors")), load_file(str(export / "model.safetensors")))
    release = load_file(str(out / "final" / "float_release.safetensors"))
    reference = torch.load(TINY_CHECKPOINT, weights_only=True)
    assert all(torch.equal(v, reference[k]) for k, v in release.items() if k.startswith("motion_autoencoder."))
    # its model.safetensors alone, without --motion_autoencoder: --export_release cannot be honoured
    refused = train(shards, work / "run_refused", "--pretrained_float", export / "model.safetensors",
                    "--export_release", "--max_train_steps", 1, "--report_to", "none", check=False)
    assert error_line(refused) == (
        f"error: ConfigError: --pretrained_float {export / 'model.safetensors'} holds the FMT and the audio "
        "projection only (an export of train_rectified_flow.py): give --motion_autoencoder (the released "
        "float.pth) for the motion auto-encoder that --export_release writes")
    assert not (work / "run_refused").exists()


def test_the_launcher_trains_from_the_example_config_with_its_flags_on_top(fine_tuned):
    from omniflow.runtime.options import load_options_file

    example = load_options_file(REPO / "configs" / "float" / "example_config.json")
    run = json.loads((fine_tuned / "config.json").read_text())
    # set by the test's flags, the launcher's folders, or the shards' recorded encoders
    overridden = {flag[2:] for flag in LAUNCHER_FLAGS if flag.startswith("--")} | {
        "data_dir", "output_dir", "wav2vec_model_path", "audio2emotion_path"}
    assert example.keys() - overridden and {k: run[k] for k in example.keys() - overridden} == {
        k: v for k, v in example.items() if k not in overridden}
    assert (run["config"], run["mixed_precision"], example["mixed_precision"]) == ("tiny", "no", "bf16")


# ---- generation -------------------------------------------------------------------------------

def test_generate_writes_h264_video_with_the_speech(fine_tuned, portrait, model_args, work):
    out = work / "gen" / "talking.mp4"
    run_script("generate_float.py", "--ref_path", portrait, "--aud_path", SPEECH[0], "--ckpt_path",
               fine_tuned / "final", "--motion_autoencoder", TINY_CHECKPOINT, "--res_video_path", out, "--nfe", 3,
               *model_args[2:])
    with av.open(str(out)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert (video.codec_context.name, audio.codec_context.name) == ("h264", "aac")
        assert (video.width, video.height) == (128, 128)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video)]
    with av.open(str(out)) as container:
        samples = sum(f.samples for f in container.decode(audio=0))
    assert len(frames) == 50 and np.std(frames) > 1
    assert samples == pytest.approx(31364, abs=1100)  # the 1.96 s sentence (AAC pads to 1024-sample frames)
    report = json.loads(out.with_suffix(".json").read_text())
    assert (report["frames"], report["windows"], report["nfe"], report["nfe_requested"]) == (50, 5, 3, 3)


def _generate(generate_main, ckpt, speech, portrait, out, *extra):
    args = ["--ref_path", portrait, "--aud_path", speech, "--ckpt_path", ckpt, "--res_video_path", out,
            "--save_motion", *extra]
    report = generate_main([str(a) for a in args])
    return report, load_file(str(out.with_suffix(".motion.safetensors")))["motion"]


def test_each_ode_method_runs_and_nfe_sets_the_evaluations(generate_main, fine_tuned, short_speech, portrait,
                                                           model_args, work):
    base = [*model_args[2:], "--motion_autoencoder", TINY_CHECKPOINT]
    runs = {}
    for method, nfe in (("euler", 2), ("euler", 6), ("midpoint", 4), ("rk4", 8), ("dopri5", 10)):
        report, motion = _generate(generate_main, fine_tuned / "final", short_speech, portrait,
                                   work / "gen" / f"{method}{nfe}.mp4", "--torchdiffeq_ode_method", method,
                                   "--nfe", nfe, *base)
        assert report["windows"] == 2 and motion.shape == (23, 32) and motion.isfinite().all()
        assert report["nfe"] == report["velocity_evaluations"] / report["windows"]  # what ran, not what was asked
        assert report.get("nfe_requested") == (None if method == "dopri5" else nfe)
        runs[method, nfe] = report["nfe"], motion
    assert {k: v[0] for k, v in runs.items() if k[0] != "dopri5"} == {
        ("euler", 2): 2, ("euler", 6): 6, ("midpoint", 4): 4, ("rk4", 8): 8}
    assert runs["dopri5", 10][0] >= 6  # adaptive: at least one step of six evaluations (plus the first)
    # more evaluations approach the same ODE solution: rk4 and dopri5 agree better than 2-step Euler does
    rk4, dopri5, coarse = runs["rk4", 8][1], runs["dopri5", 10][1], runs["euler", 2][1]
    assert (rk4 - dopri5).abs().max() < (coarse - dopri5).abs().max()


def test_guidance_scales_and_emotion_change_the_motion(generate_main, fine_tuned, short_speech, portrait,
                                                       model_args, work):
    base = [*model_args[2:], "--motion_autoencoder", TINY_CHECKPOINT, "--nfe", 4]
    settings = {"default": [], "audio3": ["--a_cfg_scale", 3], "emotion2": ["--e_cfg_scale", 2],
                "reference2": ["--r_cfg_scale", 2], "happy": ["--emotion", "happy"]}
    motions = {name: _generate(generate_main, fine_tuned / "final", short_speech, portrait,
                               work / "gen" / f"guide_{name}.mp4", *base, *extra)[1]
               for name, extra in settings.items()}
    for name, motion in motions.items():
        if name != "default":
            assert (motion - motions["default"]).abs().max() > 1e-3, name


def test_released_layout_and_export_folder_generate_the_same_video(generate_main, trained, short_speech, portrait,
                                                                   model_args, work):
    from_release, a = _generate(generate_main, trained / "final" / "float_release.safetensors", short_speech,
                                portrait, work / "gen" / "release.mp4", *model_args, "--nfe", 3)
    # the export's wav2vec2 is the one the shards recorded, preprocessed in another folder
    from_export, b = _generate(generate_main, trained / "final", short_speech, portrait, work / "gen" / "export.mp4",
                               "--motion_autoencoder", TINY_CHECKPOINT, "--nfe", 3)
    assert torch.equal(a, b)
    assert from_release["frames"] == from_export["frames"] == 23


@pytest.mark.parametrize("detector, measured", [("mtcnn", "short side"), ("none", "face crop")])
def test_a_portrait_too_small_to_show_a_face_is_refused_before_the_model_loads(generate_main, short_speech, work,
                                                                                detector, measured):
    from PIL import Image
    from skimage import data as skdata

    small = work / "small_portrait.png"
    Image.fromarray(skdata.astronaut()).resize((40, 30)).save(small)
    with pytest.raises(DataError, match=rf"small_portrait\.png: its {measured} is 30 px, below --min_face_size 64"):
        generate_main(["--ref_path", str(small), "--aud_path", str(short_speech), "--ckpt_path", str(work / "none"),
                       "--res_video_path", str(work / "small.mp4"), "--face_detector", detector])
