"""Load the pieces of a released OmniFlow folder (or a tiny one in the same layout).

Folder layout (OmniFlow-v0.5): ``transformer/`` (config + weights incl. ``text_decoder.*``, optional
``ema_transformer.pt``), ``text_vae/config.json``, ``vae_tokenizer/``, ``vae/``, ``scheduler/``,
``text_encoder_2/`` + ``tokenizer_2/`` (CLIP-G text). External models: CLIP ViT-L-14 (image and text
towers, tokenizer, image processor) and flan-t5-large (the text VAE's encoder), each read from
``models_dir/<repo name>`` (where ``download_models.py`` puts it) when that folder exists, else from the Hub id.
"""
from __future__ import annotations

import functools

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
    T5EncoderModel,
)

from .checkpoint import EMA_NAME, load_ema_weights, load_omniflow_weights
from ...runtime.hub import MissingModelError, resolve_model_path
from ...runtime.weights import load_pretrained
from .errors import MissingComponentError, OmniFlowConfigError
from .scheduler import FlowMatchEulerScheduler
from .text_vae import OmniFlowTextVAE
from .transformer import OmniFlowTransformer

logger = logging.getLogger(__name__)

CLIP_L_ID = "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K"
T5_ID = "google/flan-t5-large"
PAD_TOKEN = "[PAD]"
COMPONENTS = ("transformer", "text_vae", "text_encoder", "vae", "scheduler", "clip_image", "clip_text")
DEFAULT_COMPONENTS = ("transformer", "text_vae", "scheduler")
# Which download_models.py key fetches what (named in errors when a component is missing offline).
@dataclass
class OmniFlowComponents:
    """The loaded pieces; a piece not requested is None. Frozen pieces are in ``eval()`` with
    ``requires_grad_(False)``; the text VAE holds the T5 encoder and tokenizer when ``text_encoder`` was loaded."""

    transformer: OmniFlowTransformer | None = None
    text_vae: OmniFlowTextVAE | None = None
    vae_tokenizer: object | None = None
    vae: AutoencoderKL | None = None
    scheduler: FlowMatchEulerScheduler | None = None
    clip_vision: CLIPVisionModelWithProjection | None = None
    clip_image_processor: CLIPImageProcessor | None = None
    clip_text: CLIPTextModelWithProjection | None = None
    clip_tokenizer: object | None = None
    clip_text_2: CLIPTextModelWithProjection | None = None
    clip_tokenizer_2: object | None = None


def from_pretrained(cls, path_or_id: str | Path, subfolder: str | None = None, *,
                    models_dir: str | Path | None = None, **kwargs):
    """The single place that reads a component: a local folder, ``<models_dir>/<repo name>`` or the Hub.

    The shared resolver turns a missing model into one error naming the ``download_models.py`` call.
    """
    folder = _resolve(path_or_id, subfolder, models_dir)
    try:
        return load_pretrained(cls, folder, **kwargs)
    except OSError as err:
        raise MissingComponentError(f"cannot load {cls.__name__} from {folder} ({str(err).splitlines()[0]})") from None


