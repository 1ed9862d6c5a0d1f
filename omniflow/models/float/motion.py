"""The FLOAT motion auto-encoder: image -> (appearance code, motion coefficients, feature pyramid),
and (latent, pyramid) -> image by flow-warped StyleGAN2-style synthesis.

The motion of a frame lives in the span of a learned basis, orthogonalised by QR: a motion
latent is ``coeffs @ Q.T``. A frame is rendered from ``appearance code + motion latent``.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from .io import FloatPretrainedMixin
from .layers import (ConstantInput, ConvLayer, EqualConv2d, EqualLinear, ResBlock, StyledConv, ToFlow,
                     ToRGB)

FLOW_LEVEL = 64  # the decoder reports the sampling grid of this level (or of its last level if smaller)


class AppearanceEncoder(nn.Module):
    """Image -> (appearance code (B, dim), features from 8 px up to full size)."""

    def __init__(self, size: int, dim: int, channels: Mapping[int, int]):
        super().__init__()
        log_size = int(math.log2(size))
        self.convs = nn.ModuleList([ConvLayer(3, channels[size], 1)])
        for i in range(log_size, 2, -1):
            self.convs.append(ResBlock(channels[2 ** i], channels[2 ** (i - 1)]))
        self.convs.append(EqualConv2d(channels[4], dim, 4, bias=False))

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outputs = []
        h = img
        for conv in self.convs:
            h = conv(h)
            outputs.append(h)
        # drop the 4 px map and the 1x1 code; coarse to fine
        return h.flatten(1), outputs[-3::-1]


class MotionEncoder(nn.Module):
    def __init__(self, size: int, dim: int, dim_motion: int, channels: Mapping[int, int]):
        super().__init__()
        self.net_app = AppearanceEncoder(size, dim, channels)
        # four width-preserving layers then the coefficient layer; no nonlinearity in between
        self.fc = nn.Sequential(*[EqualLinear(dim, dim) for _ in range(4)], EqualLinear(dim, dim_motion))

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.net_app(img)


class Direction(nn.Module):
    """Learned motion basis (dim_w x dim_m), orthonormalised by QR at every call."""

    def __init__(self, dim: int, dim_motion: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim_motion))

    def basis(self) -> torch.Tensor:
        # QR needs fp32; the 1e-8 offset is part of the released function
        q, _ = torch.linalg.qr(self.weight.float() + 1e-8)
        return q

    def forward(self, coeffs: torch.Tensor) -> torch.Tensor:
        return (coeffs.float() @ self.basis().T).to(coeffs.dtype)


class MotionDecoder(nn.Module):
    """(latent (B, dim), encoder features coarse->fine) -> (image, sampling grid of the 64 px level)."""

    def __init__(self, size: int, style_dim: int, dim_motion: int, channels: Mapping[int, int]):
        super().__init__()
        self.size = size
        self.direction = Direction(style_dim, dim_motion)
        self.input = ConstantInput(channels[4])
        self.conv1 = StyledConv(channels[4], channels[4], 3, style_dim)
        # never called: a 4 px RGB head kept so released checkpoints load strictly
        self.to_rgb1 = ToRGB(channels[4], upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.to_flows = nn.ModuleList()
        in_ch = channels[4]
        for i in range(3, int(math.log2(size)) + 1):
            out_ch = channels[2 ** i]
            self.convs.append(StyledConv(in_ch, out_ch, 3, style_dim, upsample=True))
            self.convs.append(StyledConv(out_ch, out_ch, 3, style_dim))
            self.to_rgbs.append(ToRGB(out_ch))
            self.to_flows.append(ToFlow(out_ch, style_dim))
            in_ch = out_ch

    def forward(self, latent: torch.Tensor, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(feats) != len(self.to_flows):
            raise ValueError(f"motion decoder needs {len(self.to_flows)} feature maps (8 px to {self.size} px), "
                             f"got {len(feats)}")
        out = self.conv1(self.input(latent.shape[0]), latent)
        rgb = flow_skip = grid_out = None
        flow_size = min(FLOW_LEVEL, self.size)
        for level, feat in enumerate(feats):
            out = self.convs[2 * level](out, latent)
            out = self.convs[2 * level + 1](out, latent)
            warped, out, flow_skip, grid = self.to_flows[level](out, latent, feat, flow_skip)
            rgb = self.to_rgbs[level](warped, rgb)
            if out.shape[-1] == flow_size:
                grid_out = grid
        return rgb, grid_out


class MotionAutoEncoder(FloatPretrainedMixin, nn.Module):
    """Encoder ``enc`` and decoder ``dec`` with the released parameter names.

    ``channels`` maps each resolution from 4 px to ``size`` to a width (the release uses
    512 up to 32 px, then halves per doubling; see ``FloatConfig.motion_channel_table``).
    """

    model_type = "float_motion_autoencoder"
    release_prefix = "motion_autoencoder."

    def __init__(self, size: int, dim: int, dim_motion: int, channels: Mapping[int, int]):
        super().__init__()
        needed = [2 ** i for i in range(2, int(math.log2(size)) + 1)]
        if size < 8 or 2 ** int(math.log2(size)) != size or any(s not in channels for s in needed):
            raise ValueError(f"motion auto-encoder: size {size} must be a power of two >= 8 and channels must "
                             f"give a width for each of {needed}; got {dict(channels)}")
        self.size, self.dim, self.dim_motion = size, dim, dim_motion
        self.channels = {s: int(channels[s]) for s in needed}
        self.enc = MotionEncoder(size, dim, dim_motion, self.channels)
        self.dec = MotionDecoder(size, dim, dim_motion, self.channels)

    @classmethod
    def from_config(cls, config) -> "MotionAutoEncoder":
        return cls(config.input_size, config.dim_w, config.dim_m, config.motion_channel_table())

    @classmethod
    def from_release(cls, checkpoint, config) -> "MotionAutoEncoder":
        model = cls.from_config(config)
        model.load_release(checkpoint)
        return model

    def export_config(self) -> dict:
        return {"size": self.size, "dim": self.dim, "dim_motion": self.dim_motion,
                "channels": {str(s): c for s, c in self.channels.items()}}

    @classmethod
    def from_export_config(cls, values: dict) -> "MotionAutoEncoder":
        channels = {int(s): c for s, c in values["channels"].items()}
        return cls(values["size"], values["dim"], values["dim_motion"], channels)

    def encode(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Image -> (appearance code s_r (B, dim), motion coefficients (B, dim_m), feature pyramid)."""
        code, feats = self.enc(img)
        return code, self.enc.fc(code), feats

    def motion_of(self, code: torch.Tensor) -> torch.Tensor:
        """The motion latent of an appearance code: its coefficients mapped onto the basis."""
        return self.dec.direction(self.enc.fc(code))

    def decode(self, latent: torch.Tensor, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dec(latent, feats)

    def forward(self, img_source: torch.Tensor, img_drive: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reenact: render the source's appearance with the driving image's motion."""
        code, feats = self.enc(img_source)
        drive_code, _ = self.enc(img_drive)
        img, flow = self.dec(code + self.motion_of(drive_code), feats)
        return {"d_hat": img, "flow": flow}
