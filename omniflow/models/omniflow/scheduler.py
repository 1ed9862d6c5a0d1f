"""Flow-match Euler scheduler with a timestep shift (the schedule OmniFlow and SD3 sample with).

Conventions: ``x_t = sigma * noise + (1 - sigma) * x0`` and ``t = 1000 * sigma`` (t = 1000 is pure noise).
The released ``scheduler/scheduler_config.json`` (``num_train_timesteps``, ``shift``) loads with
:meth:`FlowMatchEulerScheduler.from_pretrained`. Unlike diffusers' scheduler, stepping takes the step
index explicitly, so one scheduler can drive several sampling loops at once.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ...runtime.noise import Generators, per_row


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution shift: ``shift * s / (1 + (shift - 1) * s)``; pushes the schedule towards noise for shift > 1."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FlowMatchEulerScheduler(SchedulerMixin, ConfigMixin):
    """Euler sampler for rectified-flow models; ``set_timesteps`` matches diffusers' SD3 schedule."""

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 3.0):
        self.timesteps, self.sigmas = self.train_table()

    def train_table(self, shift: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``num_train_timesteps`` training (timesteps, sigmas), from t=1000 down, shifted by ``shift``.

        OmniFlow trained with shift 1 (``sigma = t / 1000``); the config's shift (3) is for sampling.
        """
        n = self.config.num_train_timesteps
        steps = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy())
        sigmas = shift_sigmas(steps / n, self.config.shift if shift is None else shift)
        return sigmas * n, sigmas

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Sets ``timesteps`` (``num_inference_steps``) and ``sigmas`` (one more, ending at 0) for sampling.

        The endpoints are the shifted training table's; the linear spacing between them is shifted again,
        as diffusers' SD3 scheduler does (hence a last sigma of 0.0089 for 4 steps, not 0.0030).
        """
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        n = self.config.num_train_timesteps
        _, train_sigmas = self.train_table()
        spaced = np.linspace(train_sigmas[0].item() * n, train_sigmas[-1].item() * n, num_inference_steps) / n
        sigmas = torch.from_numpy(shift_sigmas(spaced, self.config.shift)).to(torch.float32)
        self.timesteps = (sigmas * n).to(device)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)]).to(device)

    def sample_train_timesteps(self, batch_size: int, generator: Generators = None, shift: float = 1.0) -> torch.Tensor:
        """Draws ``batch_size`` training timesteps uniformly from the table shifted by ``shift`` (default 1);
        ``generator`` may be one per timestep."""
        timesteps, _ = self.train_table(shift)
        index = per_row(lambda shape, g: torch.randint(0, len(timesteps), shape, generator=g), (batch_size,), generator)
        return timesteps[index]

    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``sigma * noise + (1 - sigma) * x0``; ``sigma`` is per sample ([B]) or a scalar."""
        sigma = _per_sample(sigma, x0)
        return sigma * noise + (1.0 - sigma) * x0

    @staticmethod
    def velocity_from_x0(sample: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """The velocity ``(x_t - x0) / sigma`` implied by an x0 prediction, in fp32."""
        return (sample.float() - x0.float()) / _per_sample(torch.as_tensor(sigma), sample).float()

    def step(self, velocity: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """One Euler step from ``sigmas[step_index]`` to ``sigmas[step_index + 1]``, computed in fp32."""
        d_sigma = self.sigmas[step_index + 1] - self.sigmas[step_index]
        return sample.float() + velocity.float() * d_sigma.to(sample.device)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshapes a scalar or [B] sigma to broadcast over ``like`` ([B, ...])."""
    sigma = sigma.to(like.device)
    return sigma.reshape(-1, *([1] * (like.ndim - 1))) if sigma.ndim else sigma
