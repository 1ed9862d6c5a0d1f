"""``VqVae``: DALL-E dVAE style encoder/decoder with a vector-quantized bottleneck.

The encoder stacks ``group_count`` groups of ``n_blk_per_group`` residual blocks with a 2x
max-pool between groups (downsampling 2^(group_count-1)); group ``g`` has
``n_hid * min(2^g, 8)`` channels. The bottleneck has ``n_init`` channels, which is also
the code dimension, and ``vocab_size`` codes. The decoder mirrors the encoder with
nearest-neighbour upsampling. ``decay > 0`` selects an EMA codebook, ``decay == 0`` a
codebook learnt by gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from .base import QUANTIZER_OPTIONS, VQConfigError, VQEncoding, VQTokenizer, quantizer_options, resolve_args
from .quantizers import build_quantizer

DEFAULTS: dict[str, Any] = {
    "group_count": 4, "n_hid": 256, "n_blk_per_group": 2, "input_channels": 3, "output_channels": 3,
    "vocab_size": 8192, "n_init": 128, "commitment_cost": 0.25, "decay": 0.99, **QUANTIZER_OPTIONS,
}
ALIASES = {"in_channels": "input_channels", "out_channels": "output_channels", "beta": "commitment_cost"}


class _ResBlock(nn.Module):
    """Bottleneck residual block; ``post_gain`` keeps the sum of many residuals stable at init."""

    def __init__(self, in_ch: int, out_ch: int, post_gain: float) -> None:
        super().__init__()
        hid = max(out_ch // 4, 1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.residual = nn.Sequential(
            nn.ReLU(), nn.Conv2d(in_ch, hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(hid, hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(hid, hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(hid, out_ch, 1),
        )
        self.post_gain = post_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.post_gain * self.residual(x)


def _group_width(n_hid: int, group: int) -> int:
    return n_hid * min(2**group, 8)


class VqVae(VQTokenizer):
    model_type = "VqVae"

    def __init__(self, model_args: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        args = resolve_args("VqVae model_args", model_args or {}, DEFAULTS, ALIASES)
        groups, n_hid, blocks = args["group_count"], args["n_hid"], args["n_blk_per_group"]
        if groups < 1 or n_hid < 1 or blocks < 1:
            raise VQConfigError(f"VqVae model_args: group_count, n_hid and n_blk_per_group must be >= 1, got "
                                f"{groups}, {n_hid}, {blocks}")
        self.config = args
        self.in_channels = args["input_channels"]
        self.downsample_factor = 2 ** (groups - 1)
        self.codebook_sizes = [args["vocab_size"]]
        gain = 1.0 / (groups * blocks) ** 2

        enc: list[nn.Module] = [nn.Conv2d(self.in_channels, n_hid, 7, padding=3)]
        width = n_hid
        for g in range(groups):
            for _ in range(blocks):
                enc.append(_ResBlock(width, _group_width(n_hid, g), gain))
                width = _group_width(n_hid, g)
            if g < groups - 1:
                enc.append(nn.MaxPool2d(2))
        enc += [nn.ReLU(), nn.Conv2d(width, args["n_init"], 1)]
        self.encoder = nn.Sequential(*enc)

        width = _group_width(n_hid, groups - 1)
        dec: list[nn.Module] = [nn.Conv2d(args["n_init"], width, 1)]
        for g in reversed(range(groups)):
            for _ in range(blocks):
                dec.append(_ResBlock(width, _group_width(n_hid, g), gain))
                width = _group_width(n_hid, g)
            if g > 0:
                dec.append(nn.Upsample(scale_factor=2, mode="nearest"))
        dec += [nn.ReLU(), nn.Conv2d(width, args["output_channels"], 1)]
        self.decoder = nn.Sequential(*dec)

        kind, extra = ("ema", {"decay": args["decay"]}) if args["decay"] > 0 else ("vq", {})
        self.quantize = build_quantizer(kind, args["vocab_size"], args["n_init"], beta=args["commitment_cost"],
                                        **extra, **quantizer_options(args))

    def encode(self, x: torch.Tensor) -> VQEncoding:
        self.check_input(x)
        q = self.quantize(self.encoder(x))
        return VQEncoding(q.quantized, q.loss, q.perplexity, q.indices)

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(quantized)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.decode(self.quantize.embed(indices).to(self.get_last_layer().dtype))

    def get_last_layer(self) -> nn.Parameter:
        return self.decoder[-1].weight
