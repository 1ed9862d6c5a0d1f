import json

import pytest
import torch
from align_helpers import RESOLUTION, photo_dir, save_tiny_vae, vae_dirs  # noqa: F401 (fixtures)
from diffusers import AutoencoderKL

from omniflow.data.images import ImageFolderDataset, to_model_range, write_sample_images
from omniflow.models.align import (AlignConfigError, AlignPipeline, VAELoadError, export_config,
                                   latent_loss, load_aligned_pipeline, load_vae)
from omniflow.models.align_report import LatentMetrics
from omniflow.runtime.errors import ConfigError
from omniflow.runtime.export import export_weights
from omniflow.runtime.hub import MissingModelError
from omniflow.runtime.paths import path_to_record, resolve_recorded

TINY = {"hidden_channels": 16, "num_blocks": 1, "downsample_times": 1}


def make_pipeline(vae_dirs, direction="vae1_to_vae2", **kwargs) -> AlignPipeline:
    out = 16 if direction == "vae1_to_vae2" else 4
    options = {**TINY, "out_channels": out, **kwargs}
    return AlignPipeline.from_pretrained(str(vae_dirs["vae1"]), str(vae_dirs["vae2"]), "vae", "vae",
                                         direction=direction, **options)


def photos(photo_dir, n=4) -> torch.Tensor:
    data = ImageFolderDataset(photo_dir, RESOLUTION)
    return torch.stack([data[i]["image"] for i in range(n)])


@pytest.mark.parametrize("direction", ["vae1_to_vae2", "vae2_to_vae1"])
@pytest.mark.parametrize("input_types", [("image",), ("latent",), ("image", "latent")])
def test_predict_shapes_every_input_and_direction(vae_dirs, photo_dir, direction, input_types):
    pipe = make_pipeline(vae_dirs, direction, input_types=input_types)
    images = photos(photo_dir, 2)
    target = pipe.encode_target(images)
    pred = pipe.predict(images)
    assert pred.shape == target.shape == (2, 16 if direction == "vae1_to_vae2" else 4, 16, 16)
    assert pipe.source_vae.config.latent_channels == (4 if direction == "vae1_to_vae2" else 16)
    assert ("image_stem" in dict(pipe.module.named_children())) == ("image" in input_types)
    assert ("latent_stem" in dict(pipe.module.named_children())) == ("latent" in input_types)
    if "latent" in input_types:  # a given source latent is used instead of encoding the images
        other = pipe.predict(images, source_latent=pipe.encode_source(images) + 1.0)
        assert not torch.allclose(other, pred)
    loss = pipe.training_loss(images)
    loss.backward()
    assert all(p.grad is not None for p in pipe.module.parameters())
    assert all(p.grad is None and not p.requires_grad for vae in pipe.vaes.values() for p in vae.parameters())
    assert not any(vae.training for vae in pipe.vaes.values())


def test_scaling_and_shift_match_diffusers_and_invert(vae_dirs, photo_dir):
    pipe = make_pipeline(vae_dirs)
    images = photos(photo_dir, 2)
    x = to_model_range(images)
    for key, (shift, scale) in {"vae1": (0.0, 0.5), "vae2": (0.1, 1.5)}.items():
        vae = AutoencoderKL.from_pretrained(vae_dirs[key], subfolder="vae")  # diffusers' own calls
        assert (vae.config.shift_factor or 0.0, vae.config.scaling_factor) == (shift, scale)
        with torch.no_grad():
            mean = vae.encode(x).latent_dist.mean
            z = (mean - shift) * scale
            decoded = vae.decode(mean).sample
        ours = pipe.encode_source(images) if key == "vae1" else pipe.encode_target(images)
        torch.testing.assert_close(ours, z)
        decode = pipe.decode_source if key == "vae1" else pipe.decode_target
        torch.testing.assert_close(decode(ours), decoded, atol=1e-5, rtol=1e-4)


