"""Rectified flow (flow matching on straight paths) and per-sample condition dropout.

Convention (as FLOAT): x0 is noise at t = 0, x1 is data at t = 1,
``x_t = (1 - t) * x0 + t * x1`` and the target velocity is ``x1 - x0``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from ..runtime.noise import Generators, per_row

LOSS_TYPES = ("mse", "l1")
TIME_SAMPLINGS = ("uniform", "logit_normal")


@dataclass
class FlowSample:
    """One training draw: time, noise, interpolated point and target velocity."""
    t: torch.Tensor       # (B,)
    x0: torch.Tensor      # noise, shaped like x1
    xt: torch.Tensor      # (1 - t) x0 + t x1
    target: torch.Tensor  # x1 - x0


@dataclass
class FlowLoss:
    total: torch.Tensor
    flow: torch.Tensor      # distance between predicted and target velocity
    velocity: torch.Tensor  # distance between their frame-to-frame differences


def _broadcast_time(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class RectifiedFlow:
    """Time sampling, interpolation, target and loss of rectified-flow training.

    loss_type: ``mse`` or ``l1``. time_sampling: ``uniform`` on [0, 1] or ``logit_normal``
    (t = sigmoid(n), n ~ N(logit_mean, logit_std^2), which favours the middle of the path).
    velocity_weight: weight of the loss on frame differences (dim ``frame_dim``), which makes
    the predicted motion change from frame to frame like the target does.
    """

    def __init__(self, loss_type: str = "mse", time_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0, velocity_weight: float = 1.0, frame_dim: int = 1):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {loss_type!r} is not one of {LOSS_TYPES}")
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling {time_sampling!r} is not one of {TIME_SAMPLINGS}")
        if logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        self.loss_type, self.time_sampling = loss_type, time_sampling
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.velocity_weight, self.frame_dim = velocity_weight, frame_dim

    def sample_time(self, batch: int, device=None, generator: Generators = None) -> torch.Tensor:
        draw = torch.rand if self.time_sampling == "uniform" else torch.randn
        t = per_row(lambda shape, g: draw(shape, device=device, generator=g), (batch,), generator)
        return t if self.time_sampling == "uniform" else torch.sigmoid(t * self.logit_std + self.logit_mean)

    @staticmethod
    def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = _broadcast_time(t, x1)
        return (1 - t) * x0 + t * x1

    @staticmethod
    def target(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        return x1 - x0

    def draw(self, x1: torch.Tensor, generator: Generators = None) -> FlowSample:
        """Noise, time, x_t and target for a batch of data ``x1`` (batch first); ``generator`` may be one per sample."""
        t = self.sample_time(x1.shape[0], device=x1.device, generator=generator)
        x0 = per_row(lambda shape, g: torch.randn(shape, device=x1.device, generator=g), x1.shape,
                     generator).to(x1.dtype)
        return FlowSample(t=t, x0=x0, xt=self.interpolate(x0, x1, t), target=self.target(x0, x1))

    def _distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(a, b) if self.loss_type == "mse" else F.l1_loss(a, b)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> FlowLoss:
        """Loss of a predicted velocity against ``x1 - x0`` (same shape, frames on ``frame_dim``)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        flow = self._distance(pred.float(), target.float())
        if self.velocity_weight == 0 or pred.shape[self.frame_dim] < 2:
            velocity = flow.new_zeros(())
        else:
            velocity = self._distance(frame_differences(pred.float(), self.frame_dim),
                                      frame_differences(target.float(), self.frame_dim))
        return FlowLoss(total=flow + self.velocity_weight * velocity, flow=flow, velocity=velocity)


def frame_differences(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """x[t+1] - x[t] along ``dim``."""
    return x.diff(dim=dim)


class ConditionDropout:
    """Drops whole conditions of random batch rows (sets them to zero), out of place.

    ``probs`` maps condition names to drop probabilities; one ``torch.rand(B)`` is drawn per
    present condition, in the mapping's order. FLOAT's order and values come from
    :meth:`for_float`: audio, reference, emotion 0.1; previous frames and previous audio 0.5,
    drawn independently.
    """

    def __init__(self, probs: Mapping[str, float]):
        bad = {k: p for k, p in probs.items() if not 0.0 <= p <= 1.0}
        if bad:
            raise ValueError(f"condition dropout probabilities must be in [0, 1]: {bad}")
        self.probs = dict(probs)

    @classmethod
    def for_float(cls, audio: float = 0.1, reference: float = 0.1, emotion: float = 0.1,
                  previous: float = 0.5) -> "ConditionDropout":
        return cls({"wa": audio, "wr": reference, "we": emotion, "prev_x": previous, "prev_wa": previous})

    def __call__(self, conditions: Mapping[str, torch.Tensor | None], generator: Generators = None
                 ) -> tuple[dict[str, torch.Tensor | None], dict[str, torch.Tensor]]:
        """Return (conditions with dropped rows zeroed, {name: bool mask of dropped rows})."""
        out = dict(conditions)
        masks = {}
        for name, p in self.probs.items():
            value = conditions.get(name)
            if value is None:
                continue
            drop = per_row(lambda shape, g: torch.rand(shape, device=value.device, generator=g), value.shape[:1],
                           generator) < p
            rows = drop.reshape(-1, *([1] * (value.dim() - 1)))
            out[name] = torch.where(rows, torch.zeros_like(value), value)
            masks[name] = drop
        return out, masks
