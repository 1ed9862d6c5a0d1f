"""The main job's embedded default, built offline once: the sample data (``data/sample``) and a tiny
OmniFlow (``models/tiny-fitted``), random but for a text decoder fitted to the sample texts and a
transformer pre-trained on captioning the sample photos (all 21, as crops, flips and whole), as the
released model was trained on its data. run_example.sh and run_text_grid.py use it when
``models/OmniFlow-v0.5`` is absent.

    python -m omniflow.text_job.example [--root .]    # prints model_path= and models_dir=
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..data.sample_text import write_sample_text_data
from ..data.text import jsonl_captioned_images, jsonl_texts
from ..models.omniflow.tiny import make_tiny_omniflow
from ..runtime.tracking import setup_logging

SAMPLE_DATA = Path("data/sample")
TINY_MODEL = Path("models/tiny-fitted")
# Its sources are relative to the repository root: the scripts run the embedded default from there.
EXAMPLE_DATA_CONFIG = Path("configs/text_head/tiny_example_data.json")


def ensure_example_model(root: str | Path = ".") -> tuple[Path, Path]:
    """Builds what is missing under ``root``; returns (model_path, models_dir) of the tiny OmniFlow."""
    root = Path(root)
    data, tiny = root / SAMPLE_DATA, root / TINY_MODEL
    texts = [data / "photos" / "validation.jsonl", data / "shakespeare" / "train.jsonl"]
    photos = [data / "photos" / "train.jsonl", data / "photos" / "validation.jsonl"]
    if not all(path.is_file() for path in texts + photos):
        write_sample_text_data(data)
    model_path, models_dir = tiny / "OmniFlow-tiny", tiny / "models"
    if not (model_path / "transformer" / "config.json").is_file():
        paths = make_tiny_omniflow(tiny, decoder_texts=jsonl_texts(texts),
                                   captioned_images=jsonl_captioned_images(photos))
        first, last = paths.flow_loss
        print(f"tiny OmniFlow written to {tiny}: its text decoder reads {paths.decoder_reconstruction:.0%} of the "
              f"sample texts back exactly; its image->text flow loss fell from {first:.3f} to {last:.3f}")
    return model_path, models_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--root", default=".", help="folder that receives data/sample and models/tiny-fitted")
    root = parser.parse_args(argv).root
    setup_logging(None, is_main=True)
    model_path, models_dir = ensure_example_model(root)
    print(f"model_path={model_path}\nmodels_dir={models_dir}")


if __name__ == "__main__":
    main()
