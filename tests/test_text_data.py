"""Text-job data: builders on the embedded sample and on download-format folders, weighted mixing,
exact resume, Hub streams (only `load_dataset` replaced, serving real datasets), errors,
WikiText cleaning and tokenize_batch with a BPE tokenizer trained here on Shakespeare.
"""
import itertools
import json
import shutil
import zipfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import skimage.data
import soundfile
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from omniflow.data import ResumableLoader
from omniflow.data import text_sources as sources
from omniflow.data.sample_text import sonnet_sentences, write_sample_text_data
from omniflow.data.text import (
    DataConfig,
    FolderDataset,
    MissingTextDataError,
    MixedDataset,
    build_eval_datasets,
    build_train_dataset,
    choose_reference,
    collate_examples,
    load_data_config,
    tokenize_batch,
)
from omniflow.runtime.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
SPEECH = Path(__file__).parent / "fixtures" / "download" / "speech_dog_barks.flac"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def caption(name: str) -> str:
    return getattr(skimage.data, name).__doc__.strip().splitlines()[0].strip()


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory):
    """A working directory holding data/sample as configs/data_config_sample.json expects."""
    root = tmp_path_factory.mktemp("work")
    write_sample_text_data(root / "data" / "sample", image_size=32, n_text=60, variants=2)
    return root


def sample_config(root: Path, **changes) -> DataConfig:
    values = json.loads((ROOT / "configs" / "data_config_sample.json").read_text())
    values["image_size"] = 32
    for spec in values["datasets"]:
        spec["source"] = str(root / spec["source"])
        spec.update(changes.get(spec["name"], {}))
    return DataConfig.from_dict(values, where="test config")


def write_download_folder(folder: Path, split: str, converted) -> None:
    """What scripts/download_data.py writes for converted rows: media files and <split>.jsonl."""
    lines = []
    for record, media in converted:
        for relative, produce in media.items():
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            (folder / relative).write_bytes(produce())
        lines.append(json.dumps(record) + "\n")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(lines))


def photo(name: str, size=(48, 40)) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)()).resize(size)


def tone(rate: int, seconds: float, hz: float) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * hz * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


@pytest.fixture(scope="module")
def download_root(tmp_path_factory):
    """data/coco, data/audiocaps, data/wikitext in the download format, made by the shared converters."""
    data = tmp_path_factory.mktemp("dl") / "data"
    coco = [sources.coco_record({"image": photo(n), "answer": [caption(n), f"A picture: {caption(n).lower()}"]},
                                f"COCO_val2014_{n}") for n in PHOTOS]
    write_download_folder(data / "coco", "train", coco)
    speech, speech_rate = soundfile.read(SPEECH, dtype="float32")
    audio = [sources.audiocaps_record({"youtube_id": "dog", "start_time": 30, "caption": "A man speaks",
                                       "audio": {"array": speech, "sampling_rate": speech_rate}}, "dog_30"),
             sources.audiocaps_record({"youtube_id": "beep", "start_time": 0, "caption": "A steady beep",
                                       "audio": {"array": tone(8000, 0.5, 440), "sampling_rate": 8000}}, "beep_0")]
    write_download_folder(data / "audiocaps", "train", audio)
    lines = [" = Valkyria Chronicles III = ", "", " The game 's 1 @,@ 000 @-@ strong army arrived . ",
             " = = Gameplay = = ", " It ran at 2 @.@ 5 frames ( per second ) ; it did n't stop . "]
    write_download_folder(data / "wikitext", "train",
                          [r for i, line in enumerate(lines) if (r := sources.wikitext_record({"text": line}, f"{i:08d}"))])
    return data.parent


def download_config(**extra) -> DataConfig:
    return DataConfig.from_dict({"datasets": [
        {"name": "coco", "task": "image_to_text", "source": "data/coco", "eval_split": None},
        {"name": "audiocaps", "task": "audio_to_text", "source": "data/audiocaps", "eval_split": None},
        {"name": "wikitext", "task": "text", "source": "data/wikitext", "eval_split": None}],
        "image_size": 24, **extra})


