"""Choices of the alignment options, importable without torch (the training script parses flags first)."""

INPUT_TYPES = ("image", "latent")  # what the alignment module reads
DIRECTIONS = ("vae1_to_vae2", "vae2_to_vae1")  # which latent space is mapped into which
LOSS_TYPES = ("mse", "l1", "weighted_l1")
