"""Errors raised while building or loading OmniFlow; each message names the file, key or value at fault.

They derive from the runtime's user-facing errors, so scripts print them as one line.
"""
from __future__ import annotations

from ...runtime import errors as runtime_errors


class OmniFlowConfigError(runtime_errors.ConfigError):
    """A config value this implementation does not support, or two values that do not fit together."""


class CheckpointError(runtime_errors.CheckpointError):
    """A weight file that does not fit the model (missing, unexpected or mis-shaped keys)."""


class MissingComponentError(FileNotFoundError):
    """A component folder or weight file that is not where it should be."""
