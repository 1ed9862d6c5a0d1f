"""Text generation with OmniFlow: flow sampling of the text latent, then decoding with the text VAE.

Each step feeds the noisy text latent (zero-padded to ``joint_attention_dim``) with the conditioning
streams, takes an x0 prediction of the text latent (the transformer's ``text_output``, or a caller's
``x0_fn``), turns it into a velocity ``(x_t - x0) / sigma``, mixes the velocities for classifier-free
guidance and takes an Euler step. Conditions follow the released conventions: a conditioning modality
is clean at t = 0, an absent one is random at t = 1000; the unconditional branch ("new" CFG mode of the
release) puts the condition at t = 1000 with random content and zeroes the pooled vector.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torchvision import transforms

from ...runtime import noise
from ...runtime.noise import Generators
from .loading import OmniFlowComponents, load_omniflow
from .transformer import AUDIO_LATENT_SHAPE, OmniFlowTransformerOutput

X0Fn = Callable[[OmniFlowTransformerOutput], torch.Tensor]
PrefixFn = Callable[[OmniFlowTransformerOutput], torch.Tensor]
ABSENT_T = 1000.0
PIPELINE_COMPONENTS = ("transformer", "text_vae", "text_encoder", "vae", "scheduler", "clip_image")


@dataclass
class StreamInputs:
    """The non-text inputs of one transformer call: image and audio latents with their timesteps ([B],
    0..1000) and the pooled conditioning vector [B, pooled_projection_dim]."""

    image: torch.Tensor
    image_t: torch.Tensor
    audio: torch.Tensor
    audio_t: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.pooled.shape[0]

    def concat(self, other: "StreamInputs") -> "StreamInputs":
        return StreamInputs(*(torch.cat([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)))


@dataclass
class TextSample:
    """Result of :meth:`OmniFlowPipeline.sample_text_latents`: the final text latents [B, L, vae_dim]
    (fp32) and the conditional branch's transformer output at the last step (e.g. its ``text_hidden``)."""

    latents: torch.Tensor
    output: OmniFlowTransformerOutput


