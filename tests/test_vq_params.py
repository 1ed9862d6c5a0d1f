"""param.json reading: strict keys per section, seed-name mapping, precedence, loss settings, shipped configs."""

import importlib.util
import json
import logging
import os
import sys

import pytest
import torch

from omniflow.models.vq.params import (ParamConfigError, build_dataset, build_model, build_training_loss,
                                       load_param_json, loss_settings)
from omniflow.runtime.errors import ConfigError
from omniflow.runtime.run import TrainingOptions
from vq_helpers import REPO

CONFIGS = sorted((REPO / "configs" / "vq").glob("*.json"))
TINY = sorted((REPO / "configs" / "vq" / "tiny").glob("*.json"))

# The seed's shared example (document 002): a vqvae2optvq model_type with VqVae (dVAE) model_args.
SEED_EXAMPLE = {
    "model_type": "vqvae2optvq", "use_images": True, "scaling_rates": [4, 2],
    "model_args": {"group_count": 5, "n_hid": 256, "vocab_size": 4096, "n_init": 1024, "input_channels": 3,
                   "output_channels": 3, "commitment_cost": 0.25, "decay": 0.99},
    "data_args": {"batch_size": 1, "num_threads": 6, "device_id": 0, "seed": 2025, "sequence_length": 8,
                  "shard_id": 0, "num_shards": 1, "initial_prefetch_size": 1024},
    "train_args": {"num_steps": 300020, "lr": 0.0001, "lr_decay": 0.99, "folder_name": "/data/save_data",
                   "checkpoint_path": None, "device": "auto", "save_interval": 10000, "validation_interval": 1000,
                   "use_gan": True, "disc_factor": 0.8, "disc_start": 50000, "pixel_loss_factor": 1.0,
                   "perceptual_loss_factor": 1.0, "disc_lr": 1e-05, "disc_beta1": 0.5, "disc_beta2": 0.9},
    "data_process": {"train": "/data/train", "vaild": "/data/vaild"},
    "use_wandb": False, "project_name": "train_vqgan_3.2.0_new_data",
}
OPTVQ_ARGS = {"nb_levels": 2, "hidden_channels": 32, "res_channels": 8, "nb_res_layers": 1, "embed_dim": 16,
              "nb_entries": 32}


def write(tmp_path, spec, name="param.json"):
    path = tmp_path / name
    path.write_text(json.dumps(spec))
    return path


def seed_like(**changes):
    spec = json.loads(json.dumps(SEED_EXAMPLE))
    spec["model_args"] = dict(OPTVQ_ARGS)
    for section, values in changes.items():
        if isinstance(values, dict) and isinstance(spec.get(section), dict):
            spec[section].update(values)
        else:
            spec[section] = values
    return spec


def test_seed_example_maps_onto_runtime_options(tmp_path):
    params = load_param_json(write(tmp_path, seed_like()))
    assert params.family == "VQVAE2_OptVQ" and params.model_args["scaling_rates"] == [4, 2]
    assert params.runtime == {"max_train_steps": 300020, "output_dir": "/data/save_data", "checkpointing_steps": 10000,
                              "seed": 2025, "dataloader_num_workers": 6, "tracker_project_name":
                              "train_vqgan_3.2.0_new_data"}
    assert params.train_sources == ["/data/train"] and params.valid_sources == ["/data/vaild"]
    assert params.sequence_length == 8 and params.image_size == (256, 256)
    _, kwargs = loss_settings(params, 3)
    assert kwargs["pixel_weight"] == 1.0 and kwargs["perceptual_weight"] == 1.0 and kwargs["disc_factor"] == 0.8
    assert kwargs["disc_start"] == 50000 and kwargs["disc_every"] == 3 and kwargs["use_gan"] is True


def test_seed_example_with_mixed_family_keys_names_key_and_families(tmp_path):
    with pytest.raises(ParamConfigError) as err:
        load_param_json(write(tmp_path, SEED_EXAMPLE))
    message = str(err.value)
    assert "'group_count'" in message and "VqVae" in message and "VQVAE2_OptVQ" in message
    assert "configs/vq/" in message and "\n" not in message


@pytest.mark.parametrize(("changes", "expected"), [
    ({"train_args": {"lr_decy": 0.5}}, "train_args: unknown key 'lr_decy'; did you mean 'lr_decay'?"),
    ({"data_args": {"batch_size": "4"}}, "data_args: 'batch_size' must be int, got '4'"),
    ({"data_args": {"image_size": [32]}}, "data_args.image_size must be an int or [height, width]"),
    ({"train_args": {"use_taming_loss": "yes"}}, "train_args: 'use_taming_loss' must be bool"),
    ({"train_args": {"max_grad_norm": "big"}}, "train_args: 'max_grad_norm' must be float"),
    ({"modle_type": "VQVAE2"}, "(top level): unknown key 'modle_type'; did you mean 'model_type'?"),
    ({"model_type": "vqvae3"}, "unknown model_type 'vqvae3'"),
    ({"data_process": {"train": "a", "valid": "b", "vaild": "c"}}, "both 'valid' and 'vaild'"),
    ({"data_process": {"train": "a", "tset": "b"}}, "data_process: unknown key 'tset'"),
    ({"train_args": {"num_steps": 5, "max_train_steps": 6}}, "train_args.num_steps and train_args.max_train_steps"),
    ({"model_args": {**OPTVQ_ARGS, "scaling_rates": [2, 2]}}, "scaling_rates [4, 2] (top level) and [2, 2]"),
])
def test_bad_keys_fail_with_one_line_naming_section_and_key(tmp_path, changes, expected):
    path = write(tmp_path, seed_like(**changes))
    with pytest.raises(ParamConfigError) as err:
        load_param_json(path)
    assert expected in str(err.value) and str(path) in str(err.value)


