"""Shared fixtures for the VQ tests: real photos, tiny configs, test videos, distributed workers, script runs."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")

TINY_CONFIGS = {
    "VqVae": {"group_count": 2, "n_hid": 16, "n_blk_per_group": 1, "vocab_size": 32, "n_init": 16},
    "VQVAE2": {"hidden_channels": 32, "res_channels": 8, "nb_res_layers": 1, "embed_dim": 16, "nb_entries": 32,
               "scaling_rates": [2, 2]},
    "VQVAE2_OptVQ": {"hidden_channels": 32, "res_channels": 8, "nb_res_layers": 1, "embed_dim": 16,
                     "nb_entries": 32, "scaling_rates": [2, 2]},
    "TamingVQGAN": {"n_embed": 32, "embed_dim": 8, "ddconfig": {
        "ch": 16, "ch_mult": [1, 2], "z_channels": 16, "resolution": 32, "attn_resolutions": [16],
        "num_res_blocks": 1, "norm_groups": 8}},
    "EMAVQ": {"n_embed": 32, "embed_dim": 8, "ddconfig": {
        "ch": 16, "ch_mult": [1, 2], "z_channels": 16, "resolution": 32, "attn_resolutions": [16],
        "num_res_blocks": 1, "norm_groups": 8}},
}


@functools.lru_cache(maxsize=None)
def photo_uint8(name: str, height: int, width: int) -> np.ndarray:
    """A bundled scikit-image photo as RGB uint8 (height, width, 3)."""
    from skimage import data  # imported here: spawned distributed workers should not pay for it
    from skimage.transform import resize

    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = resize(image[..., :3], (height, width), anti_aliasing=True, preserve_range=True)
    return image.round().clip(0, 255).astype(np.uint8)


def photo_batch(size: int = 32, names: tuple[str, ...] = PHOTOS[:4]) -> torch.Tensor:
    """Real photos as a (N, 3, size, size) float batch in [-1, 1]."""
    stack = np.stack([photo_uint8(n, size, size) for n in names])
    return torch.from_numpy(stack).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def panning_frames(count: int, height: int = 64, width: int = 96, step: int = 8,
                   photo_name: str = "astronaut") -> list[np.ndarray]:
    """Frames of a camera panning across a photo by ``step`` pixels per frame."""
    photo = photo_uint8(photo_name, 256, width + step * count)
    return [np.ascontiguousarray(photo[60:60 + height, i * step:i * step + width]) for i in range(count)]


def write_video(path: Path, frames: list[np.ndarray], codec: str = "libx264", rate: int = 12, gop: int = 4) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.gop_size = gop
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    return path


def train_steps(model: torch.nn.Module, images: torch.Tensor, steps: int, lr: float = 2e-3) -> list[float]:
    """Plain Adam loop on MSE + VQ loss; returns the reconstruction MSE per step."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = []
    model.train()
    for _ in range(steps):
        vq_loss, recon, _, _ = model(images)
        mse = torch.nn.functional.mse_loss(recon, images)
        optimizer.zero_grad()
        (mse + vq_loss).backward()
        optimizer.step()
        history.append(mse.item())
    return history


def init_gloo(rank: int, world_size: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)


def distributed_quantizer_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Each rank quantizes its half of one batch; results are saved for the parent test to compare."""
    from omniflow.models.vq.quantizers import EMAVectorQuantizer, SinkhornVectorQuantizer, VectorQuantizer, sinkhorn

    init_gloo(rank, world_size, port)
    try:
        full = shared_features()
        part = full.chunk(world_size)[rank]
        torch.manual_seed(1)  # identical initial codebooks on every rank
        ema = EMAVectorQuantizer(8, 3, decay=0.8, init_from_data=False).train()
        ppl = ema(part).perplexity
        sink = SinkhornVectorQuantizer(8, 3, normalize_mode="all", init_from_data=False)
        distances = torch.cdist(part.permute(0, 2, 3, 1).reshape(-1, 3), sink.codebook())
        plan = sinkhorn(sink.normalized_cost(distances), epsilon=3.0, n_iters=5)
        torch.manual_seed(100 + rank)  # different random streams: the restart must still agree
        restarted = VectorQuantizer(8, 3).train()
        restarted(part)
        torch.save({"ema": ema.state_dict(), "perplexity": ppl, "plan": plan, "restarted": restarted.codebook()},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def shared_features() -> torch.Tensor:
    return torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))


REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "scripts" / "train_vqgan.py"
VIDEO_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def write_vq_data(root: Path) -> Path:
    """Real data for the script tests under ``root``: 32-px photos (4 to train on, so every batch
    holds the same images and the loss curve is not batch noise; 5 to validate on) and videos of
    a camera panning across photos (train 2, valid 1, 12 frames of 40x56)."""
    from omniflow.data.images import write_sample_images

    photos = write_sample_images(root / "train", 32, 9)
    (root / "valid").mkdir()
    for path in photos[4:]:
        path.rename(root / "valid" / path.name)
    for split, names in (("videos_train", VIDEO_PHOTOS[:2]), ("videos_valid", VIDEO_PHOTOS[2:3])):
        (root / split).mkdir()
        for name in names:
            write_video(root / split / f"pan_{name}.mp4", panning_frames(12, 40, 56, 4, name))
    return root


def tiny_config(name: str, directory: Path, data: Path, data_args: dict | None = None, **train_args) -> Path:
    """``configs/vq/tiny/<name>.json`` pointed at ``data``, with ``data_args``/``train_args`` overrides,
    written to ``directory``."""
    config = json.loads((REPO / "configs" / "vq" / "tiny" / f"{name}.json").read_text())
    split = "videos_" if not config["use_images"] else ""
    config["data_process"] = {"train": str(data / f"{split}train"), "valid": str(data / f"{split}valid")}
    config["data_args"].update(data_args or {})
    config["train_args"].update(train_args)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def script_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def train_vq(config: Path, output_dir: Path, *extra: str, processes: int = 1,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run scripts/train_vqgan.py (``processes`` > 1: CPU DDP through accelerate launch)."""
    cmd = [sys.executable, str(TRAIN_SCRIPT)]
    run_env = script_env()
    if processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--dynamo_backend", "no", "--main_process_port", "0", str(TRAIN_SCRIPT)]
        run_env["ACCELERATE_USE_CPU"] = "true"
    cmd += ["--config", str(config), "--output_dir", str(output_dir), "--logging_steps", "1", *extra]
    result = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=600, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"train_vqgan.py failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def metric_records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def training_terms(output_dir: Path) -> dict[int, dict]:
    """Training lines of metrics.jsonl by step, without the timing-dependent throughput."""
    return {r["step"]: {k: v for k, v in r.items() if k not in ("samples_per_s", "step")}
            for r in metric_records(output_dir) if "loss" in r}


def validation_metrics(output_dir: Path) -> dict[int, dict]:
    return {r["step"]: {k[4:]: v for k, v in r.items() if k.startswith("val/")}
            for r in metric_records(output_dir) if "val/psnr" in r}
