"""Shared pieces of the FLOAT tests: fixture paths, the golden subset and the tiny model.

The fixtures in ``tests/fixtures/float/`` come from the reference data set (see its README):
``tiny_float.pth``, the two tiny wav2vec2 folders, ``release_keys.txt`` and
``golden.safetensors``, a subset of ``golden.pt`` in which a few large tensors are strided
(``GOLDEN_STRIDES``) to keep the fixtures small. Rebuild it with
``python tests/float_helpers.py /path/to/float_reference``.
"""
from __future__ import annotations

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
SPEECH = (FIXTURES / "speech" / "cards_002.wav", FIXTURES / "speech" / "librivox_0880.wav")

# Fixed tolerance for outputs whose measured float32 sensitivity S (parity_helpers) is at most 1/8 of
# atol + rtol * |golden|: ours and the golden each err by up to ~2.4 S, so their gap stays below 0.6
# of the tolerance. Measured S: at most 0.08 of it for the FMT, ODE, sampling, encoders and emotion
# outputs; 0.23 for the wav2vec2 features and far more for the motion decoder's images, which are
# therefore compared within their measured noise instead.
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


def tiny_config(**overrides):
    from omniflow.models.float import FloatConfig
    return FloatConfig.preset("tiny", wav2vec_model_path=str(AUDIO_DIR), audio2emotion_path=str(EMOTION_DIR),
                              **overrides)


def write_wide_wav2vec2(folder: Path) -> Path:
    """A random wav2vec2 whose stacked layer outputs are 9216 wide (48 layers x 192) like the
    release's 12 x 768, so the tiny reference checkpoint's audio projection fits its features.
    Saved with ``save_pretrained`` next to the tiny folder's feature-extractor settings."""
    import shutil

    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(hidden_size=192, num_hidden_layers=48, num_attention_heads=4, intermediate_size=64,
                            conv_dim=(24,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=16, vocab_size=32)
    torch.manual_seed(0)
    Wav2Vec2Model(config).save_pretrained(folder)
    shutil.copy(AUDIO_DIR / "preprocessor_config.json", folder)
    return folder


def write_talking_head(path: Path, speech: Path | None, seconds: float = 2.0, fps: float = 30.0,
                       size: tuple[int, int] = (144, 176), audio_rate: int = 48000, phase: float = 0.0) -> Path:
    """A short talking-head-like MP4: scikit-image's astronaut portrait, framed off-centre and
    moving by a few pixels from frame to frame, with ``speech`` (resampled to ``audio_rate``) or
    digital silence (``speech`` None) as its AAC track."""
    import math

    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    from omniflow.data.float_media import read_audio, write_video

    audio = read_audio(speech, audio_rate) if speech is not None else np.zeros(int(seconds * audio_rate), np.float32)
    duration = len(audio) / audio_rate
    portrait = skdata.astronaut()  # 512 x 512, the face around rows 30-230, columns 120-330
    frames = []
    for k in range(math.ceil(duration * fps)):
        t = k / fps
        dx = round(6 * math.sin(2 * math.pi * 1.3 * t + phase))
        dy = round(4 * math.sin(2 * math.pi * 2.1 * t + 1 + phase))
        crop = portrait[10 + dy:310 + dy, 60 + dx:420 + dx]
        frames.append(np.asarray(Image.fromarray(crop).resize(size[::-1], Image.Resampling.BILINEAR)))
    return write_video(path, np.stack(frames), fps, audio, audio_rate)


def write_film_clip(path: Path, frames, rate, speech: Path) -> Path:
    """An AVI as film rips come: MPEG-4 Part 2 video and 48 kHz stereo AC3 audio (``speech``, the right
    channel at half level), one AC3 frame (1536 samples, 32 ms) per packet."""
    from fractions import Fraction

    import av
    import numpy as np

    from omniflow.data.float_media import read_audio

    audio = read_audio(speech, 48000)
    stereo = np.stack([audio, audio * 0.5]).astype(np.float32)
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=Fraction(rate).limit_denominator(1001))
        video.height, video.width = frames[0].shape[:2]
        video.pix_fmt = "yuv420p"
        ac3 = container.add_stream("ac3", rate=48000)
        ac3.layout = "stereo"
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
        for start in range(0, stereo.shape[1], 1536):
            chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(stereo[:, start:start + 1536]), format="fltp",
                                               layout="stereo")
            chunk.sample_rate = 48000
            container.mux(ac3.encode(chunk))
        container.mux(ac3.encode())
    return path


def damage_packets(source: Path, target: Path, audio_packet: int, video_packet: int) -> Path:
    """A copy of ``source`` whose ``audio_packet``-th audio and ``video_packet``-th video packets (counted
    among non-empty ones) are overwritten with seeded random bytes (the video one after its first 4 bytes)."""
    import av
    import numpy as np

    with av.open(str(source)) as container:
        packets = [(p.stream.type, p.pos, p.size) for p in container.demux() if p.size]
    data = bytearray(source.read_bytes())
    rng = np.random.default_rng(0)
    for kind, index, keep in (("audio", audio_packet, 0), ("video", video_packet, 4)):
        _, pos, size = [p for p in packets if p[0] == kind][index]
        data[pos + keep:pos + size] = rng.integers(0, 256, size - keep, dtype=np.uint8).tobytes()
    target.write_bytes(bytes(data))
    return target


def build_golden_subset(reference_dir: Path) -> None:
    golden = torch.load(reference_dir / "golden.pt", weights_only=True)
    keep = {k: strided(k, v).contiguous() for k, v in golden.items()
            if k.startswith(GOLDEN_CASES) or k in GOLDEN_HOOKS}
    save_file(keep, str(GOLDEN), metadata={"source": "golden.pt of the FLOAT reference data, seed 0"})


if __name__ == "__main__":
    build_golden_subset(Path(sys.argv[1]))