def load_omniflow(
    model_path: str | Path,
    components: tuple[str, ...] = DEFAULT_COMPONENTS,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    vae_dtype: torch.dtype = torch.float32,
    models_dir: str | Path | None = None,
    clip_path: str | Path = CLIP_L_ID,
    t5_path: str | Path = T5_ID,
    load_ema: bool = False,
) -> OmniFlowComponents:
    """Loads the requested ``components`` of the OmniFlow folder ``model_path`` (a local folder).

    Components: ``transformer``, ``text_vae`` (decoder, Q-Former and ``vae_tokenizer``; its weights come
    from the transformer checkpoint), ``text_encoder`` (flan-T5 encoder + tokenizer, attached to the text
    VAE for ``encode``; implies ``text_vae``), ``vae`` (kept in ``vae_dtype``), ``scheduler``,
    ``clip_image`` (CLIP-L vision tower + image processor), ``clip_text`` (CLIP-L and CLIP-G text towers
    and tokenizers, for pooled text conditioning). Models go to ``device`` in ``dtype``; the transformer
    is built without allocating memory and filled from the checkpoint shard by shard.
    ``load_ema`` replaces the transformer weights with ``transformer/ema_transformer.pt``.
    """
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise OmniFlowConfigError(f"unknown OmniFlow components {unknown}; choose from {list(COMPONENTS)}")
    wanted = set(components) | ({"text_vae"} if "text_encoder" in components else set())
    root = _resolve(model_path, None, models_dir, hint="omniflow")
    external = functools.partial(from_pretrained, models_dir=models_dir)
    out = OmniFlowComponents()

    if "text_vae" in wanted:
        out.text_vae, out.vae_tokenizer = _build_text_vae(root)
        if "text_encoder" in wanted:
            out.text_vae.attach_encoder(
                external(T5EncoderModel, t5_path), external(AutoTokenizer, t5_path)
            )
    if "transformer" in wanted:
        config = OmniFlowTransformer.load_config(_subfolder(root, "transformer"))
        latent_dim = out.text_vae.vae_dim if out.text_vae is not None else _text_vae_config(root).vae_config["vae_dim"]
        with init_empty_weights():
            out.transformer = OmniFlowTransformer.from_transformer_config(config, latent_dim)
    if out.transformer is not None or out.text_vae is not None:
        report = load_omniflow_weights(root / "transformer", out.transformer, out.text_vae, dtype=dtype)
        logger.info("loaded %d tensors from %s", report.loaded, report.files)
        if load_ema:
            if out.transformer is None:
                raise OmniFlowConfigError("load_ema=True needs the 'transformer' component")
            load_ema_weights(root / "transformer" / EMA_NAME, out.transformer, out.text_vae)
    if "vae" in wanted:
        out.vae = _frozen(from_pretrained(AutoencoderKL, root, "vae"), device, vae_dtype)
    if "scheduler" in wanted:
        out.scheduler = from_pretrained(FlowMatchEulerScheduler, root, "scheduler")
    if {"clip_image", "clip_text"} & wanted:
        # A two-tower CLIP config keeps the projection width at the top level; the towers' own default differs.
        projection_dim = external(AutoConfig, clip_path).projection_dim
    if "clip_image" in wanted:
        out.clip_vision = _frozen(
            external(CLIPVisionModelWithProjection, clip_path, projection_dim=projection_dim), device, dtype
        )
        out.clip_image_processor = external(CLIPImageProcessor, clip_path)
    if "clip_text" in wanted:
        out.clip_text = _frozen(
            external(CLIPTextModelWithProjection, clip_path, projection_dim=projection_dim), device, dtype
        )
        out.clip_tokenizer = external(AutoTokenizer, clip_path)
        out.clip_text_2 = _frozen(from_pretrained(CLIPTextModelWithProjection, root, "text_encoder_2"), device, dtype)
        out.clip_tokenizer_2 = from_pretrained(AutoTokenizer, root, "tokenizer_2")
    for name in ("transformer", "text_vae"):
        module = getattr(out, name)
        if module is not None:
            setattr(out, name, _frozen(module, device, dtype))
    return out


def _build_text_vae(root: Path) -> tuple[OmniFlowTextVAE, object]:
    """The text VAE skeleton (no memory allocated) and the decoder tokenizer with ``[PAD]`` added."""
    config = _text_vae_config(root)
    with init_empty_weights():
        text_vae = OmniFlowTextVAE(config)
    tokenizer = from_pretrained(AutoTokenizer, root, "vae_tokenizer")
    if tokenizer.pad_token != PAD_TOKEN:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if len(tokenizer) > config.vocab_size:
        raise OmniFlowConfigError(
            f"{root}/vae_tokenizer has {len(tokenizer)} tokens (with {PAD_TOKEN}) but text_vae/config.json "
            f"vocab_size is {config.vocab_size}"
        )
    return text_vae, tokenizer


def _text_vae_config(root: Path):
    config = AutoConfig.from_pretrained(_subfolder(root, "text_vae"))
    if not getattr(config, "vae_config", None):
        raise OmniFlowConfigError(f"{root}/text_vae/config.json has no 'vae_config' entry")
    return config


def _subfolder(root: Path, name: str) -> Path:
    folder = root / name
    if not (folder / "config.json").is_file():
        raise MissingComponentError(f"{folder}/config.json not found (an OmniFlow folder has {name}/config.json)")
    return folder


def _resolve(path_or_id, subfolder, models_dir, hint: str | None = None) -> Path:
    try:
        return resolve_model_path(str(path_or_id), subfolder=subfolder, models_dir=models_dir or "models")
    except MissingModelError as err:
        message = str(err)
        if hint and "download_models.py" not in message:
            message += f"; fetch it with `python download_models.py --models {hint}`"
        raise MissingComponentError(message) from None


def _frozen(module, device, dtype):
    # nn.Module.to: diffusers' ModelMixin.to warns about fp32-kept modules on every dtype cast, even with none.
    torch.nn.Module.to(module, device=device, dtype=dtype)
    return module.eval().requires_grad_(False)