def test_sample_data_goes_through_the_builders(sample_root):
    photos = sample_root / "data" / "sample" / "photos"
    info = json.loads((photos / "info.json").read_text())
    assert info["sample"] is True and info["task"] == "image_to_text"
    config = sample_config(sample_root)
    train = build_train_dataset(config, seed=0)
    assert isinstance(train, MixedDataset)
    evals = build_eval_datasets(config)
    assert {name: len(ds) for name, ds in evals.items()} == {
        "sample_photos": info["splits"]["validation"]["records"], "sample_shakespeare": 6}
    sentences, seen = set(sonnet_sentences()), set()
    for example in (train[i] for i in range(len(train))):
        seen.add(example["task"])
        if example["task"] == "image_to_text":
            name = example["id"].rsplit("_", 1)[0]
            assert example["text"] == caption(name) == example["references"][0]
            assert example["image"].dtype == torch.uint8 and example["image"].shape == (3, 32, 32)
            assert example["audio"] is None
        else:
            assert example["image"] is None and example["text"] == example["references"][0]
            assert example["text"] in sentences
    assert seen == {"image_to_text", "text"}
    astronaut = evals["sample_photos"][0]
    assert astronaut["id"] == "astronaut_full"
    reference = Image.fromarray(skimage.data.astronaut()).resize((32, 32), Image.Resampling.BICUBIC)
    error = (astronaut["image"].permute(1, 2, 0).float() - torch.from_numpy(np.array(reference)).float()).abs()
    assert error.mean() < 8  # the whole photo, not a crop or a flip (JPEG error only)


def test_download_format_images_audio_and_wikitext(download_root, monkeypatch):
    monkeypatch.chdir(download_root)
    config = download_config()
    coco = FolderDataset(config.datasets[0], "train", config)
    example = coco[1]
    assert example["id"] == "COCO_val2014_chelsea" and example["image"].shape == (3, 24, 24)
    assert example["text"] == choose_reference(example["id"], example["references"])
    assert example["references"] == [caption("chelsea"), f"A picture: {caption('chelsea').lower()}"]

    audio = FolderDataset(config.datasets[1], "train", config)
    speech, beep = audio[0], audio[1]
    assert speech["id"] == "dog_30" and speech["audio"].dtype == torch.float32
    assert len(speech["audio"]) == soundfile.info(SPEECH).frames  # already 16 kHz
    assert len(beep["audio"]) == 8000  # 0.5 s at 8 kHz resampled to 16 kHz
    spectrum = np.abs(np.fft.rfft(beep["audio"].numpy()))
    assert abs(np.argmax(spectrum) * 16000 / len(beep["audio"]) - 440) < 3

    clip = download_root / "data" / "audiocaps" / "audio" / "beep_0.wav"
    saved = clip.read_bytes()
    clip.write_bytes(saved[:20])  # a WAV cut inside its header
    try:
        with pytest.raises(DataError, match=r"dataset 'audiocaps' record beep_0: cannot read audio from .*beep_0.wav"):
            audio[1]
    finally:
        clip.write_bytes(saved)

    wikitext = FolderDataset(config.datasets[2], "train", config)
    assert [wikitext[i]["text"] for i in range(len(wikitext))] == [
        "The game's 1,000-strong army arrived.", "It ran at 2.5 frames (per second); it didn't stop."]

    batch = collate_examples([coco[0], speech, wikitext[0], beep])
    assert batch["image_mask"].tolist() == [True, False, False, False]
    assert batch["image"].shape == (4, 3, 24, 24) and batch["image"][1:].sum() == 0
    assert batch["audio_lengths"].tolist() == [0, len(speech["audio"]), 0, 8000]
    assert torch.equal(batch["audio"][3, :8000], beep["audio"]) and batch["audio"][3, 8000:].abs().sum() == 0
    assert batch["task"] == ["image_to_text", "audio_to_text", "text", "audio_to_text"]
    assert collate_examples([wikitext[0]])["image"] is None


def test_repeated_caption_sets_rotate_their_references(download_root, monkeypatch):
    monkeypatch.chdir(download_root)
    mix = build_train_dataset(DataConfig.from_dict({
        "datasets": [{"name": "coco", "task": "image_to_text", "source": "data/coco", "weight": 0.8},
                     {"name": "wikitext", "task": "text", "source": "data/wikitext", "weight": 0.2}],
        "image_size": 16}))
    texts = {}
    for i in range(len(mix)):
        example = mix[i]
        texts.setdefault(example["id"], set()).add(example["text"])
    assert mix.counts == {"coco": 8, "wikitext": 2}  # wikitext's 2 lines set the epoch: 2 / 0.2 = 10
    assert all(len(texts[f"COCO_val2014_{n}"]) == 2 for n in PHOTOS)  # both references used


