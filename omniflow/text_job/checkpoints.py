"""Head exports of the text job and the ``--checkpoint`` argument of ``generate_text.py``.

``train_text.py`` writes ``<output_dir>/best_head/`` (lowest validation loss) and
``<output_dir>/final_head/`` (last step): ``model.safetensors`` + ``config.json`` holding the stack's
config plus ``model_path``, ``step`` and ``val_loss``. ``--checkpoint`` takes such a folder, its
safetensors file, a training output folder (its ``best_head/`` is used), a glob matching one of
these (``'checkpoints/x/best_*'``; the seed's ``best_*.pt`` is read as ``best_*``), or ``none`` for the
released ``text_output``.
"""
from __future__ import annotations

import glob
import json
from pathlib import Path

from typing import TYPE_CHECKING

from ..runtime.errors import CheckpointError
from ..runtime.export import CONFIG_NAME, WEIGHTS_NAME

if TYPE_CHECKING:  # torch is imported when a head loads: the grid runner reads these names without it
    from ..models.text_heads import TextHeadStack

BEST_HEAD = "best_head"
FINAL_HEAD = "final_head"
NO_HEAD = "none"


def resolve_head_checkpoint(spec: str | None) -> Path | None:
    """The head export folder that ``--checkpoint`` names, or None for the released model."""
    if spec is None or spec.strip().lower() in (NO_HEAD, ""):
        return None
    matches = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
    if not matches and spec.endswith(".pt"):  # the seed's 'best_*.pt' names the best head: best_head/ here
        matches = sorted(glob.glob(spec[:-3]))
    if not matches:
        raise FileNotFoundError(f"--checkpoint {spec}: no file or folder matches (train_text.py exports heads as "
                                f"<output_dir>/{BEST_HEAD}/ and <output_dir>/{FINAL_HEAD}/)")
    if len(matches) > 1:
        raise CheckpointError(f"--checkpoint {spec} matches {len(matches)} paths ({', '.join(matches[:4])}); "
                              "name one")
    path = Path(matches[0])
    if path.is_file():
        path = path.parent
    if path.is_dir() and not (path / WEIGHTS_NAME).is_file() and (path / BEST_HEAD / WEIGHTS_NAME).is_file():
        path = path / BEST_HEAD
    if not (path / WEIGHTS_NAME).is_file() or not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"--checkpoint {spec}: {path} holds no head export ({WEIGHTS_NAME} + {CONFIG_NAME}; "
                                f"train_text.py writes <output_dir>/{BEST_HEAD} and <output_dir>/{FINAL_HEAD})")
    return path


def head_config(path: Path) -> dict:
    return json.loads((path / CONFIG_NAME).read_text())


def load_head_for(path: Path, in_dim: int, latent_dim: int, lm_hidden_dim: int, device) -> TextHeadStack:
    """Loads an export and checks that it fits the model (feature width, latent width, LM width)."""
    from ..models.text_heads import load_text_head_stack

    stack = load_text_head_stack(path, device)
    have = (stack.in_dim, stack.latent_dim, stack.lm_hidden_dim)
    want = (in_dim, latent_dim, lm_hidden_dim)
    if have != want:
        raise CheckpointError(
            f"{path}: the head was trained for features/latent/LM widths {have} but the model has {want} "
            f"(trained on {head_config(path).get('model_path', 'another model')})")
    return stack
