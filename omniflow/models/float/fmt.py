"""Flow Matching Transformer (FMT): predicts the velocity of a window of motion latents.

Input: previous frames + current window of motion latents, conditioned per frame on the
reference motion, the audio, the emotion and the flow time (adaLN, as in DiT). Each frame
attends only to frames within ``attention_window`` of itself, in every block.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...flow.guidance import GuidanceScales, guided_velocity
from ...flow.rectified_flow import ConditionDropout, FlowLoss, RectifiedFlow
from ...flow.sampler import FlowSampler, sample_in_windows
from ...runtime.noise import Generators
from .config import FloatConfig
from .io import FloatPretrainedMixin

TIME_FREQUENCIES = 256


class FMTShapeError(ValueError):
    """FMT inputs whose shapes do not fit each other or the model."""


def band_mask(length: int, half_width: int, device=None) -> torch.Tensor:
    """(length, length) bool, True where frame i may attend to frame j (|i - j| <= half_width)."""
    idx = torch.arange(length, device=device)
    return (idx[:, None] - idx[None, :]).abs() <= half_width


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """Interleaved sin/cos position table (length, dim): angles in float64, sin/cos in float32."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    rates = 10000.0 ** (2 * (torch.arange(dim, dtype=torch.float64) // 2) / dim)
    angles = (pos / rates).float()
    table = torch.empty(length, dim)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table


def timestep_features(t: torch.Tensor, dim: int = TIME_FREQUENCIES, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) raw times in [0, 1] -> (N, dim) features, cosine half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQUENCIES, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t).to(self.mlp[0].weight.dtype))


