"""Shared helpers for the OmniFlow tests: fixture paths, golden loading, reference-model loading."""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from transformers import AutoConfig, T5Config, T5EncoderModel

from omniflow.models.omniflow.checkpoint import load_omniflow_weights
from omniflow.models.omniflow.loading import OmniFlowComponents, load_omniflow
from omniflow.models.omniflow.text_vae import OmniFlowTextVAE
from omniflow.models.omniflow.tiny import TinyOmniFlow, TinyPaths, build_tiny_omniflow, save_tiny_omniflow
from omniflow.models.omniflow.transformer import OmniFlowTransformer

FIXTURES = Path(__file__).parent / "fixtures" / "omniflow"
TINY_RELEASE = FIXTURES / "tiny_release"
# The shared reference folder (with the original .bin) exists on dev machines; tests that need it skip elsewhere.
REFERENCE_DIR = Path(os.environ.get("OMNIFLOW_REFERENCE_DIR", "/work/shared/omniflow_reference"))
# Fixed tolerance where the measured float32 sensitivity S (parity_helpers) is at most 1/8 of atol + rtol * |golden|
# (see float_helpers.ATOL): at most 0.10 of it for the transformer outputs and intermediates and the text encoding;
# 0.18-0.32 for the text decoder's final hidden states and logits, compared within their measured noise instead.
ATOL, RTOL = 1e-5, 1e-4


def load_goldens(name: str) -> dict[str, torch.Tensor]:
    """A packed golden file with its aliases expanded (see fixtures/omniflow/pack_goldens.py)."""
    with safe_open(FIXTURES / f"{name}.safetensors", framework="pt") as handle:
        goldens = {k: handle.get_tensor(k) for k in handle.keys()}
        aliases = json.loads(handle.metadata()["aliases"])
    for key, (twin, dtype) in aliases.items():
        goldens[key] = goldens[twin].to(getattr(torch, dtype))
    return goldens


def golden_meta() -> dict:
    return json.loads((FIXTURES / "golden_meta.json").read_text())


def reference_models(with_t5: bool = True, folder: Path = TINY_RELEASE / "transformer"):
    """The reference tiny checkpoint loaded strictly into our transformer and text VAE (fp32, eval).

    With ``with_t5`` a T5 encoder built from the stand-in's config is attached, so the checkpoint's
    ``text_decoder.encoder.*`` copy fills it."""
    with init_empty_weights():
        transformer = OmniFlowTransformer.from_transformer_config(OmniFlowTransformer.load_config(folder), 64)
        text_vae = OmniFlowTextVAE(AutoConfig.from_pretrained(TINY_RELEASE / "text_vae"))
        if with_t5:
            text_vae.attach_encoder(T5EncoderModel(T5Config.from_pretrained(FIXTURES / "flan_t5_encoder")))
    report = load_omniflow_weights(folder, transformer, text_vae)
    return transformer.eval(), text_vae.eval(), report


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual is not None, f"{what}: got None"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


@functools.lru_cache(maxsize=None)
def tiny_build() -> TinyOmniFlow:
    """The tiny OmniFlow (built once per test session; do not modify it in place)."""
    return build_tiny_omniflow(seed=0)


@functools.lru_cache(maxsize=None)
def tiny_saved(weights: str = "safetensors") -> TinyPaths:
    """``tiny_build()`` saved in the released layout (with an EMA file) in a session temp folder."""
    out = Path(tempfile.mkdtemp(prefix=f"omniflow-tiny-{weights}-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    return save_tiny_omniflow(tiny_build(), out, weights=weights, ema=True)


ALL_COMPONENTS = ("transformer", "text_vae", "text_encoder", "vae", "scheduler", "clip_image", "clip_text")


@functools.lru_cache(maxsize=None)
def tiny_loaded(dtype: torch.dtype = torch.float32) -> OmniFlowComponents:
    """Every component of the saved tiny folder, loaded through ``load_omniflow`` (cached; do not modify)."""
    paths = tiny_saved()
    return load_omniflow(paths.model_path, ALL_COMPONENTS, dtype=dtype, models_dir=paths.models_dir)
