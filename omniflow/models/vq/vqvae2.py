"""``VQVAE2``: hierarchical VQ-VAE-2 with any number of levels, and its OptVQ variant.

Level 0 is the finest. Encoder ``l`` downsamples the previous level's features by
``scaling_rates[l]``. Quantization runs top-down: the top level quantizes its features;
each lower level quantizes its features concatenated with a decoding of all codes above
it. The image decoder sees level 0's codes plus every upper level's codes upsampled to
level 0's resolution. ``VQVAE2`` uses EMA codebooks; ``VQVAE2_OptVQ`` uses the Sinkhorn
(optimal transport) quantizer with a gradient-learnt codebook.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from .base import QUANTIZER_OPTIONS, VQConfigError, VQEncoding, VQTokenizer, quantizer_options, resolve_args
from .quantizers import build_quantizer

_SHARED_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "hidden_channels": 128, "res_channels": 32, "nb_res_layers": 2,
    "nb_levels": 2, "embed_dim": 64, "nb_entries": 512, "scaling_rates": [4, 2], "commitment_cost": 0.25,
    **QUANTIZER_OPTIONS,
}
ALIASES = {"input_channels": "in_channels", "output_channels": "out_channels", "vocab_size": "nb_entries",
           "beta": "commitment_cost"}


class _ResBlock(nn.Module):
    def __init__(self, channels: int, res_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, res_channels, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(res_channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _halvings(rate: int) -> int:
    return int(math.log2(rate))


def _encoder(in_ch: int, hidden: int, res_ch: int, n_res: int, rate: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    ch = in_ch
    for step in range(_halvings(rate)):
        out = hidden if step == _halvings(rate) - 1 else hidden // 2
        layers += [nn.Conv2d(ch, out, 4, stride=2, padding=1), nn.ReLU()]
        ch = out
    layers.append(nn.Conv2d(ch, hidden, 3, padding=1))
    layers += [_ResBlock(hidden, res_ch) for _ in range(n_res)]
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _decoder(in_ch: int, hidden: int, out_ch: int, res_ch: int, n_res: int, rate: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, hidden, 3, padding=1)]
    layers += [_ResBlock(hidden, res_ch) for _ in range(n_res)]
    layers.append(nn.ReLU())
    ch, steps = hidden, _halvings(rate)
    for step in range(steps):
        last = step == steps - 1
        layers.append(nn.ConvTranspose2d(ch, out_ch if last else hidden // 2, 4, stride=2, padding=1))
        if not last:
            layers.append(nn.ReLU())
        ch = hidden // 2
    if steps == 0:
        layers.append(nn.Conv2d(hidden, out_ch, 3, padding=1))
    return nn.Sequential(*layers)


def _upsampler(channels: int, rate: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for step in range(_halvings(rate)):
        if step:
            layers.append(nn.ReLU())
        layers.append(nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1))
    return nn.Sequential(*layers)


class VQVAE2(VQTokenizer):
    model_type = "VQVAE2"
    DEFAULTS: dict[str, Any] = {**_SHARED_DEFAULTS, "decay": 0.99}
    quantizer_kind = "ema"

    def __init__(self, model_args: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        args = resolve_args(f"{self.model_type} model_args", model_args or {}, self.DEFAULTS, ALIASES)
        levels, rates = args["nb_levels"], list(args["scaling_rates"])
        if levels < 1 or len(rates) != levels:
            raise VQConfigError(f"{self.model_type} model_args: scaling_rates {rates} must have nb_levels={levels} entries")
        if any(r < 1 or r & (r - 1) for r in rates):
            raise VQConfigError(f"{self.model_type} model_args: every scaling rate must be a power of 2, got {rates}")
        self.config = args
        self.nb_levels = levels
        self.in_channels = args["in_channels"]
        self.downsample_factor = math.prod(rates)
        self.codebook_sizes = [args["nb_entries"]] * levels
        hidden, res_ch, n_res, dim = args["hidden_channels"], args["res_channels"], args["nb_res_layers"], args["embed_dim"]

        self.encoders = nn.ModuleList(
            _encoder(self.in_channels if level == 0 else hidden, hidden, res_ch, n_res, rates[level])
            for level in range(levels))
        # Level l's quantizer sees its features plus the decoding of the codes above (except the top).
        self.pre_quant = nn.ModuleList(
            nn.Conv2d(hidden if level == levels - 1 else hidden + dim, dim, 1) for level in range(levels))
        self.quantizers = nn.ModuleList(
            build_quantizer(self.quantizer_kind, args["nb_entries"], dim, beta=args["commitment_cost"],
                            **self._quantizer_extra(args), **quantizer_options(args))
            for _ in range(levels))
        # decoders[0] makes the image; decoders[l>0] turn codes of levels >= l into conditioning at level l-1.
        self.decoders = nn.ModuleList(
            _decoder(dim * (levels - level), hidden, args["out_channels"] if level == 0 else dim, res_ch, n_res,
                     rates[level])
            for level in range(levels))
        # code_upsamplers[m-1][k] takes level m's codes from level m-k down to level m-k-1.
        self.code_upsamplers = nn.ModuleList(
            nn.ModuleList(_upsampler(dim, rates[m - k]) for k in range(m)) for m in range(1, levels))

    def _quantizer_extra(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return {"decay": args["decay"]}

    def _codes_at_level(self, quantized: list[torch.Tensor], level: int) -> torch.Tensor:
        """Level ``level``'s codes concatenated with all upper levels' codes upsampled to it."""
        parts = [quantized[level]]
        for m in range(level + 1, self.nb_levels):
            up = quantized[m]
            for k in range(m - level):
                up = self.code_upsamplers[m - 1][k](up)
            parts.append(up)
        return torch.cat(parts, dim=1)

    def encode(self, x: torch.Tensor) -> VQEncoding:
        self.check_input(x)
        features = []
        h = x
        for encoder in self.encoders:
            h = encoder(h)
            features.append(h)
        quantized: list[torch.Tensor] = [torch.empty(0)] * self.nb_levels
        indices: list[torch.Tensor] = [torch.empty(0)] * self.nb_levels
        losses, perplexities = [], []
        condition = None
        for level in reversed(range(self.nb_levels)):
            feat = features[level] if condition is None else torch.cat([features[level], condition], dim=1)
            q = self.quantizers[level](self.pre_quant[level](feat))
            quantized[level], indices[level] = q.quantized, q.indices
            losses.append(q.loss)
            perplexities.append(q.perplexity)
            if level > 0:
                condition = self.decoders[level](self._codes_at_level(quantized, level))
        return VQEncoding(tuple(quantized), torch.stack(losses).sum(), torch.stack(perplexities).mean(),
                          tuple(indices))

    def decode(self, quantized: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if len(quantized) != self.nb_levels:
            raise ValueError(f"{self.model_type}.decode needs {self.nb_levels} levels of codes, got {len(quantized)}")
        return self.decoders[0](self._codes_at_level(list(quantized), 0))

    def decode_indices(self, indices: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if len(indices) != self.nb_levels:
            raise ValueError(f"{self.model_type}.decode_indices needs {self.nb_levels} index maps, got {len(indices)}")
        dtype = self.get_last_layer().dtype
        return self.decode(tuple(q.embed(i).to(dtype) for q, i in zip(self.quantizers, indices)))

    def get_last_layer(self) -> nn.Parameter:
        return self.decoders[0][-1].weight


class VQVAE2OptVQ(VQVAE2):
    model_type = "VQVAE2_OptVQ"
    DEFAULTS: dict[str, Any] = {**_SHARED_DEFAULTS, "epsilon": 10.0, "n_iters": 5, "normalize_mode": "all"}
    quantizer_kind = "sinkhorn"

    def _quantizer_extra(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return {"epsilon": args["epsilon"], "n_iters": args["n_iters"], "normalize_mode": args["normalize_mode"]}
