
import pytest
import torch
import torch.nn.functional as F

from omniflow.models.vq import VQConfigError, build_vq_model
from omniflow.models.vq.losses import (NLayerDiscriminator, VQGANLoss, adaptive_generator_weight, build_vq_loss,
                                       generator_adversarial_loss, hinge_d_loss, lossconfig_to_kwargs,
                                       reconstruction_loss, vanilla_d_loss)
from omniflow.metrics.image import LPIPSMetric, build_lpips
from vq_helpers import TINY_CONFIGS, photo_batch


def _blurred(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def test_patchgan_discriminator_gives_one_logit_per_patch():
    disc = NLayerDiscriminator(in_channels=3, ndf=8, n_layers=3)
    assert disc(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(abs(c.weight.std().item() - 0.02) < 0.01 for c in convs[1:])


def test_hinge_and_vanilla_losses_match_their_definitions():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # hinge: real relu(1 - [2, .5]) = [0, .5], fake relu(1 + [-2, .5]) = [0, 1.5]
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    expected = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected.item())
    assert generator_adversarial_loss(fake, "hinge").item() == pytest.approx(0.75)
    assert generator_adversarial_loss(fake, "vanilla").item() == pytest.approx(F.softplus(-fake).mean().item())


def test_reconstruction_losses():
    a, b = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)
    assert reconstruction_loss(a, b, "l1").item() == pytest.approx(0.5)
    assert reconstruction_loss(a, b, "mse").item() == pytest.approx(0.25)
    with pytest.raises(VQConfigError, match="'l1' or 'mse'"):
        reconstruction_loss(a, b, "l2")


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    last = torch.nn.Parameter(torch.ones(3))
    rec_loss = (torch.tensor([3.0, 0.0, 4.0]) * last).sum()  # gradient norm 5
    g_loss = (torch.tensor([0.0, 2.0, 0.0]) * last).sum()  # gradient norm 2
    weight = adaptive_generator_weight(rec_loss, g_loss, last)
    assert weight.item() == pytest.approx(5.0 / (2.0 + 1e-4))
    assert not weight.requires_grad
    tiny_g = (1e-12 * last).sum()
    assert adaptive_generator_weight(rec_loss, tiny_g, last, max_weight=100.0).item() == 100.0


def test_the_perceptual_loss_is_the_validation_metric_s_lpips_built_from_a_fixed_seed(empty_hub):
    """One LPIPS for training and validation: offline without weights both get the same seeded backbone."""
    loss = build_vq_loss({"params": {"disc_ndf": 8}}, lpips_net="alex")
    assert isinstance(loss.perceptual, LPIPSMetric) and loss.perceptual.weights == "random (seed 0)"
    x = photo_batch(32, ("astronaut", "coffee"))
    torch.manual_seed(123)  # whatever the run's RNG did before
    metric = build_lpips("alex", input_range=(-1.0, 1.0))
    assert torch.equal(loss.perceptual(x, _blurred(x)), metric(x, _blurred(x)))
    assert not any(p.requires_grad for p in loss.perceptual.parameters())


def test_seed_lossconfig_translates_and_bad_ones_fail():
    seed = {"target": "models.taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
            "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 10000, "disc_weight": 0.8,
                       "codebook_weight": 1.0, "pixelloss_weight": 0.5}}
    kwargs = lossconfig_to_kwargs(seed)
    assert kwargs["disc_start"] == 10000 and kwargs["disc_weight"] == 0.8 and kwargs["pixel_weight"] == 0.5
    with pytest.raises(VQConfigError, match="not supported"):
        lossconfig_to_kwargs({"target": "mylib.OtherLoss"})
    with pytest.raises(VQConfigError, match="disc_conditional=true"):
        lossconfig_to_kwargs({"params": {"disc_conditional": True}})
    with pytest.raises(VQConfigError, match="did you mean 'disc_start'"):
        lossconfig_to_kwargs({"params": {"disc_strat": 5}})
    with pytest.raises(VQConfigError, match="needs a perceptual network"):
        VQGANLoss(perceptual_weight=1.0)


