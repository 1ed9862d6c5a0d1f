"""Data of the text decoder head job: text->text, image->text and audio->text examples, mixed by weight.

Sets: WikiText-103 (``text``: denoise and decode the same passage), COCO Caption and LLaVA-CC3M
(``image_to_text``), AudioCaps (``audio_to_text``), and any folder in the same local format (the
embedded sample of :mod:`omniflow.data.sample_text`). Each set comes from a folder written by
``scripts/download_data.py`` (``<folder>/<split>.jsonl`` + media) or is streamed from the Hub with
rows converted on the fly by :mod:`omniflow.data.text_sources` (media kept in memory).

Config file (``--data_config``, e.g. ``configs/data_config.json``)::

    {"datasets": [
        {"name": "coco",               # label; a download_data.py set name (wikitext, coco, audiocaps,
                                       #   llava) lets a missing-folder error name its download command
         "task": "image_to_text",      # text | image_to_text | audio_to_text
         "source": "data/coco",        # local folder (relative to the working directory), or a Hub id
                                       #   (Salesforce/wikitext, lmms-lab/COCO-Caption, OpenSound/AudioCaps,
                                       #   liuhaotian/LLaVA-CC3M-Pretrain-595K) with "streaming": true
         "streaming": false,           # read rows as a stream (Hub ids must stream; folders may)
         "weight": 0.4,                # share of the training mix (weights are normalised)
         "train_split": "train",       # null: not trained on
         "eval_split": "validation",   # null: not evaluated
         "max_samples": null}],        # keep the first N examples of each split
     "image_size": 512,                # images: shorter side resized, centre square crop
     "max_length": 77,                 # tokens per target text, EOS included (see tokenize_batch)
     "audio_sample_rate": 16000}       # audio: mono float waveform resampled to this rate

Examples: ``{"id", "dataset" (the set's name), "task", "text" (the target), "references" (all
reference texts, for metrics), "image": uint8 [3, S, S] or None, "audio": float32 [T] or None}``.
The target of a caption set is one of its references, chosen by a stable hash of the id and, in a
training mix that repeats a set, the pass number, so it is deterministic in the index.

Training mix: without streaming, :class:`MixedDataset` is map-style: one epoch holds every
example of every set at least once and set k makes ``weight_k`` of the epoch (sets that fall
short are repeated; the last partial pass is a seeded subset), the ``all_exhausted`` rule of
``datasets.interleave_datasets``. With any streaming set, all sets stream and are interleaved by
``datasets.interleave_datasets(probabilities=weights, seed=seed, stopping_strategy="all_exhausted")``.
Both give exact resume through :class:`omniflow.data.ResumableLoader`. Streamed AudioCaps yields
one example per caption row; the local copy groups a clip's captions as its references.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import io
import json
import logging
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import soundfile
import torch
from PIL import Image
from scipy.signal import resample_poly
from torch.utils.data import Dataset

from ..runtime.errors import ConfigError, DataError
from .core import json_records, load_hf_dataset
from .images import load_image
from .sample_text import COMMAND as SAMPLE_COMMAND, SAMPLE_SETS
from .text_sources import SOURCES, SOURCES_BY_REPO, convert_row, load_source_split, open_archive

logger = logging.getLogger(__name__)

TASKS = ("text", "image_to_text", "audio_to_text")


class MissingTextDataError(DataError):
    """A configured local data folder or split file does not exist."""


@dataclass
class DatasetSpec:
    name: str
    task: str
    source: str
    streaming: bool = False
    weight: float = 1.0
    train_split: str | None = "train"
    eval_split: str | None = "validation"
    max_samples: int | None = None

    @property
    def hub(self):
        """The Hub source this spec streams from, or None for a local folder."""
        return SOURCES_BY_REPO.get(self.source)


@dataclass
class DataConfig:
    datasets: list[DatasetSpec]
    image_size: int = 512
    max_length: int = 77
    audio_sample_rate: int = 16000
    where: str = field(default="data config", repr=False)  # file name for error messages

    @classmethod
    def from_dict(cls, values: dict, where: str = "data config") -> "DataConfig":
        _check_keys(values, cls, f"{where}", exclude=("where",))
        if not isinstance(values.get("datasets"), list) or not values["datasets"]:
            raise ConfigError(f"{where}: 'datasets' must be a non-empty list of dataset entries")
        specs = []
        for i, entry in enumerate(values["datasets"]):
            if not isinstance(entry, dict):
                raise ConfigError(f"{where}: datasets[{i}] must be an object, got {type(entry).__name__}")
            _check_keys(entry, DatasetSpec, f"{where}: datasets[{i}]")
            missing = [k for k in ("name", "task", "source") if k not in entry]
            if missing:
                raise ConfigError(f"{where}: datasets[{i}] lacks {missing}")
            specs.append(DatasetSpec(**entry))
        config = cls(**{**values, "datasets": specs, "where": where})
        config.validate()
        return config

    def validate(self) -> None:
        for key in ("image_size", "max_length", "audio_sample_rate"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < (2 if key == "max_length" else 1):
                raise ConfigError(f"{self.where}: {key} must be a positive integer, got {value!r}")
        names = [spec.name for spec in self.datasets]
        if len(set(names)) != len(names):
            raise ConfigError(f"{self.where}: dataset names must be unique, got {names}")
        for i, spec in enumerate(self.datasets):
            at = f"{self.where}: datasets[{i}] ({spec.name})"
            for key, kinds in (("name", str), ("source", str), ("streaming", bool), ("train_split", (str, type(None))),
                               ("eval_split", (str, type(None)))):
                if not isinstance(getattr(spec, key), kinds):
                    raise ConfigError(f"{at}: {key} has the wrong type: {getattr(spec, key)!r}")
            if spec.task not in TASKS:
                raise ConfigError(f"{at}: task must be one of {list(TASKS)}, got {spec.task!r}")
            if not isinstance(spec.weight, (int, float)) or not spec.weight > 0:
                raise ConfigError(f"{at}: weight must be a number > 0, got {spec.weight!r}")
            if spec.max_samples is not None and (not isinstance(spec.max_samples, int) or spec.max_samples < 1):
                raise ConfigError(f"{at}: max_samples must be null or an integer >= 1, got {spec.max_samples!r}")
            if spec.hub is not None:
                if not spec.streaming:
                    raise ConfigError(
                        f"{at}: the Hub source {spec.source} must stream (\"streaming\": true); for a local "
                        f"copy run `python scripts/download_data.py --{spec.hub.key}` and set source to "
                        f"data/{spec.hub.key}")
                if spec.task != spec.hub.task:
                    raise ConfigError(f"{at}: {spec.source} holds {spec.hub.task} examples, not {spec.task}")
                bad = [s for s in (spec.train_split, spec.eval_split) if s not in (None, *spec.hub.splits)]
                if bad:
                    raise ConfigError(f"{at}: splits of {spec.source} are {list(spec.hub.splits)}, got {bad}")

    def weights(self) -> list[float]:
        """Normalised weights of the sets that have a train split."""
        specs = [s for s in self.datasets if s.train_split]
        total = sum(s.weight for s in specs)
        return [s.weight / total for s in specs]


def _check_keys(values: dict, cls: type, where: str, exclude: tuple[str, ...] = ()) -> None:
    known = [f.name for f in dataclasses.fields(cls) if f.name not in exclude]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {known})"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")


def load_data_config(path: str | Path) -> DataConfig:
    """Read and check a data config JSON file."""
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(values).__name__}")
    return DataConfig.from_dict(values, where=str(path))


# ---- records -> examples -------------------------------------------------------------------

def choose_reference(record_id: str, references: Sequence[str], draw: int = 0) -> str:
    """The target text: a stable pick among the references, rotating with the pass number `draw`."""
    return references[(zlib.crc32(record_id.encode()) + draw) % len(references)]


def jsonl_texts(paths: Sequence[str | Path]) -> list[str]:
    """The distinct "text" and "references" strings of JSONL records (the local format), in order of appearance."""
    texts: list[str] = []
    for path in map(Path, paths):
        found = len(texts)
        if not path.is_file():
            raise DataError(f"{path} not found")
        for record in json_records(path):
            texts += [record["text"]] if isinstance(record.get("text"), str) else []
            texts += [ref for ref in record.get("references") or [] if isinstance(ref, str)]
        if len(texts) == found:
            raise DataError(f"{path}: no record has a \"text\" or \"references\" string")
    return list(dict.fromkeys(text for text in texts if text.strip()))


def jsonl_captioned_images(paths: Sequence[str | Path]) -> list[tuple[Image.Image, str]]:
    """(RGB image, first reference) of each JSONL record with an "image" path (relative to its file's folder)."""
    pairs = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"{path} not found")
        for record in json_records(path):
            if isinstance(record.get("image"), str) and record.get("references"):
                with Image.open(path.parent / record["image"]) as image:
                    pairs.append((image.convert("RGB"), record["references"][0]))
    return pairs


