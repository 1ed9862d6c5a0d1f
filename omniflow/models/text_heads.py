"""Trainable text decoder heads for OmniFlow: the user's experiment grid (baseline MLP head,
+ LatentRefiner, VQ codebook head, VQ + refiner) and the decoder loss.

Data flow of :class:`TextHeadStack` (all per token, T = 32 text-latent tokens in the release)::

    text-branch features [B, T, in_dim]                 (in_dim = 4096, after norm_out_text)
      -> TextDecoderHead, or the frozen released text_output   [B, T, D]
      -> VQCodebookHead (optional)                             [B, T, D]
      -> LatentRefiner (optional)                              [B, T, D]
      -> frozen text-VAE decoder: D = latent_dim (64) goes through its prefix projection
         Linear(64 -> 2048); D = the LM hidden size (2048) is the LM prefix itself.

The refiner therefore works on the decoder's *input*, never on its logits, and the decoder
loss (:func:`text_decoder_loss`) is a shifted next-token cross-entropy with padding masked.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omniflow.models.text_head_options import TextHeadOptions
from omniflow.models.vq.quantizers import VectorQuantizer, all_reduce_sum
from omniflow.runtime.errors import CheckpointError, ConfigError
from omniflow.runtime.export import load_export, load_state_dict_strict

CONFIG_FORMAT = "omniflow-text-heads"
CONFIG_VERSION = 1


def _zero_(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class TextDecoderHead(nn.Module):
    """Text-branch features [B, T, in_dim] -> decoder input [B, T, out_dim].

    ``linear(x) + mlp(x)``: a linear path that can start as the released ``text_output`` and a
    residual MLP branch (LayerNorm, GELU) whose last layer is zero, so that after
    :meth:`init_from_text_output` the head reproduces the released model exactly.
    ``out_dim`` must be ``latent_dim`` (kind ``"latent"``) or ``lm_hidden_dim`` (kind ``"prefix"``).
    """

    def __init__(self, in_dim: int, out_dim: int, latent_dim: int, lm_hidden_dim: int, hidden_dim: int = 1024) -> None:
        super().__init__()
        if out_dim not in (latent_dim, lm_hidden_dim):
            raise ConfigError(
                f"--text_decoder_head_dim {out_dim} is not supported: use {latent_dim} (the text latent, "
                f"fed to the decoder's prefix projection) or {lm_hidden_dim} (the LM hidden size, "
                f"fed as the LM prefix)")
        self.kind = "latent" if out_dim == latent_dim else "prefix"
        self.in_dim, self.out_dim = in_dim, out_dim
        self.linear = nn.Linear(in_dim, out_dim)
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                 _zero_(nn.Linear(hidden_dim, out_dim)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features) + self.mlp(features)

    @torch.no_grad()
    def init_from_text_output(self, text_output: nn.Linear, prefix_proj: nn.Linear | None = None,
                              latent_scale: float = 1.0) -> None:
        """Start the linear path from the released ``text_output`` Linear(in_dim -> latent_dim).

        A ``"prefix"`` head starts from the composition ``prefix_proj(text_output(x) / latent_scale)``
        (the decoder's prefix projection, e.g. ``text_vae.input_proj`` with ``vae_scale``), so both
        kinds begin exactly where the released model is. ``prefix_proj`` is unused for ``"latent"``.
        """
        if text_output.in_features != self.in_dim:
            raise CheckpointError(f"text_output weight {tuple(text_output.weight.shape)} does not fit a head "
                                  f"reading {self.in_dim}-d features")
        weight = text_output.weight.float()
        bias = text_output.bias.float() if text_output.bias is not None else weight.new_zeros(weight.shape[0])
        if self.kind == "prefix":
            if prefix_proj is None:
                raise ConfigError("initialising a prefix head (--text_decoder_head_dim = LM hidden size) from "
                                  "text_output needs the decoder's prefix projection")
            if prefix_proj.in_features != weight.shape[0] or prefix_proj.out_features != self.out_dim:
                raise CheckpointError(f"prefix projection weight {tuple(prefix_proj.weight.shape)} does not map "
                                      f"text_output's {weight.shape[0]}-d latents to {self.out_dim}")
            proj_weight = prefix_proj.weight.float() / latent_scale
            proj_bias = prefix_proj.bias.float() if prefix_proj.bias is not None else 0.0
            weight, bias = proj_weight @ weight, proj_weight @ bias + proj_bias
        elif weight.shape[0] != self.out_dim:
            raise CheckpointError(f"text_output weight {tuple(text_output.weight.shape)} does not give "
                                  f"{self.out_dim}-d latents")
        self.linear.weight.copy_(weight)
        self.linear.bias.copy_(bias)


class LatentRefiner(nn.Module):
    """``x + MLP(LayerNorm(x))`` on decoder inputs [B, T, dim]; ``layers`` hidden layers of width
    ``hidden_dim``. The last layer starts at zero, so a new refiner is the identity."""

    def __init__(self, dim: int, hidden_dim: int = 256, layers: int = 2) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.LayerNorm(dim)]
        width = dim
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden_dim), nn.GELU()]
            width = hidden_dim
        blocks.append(_zero_(nn.Linear(width, dim)))
        self.mlp = nn.Sequential(*blocks)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return latents + self.mlp(latents)


@dataclass
class VQHeadOutput:
    quantized: torch.Tensor  # [B, T, D], straight-through w.r.t. the head output, input dtype
    loss: torch.Tensor  # ||sg(z) - e||^2 + beta * ||z - sg(e)||^2, fp32 scalar
    indices: torch.Tensor  # [B, T] int64
    perplexity: torch.Tensor  # exp(entropy of the code histogram)
    usage: torch.Tensor  # fraction of the codebook used


class VQCodebookHead(nn.Module):
    """Nearest-code quantisation of per-token head outputs [B, T, codebook_dim].

    Uses the shared :class:`~omniflow.models.vq.quantizers.VectorQuantizer`: fp32 distances with
    autocast off, straight-through estimator, codes seeded from the first training batch. A batch
    holds only B x 32 token vectors, far fewer than the 8192 codes, so a code unused for
    ``dead_code_steps`` steps is re-seeded from the last ``restart_pool`` head outputs: the codebook
    then follows the head as it trains, which a codebook learnt by gradient cannot at a small learning
    rate (benchmarks/bench_vq_heads.py: restarted after 100 steps from the current batch, the
    8192-code head barely lowered its cross-entropy in 40 steps; an EMA codebook and the rotation
    trick did no better). In training the code histogram (hence perplexity and usage) is summed over
    ranks and restarts are broadcast from rank 0; in eval it is per rank, and ``indices`` let a caller
    count codes over a whole validation set.
    """

    def __init__(self, codebook_dim: int, num_codes: int = 8192, beta: float = 0.25,
                 dead_code_steps: int = 1, restart_pool: int = 1024) -> None:
        super().__init__()
        self.quantizer = VectorQuantizer(num_codes, codebook_dim, beta=beta, dead_code_steps=dead_code_steps,
                                         restart_pool=restart_pool)

    def forward(self, z: torch.Tensor) -> VQHeadOutput:
        # The quantizer works on (B, C, H, W) maps: tokens become a W=1 column.
        out = self.quantizer(z.transpose(1, 2).unsqueeze(-1))
        indices = out.indices.squeeze(-1)
        with torch.no_grad():
            counts = torch.bincount(indices.flatten(), minlength=self.quantizer.num_codes)
            if self.training:
                all_reduce_sum(counts)
            usage = (counts > 0).float().mean()
        return VQHeadOutput(out.quantized.squeeze(-1).transpose(1, 2), out.loss, indices, out.perplexity, usage)


@dataclass
class HeadOutput:
    latents_or_prefix: torch.Tensor  # [B, T, D]: what the frozen decoder consumes
    kind: str  # "latent": D = latent_dim, goes through the prefix projection; "prefix": D = LM hidden
    vq_loss: torch.Tensor  # fp32 scalar, zero without VQ
    stats: dict[str, torch.Tensor]  # detached scalars to log (vq_perplexity, vq_usage)
    codes: torch.Tensor | None = None  # [B, T] VQ code indices, None without VQ


class TextHeadStack(nn.Module):
    """Head -> optional VQ -> optional refiner, built from :class:`TextHeadOptions`.

    ``text_output`` is the released Linear(in_dim -> latent_dim): it initialises a trained head,
    and without ``use_text_decoder_head`` a frozen copy of it is the head (the untrained
    baseline; then it is required). ``prefix_proj``/``latent_scale`` describe the decoder's
    prefix projection (``text_vae.input_proj``, ``text_vae.vae_scale``) for a prefix head.
    The stack keeps copies, never references, of these modules.
    """

    def __init__(self, options: TextHeadOptions, in_dim: int, latent_dim: int, lm_hidden_dim: int,
                 text_output: nn.Linear | None = None, prefix_proj: nn.Linear | None = None,
                 latent_scale: float = 1.0) -> None:
        super().__init__()
        options.validate()
        self.options = options
        self.in_dim, self.latent_dim, self.lm_hidden_dim = in_dim, latent_dim, lm_hidden_dim
        self.head: TextDecoderHead | None = None
        self.text_output: nn.Linear | None = None
        if options.use_text_decoder_head:
            self.head = TextDecoderHead(in_dim, options.text_decoder_head_dim, latent_dim, lm_hidden_dim,
                                        options.text_decoder_head_hidden_dim)
            if text_output is not None:
                self.head.init_from_text_output(text_output, prefix_proj, latent_scale)
            self.kind, width = self.head.kind, self.head.out_dim
        else:
            if text_output is None:
                raise ConfigError("without --use_text_decoder_head the released text_output Linear "
                                  "is the head: pass it")
            if (text_output.in_features, text_output.out_features) != (in_dim, latent_dim):
                raise CheckpointError(f"text_output weight {tuple(text_output.weight.shape)} does not map "
                                      f"{in_dim}-d features to {latent_dim}-d latents")
            self.text_output = nn.Linear(in_dim, latent_dim, bias=text_output.bias is not None)
            self.text_output.load_state_dict(text_output.state_dict())
            self.text_output.requires_grad_(False)
            self.kind, width = "latent", latent_dim
        self.vq = (VQCodebookHead(width, options.vq_codebook_size, options.vq_commitment_beta,
                                  options.vq_dead_code_steps, options.vq_restart_pool)
                   if options.use_vq_codebook else None)
        self.refiner = (LatentRefiner(width, options.latent_refiner_hidden_dim, options.latent_refiner_layers)
                        if options.use_latent_refiner else None)

    def forward(self, features: torch.Tensor) -> HeadOutput:
        """Features [B, T, in_dim] -> decoder input. The refiner runs last, on the latents (or
        prefix) that the frozen decoder then decodes: before decoding, not on its logits."""
        if features.ndim != 3 or features.shape[-1] != self.in_dim:
            raise ValueError(f"text heads expect features [B, T, {self.in_dim}], got {tuple(features.shape)}")
        x = self.head(features) if self.head is not None else self.text_output(features)
        vq_loss = torch.zeros((), device=features.device)
        stats: dict[str, torch.Tensor] = {}
        codes = None
        if self.vq is not None:
            vq = self.vq(x)
            x, vq_loss, codes = vq.quantized, vq.loss, vq.indices
            stats = {"vq_perplexity": vq.perplexity.detach(), "vq_usage": vq.usage.detach()}
        if self.refiner is not None:
            x = self.refiner(x)
        return HeadOutput(x, self.kind, vq_loss, stats, codes)

    def auxiliary_losses(self, output: HeadOutput, target_latent: torch.Tensor, prefix_proj: nn.Linear | None = None,
                         latent_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """The head's loss terms besides the decoder CE (all fp32 scalars).

        ``latent_mse``: MSE to the frozen text-VAE latent of the target [B, T, latent_dim]; for a
        prefix head the target goes through ``prefix_proj(target / latent_scale)`` first (no gradient).
        ``vq_loss``: the VQ term. ``aux_loss`` = latent_mse_weight * latent_mse + vq_loss.
        """
        target = target_latent.detach().float()
        if output.kind == "prefix":
            if prefix_proj is None:
                raise ConfigError("the latent MSE of a prefix head needs the decoder's prefix projection")
            with torch.no_grad():
                bias = prefix_proj.bias.float() if prefix_proj.bias is not None else None
                target = F.linear(target / latent_scale, prefix_proj.weight.float(), bias)
        pred = output.latents_or_prefix.float()
        if pred.shape != target.shape:
            raise ValueError(f"head output {tuple(pred.shape)} and target latent {tuple(target.shape)} differ in shape")
        mse = F.mse_loss(pred, target)
        return {"latent_mse": mse, "vq_loss": output.vq_loss,
                "aux_loss": self.options.latent_mse_weight * mse + output.vq_loss}

    def config(self) -> dict:
        """JSON-safe description that :meth:`from_config` rebuilds the module from (without weights)."""
        return {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, "in_dim": self.in_dim,
                "latent_dim": self.latent_dim, "lm_hidden_dim": self.lm_hidden_dim,
                "options": dataclasses.asdict(self.options)}

    @classmethod
    def from_config(cls, config: dict) -> TextHeadStack:
        """Rebuild an untrained stack from :meth:`config`; load the exported weights into it next."""
        if config.get("format") != CONFIG_FORMAT or config.get("version") != CONFIG_VERSION:
            raise ConfigError(f"not a text-heads config (format {config.get('format')!r}, version "
                              f"{config.get('version')!r}; expected {CONFIG_FORMAT!r}, {CONFIG_VERSION})")
        missing = sorted({"in_dim", "latent_dim", "lm_hidden_dim", "options"} - set(config))
        if missing:
            raise ConfigError(f"text-heads config lacks {missing}")
        names = {f.name for f in dataclasses.fields(TextHeadOptions)}
        unknown = sorted(set(config["options"]) - names)
        if unknown:
            raise ConfigError(f"text-heads config has unknown options {unknown}")
        # Heads exported before the restart pool existed were trained (and stored) without one.
        options = TextHeadOptions(**{"vq_restart_pool": 0, **config["options"]})
        in_dim, latent_dim = config["in_dim"], config["latent_dim"]
        # The frozen baseline stores its text_output copy in the weights; a placeholder holds its place.
        placeholder = None if options.use_text_decoder_head else nn.Linear(in_dim, latent_dim)
        return cls(options, in_dim, latent_dim, config["lm_hidden_dim"], text_output=placeholder)


def load_text_head_stack(path: str | Path, device: str | torch.device = "cpu") -> TextHeadStack:
    """Load an export (safetensors + config.json written with ``stack.config()``) in eval mode."""
    state, config = load_export(path, device)
    stack = TextHeadStack.from_config(config).to(device)
    load_state_dict_strict(stack, state, str(path))
    return stack.eval()


@dataclass
class TextLossOutput:
    loss: torch.Tensor  # mean cross-entropy over the scored (non-pad) target tokens, fp32
    token_accuracy: torch.Tensor  # teacher-forced argmax accuracy (a training statistic, not an evaluation)
    perplexity: torch.Tensor  # exp(loss)
    num_tokens: torch.Tensor  # number of scored tokens


def next_token_logits(lm_logits: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """LM logits over the input ``[prefix (prefix_len); target (L)]`` -> logits aligned with the target.

    Position j of a causal LM predicts token j + 1, so positions ``prefix_len - 1 .. prefix_len + L - 2``
    predict target tokens ``0 .. L - 1``: ``lm_logits[:, prefix_len - 1 : -1]``.
    """
    if not 1 <= prefix_len < lm_logits.shape[1]:
        raise ValueError(f"prefix_len {prefix_len} must lie in [1, {lm_logits.shape[1]}) "
                         f"for logits {tuple(lm_logits.shape)}")
    return lm_logits[:, prefix_len - 1 : -1]


def text_decoder_loss(logits: torch.Tensor, target_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      pad_token_id: int | None = None) -> TextLossOutput:
    """Next-token cross-entropy where ``logits[:, i]`` [B, L, V] is the prediction of ``target_ids[:, i]``.

    The shift is the caller's: take ``next_token_logits(lm_logits, prefix_len)`` for an LM run on
    ``[prefix; target]``, or, with ``OmniFlowTextVAE.decode_logits`` (logits of the target positions,
    ``logits[:, i]`` predicting ``ids[:, i + 1]``), pass ``logits[:, :-1], ids[:, 1:], mask[:, 1:]``.
    Tokens where ``attention_mask`` is 0 or that equal ``pad_token_id`` are not scored (pass
    ``pad_token_id=None`` if the pad id doubles as EOS). The mean runs over scored tokens.
    """
    if logits.ndim != 3 or logits.shape[:2] != target_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be [B, L, vocab] for target_ids {tuple(target_ids.shape)}")
    scored = torch.ones_like(target_ids, dtype=torch.bool)
    if attention_mask is not None:
        if attention_mask.shape != target_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match "
                             f"target_ids {tuple(target_ids.shape)}")
        scored &= attention_mask.bool()
    if pad_token_id is not None:
        scored &= target_ids != pad_token_id
    labels = target_ids.masked_fill(~scored, -100)
    num_tokens = scored.sum()
    total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    loss = total / num_tokens.clamp_min(1)
    with torch.no_grad():
        correct = ((logits.argmax(-1) == target_ids) & scored).sum()
        accuracy = correct.float() / num_tokens.clamp_min(1)
    return TextLossOutput(loss, accuracy, loss.detach().exp(), num_tokens)
