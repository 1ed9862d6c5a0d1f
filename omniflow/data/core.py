"""Dataset loading (HF ``datasets``: Hub ids or local json/jsonl/parquet/csv/imagefolder/audiofolder)
and :class:`ResumableLoader`, which gives each rank its batches with an exact, saveable position.
"""
from __future__ import annotations

import collections
import copy
import itertools
import json
import logging
import math
import multiprocessing
import signal
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader

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
        return _load_data_file(path, split, streaming, cache_dir)
    if path.is_dir():
        for suffix in _BUILDERS:
            candidate = path / f"{split}{suffix}"
            if candidate.is_file():
                return _load_data_file(candidate, split, streaming, cache_dir)
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


def _load_data_file(path: Path, split: str, streaming: bool, cache_dir: str | None):
    """A local data file as ``split``; a malformed row is a DataError naming the file (and the line)."""
    import datasets

    builder = _BUILDERS.get(path.suffix)
    if builder is None:
        raise DataError(f"{path}: unsupported data file type {path.suffix!r} (use one of {sorted(_BUILDERS)})")
    if streaming and path.suffix == ".jsonl":  # a stream would meet a bad row mid-run, as a bare pyarrow error
        _check_json_lines(path)
    try:
        return datasets.load_dataset(builder, data_files={split: str(path)}, split=split, streaming=streaming,
                                     cache_dir=cache_dir)
    except datasets.exceptions.DatasetGenerationError as err:
        if path.suffix == ".jsonl":  # datasets says neither where nor which row: find the line
            _check_json_lines(path)
        raise DataError(f"{path}: not readable as {builder} data ({err.__cause__ or err})") from None


def json_records(path: str | Path) -> Iterator[dict]:
    """The records of a JSON-lines file; a line that is not a JSON object is a DataError naming file and line."""
    # Lenient (a BOM, undecodable bytes, raw control characters, a lone "\r"): a line is blamed only when it is
    # surely not a JSON object.
    with Path(path).open(encoding="utf-8-sig", errors="replace", newline="\n") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line, strict=False)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not a JSON record ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: not a JSON record (a JSON {type(record).__name__})")
            yield record


def _check_json_lines(path: Path) -> None:
    for _ in json_records(path):
        pass


def _is_iterable(dataset: Any) -> bool:
    return isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__")


def prepare_batch(examples: list, transform: Callable | None, collate_fn: Callable) -> Any:
    """A streamed batch: each example transformed, then collated (in a worker process or in the caller)."""
    return collate_fn([transform(example) for example in examples] if transform is not None else examples)


