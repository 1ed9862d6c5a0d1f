"""Classifier-free guidance over three conditions: audio, emotion and reference.

Branches (each is one velocity-field forward; other inputs such as previous frames stay):

* ``full``        audio, emotion and reference
* ``audio_only``  audio and reference, emotion zeroed
* ``uncond``      reference only, audio and emotion zeroed
* ``no_ref``      audio and emotion, reference zeroed

Guided velocity, with scales a (audio), e (emotion), r (reference)::

    v = uncond + a * (audio_only - uncond) + e * (full - audio_only) + (r - 1) * (full - no_ref)

The first three terms are FLOAT's incremental audio/emotion guidance. The last term is
guidance on the reference: r = 1 leaves it out, r > 1 pushes the motion towards what the
reference condition explains (training drops the reference with probability 0.1, so the model
learns the ``no_ref`` field). In the public FLOAT code ``r_cfg_scale`` only switched guidance
on and never dropped the reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

BRANCH_CONDITIONS: dict[str, dict[str, bool]] = {
    "full": {"wa": True, "wr": True, "we": True},
    "audio_only": {"wa": True, "wr": True, "we": False},
    "uncond": {"wa": False, "wr": True, "we": False},
    "no_ref": {"wa": True, "wr": False, "we": True},
}


@dataclass(frozen=True)
class GuidanceScales:
    audio: float = 2.0
    emotion: float = 1.0
    reference: float = 1.0

    def coefficients(self) -> dict[str, float]:
        """Weight of each branch in the guided velocity; branches with weight 0 are not run."""
        a, e, r = self.audio, self.emotion, self.reference
        weights = {"uncond": 1.0 - a, "audio_only": a - e, "full": e + r - 1.0, "no_ref": 1.0 - r}
        return {name: w for name, w in weights.items() if w != 0.0}


def guided_velocity(run_branches: Callable[[dict[str, dict[str, bool]]], dict[str, torch.Tensor]],
                    scales: GuidanceScales) -> torch.Tensor:
    """Combine branch velocities. ``run_branches`` maps {branch: which conditions to keep} to
    {branch: velocity}; it is called once with only the branches the scales need."""
    weights = scales.coefficients()  # never empty: the four weights cannot all vanish
    outputs = run_branches({name: BRANCH_CONDITIONS[name] for name in weights})
    return sum(w * outputs[name] for name, w in weights.items())