def load_audio(file, sample_rate: int) -> torch.Tensor:
    """A mono float32 waveform at `sample_rate` from a path or a file object."""
    samples, rate = soundfile.read(file, dtype="float32", always_2d=True)
    samples = samples.mean(axis=1)
    if rate != sample_rate:
        step = math.gcd(rate, sample_rate)
        samples = resample_poly(samples, sample_rate // step, rate // step).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(samples))


def make_example(record: dict, config: DataConfig, draw: int = 0, folder: Path | None = None) -> dict:
    """Decode a record (media as bytes, or paths relative to `folder`) into an example."""
    def media(key):
        value = record.get(key)
        if value is None or isinstance(value, bytes):
            return value
        return folder / value

    def decode(key, load, size):
        value = media(key)
        if value is None:
            return None
        try:
            return load(io.BytesIO(value) if isinstance(value, bytes) else value, size)
        except (OSError, RuntimeError, ValueError) as err:  # PIL and libsndfile errors on unreadable files
            where = "in-memory bytes" if isinstance(value, bytes) else str(value)
            raise DataError(f"dataset '{record['dataset']}' record {record['id']}: cannot read {key} from "
                            f"{where} ({type(err).__name__}: {err})") from None

    return {
        "id": record["id"],
        "dataset": record["dataset"],
        "task": record["task"],
        "text": choose_reference(record["id"], record["references"], draw),
        "references": list(record["references"]),
        "image": decode("image", load_image, config.image_size),
        "audio": decode("audio", load_audio, config.audio_sample_rate),
    }


# ---- local folders -------------------------------------------------------------------------

def _create_command(spec: DatasetSpec, folder: Path) -> str:
    """The command that writes `folder` (download_data.py for the four sets, the sample writer)."""
    key = spec.name if spec.name in SOURCES else folder.name if folder.name in SOURCES else None
    if key is not None:
        command = f"python scripts/download_data.py --{key}"
        if folder.parent != Path("data"):
            command += f" --output_dir {folder.parent}"
        return command + ("" if folder.name == key else f" (it writes {folder.parent / key})")
    if folder.name in SAMPLE_SETS:
        return f"{SAMPLE_COMMAND} {folder.parent}"
    return f"python scripts/download_data.py --<set> (sets: {', '.join(SOURCES)}) or {SAMPLE_COMMAND} DIR"


def _local_folder(spec: DatasetSpec, split: str, root: Path | None) -> Path:
    given = Path(spec.source).expanduser()
    folder = given if given.is_absolute() or root is None else root / given
    if not (folder / f"{split}.jsonl").is_file():
        what = "does not exist" if not folder.is_dir() else f"has no {split}.jsonl"
        raise MissingTextDataError(f"data folder {folder} of dataset '{spec.name}' {what}; create it with "
                                   f"`{_create_command(spec, given)}`")
    return folder


def _task_mismatch(spec: DatasetSpec, file: Path, tasks) -> DataError:
    return DataError(f"{file} holds {sorted(tasks)} records but the data config says task {spec.task!r} "
                     f"for dataset '{spec.name}'")


class FolderDataset(Dataset):
    """One split of a local folder in the download_data.py format, as examples."""

    def __init__(self, spec: DatasetSpec, split: str, config: DataConfig, root: Path | None = None):
        self.spec, self.config = spec, config
        self.folder = _local_folder(spec, split, root)
        file = self.folder / f"{split}.jsonl"
        if file.stat().st_size == 0:
            raise DataError(f"{file} is empty: dataset '{spec.name}' has no {split} examples")
        records = load_hf_dataset(str(self.folder), split)
        tasks = set(records.unique("task"))
        if tasks != {spec.task}:
            raise _task_mismatch(spec, file, tasks)
        kept = records.filter(lambda refs: len(refs) > 0, input_columns="references")
        if len(kept) == 0:
            raise DataError(f"{file}: no record of dataset '{spec.name}' has a reference text")
        if len(kept) < len(records):
            logger.warning("%s: skipped %d records without a reference text", file, len(records) - len(kept))
        if spec.max_samples is not None:
            kept = kept.select(range(min(spec.max_samples, len(kept))))
        self.records = kept

    def __len__(self) -> int:
        return len(self.records)

    def example(self, index: int, draw: int = 0) -> dict:
        return make_example({**self.records[index], "dataset": self.spec.name}, self.config, draw, self.folder)

    def __getitem__(self, index: int) -> dict:
        return self.example(index)


class MixedDataset(Dataset):
    """Map-style mix of sets by weight (see the module docstring); item i is deterministic in i."""

    def __init__(self, parts: Sequence[FolderDataset], weights: Sequence[float], seed: int = 0):
        if len(parts) != len(weights):
            raise ValueError(f"{len(parts)} datasets but {len(weights)} weights")
        self.parts = list(parts)
        total = sum(weights)
        shares = [w / total for w in weights]
        epoch = max(math.ceil(len(p) / s) for p, s in zip(parts, shares))
        generator = torch.Generator().manual_seed(seed)
        part_ids, rows, draws = [], [], []
        for k, (part, share) in enumerate(zip(parts, shares)):
            n, count = len(part), max(len(part), round(share * epoch))
            passes, rest = divmod(count, n)
            rows += [torch.arange(n)] * passes + [torch.randperm(n, generator=generator)[:rest]]
            draws += [torch.full((n,), p) for p in range(passes)] + [torch.full((rest,), passes)]
            part_ids.append(torch.full((count,), k))
        # Tensors, not lists: an epoch of millions of examples stays a few bytes per entry.
        self.part_ids, self.rows, self.draws = torch.cat(part_ids), torch.cat(rows), torch.cat(draws)
        self.counts = {part.spec.name: int((self.part_ids == k).sum()) for k, part in enumerate(self.parts)}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        part = self.parts[int(self.part_ids[index])]
        return part.example(int(self.rows[index]), int(self.draws[index]))


# ---- streams -------------------------------------------------------------------------------

def _record_features():
    from datasets import Features, List, Value

    return Features({"id": Value("string"), "dataset": Value("string"), "task": Value("string"),
                     "references": List(Value("string")), "image": Value("binary"), "audio": Value("binary")})


def _hub_stream(spec: DatasetSpec, split: str):
    source = spec.hub
    folder = Path("data") / source.key  # where download_data.py would put a local copy
    rows = load_source_split(source, split, streaming=True, folder=folder)
    archive = open_archive(source, True, folder) if source.archive else None

    def to_record(row, index):
        converted = convert_row(source, row, index, split, archive)
        if converted is None:
            return {"id": "", "dataset": spec.name, "task": spec.task, "references": [], "image": None, "audio": None}
        record, media = converted
        return {"id": record["id"], "dataset": spec.name, "task": spec.task, "references": record["references"],
                **{key: media[record[key]]() if key in record else None for key in ("image", "audio")}}

    return rows.map(to_record, with_indices=True, features=_record_features())


def _local_stream(spec: DatasetSpec, split: str, root: Path | None):
    folder = _local_folder(spec, split, root)
    rows = load_hf_dataset(str(folder), split, streaming=True)

    def to_record(row):
        if row["task"] != spec.task:
            raise _task_mismatch(spec, folder / f"{split}.jsonl", {row["task"]})
        media = {key: (folder / row[key]).read_bytes() if row.get(key) else None for key in ("image", "audio")}
        return {"id": row["id"], "dataset": spec.name, "task": spec.task, "references": row["references"], **media}

    return rows.map(to_record, features=_record_features())


def _record_stream(spec: DatasetSpec, split: str, root: Path | None):
    """An IterableDataset of records with media bytes, rows without a reference text left out."""
    stream = _hub_stream(spec, split) if spec.hub is not None else _local_stream(spec, split, root)
    # The source's own columns go: a stream whose features are unknown (JSON) cannot name them.
    stream = stream.select_columns(list(_record_features()))
    stream = stream.filter(lambda refs: len(refs) > 0, input_columns="references")
    return stream.take(spec.max_samples) if spec.max_samples is not None else stream


def _examples(stream, config: DataConfig):
    return stream.map(lambda record: make_example(record, config))


# ---- builders ------------------------------------------------------------------------------

def _root(root: str | Path | None) -> Path | None:
    return None if root is None else Path(root)


def build_train_dataset(config: DataConfig, seed: int = 0, root: str | Path | None = None):
    """The weighted training mix: a :class:`MixedDataset`, or an HF IterableDataset when a set streams.

    Relative local sources are read under `root` (default: the working directory).
    """
    dataset, transform = train_records(config, seed, root)
    return dataset if transform is None else dataset.map(transform)


def train_records(config: DataConfig, seed: int = 0, root: str | Path | None = None):
    """``(dataset, transform)``: the training mix as :func:`build_train_dataset` gives it, except that a
    streamed mix yields records (media still bytes) and ``transform`` decodes one into an example, for
    :class:`~omniflow.data.core.ResumableLoader` to run in its worker processes (None for a map-style mix,
    whose workers decode in ``__getitem__``)."""
    specs = [s for s in config.datasets if s.train_split]
    if not specs:
        raise ConfigError(f"{config.where}: no dataset has a train_split")
    weights = config.weights()
    if not any(s.streaming for s in specs):
        mix = MixedDataset([FolderDataset(s, s.train_split, config, _root(root)) for s in specs], weights, seed)
        logger.info("training mix, %d examples per epoch: %s", len(mix), mix.counts)
        return mix, None
    import datasets

    streams = [_record_stream(s, s.train_split, _root(root)) for s in specs]
    mixed = streams[0] if len(streams) == 1 else datasets.interleave_datasets(
        streams, probabilities=weights, seed=seed, stopping_strategy="all_exhausted")
    return mixed, functools.partial(make_example, config=config)


def build_eval_datasets(config: DataConfig, root: str | Path | None = None) -> dict[str, Any]:
    """One evaluation dataset per set with an eval_split, by name (map-style, or streamed)."""
    return {s.name: _examples(_record_stream(s, s.eval_split, _root(root)), config) if s.streaming
            else FolderDataset(s, s.eval_split, config, _root(root))
            for s in config.datasets if s.eval_split}


# ---- batches -------------------------------------------------------------------------------

def collate_examples(examples: list[dict]) -> dict:
    """Batch examples of any tasks together.

    Lists: ``id``, ``dataset``, ``task``, ``text``, ``references``. Tensors: ``image`` uint8
    [B, 3, S, S] (zeros where absent; None when no example has one) with ``image_mask`` bool [B];
    ``audio`` float32 [B, T_max] right-padded with zeros (None when no example has audio) with
    ``audio_lengths`` long [B] (0 where absent).
    """
    batch = {key: [e[key] for e in examples] for key in ("id", "dataset", "task", "text", "references")}
    images = [e["image"] for e in examples]
    batch["image_mask"] = torch.tensor([image is not None for image in images])
    present = [image for image in images if image is not None]
    batch["image"] = None if not present else torch.stack(
        [image if image is not None else torch.zeros_like(present[0]) for image in images])
    waves = [e["audio"] for e in examples]
    batch["audio_lengths"] = torch.tensor([0 if w is None else len(w) for w in waves], dtype=torch.long)
    batch["audio"] = None
    if any(w is not None for w in waves):
        batch["audio"] = torch.zeros(len(waves), int(batch["audio_lengths"].max()))
        for i, wave in enumerate(waves):
            if wave is not None:
                batch["audio"][i, : len(wave)] = wave
    return batch


def tokenize_batch(batch: dict | Sequence[str], tokenizer, max_length: int, *, add_bos: bool = True,
                   padding: str = "longest") -> dict[str, torch.Tensor]:
    """Token ids of the batch's ``text`` (or a list of strings) for a target of at most `max_length`.

    Each row is ``[BOS] + text tokens + EOS``, BOS only if `add_bos` and the tokenizer has one; a
    long text loses tokens before the EOS, never the EOS. Rows are right-padded with the pad token
    to the longest row (``padding="longest"``) or to `max_length` (``"max_length"``). Returns
    ``input_ids`` and ``attention_mask`` (1 on real tokens), both long [B, L].
    """
    texts = list(batch["text"] if isinstance(batch, dict) else batch)
    name = type(tokenizer).__name__
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ConfigError(f"tokenizer {name} needs an EOS and a pad token (eos={tokenizer.eos_token}, "
                          f"pad={tokenizer.pad_token}); add them with tokenizer.add_special_tokens")
    if padding not in ("longest", "max_length"):
        raise ConfigError(f"padding must be 'longest' or 'max_length', got {padding!r}")
    prefix = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    room = max_length - len(prefix) - 1
    if room < 1:
        raise ConfigError(f"max_length {max_length} leaves no room for text between BOS and EOS")
    pieces = tokenizer(texts, add_special_tokens=False)["input_ids"]
    rows = [prefix + ids[:room] + [tokenizer.eos_token_id] for ids in pieces]
    width = max_length if padding == "max_length" else max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
