"""StyleGAN2-style building blocks of the FLOAT motion auto-encoder.

Parameter names and shapes follow the released checkpoint. Filter kernels are rebuilt from the
constructor arguments, so they are non-persistent buffers and never part of a state dict.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BLUR_KERNEL = (1, 3, 3, 1)
SQRT2 = math.sqrt(2.0)


def blur_kernel_2d(taps=BLUR_KERNEL) -> torch.Tensor:
    k = torch.tensor(taps, dtype=torch.float32)
    k = torch.outer(k, k)
    return k / k.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad=(0, 0)) -> torch.Tensor:
    """Zero-insert upsampling by ``up``, padding, FIR filtering (true convolution), then decimation."""
    b, c, h, w = x.shape
    if up > 1:
        stuffed = x.new_zeros(b, c, h, up, w, up)
        stuffed[:, :, :, 0, :, 0] = x
        x = stuffed.view(b, c, h * up, w * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    # every channel filtered on its own (a depthwise conv: the release's per-channel arithmetic,
    # several times faster than its reshape to b*c single-channel images)
    weight = kernel.flip(0, 1).to(x.dtype).expand(c, 1, *kernel.shape).contiguous()
    return F.conv2d(x, weight, stride=down, groups=c)


class Blur(nn.Module):
    def __init__(self, pad: tuple[int, int], gain: float = 1.0):
        super().__init__()
        self.register_buffer("kernel", blur_kernel_2d() * gain, persistent=False)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """2x upsampling with the blur kernel (used on the RGB / flow skip paths)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kernel", blur_kernel_2d() * 4, persistent=False)
        p = len(BLUR_KERNEL) - 2
        self.pad = ((p + 1) // 2 + 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=2, pad=self.pad)


class EqualConv2d(nn.Module):
    """Conv with weights scaled at run time by 1/sqrt(fan_in) (equalised learning rate)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.scale = 1 / math.sqrt(in_ch * kernel ** 2)
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding)


class EqualLinear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = 1 / math.sqrt(in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class FusedLeakyReLU(nn.Module):
    """leaky_relu(x + bias, 0.2) * sqrt(2), with a per-channel bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.bias, 0.2) * SQRT2


class ConvLayer(nn.Sequential):
    """[blur + stride-2] conv, then (if ``activate``) a biased leaky ReLU. The conv has no bias."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, downsample: bool = False, activate: bool = True):
        layers: list[nn.Module] = []
        if downsample:
            p = (len(BLUR_KERNEL) - 2) + (kernel - 1)
            layers.append(Blur(((p + 1) // 2, p // 2)))
            layers.append(EqualConv2d(in_ch, out_ch, kernel, stride=2, padding=0, bias=False))
        else:
            layers.append(EqualConv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False))
        if activate:
            layers.append(FusedLeakyReLU(out_ch))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """Halves the resolution: two 3x3 convs plus a 1x1 skip, summed and scaled by 1/sqrt(2)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = ConvLayer(in_ch, in_ch, 3)
        self.conv2 = ConvLayer(in_ch, out_ch, 3, downsample=True)
        self.skip = ConvLayer(in_ch, out_ch, 1, downsample=True, activate=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / SQRT2


class ModulatedConv2d(nn.Module):
    """Style-modulated conv (per-sample weights via grouped conv); optional 2x transposed upsampling."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel, kernel))
        self.modulation = EqualLinear(style_dim, in_ch, bias_init=1.0)
        self.scale = 1 / math.sqrt(in_ch * kernel ** 2)
        self.demodulate, self.upsample = demodulate, upsample
        self.in_ch, self.out_ch, self.kernel = in_ch, out_ch, kernel
        if upsample:
            p = (len(BLUR_KERNEL) - 2) - (kernel - 1)
            self.blur = Blur(((p + 1) // 2 + 1, p // 2 + 1), gain=4.0)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        weight = self.scale * self.weight * self.modulation(style).view(b, 1, c, 1, 1)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(b, self.out_ch, 1, 1, 1)
        x = x.reshape(1, b * c, h, w)
        k = self.kernel
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(b * c, self.out_ch, k, k)
            out = F.conv_transpose2d(x, weight, stride=2, groups=b)
            return self.blur(out.view(b, self.out_ch, *out.shape[-2:]))
        out = F.conv2d(x, weight.reshape(b * self.out_ch, c, k, k), padding=k // 2, groups=b)
        return out.view(b, self.out_ch, *out.shape[-2:])


class NoiseInjection(nn.Module):
    """Adds ``weight * noise`` when noise is given (FLOAT never passes noise)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return x if noise is None else x + self.weight * noise


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


class StyledConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: int, style_dim: int, upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, kernel, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_ch)

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, style), noise))


class ToRGB(nn.Module):
    """1x1 conv + leaky ReLU + bias to RGB, plus the upsampled RGB of the previous level."""

    def __init__(self, in_ch: int, upsample: bool = True):
        super().__init__()
        if upsample:
            self.upsample = Upsample()
        self.conv = ConvLayer(in_ch, 3, 1)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x) + self.bias
        return out if skip is None else out + self.upsample(skip)


def identity_grid(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(size, size, 2) grid of corner-aligned coordinates in [-1, 1], x first (as released)."""
    xs = torch.linspace(-1, 1, size, dtype=torch.float64)
    ys, xx = torch.meshgrid(xs, xs, indexing="ij")
    return torch.stack([xx, ys], dim=-1).to(dtype=dtype, device=device)


class ToFlow(nn.Module):
    """Predicts a warp (2-channel offset + occlusion mask) and applies it to an encoder feature.

    Returns (warped feature, warped + unoccluded decoder feature, raw 3-channel output, grid).
    The base grid is corner-aligned while ``grid_sample`` uses ``align_corners=False``: this
    half-pixel offset is what the released weights were trained with, so it is kept.
    """

    def __init__(self, in_ch: int, style_dim: int, upsample: bool = True):
        super().__init__()
        if upsample:
            self.upsample = Upsample()
        self.conv = ModulatedConv2d(in_ch, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, feat: torch.Tensor, skip: torch.Tensor | None = None):
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        offset = torch.tanh(out[:, 0:2]).permute(0, 2, 3, 1)
        mask = torch.sigmoid(out[:, 2:3])
        grid = offset + identity_grid(x.shape[-1], x.dtype, x.device)
        warped = F.grid_sample(feat, grid, align_corners=False) * mask
        return warped, warped + x * (1.0 - mask), out, grid