def _stream_worker_signals() -> None:
    """A stream worker leaves Ctrl-C to the training process (a worker stopped mid-batch would lose that batch
    and leave the pool waiting for it) and stops when the pool terminates it, whatever handlers it inherited."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def pinned(batch: Any) -> Any:
    """``batch`` with every tensor in page-locked memory (for non-blocking copies to the GPU)."""
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {key: pinned(value) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(pinned(value) for value in batch)
    return batch


class ResumableLoader:
    """Batches of one rank, deterministic in (seed, epoch), with ``state_dict``/``load_state_dict``.

    Map-style datasets: each epoch is an order (a seeded permutation, or ``range(n)`` without
    ``shuffle``) dealt to ranks round-robin, and every rank gets the same number of batches, so
    uneven data never leaves one rank waiting in a collective (a DDP step, a ZeRO-3 forward).
    With ``drop_last`` (training) each rank's share is cut to ``n // world_size`` samples in full
    batches. Without it (evaluation) no sample is dropped: each is in exactly one batch of one
    rank, and each rank splits its share into the same ``ceil(ceil(n / world_size) / batch_size)``
    batches of sizes as equal as possible, so a shorter share has slightly smaller batches (with
    ``batch_size`` 1 and uneven shares the longer shares get one batch of 2: no batch is empty).
    :meth:`indexed` also yields the dataset indices of each batch.
    Iterable (streaming) datasets: ``split_dataset_by_node`` gives each rank its shard; examples
    are shuffled within consecutive blocks of ``shuffle_buffer`` (seeded by epoch and block), and
    the position is (the dataset's own ``state_dict`` at the block start, offset in the block), so
    a resume re-reads at most one block and continues exactly. HF's shuffle buffer cannot be
    resumed exactly, hence the blocks. At the end of the stream the next epoch starts, so
    step-based training never runs dry on one rank. With ``num_workers`` the stream is read in this
    process (it holds the position) while worker processes run ``transform`` on each example (decoding,
    resizing: give it here rather than as the stream's ``map``) and ``collate_fn``, a few batches ahead
    and in order; the position saved is that of the last batch handed out, so a resume is exact.
    ``pin_memory`` (default: when CUDA is available) pins the batches for asynchronous copies.
    """

    def __init__(self, dataset, batch_size: int, *, collate_fn: Callable | None = None, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0, drop_last: bool = True,
                 shuffle_buffer: int = 1000, transform: Callable | None = None, pin_memory: bool | None = None):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.transform = transform
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
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
            if not drop_last and world_size > 1:
                raise DataError("a streaming dataset cannot be dealt to processes in equal numbers of batches that "
                                "keep every sample; evaluate a sized one (e.g. a list of its first examples)")
            from datasets.distributed import split_dataset_by_node

            if world_size > 1:
                dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
            # A loaded state sticks to the dataset for later iterations: epochs restart from this one.
            self._stream_start = copy.deepcopy(dataset.state_dict())
        elif transform is not None:
            raise DataError("transform is for streaming datasets; a map-style dataset transforms in __getitem__")
        elif len(dataset) < world_size * (batch_size if drop_last else 1):
            need = f"with batch size {batch_size}" if drop_last else "(each needs a sample)"
            raise DataError(f"dataset has {len(dataset)} samples: too few for {world_size} process(es) {need}")
        self.dataset = dataset

    def __len__(self) -> int:
        """Batches per epoch on this rank (map-style datasets only)."""
        if self.iterable:
            raise TypeError("a streaming dataset has no length; train with --max_train_steps")
        n = len(self.dataset)
        if self.drop_last:
            return n // self.world_size // self.batch_size
        longest, shortest = math.ceil(n / self.world_size), n // self.world_size
        return min(math.ceil(longest / self.batch_size), shortest)

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
        mine = order[self.rank::self.world_size]
        if self.drop_last:
            return [mine[i:i + self.batch_size] for i in range(0, len(self) * self.batch_size, self.batch_size)]
        # len(self) batches, the first `longer` of them one sample longer than the others
        size, longer = divmod(len(mine), len(self))
        bounds = [i * size + min(i, longer) for i in range(len(self) + 1)]
        return [mine[start:end] for start, end in zip(bounds, bounds[1:])]

    def __iter__(self) -> Iterator[Any]:
        """Yield the rest of the current epoch, then move the position to the next epoch."""
        return (batch for _, batch in self._iterate())

    def indexed(self) -> Iterator[tuple[list[int], Any]]:
        """As iterating, with each batch's dataset indices: ``(indices, batch)`` (map-style datasets only)."""
        if self.iterable:
            raise TypeError("a streaming dataset has no sample indices")
        return self._iterate()

    def _iterate(self) -> Iterator[tuple[list[int] | None, Any]]:
        if not self.iterable and self.batch_in_epoch >= len(self):
            # Restored from a position after an epoch's last batch: that epoch is done.
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        batches = ((None, batch) for batch in self._iter_stream()) if self.iterable else self._iter_map()
        for indices, batch in batches:
            self.batch_in_epoch += 1
            yield indices, batch
        self.epoch += 1
        self.batch_in_epoch = 0
        self._stream_state = None

    def _iter_map(self) -> Iterator[tuple[list[int], Any]]:
        if hasattr(self.dataset, "set_epoch"):  # e.g. new random clip starts per epoch; workers see it
            self.dataset.set_epoch(self.epoch)
        remaining = self._epoch_batches()[self.batch_in_epoch:]
        # Own generator: creating a DataLoader iterator must not draw from the global RNG, whose
        # state belongs to the model (dropout, noise) and is restored exactly on resume.
        loader = DataLoader(self.dataset, batch_sampler=remaining, collate_fn=self.collate_fn,
                            num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed),
                            pin_memory=self.pin_memory)
        yield from zip(remaining, loader)

    def _iter_stream(self) -> Iterator[Any]:
        batches = self._stream_batches()
        prepared = (self._in_workers(batches) if self.num_workers
                    else ((prepare_batch(examples, self.transform, self.collate_fn), position)
                          for examples, position in batches))
        for batch, position in prepared:
            self._stream_state = position
            yield pinned(batch) if self.pin_memory else batch

    def _stream_batches(self) -> Iterator[tuple[list, dict]]:
        """(examples of a batch, stream position after its last example)."""
        pending = []
        for example, position in self._stream_examples():
            pending.append(example)
            if len(pending) == self.batch_size:
                yield pending, position
                pending = []
        if pending and not self.drop_last:
            yield pending, position

    def _in_workers(self, batches: Iterator[tuple[list, dict]]) -> Iterator[tuple[Any, dict]]:
        """Prepared batches from ``num_workers`` processes, in order, at most two per worker in flight."""
        with multiprocessing.get_context().Pool(self.num_workers, initializer=_stream_worker_signals) as pool:
            in_flight = collections.deque()
            for examples, position in batches:
                in_flight.append((pool.apply_async(prepare_batch, (examples, self.transform, self.collate_fn)),
                                  position))
                if len(in_flight) >= 2 * self.num_workers:
                    result, done_position = in_flight.popleft()
                    yield result.get(), done_position
            while in_flight:
                result, done_position = in_flight.popleft()
                yield result.get(), done_position

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
            # a copy: the dataset updates its state in place as it reads on (ahead, with workers)
            block, skip, block_start = block + 1, 0, copy.deepcopy(ds.state_dict())
