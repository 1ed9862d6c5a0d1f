"""The frozen OmniFlow of the text job: conditions, the head's training terms, sampling with a head.

Training signal of one batch (OmniFlow's conventions, see ``omniflow/models/omniflow/README.md``):

1. the target text's latent ``x0 = text_vae.encode(text)`` [B, 32, 64] is noised to a sampled
   ``sigma``: ``x_t = sigma * noise + (1 - sigma) * x0``, text timestep ``1000 * sigma``;
2. the condition is fed clean at t = 0 (image->text: VAE image latents with the CLIP image embedding
   as pooled vector; audio->text: AudioLDM2-VAE latents), absent streams are random at t = 1000; a
   text task ("denoise and decode the same text") has the text's CLIP-L/CLIP-G embedding as pooled
   vector, as the pipeline's ``text_to_text``;
3. the frozen transformer (no gradient) gives ``text_hidden``, the features before ``text_output``;
4. the head stack maps them to latents or an LM prefix, the frozen decoder is teacher-forced on
   ``BOS text EOS``: shifted cross-entropy with padding masked, plus the stack's auxiliary terms
   (lambda * MSE to ``x0``, VQ loss).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from torchvision.transforms.functional import to_pil_image

from ..data.text import tokenize_batch
from ..models.omniflow.loading import load_omniflow
from ..models.omniflow.pipeline import OmniFlowPipeline, StreamInputs
from ..models.text_heads import TextHeadStack, text_decoder_loss
from ..runtime import noise
from ..runtime.noise import Generators
from .audio import AudioLatentEncoder, load_audio_encoder

BASE_COMPONENTS = ("transformer", "text_vae", "scheduler")
# A text task is conditioned on the source's CLIP-L/CLIP-G pooled embedding, as the pipeline's text_to_text does.
TASK_COMPONENTS = {"text": ("text_encoder", "clip_text"), "image_to_text": ("vae", "clip_image"), "audio_to_text": ()}
# Guidance per task when --guidance_scale is not given: none, since heads are trained on conditional inputs only.
DEFAULT_GUIDANCE = 1.0


@dataclass
class HeadTerms:
    """Loss terms of one batch (fp32 scalars) and the number of scored target tokens."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    num_tokens: int
    codes: torch.Tensor | None = None  # [B, T] VQ code indices of the head, None without VQ


