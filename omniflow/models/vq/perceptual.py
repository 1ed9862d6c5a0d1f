"""LPIPS perceptual distance with an explicit choice of where the backbone weights come from.

The LPIPS linear heads ship inside the ``lpips`` wheel; the ImageNet VGG/AlexNet backbone is
a torchvision download. Sources, in order: ``weights_path`` (a torchvision state dict,
``.pth`` or ``.safetensors``), the torch hub cache, the standard download. Offline with none
of these, the backbone stays random and one warning line says so: the values are then not
LPIPS, only a deterministic feature distance (fine for tests, wrong for reported metrics).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import lpips
import torch
import torchvision

from omniflow.runtime.weights import read_weights_file

log = logging.getLogger(__name__)

BACKBONE_URLS = {
    "vgg": torchvision.models.VGG16_Weights.IMAGENET1K_V1.url,
    "alex": torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url,
}


class PerceptualWeightsError(FileNotFoundError):
    """LPIPS backbone weights are missing, unreadable or do not fit the network."""


def _offline_from_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def cached_backbone_path(net: str) -> Path:
    """Where the standard download of ``net``'s backbone lands (torch hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(BACKBONE_URLS[net]).name


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PerceptualWeightsError(f"LPIPS backbone weights not found: {path}")
    state = read_weights_file(path)
    if not isinstance(state, dict):
        raise PerceptualWeightsError(f"LPIPS backbone weights {path} hold a {type(state).__name__}, not a state dict")
    return state


def _install_backbone(model: lpips.LPIPS, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy torchvision ``features.<i>.*`` tensors into lpips' slices (which keep the index names)."""
    for slice_module in model.net.children():
        for index, layer in slice_module.named_children():
            wanted = {name: f"features.{index}.{name}" for name, _ in layer.named_parameters()}
            missing = [key for key in wanted.values() if key not in state]
            if missing:
                raise PerceptualWeightsError(f"LPIPS backbone weights {source} lack {missing[0]!r}")
            try:
                layer.load_state_dict({name: state[key] for name, key in wanted.items()})
            except RuntimeError as err:
                raise PerceptualWeightsError(f"LPIPS backbone weights {source} do not fit layer {index}: {err}") from err


def build_lpips(net: str = "vgg", weights_path: str | os.PathLike | None = None,
                offline: bool | None = None) -> lpips.LPIPS:
    """Frozen LPIPS in eval mode; inputs in [-1, 1]. ``random_backbone`` tells how it was built.

    ``offline`` defaults to ``HF_HUB_OFFLINE``; only offline may the backbone stay random.
    """
    if net not in BACKBONE_URLS:
        raise ValueError(f"LPIPS net must be one of {sorted(BACKBONE_URLS)}, got {net!r}")
    offline = _offline_from_env() if offline is None else offline
    state, source = None, ""
    if weights_path is not None:
        source = str(weights_path)
        state = _read_state_dict(Path(weights_path))
    elif cached_backbone_path(net).is_file():
        source = str(cached_backbone_path(net))
        state = _read_state_dict(cached_backbone_path(net))
    elif offline:
        log.warning("LPIPS: no %s ImageNet backbone (pass weights_path or put %s in place); using a RANDOM "
                    "backbone, so perceptual values are not LPIPS", net, cached_backbone_path(net))
    else:
        source = BACKBONE_URLS[net]
        try:
            state = torch.hub.load_state_dict_from_url(source, map_location="cpu", weights_only=True, progress=False)
        except Exception as err:  # network errors come in many types; all mean the same to the user
            raise PerceptualWeightsError(
                f"cannot download the LPIPS {net} backbone from {source} ({err}); pass weights_path or copy the "
                f"file to {cached_backbone_path(net)}") from err
    with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    if state is not None:
        _install_backbone(model, state, source)
    model.random_backbone = state is None
    return model.eval().requires_grad_(False)
