"""scripts/download_data.py: real rows (Shakespeare lines, skimage photos, espeak speech) into the
jsonl + media format, holdout splits, caption grouping, resume, and the offline failure.

Only the Hub boundary is replaced: `load_dataset` at the script's call site returns real
`datasets.Dataset` / `IterableDataset` objects built from those rows.
"""

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import soundfile
import wn
from datasets import Audio, Dataset, Features, IterableDataset, Image as ImageFeature, Sequence, Value
from PIL import Image

from download_helpers import FIXTURES, ROOT, load_script
from omniflow.data import text_sources as sources

dd = load_script("scripts/download_data.py")
SPEECH = FIXTURES / "speech_dog_barks.flac"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "coins", "camera")  # coins, camera: grayscale


def shakespeare_rows() -> list[str]:
    lines = (Path(wn.__file__).parent / "data" / "wordnet_ic" / "shaks12.txt").read_text(errors="ignore").splitlines()
    start = next(i for i, line in enumerate(lines) if "To be, or not to be" in line)
    speech = [line.strip() for line in lines[start:start + 12] if line.strip()]
    return [" = Hamlet = ", "", *speech[:4], "", " = = Act III = = ", *speech[4:8]]


def photo(name: str) -> tuple[Image.Image, str]:
    loader = getattr(skimage.data, name)
    caption = loader.__doc__.strip().splitlines()[0].strip()
    return Image.fromarray(loader()).resize((48, 40)), caption


def coco_dataset() -> Dataset:
    images, captions = zip(*(photo(name) for name in PHOTOS))
    return Dataset.from_dict(
        {"question_id": [f"COCO_val2014_{name}.jpg" for name in PHOTOS], "image": list(images),
         "question": ["Provide a one-sentence caption for the provided image."] * len(PHOTOS),
         "answer": [[c, c.lower()] for c in captions]},
        features=Features({"question_id": Value("string"), "image": ImageFeature(),
                           "question": Value("string"), "answer": Sequence(Value("string"))}))


def audiocaps_dataset() -> Dataset:
    speech = SPEECH.read_bytes()
    tone = io.BytesIO()
    soundfile.write(tone, 0.3 * np.sin(np.linspace(0, 440 * 2 * np.pi, 8000)), 8000, format="FLAC")
    rows = [("101", "dogclip", 30, "A dog barks twice as a car passes", speech),
            ("102", "dogclip", 30, "A man says a dog barks while a car drives by", speech),
            ("103", "toneclip", 0, "A steady electronic beep", tone.getvalue())]
    ds = Dataset.from_dict(
        {"audiocap_id": [r[0] for r in rows], "youtube_id": [r[1] for r in rows],
         "start_time": [r[2] for r in rows], "caption": [r[3] for r in rows],
         "audio": [{"bytes": r[4], "path": f"{r[1]}.flac"} for r in rows]},
        features=Features({"audiocap_id": Value("string"), "youtube_id": Value("string"),
                           "start_time": Value("int32"), "caption": Value("string"),
                           "audio": {"bytes": Value("binary"), "path": Value("string")}}))
    return ds.cast_column("audio", Audio(decode=False))  # what a parquet with an Audio column gives


class FakeHub:
    """Stands in for `load_dataset`: serves real datasets by (repo, source split), logs calls."""

    def __init__(self, tables: dict):
        self.tables, self.calls = tables, []

    def __call__(self, path, name=None, *, split, streaming=False, token=None, data_files=None):
        self.calls.append((path, name, split, streaming, data_files))
        ds = self.tables[(path, split)]
        return ds.to_iterable_dataset() if streaming else ds


@pytest.fixture
def hub(monkeypatch):
    wikitext = Dataset.from_dict({"text": shakespeare_rows()})
    fake = FakeHub({("Salesforce/wikitext", "train"): wikitext, ("Salesforce/wikitext", "validation"): wikitext,
                    ("lmms-lab/COCO-Caption", "val"): coco_dataset(),
                    ("OpenSound/AudioCaps", "train"): audiocaps_dataset(),
                    ("OpenSound/AudioCaps", "validation"): audiocaps_dataset()})
    monkeypatch.setattr(sources, "load_dataset", fake)
    return fake


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("streaming", [True, False])
def test_wikitext_lines_become_text_records(tmp_path, hub, streaming):
    args = ["--wikitext", "--output_dir", str(tmp_path)] + (["--streaming"] if streaming else [])
    assert dd.main(args) == 0
    records = read_jsonl(tmp_path / "wikitext" / "train.jsonl")
    kept = [(i, line.strip()) for i, line in enumerate(shakespeare_rows()) if line.strip() and "=" not in line]
    assert [(r["id"], r["text"]) for r in records] == [(f"{i:08d}", text) for i, text in kept]
    assert all(r["task"] == "text" and r["references"] == [r["text"]] for r in records)
    assert any("To be, or not to be" in r["text"] for r in records)
    info = json.loads((tmp_path / "wikitext" / "info.json").read_text())
    assert info["source"] == "Salesforce/wikitext" and info["config"] == "wikitext-103-raw-v1"
    assert info["splits"]["train"] == {"source_split": "train", "records": 8, "complete": True, "subset_fraction": 1.0}
    assert hub.calls[0] == ("Salesforce/wikitext", "wikitext-103-raw-v1", "train", streaming, None)


