"""The OmniFlow transformer: an SD3-style MMDiT with joint attention over image, text and audio tokens.

Parameter names, shapes and registration order follow the released ``OmniFlowTransformerModel``, so the
released ``transformer/`` weights load strictly and ``ema_transformer.pt`` (a positional list) maps onto
``named_parameters()``. The text VAE is a separate module here; its weights live in the same checkpoint
under ``text_decoder.*`` (see :mod:`.checkpoint`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, RMSNorm
from torch import nn

from .errors import OmniFlowConfigError

# The audio stream's geometry is fixed by the released model: AudioLDM2-VAE latents [B, 8, 256, 16],
# 2x2 patches (128 x 8 = 1024 tokens), positions cropped from a 192 x 192 sin-cos table.
AUDIO_LATENT_SHAPE = (8, 256, 16)
AUDIO_PATCH = 2
AUDIO_POS_EMBED_MAX = 192
_QK_NORMS = (None, "layer_norm", "rms_norm")


@dataclass
class OmniFlowTransformerOutput:
    """What one forward pass predicts; a field is None when its stream or head did not run.

    image:       velocity (noise - x0) for the image latents, [B, C, H, W].
    text_x0:     x0 prediction of the text latents, ``text_output(text_hidden)``, [B, L, vae_dim].
    text_hidden: the text-branch features that feed ``text_output`` (after ``norm_out_text``),
                 [B, L, joint_attention_dim] (4096 in the release); what a text decoder head reads.
    text_stream: the text stream as it leaves the joint blocks, [B, L, inner_dim].
    audio:       velocity for the audio latents, [B, 8, 256, 16].
    """

    image: torch.Tensor | None
    text_x0: torch.Tensor | None
    text_hidden: torch.Tensor | None
    text_stream: torch.Tensor | None
    audio: torch.Tensor | None


class JointAttention(nn.Module):
    """Self-attention over the concatenated [image, text, audio] tokens, split back per stream.

    ``qk_norm="layer_norm"`` uses one LayerNorm over head_dim shared by all streams (as released);
    ``"rms_norm"`` uses one RMSNorm pair per stream.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None, context_pre_only: bool):
        super().__init__()
        head_dim = dim // num_heads
        self.num_heads = num_heads
        self.context_pre_only = context_pre_only
        self.per_stream_norm = qk_norm == "rms_norm"
        if qk_norm == "layer_norm":
            self.norm_q, self.norm_k = nn.LayerNorm(head_dim, eps=1e-5), nn.LayerNorm(head_dim, eps=1e-5)
        elif qk_norm == "rms_norm":
            for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k", "norm_aud_q", "norm_aud_k"):
                setattr(self, name, RMSNorm(head_dim, eps=1e-5))
        else:
            self.norm_q = self.norm_k = None
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_k_proj, self.add_v_proj, self.add_q_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.aud_k_proj, self.aud_v_proj, self.aud_q_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_aud_out = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        if not context_pre_only:
            self.to_add_out = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor, stream: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prefix = ("to_", "add_", "aud_")[stream]
        suffix = "" if stream == 0 else "_proj"
        q, k, v = (getattr(self, f"{prefix}{n}{suffix}")(x) for n in "qkv")
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        if self.per_stream_norm:
            tag = ("", "added_", "aud_")[stream]
            q, k = getattr(self, f"norm_{tag}q")(q), getattr(self, f"norm_{tag}k")(k)
        return q, k, v

    def forward(
        self, image: torch.Tensor | None, text: torch.Tensor | None, audio: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        streams = [(i, x) for i, x in enumerate((image, text, audio)) if x is not None]
        q, k, v = (torch.cat(parts, dim=2) for parts in zip(*(self._qkv(x, i) for i, x in streams)))
        if not self.per_stream_norm and self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        pieces = dict(zip((i for i, _ in streams), out.split([x.shape[1] for _, x in streams], dim=1)))
        image_out = self.to_out[0](pieces[0]) if 0 in pieces else None
        # The last block's text tokens only supply keys and values; their attention output is dropped.
        text_out = self.to_add_out(pieces[1]) if 1 in pieces and not self.context_pre_only else None
        audio_out = self.to_aud_out(pieces[2]) if 2 in pieces else None
        return image_out, text_out, audio_out


def _gated_residual(x, attn_out, modulation, norm: nn.Module, ff: nn.Module) -> torch.Tensor:
    """AdaLN-Zero update: gated attention residual, then a modulated, gated feed-forward residual."""
    gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
    x = x + gate_msa.unsqueeze(1) * attn_out
    h = norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return x + gate_mlp.unsqueeze(1) * ff(h)


class JointTransformerBlock(nn.Module):
    """One MMDiT block with an audio stream. In the last block (``context_pre_only``) the text stream only
    conditions the others and leaves unchanged; its ``ff_context`` exists (as released) but is never used."""

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None, context_pre_only: bool):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = AdaLayerNormZero(dim)
        if context_pre_only:
            self.norm1_context = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6)
        else:
            self.norm1_context = AdaLayerNormZero(dim)
        self.attn = JointAttention(dim, num_heads, qk_norm, context_pre_only)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff_context = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")
        self.ff_audio = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")
        self.norm1_audio = AdaLayerNormZero(dim)
        self.norm2_audio = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, image, text, audio, temb, temb_text=None, temb_audio=None):
        """Returns the updated (image, text, audio); absent streams stay None. ``temb_text``/``temb_audio``
        default to ``temb`` (the shared conditioning vector)."""
        temb_text = temb if temb_text is None else temb_text
        temb_audio = temb if temb_audio is None else temb_audio
        n_image = n_text = n_audio = None
        if image is not None:
            n_image, *image_mod = self.norm1(image, emb=temb)
        if text is not None:
            if self.context_pre_only:
                n_text = self.norm1_context(text, temb_text)
            else:
                n_text, *text_mod = self.norm1_context(text, emb=temb_text)
        if audio is not None:
            n_audio, *audio_mod = self.norm1_audio(audio, emb=temb_audio)
        a_image, a_text, a_audio = self.attn(n_image, n_text, n_audio)
        if image is not None:
            image = _gated_residual(image, a_image, image_mod, self.norm2, self.ff)
        if text is not None and not self.context_pre_only:
            text = _gated_residual(text, a_text, text_mod, self.norm2_context, self.ff_context)
        if audio is not None:
            audio = _gated_residual(audio, a_audio, audio_mod, self.norm2_audio, self.ff_audio)
        return image, text, audio


