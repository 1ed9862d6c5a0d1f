"""``TamingVQGAN``: the VQGAN autoencoder (Esser et al.) configured by a taming-style ``ddconfig``.

Module and parameter names follow the taming-transformers layout (``encoder.down.0.block.0``,
``quant_conv``, ``quantize.embedding.weight``...) so its released ``VQModel`` weights map onto
this model. ``model_variant`` picks the codebook: ``VQModel`` learns it by gradient,
``EMAVQ`` by moving averages. ``lossconfig`` is checked and kept in the config for
``losses.build_vq_loss``; the model itself holds no loss.

``beta`` (0.25) weights the commitment term ``||z - sg(e)||^2``, as in the VQ-VAE paper; taming's
``VectorQuantizer2`` by default (``legacy=True``) weights the codebook term instead. ``legacy_beta: true``
trains a ported taming config as taming does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import QUANTIZER_OPTIONS, VQConfigError, VQEncoding, VQTokenizer, quantizer_options, resolve_args
from .losses import lossconfig_to_kwargs
from .quantizers import build_quantizer

DDCONFIG_DEFAULTS: dict[str, Any] = {
    "double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.0,
    "resamp_with_conv": True, "norm_groups": 32,
}
DEFAULTS: dict[str, Any] = {
    "ddconfig": {}, "lossconfig": None, "n_embed": 1024, "embed_dim": 256, "model_variant": "VQModel",
    "beta": 0.25, "legacy_beta": False, "decay": 0.99, **QUANTIZER_OPTIONS,
}
ALIASES = {"vocab_size": "n_embed", "n_init": "embed_dim", "commitment_cost": "beta"}
VARIANTS = {"VQModel": "vq", "EMAVQ": "ema"}


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(n), self.k(n), self.v(n)))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "conv"):
            return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric padding
        return F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


def _middle(channels: int, dropout: float, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout, groups)
    mid.attn_1 = AttnBlock(channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, dropout, groups)
    return mid


def _run_middle(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


def _run_stage(stage: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(stage.block):
        h = block(h)
        if len(stage.attn):
            h = stage.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        ch, mult, groups, dropout = cfg["ch"], list(cfg["ch_mult"]), cfg["norm_groups"], cfg["dropout"]
        self.conv_in = nn.Conv2d(cfg["in_channels"], ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, block_in = cfg["resolution"], ch
        for level, m in enumerate(mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg["num_res_blocks"]):
                stage.block.append(ResnetBlock(block_in, ch * m, dropout, groups))
                block_in = ch * m
                if res in cfg["attn_resolutions"]:
                    stage.attn.append(AttnBlock(block_in, groups))
            if level != len(mult) - 1:
                stage.downsample = Downsample(block_in, cfg["resamp_with_conv"])
                res //= 2
            self.down.append(stage)
        self.mid = _middle(block_in, dropout, groups)
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, cfg["z_channels"], 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = _run_stage(stage, h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = _run_middle(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        ch, mult, groups, dropout = cfg["ch"], list(cfg["ch_mult"]), cfg["norm_groups"], cfg["dropout"]
        block_in = ch * mult[-1]
        res = cfg["resolution"] // 2 ** (len(mult) - 1)
        self.conv_in = nn.Conv2d(cfg["z_channels"], block_in, 3, padding=1)
        self.mid = _middle(block_in, dropout, groups)
        stages: list[nn.Module] = []
        for level in reversed(range(len(mult))):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg["num_res_blocks"] + 1):
                stage.block.append(ResnetBlock(block_in, ch * mult[level], dropout, groups))
                block_in = ch * mult[level]
                if res in cfg["attn_resolutions"]:
                    stage.attn.append(AttnBlock(block_in, groups))
            if level != 0:
                stage.upsample = Upsample(block_in, cfg["resamp_with_conv"])
                res *= 2
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)  # indexed by level, like the encoder
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, cfg["out_ch"], 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_middle(self.mid, self.conv_in(z))
        for stage in reversed(self.up):
            h = _run_stage(stage, h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _check_ddconfig(cfg: Mapping[str, Any]) -> None:
    if cfg["double_z"]:
        raise VQConfigError("TamingVQGAN ddconfig: double_z must be false for a VQ model (it doubles the "
                            "encoder output for a KL autoencoder)")
    mult = cfg["ch_mult"]
    if not isinstance(mult, Sequence) or not mult or any(m < 1 for m in mult):
        raise VQConfigError(f"TamingVQGAN ddconfig: ch_mult must be a non-empty list of positive ints, got {mult}")
    groups = cfg["norm_groups"]
    bad = sorted({cfg["ch"] * m for m in mult if (cfg["ch"] * m) % groups})
    if bad:
        raise VQConfigError(f"TamingVQGAN ddconfig: channel widths {bad} (ch * ch_mult) are not divisible by "
                            f"norm_groups={groups}")


class TamingVQGAN(VQTokenizer):
    model_type = "TamingVQGAN"

    def __init__(self, model_args: Mapping[str, Any] | None = None, default_variant: str = "VQModel") -> None:
        super().__init__()
        given_variant = (model_args or {}).get("model_variant", default_variant)
        if default_variant == "EMAVQ" and given_variant != "EMAVQ":
            raise VQConfigError(f"model_type EMAVQ with model_variant {given_variant!r} contradicts itself: EMAVQ "
                                f"is the EMA codebook; use model_type TamingVQGAN for a gradient-trained one")
        args = resolve_args("TamingVQGAN model_args", {"model_variant": default_variant, **(model_args or {})},
                            DEFAULTS, ALIASES)
        args["ddconfig"] = resolve_args("TamingVQGAN ddconfig", args["ddconfig"] or {}, DDCONFIG_DEFAULTS)
        cfg = args["ddconfig"]
        _check_ddconfig(cfg)
        if args["lossconfig"]:
            lossconfig_to_kwargs(args["lossconfig"])  # fail at build time, not when the loss is made
        variant = args["model_variant"]
        if variant not in VARIANTS:
            raise VQConfigError(f"TamingVQGAN model_args: model_variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        self.config = args
        self.in_channels = cfg["in_channels"]
        self.downsample_factor = 2 ** (len(cfg["ch_mult"]) - 1)
        self.codebook_sizes = [args["n_embed"]]

        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg["z_channels"], args["embed_dim"], 1)
        self.post_quant_conv = nn.Conv2d(args["embed_dim"], cfg["z_channels"], 1)
        if variant == "EMAVQ" and args["legacy_beta"]:
            raise VQConfigError("TamingVQGAN model_args: legacy_beta applies to the gradient codebook (VQModel); "
                                "the EMA codebook has no codebook term")
        extra = {"decay": args["decay"]} if variant == "EMAVQ" else {"legacy_beta": args["legacy_beta"]}
        self.quantize = build_quantizer(VARIANTS[variant], args["n_embed"], args["embed_dim"], beta=args["beta"],
                                        **extra, **quantizer_options(args))

    def encode(self, x: torch.Tensor) -> VQEncoding:
        self.check_input(x)
        q = self.quantize(self.quant_conv(self.encoder(x)))
        return VQEncoding(q.quantized, q.loss, q.perplexity, q.indices)

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quantized))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.decode(self.quantize.embed(indices).to(self.get_last_layer().dtype))

    def get_last_layer(self) -> nn.Parameter:
        return self.decoder.conv_out.weight
