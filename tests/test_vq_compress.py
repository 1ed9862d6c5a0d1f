"""scripts/compress_video.py: video -> codes file -> video, with bits per pixel and PSNR checked
against independent computations; codes files at the narrowest integer width."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio

from omniflow.data.video import frames_to_model_input, iter_frames
from omniflow.models.vq import build_vq_model, load_vq_model
from omniflow.models.vq.codes import CodesFileError, index_dtype, load_codes, save_codes
from omniflow.runtime.export import export_weights
from vq_helpers import REPO, TINY_CONFIGS, panning_frames, script_env, train_steps, write_video

SCRIPT = REPO / "scripts" / "compress_video.py"
FRAMES, HEIGHT, WIDTH = 10, 40, 60  # 40x60 is cropped to 40x56 for the 8x-downsampling model


@pytest.mark.parametrize(("size", "dtype"), [(2, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16),
                                             (65537, np.uint32)])
def test_index_dtype_is_the_narrowest(size, dtype):
    assert index_dtype(size) == dtype


def test_codes_round_trip_and_errors(tmp_path):
    levels = [np.random.default_rng(0).integers(0, 1024, (3, 4, 5)), np.arange(6).reshape(3, 1, 2)]
    path = save_codes(tmp_path / "c.safetensors", levels, [1024, 8], {"frames": 3})
    loaded, header = load_codes(path)
    assert all(np.array_equal(a, b) for a, b in zip(levels, loaded))
    assert header["frames"] == 3 and header["level_shapes"] == [[4, 5], [1, 2]]
    assert path.stat().st_size < 3 * 4 * 5 * 2 + 3 * 2 + 400  # uint16 and uint8 payloads plus the header
    with pytest.raises(CodesFileError, match="leave \\[0, 8\\)"):
        save_codes(tmp_path / "bad.safetensors", [np.full((1, 1, 1), 8)], [8], {})
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CodesFileError, match="not a readable codes file"):
        load_codes(tmp_path / "junk.safetensors")


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    """A real video (camera panning over a photo), a VqVae (f8) fitted briefly to its frames, and one compression."""
    root = tmp_path_factory.mktemp("compress")
    video = write_video(root / "pan.mp4", panning_frames(FRAMES, HEIGHT, WIDTH, 3, "coffee"))
    torch.manual_seed(0)
    args = {**TINY_CONFIGS["VqVae"], "group_count": 4}
    model = build_vq_model("VqVae", args)
    frames = np.stack(list(iter_frames(video, (40, 56))))
    train_steps(model, frames_to_model_input(torch.from_numpy(frames)[None]), steps=30, lr=3e-3)
    export_weights(model.state_dict(), model.export_config(), root / "model")
    result = subprocess.run([sys.executable, str(SCRIPT), "--model", str(root / "model"), "--input", str(video),
                             "--output", str(root / "out" / "recon.mp4"), "--report", str(root / "report.json")],
                            env=script_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, video, json.loads((root / "report.json").read_text())


def test_compress_reports_bits_per_pixel_ratio_and_psnr(coded):
    root, video, report = coded
    codes_path = root / "out" / "recon.vqcodes.safetensors"
    assert report["codes"] == str(codes_path) and report["frames"] == FRAMES and report["coded_size"] == [40, 56]
    levels, header = load_codes(codes_path)
    assert header["model"] == str((root / "model").resolve()) and header["fps"] == "12"
    assert (header["frames"], header["height"], header["width"]) == (FRAMES, 40, 56)
    assert levels[0].shape == (FRAMES, 5, 7)
    codes_bytes = codes_path.stat().st_size
    pixels = FRAMES * 40 * 56
    assert report["codes_bytes"] == codes_bytes and report["bits_per_pixel"] == pytest.approx(codes_bytes * 8 / pixels)
    assert report["index_bits_per_pixel"] == pytest.approx(5 * 7 * 5 / (40 * 56))  # 32 codes: 5 bits each
    assert report["compression_ratio_vs_source"] == pytest.approx(video.stat().st_size / codes_bytes)

    # PSNR recomputed independently: decode the codes here and compare with the source frames.
    model, _ = load_vq_model(root / "model")
    with torch.no_grad():
        recon = model.decode_indices(torch.from_numpy(levels[0]))
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    source = np.stack(list(iter_frames(video, (40, 56))))
    assert report["psnr"] == pytest.approx(peak_signal_noise_ratio(source, recon, data_range=255), abs=1e-9)
    assert report["psnr"] > 16  # the fitted model reconstructs the clip, not noise
    written = np.stack(list(iter_frames(report["output"])))
    assert written.shape == source.shape
    assert report["psnr_output_video"] == pytest.approx(peak_signal_noise_ratio(source, written, data_range=255))


def test_decode_rebuilds_the_video_from_the_codes_file_alone(coded, tmp_path):
    root, _, report = coded
    codes = tmp_path / "only.vqcodes.safetensors"
    codes.write_bytes((root / "out" / "recon.vqcodes.safetensors").read_bytes())
    result = subprocess.run([sys.executable, str(SCRIPT), "--decode", "--codes", str(codes)], env=script_env(),
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    decoded = json.loads(result.stdout)
    assert decoded["output"] == str(tmp_path / "only_decoded.mp4") and decoded["frames"] == FRAMES
    assert np.array_equal(np.stack(list(iter_frames(decoded["output"]))), np.stack(list(iter_frames(report["output"]))))
