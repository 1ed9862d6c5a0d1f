"""Dataset loading (HF ``datasets``: Hub ids or local json/jsonl/parquet/csv/imagefolder/audiofolder)
and :class:`ResumableLoader`, which gives each rank its batches with an exact, saveable position.
"""
from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..runtime.errors import DataError

logger = logging.getLogger("omniflow")

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def load_hf_dataset(source: str, split: str = "train", *, streaming: bool = False, name: str | None = None,
                    cache_dir: str | None = None, folder_type: str = "imagefolder"):
    """Load ``split`` of a Hub dataset id, a local data file, or a local folder.

    A folder holding ``<split>.jsonl`` / ``<split>.parquet`` (what ``scripts/download_data.py``
    writes) loads that file; any other folder loads as ``folder_type`` (``imagefolder`` or
    ``audiofolder``, with ``metadata.jsonl`` captions when present).
    """
    import datasets

    path = Path(source)
    if path.is_file():
        builder = _BUILDERS.get(path.suffix)
        if builder is None:
            raise DataError(f"{path}: unsupported data file type {path.suffix!r} (use one of {sorted(_BUILDERS)})")
        return datasets.load_dataset(builder, data_files={split: str(path)}, split=split, streaming=streaming,
                                     cache_dir=cache_dir)
    if path.is_dir():
        for suffix, builder in _BUILDERS.items():
            candidate = path / f"{split}{suffix}"
            if candidate.is_file():
                return datasets.load_dataset(builder, data_files={split: str(candidate)}, split=split,
                                             streaming=streaming, cache_dir=cache_dir)
        return datasets.load_dataset(folder_type, data_dir=str(path), split=split, streaming=streaming,
                                     cache_dir=cache_dir)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise FileNotFoundError(f"data source {source!r} does not exist")
    from ..runtime.hub import hf_token  # Hub ids only: local paths never need a token

    try:
        return datasets.load_dataset(source, name, split=split, streaming=streaming, cache_dir=cache_dir,
                                     token=hf_token())
    except (ConnectionError, FileNotFoundError, OSError) as err:
        raise DataError(
            f"cannot load dataset {source!r} split {split!r} ({type(err).__name__}): offline? "
            f"fetch a local copy with `python scripts/download_data.py` and point the config at data/<name>"
        ) from None


def _is_iterable(dataset: Any) -> bool:
    return isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__")


class ResumableLoader:
    """Batches of one rank, deterministic in (seed, epoch), with ``state_dict``/``load_state_dict``.

    Map-style datasets: each epoch is a seeded permutation, dealt to ranks round-robin and cut to
    the same number of batches on every rank (uneven data never leaves one rank waiting).
    Iterable (streaming) datasets: ``split_dataset_by_node`` gives each rank its shard; examples
    are shuffled within consecutive blocks of ``shuffle_buffer`` (seeded by epoch and block), and
    the position is (the dataset's own ``state_dict`` at the block start, offset in the block), so
    a resume re-reads at most one block and continues exactly. HF's shuffle buffer cannot be
    resumed exactly, hence the blocks. At the end of the stream the next epoch starts, so
    step-based training never runs dry on one rank.
    """

    def __init__(self, dataset, batch_size: int, *, collate_fn: Callable | None = None, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0, drop_last: bool = True,
                 shuffle_buffer: int = 1000):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.collate_fn = collate_fn or torch.utils.data.default_collate
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self.batch_in_epoch = 0
        self._stream_state = None
        self.iterable = _is_iterable(dataset)
        if self.iterable:
            from datasets.distributed import split_dataset_by_node

            if world_size > 1:
                dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
            # A loaded state sticks to the dataset for later iterations: epochs restart from this one.
            self._stream_start = dataset.state_dict()
        elif len(dataset) < world_size * (batch_size if drop_last else 1):
            raise DataError(f"dataset has {len(dataset)} samples: too few for {world_size} process(es) "
                            f"with batch size {batch_size}")
        self.dataset = dataset

    def __len__(self) -> int:
        """Batches per epoch on this rank (map-style datasets only)."""
        if self.iterable:
            raise TypeError("a streaming dataset has no length; train with --max_train_steps")
        per_rank = len(self.dataset) // self.world_size
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}
        if self.iterable:
            state["stream"] = self._stream_state
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self._stream_state = state.get("stream")

    def _epoch_batches(self) -> list[list[int]]:
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(n))
        mine = order[self.rank::self.world_size][: n // self.world_size]
        batches = [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[Any]:
        """Yield the rest of the current epoch, then move the position to the next epoch."""
        if not self.iterable and self.batch_in_epoch >= len(self):
            # Restored from a position after an epoch's last batch: that epoch is done.
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        batches = self._iter_stream() if self.iterable else self._iter_map()
        for batch in batches:
            self.batch_in_epoch += 1
            yield batch
        self.epoch += 1
        self.batch_in_epoch = 0
        self._stream_state = None

    def _iter_map(self) -> Iterator[Any]:
        if hasattr(self.dataset, "set_epoch"):  # e.g. new random clip starts per epoch; workers see it
            self.dataset.set_epoch(self.epoch)
        remaining = self._epoch_batches()[self.batch_in_epoch:]
        # Own generator: creating a DataLoader iterator must not draw from the global RNG, whose
        # state belongs to the model (dropout, noise) and is restored exactly on resume.
        loader = DataLoader(self.dataset, batch_sampler=remaining, collate_fn=self.collate_fn,
                            num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed))
        yield from loader

    def _iter_stream(self) -> Iterator[Any]:
        pending = []
        for example, position in self._stream_examples():
            pending.append(example)
            if len(pending) == self.batch_size:
                self._stream_state = position
                yield self.collate_fn(pending)
                pending = []
        if pending and not self.drop_last:
            self._stream_state = position
            yield self.collate_fn(pending)

    def _stream_examples(self) -> Iterator[tuple[Any, dict]]:
        """(example, position after it) in block-shuffled order, from the saved position on."""
        ds = self.dataset
        saved = self._stream_state or {"block_start": self._stream_start, "block": 0, "offset": 0}
        ds.load_state_dict(saved["block_start"])
        block, skip, block_start = saved["block"], saved["offset"], saved["block_start"]
        stream = iter(ds)
        while True:
            examples = list(itertools.islice(stream, self.shuffle_buffer))
            if not examples:
                return
            order = list(range(len(examples)))
            if self.shuffle:
                generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, block)) % 2**63)
                order = torch.randperm(len(examples), generator=generator).tolist()
            for offset in range(skip, len(examples)):
                yield examples[order[offset]], {"block_start": block_start, "block": block, "offset": offset + 1}
            block, skip, block_start = block + 1, 0, ds.state_dict()