def test_model_keys_are_checked_when_the_model_is_built(tmp_path):
    params = load_param_json(write(tmp_path, seed_like(model_args={**OPTVQ_ARGS, "epsilonn": 3.0})))
    with pytest.raises(ParamConfigError, match="unknown key 'epsilonn'; did you mean 'epsilon'"):
        build_model(params)
    params = load_param_json(write(tmp_path, seed_like(model_args=OPTVQ_ARGS, data_args={"image_size": 36})))
    with pytest.raises(ParamConfigError, match=r"image_size \[36, 36\] must be divisible by .* factor 8"):
        build_model(params)


def test_scaling_rates_only_for_multilevel_families(tmp_path):
    spec = seed_like(model_type="VqVae")
    spec["model_args"] = {"group_count": 2, "n_hid": 8}
    with pytest.raises(ParamConfigError, match="scaling_rates applies to VQVAE2/VQVAE2_OptVQ, not to VqVae"):
        load_param_json(write(tmp_path, spec))


def test_no_training_data_and_missing_listed_files(tmp_path):
    spec = seed_like()
    del spec["data_process"]
    with pytest.raises(ParamConfigError, match="no training data"):
        load_param_json(write(tmp_path, spec))
    spec["data_args"]["training_data_files"] = [str(tmp_path / "missing.png")]
    with pytest.raises(FileNotFoundError, match="data_args.training_data_files names a missing file"):
        build_dataset(load_param_json(write(tmp_path, spec)), "train", 0)


def test_without_gan_the_seed_trained_on_mse_and_vq_only(tmp_path):
    spec = seed_like(train_args={"use_gan": False})
    del spec["train_args"]["perceptual_loss_factor"], spec["train_args"]["pixel_loss_factor"]
    loss = build_training_loss(load_param_json(write(tmp_path, spec)), 3)
    assert loss.pixel_loss == "mse" and loss.perceptual is None and loss.discriminator is None
    explicit = load_param_json(write(tmp_path, seed_like(train_args={"use_gan": False, "pixel_loss": "l1",
                                                                      "perceptual_loss_factor": 0.0})))
    assert loss_settings(explicit, 3)[1]["pixel_loss"] == "l1"


def test_taming_lossconfig_governs_and_train_args_loss_keys_are_reported(tmp_path, caplog):
    spec = json.loads((REPO / "configs/vq/tiny/vqgan_vqmodel.json").read_text())
    spec["train_args"].update(disc_start=99, disc_every=2)
    params = load_param_json(write(tmp_path, spec))
    with caplog.at_level(logging.WARNING, logger="omniflow"):
        lossconfig, kwargs = loss_settings(params, 3)
    assert lossconfig == spec["model_args"]["lossconfig"] and kwargs == {"disc_every": 2, "adaptive_weight": True}
    assert "['disc_start'] ignored" in caplog.text
    loss = build_training_loss(params, 3)
    assert loss.disc_start == 2 and loss.disc_every == 2 and loss.disc_weight == 0.8
    spec["train_args"]["use_taming_loss"] = False
    assert build_training_loss(load_param_json(write(tmp_path, spec)), 3).disc_start == 99


def test_a_taming_lossconfig_gets_taming_s_optimisers_unless_train_args_say_otherwise(tmp_path):
    spec = json.loads((REPO / "configs/vq/vqgan_f16.json").read_text())
    del spec["train_args"]["beta1"], spec["train_args"]["beta2"]
    train = load_param_json(write(tmp_path, spec)).train
    assert (train["lr"], train["beta1"], train["beta2"]) == (1e-4, 0.5, 0.9)
    assert (train["disc_lr"], train["disc_beta1"], train["disc_beta2"]) == (1e-4, 0.5, 0.9)  # one lr, as taming
    spec["train_args"].update(disc_lr=2e-5, beta1=0.9)
    train = load_param_json(write(tmp_path, spec)).train
    assert (train["disc_lr"], train["beta1"], train["beta2"]) == (2e-5, 0.9, 0.9)
    # without a lossconfig (the seed's train_args GAN) the old defaults stay
    train = load_param_json(write(tmp_path, seed_like())).train
    assert (train["beta1"], train["beta2"], train["disc_lr"]) == (0.9, 0.999, 1e-5)