def test_max_samples_and_subset_fraction(tmp_path, hub):
    wikitext = Dataset.from_dict({"text": [f"Line number {i} of the play." for i in range(10)]})
    hub.tables[("Salesforce/wikitext", "train")] = wikitext
    assert dd.main(["--wikitext", "--split", "train", "--subset-fraction", "0.5", "--output_dir", str(tmp_path)]) == 0
    ids = [r["id"] for r in read_jsonl(tmp_path / "wikitext" / "train.jsonl")]
    assert ids == ["00000001", "00000003", "00000005", "00000007", "00000009"]
    assert dd.main(["--wikitext", "--split", "train", "--max-samples", "3", "--output_dir", str(tmp_path / "b")]) == 0
    assert len(read_jsonl(tmp_path / "b" / "wikitext" / "train.jsonl")) == 3
    assert not (tmp_path / "b" / "wikitext" / "validation.jsonl").exists()


def test_coco_photos_captions_and_holdout_split(tmp_path, hub, monkeypatch):
    monkeypatch.setattr(sources, "HOLDOUT_PERCENT", 80)  # 2 of these 6 ids
    assert dd.main(["--coco", "--output_dir", str(tmp_path)]) == 0
    folder = tmp_path / "coco"
    train, validation = read_jsonl(folder / "train.jsonl"), read_jsonl(folder / "validation.jsonl")
    ids = {f"COCO_val2014_{name}" for name in PHOTOS}
    assert {r["id"] for r in train} | {r["id"] for r in validation} == ids
    assert {r["id"] for r in validation} == {i for i in ids if sources.in_validation_holdout(i)}
    assert train and validation
    for record in train + validation:
        name = record["id"].removeprefix("COCO_val2014_")
        _, caption = photo(name)
        assert record["task"] == "image_to_text" and record["references"] == [caption, caption.lower()]
        assert record["image"] == f"images/{record['id']}.jpg" and "text" not in record
        with Image.open(folder / record["image"]) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (48, 40)
    assert json.loads((folder / "info.json").read_text())["splits"]["validation"]["source_split"] == "val"


def test_audiocaps_speech_to_wav_and_captions_grouped_per_clip(tmp_path, hub):
    assert dd.main(["--audiocaps", "--split", "validation", "--output_dir", str(tmp_path)]) == 0
    folder = tmp_path / "audiocaps"
    records = read_jsonl(folder / "validation.jsonl")
    assert [(r["id"], r["audio"]) for r in records] == [("dogclip_30", "audio/dogclip_30.wav"),
                                                         ("toneclip_0", "audio/toneclip_0.wav")]
    assert records[0]["references"] == ["A dog barks twice as a car passes",
                                        "A man says a dog barks while a car drives by"]
    assert len(read_jsonl(folder / "validation.rows.jsonl")) == 3  # the per-row log kept for resuming
    wav, rate = soundfile.read(folder / "audio" / "dogclip_30.wav", dtype="int16")
    flac, flac_rate = soundfile.read(SPEECH, dtype="int16")
    assert soundfile.info(folder / "audio" / "dogclip_30.wav").format == "WAV"
    assert rate == flac_rate == 16000 and np.array_equal(wav, flac)
    assert json.loads((folder / "info.json").read_text())["splits"]["validation"]["records"] == 2


