import pytest
import torch

from omniflow.models.vq import MODEL_TYPES, VQConfigError, build_vq_model, summarize_parameters
from omniflow.models.vq.dvae import VqVae
from omniflow.models.vq.vqgan import TamingVQGAN
from omniflow.models.vq.vqvae2 import VQVAE2, VQVAE2OptVQ
from vq_helpers import TINY_CONFIGS, photo_batch, train_steps

FAMILIES = list(TINY_CONFIGS)


def _tiny(model_type):
    torch.manual_seed(0)
    return build_vq_model(model_type, TINY_CONFIGS[model_type])


def _index_shapes(indices):
    return [tuple(i.shape) for i in indices] if isinstance(indices, tuple) else [tuple(indices.shape)]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_forward_contract_shapes_and_gradients(model_type):
    model = _tiny(model_type).train()
    x = photo_batch(32, ("astronaut", "coffee"))
    vq_loss, recon, perplexity, indices = model(x)
    assert recon.shape == x.shape and vq_loss.ndim == 0 and perplexity.ndim == 0
    f = model.downsample_factor
    expected = {"VQVAE2": [(2, 16, 16), (2, 8, 8)], "VQVAE2_OptVQ": [(2, 16, 16), (2, 8, 8)]}
    assert _index_shapes(indices) == expected.get(model_type, [(2, 32 // f, 32 // f)])
    (torch.nn.functional.mse_loss(recon, x) + vq_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert model.get_last_layer().grad.abs().sum() > 0


@pytest.mark.parametrize("model_type", FAMILIES)
def test_decode_indices_reproduces_the_reconstruction(model_type):
    model = _tiny(model_type)
    x = photo_batch(32, ("chelsea", "rocket"))
    model.train()(x)  # initialise the codebook from data
    model.eval()
    with torch.no_grad():
        encoding = model.encode(x)
        _, recon, _, indices = model(x)
        torch.testing.assert_close(model.decode(encoding.quantized), recon)
        torch.testing.assert_close(model.decode_indices(indices), recon, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_short_training_on_real_photos_lowers_reconstruction_error(model_type):
    model = _tiny(model_type)
    history = train_steps(model, photo_batch(32), steps=30)
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last < 0.6 * first, f"{model_type}: reconstruction MSE {first:.4f} -> {last:.4f}"


def test_forward_under_bf16_autocast_keeps_vq_loss_fp32():
    model = _tiny("EMAVQ").train()
    x = photo_batch(32, ("astronaut", "coffee"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vq_loss, recon, perplexity, _ = model(x)
    assert vq_loss.dtype == torch.float32 and torch.isfinite(vq_loss)
    assert recon.dtype == torch.bfloat16  # the decoder itself runs in bf16
    (recon.float().square().mean() + vq_loss).backward()


@pytest.mark.parametrize(("name", "cls"), [
    ("VqVae", VqVae), ("vq_vae", VqVae), ("vqvae", VqVae), ("VqVae2", VqVae), ("VQVAE2", VQVAE2),
    ("vqvae2", VQVAE2), ("VQVAE2_OptVQ", VQVAE2OptVQ), ("vqvae2optvq", VQVAE2OptVQ),
    ("TamingVQGAN", TamingVQGAN), ("taming_vqgan", TamingVQGAN), ("VQGAN", TamingVQGAN), ("EMAVQ", TamingVQGAN)])
def test_registry_names(name, cls):
    assert name in MODEL_TYPES
    family = {VqVae: "VqVae", VQVAE2: "VQVAE2", VQVAE2OptVQ: "VQVAE2_OptVQ", TamingVQGAN: "TamingVQGAN"}[cls]
    assert type(build_vq_model(name, TINY_CONFIGS[family])) is cls


def test_taming_variant_follows_model_type_and_uses_taming_weight_names():
    ema = build_vq_model("EMAVQ", TINY_CONFIGS["EMAVQ"])
    plain = build_vq_model("VQGAN", TINY_CONFIGS["TamingVQGAN"])
    assert ema.config["model_variant"] == "EMAVQ" and "quantize.embedding_weight" in ema.state_dict()
    assert plain.config["model_variant"] == "VQModel"
    keys = set(plain.state_dict())
    for key in ("encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
                "encoder.mid.attn_1.q.weight", "decoder.up.1.upsample.conv.weight", "decoder.conv_out.weight",
                "quant_conv.weight", "post_quant_conv.weight", "quantize.embedding.weight"):
        assert key in keys


def test_seed_config_names_are_accepted():
    seed_style = {k: v for k, v in TINY_CONFIGS["VQVAE2"].items() if k != "nb_entries"}
    model = build_vq_model("vqvae2", {**seed_style, "vocab_size": 16, "input_channels": 3})
    assert model.codebook_sizes == [16, 16]
    taming = build_vq_model("TamingVQGAN", {"vocab_size": 20, "n_init": 4, "ddconfig": TINY_CONFIGS["EMAVQ"]["ddconfig"],
                                            "lossconfig": {"params": {"disc_start": 10}}})
    assert taming.codebook_sizes == [20] and taming.quantize.code_dim == 4


def test_export_config_rebuilds_the_same_model():
    model = _tiny("VQVAE2_OptVQ")
    config = model.export_config()
    assert config["model_type"] == "VQVAE2_OptVQ"
    rebuilt = build_vq_model(config["model_type"], config["model_args"])
    rebuilt.load_state_dict(model.state_dict())
    x = photo_batch(32, ("coffee",))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x)[1], model.eval()(x)[1])


@pytest.mark.parametrize(("model_type", "args", "message"), [
    ("VQGAM", {}, "unknown model_type 'VQGAM'; did you mean 'VQGAN'"),
    ("VqVae", {"vocab_sise": 8}, "unknown key 'vocab_sise'; did you mean 'vocab_size'"),
    ("VqVae", {"vocab_size": "8"}, "'vocab_size' must be int"),
    ("vqvae2", {"nb_entries": 8, "vocab_size": 8}, "both set 'nb_entries'"),
    ("vqvae2", {"nb_levels": 3}, r"scaling_rates \[4, 2\] must have nb_levels=3"),
    ("vqvae2", {"scaling_rates": [3, 2]}, "power of 2"),
    ("vqvae2optvq", {"normalize_mode": "rows"}, "normalize_mode"),
    ("TamingVQGAN", {"ddconfig": {"double_z": True}}, "double_z must be false"),
    ("TamingVQGAN", {"ddconfig": {"ch": 24}}, "not divisible by norm_groups=32"),
    ("TamingVQGAN", {"ddconfig": {"z_chanels": 4}}, "ddconfig: unknown key 'z_chanels'"),
    ("TamingVQGAN", {"model_variant": "Gumbel"}, "model_variant must be one of"),
])
def test_bad_configs_fail_with_one_clear_message(model_type, args, message):
    with pytest.raises(VQConfigError, match=message):
        build_vq_model(model_type, args)


def test_wrong_input_shape_is_reported():
    model = _tiny("VqVae")
    with pytest.raises(ValueError, match=r"expects images \(B, 3, H, W\) with H and W divisible by 2, got shape \(1, 3, 31, 32\)"):
        model(torch.zeros(1, 3, 31, 32))


def test_summarize_parameters_counts_each_top_level_module():
    model = _tiny("EMAVQ")
    table = summarize_parameters(model)
    lines = table.splitlines()
    assert lines[0].split("|")[1].strip() == "module"
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in lines[2:]}
    assert rows["encoder"] == f"{sum(p.numel() for p in model.encoder.parameters()):,}"
    assert rows["total"] == f"{sum(p.numel() for p in model.parameters()):,}"
    assert "quantize" in rows


def test_taming_lossconfig_is_checked_when_the_model_is_built():
    with pytest.raises(VQConfigError, match="lossconfig.params: unknown key 'disc_weigth'; did you mean 'disc_weight'"):
        build_vq_model("TamingVQGAN", {"ddconfig": TINY_CONFIGS["EMAVQ"]["ddconfig"],
                                       "lossconfig": {"params": {"disc_weigth": 0.8}}})
