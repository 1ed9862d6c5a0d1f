"""Pieces of the VQ trainer (scripts/train_vqgan.py): the model summary written at start, the speed options, and
one training step (autoencoder update, then the discriminator's when due)."""
from __future__ import annotations

import math
from typing import Any

import torch

from ...runtime.run import TrainingRun
from .base import VQTokenizer, summarize_parameters
from .losses import VQGANLoss
from .params import VQParams


def model_summary(params: VQParams, model: VQTokenizer, loss: VQGANLoss) -> str:
    """Markdown: input, code grid per level, bits per image, parameters per module."""
    height, width = params.image_size
    model.eval()
    with torch.no_grad():
        indices = model.encode(torch.zeros(1, model.in_channels, height, width)).indices
    model.train()
    levels = indices if isinstance(indices, tuple) else (indices,)
    lines = [f"# {params.model_type} ({params.family})", "",
             f"- input: frames (B, {model.in_channels}, {height}, {width}) in [-1, 1]"]
    bits = 0
    for level, (codes, size) in enumerate(zip(levels, model.codebook_sizes)):
        lines.append(f"- codes, level {level}: {codes.shape[1]} x {codes.shape[2]} indices into {size} codes")
        bits += codes[0].numel() * math.ceil(math.log2(size))
    lines += [f"- bits per image: {bits} ({bits / (height * width):.4f} bits per pixel)", "",
              "## Tokenizer", "", summarize_parameters(model), ""]
    for name, module in (("Discriminator (PatchGAN)", loss.discriminator), ("Perceptual (LPIPS, frozen)", loss.perceptual)):
        if module is not None:
            lines.append(f"- {name}: {sum(p.numel() for p in module.parameters()):,} parameters")
    return "\n".join(lines) + "\n"


def training_settings(params: VQParams, max_grad_norm: float, loss: VQGANLoss) -> dict[str, Any]:
    """What the optimisation effectively uses (logged at start): both Adams, clipping, the GAN schedule and the
    beta convention."""
    train = params.train
    settings: dict[str, Any] = {
        "autoencoder": {"lr": train["lr"], "betas": [train["beta1"], train["beta2"]]},
        "max_grad_norm": max_grad_norm or None,  # None: no clipping (taming and the seed clip nothing)
        "lr_decay": [train["lr_decay"], train["lr_decay_steps"]],
    }
    if loss.perceptual is not None:
        settings["lpips_loss_weights"] = loss.perceptual.weights
    if loss.discriminator is not None:
        settings["discriminator"] = {"lr": train["disc_lr"], "betas": [train["disc_beta1"], train["disc_beta2"]],
                                     "start": loss.disc_start, "every": loss.disc_every}
    if "legacy_beta" in params.model_args or params.family == "TamingVQGAN":
        settings["beta_on"] = "codebook term (taming legacy)" if params.model_args.get("legacy_beta") else \
            "commitment term (VQ-VAE; taming's legacy=True puts it on the codebook term: model_args.legacy_beta)"
    return settings


def train_step(run: TrainingRun, x: torch.Tensor, model: torch.nn.Module, loss_fn: VQGANLoss, optimizer, scheduler,
               last_layer: torch.nn.Parameter, disc: torch.nn.Module | None, disc_optimizer) -> dict[str, Any]:
    """Autoencoder update, then (when due) discriminator update; returns the terms to log.

    The generator pass judges with the bare discriminator (``loss_fn.discriminator``), the
    discriminator pass with ``disc``, its DDP wrapper, so that only its gradients are synchronised.
    """
    step = run.step  # optimizer steps done so far: this step's index
    acc = run.accelerator
    with run.accumulate(model, *([disc] if disc is not None else [])):
        with acc.autocast():
            vq_loss, recon, perplexity, _ = model(x)
            loss, terms = loss_fn.generator_loss(x, recon, vq_loss, step, last_layer)
        run.backward_and_step(loss, model, optimizer, scheduler)
        if loss_fn.discriminator_step_due(step):
            with acc.autocast():
                d_loss, d_terms = loss_fn.discriminator_loss(x, recon, step, discriminator=disc)
            run.backward_and_step(d_loss, disc, disc_optimizer, lr_name="lr_disc")
            terms.update(d_terms)
    terms.pop("total")
    if disc_optimizer is not None:  # every step, also before the first discriminator update
        terms["lr_disc"] = disc_optimizer.param_groups[0]["lr"]
    return {"loss": loss, **terms, "perplexity": perplexity}


def apply_speed_options(model: VQTokenizer, loss_fn: VQGANLoss, channels_last: bool, compile: bool) -> list[str]:
    """``channels_last`` memory format for the tokenizer and the loss networks, and ``torch.compile`` of the
    convolution stacks (encoder(s), decoder(s), discriminator) in place, so that checkpoints and exports keep
    their keys; the quantizers stay eager. Returns the names of the compiled modules."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
        loss_fn.to(memory_format=torch.channels_last)
    if not compile:
        return []
    stacks = [(name, getattr(model, name)) for name in ("encoder", "decoder") if hasattr(model, name)]
    stacks += [(f"{name}.{i}", module) for name in ("encoders", "decoders")
               for i, module in enumerate(getattr(model, name, []))]
    if loss_fn.discriminator is not None:
        stacks.append(("discriminator", loss_fn.discriminator))
    for _, module in stacks:
        module.compile()
    return [name for name, _ in stacks]
