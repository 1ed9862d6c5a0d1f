"""The four Hub sources of the text job and their row -> record conversion.

Shared by ``scripts/download_data.py`` (writes records and media to ``data/<name>/``) and the
streaming builders of :mod:`omniflow.data.text` (keep media in memory), so a row becomes the
same record either way. A record is ``{"id", "task", "text" (text task), "image"/"audio" (media
path relative to the dataset folder), "references": [str, ...]}``; the media it names come as
``{relative path: producer of the file's bytes}`` and are only produced when written or used.
"""
from __future__ import annotations

import hashlib
import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile
from huggingface_hub import HfFileSystem, hf_hub_download
from PIL import Image

from ..runtime.hub import HUB_ERRORS, MissingDatasetError, describe_error, hf_token, is_offline

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


# WikiText's tokenizer split numbers and hyphenated words with "@" markers ("1 @,@ 000",
# "state @-@ of") and put spaces before punctuation and clitics; undo that so the target reads
# as the language models' tokenizers expect.
_WIKITEXT_FIXES = (
    (re.compile(r" @([-,.])@ "), r"\1"),
    (re.compile(r" ([,.;:!?)\]}]|'s\b|'re\b|'ve\b|'ll\b|'d\b|'m\b|n't\b)"), r"\1"),
    (re.compile(r"([(\[{]) "), r"\1"),
)


def clean_wikitext(line: str) -> str | None:
    """A WikiText line as plain text, or None for blank and ``= Heading =`` lines."""
    text = line.strip()
    if not text or (text.startswith("=") and text.endswith("=")):
        return None
    for pattern, replacement in _WIKITEXT_FIXES:
        text = pattern.sub(replacement, text)
    return text


# Row converters: (row, id, archive) -> (record, media) or None for a row to drop.
# The column names were read from the sources' dataset cards and viewers where they could be
# read; the comments say where they come from otherwise.

def wikitext_record(row: dict, rid: str, archive=None):
    # Salesforce/wikitext: one column "text" holding a line of an article; blank lines and
    # " = Heading = " lines carry no sentence to reconstruct.
    text = clean_wikitext(row["text"])
    if text is None:
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
    undecoded: tuple[tuple[str, str], ...] = ()  # media columns read as raw bytes: (column, datasets feature)
    group_by_media: bool = False  # rows sharing a media file become one record with all references
    archive: str | None = None  # file in the dataset repo that holds the images


SOURCES = {s.key: s for s in (
    Source("wikitext", "Salesforce/wikitext", "wikitext-103-raw-v1", "text",
           {"train": "train", "validation": "validation"}, lambda row, i: f"{i:08d}", wikitext_record),
    Source("coco", "lmms-lab/COCO-Caption", None, "image_to_text", {"train": "val", "validation": "val"},
           lambda row, i: _safe_id(_column(row, ("question_id", "file_name", "id"), "COCO-Caption")),
           coco_record, holdout=True, undecoded=(("image", "Image"),)),
    Source("audiocaps", "OpenSound/AudioCaps", None, "audio_to_text",
           {"train": "train", "validation": "validation"},
           lambda row, i: _safe_id(_column(row, ("audiocap_id",), "AudioCaps")), audiocaps_record,
           undecoded=(("audio", "Audio"),), group_by_media=True),
    Source("llava", "liuhaotian/LLaVA-CC3M-Pretrain-595K", None, "image_to_text",
           {"train": "train", "validation": "train"}, lambda row, i: _safe_id(row["id"]), llava_record,
           holdout=True, data_files="chat.json", archive="images.zip"),
)}
SOURCES_BY_REPO = {s.repo_id: s for s in SOURCES.values()}


def in_validation_holdout(rid: str) -> bool:
    return int(hashlib.sha1(rid.encode()).hexdigest()[:8], 16) % 100 < HOLDOUT_PERCENT


def convert_row(source: Source, row: dict, index: int, split: str, archive: ImageArchive | None = None):
    """(record, media) for a source row of local `split`; None for a row of the other split or without text."""
    rid = source.id_of(row, index)
    if source.holdout and in_validation_holdout(rid) != (split == "validation"):
        return None
    return source.convert(row, rid, archive)


def load_dataset(*args, **kwargs):
    """``datasets.load_dataset``, imported on first use: download_data.py answers --help without datasets (1 s)."""
    import datasets

    return datasets.load_dataset(*args, **kwargs)


def _load_failure(source: Source, split: str, err: BaseException, folder: Path) -> MissingDatasetError:
    import datasets

    what = f"{source.repo_id}" + (f" ({source.config})" if source.config else "") + f" split {split}"
    if is_offline():
        return MissingDatasetError(
            f"cannot load {what}: HF_HUB_OFFLINE=1 and it is not in the datasets cache "
            f"{datasets.config.HF_DATASETS_CACHE}; run `python scripts/download_data.py --{source.key}` where "
            f"the Hub is reachable and copy {folder} here")
    return MissingDatasetError(f"cannot load {what} ({describe_error(err)})")


def load_source_split(source: Source, split: str, streaming: bool, folder: Path):
    """Local `split` of the source as a (streaming or not) datasets object with media left undecoded."""
    import datasets

    kwargs = {"split": source.splits[split], "streaming": streaming, "token": hf_token()}
    if source.data_files:
        kwargs["data_files"] = source.data_files
    try:
        ds = load_dataset(source.repo_id, source.config, **kwargs)
    except HUB_ERRORS as err:
        raise _load_failure(source, source.splits[split], err, folder) from None
    for column, feature in source.undecoded:
        if ds.features is not None and column in ds.features:
            ds = ds.cast_column(column, getattr(datasets, feature)(decode=False))
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