class SequenceEmbed(nn.Module):
    def __init__(self, dim_in: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class FMTBlock(nn.Module):
    """DiT block with per-frame adaLN modulation and gating."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a), allowed)
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class Decoder(nn.Module):
    def __init__(self, hidden: int, dim_out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, dim_out)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class FlowMatchingTransformer(FloatPretrainedMixin, nn.Module):
    """Velocity field v(t, x | wr, wa, we, prev_x, prev_wa) over a window of motion latents."""

    model_type = "float_fmt"
    release_prefix = "fmt."

    def __init__(self, config: FloatConfig):
        super().__init__()
        self.config = config
        self.num_prev_frames = config.num_prev_frames
        self.seq_len = config.seq_len
        hidden = config.dim_h
        self.x_embedder = SequenceEmbed(config.dim_w, hidden)
        # fixed sinusoid table, stored in released checkpoints (hence a frozen parameter)
        self.pos_embed = nn.Parameter(sinusoid_table(self.seq_len, hidden)[None], requires_grad=False)
        self.t_embedder = TimestepEmbedder(hidden)
        self.c_embedder = nn.Linear(config.dim_w + config.dim_a + config.dim_e, hidden)
        self.blocks = nn.ModuleList(FMTBlock(hidden, config.num_heads, config.mlp_ratio)
                                    for _ in range(config.fmt_depth))
        self.decoder = Decoder(hidden, config.dim_w)
        self.register_buffer("alignment_mask", band_mask(self.seq_len, config.attention_window), persistent=False)
        self.gradient_checkpointing = False  # recompute each block's activations in the backward pass
        self.initialize_weights()

    @classmethod
    def from_release(cls, checkpoint, config: FloatConfig) -> "FlowMatchingTransformer":
        fmt = cls(config)
        fmt.load_release(checkpoint)
        return fmt

    def export_config(self) -> dict:
        return {"float": self.config.to_dict()}

    @classmethod
    def from_export_config(cls, values: dict) -> "FlowMatchingTransformer":
        return cls(FloatConfig.from_dict(values["float"]))

    def initialize_weights(self) -> None:
        """Xavier linears, small time-MLP weights, and zeroed modulation/output layers so that
        every block starts as the identity and the initial velocity is zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.decoder.adaLN_modulation[-1],
                                                                      self.decoder.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, t: torch.Tensor, x: torch.Tensor, wa: torch.Tensor, wr: torch.Tensor, we: torch.Tensor,
                prev_x: torch.Tensor | None = None, prev_wa: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity for every frame, previous frames included: (B, P + L, dim_w).

        t: (), (1,) or (B,) flow time in [0, 1]; x: (B, L, dim_w) motion latents at time t;
        wa: (B, L, dim_a) audio; wr: (B, dim_w) reference motion; we: (B, 1, dim_e) or (B, dim_e)
        emotion; prev_x / prev_wa: (B, P, .) previous frames and their audio, or both None when
        x and wa already span P + L frames. The forward is deterministic: condition dropout for
        training is applied by the caller (``omniflow.flow.ConditionDropout``).
        """
        if (prev_x is None) != (prev_wa is None):
            raise FMTShapeError("give both prev_x and prev_wa, or neither")
        if prev_x is not None:
            x = torch.cat([prev_x, x], dim=1)
            wa = torch.cat([prev_wa, wa], dim=1)
        b, n, _ = x.shape
        if n != self.seq_len or wa.shape[:2] != (b, n):
            raise FMTShapeError(f"FMT expects {self.seq_len} frames (prev {self.num_prev_frames} + window "
                                f"{self.seq_len - self.num_prev_frames}) for x and wa; got x {tuple(x.shape)}, "
                                f"wa {tuple(wa.shape)}")
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1)
        if t.numel() not in (1, b):
            raise FMTShapeError(f"t has {t.numel()} values for a batch of {b}")
        t = t.expand(b)
        we = we.reshape(b, 1, -1).to(x.dtype).expand(b, n, -1)
        wr = wr.reshape(b, 1, -1).to(x.dtype).expand(b, n, -1)
        c = self.c_embedder(torch.cat([wr, wa, we], dim=-1)) + self.t_embedder(t)[:, None]
        h = self.x_embedder(x) + self.pos_embed
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                h = checkpoint(block, h, c, self.alignment_mask, use_reentrant=False)
            else:
                h = block(h, c, self.alignment_mask)
        return self.decoder(h, c)

    def forward_guided(self, t: torch.Tensor, x: torch.Tensor, wa: torch.Tensor, wr: torch.Tensor,
                       we: torch.Tensor, prev_x: torch.Tensor | None, prev_wa: torch.Tensor | None,
                       scales: GuidanceScales) -> torch.Tensor:
        """Classifier-free guided velocity (see :func:`omniflow.flow.guidance.guided_velocity`).

        The branches that the scales need are stacked along the batch and run in one forward.
        """
        t = torch.as_tensor(t, device=x.device)

        def run_branches(branches: dict[str, dict[str, bool]]) -> dict[str, torch.Tensor]:
            k = len(branches)
            stacked = {name: torch.cat([value if keep[name] else torch.zeros_like(value) for keep in branches.values()])
                       for name, value in (("wa", wa), ("wr", wr), ("we", we))}
            repeat = lambda v: None if v is None else v.repeat(k, 1, 1)
            out = self(t.reshape(-1).repeat(k) if t.numel() > 1 else t, repeat(x), stacked["wa"], stacked["wr"],
                       stacked["we"], repeat(prev_x), repeat(prev_wa))
            return dict(zip(branches, out.chunk(k)))

        return guided_velocity(run_branches, scales)

    @torch.no_grad()
    def sample(self, wa: torch.Tensor, wr: torch.Tensor, we: torch.Tensor, sampler: FlowSampler,
               scales: GuidanceScales, seed: int | None = None, repeat_window_noise: bool = False) -> torch.Tensor:
        """Motion latents (B, T, dim_w) for the audio condition wa (B, T, dim_a), reference motion
        wr (B, dim_w) and emotion we (B, 1, dim_e), generated window by window with guidance
        (see :func:`omniflow.flow.sample_in_windows` for ``seed`` / ``repeat_window_noise``)."""

        def field(t, x, wa_window, prev_x, prev_wa):
            return self.forward_guided(t, x, wa_window, wr, we, prev_x, prev_wa, scales)

        return sample_in_windows(sampler, field, wa, window=self.seq_len - self.num_prev_frames,
                                 num_prev=self.num_prev_frames, latent_dim=self.config.dim_w, seed=seed,
                                 repeat_window_noise=repeat_window_noise)

    def training_loss(self, flow: RectifiedFlow, dropout: ConditionDropout, x1: torch.Tensor, wa: torch.Tensor,
                      wr: torch.Tensor, we: torch.Tensor, prev_x: torch.Tensor, prev_wa: torch.Tensor,
                      generator: Generators = None) -> FlowLoss:
        """Rectified-flow loss on a window of motion latents ``x1`` (B, L, dim_w).

        Draws t and noise, drops conditions per sample, and scores the velocity of the window
        frames only (the previous frames, zeros at a clip start, are conditioning).
        """
        draw = flow.draw(x1, generator=generator)
        conditions, _ = dropout({"wa": wa, "wr": wr, "we": we, "prev_x": prev_x, "prev_wa": prev_wa},
                                generator=generator)
        velocity = self(draw.t, draw.xt, **conditions)[:, prev_x.shape[1]:]
        return flow.loss(velocity, draw.target)
