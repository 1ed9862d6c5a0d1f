"""Every bad input is one line and exit 2: the scripts run as subprocesses, as a user runs them, on real
broken inputs (weight files truncated or pickled as objects, a malformed JSONL row, bad learning rates, a
mistyped flag, a missing export path) in the tiny worlds of the other script tests."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import T5EncoderModel

from float_helpers import AUDIO_DIR, EMOTION_DIR, SPEECH, TINY_CHECKPOINT
from float_helpers import tiny_config as float_config
from omniflow.data.float_shards import ClipRecord, write_clip, write_manifest
from omniflow.models.float import EMOTION_LABELS
from omniflow.models.float.audio import load_emotion_classifier
from omniflow.runtime.export import export_weights
from runtime_helpers import REPO, error_line, run_script, truncated
from vq_helpers import TRAIN_SCRIPT as TRAIN_VQ
from vq_helpers import tiny_config as vq_config
from vq_helpers import write_vq_data

pytestmark = pytest.mark.slow

SCRIPTS = REPO / "scripts"
TRUNCATED = "truncated, corrupt or not a weights file"


@pytest.fixture(scope="module")
def world(text_world):
    return text_world


@pytest.fixture(scope="module")
def vq_data(tmp_path_factory):
    return write_vq_data(tmp_path_factory.mktemp("vq_data"))


def model_copy(world, tmp_path) -> list:
    """A copy of the tiny OmniFlow and its external models, to break, as --model_path/--models_dir arguments."""
    copy = shutil.copytree(world.model.parent, tmp_path / "tiny")
    return ["--model_path", copy / world.model.name, "--models_dir", copy / world.models_dir.name]


def text_script(name: str, model_args: list, data, tmp_path):
    outputs = {"generate_text.py": ["--output", tmp_path / "predictions.json"],
               "train_text.py": ["--use_text_decoder_head", "--output_dir", tmp_path / "run"]}
    return run_script(SCRIPTS / name, *model_args, "--data_config", data, *outputs[name], check=False)


@pytest.mark.parametrize("script", ["generate_text.py", "train_text.py"])
def test_truncated_transformer_weights(world, tmp_path, script):
    model_args = model_copy(world, tmp_path)
    weights = truncated(model_args[1] / "transformer" / "diffusion_pytorch_model.safetensors")
    line = error_line(text_script(script, model_args, world.data["two_sentences"], tmp_path))
    assert line.startswith(f"error: CheckpointError: {weights}: {TRUNCATED} (SafetensorError: ")


def test_a_t5_encoder_pickled_as_an_object(world, tmp_path):
    model_args = model_copy(world, tmp_path)
    t5 = model_args[3] / "flan-t5-large"
    encoder = T5EncoderModel.from_pretrained(t5)
    (t5 / "model.safetensors").unlink()
    torch.save(encoder, t5 / "pytorch_model.bin")
    line = error_line(text_script("generate_text.py", model_args, world.data["two_sentences"], tmp_path))
    assert line.startswith(f"error: CheckpointError: {t5 / 'pytorch_model.bin'}: not a weights-only checkpoint: it "
                           "pickles transformers.models.t5.modeling_t5.T5EncoderModel, and omniflow never "
                           "unpickles code")


def test_a_malformed_jsonl_row_names_the_file_and_line(world, tmp_path):
    folder = shutil.copytree(world.root / "data" / "shakespeare", tmp_path / "sonnets")
    rows = (folder / "validation.jsonl").read_text().splitlines()
    rows[2] = rows[2].replace('"references"', "references")
    (folder / "validation.jsonl").write_text("\n".join(rows) + "\n")
    config = json.loads(world.data["two_sentences"].read_text())
    config["datasets"][0]["source"] = str(folder)
    (tmp_path / "data.json").write_text(json.dumps(config))
    line = error_line(text_script("generate_text.py", world.model_args(), tmp_path / "data.json", tmp_path))
    column = rows[2].index("references") + 1
    assert line == (f"error: DataError: {folder / 'validation.jsonl'}:3: not a JSON record (Expecting property name "
                    f"enclosed in double quotes at column {column})")


def test_a_truncated_float_feature_shard_fails_when_the_data_is_opened(tmp_path):
    config, frames = float_config(), 24
    clips = []
    for name in ("clip_a", "clip_b"):
        tensors = {"motion": torch.randn(frames, config.dim_w),
                   "audio_features": torch.randn(frames, config.audio_feature_dim).half(),
                   "emotion": torch.eye(config.dim_e)[0],
                   "reference_image": torch.zeros(3, config.input_size, config.input_size, dtype=torch.uint8)}
        shard = write_clip(tmp_path / "data", name, tensors, config.fps)
        clips.append(ClipRecord(name, f"{name}.mp4", shard, frames, config.fps, EMOTION_LABELS[0], "label"))
    settings = {"dim_w": config.dim_w, "audio_feature_dim": config.audio_feature_dim, "fps": config.fps,
                "sampling_rate": config.sampling_rate, "emotion_labels": list(EMOTION_LABELS),
                "wav2vec_model_path": str(AUDIO_DIR), "audio2emotion_path": str(EMOTION_DIR)}
    write_manifest(tmp_path / "data", settings, clips, [])
    shard = truncated(tmp_path / "data" / clips[1].shard)
    result = run_script(SCRIPTS / "train_rectified_flow.py", "--config", "tiny", "--data_dir", tmp_path / "data",
                        "--output_dir", tmp_path / "run", "--batch_size", 4, "--max_train_steps", 2, "--report_to",
                        "none", check=False)
    assert error_line(result).startswith(f"error: DataError: {shard}: {TRUNCATED} (SafetensorError: ")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_emotion_classifier_saved_with_its_config_object(tmp_path):
    folder = shutil.copytree(EMOTION_DIR, tmp_path / "emotion")
    classifier = load_emotion_classifier(str(folder))
    torch.save({"state_dict": classifier.state_dict(), "config": classifier.config}, tmp_path / "checkpoint.bin")
    (tmp_path / "checkpoint.bin").replace(folder / "pytorch_model.bin")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "face.png")
    result = run_script(SCRIPTS / "generate_float.py", "--config", "tiny", "--ckpt_path", TINY_CHECKPOINT,
                        "--ref_path", tmp_path / "face.png", "--aud_path", SPEECH[0], "--wav2vec_model_path",
                        AUDIO_DIR, "--audio2emotion_path", folder, "--res_video_path", tmp_path / "out.mp4",
                        "--face_detector", "none", check=False)  # a grey square: no face to find
    assert error_line(result).startswith(
        f"error: CheckpointError: {folder / 'pytorch_model.bin'}: not a weights-only checkpoint: it pickles "
        "transformers.models.wav2vec2.configuration_wav2vec2.Wav2Vec2Config")


@pytest.mark.parametrize("family, key", [("vqvae2_optvq", "lpips_weights_path"), ("dvae", "fid_weights_path")])
def test_lpips_and_fid_weights_pickled_as_a_module(vq_data, tmp_path, family, key):
    weights = tmp_path / "backbone.pth"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), weights)
    config = vq_config(family, tmp_path, vq_data, compute_fid=True, **{key: str(weights)})
    result = run_script(TRAIN_VQ, "--config", config, "--output_dir", tmp_path / "run", check=False)
    assert error_line(result).startswith(f"error: CheckpointError: {weights}: not a weights-only checkpoint: it "
                                         "pickles torch.nn.modules.container.Sequential")


def test_learning_rates_must_be_positive(vq_data, tmp_path):
    config = vq_config("dvae", tmp_path, vq_data, lr=-1e-3)
    result = run_script(TRAIN_VQ, "--config", config, "--output_dir", tmp_path / "vq", check=False)
    assert error_line(result) == f"error: ParamConfigError: {config}: train_args.lr must be a number > 0, got -0.001"
    result = run_script(SCRIPTS / "train_align_with_args.py", "--train_data_dir", vq_data / "train",
                        "--learning_rate", "-1e-3", "--save_dir", tmp_path / "align", check=False)
    assert error_line(result) == "error: ConfigError: --learning_rate must be > 0, got -0.001"


def test_a_mistyped_flag_is_not_read_as_the_flag_it_prefixes(tmp_path):
    result = run_script(SCRIPTS / "train_rectified_flow.py", "--config", "tiny", "--fmt_dept", 3, "--data_dir",
                        tmp_path, check=False)
    assert error_line(result) == ("error: ConfigError: unrecognized argument '--fmt_dept'; did you mean "
                                  "'--fmt_depth'? (see train_rectified_flow.py --help)")


def test_a_missing_export_is_named_not_its_parent_folder(tmp_path):
    run = export_weights({"weight": torch.zeros(2)}, {"format": "another export"}, tmp_path / "run")
    result = run_script(SCRIPTS / "eval_align.py", "--checkpoint", run / "nope", "--eval_data_dir", tmp_path,
                        check=False)
    assert error_line(result) == f"error: FileNotFoundError: no export at {run / 'nope'}: no such folder or file"
