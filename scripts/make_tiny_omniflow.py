"""Write a tiny OmniFlow with random weights in the released folder layout (for tests and the example).

    python scripts/make_tiny_omniflow.py --output_dir /tmp/omniflow-tiny
    # -> /tmp/omniflow-tiny/OmniFlow-tiny/ (load_omniflow folder) and /tmp/omniflow-tiny/models/<hub id>/

With --fit_decoder_on JSONL files (records with "text" and/or "references"), the text VAE's decoder is
first trained to read those texts back from their latents (about a minute on 2 CPU cores for 300 texts),
so that a text head trained on them can change what the decoder writes. With --pretrain_on JSONL files
(records with "image" and "references"), the transformer is then trained on OmniFlow's image->text flow
objective for those captioned images (about a minute for 200 steps), so that its text stream carries the
image; everything else stays random.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omniflow.models.omniflow.layout import TINY_CONFIG_DIR, WEIGHT_FORMATS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--output_dir", type=Path, required=True, help="where OmniFlow-tiny/ and models/ are written")
    parser.add_argument("--config_dir", type=Path, default=TINY_CONFIG_DIR, help="folder of the tiny *.json configs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--weights", choices=WEIGHT_FORMATS, default="safetensors",
                        help="transformer weight format: one safetensors file, shards + index, or a .bin pickle")
    parser.add_argument("--ema", action="store_true", help="also write transformer/ema_transformer.pt")
    parser.add_argument("--fit_decoder_on", type=Path, nargs="+", default=[],
                        help="JSONL files whose texts the text decoder is fitted to (default: a random decoder)")
    parser.add_argument("--fit_decoder_steps", type=int, default=2000, help="training steps of that fit")
    parser.add_argument("--pretrain_on", type=Path, nargs="+", default=[],
                        help="JSONL files of captioned images the transformer is pre-trained on (default: random)")
    parser.add_argument("--pretrain_steps", type=int, default=200, help="training steps of that pre-training")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from omniflow.data.text import jsonl_captioned_images, jsonl_texts  # after the flags: they import torch
    from omniflow.models.omniflow.tiny import make_tiny_omniflow
    from omniflow.runtime.tracking import setup_logging

    setup_logging(None, is_main=True)
    try:
        texts = jsonl_texts(args.fit_decoder_on)
        captioned_images = jsonl_captioned_images(args.pretrain_on)
        if args.pretrain_on and not captioned_images:
            raise ValueError(f"{' '.join(map(str, args.pretrain_on))}: no record has an \"image\" and \"references\"")
        paths = make_tiny_omniflow(args.output_dir, args.config_dir, args.seed, args.weights, args.ema,
                                   decoder_texts=texts, decoder_steps=args.fit_decoder_steps,
                                   captioned_images=captioned_images, pretrain_steps=args.pretrain_steps)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    print(f"model_path={paths.model_path}\nmodels_dir={paths.models_dir}")
    if paths.decoder_reconstruction is not None:
        print(f"text decoder fitted to {len(texts)} texts: {paths.decoder_reconstruction:.0%} read back exactly")
    if paths.flow_loss is not None:
        print(f"transformer pre-trained on {len(captioned_images)} captioned images: flow loss "
              f"{paths.flow_loss[0]:.3f} -> {paths.flow_loss[1]:.3f}")


if __name__ == "__main__":
    main()
