"""Write a tiny OmniFlow with random weights in the released folder layout (for tests and the example).

    python scripts/make_tiny_omniflow.py --output_dir /tmp/omniflow-tiny
    # -> /tmp/omniflow-tiny/OmniFlow-tiny/ (load_omniflow folder) and /tmp/omniflow-tiny/models/<hub id>/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omniflow.models.omniflow.tiny import TINY_CONFIG_DIR, WEIGHT_FORMATS, make_tiny_omniflow


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, required=True, help="where OmniFlow-tiny/ and models/ are written")
    parser.add_argument("--config_dir", type=Path, default=TINY_CONFIG_DIR, help="folder of the tiny *.json configs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--weights", choices=WEIGHT_FORMATS, default="safetensors",
                        help="transformer weight format: one safetensors file, shards + index, or a .bin pickle")
    parser.add_argument("--ema", action="store_true", help="also write transformer/ema_transformer.pt")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        paths = make_tiny_omniflow(args.output_dir, args.config_dir, args.seed, args.weights, args.ema)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    print(f"model_path={paths.model_path}\nmodels_dir={paths.models_dir}")


if __name__ == "__main__":
    main()
