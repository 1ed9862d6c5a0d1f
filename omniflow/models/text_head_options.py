"""The flags of the text decoder head experiments, in a module that imports no torch: train_text.py parses
them (and answers ``--help``) before loading anything heavy."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..runtime.errors import ConfigError


@dataclass
class TextHeadOptions:
    """Flags of the text decoder head experiments (names as in the user's README)."""

    use_text_decoder_head: bool = field(default=False, metadata={
        "help": "train an MLP head on the text-branch features; without it the frozen released "
                "text_output Linear(4096->64) gives the latents (untrained baseline)"})
    text_decoder_head_dim: int = field(default=64, metadata={
        "help": "output width of the head: the text-latent dim (64, fed to the decoder's prefix "
                "projection) or the LM hidden size (2048, fed to the LM as its prefix); "
                "used only with --use_text_decoder_head"})
    text_decoder_head_hidden_dim: int = field(default=1024, metadata={
        "help": "hidden width of the head's residual MLP branch"})
    use_vq_codebook: bool = field(default=False, metadata={
        "help": "quantise the head output with a learnt codebook (straight-through, commitment "
                "loss, dead-code restarts); needs --use_text_decoder_head"})
    vq_codebook_size: int = field(default=8192, metadata={"help": "number of codes in the VQ codebook"})
    vq_commitment_beta: float = field(default=0.25, metadata={
        "help": "weight beta of the commitment term beta*||z - sg(e)||^2 that pulls the head output to its code"})
    vq_dead_code_steps: int = field(default=1, metadata={
        "help": "re-seed a code from recent head outputs after it went unused for this many "
                "training steps (counted over all ranks); 0 disables restarts"})
    vq_restart_pool: int = field(default=1024, metadata={
        "help": "how many of the latest head outputs (token vectors) dead codes are re-seeded from; "
                "0: the current batch only"})
    use_latent_refiner: bool = field(default=False, metadata={
        "help": "residual MLP on the latents, applied before decoding (starts as the identity)"})
    latent_refiner_hidden_dim: int = field(default=256, metadata={"help": "hidden width of the LatentRefiner MLP"})
    latent_refiner_layers: int = field(default=2, metadata={"help": "number of hidden layers in the LatentRefiner MLP"})
    latent_mse_weight: float = field(default=1.0, metadata={
        "help": "weight lambda of the MSE between the head output and the frozen text-VAE latent of "
                "the target text (mapped through the prefix projection for a 2048-d head)"})

    def validate(self) -> None:
        positive = ("text_decoder_head_dim", "text_decoder_head_hidden_dim", "vq_codebook_size",
                    "latent_refiner_hidden_dim", "latent_refiner_layers")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("vq_commitment_beta", "vq_dead_code_steps", "vq_restart_pool", "latent_mse_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.use_vq_codebook and not self.use_text_decoder_head:
            raise ConfigError("--use_vq_codebook quantises the trained head's output: add --use_text_decoder_head")
