"""Errors raised while building or loading OmniFlow; each message names the file, key or value at fault."""
from __future__ import annotations


class OmniFlowConfigError(ValueError):
    """A config value this implementation does not support, or two values that do not fit together."""


class CheckpointError(ValueError):
    """A weight file that does not fit the model (missing, unexpected or mis-shaped keys)."""


class MissingComponentError(FileNotFoundError):
    """A component folder or weight file that is not where it should be."""
