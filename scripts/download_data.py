"""Download the text job's datasets from the Hub into local jsonl files plus media.

    python scripts/download_data.py --streaming --max-samples 1000      # all four, 1000 rows per split
    python scripts/download_data.py --coco --audiocaps --subset-fraction 0.1
    python scripts/download_data.py --wikitext --split validation

Output, read by the text data builders:
    data/<dataset>/<split>.jsonl   one JSON object per line:
        {"id": str, "task": "text" | "image_to_text" | "audio_to_text",
         "text": str (text task only), "image": "images/<id>.jpg", "audio": "audio/<id>.wav",
         "references": [str, ...]}          media paths are relative to the jsonl's folder
    data/<dataset>/images/, audio/          the media files
    data/<dataset>/info.json                source, split sizes, options, date

Sources and splits: WikiText-103 and AudioCaps have train/validation splits; the COCO-Caption copy
(val/test only, test without captions) and LLaVA-CC3M (one split) are split by a stable hash of
the row id, 5% validation. AudioCaps has one row per caption: rows are logged to
`<split>.rows.jsonl` and merged per clip into `<split>.jsonl` (all its captions as references).
`--max-samples N` caps the rows written per split (for AudioCaps: caption rows).

Rows are appended to a `.partial` file (media first, then the line) that is renamed when the
split is done, so a crash never leaves a half-written final file; rerunning resumes, skipping
ids already written, and a split read to its end is not read again.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import datasets
import numpy as np
import soundfile
from datasets import load_dataset
from huggingface_hub import HfFileSystem, hf_hub_download
from PIL import Image

from omniflow.runtime.hub import (
    HUB_ERRORS,
    MissingDatasetError,
    check_dataset_access,
    describe_error,
    hf_token,
    is_offline,
)

SPLITS = ("train", "validation")
HOLDOUT_PERCENT = 5  # share of rows held out for validation where the source has one split only

Media = dict[str, Callable[[], bytes]]  # relative path -> producer of the file's bytes


class RowFormatError(ValueError):
    """A source row lacks a column the conversion needs."""


def _column(row: dict, names: tuple[str, ...], dataset: str):
    for name in names:
        if row.get(name) is not None:
            return row[name]
    raise RowFormatError(f"{dataset} row has none of the columns {list(names)} (it has {sorted(row)})")


def _safe_id(value) -> str:
    stem = Path(str(value)).stem if str(value).lower().endswith((".jpg", ".jpeg", ".png")) else str(value)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem)


def _captions(value) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    return [c.strip() for c in items if isinstance(c, str) and c.strip()]


def jpeg_bytes(value) -> bytes:
    """JPEG file bytes from a PIL image, raw bytes or a datasets {'bytes', 'path'} dict; JPEG passes as is."""
    if isinstance(value, Image.Image):
        image = value
    else:
        data = bytes(value) if isinstance(value, (bytes, bytearray)) else (
            value.get("bytes") or Path(value["path"]).read_bytes())
        if data[:3] == b"\xff\xd8\xff":
            return data
        image = Image.open(io.BytesIO(data))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def wav_bytes(value: dict) -> bytes:
    """WAV file bytes from a datasets audio dict: {'array', 'sampling_rate'} or undecoded {'bytes', 'path'}."""
    if value.get("array") is not None:
        samples, rate = np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"])
        if samples.ndim == 2 and samples.shape[0] < samples.shape[1]:
            samples = samples.T  # (channels, frames) -> (frames, channels) for soundfile
    else:
        data = value.get("bytes") or Path(value["path"]).read_bytes()
        if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
            return data
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


# Row converters: (row, id, archive) -> (record, media) or None for a row to drop.
# The column names were read from the sources' dataset cards and viewers where they could be
# read; the comments say where they come from otherwise.

def wikitext_record(row: dict, rid: str, archive=None):
    # Salesforce/wikitext: one column "text" holding a line of an article; blank lines and
    # " = Heading = " lines carry no sentence to reconstruct.
    text = row["text"].strip()
    if not text or (text.startswith("=") and text.endswith("=")):
        return None
    return {"id": rid, "task": "text", "text": text, "references": [text]}, {}


def coco_record(row: dict, rid: str, archive=None):
    # lmms-lab/COCO-Caption (viewer: splits val 40.5k, test 40.8k). Its rows follow lmms-lab's
    # formatted-COCO layout, as on its sibling sets: question_id, image, question (the prompt),
    # answer (the human captions), id, file_name, coco_url, height, width, date_captured.
    image = row["image"]
    media = {f"images/{rid}.jpg": lambda: jpeg_bytes(image)}
    return {"id": rid, "task": "image_to_text", "image": f"images/{rid}.jpg",
            "references": _captions(_column(row, ("answer", "captions", "caption"), "COCO-Caption"))}, media


def audiocaps_record(row: dict, rid: str, archive=None):
    # OpenSound/AudioCaps (viewer: train 45.2k, validation 2.22k, test 4.41k rows). Its card was
    # not readable here; the columns are those of the other AudioCaps copies on the Hub:
    # audiocap_id, youtube_id, start_time, audio, caption. One row per caption (validation and
    # test clips have 5), so the rows of one clip share its audio file.
    clip = _safe_id(f"{row['youtube_id']}_{row.get('start_time', 0)}") if row.get("youtube_id") else rid
    audio = row["audio"]
    media = {f"audio/{clip}.wav": lambda: wav_bytes(audio)}
    return {"id": rid, "task": "audio_to_text", "audio": f"audio/{clip}.wav",
            "references": _captions(_column(row, ("caption", "captions"), "AudioCaps"))}, media


def llava_record(row: dict, rid: str, archive: "ImageArchive"):
    # liuhaotian/LLaVA-CC3M-Pretrain-595K chat.json: id, image (file name inside images.zip),
    # conversations [{"from": "human", "value": prompt}, {"from": "gpt", "value": caption}].
    captions = [turn["value"] for turn in row["conversations"] if turn.get("from") == "gpt"]
    name = row["image"]
    media = {f"images/{rid}.jpg": lambda: jpeg_bytes(archive.read(name))}
    return {"id": rid, "task": "image_to_text", "image": f"images/{rid}.jpg",
            "references": _captions(captions)}, media


class ImageArchive:
    """Members of images.zip by file name (the zip may nest them in a folder)."""

    def __init__(self, file):
        self.zip = zipfile.ZipFile(file)
        self.members = {Path(info.filename).name: info for info in self.zip.infolist() if not info.is_dir()}

    def read(self, name: str) -> bytes:
        if Path(name).name not in self.members:
            raise RowFormatError(f"image {name} is not in images.zip")
        return self.zip.read(self.members[Path(name).name])


@dataclass(frozen=True)
class Source:
    key: str
    repo_id: str
    config: str | None
    task: str
    splits: dict[str, str]  # local split -> source split
    id_of: Callable[[dict, int], str]
    convert: Callable
    holdout: bool = False  # source split shared by train and validation: split rows by id hash
    data_files: str | None = None
    undecoded: tuple[tuple[str, type], ...] = ()  # media columns read as raw bytes (no torchcodec needed)
    group_by_media: bool = False  # rows sharing a media file become one record with all references
    archive: str | None = None  # file in the dataset repo that holds the images


SOURCES = {s.key: s for s in (
    Source("wikitext", "Salesforce/wikitext", "wikitext-103-raw-v1", "text",
           {"train": "train", "validation": "validation"}, lambda row, i: f"{i:08d}", wikitext_record),
    Source("coco", "lmms-lab/COCO-Caption", None, "image_to_text", {"train": "val", "validation": "val"},
           lambda row, i: _safe_id(_column(row, ("question_id", "file_name", "id"), "COCO-Caption")),
           coco_record, holdout=True, undecoded=(("image", datasets.Image),)),
    Source("audiocaps", "OpenSound/AudioCaps", None, "audio_to_text",
           {"train": "train", "validation": "validation"},
           lambda row, i: _safe_id(_column(row, ("audiocap_id",), "AudioCaps")), audiocaps_record,
           undecoded=(("audio", datasets.Audio),), group_by_media=True),
    Source("llava", "liuhaotian/LLaVA-CC3M-Pretrain-595K", None, "image_to_text",
           {"train": "train", "validation": "train"}, lambda row, i: _safe_id(row["id"]), llava_record,
           holdout=True, data_files="chat.json", archive="images.zip"),
)}


def in_validation_holdout(rid: str) -> bool:
    return int(hashlib.sha1(rid.encode()).hexdigest()[:8], 16) % 100 < HOLDOUT_PERCENT


def in_subset(index: int, fraction: float) -> bool:
    """Evenly spaced selection of `fraction` of the rows, stable across runs."""
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class SplitWriter:
    """Appends records to `<final>.partial` (a copy of the final file when resuming), renamed on close."""

    def __init__(self, folder: Path, split: str, group_by_media: bool):
        self.folder, self.group_by_media = folder, group_by_media
        self.final = folder / (f"{split}.rows.jsonl" if group_by_media else f"{split}.jsonl")
        self.grouped = folder / f"{split}.jsonl"
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.done = self._ids(self.partial if self.partial.exists() else self.final)
        self.new = 0
        self._file = None

    @staticmethod
    def _ids(path: Path) -> set[str]:
        """Ids written to `path`, after cutting a last line torn by a crash."""
        if not path.exists():
            return set()
        data = path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            path.write_bytes(complete)
        return {json.loads(line)["id"] for line in complete.decode("utf-8").splitlines()}

    def add(self, record: dict, media: Media) -> None:
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not self.partial.exists() and self.final.exists():
                shutil.copyfile(self.final, self.partial)
            self._file = open(self.partial, "a", encoding="utf-8")
        for relative, produce in media.items():
            if not (self.folder / relative).exists():
                _atomic_write(self.folder / relative, produce())
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        self.done.add(record["id"])
        self.new += 1

    def abort(self) -> None:
        """Keep what was written in the partial file for the next run to resume from."""
        if self._file is not None:
            self._file.close()

    def close(self) -> int:
        """Publish the split; returns its number of records."""
        if self._file is not None:
            os.fsync(self._file.fileno())
            self._file.close()
        if self.partial.exists():
            os.replace(self.partial, self.final)
        elif not self.final.exists():
            _atomic_write(self.final, b"")  # an empty split still gets its file
        if not self.group_by_media or not self.final.exists():
            return len(self.done)
        groups: dict[str, dict] = {}
        for line in self.final.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            media = row.get("audio") or row.get("image")
            group = groups.setdefault(media, {**row, "id": Path(media).stem, "references": []})
            group["references"] += [r for r in row["references"] if r not in group["references"]]
        _atomic_write(self.grouped, "".join(json.dumps(g, ensure_ascii=False) + "\n"
                                            for g in groups.values()).encode("utf-8"))
        return len(groups)


def _load_failure(source: Source, split: str, err: BaseException, folder: Path) -> MissingDatasetError:
    what = f"{source.repo_id}" + (f" ({source.config})" if source.config else "") + f" split {split}"
    if is_offline():
        return MissingDatasetError(
            f"cannot load {what}: HF_HUB_OFFLINE=1 and it is not in the datasets cache "
            f"{datasets.config.HF_DATASETS_CACHE}; run `python scripts/download_data.py --{source.key}` where "
            f"the Hub is reachable and copy {folder} here")
    return MissingDatasetError(f"cannot load {what} ({describe_error(err)})")


def load_source_split(source: Source, split: str, streaming: bool, folder: Path):
    """The source split as a (streaming or not) datasets object with media left undecoded."""
    kwargs = {"split": source.splits[split], "streaming": streaming, "token": hf_token()}
    if source.data_files:
        kwargs["data_files"] = source.data_files
    try:
        ds = load_dataset(source.repo_id, source.config, **kwargs)
    except HUB_ERRORS as err:
        raise _load_failure(source, source.splits[split], err, folder) from None
    for column, feature in source.undecoded:
        if ds.features is not None and column in ds.features:
            ds = ds.cast_column(column, feature(decode=False))
    return ds


def open_archive(source: Source, streaming: bool, folder: Path) -> ImageArchive:
    """The dataset's image zip: read in place over HTTP when streaming, else downloaded once."""
    try:
        if streaming:
            return ImageArchive(HfFileSystem(token=hf_token()).open(
                f"datasets/{source.repo_id}/{source.archive}", "rb"))
        return ImageArchive(hf_hub_download(source.repo_id, source.archive, repo_type="dataset", token=hf_token()))
    except HUB_ERRORS as err:
        raise _load_failure(source, source.archive, err, folder) from None


