"""Parity with goldens that reference code computed in float32, within a measured float32 noise.

Some outputs amplify rounding errors: FLOAT's motion decoder samples a rough 128 px feature
map with a predicted flow, so a 1e-7 change of its latent moves the image by ~1e-3, and the
conv kernels a CPU picks (AVX2, AVX-512, AMX, the thread count) move it just as much. A
fixed tolerance then passes or fails by luck. Instead:

- our model runs in float64: close to the exact function and to the same result on every
  machine (the few steps kept in float32 as released, such as the QR of FLOAT's motion basis
  or the text decoder's logits, move it by far less than the bounds below);
- its float32 noise is measured: how far that float64 output moves when every float input
  and parameter is multiplied by (1 + ULP * N(0, 1)), in ``DRAWS`` seeded draws (float64 too,
  so the bound is the same on every machine). One ulp per value models float32 rounding: for
  FLOAT's motion decoder and end-to-end outputs, over nine kernel variants (oneDNN ISA
  AVX-512 / AVX2 / SSE4.1, oneDNN off, ATen capability AVX-512 / AVX2 / scalar, 1 or 2
  threads) and the goldens themselves, the float32 error reached at most 2.0x this spread in
  rms and 2.4x in max abs (for any of four disjoint seed pairs); for the wav2vec2 features and
  OmniFlow's text decoder at most 1.5x;
- the golden, and our own float32 run, must each lie within a multiple of that noise of the
  float64 output, in rms (a stable statistic that catches a defect spread over the output)
  and in max abs (heavy-tailed, the largest error varies ~2.5x between draws; it catches a
  local defect).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Mapping

import torch
from torch import nn

ULP = 2.0 ** -23  # float32 machine epsilon
DRAWS = 2
RMS_FACTOR = 5  # 2.5x the largest measured ratio of float32 error to the spread (1.99)
MAX_FACTOR = 8  # 3.4x the largest measured ratio (2.35)

Outputs = Mapping[str, torch.Tensor]
Run = Callable[[nn.Module, Mapping[str, object]], Outputs]


def _is_float(value) -> bool:
    return torch.is_tensor(value) and value.is_floating_point()


def _cast(inputs: Mapping[str, object], dtype: torch.dtype) -> dict[str, object]:
    return {k: v.to(dtype) if _is_float(v) else v for k, v in inputs.items()}


def _jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x * (1 + ULP * torch.randn(x.shape, generator=generator, dtype=x.dtype))


@contextlib.contextmanager
def _perturbed_parameters(model: nn.Module, generator: torch.Generator):
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(_jitter(p, generator))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(model.parameters(), saved):
                p.copy_(value)


@contextlib.contextmanager
def _one_thread():
    """Float64 convs have no oneDNN kernels and run one tiny parallel region per channel group: with
    2 threads on a busy 2-core machine they ran 25-40x slower than with one. Their result (and so
    the bound) does not depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


def fp32_noise(run: Run, model64: nn.Module, inputs64: Mapping[str, object], exact: Outputs,
               keys: list[str]) -> dict[str, tuple[float, float]]:
    """(max abs, rms) per output key: the largest move of ``exact`` over the perturbed draws."""
    noise = {k: (0.0, 0.0) for k in keys}
    for draw in range(DRAWS):
        generator = torch.Generator().manual_seed(draw)
        with _perturbed_parameters(model64, generator):
            moved = run(model64, {k: _jitter(v, generator) if _is_float(v) else v for k, v in inputs64.items()})
        for k in keys:
            delta = moved[k] - exact[k]
            noise[k] = (max(noise[k][0], delta.abs().max().item()), max(noise[k][1], _rms(delta)))
    return noise


@torch.no_grad()
def assert_within_fp32_noise(run: Run, model32: nn.Module, model64: nn.Module, inputs: Mapping[str, object],
                             goldens: Outputs) -> dict[str, torch.Tensor]:
    """``run(model, inputs)`` returns outputs keyed like ``goldens`` (and possibly more). The
    goldens and our float32 outputs must lie within the measured float32 noise of our float64
    outputs. ``model64`` is a float64 copy of ``model32``. Returns our float32 outputs."""
    inputs64 = _cast(inputs, torch.float64)
    ours = run(model32, inputs)
    with _one_thread():
        exact = run(model64, inputs64)
        noise = fp32_noise(run, model64, inputs64, exact, list(goldens))
    failures = []
    for key, golden in goldens.items():
        bound_max, bound_rms = MAX_FACTOR * noise[key][0], RMS_FACTOR * noise[key][1]
        for what, value in (("golden", golden), ("our float32", ours[key])):
            assert value.shape == exact[key].shape, (f"{key}: {what} shape {tuple(value.shape)}, "
                                                     f"float64 {tuple(exact[key].shape)}")
            diff = value.double() - exact[key].double()
            max_abs, rms = diff.abs().max().item(), _rms(diff)
            if max_abs > bound_max or rms > bound_rms:
                failures.append(f"{key}: {what} vs our float64: max abs diff {max_abs:.2e} (bound {bound_max:.2e}), "
                                f"rms {rms:.2e} (bound {bound_rms:.2e})")
    assert not failures, "\n".join(failures)
    return ours
