"""Tiny real diffusers VAEs saved to disk, and real sample photos, for the alignment tests."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from omniflow.data.images import write_sample_images

RESOLUTION = 32  # tiny VAEs downsample by 2, so latents are 16x16


def save_tiny_vae(folder: Path, latent_channels: int, seed: int, **config) -> Path:
    """Save a random two-block AutoencoderKL (downsample factor 2) under ``folder/vae``."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                        latent_channels=latent_channels, sample_size=RESOLUTION, **config)
    vae.save_pretrained(folder / "vae")
    return folder


@pytest.fixture(scope="session")
def vae_dirs(tmp_path_factory) -> dict[str, Path]:
    """vae1: 4 channels, scale only; vae2: 16 channels with a FLUX-style shift_factor."""
    root = tmp_path_factory.mktemp("vaes")
    return {"vae1": save_tiny_vae(root / "vae_a", 4, seed=0, scaling_factor=0.5),
            "vae2": save_tiny_vae(root / "vae_b", 16, seed=1, scaling_factor=1.5, shift_factor=0.1)}


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    write_sample_images(folder, RESOLUTION, 8)
    return folder
