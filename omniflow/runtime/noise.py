"""Random draws with one generator per sample, so that validation does not depend on batching.

Validation draws its noise (flow times, noise, absent streams) per sample, from a generator seeded
by (seed, sample index): what it reports is then the same whatever the batch size and however many
processes share the set. The draws here take ``generator`` as torch does (None: the global RNG, or
one ``torch.Generator``) or, like diffusers' ``randn_tensor``, a list of one generator per row.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def sample_generators(seed: int, indices: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample, seeded by ``(seed, index)`` (ints hash the same in every process)."""
    return [torch.Generator(device).manual_seed(hash((seed, int(i))) % 2**63) for i in indices]


def per_row(draw: Callable[[tuple, torch.Generator | None], torch.Tensor], shape: Sequence[int],
            generator: Generators) -> torch.Tensor:
    """``draw(shape, generator)``, or with a list of generators row i drawn by ``draw`` from generator i."""
    if generator is None or isinstance(generator, torch.Generator):
        return draw(tuple(shape), generator)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for {shape[0]} rows")
    return torch.cat([draw((1, *shape[1:]), g) for g in generator])


def rows_of(generator: Generators, rows: Sequence[int]) -> Generators:
    """The generators of ``rows`` (one generator, or the global RNG, serves all rows)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return [generator[i] for i in rows]


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian noise drawn on the generators' device (a CPU generator serves a GPU model), moved to ``device``."""
    def draw(size: tuple, g: torch.Generator | None) -> torch.Tensor:
        return torch.randn(size, generator=g, device=g.device if g is not None else device, dtype=torch.float32)

    return per_row(draw, shape, generator).to(device, dtype)
