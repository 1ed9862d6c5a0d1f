import numpy as np
import pytest
import torch
from PIL import Image

from omniflow.data.images import (ImageFolderError, ImageNetFolderDataset, build_image_dataset, load_image,
                                  to_model_range, write_sample_images)


def test_sample_images_are_real_distinct_photos(tmp_path):
    paths = write_sample_images(tmp_path, 24, 14)  # more than the bundled photos: crops are added
    assert len(paths) == 14 and all(p.is_file() for p in paths)
    arrays = [np.asarray(Image.open(p)) for p in paths]
    assert all(a.shape == (24, 24, 3) and a.dtype == np.uint8 for a in arrays)
    assert len({a.tobytes() for a in arrays}) == 14
    assert write_sample_images(tmp_path / "again", 24, 14)[13].read_bytes() == paths[13].read_bytes()


def test_resize_and_center_crop(tmp_path):
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 10:30] = 255  # the white middle half is exactly what a center crop keeps
    Image.fromarray(wide).save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png", 10)
    assert image.shape == (3, 10, 10) and image.dtype == torch.uint8
    assert image[:, :, 1:-1].min() == 255
    Image.fromarray(wide[..., 0]).save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png", 10).shape == (3, 10, 10)
    scaled = to_model_range(image)
    assert scaled.min() >= -1 and scaled.max() == 1 and scaled.dtype == torch.float32
    with pytest.raises(ValueError, match="uint8"):
        to_model_range(scaled)


def test_default_folder_is_nested_sorted_and_skips_corrupt_files(tmp_path, caplog):
    write_sample_images(tmp_path / "b", 16, 2)
    write_sample_images(tmp_path / "a" / "deep", 16, 1)
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not an image at all")
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")
    data = build_image_dataset(tmp_path, "default", 12)
    assert data.files == ["a/deep/0000_astronaut.png", "b/0000_astronaut.png", "b/0001_chelsea.png"]
    assert [p.name for p in data.skipped] == ["broken.jpg"]
    assert "skipped 1 unreadable image" in caplog.text
    item = data[2]
    assert item["image"].shape == (3, 12, 12) and item["path"] == "b/0001_chelsea.png" and "label" not in item


def test_truncated_image_falls_back_to_the_next_one(tmp_path, caplog):
    paths = write_sample_images(tmp_path, 64, 2)
    Image.open(paths[0]).convert("RGB").save(tmp_path / "0000_astronaut.jpg", quality=95)
    paths[0].unlink()
    data = (tmp_path / "0000_astronaut.jpg").read_bytes()
    (tmp_path / "0000_astronaut.jpg").write_bytes(data[: len(data) // 2])  # header intact, pixels cut
    dataset = build_image_dataset(tmp_path, "default", 16)
    assert len(dataset) == 2 and not dataset.skipped
    assert dataset[0]["path"] == "0001_chelsea.png" and "cannot decode" in caplog.text


def test_imagenet_layout_returns_labels(tmp_path):
    for name, n in [("n02", 2), ("n01", 1)]:
        write_sample_images(tmp_path / name, 16, n)
    (tmp_path / "n01" / "bad.JPEG").write_bytes(b"")
    data = build_image_dataset(tmp_path, "imagenet", 8)
    assert isinstance(data, ImageNetFolderDataset) and data.classes == ["n01", "n02"]
    assert [data[i]["label"] for i in range(len(data))] == [0, 1, 1]
    assert len(data.skipped) == 1
    loader = torch.utils.data.DataLoader(data, batch_size=3)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 3, 8, 8) and batch["label"].tolist() == [0, 1, 1]


def test_folder_errors(tmp_path):
    with pytest.raises(ImageFolderError, match="not found"):
        build_image_dataset(tmp_path / "missing", "default", 8)
    with pytest.raises(ImageFolderError, match="no readable images"):
        build_image_dataset(tmp_path, "default", 8)
    write_sample_images(tmp_path, 8, 1)
    with pytest.raises(ImageFolderError, match="one sub-folder per class"):
        build_image_dataset(tmp_path, "imagenet", 8)
    with pytest.raises(ValueError, match="dataset_type"):
        build_image_dataset(tmp_path, "coco", 8)