def convert_split(source: Source, rows, split: str, writer: SplitWriter, max_samples: int | None,
                  fraction: float, archive: ImageArchive | None = None) -> bool:
    """Convert source rows into the writer until it holds `max_samples` rows; True if the rows ran out."""
    for index, row in enumerate(rows):
        if not in_subset(index, fraction):
            continue
        rid = source.id_of(row, index)
        if source.holdout and in_validation_holdout(rid) != (split == "validation"):
            continue
        if rid in writer.done:
            continue
        converted = source.convert(row, rid, archive)
        if converted is None:
            continue
        writer.add(*converted)
        if writer.new % 1000 == 0:
            print(f"  [{source.key}/{split}] {len(writer.done)} rows", flush=True)
        if max_samples is not None and len(writer.done) >= max_samples:
            return False
    return True


def _read_info(folder: Path) -> dict:
    path = folder / "info.json"
    return json.loads(path.read_text()) if path.exists() else {"splits": {}}


def _fetch_rows(source: Source, split: str, writer: SplitWriter, args: argparse.Namespace, archive) -> bool:
    """Stream or load the source split into `writer`; True when the source rows ran out."""
    rows = load_source_split(source, split, args.streaming, writer.folder)
    try:
        return convert_split(source, rows, split, writer, args.max_samples, args.subset_fraction, archive)
    except HUB_ERRORS as err:
        writer.abort()
        raise MissingDatasetError(f"reading {source.repo_id} split {split} failed after {len(writer.done)} "
                                  f"rows ({describe_error(err)}); rerun to resume") from None
    except BaseException:
        writer.abort()
        raise