class OmniFlowPipeline:
    """Image->text, text->text and audio->text sampling on loaded :class:`OmniFlowComponents`.

    Needs ``transformer``, ``text_vae`` (+ ``vae_tokenizer``) and ``scheduler``; image->text also ``vae``
    and ``clip_image``; text->text ``text_encoder`` (and ``clip_text`` for pooled text conditioning).
    Images are resized and centre-cropped to ``image_size`` (default: the transformer's latent
    ``sample_size`` times the VAE's downsampling, at most 512 as in the release).
    """

    def __init__(self, components: OmniFlowComponents, image_size: int | None = None):
        for name in ("transformer", "text_vae", "vae_tokenizer", "scheduler"):
            if getattr(components, name) is None:
                raise ValueError(f"OmniFlowPipeline needs the '{name}' component")
        self.components = components
        self.transformer, self.text_vae, self.scheduler = components.transformer, components.text_vae, components.scheduler
        # The VAE's downsampling factor (8 for SD3's VAE, assumed when no VAE is loaded).
        self.vae_scale = 2 ** (len(components.vae.config.block_out_channels) - 1) if components.vae is not None else 8
        self.image_size = image_size or min(512, self.transformer.config.sample_size * self.vae_scale)
        self.image_transform = transforms.Compose([
            transforms.Resize(self.image_size, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(self.image_size),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ])

    @classmethod
    def from_pretrained(
        cls, model_path: str | Path, components: tuple[str, ...] = PIPELINE_COMPONENTS,
        image_size: int | None = None, **load_kwargs,
    ) -> "OmniFlowPipeline":
        """:func:`load_omniflow` (same keyword arguments) followed by the constructor."""
        return cls(load_omniflow(model_path, components, **load_kwargs), image_size=image_size)

    @property
    def device(self) -> torch.device:
        return self.transformer.pos_embed.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.pos_embed.proj.weight.dtype

    # ----- conditioning -----
    def _full(self, batch: int, value: float) -> torch.Tensor:
        return torch.full((batch,), value, device=self.device)

    def _randn(self, shape, generator: Generators, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Gaussian noise drawn on the generator's device (a CPU generator works for a GPU pipeline)."""
        return noise.randn(shape, generator, self.device, dtype or self.dtype)

    def absent_image(self, batch: int, generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random image latents at t = 1000 (an image stream that carries no information)."""
        size = self.image_size // self.vae_scale
        shape = (batch, self.transformer.config.in_channels, size, size)
        return self._randn(shape, generator), self._full(batch, ABSENT_T)

    def absent_audio(self, batch: int, generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random audio latents at t = 1000."""
        return self._randn((batch, *AUDIO_LATENT_SHAPE), generator), self._full(batch, ABSENT_T)

    def zero_pooled(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.transformer.config.pooled_projection_dim, device=self.device, dtype=self.dtype)

    def _pooled_from(self, embeds: list[torch.Tensor]) -> torch.Tensor:
        """Embeddings laid side by side in the leading dims of a zero pooled vector (the release layout)."""
        pooled = self.zero_pooled(embeds[0].shape[0])
        width = sum(e.shape[-1] for e in embeds)
        if width > pooled.shape[-1]:
            raise ValueError(f"conditioning embeddings are {width} wide; pooled_projection_dim is {pooled.shape[-1]}")
        pooled[:, :width] = torch.cat(embeds, dim=-1).to(self.dtype)
        return pooled

    @torch.no_grad()
    def encode_images(self, images: list, generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL images -> (VAE latent sample x scaling_factor [B, C, h, w], pooled vector with the CLIP-L image
        embedding in its leading dims). As released, no shift factor is subtracted."""
        vae, clip, processor = self.components.vae, self.components.clip_vision, self.components.clip_image_processor
        if vae is None or clip is None or processor is None:
            raise ValueError("encoding images needs the 'vae' and 'clip_image' components")
        images = [image.convert("RGB") for image in images]
        pixels = torch.stack([self.image_transform(image) for image in images]).to(vae.device, vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample(generator=generator) * vae.config.scaling_factor
        clip_pixels = processor(images=images, return_tensors="pt").pixel_values.to(clip.device, clip.dtype)
        return latents.to(self.device, self.dtype), self._pooled_from([clip(pixel_values=clip_pixels).image_embeds])

    @torch.no_grad()
    def encode_text_pooled(self, texts: list[str]) -> torch.Tensor:
        """CLIP-L and CLIP-G pooled text embeddings side by side (2048 wide in the release)."""
        pairs = ((self.components.clip_text, self.components.clip_tokenizer), (self.components.clip_text_2, self.components.clip_tokenizer_2))
        if any(model is None for model, _ in pairs):
            raise ValueError("pooled text conditioning needs the 'clip_text' component")
        embeds = []
        for model, tokenizer in pairs:
            ids = tokenizer(list(texts), padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            embeds.append(model(input_ids=ids.input_ids.to(model.device)).text_embeds)
        return self._pooled_from(embeds)

    def pad_text(self, latents: torch.Tensor) -> torch.Tensor:
        """Text latents [B, L, vae_dim] zero-padded to the transformer's ``joint_attention_dim``."""
        width = self.transformer.config.joint_attention_dim
        return torch.nn.functional.pad(latents, (0, width - latents.shape[-1]))

    # ----- sampling -----
    @torch.no_grad()
    def sample_text_latents(
        self,
        cond: StreamInputs,
        uncond: StreamInputs | None = None,
        *,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 28,
        init_latents: torch.Tensor | None = None,
        strength: float = 1.0,
        x0_fn: X0Fn | None = None,
        generator: torch.Generator | None = None,
    ) -> TextSample:
        """Samples text latents [B, n_tokens, vae_dim] by flow steps conditioned on ``cond``.

        ``uncond`` (same batch) enables classifier-free guidance ``v_u + s * (v_c - v_u)`` when
        ``guidance_scale != 1``. ``init_latents`` with ``strength < 1`` starts from those latents noised to
        the sigma ``strength`` of the way into the schedule (SDEdit); ``strength = 1`` starts from noise.
        ``x0_fn(output) -> [B', L, vae_dim]`` replaces the transformer's x0 prediction (e.g. a trained head
        on ``output.text_hidden``); it sees both CFG branches at once ([uncond; cond]).
        """
        batch, shape = len(cond), (len(cond), self.text_vae.n_tokens, self.text_vae.vae_dim)
        use_cfg = uncond is not None and guidance_scale != 1.0
        inputs = uncond.concat(cond) if use_cfg else cond
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        start = min(int(round(num_inference_steps * (1.0 - strength))), num_inference_steps - 1)
        latents = self._randn(shape, generator, torch.float32)
        if init_latents is not None and strength < 1.0:
            latents = self.scheduler.add_noise(init_latents.to(self.device, torch.float32), latents, self.scheduler.sigmas[start])
        for i in range(start, num_inference_steps):
            rows = self.pad_text(latents).repeat(2 if use_cfg else 1, 1, 1)
            output = self.transformer(
                hidden_states=inputs.image, encoder_hidden_states=rows.to(self.dtype),
                pooled_projections=inputs.pooled, timestep=inputs.image_t,
                timestep_text=self.scheduler.timesteps[i].expand(len(inputs)),
                timestep_audio=inputs.audio_t, audio_hidden_states=inputs.audio, use_text_output=True,
            )
            x0 = output.text_x0 if x0_fn is None else x0_fn(output)
            velocity = self.scheduler.velocity_from_x0(rows[..., : shape[-1]], x0, self.scheduler.sigmas[i])
            if use_cfg:
                v_uncond, v_cond = velocity.chunk(2)
                velocity = v_uncond + guidance_scale * (v_cond - v_uncond)
            latents = self.scheduler.step(velocity, i, latents)
        return TextSample(latents=latents, output=_rows(output, slice(-batch, None)))

    @torch.no_grad()
    def decode(
        self, prefix: torch.Tensor, *, max_new_tokens: int = 64, num_beams: int = 1
    ) -> list[str]:
        """Text from a prefix: latents [B, L, vae_dim] or LM embeddings [B, L, hidden_size]."""
        key = "latents" if prefix.shape[-1] == self.text_vae.vae_dim else "prefix_embeds"
        ids = self.text_vae.generate(**{key: prefix}, max_new_tokens=max_new_tokens, num_beams=num_beams)
        return self.components.vae_tokenizer.batch_decode(ids, skip_special_tokens=True)

    def generate_text(
        self,
        cond: StreamInputs,
        uncond: StreamInputs | None = None,
        *,
        prefix_fn: PrefixFn | None = None,
        max_new_tokens: int = 64,
        num_beams: int = 1,
        **sampling,
    ) -> list[str]:
        """:meth:`sample_text_latents` (``sampling`` are its keyword arguments), then :meth:`decode`.

        ``prefix_fn(output)``, applied to the last step's conditional output, replaces the final latents as
        the decoder prefix, e.g. a head mapping ``output.text_hidden`` to LM embeddings. The task methods
        below take these same keyword arguments."""
        sample = self.sample_text_latents(cond, uncond, **sampling)
        prefix = sample.latents if prefix_fn is None else prefix_fn(sample.output)
        return self.decode(prefix, max_new_tokens=max_new_tokens, num_beams=num_beams)

    def image_to_text(
        self, images: list, *, guidance_scale: float = 2.0, generator: torch.Generator | None = None, **options
    ) -> list[str]:
        """Captions PIL images: the image is clean at t = 0 with its CLIP embedding as the pooled vector,
        audio is absent; the unconditional branch has a random image at t = 1000 and a zero pooled vector."""
        latents, pooled = self.encode_images(images, generator)
        batch = len(images)
        audio, audio_t = self.absent_audio(batch, generator)
        cond = StreamInputs(latents, self._full(batch, 0.0), audio, audio_t, pooled)
        uncond = replace(cond, image=self._randn(latents.shape, generator), image_t=self._full(batch, ABSENT_T),
                         pooled=self.zero_pooled(batch))
        return self.generate_text(cond, uncond, guidance_scale=guidance_scale, generator=generator, **options)

    def text_to_text(
        self, texts: list[str], *, strength: float = 0.6, guidance_scale: float = 1.0,
        generator: torch.Generator | None = None, **options,
    ) -> list[str]:
        """Rewrites texts: their text-VAE latents, noised to ``strength``, are denoised with image and audio
        absent. The pooled vector is the CLIP text embedding when ``clip_text`` is loaded, else zeros (then
        ``strength`` must be < 1, or the source would be ignored). ``strength = 0`` is a pure VAE round trip."""
        batch = len(texts)
        has_clip = self.components.clip_text is not None
        if strength >= 1.0 and not has_clip:
            raise ValueError("text_to_text with strength >= 1 ignores the source text unless 'clip_text' is loaded")
        init = self.text_vae.encode(list(texts)).float()
        if strength <= 0.0:
            decoding = {k: options[k] for k in ("max_new_tokens", "num_beams") if k in options}
            return self.decode(init, **decoding)
        image, image_t = self.absent_image(batch, generator)
        audio, audio_t = self.absent_audio(batch, generator)
        pooled = self.encode_text_pooled(texts) if has_clip else self.zero_pooled(batch)
        cond = StreamInputs(image, image_t, audio, audio_t, pooled)
        return self.generate_text(
            cond, replace(cond, pooled=self.zero_pooled(batch)), guidance_scale=guidance_scale,
            init_latents=init, strength=strength, generator=generator, **options,
        )

    def audio_to_text(
        self, audio_latents: torch.Tensor, audio_pooled: torch.Tensor | None = None, *,
        guidance_scale: float = 4.0, generator: torch.Generator | None = None, **options,
    ) -> list[str]:
        """Captions audio given its AudioLDM2-VAE latents x scaling_factor [B, 8, 256, 16] and optionally its
        LanguageBind audio embedding [B, E] (placed in the pooled vector's leading dims). Neither encoder is
        bundled here; see the README."""
        batch = audio_latents.shape[0]
        pooled = self._pooled_from([audio_pooled]) if audio_pooled is not None else self.zero_pooled(batch)
        image, image_t = self.absent_image(batch, generator)
        audio = audio_latents.to(self.device, self.dtype)
        cond = StreamInputs(image, image_t, audio, self._full(batch, 0.0), pooled)
        uncond = replace(cond, audio=self._randn(audio.shape, generator), audio_t=self._full(batch, ABSENT_T),
                         pooled=self.zero_pooled(batch))
        return self.generate_text(cond, uncond, guidance_scale=guidance_scale, generator=generator, **options)

def _rows(output: OmniFlowTransformerOutput, rows: slice) -> OmniFlowTransformerOutput:
    """The given batch rows of every field of a transformer output."""
    return OmniFlowTransformerOutput(
        **{f.name: None if getattr(output, f.name) is None else getattr(output, f.name)[rows] for f in fields(output)}
    )
