import json
import pickle

import pytest
import torch
from PIL import Image
from align_helpers import RESOLUTION, photo_dir, save_tiny_vae, vae_dirs  # noqa: F401 (fixtures)

from omniflow.data.images import ImageFolderDataset, write_sample_images
from omniflow.data.latent_cache import (CachedLatentDataset, StaleLatentCacheError, build_latent_cache,
                                        load_or_build_latent_cache, open_latent_cache)
from omniflow.models.align import AlignPipeline

TINY = {"hidden_channels": 16, "num_blocks": 1, "downsample_times": 1, "out_channels": 16}


def pipeline(vae1, vae2, **kwargs) -> AlignPipeline:
    return AlignPipeline.from_pretrained(str(vae1), str(vae2), "vae", "vae", **{**TINY, **kwargs})


def test_cache_round_trips_exactly(vae_dirs, photo_dir, tmp_path):
    data = ImageFolderDataset(photo_dir, RESOLUTION)
    pipe = pipeline(vae_dirs["vae1"], vae_dirs["vae2"], input_types=("latent",))
    build_latent_cache(data, pipe, tmp_path, batch_size=3, shard_size=3)  # 8 items -> shards 3+3+2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "index.json", "shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"]
    cached = open_latent_cache(tmp_path, data, pipe)
    assert len(cached) == 8 and "image" not in cached[0]  # the module takes no images
    images = torch.stack([data[i]["image"] for i in range(8)])
    for start in (0, 3, 6):  # same batches as the build, so the encodes are bit-identical
        batch = images[start:start + 3]
        for key, encode in (("vae1", pipe.encode_source), ("vae2", pipe.encode_target)):
            expected = encode(batch)
            got = torch.stack([cached[start + i][key] for i in range(len(batch))])
            assert torch.equal(got, expected), key
    copy = pickle.loads(pickle.dumps(cached))  # what DataLoader workers receive
    assert torch.equal(copy[7]["vae2"], cached[7]["vae2"])
    with pytest.raises(IndexError):
        cached[8]


def test_cache_yields_images_when_the_module_takes_them(vae_dirs, photo_dir, tmp_path):
    data = ImageFolderDataset(photo_dir, RESOLUTION)
    pipe = pipeline(vae_dirs["vae1"], vae_dirs["vae2"], input_types=("image", "latent"))
    cached = load_or_build_latent_cache(data, pipe, tmp_path, batch_size=4)
    loader = torch.utils.data.DataLoader(cached, batch_size=4)
    batch = next(iter(loader))
    assert torch.equal(batch["image"], torch.stack([data[i]["image"] for i in range(4)]))
    assert batch["vae1"].shape == (4, 4, 16, 16) and batch["vae2"].shape == (4, 16, 16, 16)
    loss = pipe.training_loss(batch["image"], batch[pipe.source_key], batch[pipe.target_key])
    assert torch.isfinite(loss)


def test_changed_vae_or_images_invalidate_the_cache(vae_dirs, tmp_path, caplog):
    images = tmp_path / "images"
    write_sample_images(images, RESOLUTION, 3)
    data = ImageFolderDataset(images, RESOLUTION)
    cache = tmp_path / "cache"
    vae2 = save_tiny_vae(tmp_path / "vae_b", 16, seed=1, scaling_factor=1.5, shift_factor=0.1)
    build_latent_cache(data, pipeline(vae_dirs["vae1"], vae2), cache)
    open_latent_cache(cache, data, pipeline(vae_dirs["vae1"], vae2))
    save_tiny_vae(vae2, 16, seed=1, scaling_factor=1.5, shift_factor=0.3)  # same path, new config
    pipe = pipeline(vae_dirs["vae1"], vae2)
    with pytest.raises(StaleLatentCacheError, match=r"vae1 source changed \(.*vae_a.* cached, .*vae_b.* now\)"):
        open_latent_cache(cache, data, pipeline(vae2, vae2))
    with pytest.raises(StaleLatentCacheError, match=r"stale: vae2 config_sha256 changed .* for .*vae_b"):
        open_latent_cache(cache, data, pipe)
    with pytest.raises(StaleLatentCacheError):
        load_or_build_latent_cache(data, pipe, cache, rebuild_stale=False)
    rebuilt = load_or_build_latent_cache(data, pipe, cache)
    assert "rebuilding it" in caplog.text
    fresh = pipe.encode_target(torch.stack([data[i]["image"] for i in range(3)]))  # the build's one batch
    assert torch.equal(torch.stack([rebuilt[i]["vae2"] for i in range(3)]), fresh)
    with pytest.raises(StaleLatentCacheError, match=r"resolution 32 \(now 16\)"):
        open_latent_cache(cache, ImageFolderDataset(images, 16), pipe)
    first = images / data.files[0]
    original = first.read_bytes()
    first.write_bytes((images / data.files[1]).read_bytes())  # same name, other picture
    with pytest.raises(StaleLatentCacheError, match="image files changed"):
        open_latent_cache(cache, ImageFolderDataset(images, RESOLUTION), pipe)
    first.write_bytes(original)
    write_sample_images(images / "more", RESOLUTION, 1)
    with pytest.raises(StaleLatentCacheError, match=r"image files changed \(3 cached, 4 now"):
        open_latent_cache(cache, ImageFolderDataset(images, RESOLUTION), pipe)


