"""VQ training losses: reconstruction, perceptual (LPIPS), VQ and a PatchGAN adversary.

The training step uses two optimizers, like taming's ``VQLPIPSWithDiscriminator``:

    total, terms = loss.generator_loss(x, recon, vq_loss, step, model.get_last_layer())
    ... backward / autoencoder optimizer step ...
    if loss.discriminator_step_due(step):
        d_loss, d_terms = loss.discriminator_loss(x, recon, step)
        ... backward / discriminator optimizer (over loss.discriminator.parameters()) step ...

Before ``disc_start`` the discriminator is neither run nor trained (taming multiplies it by
zero there, which costs the same compute for nothing). Checkpoint ``loss.discriminator``;
the LPIPS network is frozen and rebuilt from its weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from omniflow.metrics.image import build_lpips

from .base import VQConfigError, resolve_args


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix): one logit per overlapping image patch."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            # BatchNorm follows, so the conv needs no bias.
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean absolute (``"l1"``) or squared (``"mse"``) error, computed in fp32."""
    diff = recon.float() - target.float()
    if kind == "l1":
        return diff.abs().mean()
    if kind == "mse":
        return diff.pow(2).mean()
    raise VQConfigError(f"reconstruction loss must be 'l1' or 'mse', got {kind!r}")


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Hinge: ``-E[D(G)]``; vanilla: the non-saturating ``E[softplus(-D(G))]``."""
    return -logits_fake.mean() if kind == "hinge" else F.softplus(-logits_fake).mean()


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adaptive_generator_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                              max_weight: float = 1e4) -> torch.Tensor:
    """||grad rec_loss|| / ||grad g_loss|| at the decoder's last layer (VQGAN's lambda), detached.

    Balances the adversarial gradient against the reconstruction gradient where both meet.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


# taming's ``lossconfig.params`` names -> VQGANLoss keyword arguments
_LOSSCONFIG_DEFAULTS: dict[str, Any] = {
    "disc_start": 0, "codebook_weight": 1.0, "pixelloss_weight": 1.0, "disc_num_layers": 3, "disc_in_channels": 3,
    "disc_factor": 1.0, "disc_weight": 1.0, "perceptual_weight": 1.0, "use_actnorm": False,
    "disc_conditional": False, "disc_ndf": 64, "disc_loss": "hinge",
}
_LOSSCONFIG_RENAMES = {"pixelloss_weight": "pixel_weight"}
_LOSS_TARGET = "VQLPIPSWithDiscriminator"


def lossconfig_to_kwargs(lossconfig: Mapping[str, Any]) -> dict[str, Any]:
    """Translate a taming-style ``{"target": ..., "params": {...}}`` into ``VQGANLoss`` arguments."""
    unknown = set(lossconfig) - {"target", "params"}
    if unknown:
        raise VQConfigError(f"lossconfig: unknown keys {sorted(unknown)} (expected 'target' and 'params')")
    target = lossconfig.get("target") or _LOSS_TARGET
    if target.rsplit(".", 1)[-1] != _LOSS_TARGET:
        raise VQConfigError(f"lossconfig.target {target!r} is not supported; only ...{_LOSS_TARGET} is built here")
    params = resolve_args("lossconfig.params", lossconfig.get("params") or {}, _LOSSCONFIG_DEFAULTS)
    if params.pop("disc_conditional"):
        raise VQConfigError("lossconfig.params.disc_conditional=true is not supported (no conditioning input)")
    if params.pop("use_actnorm"):
        raise VQConfigError("lossconfig.params.use_actnorm=true is not supported; the discriminator uses BatchNorm")
    return {_LOSSCONFIG_RENAMES.get(key, key): value for key, value in params.items()}