def test_weights_set_the_mix_and_are_deterministic(sample_root):
    config = sample_config(sample_root, sample_photos={"weight": 3}, sample_shakespeare={"weight": 1})
    mix = build_train_dataset(config, seed=5)
    photos, sonnets = mix.counts["sample_photos"], mix.counts["sample_shakespeare"]
    assert sonnets == 54 and photos == 3 * 54  # every train sentence once; photos (42) repeated
    ids = lambda ds: [ds[i]["id"] for i in range(len(ds))]  # noqa: E731
    assert ids(mix) == ids(build_train_dataset(config, seed=5))
    assert ids(mix) != ids(build_train_dataset(config, seed=6))  # the partial pass is a seeded subset

    streaming = sample_config(sample_root, sample_photos={"weight": 0.8, "streaming": True},
                              sample_shakespeare={"weight": 0.2})
    stream = build_train_dataset(streaming, seed=5)
    head = [e["task"] for e, _ in zip(stream, range(100))]
    assert 0.7 <= head.count("image_to_text") / 100 <= 0.9
    assert head == [e["task"] for e, _ in zip(build_train_dataset(streaming, seed=5), range(100))]


def batches_ids(loader_batches):
    return [batch["id"] for batch in loader_batches]


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_continues_exactly(sample_root, streaming):
    changes = {"streaming": streaming, "max_samples": 30}
    config = sample_config(sample_root, sample_photos=changes, sample_shakespeare=changes)

    def loader():
        return ResumableLoader(build_train_dataset(config, seed=3), 4, collate_fn=collate_examples, seed=3,
                               shuffle_buffer=16)

    reference = loader()
    full = list(reference) + list(reference)
    interrupted = loader()
    it = iter(interrupted)
    head = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = loader()
    resumed.load_state_dict(state)
    tail = list(resumed) + list(resumed)
    assert batches_ids(head + tail) == batches_ids(full[: len(head) + len(tail)])
    assert len(head) + len(tail) == len(full)
    for got, want in zip(tail, full[5:]):
        assert torch.equal(got["image_mask"], want["image_mask"])
        assert (got["image"] is None and want["image"] is None) or torch.equal(got["image"], want["image"])
    assert batches_ids(full[:15]) != batches_ids(full[15:30])  # the second epoch is reshuffled


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The Hub: load_dataset serves real datasets built from skimage photos and WikiText-like lines;
    LLaVA's chat.json streams through the real JSON builder and its images.zip opens from disk."""
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in PHOTOS:
            zf.writestr(f"images/GCC_{name}.jpg", sources.jpeg_bytes(photo(name)))
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"id": f"GCC_{n}", "image": f"GCC_{n}.jpg", "conversations": [
        {"from": "human", "value": "Describe the image.\n<image>"}, {"from": "gpt", "value": caption(n)}]}
        for n in PHOTOS]))

    class ArchiveFileSystem:  # HfFileSystem stand-in: random access to the zip
        def __init__(self, token=None):
            pass

        def open(self, path, mode):
            assert path == "datasets/liuhaotian/LLaVA-CC3M-Pretrain-595K/images.zip"
            return open(archive, mode)

    monkeypatch.setattr(sources, "HfFileSystem", ArchiveFileSystem)
    tables = {
        ("lmms-lab/COCO-Caption", "val"): datasets.Dataset.from_dict(
            {"question_id": [f"COCO_val2014_{n}.jpg" for n in PHOTOS], "image": [photo(n) for n in PHOTOS],
             "answer": [[caption(n), caption(n).upper()] for n in PHOTOS]},
            features=datasets.Features({"question_id": datasets.Value("string"), "image": datasets.Image(),
                                        "answer": datasets.List(datasets.Value("string"))})),
        ("Salesforce/wikitext", "train"): datasets.Dataset.from_dict(
            {"text": [" = Heading = ", *(f" Line {i} of 2 @,@ 000 . " for i in range(20))]}),
    }
    calls = []

    def load_dataset(path, name=None, *, split, streaming=False, token=None, data_files=None):
        calls.append((path, split, streaming))
        if path == "liuhaotian/LLaVA-CC3M-Pretrain-595K":
            assert data_files == "chat.json"
            return datasets.load_dataset("json", data_files=str(chat), split=split, streaming=streaming)
        return tables[(path, split)].to_iterable_dataset(num_shards=2)

    monkeypatch.setattr(sources, "load_dataset", load_dataset)
    monkeypatch.setattr(sources, "HOLDOUT_PERCENT", 60)  # rocket (55) of the 4 photos
    return calls