def _unpatchify(x: torch.Tensor, grid_h: int, grid_w: int, patch: int, channels: int) -> torch.Tensor:
    """[B, h*w, p*p*C] tokens (row-major grid, feature index (pr*p + pc)*C + c) -> [B, C, h*p, w*p]."""
    x = x.reshape(x.shape[0], grid_h, grid_w, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], channels, grid_h * patch, grid_w * patch)


class OmniFlowTransformer(ModelMixin, ConfigMixin):
    """OmniFlow MMDiT. Config keys are those of the released ``transformer/config.json``.

    ``text_latent_dim`` (the text VAE's ``vae_dim``, 64 in the release) sizes ``text_output``; it is not a
    config key because the released model derives it from the attached text VAE.
    Unsupported released-config switches (``add_clip``, ``use_audio_mae``, ``drop_*``, dual attention,
    ``decoder_config``, ``add_audio=False``) raise :class:`OmniFlowConfigError`.
    """

    _supports_gradient_checkpointing = True
    ignore_for_config = ["text_latent_dim"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 18,
        attention_head_dim: int = 64,
        num_attention_heads: int = 18,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1152,
        pooled_projection_dim: int = 2048,
        audio_input_dim: int = 8,
        out_channels: int | None = 16,
        pos_embed_max_size: int = 96,
        dual_attention_layers: tuple[int, ...] = (),
        decoder_config: str = "",
        add_audio: bool = True,
        add_clip: bool = False,
        use_audio_mae: bool = False,
        drop_text: bool = False,
        drop_image: bool = False,
        drop_audio: bool = False,
        qk_norm: str | None = "layer_norm",
        text_latent_dim: int = 64,
    ):
        super().__init__()
        _check_config(self.config)
        dim = num_attention_heads * attention_head_dim
        self.out_channels = out_channels or in_channels
        self.gradient_checkpointing = False
        # Registration order matches the release (state-dict order and EMA parameter order depend on it).
        self.pos_embed = PatchEmbed(
            height=sample_size, width=sample_size, patch_size=patch_size, in_channels=in_channels,
            embed_dim=dim, pos_embed_max_size=pos_embed_max_size,
        )
        # Released naming is swapped: time_text_embed embeds the IMAGE timestep, time_image_embed the TEXT one.
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, pooled_projection_dim)
        self.time_image_embed = CombinedTimestepTextProjEmbeddings(dim, pooled_projection_dim)
        channels, height, width = AUDIO_LATENT_SHAPE
        self.audio_embedder = PatchEmbed(
            height=height, width=width, patch_size=AUDIO_PATCH, in_channels=audio_input_dim,
            embed_dim=caption_projection_dim, pos_embed_max_size=AUDIO_POS_EMBED_MAX,
        )
        self.time_aud_embed = CombinedTimestepTextProjEmbeddings(dim, pooled_projection_dim)
        self.norm_out_aud = AdaLayerNormContinuous(caption_projection_dim, dim, elementwise_affine=False, eps=1e-6)
        self.proj_out_aud = nn.Linear(dim, AUDIO_PATCH * AUDIO_PATCH * audio_input_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, caption_projection_dim)
        self.context_decoder = nn.ModuleDict({"projection": nn.Linear(caption_projection_dim, joint_attention_dim)})
        self.text_output = nn.Linear(joint_attention_dim, text_latent_dim)
        self.transformer_blocks = nn.ModuleList(
            JointTransformerBlock(dim, num_attention_heads, qk_norm, context_pre_only=i == num_layers - 1)
            for i in range(num_layers)
        )
        self.norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6)
        self.norm_out_text = AdaLayerNormContinuous(joint_attention_dim, dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * self.out_channels)

    @classmethod
    def from_transformer_config(cls, config: dict, text_latent_dim: int = 64) -> "OmniFlowTransformer":
        """Builds the model from a released ``transformer/config.json`` dict (``load_config(folder)``),
        with ``text_output`` sized for the text VAE's ``vae_dim``. Wrap in ``accelerate.init_empty_weights()``
        to build the full-size model without allocating its parameters."""
        init_kwargs, _, _ = cls.extract_init_dict(config)
        return cls(**init_kwargs, text_latent_dim=text_latent_dim)

    @property
    def text_latent_dim(self) -> int:
        return self.text_output.out_features

    def forward(
        self,
        hidden_states: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | None,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor | None,
        timestep_text: torch.Tensor | None = None,
        timestep_audio: torch.Tensor | None = None,
        audio_hidden_states: torch.Tensor | None = None,
        *,
        use_text_output: bool = True,
        split_cond: bool = False,
        drop_image: bool = False,
        drop_text: bool = False,
        drop_audio: bool = False,
    ) -> OmniFlowTransformerOutput:
        """One denoising pass over the three streams.

        Args:
            hidden_states: image latents [B, C, H, W] (VAE latents x scaling_factor, noised).
            encoder_hidden_states: text rows [B, L, joint_attention_dim]; the text latents [B, 32, vae_dim]
                zero-padded to joint_attention_dim (optionally after other prompt rows).
            pooled_projections: [B, pooled_projection_dim] conditioning vector (CLIP/audio embedding or zeros).
            timestep, timestep_text, timestep_audio: per-modality t on the 0..1000 scale ([B] or scalar);
                t = 1000 is pure noise. A conditioning modality is fed clean at t = 0; an absent one at
                t = 1000 with random content (the training convention).
            audio_hidden_states: audio latents [B, 8, 256, 16]. If None (and not ``drop_audio``) the
                released behaviour is kept: zeros fed as clean (t = 0) audio.
            use_text_output: run the text head (needs ``timestep_text``, which then also conditions temb).
            split_cond: each stream (and its output norm) uses only its own timestep embedding.
            drop_image / drop_text / drop_audio: leave that stream out of the joint attention entirely.

        Returns:
            :class:`OmniFlowTransformerOutput` with the image/audio velocities, the text x0 prediction and
            the 4096-d text features (``text_hidden``) that a trained head can replace ``text_output`` on.
        """
        image = None if drop_image else hidden_states
        text = None if drop_text else encoder_hidden_states
        audio = None
        batch = pooled_projections.shape[0]
        if image is not None:
            if timestep is None:
                raise ValueError("the image stream needs `timestep`")
            height, width = image.shape[-2:]
            t_image = self.time_text_embed(_batched(timestep, pooled_projections), pooled_projections)
            image = self.pos_embed(image)
        if not drop_audio:
            if audio_hidden_states is None:
                audio_hidden_states = pooled_projections.new_zeros(batch, *AUDIO_LATENT_SHAPE)
                timestep_audio = torch.zeros(batch, device=pooled_projections.device)
            elif timestep_audio is None:
                raise ValueError("`audio_hidden_states` were given without `timestep_audio`")
            t_audio = self.time_aud_embed(_batched(timestep_audio, pooled_projections), pooled_projections)
            audio = self.audio_embedder(audio_hidden_states)
        use_text_output = use_text_output and text is not None
        if use_text_output:
            if timestep_text is None:
                raise ValueError("use_text_output=True needs `timestep_text`")
            t_text = self.time_image_embed(_batched(timestep_text, pooled_projections), pooled_projections)
        if text is not None:
            text = self.context_embedder(text)

        embeds = [
            t_image if image is not None else None,
            t_audio if audio is not None else None,
            t_text if use_text_output else None,
        ]
        if split_cond:
            if image is None:
                raise ValueError("split_cond=True needs the image stream (its embedding is the shared temb)")
            temb, temb_audio, temb_text = embeds
        else:
            present = [e for e in embeds if e is not None]
            if not present:
                raise ValueError("no stream left to condition on: image and audio dropped and use_text_output=False")
            temb = present[0]
            for e in present[1:]:
                temb = temb + e
            temb_text = temb_audio = None

        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                image, text, audio = self._gradient_checkpointing_func(
                    block, image, text, audio, temb, temb_text, temb_audio
                )
            else:
                image, text, audio = block(image, text, audio, temb, temb_text, temb_audio)

        image_out = audio_out = text_x0 = text_hidden = None
        if image is not None:
            patch = self.config.patch_size
            image = self.proj_out(self.norm_out(image, temb))
            image_out = _unpatchify(image, height // patch, width // patch, patch, self.out_channels)
        if use_text_output:
            text_hidden = self.norm_out_text(
                self.context_decoder["projection"](text), temb if temb_text is None else temb_text
            )
            text_x0 = self.text_output(text_hidden)
        if audio is not None:
            audio = self.proj_out_aud(self.norm_out_aud(audio, temb if temb_audio is None else temb_audio))
            channels, height_a, width_a = AUDIO_LATENT_SHAPE
            audio_out = _unpatchify(audio, height_a // AUDIO_PATCH, width_a // AUDIO_PATCH, AUDIO_PATCH, channels)
        return OmniFlowTransformerOutput(
            image=image_out, text_x0=text_x0, text_hidden=text_hidden, text_stream=text, audio=audio_out
        )


def _batched(timestep: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] timestep as a [B] tensor on ``like``'s device (B = ``like.shape[0]``)."""
    timestep = torch.as_tensor(timestep, device=like.device)
    return timestep.expand(like.shape[0]) if timestep.ndim == 0 else timestep


def _check_config(config) -> None:
    """Rejects released-config switches this implementation does not build."""
    unsupported = {
        "add_audio": (config.add_audio, True),
        "add_clip": (config.add_clip, False),
        "use_audio_mae": (config.use_audio_mae, False),
        "drop_text": (config.drop_text, False),
        "drop_image": (config.drop_image, False),
        "drop_audio": (config.drop_audio, False),
        "decoder_config": (config.decoder_config, ""),
        "dual_attention_layers": (list(config.dual_attention_layers), []),
    }
    for key, (value, supported) in unsupported.items():
        if value != supported:
            raise OmniFlowConfigError(f"transformer config {key}={value!r} is not supported (only {supported!r})")
    if config.qk_norm not in _QK_NORMS:
        raise OmniFlowConfigError(f"transformer config qk_norm={config.qk_norm!r}; expected one of {_QK_NORMS}")
    dim = config.num_attention_heads * config.attention_head_dim
    if config.caption_projection_dim != dim:
        raise OmniFlowConfigError(
            f"transformer config caption_projection_dim={config.caption_projection_dim} must equal "
            f"num_attention_heads * attention_head_dim = {dim}"
        )
    if dim % 4:
        raise OmniFlowConfigError(f"transformer width {dim} must be divisible by 4 (2-D sin-cos positions)")