def test_per_channel_latents_mean_std(tmp_path, photo_dir):
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.0, 2.0, 0.5, 1.5]
    folder = save_tiny_vae(tmp_path / "sdxl_like", 4, seed=2, scaling_factor=0.5,
                           latents_mean=mean, latents_std=std)
    vae = load_vae(str(folder), "vae")
    x = to_model_range(photos(photo_dir, 1))
    pipe = AlignPipeline(vae, vae, out_channels=4, **TINY)
    with torch.no_grad():
        raw = vae.encode(x).latent_dist.mean
    expected = (raw - torch.tensor(mean).view(1, -1, 1, 1)) * 0.5 / torch.tensor(std).view(1, -1, 1, 1)
    torch.testing.assert_close(pipe.encode_target(x), expected)
    with torch.no_grad():
        torch.testing.assert_close(pipe.decode_target(expected), vae.decode(raw).sample, atol=1e-5, rtol=1e-4)


def test_two_latent_normalisations_are_refused():
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, shift_factor=0.1,
                        latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    with pytest.raises(AlignConfigError, match="both shift_factor and latents_mean"):
        AlignPipeline(vae, vae, out_channels=4, **{**TINY, "downsample_times": 0})


def test_wrong_out_channels_names_expected_count_and_path(vae_dirs):
    with pytest.raises(AlignConfigError) as err:
        make_pipeline(vae_dirs, out_channels=8)
    message = str(err.value)
    assert "latent_channels=16" in message and str(vae_dirs["vae2"]) in message and "\n" not in message
    with pytest.raises(AlignConfigError, match="latent_channels=4"):
        make_pipeline(vae_dirs, "vae2_to_vae1", out_channels=16)


def test_resolution_mismatches_are_refused(vae_dirs, tmp_path):
    with pytest.raises(AlignConfigError, match="downsample_times=3"):
        make_pipeline(vae_dirs, downsample_times=3)
    make_pipeline(vae_dirs, downsample_times=3, input_types=("latent",))  # unused without images
    deeper = AutoencoderKL(block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
                           up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8, latent_channels=16)
    vae1 = load_vae(str(vae_dirs["vae1"]), "vae")
    with pytest.raises(AlignConfigError, match="downsamples by 2 but the target VAE .* by 4"):
        AlignPipeline(vae1, deeper, out_channels=16, **TINY, input_types=("latent",))


def test_bad_options_and_missing_vae(vae_dirs, tmp_path):
    with pytest.raises(AlignConfigError, match="input_types"):
        make_pipeline(vae_dirs, input_types=("pixels",))
    with pytest.raises(AlignConfigError, match="direction"):
        make_pipeline(vae_dirs, direction="sideways")
    with pytest.raises(AlignConfigError, match="loss_type"):
        make_pipeline(vae_dirs, loss_type="huber")
    with pytest.raises(MissingModelError, match=f"model path {tmp_path / 'absent'} does not exist"):
        load_vae(str(tmp_path / "absent"), "vae")
    (tmp_path / "not_a_vae" / "vae").mkdir(parents=True)
    with pytest.raises(VAELoadError, match=f"{tmp_path / 'not_a_vae'} \\(subfolder vae\\)"):
        load_vae(str(tmp_path / "not_a_vae"), "vae")
    assert issubclass(AlignConfigError, ConfigError)  # so run_main prints one line


def test_offline_hub_id_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingModelError) as err:
        load_vae("black-forest-labs/FLUX.1-dev", "vae", cache_dir=str(tmp_path / "empty-cache"))
    message = str(err.value)
    assert "HF_HUB_OFFLINE=1" in message and "python download_models.py --models flux_vae" in message
    assert "\n" not in message


def test_losses():
    torch.manual_seed(0)
    target = torch.randn(2, 2, 4, 4) * torch.tensor([1.0, 0.1]).view(1, 2, 1, 1)
    error = torch.zeros_like(target)
    error[:, 1] = 0.05  # the error sits only in the narrow channel
    pred = target + error
    assert latent_loss(pred, target, "mse").item() == pytest.approx(0.05 ** 2 / 2)
    assert latent_loss(pred, target, "l1", loss_weight=3.0).item() == pytest.approx(3 * 0.05 / 2)
    std = target.std(dim=(0, 2, 3))
    weights = (1 / std) / (1 / std).mean()
    assert latent_loss(pred, target, "weighted_l1").item() == pytest.approx(weights[1].item() * 0.05 / 2, rel=1e-5)
    assert latent_loss(pred, target, "weighted_l1").item() > 1.5 * latent_loss(pred, target, "l1").item()
    with pytest.raises(ValueError, match=r"\(2, 2, 4, 4\)"):
        latent_loss(pred[:, :1], target)


