"""Convert an OmniFlow transformer checkpoint (the released 10 GB ``diffusion_pytorch_model.bin`` pickle) to
sharded safetensors, one shard in memory at a time.

    python scripts/convert_omniflow_checkpoint.py --input ckpts/OmniFlow-v0.5/transformer \\
        --output_dir ckpts/OmniFlow-v0.5-st/transformer --max_shard_size 2GB --verify

The .bin is memory-mapped and read with ``weights_only=True`` (no code is unpickled). ``config.json`` is
copied beside the shards; the result loads with ``load_omniflow`` like the original folder.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from omniflow.models.omniflow.layout import ENCODER_PREFIX

if TYPE_CHECKING:  # imported after the flags are parsed
    import torch

DTYPES = {"keep": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # torch dtype names


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 1000000)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(number * scale)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--input", type=Path, required=True,
                        help="a transformer/ folder, an OmniFlow folder containing transformer/, or a .bin file")
    parser.add_argument("--output_dir", type=Path, required=True, help="folder for the safetensors shards")
    parser.add_argument("--max_shard_size", type=parse_size, default="5GB", help="largest shard (default 5GB)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="keep", help="cast the tensors (default: keep)")
    parser.add_argument("--drop_t5_copy", action="store_true",
                        help=f"leave out the {ENCODER_PREFIX}* keys (a copy of flan-t5-large's encoder)")
    parser.add_argument("--verify", action="store_true", help="re-read every written tensor and compare")
    return parser.parse_args(argv)


def source_files(path: Path) -> list[Path]:
    from omniflow.models.omniflow.checkpoint import weight_files

    if path.is_file():
        return [path]
    if (path / "transformer").is_dir():
        path = path / "transformer"
    return weight_files(path)


def convert(args: argparse.Namespace) -> list[Path]:
    files = source_files(args.input)
    if len(files) != 1:
        raise ValueError(f"{args.input} is already sharded ({len(files)} files); point --input at a single file")
    import torch

    from omniflow.models.omniflow.checkpoint import open_weights, save_sharded_safetensors

    dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    with open_weights(files[0]) as lazy:
        keep = {k: v for k, v in lazy.items() if not (args.drop_t5_copy and k.startswith(ENCODER_PREFIX))}
        written = save_sharded_safetensors(keep, args.output_dir, args.max_shard_size, dtype=dtype)
        if args.verify:
            verify(keep, written, dtype)
    config = files[0].parent / "config.json"
    if config.is_file() and config.resolve() != (args.output_dir / "config.json").resolve():
        shutil.copy2(config, args.output_dir / "config.json")
    return written


def verify(source: dict, written: list[Path], dtype: torch.dtype | None) -> None:
    """Every source key is written once with equal values (after the requested cast)."""
    import torch
    from safetensors import safe_open

    seen = set()
    for path in written:
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                expected = source[key].load()
                expected = expected if dtype is None else expected.to(dtype)
                if not torch.equal(handle.get_tensor(key), expected):
                    raise ValueError(f"verify failed: {key} in {path} differs from the source")
                seen.add(key)
    if seen != set(source):
        raise ValueError(f"verify failed: {len(set(source) - seen)} keys not written, e.g. {sorted(set(source) - seen)[:3]}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        written = convert(args)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    print(f"wrote {len(written)} shard(s) to {args.output_dir}" + (" (verified)" if args.verify else ""))


if __name__ == "__main__":
    main()
