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
from omniflow.models.vq import entropy
from omniflow.models.vq.codes import HEADER_KEY, CodesFileError, load_codes, save_codes
from omniflow.models.vq.entropy import CODINGS
from omniflow.runtime.export import export_weights
from vq_helpers import REPO, TINY_CONFIGS, panning_frames, script_env, train_steps, write_video

SCRIPT = REPO / "scripts" / "compress_video.py"
FRAMES, HEIGHT, WIDTH = 10, 40, 60  # 40x60 is cropped to 40x56 for the 8x-downsampling model


@pytest.mark.parametrize("coding", CODINGS)
def test_codes_round_trip_exactly_and_errors(tmp_path, coding):
    rng = np.random.default_rng(0)
    still = np.repeat(rng.integers(0, 1024, (1, 4, 5)), 6, 0)  # a mostly still video: codes repeat
    still[rng.random(still.shape) < 0.2] = 7
    levels = [still, np.arange(12).reshape(6, 1, 2) % 8, rng.integers(0, 3, (6, 3, 3))]
    path = save_codes(tmp_path / "c.safetensors", levels, [1024, 8, 3], {"fps": "25"}, coding=coding)
    loaded, header = load_codes(path)
    assert all(np.array_equal(a, b) and b.dtype == np.int64 for a, b in zip(levels, loaded))
    assert (header["frames"], header["coding"], header["level_shapes"]) == (6, coding, [[4, 5], [1, 2], [3, 3]])
    with pytest.raises(CodesFileError, match="leave \\[0, 8\\)"):
        save_codes(tmp_path / "bad.safetensors", [np.full((1, 1, 1), 8)], [8], {})
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CodesFileError, match="not a readable codes file"):
        load_codes(tmp_path / "junk.safetensors")


def test_entropy_coding_beats_packing_where_codes_repeat_and_packing_is_the_bit_width():
    rng = np.random.default_rng(1)
    video = np.repeat(rng.integers(0, 1024, (1, 16, 16)), 20, 0)
    moving = rng.random(video.shape) < 0.1
    video[moving] = rng.integers(0, 1024, moving.sum())
    bits = {coding: entropy.encode(video, 1024, coding).nbytes * 8 / video.size for coding in CODINGS}
    assert bits["packed"] == 10  # 1024 codes: 10 bits each, no more
    assert bits["temporal"] < 0.5 * bits["adaptive"] < bits["packed"]  # 90% of the codes stay put


def test_format_1_codes_files_still_load(tmp_path):
    from safetensors.numpy import save_file

    levels = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    header = {"format": "omniflow-vq-codes/1", "codebook_sizes": [300], "level_shapes": [[3, 4]], "frames": 2}
    save_file({"level0": levels}, str(tmp_path / "old.safetensors"), metadata={HEADER_KEY: json.dumps(header)})
    loaded, _ = load_codes(tmp_path / "old.safetensors")
    assert np.array_equal(loaded[0], levels)


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
    assert report["coding"] == "temporal" and report["entropy_coded_bits_per_pixel"] < report["bits_per_pixel"]
    assert report["compression_ratio_vs_source"] == pytest.approx(video_packet_bytes(video, FRAMES) / codes_bytes)

    # decoding is exact: the file gives back the indices the model assigns to the source frames
    model, _ = load_vq_model(root / "model")
    frames = np.stack(list(iter_frames(video, (40, 56))))
    with torch.no_grad():
        assigned = model.encode(frames_to_model_input(torch.from_numpy(frames)[None])).indices
    assert np.array_equal(levels[0], assigned.numpy())

    # PSNR recomputed independently: decode the codes here and compare with the source frames.
    with torch.no_grad():
        recon = model.decode_indices(torch.from_numpy(levels[0]))
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    source = np.stack(list(iter_frames(video, (40, 56))))
    assert report["psnr"] == pytest.approx(peak_signal_noise_ratio(source, recon, data_range=255), abs=1e-9)
    assert report["psnr"] > 16  # the fitted model reconstructs the clip, not noise
    written = np.stack(list(iter_frames(report["output"])))
    assert written.shape == source.shape
    assert report["psnr_output_video"] == pytest.approx(peak_signal_noise_ratio(source, written, data_range=255))


def video_packet_bytes(path, frames) -> int:
    """The video stream's packet bytes of the first ``frames`` frames in presentation order, read here."""
    import av

    with av.open(str(path)) as container:
        packets = sorted((p.pts, p.size) for p in container.demux(video=0) if p.size)
    return sum(size for _, size in packets[:frames])


def test_the_ratio_counts_the_source_bytes_of_the_coded_frames_only(coded, tmp_path):
    root, video, _ = coded
    result = subprocess.run([sys.executable, str(SCRIPT), "--model", str(root / "model"), "--input", str(video),
                             "--output", str(tmp_path / "first4.mp4"), "--max_frames", "4", "--entropy_coding",
                             "packed"], env=script_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert (report["frames"], report["source_frames"]) == (4, FRAMES)
    assert report["source_video_bytes"] == video_packet_bytes(video, 4) < video_packet_bytes(video, FRAMES)
    assert report["compression_ratio_vs_source"] == pytest.approx(report["source_video_bytes"] / report["codes_bytes"])
    assert report["entropy_coded_bits_per_pixel"] == pytest.approx(report["index_bits_per_pixel"], abs=8 / (4 * 40 * 56))


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