class TextJobModel:
    """The frozen pieces the text job needs, around an :class:`OmniFlowPipeline`.

    ``noise_shift`` shifts the training noise levels like the scheduler's shift (1: uniform sigma,
    OmniFlow's training convention; < 1 favours low noise, where the final decoder prefix is read).
    """

    def __init__(self, pipe: OmniFlowPipeline, max_length: int = 77, noise_shift: float = 1.0,
                 audio_encoder: AudioLatentEncoder | None = None):
        self.pipe = pipe
        self.transformer, self.text_vae, self.scheduler = pipe.transformer, pipe.text_vae, pipe.scheduler
        self.tokenizer = pipe.components.vae_tokenizer
        self.max_length, self.noise_shift = max_length, noise_shift
        self.audio_encoder = audio_encoder

    @classmethod
    def load(cls, model_path: str | Path, tasks: set[str], *, models_dir: str | Path = "models", training: bool,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, **options) -> "TextJobModel":
        """Loads what ``tasks`` need; training also needs the T5 encoder (target latents for the MSE)."""
        components = set(BASE_COMPONENTS) | ({"text_encoder"} if training else set())
        for task in tasks:
            components |= set(TASK_COMPONENTS[task])
        parts = load_omniflow(model_path, tuple(sorted(components)), device=device, dtype=dtype,
                              models_dir=models_dir)
        audio = load_audio_encoder(models_dir, device) if "audio_to_text" in tasks else None
        return cls(OmniFlowPipeline(parts), audio_encoder=audio, **options)

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    def new_head_stack(self, options) -> TextHeadStack:
        """An fp32 head stack sized for this model, its head initialised from the released text_output."""
        return TextHeadStack(
            options, self.transformer.config.joint_attention_dim, self.text_vae.vae_dim, self.text_vae.hidden_size,
            text_output=self.transformer.text_output, prefix_proj=self.text_vae.input_proj,
            latent_scale=self.text_vae.vae_scale,
        ).float()

    # ----- conditions -----
    def conditions(self, batch: dict, generator: Generators = None) -> StreamInputs:
        """Per-example image/audio streams and pooled vectors: the condition clean at t = 0, the rest absent."""
        tasks = batch["task"]
        size = len(tasks)
        image, image_t = self.pipe.absent_image(size, generator)
        audio, audio_t = self.pipe.absent_audio(size, generator)
        pooled = self.pipe.zero_pooled(size)
        rows = [i for i, task in enumerate(tasks) if task == "text"]
        if rows and self.pipe.components.clip_text is not None:
            pooled[rows] = self.pipe.encode_text_pooled([batch["text"][i] for i in rows])
        rows = [i for i, task in enumerate(tasks) if task == "image_to_text"]
        if rows:
            pictures = [to_pil_image(batch["image"][i].cpu()) for i in rows]
            image[rows], pooled[rows] = self.pipe.encode_images(pictures, noise.rows_of(generator, rows))
            image_t[rows] = 0.0
        rows = [i for i, task in enumerate(tasks) if task == "audio_to_text"]
        if rows:
            if self.audio_encoder is None:
                raise ValueError("audio_to_text examples need the audio encoder: load the model with that task")
            waves = batch["audio"][rows]
            audio[rows] = self.audio_encoder.encode(waves, batch["audio_lengths"][rows],
                                                     noise.rows_of(generator, rows)).to(audio.dtype)
            audio_t[rows] = 0.0
        return StreamInputs(image, image_t, audio, audio_t, pooled)

    # ----- training -----
    @torch.no_grad()
    def text_features(self, batch: dict, generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(text_hidden [B, 32, joint] of the noised target latent under the batch's conditions, x0 [B, 32, 64])."""
        x0 = self.text_vae.encode(list(batch["text"])).float()
        size = x0.shape[0]
        timesteps = self.scheduler.sample_train_timesteps(size, generator, shift=self.noise_shift).to(self.device)
        sigma = timesteps / self.scheduler.config.num_train_timesteps
        x_t = self.scheduler.add_noise(x0, noise.randn(x0.shape, generator, self.device), sigma)
        cond = self.conditions(batch, generator)
        output = self.transformer(
            hidden_states=cond.image, encoder_hidden_states=self.pipe.pad_text(x_t).to(self.pipe.dtype),
            pooled_projections=cond.pooled, timestep=cond.image_t, timestep_text=timesteps,
            timestep_audio=cond.audio_t, audio_hidden_states=cond.audio, use_text_output=True,
        )
        return output.text_hidden, x0

    def head_terms(self, stack: torch.nn.Module, batch: dict, generator: Generators = None) -> HeadTerms:
        """The head's loss on a batch: decoder cross-entropy + the stack's auxiliary terms (see module doc).

        ``stack`` may be wrapped for distributed training; its forward is called through the wrapper.
        ``generator``: one for the batch, or one per example (validation: an example's noise then does
        not depend on the batch it is in)."""
        features, x0 = self.text_features(batch, generator)
        head = stack(features.float())
        target = tokenize_batch(list(batch["text"]), self.tokenizer, self.max_length)
        ids, mask = target["input_ids"].to(self.device), target["attention_mask"].to(self.device)
        prefix = {"latents" if head.kind == "latent" else "prefix_embeds": head.latents_or_prefix}
        logits = self.text_vae.decode_logits(ids, attention_mask=mask, **prefix)
        decoded = text_decoder_loss(logits[:, :-1], ids[:, 1:], mask[:, 1:], self.tokenizer.pad_token_id)
        aux = extract_model_from_parallel(stack).auxiliary_losses(
            head, x0, prefix_proj=self.text_vae.input_proj, latent_scale=self.text_vae.vae_scale)
        loss = decoded.loss + aux["aux_loss"]
        terms = {"loss": loss, "ce": decoded.loss,
                 "token_accuracy": decoded.token_accuracy, "latent_mse": aux["latent_mse"], **head.stats}
        if extract_model_from_parallel(stack).vq is not None:
            terms["vq_loss"] = aux["vq_loss"]
        return HeadTerms(loss, terms, int(decoded.num_tokens), head.codes)

    # ----- sampling -----
    def generate(self, batch: dict, stack: TextHeadStack | None = None, *, guidance_scale: float | None = None,
                 strength: float = 0.6, generator: torch.Generator | None = None, **options) -> list[str]:
        """Texts for a batch of one task by flow sampling of the text latent, then KV-cached decoding.

        Without a head stack this is the released model (``text_output``). A ``latent`` head replaces the
        x0 prediction at every step and gives the final latents; a ``prefix`` head (LM width) gives the
        decoder prefix from the last step's features. ``options``: ``num_inference_steps``,
        ``max_new_tokens``, ``num_beams``.
        """
        tasks = set(batch["task"])
        if len(tasks) != 1:
            raise ValueError(f"generate() takes a batch of one task, got {sorted(tasks)}")
        task = tasks.pop()
        options.update(head_functions(stack), generator=generator,
                       guidance_scale=DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale)
        if task == "image_to_text":
            return self.pipe.image_to_text([to_pil_image(image.cpu()) for image in batch["image"]], **options)
        if task == "text":
            return self.pipe.text_to_text(list(batch["text"]), strength=strength, **options)
        if self.audio_encoder is None:
            raise ValueError("audio_to_text needs the audio encoder: load the model with that task")
        latents = self.audio_encoder.encode(batch["audio"], batch["audio_lengths"], generator)
        return self.pipe.audio_to_text(latents, **options)


def head_functions(stack: TextHeadStack | None) -> dict[str, Callable]:
    """``x0_fn``/``prefix_fn`` for the pipeline's sampler from a head stack (none: the released text_output)."""
    if stack is None:
        return {}

    def run(output):
        return stack(output.text_hidden.float()).latents_or_prefix

    # ``stack`` may be wrapped for distributed training (validation samples): its forward gathers sharded weights
    kind = extract_model_from_parallel(stack).kind
    return {"x0_fn": run, "prefix_fn": run} if kind == "latent" else {"prefix_fn": run}


__all__ = ["HeadTerms", "TextJobModel", "head_functions"]
