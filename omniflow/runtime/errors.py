"""User-facing errors: one clear line that says what is wrong and where.

Scripts run their ``main`` through :func:`run_main`, which prints such an error as a single
line on stderr (the full traceback goes to the run's log file) and exits with status 2.
"""
from __future__ import annotations

import logging
import sys
import traceback
from typing import Callable

logger = logging.getLogger("omniflow")


class OmniflowError(Exception):
    """Base class for errors whose message is meant for the user as is."""


class ConfigError(OmniflowError, ValueError):
    """A bad option value, an unknown config key or an inconsistent combination of options."""


class DataError(OmniflowError, ValueError):
    """Unreadable or malformed input data (names the file and, where known, the record)."""


class CheckpointError(OmniflowError, ValueError):
    """A checkpoint or weight file that is missing, corrupt or does not fit the model."""


class NonFiniteLossError(OmniflowError, FloatingPointError):
    """A loss term became NaN or Inf; the message names the step and every term."""


# Errors whose message already says what and where: ours, and OSError, which the OS and the libraries raise for
# a file they cannot find or read (transformers and diffusers name a config.json that is not JSON, PIL an image).
# Programming errors (TypeError, KeyError, ...) stay tracebacks.
_USER_FACING = (OmniflowError, OSError)


# Called with the exception that ends ``main`` (see failures.FailureWatch): a hook may return the one line to stop
# with instead of the exception's own report (this rank's collective failed because another rank did).
_error_hooks: list[Callable[[BaseException], str | None]] = []


def add_error_hook(hook: Callable[[BaseException], str | None]) -> None:
    _error_hooks.append(hook)


def run_main(main: Callable[[], object]) -> None:
    """Call ``main()``; turn user-facing errors into one stderr line and exit code 2 (exit code 1 with a hook's
    line: this rank stopped because another one failed)."""
    try:
        main()
    except Exception as err:
        stop_lines = (hook(err) for hook in _error_hooks)
        line = next((found for found in stop_lines if found is not None), None)
        if line is None and not isinstance(err, _USER_FACING):
            raise
        logger.debug("".join(traceback.format_exception(err)))
        print(line or f"error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        sys.exit(1 if line else 2)