def hub_config(**wikitext):
    return DataConfig.from_dict({"datasets": [
        {"name": "coco", "task": "image_to_text", "source": "lmms-lab/COCO-Caption", "streaming": True},
        {"name": "wikitext", "task": "text", "source": "Salesforce/wikitext", "streaming": True,
         "eval_split": None, **wikitext}], "image_size": 16})


def test_hub_streams_convert_rows_on_the_fly(hub):
    evals = build_eval_datasets(hub_config())
    validation = list(evals["coco"])
    held_out = [f"COCO_val2014_{n}" for n in PHOTOS if sources.in_validation_holdout(f"COCO_val2014_{n}")]
    assert 0 < len(held_out) < len(PHOTOS)
    assert sorted(e["id"] for e in validation) == sorted(held_out)
    for example in validation:
        assert example["image"].shape == (3, 16, 16) and example["image"].dtype == torch.uint8
        assert example["text"] in example["references"] and example["dataset"] == "coco"
    train = build_train_dataset(hub_config(max_samples=6), seed=0)
    examples = list(train)
    lines = [e for e in examples if e["task"] == "text"]
    assert {e["text"] for e in lines} == {f"Line {i} of 2,000." for i in range(6)}
    assert len([e for e in examples if e["task"] == "image_to_text"]) >= len(PHOTOS) - len(held_out)
    assert ("lmms-lab/COCO-Caption", "val", True) in hub

    llava = DataConfig.from_dict({"datasets": [
        {"name": "llava", "task": "image_to_text", "streaming": True, "source": "liuhaotian/LLaVA-CC3M-Pretrain-595K"},
        {"name": "wikitext", "task": "text", "source": "Salesforce/wikitext", "streaming": True}],
        "image_size": 16})
    train = list(itertools.islice((e for e in build_train_dataset(llava) if e["task"] == "image_to_text"), 3))
    assert set(train[0]) == {"id", "dataset", "task", "text", "references", "image", "audio"}
    assert [e["id"] for e in train] == [f"GCC_{n}" for n in PHOTOS if not sources.in_validation_holdout(f"GCC_{n}")]
    assert all(e["text"] == caption(e["id"].removeprefix("GCC_")) and e["image"].shape == (3, 16, 16) for e in train)


def test_hub_stream_resumes_exactly(hub):
    def loader():
        return ResumableLoader(build_train_dataset(hub_config(), seed=1), 3, collate_fn=collate_examples,
                               seed=1, shuffle_buffer=5)

    full = batches_ids(loader())
    interrupted = loader()
    it = iter(interrupted)
    head = [next(it)["id"] for _ in range(3)]
    resumed = loader()
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    assert head + batches_ids(resumed) == full


def test_missing_folders_name_the_command_that_writes_them(tmp_path, monkeypatch, sample_root):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingTextDataError) as err:
        build_train_dataset(load_data_config(ROOT / "configs" / "data_config.json"))
    message = str(err.value)
    assert "data folder data/wikitext of dataset 'wikitext' does not exist" in message
    assert "`python scripts/download_data.py --wikitext`" in message and "\n" not in message

    spec = {"name": "coco", "task": "image_to_text", "source": "/big/disk/coco"}
    with pytest.raises(MissingTextDataError, match=r"download_data.py --coco --output_dir /big/disk`"):
        build_eval_datasets(DataConfig.from_dict({"datasets": [spec]}))

    with pytest.raises(MissingTextDataError, match=r"`python -m omniflow.data.sample_text --output_dir data/sample`"):
        build_train_dataset(load_data_config(ROOT / "configs" / "data_config_sample.json"))

    partial = tmp_path / "data" / "sample"
    shutil.copytree(sample_root / "data" / "sample" / "photos", partial / "photos")
    (partial / "photos" / "validation.jsonl").unlink()
    with pytest.raises(MissingTextDataError, match="data/sample/photos of dataset 'sample_photos' has no "
                                                   "validation.jsonl"):
        build_eval_datasets(load_data_config(ROOT / "configs" / "data_config_sample.json"))
    (partial / "photos" / "validation.jsonl").write_text("")
    with pytest.raises(DataError, match="validation.jsonl is empty: dataset 'sample_photos' has no validation"):
        build_eval_datasets(load_data_config(ROOT / "configs" / "data_config_sample.json"))


