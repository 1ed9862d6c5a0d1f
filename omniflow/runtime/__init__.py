"""Training runtime shared by every script: options, launch, checkpoints, logging, hub, export."""
