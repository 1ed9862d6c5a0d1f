"""Image-folder datasets (flat/nested folders and the ImageNet class-folder layout).

Items are ``{"image": uint8 [3, R, R], "path": relative path}`` (+ ``"label"`` for ImageNet):
images stay uint8 through the DataLoader and are scaled to [-1, 1] on the device with
:func:`to_model_range`, which keeps worker-to-device transfers four times smaller.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .layouts import DATASET_TYPES

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageFolderError(FileNotFoundError):
    """An image folder that is missing, empty or not in the expected layout."""


def load_image(path: str | Path, resolution: int) -> torch.Tensor:
    """Read an image as RGB, resize its shorter side to ``resolution``, center-crop a square.

    Returns a uint8 tensor ``[3, resolution, resolution]``. PIL's bicubic resize filters with a
    support scaled to the reduction, so large downscales are antialiased.
    """
    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = resolution / min(img.size)
        size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def to_model_range(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images in [0, 255] -> ``dtype`` in [-1, 1], the range diffusers VAEs expect."""
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype} with shape {tuple(images.shape)}")
    return images.to(dtype) / 127.5 - 1.0


def _is_readable(path: Path) -> bool:
    # verify() checks the header and, for PNG, chunk checksums without decoding the pixels.
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # PIL raises many types (OSError, SyntaxError, struct.error...) for bad files
        return False


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageFolderDataset(Dataset):
    """All images under ``root`` (nested folders allowed), sorted by relative path.

    With ``check_files`` every file's header is verified once here and unreadable ones are
    skipped (``self.skipped`` lists them). A file that passes the header check but fails to
    decode later (e.g. a truncated JPEG) is replaced by the next readable item, with a warning,
    so a long run does not die on one bad file; the replacement is deterministic.
    """

    def __init__(self, root: str | Path, resolution: int, check_files: bool = True):
        self.root = Path(root)
        self.resolution = resolution
        if not self.root.is_dir():
            raise ImageFolderError(f"image folder not found: {self.root}")
        candidates = self._candidates()
        self.skipped = [p for p in candidates if check_files and not _is_readable(p)]
        bad = set(self.skipped)
        self.paths = [p for p in candidates if p not in bad]
        if self.skipped:
            logger.warning("skipped %d unreadable image(s) under %s (first: %s)",
                           len(self.skipped), self.root, self.skipped[0])
        if not self.paths:
            raise ImageFolderError(f"no readable images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        self.files = [p.relative_to(self.root).as_posix() for p in self.paths]

    def _candidates(self) -> list[Path]:
        return _image_files(self.root)

    def __len__(self) -> int:
        return len(self.paths)

    def _item(self, index: int) -> dict:
        return {"image": load_image(self.paths[index], self.resolution), "path": self.files[index]}

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.paths)):
            i = (index + offset) % len(self.paths)
            try:
                return self._item(i)
            except OSError as err:  # PIL reports truncated or undecodable data as OSError
                logger.warning("cannot decode %s (%s); using the next image instead", self.paths[i], err)
        raise ImageFolderError(f"no image under {self.root} could be decoded")


class ImageNetFolderDataset(ImageFolderDataset):
    """ImageNet layout: ``root/<class>/.../*.JPEG``; labels index the sorted class folders."""

    def __init__(self, root: str | Path, resolution: int, check_files: bool = True):
        super().__init__(root, resolution, check_files)
        index = {name: i for i, name in enumerate(self.classes)}
        self.labels = [index[Path(f).parts[0]] for f in self.files]

    def _candidates(self) -> list[Path]:
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir())
        if not class_dirs:
            raise ImageFolderError(f"ImageNet layout expects one sub-folder per class under {self.root}, "
                                   "found none")
        self.classes = [p.name for p in class_dirs]
        return [path for folder in class_dirs for path in _image_files(folder)]

    def _item(self, index: int) -> dict:
        return {**super()._item(index), "label": self.labels[index]}


def build_image_dataset(root: str | Path, dataset_type: str, resolution: int) -> ImageFolderDataset:
    """The dataset for ``--dataset_type default|imagenet``."""
    if dataset_type == "default":
        return ImageFolderDataset(root, resolution)
    if dataset_type == "imagenet":
        return ImageNetFolderDataset(root, resolution)
    raise ValueError(f"unknown dataset_type {dataset_type!r}; expected one of {DATASET_TYPES}")


# Photos bundled inside the scikit-image wheel (no download); grey ones are converted to RGB.
SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                 "immunohistochemistry", "retina", "coins", "camera", "moon", "brick", "grass")


def write_sample_images(directory: str | Path, size: int, n: int) -> list[Path]:
    """Write ``n`` real ``size``x``size`` PNG photos from scikit-image's bundled data.

    The first ``len(SAMPLE_PHOTOS)`` are center crops; further ones are deterministic random
    crops (and mirror images) of the same photos, so any ``n`` gives distinct images.
    """
    import skimage.data

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(n):
        name = SAMPLE_PHOTOS[i % len(SAMPLE_PHOTOS)]
        photo = np.asarray(getattr(skimage.data, name)())
        if photo.ndim == 2:
            photo = np.repeat(photo[..., None], 3, axis=2)
        height, width = photo.shape[:2]
        side = min(height, width)
        if i < len(SAMPLE_PHOTOS):
            top, left = (height - side) // 2, (width - side) // 2
        else:
            rng = np.random.default_rng(i)
            side = int(side * rng.uniform(0.5, 0.9))
            top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        crop = photo[top:top + side, left:left + side, :3]
        if (i // len(SAMPLE_PHOTOS)) % 2:
            crop = crop[:, ::-1]
        path = directory / f"{i:04d}_{name}.png"
        Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.BICUBIC).save(path)
        written.append(path)
    return written
