"""ODE sampling of a rectified flow with torchdiffeq, and window-by-window generation of long
sequences (each window continues from the last frames of the previous one)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torchdiffeq import odeint

from ..runtime.errors import ConfigError

# velocity evaluations per step of the fixed-grid torchdiffeq solvers
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "rk4": 4}
ADAPTIVE_METHODS = ("dopri5",)
METHODS = tuple(EVALS_PER_STEP) + ADAPTIVE_METHODS

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SamplerConfigError(ConfigError):
    """An ODE method or evaluation budget the sampler cannot honour."""


@dataclass(frozen=True)
class FlowSampler:
    """Integrates dx/dt = v(t, x) from t = 0 (noise) to t = 1 (data).

    Fixed-grid methods take ``nfe // evals_per_step`` equal steps, so ``euler`` evaluates the
    field exactly ``nfe`` times, ``midpoint`` twice and ``rk4`` four times per step (an
    ``nfe`` that is not a multiple of the step cost is rounded down). ``dopri5`` chooses its
    steps from ``atol``/``rtol`` and ignores ``nfe``. A guided evaluation counts once even
    when it batches several condition branches.
    """

    method: str = "euler"
    nfe: int = 10
    atol: float = 1e-5
    rtol: float = 1e-5

    def __post_init__(self):
        if self.method not in METHODS:
            raise SamplerConfigError(f"unknown ODE method {self.method!r}; choose from {METHODS}")
        if self.method in EVALS_PER_STEP and self.nfe < EVALS_PER_STEP[self.method]:
            raise SamplerConfigError(f"nfe={self.nfe} is below one {self.method} step "
                                     f"({EVALS_PER_STEP[self.method]} evaluations)")

    @property
    def num_steps(self) -> int | None:
        """Steps of a fixed-grid method; None for adaptive methods."""
        if self.method in ADAPTIVE_METHODS:
            return None
        return self.nfe // EVALS_PER_STEP[self.method]

    def time_grid(self, device=None, dtype=torch.float32) -> torch.Tensor:
        steps = self.num_steps or 1
        return torch.linspace(0, 1, steps + 1, device=device, dtype=dtype)

    def solve(self, velocity: Velocity, x0: torch.Tensor, return_trajectory: bool = False) -> torch.Tensor:
        """x at t = 1, or the states at every grid time (steps + 1, *x0.shape) when asked."""
        grid = self.time_grid(x0.device, x0.dtype)
        kwargs = {"atol": self.atol, "rtol": self.rtol} if self.method in ADAPTIVE_METHODS else {}
        trajectory = odeint(velocity, x0, grid, method=self.method, **kwargs)
        return trajectory if return_trajectory else trajectory[-1]


WindowField = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sample_in_windows(
    sampler: FlowSampler,
    field: WindowField,
    cond: torch.Tensor,
    *,
    window: int,
    num_prev: int,
    latent_dim: int,
    seed: int | None = None,
    repeat_window_noise: bool = False,
) -> torch.Tensor:
    """Generate a (B, T, latent_dim) sequence for a per-frame condition ``cond`` (B, T, C).

    Window k covers frames [kL, (k+1)L); its condition is right-padded by repeating the last
    frame. ``field(t, x, cond_window, prev_x, prev_cond)`` returns the velocity of all
    ``num_prev + window`` frames; the previous-frame part is dropped. Window 0 starts from zero
    previous frames; window k > 0 continues from the last ``num_prev`` sampled frames and
    condition frames of window k - 1.

    Noise: from the global RNG when ``seed`` is None, else from a generator seeded once (fresh
    noise per window). ``repeat_window_noise`` re-seeds it for every window, reproducing the
    public FLOAT code, where every window starts from the same noise.
    """
    if not 0 <= num_prev <= window:
        raise SamplerConfigError(f"num_prev={num_prev} must be between 0 and the window length {window}")
    b, total, _ = cond.shape
    device = cond.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device).manual_seed(seed)
    prev_x = cond.new_zeros(b, num_prev, latent_dim)
    prev_cond = cond.new_zeros(b, num_prev, cond.shape[-1])
    pieces = []
    for k in range(math.ceil(total / window)):
        if generator is not None and repeat_window_noise:
            generator.manual_seed(seed)
        x0 = torch.randn(b, window, latent_dim, device=device, generator=generator).to(cond.dtype)
        chunk = cond[:, k * window:(k + 1) * window]
        if chunk.shape[1] < window:
            chunk = F.pad(chunk.transpose(1, 2), (0, window - chunk.shape[1]), mode="replicate").transpose(1, 2)

        def velocity(t, x, chunk=chunk, prev_x=prev_x, prev_cond=prev_cond):
            return field(t, x, chunk, prev_x, prev_cond)[:, num_prev:]

        sample = sampler.solve(velocity, x0)
        pieces.append(sample)
        prev_x, prev_cond = sample[:, window - num_prev:], chunk[:, window - num_prev:]
    return torch.cat(pieces, dim=1)[:, :total]