class VQGANLoss(nn.Module):
    """Reconstruction + perceptual + VQ + adaptive-weight PatchGAN loss; returns dicts of terms.

    Args:
        pixel_loss: ``"l1"`` (VQGAN) or ``"mse"``.
        pixel_weight, perceptual_weight, codebook_weight: weights of the pixel, LPIPS and VQ terms.
        use_gan: include the discriminator at all.
        disc_start: first step at which the adversarial terms are on.
        disc_factor: overall weight of both adversarial losses once on.
        disc_weight: multiplier of the adaptive generator weight (the weight itself when
            ``adaptive_weight`` is false or no last layer is given).
        disc_loss: ``"hinge"`` or ``"vanilla"``.
        disc_every: train the discriminator every this many steps, from ``disc_start`` on.
        perceptual: the LPIPS module (required when ``perceptual_weight > 0``).
    """

    def __init__(self, *, pixel_loss: str = "l1", pixel_weight: float = 1.0, perceptual_weight: float = 1.0,
                 codebook_weight: float = 1.0, use_gan: bool = True, disc_start: int = 0, disc_factor: float = 1.0,
                 disc_weight: float = 1.0, adaptive_weight: bool = True, disc_loss: str = "hinge",
                 disc_every: int = 3, disc_in_channels: int = 3, disc_ndf: int = 64, disc_num_layers: int = 3,
                 perceptual: nn.Module | None = None) -> None:
        super().__init__()
        if pixel_loss not in ("l1", "mse"):
            raise VQConfigError(f"pixel_loss must be 'l1' or 'mse', got {pixel_loss!r}")
        if disc_loss not in D_LOSSES:
            raise VQConfigError(f"disc_loss must be one of {sorted(D_LOSSES)}, got {disc_loss!r}")
        if disc_every < 1:
            raise VQConfigError(f"disc_every must be >= 1, got {disc_every}")
        if perceptual_weight > 0 and perceptual is None:
            raise VQConfigError("perceptual_weight > 0 needs a perceptual network (see build_vq_loss)")
        self.pixel_loss, self.pixel_weight = pixel_loss, pixel_weight
        self.perceptual_weight, self.codebook_weight = perceptual_weight, codebook_weight
        self.use_gan, self.disc_start, self.disc_factor = use_gan, disc_start, disc_factor
        self.disc_weight, self.adaptive_weight = disc_weight, adaptive_weight
        self.disc_loss, self.disc_every = disc_loss, disc_every
        self.perceptual = perceptual if perceptual_weight > 0 else None
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers) if use_gan else None

    def train(self, mode: bool = True) -> VQGANLoss:
        super().train(mode)
        if self.perceptual is not None:
            self.perceptual.eval()  # LPIPS has dropout in its heads; it is a fixed metric here
        return self

    def gan_active(self, step: int) -> bool:
        return self.use_gan and step >= self.disc_start

    def discriminator_step_due(self, step: int) -> bool:
        """From ``disc_start`` on, every ``disc_every`` steps: the discriminator first trains at ``disc_start``,
        the step its adversarial loss reaches the generator."""
        return self.gan_active(step) and (step - self.disc_start) % self.disc_every == 0

    def generator_loss(self, inputs: torch.Tensor, recon: torch.Tensor, vq_loss: torch.Tensor, step: int,
                       last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Autoencoder objective and its detached terms: total, rec, pixel, perceptual, vq (+ GAN terms)."""
        pixel = reconstruction_loss(recon, inputs, self.pixel_loss)
        rec = self.pixel_weight * pixel
        terms = {"pixel": pixel}
        if self.perceptual is not None:
            perceptual = self.perceptual(recon, inputs).float().mean()
            rec = rec + self.perceptual_weight * perceptual
            terms["perceptual"] = perceptual
        vq_loss = vq_loss.float()
        total = rec + self.codebook_weight * vq_loss
        terms.update(rec=rec, vq=vq_loss)
        if self.gan_active(step):
            g_loss = generator_adversarial_loss(self._judge_without_grads(recon).float(), self.disc_loss)
            weight = torch.tensor(self.disc_weight, device=total.device)
            if self.adaptive_weight and last_layer is not None and torch.is_grad_enabled() and rec.requires_grad:
                weight = adaptive_generator_weight(rec, g_loss, last_layer) * self.disc_weight
            total = total + weight * self.disc_factor * g_loss
            terms.update(g_loss=g_loss, d_weight=weight, disc_factor=torch.tensor(self.disc_factor))
        terms["total"] = total
        return total, {key: value.detach() for key, value in terms.items()}

    def _judge_without_grads(self, images: torch.Tensor) -> torch.Tensor:
        """Discriminator logits whose backward reaches ``images`` but not the discriminator."""
        trainable = [p for p in self.discriminator.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        try:
            return self.discriminator(images)
        finally:
            for p in trainable:
                p.requires_grad_(True)

    def discriminator_loss(self, inputs: torch.Tensor, recon: torch.Tensor, step: int,
                           discriminator: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Discriminator objective on real inputs vs detached reconstructions, and its terms.

        ``discriminator``: a wrapper of ``self.discriminator`` to run instead, e.g. its DDP module,
        so that its gradients are averaged over ranks (the generator pass must use the bare module:
        a DDP forward whose parameters get no gradient breaks DDP's next reduction).
        """
        if not self.gan_active(step):
            raise RuntimeError(f"discriminator_loss called at step {step}, before disc_start={self.disc_start} "
                               "or with use_gan off; check discriminator_step_due(step) first")
        discriminator = discriminator or self.discriminator
        logits_real = discriminator(inputs.detach()).float()
        logits_fake = discriminator(recon.detach()).float()
        d_loss = self.disc_factor * D_LOSSES[self.disc_loss](logits_real, logits_fake)
        terms = {"d_loss": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return d_loss, {key: value.detach() for key, value in terms.items()}


def build_vq_loss(lossconfig: Mapping[str, Any] | None = None, *, lpips_net: str = "vgg",
                  lpips_weights_path: str | None = None, **overrides: Any) -> VQGANLoss:
    """``VQGANLoss`` from a taming ``lossconfig`` (TamingVQGAN) and/or keyword ``overrides``.

    LPIPS is the validation metric's (:func:`omniflow.metrics.image.build_lpips`, inputs in [-1, 1]), built
    when the perceptual weight is positive.
    """
    kwargs = lossconfig_to_kwargs(lossconfig) if lossconfig else {}
    kwargs.update(overrides)
    perceptual = None
    if kwargs.get("perceptual_weight", 1.0) > 0:
        perceptual = build_lpips(lpips_net, lpips_weights_path, input_range=(-1.0, 1.0))
    try:
        return VQGANLoss(perceptual=perceptual, **kwargs)
    except TypeError as err:  # an unknown override keyword
        raise VQConfigError(f"build_vq_loss: {err}") from err
