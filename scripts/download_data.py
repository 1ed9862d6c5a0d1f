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
`--max-samples N` caps the rows written per split (for AudioCaps: caption rows). WikiText lines
lose blank and `= Heading =` lines and the tokenizer's ` @-@ ` markers. The row conversion is
shared with the streaming data builders: `omniflow/data/text_sources.py`.

Rows are appended to a `.partial` file (media first, then the line) that is renamed when the
split is done, so a crash never leaves a half-written final file; rerunning resumes, skipping
ids already written, and a split read to its end is not read again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from omniflow.data import text_sources as sources
from omniflow.data.text_sources import (
    SOURCES,
    ImageArchive,
    Media,
    RowFormatError,
    Source,
    convert_row,
    load_source_split,
    open_archive,
)
from omniflow.runtime.hub import HUB_ERRORS, MissingDatasetError, check_dataset_access, describe_error

SPLITS = ("train", "validation")


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


def convert_split(source: Source, rows, split: str, writer: SplitWriter, max_samples: int | None,
                  fraction: float, archive: ImageArchive | None = None) -> bool:
    """Convert source rows into the writer until it holds `max_samples` rows; True if the rows ran out."""
    for index, row in enumerate(rows):
        if not in_subset(index, fraction):
            continue
        converted = convert_row(source, row, index, split, archive)
        if converted is None or converted[0]["id"] in writer.done:
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
            info["splits"][split]["holdout"] = f"sha1(id) % 100 < {sources.HOLDOUT_PERCENT} is validation, the rest train"
        print(f"[{source.key}/{split}] {records} records ({writer.new} new) in {folder}", flush=True)
    info.update({"source": source.repo_id, "config": source.config, "task": source.task,
                 "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "streaming": args.streaming})
    _atomic_write(folder / "info.json", json.dumps(info, indent=1).encode())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Download the text job's datasets into data/<dataset>/<split>.jsonl.",
                                     allow_abbrev=False)
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
