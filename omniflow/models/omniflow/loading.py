"""Load the pieces of a released OmniFlow folder (or a tiny one in the same layout).

Folder layout (OmniFlow-v0.5): ``transformer/`` (config + weights incl. ``text_decoder.*``, optional
``ema_transformer.pt``), ``text_vae/config.json``, ``vae_tokenizer/``, ``vae/``, ``scheduler/``,
``text_encoder_2/`` + ``tokenizer_2/`` (CLIP-G text). External models: CLIP ViT-L-14 (image and text
towers, tokenizer, image processor) and flan-t5-large (the text VAE's encoder), each read from
``models_dir/<hub id>`` when that folder exists, else from the Hub id.
"""
from __future__ import annotations

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
_DOWNLOAD_KEYS = {CLIP_L_ID: "clip_vit_l", T5_ID: "t5_large"}


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


def from_pretrained(cls, path_or_id: str | Path, subfolder: str | None = None, **kwargs):
    """The single place that reads a component from a local folder or the Hub (swappable for a resolver)."""
    extra = {"subfolder": subfolder} if subfolder else {}
    if subfolder and Path(path_or_id).is_dir() and not (Path(path_or_id) / subfolder).is_dir():
        raise MissingComponentError(f"{Path(path_or_id) / subfolder} not found (needed for {cls.__name__})")
    try:
        return cls.from_pretrained(str(path_or_id), **extra, **kwargs)
    except OSError as err:
        where = f"{path_or_id}" + (f"/{subfolder}" if subfolder else "")
        key = _DOWNLOAD_KEYS.get(str(path_or_id), "omniflow")
        raise MissingComponentError(
            f"cannot load {cls.__name__} from {where} ({str(err).splitlines()[0]}); "
            f"fetch it with `python download_models.py --models {key}`"
        ) from None


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
    root = Path(model_path)
    if not root.is_dir():
        raise MissingComponentError(
            f"OmniFlow folder not found: {root}; fetch it with `python download_models.py --models omniflow`"
        )
    clip_path, t5_path = _external(clip_path, models_dir), _external(t5_path, models_dir)
    out = OmniFlowComponents()

    if "text_vae" in wanted:
        out.text_vae, out.vae_tokenizer = _build_text_vae(root)
        if "text_encoder" in wanted:
            out.text_vae.attach_encoder(
                from_pretrained(T5EncoderModel, t5_path), from_pretrained(AutoTokenizer, t5_path)
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
        projection_dim = from_pretrained(AutoConfig, clip_path).projection_dim
    if "clip_image" in wanted:
        out.clip_vision = _frozen(
            from_pretrained(CLIPVisionModelWithProjection, clip_path, projection_dim=projection_dim), device, dtype
        )
        out.clip_image_processor = from_pretrained(CLIPImageProcessor, clip_path)
    if "clip_text" in wanted:
        out.clip_text = _frozen(
            from_pretrained(CLIPTextModelWithProjection, clip_path, projection_dim=projection_dim), device, dtype
        )
        out.clip_tokenizer = from_pretrained(AutoTokenizer, clip_path)
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


def _external(path_or_id: str | Path, models_dir: str | Path | None) -> str | Path:
    """``models_dir/<hub id>`` if that folder exists, else the path or Hub id unchanged."""
    if models_dir is not None and (Path(models_dir) / str(path_or_id)).is_dir():
        return Path(models_dir) / str(path_or_id)
    return path_or_id


def _frozen(module, device, dtype):
    # nn.Module.to: diffusers' ModelMixin.to warns about fp32-kept modules on every dtype cast, even with none.
    torch.nn.Module.to(module, device=device, dtype=dtype)
    return module.eval().requires_grad_(False)
