"""Shared pieces of the FLOAT tests: fixture paths, the golden subset and the tiny model.

The fixtures in ``tests/fixtures/float/`` come from the reference data set (see its README):
``tiny_float.pth``, the two tiny wav2vec2 folders, ``release_keys.txt`` and
``golden.safetensors``, a subset of ``golden.pt`` in which a few large tensors are strided
(``GOLDEN_STRIDES``) to keep the fixtures small. Rebuild it with
``python tests/float_helpers.py /path/to/float_reference``.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FIXTURES = Path(__file__).parent / "fixtures" / "float"
TINY_CHECKPOINT = FIXTURES / "tiny_float.pth"
AUDIO_DIR = FIXTURES / "wav2vec2-base-960h"
EMOTION_DIR = FIXTURES / "wav2vec-english-speech-emotion-recognition"
GOLDEN = FIXTURES / "golden.safetensors"
RELEASE_KEYS = FIXTURES / "release_keys.txt"

ATOL, RTOL = 1e-5, 1e-4

# golden cases kept whole (inputs and outputs)
GOLDEN_CASES = ("fmt_main.in.", "fmt_main.out", "fmt_noprev.", "fmt_train.", "fmt_cfg.", "ode.", "sample1.",
                "sample2.", "sample_emo.", "audio_feat.", "audio_feat_train.", "emotion.", "enc.in.", "enc.out.s_r",
                "enc.out.lambda", "enc.out.r_s", "enc.direction_Q", "enc.out.feats.", "dec.", "dec_seq.",
                "gen_fwd.", "e2e.", "tables.")
# a few FMT intermediates, to localise a failure
GOLDEN_HOOKS = ("fmt_main.hook.t_embedder", "fmt_main.hook.c_embedder", "fmt_main.hook.x_embedder",
                "fmt_main.hook.blocks.0", "fmt_main.hook.blocks.1", "fmt_main.hook_in.decoder.c")
# large outputs stored strided: key -> (frame step or None, spatial step)
GOLDEN_STRIDES = {"enc.out.feats.2": (None, 2), "enc.out.feats.3": (None, 4), "enc.out.feats.4": (None, 4),
                  "dec.out.img": (None, 2), "gen_fwd.out.d_hat": (None, 2), "dec_seq.out": (None, 2),
                  "e2e.d_hat": (3, 2)}


def strided(key: str, value: torch.Tensor) -> torch.Tensor:
    """The part of a golden tensor that the fixture keeps (the whole tensor unless strided)."""
    if key not in GOLDEN_STRIDES:
        return value
    frames, pixels = GOLDEN_STRIDES[key]
    value = value[::frames] if frames else value
    return value[..., ::pixels, ::pixels].contiguous()


def load_golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN))


def case_inputs(golden: dict[str, torch.Tensor], case: str) -> dict[str, torch.Tensor]:
    prefix = f"{case}.in."
    return {k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, atol: float = ATOL, rtol: float = RTOL):
    actual, expected = actual.detach().float(), expected.float()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} vs golden {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), f"{name}: max abs diff {diff:.3e}"


@contextlib.contextmanager
def reference_threads(n: int = 2):
    """Run with ``n`` intra-op threads. The motion decoder's flow warps amplify rounding
    differences ~1e3-fold, and single-threaded conv kernels round differently from the
    multi-threaded ones the goldens were made with."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_config(**overrides):
    from omniflow.models.float import FloatConfig
    return FloatConfig.preset("tiny", wav2vec_model_path=str(AUDIO_DIR), audio2emotion_path=str(EMOTION_DIR),
                              **overrides)


def build_golden_subset(reference_dir: Path) -> None:
    golden = torch.load(reference_dir / "golden.pt", weights_only=True)
    keep = {k: strided(k, v).contiguous() for k, v in golden.items()
            if k.startswith(GOLDEN_CASES) or k in GOLDEN_HOOKS}
    save_file(keep, str(GOLDEN), metadata={"source": "golden.pt of the FLOAT reference data, seed 0"})


if __name__ == "__main__":
    build_golden_subset(Path(sys.argv[1]))