@pytest.mark.parametrize("streaming", [True, False])
def test_llava_captions_and_images_from_the_zip(tmp_path, hub, monkeypatch, streaming):
    names = PHOTOS[:3]
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, name in enumerate(names):
            buffer = io.BytesIO()
            photo(name)[0].convert("RGB").save(buffer, format="JPEG")
            zf.writestr(f"images/GCC_train_{i:09d}.jpg", buffer.getvalue())
    chat = Dataset.from_list([
        {"id": f"GCC_train_{i:09d}", "image": f"GCC_train_{i:09d}.jpg",
         "conversations": [{"from": "human", "value": "Give a brief description of the image.\n<image>"},
                           {"from": "gpt", "value": photo(name)[1]}]} for i, name in enumerate(names)])
    hub.tables[("liuhaotian/LLaVA-CC3M-Pretrain-595K", "train")] = chat
    monkeypatch.setattr(sources, "hf_hub_download", lambda repo, filename, **kw: str(archive))

    class LocalFileSystem:  # HfFileSystem stand-in: opens the same zip for random access
        def __init__(self, token=None):
            pass

        def open(self, path, mode):
            assert path == "datasets/liuhaotian/LLaVA-CC3M-Pretrain-595K/images.zip"
            return open(archive, mode)

    monkeypatch.setattr(sources, "HfFileSystem", LocalFileSystem)
    monkeypatch.setattr(sources, "HOLDOUT_PERCENT", 0)
    args = ["--llava", "--output_dir", str(tmp_path / "data")] + (["--streaming"] if streaming else [])
    assert dd.main(args) == 0
    folder = tmp_path / "data" / "llava"
    records = read_jsonl(folder / "train.jsonl")
    assert [r["references"] for r in records] == [[photo(name)[1]] for name in names]
    with zipfile.ZipFile(archive) as zf:
        assert (folder / records[1]["image"]).read_bytes() == zf.read("images/GCC_train_000000001.jpg")
    assert hub.calls[-1][-1] == "chat.json"
    assert (folder / "validation.jsonl").read_text() == ""  # every row held out of validation here


def test_interrupted_stream_resumes_without_redoing_rows(tmp_path, hub, monkeypatch, capsys):
    coco = coco_dataset()

    def rows_then_network_failure():
        yield from (coco[i] for i in range(3))
        raise ConnectionError("Connection reset by peer")

    broken = IterableDataset.from_generator(rows_then_network_failure, features=coco.features)
    monkeypatch.setattr(sources, "load_dataset", lambda *args, **kwargs: broken)
    monkeypatch.setattr(sources, "HOLDOUT_PERCENT", 0)
    args = ["--coco", "--split", "train", "--output_dir", str(tmp_path)]
    assert dd.main(args) == 1
    assert "failed after 3 rows (ConnectionError: Connection reset by peer); rerun to resume" in capsys.readouterr().err
    folder = tmp_path / "coco"
    assert not (folder / "train.jsonl").exists()
    partial = folder / "train.jsonl.partial"
    assert len(read_jsonl(partial)) == 3
    with open(partial, "a") as f:
        f.write('{"id": "COCO_val2014_torn", "ta')  # a line cut by a crash

    converted = []
    real_jpeg = sources.jpeg_bytes
    monkeypatch.setattr(sources, "jpeg_bytes", lambda value: converted.append(1) or real_jpeg(value))
    monkeypatch.setattr(sources, "load_dataset", hub)
    assert dd.main(args) == 0
    records = read_jsonl(folder / "train.jsonl")
    assert [r["id"] for r in records] == [f"COCO_val2014_{name}" for name in PHOTOS]
    assert len(converted) == len(PHOTOS) - 3 and not partial.exists()

    calls = len(hub.calls)
    assert dd.main(args) == 0  # complete split: nothing loaded again
    assert len(hub.calls) == calls


def test_missing_column_is_one_clear_line(tmp_path, hub, capsys):
    hub.tables[("lmms-lab/COCO-Caption", "val")] = coco_dataset().remove_columns("answer")
    assert dd.main(["--coco", "--output_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has none of the columns ['answer', 'captions', 'caption']" in err


def test_media_helpers_keep_jpeg_and_write_pcm_wav():
    buffer = io.BytesIO()
    photo("chelsea")[0].save(buffer, format="JPEG")
    assert sources.jpeg_bytes({"bytes": buffer.getvalue(), "path": None}) == buffer.getvalue()
    tone = np.sin(np.linspace(0, 100, 4000)).astype(np.float32)
    wav = sources.wav_bytes({"array": tone, "sampling_rate": 8000})
    decoded, rate = soundfile.read(io.BytesIO(wav))
    assert rate == 8000 and np.allclose(decoded, tone, atol=1e-4)


def test_offline_command_fails_fast_with_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "download_data.py"), "--wikitext",
                             "--max-samples", "5", "--output_dir", str(tmp_path / "data")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("download_data: cannot load Salesforce/wikitext")
    assert "HF_HUB_OFFLINE=1" in lines[0] and "python scripts/download_data.py --wikitext" in lines[0]
    assert not (tmp_path / "data" / "wikitext").exists()