def test_gan_schedule_disc_start_and_every_third_step():
    """The discriminator first trains at disc_start, the step the generator first gets its adversarial loss
    (not at the next multiple of disc_every, which left the generator facing an untrained judge)."""
    loss = VQGANLoss(perceptual_weight=0.0, disc_start=2, disc_every=3, disc_ndf=8)
    assert [loss.gan_active(s) for s in range(5)] == [False, False, True, True, True]
    assert [loss.discriminator_step_due(s) for s in range(9)] == [False, False, True, False, False, True, False,
                                                                   False, True]
    assert not VQGANLoss(perceptual_weight=0.0, use_gan=False).discriminator_step_due(3)


def test_generator_and_discriminator_objectives_on_a_real_model(empty_hub):
    torch.manual_seed(0)
    model = build_vq_model("TamingVQGAN", TINY_CONFIGS["TamingVQGAN"]).train()
    loss = build_vq_loss({"params": {"disc_start": 1, "disc_ndf": 8, "disc_weight": 0.8}}, lpips_net="alex").train()
    assert not loss.perceptual.training  # LPIPS stays a fixed metric
    x = photo_batch(32, ("astronaut", "chelsea"))
    vq_loss, recon, _, _ = model(x)

    total, terms = loss.generator_loss(x, recon, vq_loss, step=0, last_layer=model.get_last_layer())
    assert "g_loss" not in terms  # before disc_start
    torch.testing.assert_close(total, terms["pixel"] + terms["perceptual"] + vq_loss)
    with pytest.raises(RuntimeError, match="before disc_start=1"):
        loss.discriminator_loss(x, recon, step=0)

    total, terms = loss.generator_loss(x, recon, vq_loss, step=1, last_layer=model.get_last_layer())
    rec = terms["pixel"] + terms["perceptual"]
    assert terms["d_weight"].item() > 0 and terms["disc_factor"].item() == 1.0
    torch.testing.assert_close(total, rec + vq_loss + terms["d_weight"] * terms["g_loss"])
    total.backward()
    assert model.get_last_layer().grad is not None
    assert all(p.grad is None for p in loss.discriminator.parameters())  # the generator step leaves D alone

    model.zero_grad()
    d_loss, d_terms = loss.discriminator_loss(x, recon, step=3)
    d_loss.backward()
    assert set(d_terms) == {"d_loss", "logits_real", "logits_fake"}
    assert all(p.grad is None for p in model.parameters())  # reconstructions are detached
    assert all(p.grad is not None for p in loss.discriminator.parameters())


def test_adaptive_weight_inside_the_loss_matches_the_formula():
    torch.manual_seed(0)
    model = build_vq_model("VqVae", TINY_CONFIGS["VqVae"]).train()
    loss = VQGANLoss(perceptual_weight=0.0, disc_ndf=8, disc_weight=0.5, pixel_loss="mse")
    x = photo_batch(32, ("coffee", "rocket"))
    vq_loss, recon, _, _ = model(x)
    _, terms = loss.generator_loss(x, recon, vq_loss, step=0, last_layer=model.get_last_layer())
    last = model.get_last_layer()
    rec_grad = torch.autograd.grad(F.mse_loss(recon, x), last, retain_graph=True)[0]
    g_grad = torch.autograd.grad(-loss.discriminator(recon).mean(), last, retain_graph=True)[0]
    expected = 0.5 * rec_grad.norm() / (g_grad.norm() + 1e-4)
    torch.testing.assert_close(terms["d_weight"], expected)


def test_discriminator_learns_to_separate_photos_from_blurred_copies():
    torch.manual_seed(0)
    loss = VQGANLoss(perceptual_weight=0.0, disc_ndf=8)
    optimizer = torch.optim.Adam(loss.discriminator.parameters(), lr=2e-3, betas=(0.5, 0.9))
    x = photo_batch(32)
    fake = _blurred(x)
    history = []
    for _ in range(15):
        d_loss, _ = loss.discriminator_loss(x, fake, step=0)
        optimizer.zero_grad()
        d_loss.backward()
        optimizer.step()
        history.append(d_loss.item())
    assert history[-1] < 0.5 * history[0]