def download_source(source: Source, args: argparse.Namespace) -> None:
    folder = Path(args.output_dir) / source.key
    info = _read_info(folder)
    archive = None
    for split in args.split:
        entry = info["splits"].get(split, {})
        if entry.get("complete") and entry.get("subset_fraction") == args.subset_fraction:
            print(f"[{source.key}/{split}] already complete: {entry['records']} records in {folder}")
            continue
        writer = SplitWriter(folder, split, source.group_by_media)
        complete = False
        if args.max_samples is None or len(writer.done) < args.max_samples:
            check_dataset_access(source.repo_id)
            if source.archive and archive is None:
                archive = open_archive(source, args.streaming, folder)
            complete = _fetch_rows(source, split, writer, args, archive)
        records = writer.close()
        info["splits"][split] = {"source_split": source.splits[split], "records": records, "complete": complete,
                                 "subset_fraction": args.subset_fraction}
        if source.holdout:
            info["splits"][split]["holdout"] = f"sha1(id) % 100 < {HOLDOUT_PERCENT} is validation, the rest train"
        print(f"[{source.key}/{split}] {records} records ({writer.new} new) in {folder}", flush=True)
    info.update({"source": source.repo_id, "config": source.config, "task": source.task,
                 "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "streaming": args.streaming})
    _atomic_write(folder / "info.json", json.dumps(info, indent=1).encode())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Download the text job's datasets into data/<dataset>/<split>.jsonl.")
    for key, source in SOURCES.items():
        parser.add_argument(f"--{key}", action="store_true", help=f"{source.repo_id} ({source.task})")
    parser.add_argument("--streaming", action="store_true", help="stream rows instead of downloading whole splits")
    parser.add_argument("--max-samples", "--max_samples", dest="max_samples", type=int, default=None,
                        help="at most N rows per split (default: all)")
    parser.add_argument("--subset-fraction", "--subset_fraction", dest="subset_fraction", type=float, default=1.0,
                        help="keep this evenly spaced fraction of the source rows (0 < F <= 1)")
    parser.add_argument("--output_dir", "--output-dir", dest="output_dir", default="data",
                        help="folder that receives one subfolder per dataset")
    parser.add_argument("--split", nargs="+", choices=SPLITS, default=list(SPLITS), help="splits to write")
    args = parser.parse_args(argv)
    if not 0 < args.subset_fraction <= 1:
        parser.error(f"--subset-fraction must be in (0, 1], got {args.subset_fraction}")
    if args.max_samples is not None and args.max_samples < 1:
        parser.error(f"--max-samples must be at least 1, got {args.max_samples}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [s for key, s in SOURCES.items() if getattr(args, key)] or list(SOURCES.values())
    try:
        for source in chosen:
            download_source(source, args)
    except (MissingDatasetError, RowFormatError) as err:
        print(f"download_data: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