def test_new_weights_or_an_image_edited_in_place_invalidate_the_cache(vae_dirs, photo_dir, tmp_path):
    """Same names, sizes and VAE config as when the cache was built: only the weights, or the pixels of one
    image and its modification time, changed."""
    images = tmp_path / "images"
    images.mkdir()
    for photo in sorted(photo_dir.glob("*.png"))[:3]:  # BMP: an edit keeps the file's byte size
        Image.open(photo).save(images / f"{photo.stem}.bmp")
    data = ImageFolderDataset(images, RESOLUTION)
    vae2 = save_tiny_vae(tmp_path / "vae_b", 16, seed=1, scaling_factor=1.5, shift_factor=0.1)
    cache = tmp_path / "cache"
    build_latent_cache(data, pipeline(vae_dirs["vae1"], vae2), cache)
    save_tiny_vae(vae2, 16, seed=2, scaling_factor=1.5, shift_factor=0.1)  # retrained: same config, new weights
    with pytest.raises(StaleLatentCacheError, match=r"stale: vae2 weights_sha256 changed .* for .*vae_b"):
        open_latent_cache(cache, data, pipeline(vae_dirs["vae1"], vae2))

    pipe = pipeline(vae_dirs["vae1"], vae_dirs["vae2"])
    build_latent_cache(data, pipe, cache)
    edited = data.paths[0]
    size, mtime = edited.stat().st_size, edited.stat().st_mtime_ns
    with Image.open(edited) as image:
        flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    flipped.save(edited)
    assert edited.stat().st_size == size and edited.stat().st_mtime_ns != mtime
    with pytest.raises(StaleLatentCacheError, match="names, sizes or modification times differ"):
        open_latent_cache(cache, ImageFolderDataset(images, RESOLUTION), pipe)


def test_interrupted_rebuild_is_not_taken_for_a_complete_cache(vae_dirs, photo_dir, tmp_path):
    data = ImageFolderDataset(photo_dir, RESOLUTION)
    pipe = pipeline(vae_dirs["vae1"], vae_dirs["vae2"])
    build_latent_cache(data, pipe, tmp_path, batch_size=4, shard_size=4)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["num_items"] == 8 and [s["count"] for s in index["shards"]] == [4, 4]
    assert not list(tmp_path.glob("*.tmp"))

    class Failing(ImageFolderDataset):
        def __getitem__(self, i):
            if i == 5:
                raise RuntimeError("killed mid-build")
            return super().__getitem__(i)

    with pytest.raises(RuntimeError):
        build_latent_cache(Failing(photo_dir, RESOLUTION), pipe, tmp_path, batch_size=4, shard_size=4)
    with pytest.raises(FileNotFoundError, match="no latent cache index"):
        CachedLatentDataset(tmp_path)


def test_a_truncated_shard_is_rebuilt(vae_dirs, photo_dir, tmp_path):
    data = ImageFolderDataset(photo_dir, RESOLUTION)
    pipe = pipeline(vae_dirs["vae1"], vae_dirs["vae2"], input_types=("latent",))
    build_latent_cache(data, pipe, tmp_path, batch_size=4, shard_size=4)
    shard = tmp_path / "shard_00001.safetensors"
    intact = shard.read_bytes()
    shard.write_bytes(intact[: len(intact) // 2])  # what a kill or a full disk leaves
    with pytest.raises(StaleLatentCacheError, match="shard_00001.safetensors"):
        open_latent_cache(tmp_path, data, pipe)
    rebuilt = load_or_build_latent_cache(data, pipe, tmp_path, batch_size=4, shard_size=4)
    assert shard.read_bytes() == intact and len(rebuilt) == 8
