"""Latents of an image folder encoded once by both frozen VAEs, stored as safetensors shards.

Layout of a cache folder::

    index.json                 key + shard list; written last, so its presence means "complete"
    shard_00000.safetensors    tensors "vae1" [n, C1, h, w] and "vae2" [n, C2, h, w]

The key records the data set (relative file list with each file's byte size and modification
time, resolution) and each VAE (its source, a hash of its config, a hash of its weights, its
dtype). A cache whose key differs from the current run's is stale: :func:`open_latent_cache` says
which part changed. Every file is written to a temporary name and moved into place with ``os.replace``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from omniflow.data.images import ImageFolderDataset
from omniflow.models.align import AlignPipeline, encode_latents
from omniflow.runtime.errors import CheckpointError, DataError
from omniflow.runtime.tracking import progress
from omniflow.runtime.weights import open_safetensors

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
FORMAT_VERSION = 2  # 2: file modification times and VAE weight hashes in the key


class StaleLatentCacheError(DataError):
    """A latent cache built for another data set or other VAEs."""


def _sha256(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict: every tensor's name, dtype, shape and bytes, in order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def latent_cache_key(dataset: ImageFolderDataset, pipeline: AlignPipeline) -> dict:
    """What the cached latents depend on. A file's size and modification time catch it replaced or
    edited under the same name (reading every file's contents would cost a pass over the data set);
    the weights hash catches new weights under the same config."""
    files = []
    for name, path in zip(dataset.files, dataset.paths):
        stat = path.stat()
        files.append([name, stat.st_size, stat.st_mtime_ns])
    vaes = {}
    for key, vae in pipeline.vaes.items():
        config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
        vaes[key] = {"source": str(pipeline.sources[key]), "config_sha256": _sha256(config),
                     "weights_sha256": weights_sha256(vae), "dtype": str(vae.dtype)}
    return {"format": FORMAT_VERSION, "num_files": len(files), "files_sha256": _sha256(files),
            "resolution": dataset.resolution, "vaes": vaes}


def _key_difference(cached: dict, current: dict) -> str | None:
    """A short phrase naming the first part of the key that differs, or None."""
    if cached.get("format") != current["format"]:
        return f"cache format {cached.get('format')} (now {current['format']})"
    if (cached["num_files"], cached["files_sha256"]) != (current["num_files"], current["files_sha256"]):
        return (f"the image files changed ({cached['num_files']} cached, {current['num_files']} now, "
                "or names, sizes or modification times differ)")
    if cached["resolution"] != current["resolution"]:
        return f"resolution {cached['resolution']} (now {current['resolution']})"
    for key, now in current["vaes"].items():
        then = cached["vaes"].get(key, {})
        for field in ("source", "config_sha256", "weights_sha256", "dtype"):
            if then.get(field) != now[field]:
                if field == "source":
                    return f"{key} source changed ({then.get(field)} cached, {now[field]} now)"
                was, new = str(then.get(field)), now[field]
                if field.endswith("_sha256"):
                    was, new = was[:12], new[:12]
                return f"{key} {field} changed ({was} cached, {new} now) for {now['source']}"
    return None


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def build_latent_cache(dataset: ImageFolderDataset, pipeline: AlignPipeline, cache_dir: str | Path,
                       batch_size: int = 16, shard_size: int = 4096, num_workers: int = 0,
                       storage_dtype: torch.dtype = torch.float32) -> Path:
    """Encode ``dataset`` with both VAEs (on their device) and write the cache; returns its folder."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / INDEX_NAME).unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    shards, pending, count = [], {k: [] for k in pipeline.vaes}, 0

    def flush() -> None:
        nonlocal count
        tensors = {k: torch.cat(v).to(storage_dtype).contiguous() for k, v in pending.items()}
        name = f"shard_{len(shards):05d}.safetensors"
        _atomic_write(cache_dir / name, lambda tmp: save_file(tensors, str(tmp)))
        n = len(next(iter(tensors.values())))
        shards.append({"file": name, "start": count, "count": n})
        count += n
        for v in pending.values():
            v.clear()

    for batch in progress(loader, desc=f"caching latents in {cache_dir}", unit="batch"):
        for key, vae in pipeline.vaes.items():
            pending[key].append(encode_latents(vae, batch["image"]).cpu())
        if sum(len(t) for t in pending[pipeline.source_key]) >= shard_size:
            flush()
    if pending[pipeline.source_key]:
        flush()
    index = {"key": latent_cache_key(dataset, pipeline), "num_items": count, "shards": shards,
             "storage_dtype": str(storage_dtype)}
    _atomic_write(cache_dir / INDEX_NAME, lambda tmp: tmp.write_text(json.dumps(index, indent=1)))
    for old in cache_dir.glob("shard_*.safetensors"):  # shards of a larger earlier build
        if old.name not in {s["file"] for s in shards}:
            old.unlink()
    logger.info("cached latents of %d images in %s (%d shards)", count, cache_dir, len(shards))
    return cache_dir


class CachedLatentDataset(Dataset):
    """Items ``{"vae1": latent, "vae2": latent, "index": i}`` from a cache folder, plus the image
    item's fields (``"image"``, ``"path"``, ``"label"``) when ``image_dataset`` is given.

    Shards are memory-mapped lazily, once per worker process.
    """

    def __init__(self, cache_dir: str | Path, image_dataset: ImageFolderDataset | None = None):
        self.cache_dir = Path(cache_dir)
        index_path = self.cache_dir / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(f"no latent cache index at {index_path} (build it with build_latent_cache)")
        self.index = json.loads(index_path.read_text())
        if image_dataset is not None and len(image_dataset) != self.index["num_items"]:
            raise StaleLatentCacheError(f"latent cache {self.cache_dir} holds {self.index['num_items']} items "
                                        f"but the image dataset has {len(image_dataset)}")
        self.image_dataset = image_dataset
        self._handles: dict[str, object] = {}

    def __len__(self) -> int:
        return self.index["num_items"]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cached items")
        shard = next(s for s in self.index["shards"] if s["start"] <= index < s["start"] + s["count"])
        if shard["file"] not in self._handles:
            self._handles[shard["file"]] = safe_open(str(self.cache_dir / shard["file"]), framework="pt")
        handle, row = self._handles[shard["file"]], index - shard["start"]
        item = {key: handle.get_slice(key)[row:row + 1][0] for key in handle.keys()}
        item["index"] = index
        if self.image_dataset is not None:
            item.update(self.image_dataset[index])
        return item

    def __getstate__(self) -> dict:
        # safe_open handles cannot be pickled into DataLoader workers; each worker reopens.
        return {**self.__dict__, "_handles": {}}


def open_latent_cache(cache_dir: str | Path, dataset: ImageFolderDataset, pipeline: AlignPipeline,
                      with_images: bool | None = None) -> CachedLatentDataset:
    """Open a cache built for exactly this data set and these VAEs, else raise saying what changed.

    ``with_images`` defaults to whether the pipeline's module takes images.
    """
    cached = CachedLatentDataset(cache_dir)
    difference = _key_difference(cached.index["key"], latent_cache_key(dataset, pipeline))
    if difference:
        raise StaleLatentCacheError(f"latent cache {cache_dir} is stale: {difference}")
    for shard in cached.index["shards"]:  # a save cut short (kill, full disk) leaves a truncated shard
        try:
            with open_safetensors(Path(cache_dir) / shard["file"]):
                pass
        except CheckpointError as err:
            raise StaleLatentCacheError(f"latent cache {cache_dir} is damaged: {err}") from None
    if with_images is None:
        with_images = "image" in pipeline.input_types
    return CachedLatentDataset(cache_dir, dataset) if with_images else cached


def load_or_build_latent_cache(dataset: ImageFolderDataset, pipeline: AlignPipeline, cache_dir: str | Path,
                               rebuild_stale: bool = True, **build_kwargs) -> CachedLatentDataset:
    """Open the cache, building it when absent and rebuilding it (with a warning) when stale."""
    if (Path(cache_dir) / INDEX_NAME).is_file():
        try:
            return open_latent_cache(cache_dir, dataset, pipeline)
        except StaleLatentCacheError as err:
            if not rebuild_stale:
                raise
            logger.warning("%s; rebuilding it", err)
    build_latent_cache(dataset, pipeline, cache_dir, **build_kwargs)
    return open_latent_cache(cache_dir, dataset, pipeline)