@pytest.mark.parametrize("loss_type", ["mse", "l1", "weighted_l1"])
def test_eval_metrics_of_a_set_do_not_depend_on_its_batches(loss_type):
    """Batches of 3 + 2 (two ranks) or one of 5: the same means, and the loss of the whole set at once."""
    torch.manual_seed(0)
    target = torch.randn(5, 3, 4, 4) * torch.tensor([1.0, 0.3, 0.05]).view(1, 3, 1, 1)
    pred = target + 0.1 * torch.randn_like(target)
    whole, split = (LatentMetrics(3, loss_type=loss_type, loss_weight=2.0) for _ in range(2))
    whole.update(pred, target)
    for rows in (slice(0, 3), slice(3, 5)):
        split.update(pred[rows], target[rows])
    one, two = whole.compute(), split.compute(lambda sums: sums)
    assert one["num_images"] == two["num_images"] == 5
    for key in ("loss", "latent_mse", "latent_cosine", "target_std"):
        assert torch.allclose(torch.tensor(one[key]), torch.tensor(two[key]), rtol=1e-12), key
    assert one["loss"] == pytest.approx(latent_loss(pred, target, loss_type, loss_weight=2.0).item(), rel=1e-6)


def test_exports_record_vae_folders_absolute_and_old_relative_ones_still_load(tmp_path, monkeypatch):
    """An export written in ``project/`` before the fix names its VAEs relative to that folder; loaded from
    elsewhere they are found from the folders above the export. Hub ids are recorded as given."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name, channels in (("a", 4), ("b", 16)):
        save_tiny_vae(project / "models" / name, channels, seed=0)
    monkeypatch.chdir(project)
    pipe = AlignPipeline.from_pretrained("models/a", "models/b", "vae", "vae", input_types=["latent"], **TINY)
    assert pipe.config["vae1"]["path"] == str(project / "models" / "a")
    export = export_weights(pipe.module.state_dict(), export_config(pipe, RESOLUTION), project / "outputs" / "best")
    old = json.loads((export / "config.json").read_text())
    for key, name in (("vae1", "a"), ("vae2", "b")):
        old["pipeline"][key]["path"] = f"models/{name}"
    (export / "config.json").write_text(json.dumps(old))
    monkeypatch.chdir(elsewhere)
    loaded, _ = load_aligned_pipeline(export)
    assert loaded.config["vae2"]["path"] == str(project / "models" / "b")
    latent = torch.randn(1, 4, 16, 16)
    torch.testing.assert_close(loaded.predict(None, latent), pipe.predict(None, latent))
    assert path_to_record("black-forest-labs/FLUX.1-dev") == "black-forest-labs/FLUX.1-dev"
    (elsewhere / "omniflow").mkdir()  # a folder named like a download_models.py name: the name still wins
    assert path_to_record("omniflow") == resolve_recorded("omniflow", export / "config.json") == "omniflow"


def test_config_round_trip(vae_dirs):
    pipe = make_pipeline(vae_dirs, "vae2_to_vae1", input_types=["latent"], loss_type="weighted_l1",
                         loss_weight=2.0)
    config = json.loads(json.dumps(pipe.config))
    again = AlignPipeline.from_config(config)
    assert again.config == config
    again.module.load_state_dict(pipe.module.state_dict())
    latent = torch.randn(1, 16, 16, 16)
    torch.testing.assert_close(again.predict(None, latent), pipe.predict(None, latent))


def test_short_training_lowers_latent_loss(vae_dirs, tmp_path):
    write_sample_images(tmp_path, RESOLUTION, 12)
    torch.manual_seed(0)
    pipe = make_pipeline(vae_dirs, loss_type="mse")
    images = photos(tmp_path, 12)
    train, held_out = images[:8], images[8:]
    source, target = pipe.encode_source(train), pipe.encode_target(train)
    with torch.no_grad():
        held_out_before = pipe.training_loss(held_out).item()
    optimizer = torch.optim.Adam(pipe.module.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = pipe.training_loss(train, source, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = pipe.training_loss(train, source, target).item()
        held_out_after = pipe.training_loss(held_out).item()
    channel_mean_baseline = (target - target.mean(dim=(0, 2, 3), keepdim=True)).pow(2).mean().item()
    assert final < 0.5 * losses[0] and final < channel_mean_baseline, (losses, channel_mean_baseline)
    assert held_out_after < 0.5 * held_out_before
