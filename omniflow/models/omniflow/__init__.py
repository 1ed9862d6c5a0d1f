"""OmniFlow (CVPR 2025) reimplementation: transformer, text VAE, scheduler, loader and pipeline."""