def test_config_mistakes_are_one_clear_line(sample_root):
    good = json.loads((ROOT / "configs" / "data_config_sample.json").read_text())
    bad_key = {**good, "datasets": [{**good["datasets"][0], "wieght": 2}]}
    with pytest.raises(ConfigError, match=r"datasets\[0\]: unknown key 'wieght' \(did you mean 'weight'\?\)"):
        DataConfig.from_dict(bad_key, where="c.json")
    with pytest.raises(ConfigError, match=r"unknown key 'image_sise' \(did you mean 'image_size'\?\)"):
        DataConfig.from_dict({**good, "image_sise": 3})
    with pytest.raises(ConfigError, match=r"datasets\[0\] \(sample_photos\): streaming has the wrong type: 'yes'"):
        DataConfig.from_dict({"datasets": [{**good["datasets"][0], "streaming": "yes"}]})
    with pytest.raises(ConfigError, match="task must be one of"):
        DataConfig.from_dict({"datasets": [{**good["datasets"][0], "task": "captioning"}]})
    with pytest.raises(ConfigError, match=r"must stream .* `python scripts/download_data.py --coco` and set source to data/coco"):
        DataConfig.from_dict({"datasets": [{"name": "c", "task": "image_to_text", "source": "lmms-lab/COCO-Caption"}]})
    with pytest.raises(ConfigError, match="holds image_to_text examples, not text"):
        DataConfig.from_dict({"datasets": [{"name": "c", "task": "text", "source": "lmms-lab/COCO-Caption",
                                            "streaming": True}]})
    wrong_task = sample_config(sample_root, sample_photos={"task": "text"})
    with pytest.raises(DataError, match=r"photos/train.jsonl holds \['image_to_text'\] records but the data "
                                        r"config says task 'text'"):
        build_train_dataset(wrong_task)


def test_wikitext_cleaning():
    assert sources.clean_wikitext(" = Robert Boulter = \n") is None
    assert sources.clean_wikitext(" = = = Reception = = = ") is None
    assert sources.clean_wikitext("   ") is None
    line = (" The 2 @,@ 500 @-@ year @-@ old site , near the river ( see map ) , was n't lost ; it 's "
            "3 @.@ 5 km wide . \n")
    assert sources.clean_wikitext(line) == ("The 2,500-year-old site, near the river (see map), wasn't lost; "
                                            "it's 3.5 km wide.")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A byte-level BPE trained on the Sonnets, saved and reloaded through transformers."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(sonnet_sentences(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def test_tokenize_batch_pads_right_and_keeps_eos(tokenizer):
    short, long = "Shall I compare thee?", " ".join(sonnet_sentences()[:3])
    out = tokenize_batch({"text": [short, long]}, tokenizer, max_length=16)
    ids, mask = out["input_ids"], out["attention_mask"]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    body = tokenizer(short, add_special_tokens=False)["input_ids"]
    n = len(body) + 2
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    assert ids[0, :n].tolist() == [bos, *body, eos] and ids[0, n:].eq(pad).all()
    assert mask[0].tolist() == [1] * n + [0] * (16 - n)
    assert tokenizer.decode(ids[0, 1:n - 1]) == short
    long_body = tokenizer(long, add_special_tokens=False)["input_ids"]
    assert len(long_body) > 16 and ids[1].tolist() == [bos, *long_body[:14], eos] and mask[1].all()

    plain = tokenize_batch([short], tokenizer, max_length=40, add_bos=False, padding="max_length")
    assert plain["input_ids"].shape == (1, 40) and plain["input_ids"][0, : n - 1].tolist() == [*body, eos]
    assert tokenize_batch([short], tokenizer, 40)["input_ids"].shape == (1, n)  # longest row

    tokenizer.pad_token = None
    try:
        with pytest.raises(ConfigError, match="needs an EOS and a pad token"):
            tokenize_batch([short], tokenizer, 16)
    finally:
        tokenizer.pad_token = "<pad>"
    with pytest.raises(ConfigError, match="no room"):
        tokenize_batch([short], tokenizer, 2)
