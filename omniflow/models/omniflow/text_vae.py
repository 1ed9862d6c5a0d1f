"""OmniFlow's text VAE: T5 features -> Q-Former -> 32 latents of 64 dims, decoded by a Llama causal LM.

Encoder: the flan-T5 encoder's last hidden state over 77 tokens (no attention mask), per-token
standardisation, zeroed for empty prompts, then a 6-layer Q-Former with ``n_tokens`` learned queries,
a norm and ``vae_proj`` whose first half is the latent mean ([B, 32, vae_dim]).
Decoder: ``input_proj`` maps the latents to a prefix of LM embeddings (positions 0..31); the text follows.

Parameter names match the released ``LLamaForLatentConnector`` (stored under ``text_decoder.`` in the
transformer checkpoint). The config is the released ``text_vae/config.json``: a ``LlamaConfig`` plus a
``vae_config`` dict.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, DynamicCache, LlamaConfig, LlamaModel

from .errors import OmniFlowConfigError

T5_MAX_LENGTH = 77
QFORMER_LAYERS = 6  # fixed in the released model
# Defaults of the released constructor; ``config.vae_config`` overrides them.
VAE_DEFAULTS = dict(
    prompt_size=1024, vae_dim=1536, vae_hidden_size=1536, n_tokens=32, pre_norm=False,
    norm_type="layer_norm", vae_scale=1.0,
    # Std of the Q-Former's random initial weights (BLIP-2's default, as released). It only matters for
    # models built from scratch: at 0.02 the queries pass almost unchanged, so all texts share one latent.
    qformer_initializer_range=0.02,
)


class OmniFlowTextVAE(nn.Module):
    """Text VAE with a frozen-friendly API for text decoder heads.

    - :meth:`encode` texts (or T5 ids) -> latents [B, n_tokens, vae_dim]
    - :meth:`decode_logits` teacher-forced logits from a latent prefix or a prefix already in LM width
    - :meth:`generate` KV-cached greedy decoding or beam search from such a prefix

    The T5 encoder is attached with :meth:`attach_encoder` (it is an external model; its weights may also be
    present in the checkpoint under ``text_decoder.encoder.*``).
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        vae = {**VAE_DEFAULTS, **(getattr(config, "vae_config", None) or {})}
        if vae["vae_hidden_size"] % 12:
            raise OmniFlowConfigError(
                f"text_vae vae_config.vae_hidden_size={vae['vae_hidden_size']} must be a multiple of 12 "
                "(the Q-Former has 12 heads)"
            )
        if vae["norm_type"] not in ("rms_norm", "layer_norm"):
            raise OmniFlowConfigError(f"text_vae vae_config.norm_type={vae['norm_type']!r}; expected rms_norm|layer_norm")
        config._attn_implementation = "sdpa"
        self.config = config
        self.vae_dim, self.n_tokens, self.vae_scale = vae["vae_dim"], vae["n_tokens"], vae["vae_scale"]
        self.prompt_size, self.pre_norm = vae["prompt_size"], vae["pre_norm"]
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.query = nn.Parameter(torch.randn(1, self.n_tokens, vae["vae_hidden_size"]))
        norm_dim = vae["vae_hidden_size"] if self.pre_norm else self.vae_dim
        if vae["norm_type"] == "rms_norm":
            self.q_norm = nn.RMSNorm(norm_dim, eps=1e-6)
        else:
            self.q_norm = nn.LayerNorm(norm_dim, elementwise_affine=False)
        self.qformer = Blip2QFormerModel(
            Blip2QFormerConfig(
                hidden_size=vae["vae_hidden_size"], num_hidden_layers=QFORMER_LAYERS,
                encoder_hidden_size=self.prompt_size, initializer_range=vae["qformer_initializer_range"],
            )
        )
        self.vae_proj = nn.Linear(vae["vae_hidden_size"], 2 * self.vae_dim)
        hidden = config.hidden_size
        self.input_proj = nn.Linear(self.vae_dim, hidden) if hidden != self.vae_dim else nn.Identity()
        self.encoder: nn.Module | None = None
        self.t5_tokenizer = None

    @property
    def hidden_size(self) -> int:
        """Width of the LM (2048 for TinyLlama); a prefix of this width skips ``input_proj``."""
        return self.config.hidden_size

    @property
    def bos_token_id(self) -> int:
        return self.config.bos_token_id

    @property
    def eos_token_id(self) -> int:
        eos = self.config.eos_token_id
        return eos[0] if isinstance(eos, (list, tuple)) else eos

    def attach_encoder(self, encoder: nn.Module, tokenizer=None) -> None:
        """Registers the T5 encoder (as submodule ``encoder``) and its tokenizer for :meth:`encode`."""
        width = encoder.config.d_model
        if width != self.prompt_size:
            raise OmniFlowConfigError(
                f"T5 encoder width d_model={width} does not match text_vae vae_config.prompt_size={self.prompt_size}"
            )
        self.encoder = encoder
        self.t5_tokenizer = tokenizer

    def enable_gradient_checkpointing(self) -> None:
        """Per-layer checkpointing of the LM (transformers applies it while the LM is in train mode; the LM
        has no dropout, so ``text_vae.model.train()`` keeps a frozen decoder's outputs unchanged)."""
        self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    # ----- encoder -----
    def encode(
        self,
        texts: list[str] | None = None,
        *,
        t5_input_ids: torch.Tensor | None = None,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Texts (or T5 ids [B, 77]) -> latent means [B, n_tokens, vae_dim].

        Empty prompts encode to zeroed T5 features (a learned "null" latent). With ids only, a row whose
        first id is T5's EOS counts as empty (that is how the tokenizer encodes ""). ``sample=True`` adds
        the released training noise, uniform U[0, 1e-3).
        """
        if self.encoder is None:
            raise RuntimeError("no T5 encoder attached; call attach_encoder() (load_omniflow does it)")
        if t5_input_ids is None:
            if texts is None:
                raise ValueError("encode() needs `texts` or `t5_input_ids`")
            if self.t5_tokenizer is None:
                raise RuntimeError("encode(texts) needs the T5 tokenizer; pass it to attach_encoder()")
            t5_input_ids = self.t5_tokenizer(
                list(texts), padding="max_length", max_length=T5_MAX_LENGTH, truncation=True, return_tensors="pt"
            ).input_ids
        device = next(self.encoder.parameters()).device
        t5_input_ids = t5_input_ids.to(device)
        if texts is not None:
            empty = torch.tensor([len(t) == 0 for t in texts], device=device)
        else:
            empty = t5_input_ids[:, 0] == self.encoder.config.eos_token_id
        features = self.encoder(input_ids=t5_input_ids).last_hidden_state
        features = (features - features.mean(-1, keepdim=True)) / (features.std(-1, keepdim=True) + 1e-9)
        if self.vae_dim != 1536:  # the released "legacy" 1536-d variant kept empty prompts' features
            features = features * (~empty).to(features.dtype)[:, None, None]
        return self.latents_from_features(features, sample=sample, generator=generator)

    def latents_from_features(
        self, features: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Normalised T5 features [B, S, prompt_size] -> latents [B, n_tokens, vae_dim] (Q-Former path)."""
        query = self.query.expand(features.shape[0], -1, -1)
        hidden = self.qformer(query_embeds=query, encoder_hidden_states=features).last_hidden_state
        if self.pre_norm:
            hidden = self.q_norm(hidden)
        mean = self.vae_proj(hidden)[..., : self.vae_dim]  # the logvar half is unused
        if not self.pre_norm:
            mean = self.q_norm(mean)
        if sample:
            mean = mean + torch.rand(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype) * 1e-3
        return mean * self.vae_scale

    # ----- decoder -----
    def prefix_embeds(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, P, vae_dim] -> LM prefix embeddings [B, P, hidden_size]."""
        return self.input_proj(latents / self.vae_scale)

    def _prefix(self, latents: torch.Tensor | None, prefix_embeds: torch.Tensor | None) -> torch.Tensor:
        if (latents is None) == (prefix_embeds is None):
            raise ValueError("pass exactly one of `latents` [B, P, vae_dim] or `prefix_embeds` [B, P, hidden_size]")
        if latents is not None:
            if latents.shape[-1] != self.vae_dim:
                raise ValueError(f"latents have width {latents.shape[-1]}, the text VAE expects vae_dim={self.vae_dim}")
            return self.prefix_embeds(latents.to(self.lm_head.weight.dtype))
        if prefix_embeds.shape[-1] != self.hidden_size:
            raise ValueError(
                f"prefix_embeds have width {prefix_embeds.shape[-1]}, the LM expects hidden_size={self.hidden_size}"
            )
        return prefix_embeds.to(self.lm_head.weight.dtype)

    def decode_logits(
        self,
        input_ids: torch.Tensor,
        *,
        latents: torch.Tensor | None = None,
        prefix_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits (fp32) [B, T, vocab] for the T target tokens after the prefix.

        ``logits[:, i]`` predicts ``input_ids[:, i + 1]``: shift before the cross-entropy and mask padding
        (see :func:`decoder_targets`). ``attention_mask`` [B, T] covers the target tokens only.
        """
        prefix = self._prefix(latents, prefix_embeds)
        embeds = torch.cat([prefix, self.model.embed_tokens(input_ids)], dim=1)
        if attention_mask is not None:
            ones = attention_mask.new_ones(attention_mask.shape[0], prefix.shape[1])
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        hidden = self.model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        return self.lm_head(hidden[:, -input_ids.shape[1] :]).float()

    def _start(self, prefix: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
        """Fills a KV cache with the prefix, feeds BOS (position P) and returns the cache and its logits."""
        cache = DynamicCache(config=self.config)
        self.model(inputs_embeds=prefix, past_key_values=cache, use_cache=True)
        bos = torch.full((prefix.shape[0], 1), self.bos_token_id, device=prefix.device)
        return cache, self._next_logits(bos, cache)

    def _next_logits(self, tokens: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        hidden = self.model(input_ids=tokens, past_key_values=cache, use_cache=True).last_hidden_state
        return self.lm_head(hidden[:, -1]).float()

    @torch.no_grad()
    def generate(
        self,
        *,
        latents: torch.Tensor | None = None,
        prefix_embeds: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Decodes text from a prefix: KV-cached greedy search (``num_beams=1``) or beam search.

        The prefix fills positions 0..P-1, BOS is fed at position P, then tokens follow. Returns the new
        tokens [B, N] (N <= max_new_tokens, BOS excluded); after EOS a row holds ``pad_token_id``
        (default: EOS). Beam search ranks finished beams by ``sum log p / length ** length_penalty``.
        """
        prefix = self._prefix(latents, prefix_embeds)
        pad = self.eos_token_id if pad_token_id is None else pad_token_id
        if num_beams > 1:
            return self._beam_search(prefix, max_new_tokens, num_beams, length_penalty, pad)
        cache, logits = self._start(prefix)
        done = torch.zeros(prefix.shape[0], dtype=torch.bool, device=prefix.device)
        tokens = []
        for step in range(max_new_tokens):
            token = torch.where(done, pad, logits.argmax(-1))
            tokens.append(token)
            done |= token == self.eos_token_id
            if done.all() or step == max_new_tokens - 1:
                break
            logits = self._next_logits(token[:, None], cache)
        return torch.stack(tokens, dim=1)

    def _beam_search(self, prefix, max_new_tokens: int, num_beams: int, length_penalty: float, pad: int):
        """Beam search in which a finished beam keeps its slot and continues with ``pad`` at no cost."""
        batch, k = prefix.shape[0], num_beams
        cache, logits = self._start(prefix.repeat_interleave(k, dim=0))
        device = prefix.device
        scores = torch.full((batch, k), float("-inf"), device=device)
        scores[:, 0] = 0.0  # all beams start identical; expand only the first
        done = torch.zeros(batch * k, dtype=torch.bool, device=device)
        lengths = torch.zeros(batch * k, device=device)
        seqs = torch.empty(batch * k, 0, dtype=torch.long, device=device)
        for step in range(max_new_tokens):
            logp = F.log_softmax(logits, dim=-1)
            logp[done] = float("-inf")
            logp[done, pad] = 0.0
            vocab = logp.shape[-1]
            scores, flat = (scores.reshape(-1, 1) + logp).reshape(batch, k * vocab).topk(k, dim=1)
            source = (flat // vocab + torch.arange(batch, device=device)[:, None] * k).reshape(-1)
            token = (flat % vocab).reshape(-1)
            cache.reorder_cache(source)
            seqs = torch.cat([seqs[source], token[:, None]], dim=1)
            done, lengths = done[source], lengths[source] + (~done[source]).float()
            done = done | (token == self.eos_token_id)
            if done.all() or step == max_new_tokens - 1:
                break
            logits = self._next_logits(token[:, None], cache)
        ranked = scores / lengths.reshape(batch, k).clamp(min=1) ** length_penalty
        best = ranked.argmax(dim=1) + torch.arange(batch, device=device) * k
        return seqs[best]


def decoder_targets(tokenizer, texts: list[str], max_length: int = T5_MAX_LENGTH) -> dict[str, torch.Tensor]:
    """Decoder training targets as the release builds them: ``BOS text EOS``, truncated to ``max_length``
    (a truncated text loses its EOS), right-padded with the tokenizer's pad id.

    Returns ``input_ids`` and ``attention_mask`` [B, T] and ``labels`` (pad -> -100), where T is the
    longest row. With :meth:`OmniFlowTextVAE.decode_logits` the loss is
    ``cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=-100)``.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the decoder tokenizer has no pad token (the release adds '[PAD]')")
    rows = [
        ([tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])[
            :max_length
        ]
        for text in texts
    ]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
