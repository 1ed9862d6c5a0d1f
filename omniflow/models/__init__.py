"""Model families: OmniFlow (+ text heads), VQ tokenizers, VAE alignment, FLOAT. Import the sub-modules directly."""