def test_model_type_emavq_refuses_a_gradient_codebook_variant_and_the_seed_image_interval_is_accepted(tmp_path):
    spec = json.loads((REPO / "configs/vq/tiny/emavq.json").read_text())
    spec["model_args"]["model_variant"] = "VQModel"
    with pytest.raises(ParamConfigError, match="model_type EMAVQ with model_variant 'VQModel' contradicts itself"):
        build_model(load_param_json(write(tmp_path, spec)))
    spec["model_args"]["model_variant"] = "EMAVQ"
    spec["train_args"]["wandb_image_interval"] = 50
    assert load_param_json(write(tmp_path, spec)).train["wandb_image_interval"] == 50


def _script(name):
    """Import scripts/<name>.py as a module (registered first: its dataclasses look themselves up)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def test_command_line_overrides_param_json(tmp_path, monkeypatch):
    path = write(tmp_path, seed_like())
    train_vqgan = _script("train_vqgan")
    monkeypatch.setattr("sys.argv", ["train_vqgan.py", "--config", str(path), "--max_train_steps", "7",
                                     "--mixed_precision", "bf16"])
    params, opts, train_opts = train_vqgan.parse_args()
    assert isinstance(train_opts, TrainingOptions) and opts.config == str(path)
    assert train_opts.max_train_steps == 7  # command line beats num_steps=300020
    assert train_opts.output_dir == "/data/save_data" and train_opts.checkpointing_steps == 10000  # from the file
    assert train_opts.mixed_precision == "bf16" and train_opts.seed == 2025
    assert train_opts.max_grad_norm == 0  # no clipping unless asked, as in taming and the seed
    monkeypatch.setattr("sys.argv", ["train_vqgan.py", "--config", str(path), "--max_grad_norm", "0.5"])
    assert train_vqgan.parse_args()[2].max_grad_norm == 0.5


@pytest.mark.parametrize(("device", "visible", "expected"), [
    ("cuda:1", None, "1"), ("cuda:1", "4,6", "6"), ("cpu", None, None), ("auto", "3", "3")])
def test_device_flag(monkeypatch, device, visible, expected):
    train_vqgan = _script("train_vqgan")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    train_vqgan.select_device(device)
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == expected
    assert (os.environ.get("ACCELERATE_USE_CPU") == "true") is (device == "cpu")
    with pytest.raises(ConfigError, match="expected auto, cpu, cuda or cuda:N"):
        train_vqgan.select_device("gpu0")


@pytest.mark.parametrize("path", CONFIGS + TINY, ids=lambda p: p.relative_to(REPO / "configs" / "vq").as_posix())
def test_shipped_configs_build_and_run(path):
    params = load_param_json(path)
    model = build_model(params)
    side = 2 * model.downsample_factor
    with torch.no_grad():
        vq_loss, recon, _, _ = model.eval()(torch.zeros(1, model.in_channels, side, side))
    assert recon.shape == (1, model.in_channels, side, side) and torch.isfinite(vq_loss)
    if path.name == "vqgan_f16.json" and path.parent.name == "vq":  # the reference f16 VQGAN
        ddconfig = params.model_args["ddconfig"]
        assert (ddconfig["ch"], ddconfig["ch_mult"], ddconfig["z_channels"], params.model_args["n_embed"],
                ddconfig["attn_resolutions"], model.downsample_factor) == (128, [1, 1, 2, 2, 4], 256, 1024, [16], 16)


def test_one_shipped_config_per_family():
    assert sorted(load_param_json(path).family for path in CONFIGS) == sorted(
        ["VqVae", "VQVAE2", "VQVAE2_OptVQ", "TamingVQGAN", "TamingVQGAN", "EMAVQ"])


@pytest.mark.slow  # torch.compile on the CPU: ~25 s per family
@pytest.mark.parametrize("family", ["vqgan_f16", "vqvae2"])
def test_speed_options_keep_the_numbers_and_the_checkpoint_keys(family, tmp_path):
    """train_vqgan.py --channels_last / --compile: the same reconstruction, the same state-dict keys (an in-place
    compile, so checkpoints and exports load anywhere), and the layout actually switched."""
    from omniflow.models.vq.training import apply_speed_options

    params = load_param_json(REPO / "configs" / "vq" / "tiny" / f"{family}.json")
    torch.manual_seed(0)
    model = build_model(params).eval()
    loss_fn = build_training_loss(params, model.in_channels)
    x = torch.rand(2, model.in_channels, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = model(x)[1]
    keys = list(model.state_dict())
    compiled = apply_speed_options(model, loss_fn, channels_last=True, compile=True)
    assert ("discriminator" in compiled) == (loss_fn.discriminator is not None)
    assert any(name.startswith("encoder") for name in compiled) and any(name.startswith("decoder") for name in compiled)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        got = model(x.contiguous(memory_format=torch.channels_last))[1]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
