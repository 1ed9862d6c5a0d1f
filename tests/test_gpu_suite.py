"""benchmarks/gpu_suite.py: its dry run takes every part's code path on the CPU; caps and the budget hold."""
import json
import runpy
import sys

import pytest

from runtime_helpers import REPO

SUITE = runpy.run_path(str(REPO / "benchmarks" / "gpu_suite.py"), run_name="gpu_suite")
BENCH_PARTS = ("vq", "text_head", "float", "align")


@pytest.mark.slow
def test_dry_run_fills_every_part(tmp_path):
    report = SUITE["main"](["--dry_run", "--out_dir", str(tmp_path)])
    assert [row["name"] for row in report["parts"]] == ["prepare", *BENCH_PARTS, "zero2", "zero3"]
    assert all(row["status"] == "ok" for row in report["parts"]), [(r["name"], r["status"]) for r in report["parts"]]
    rows = {row["name"]: row for row in report["parts"]}
    assert [r["variant"] for r in rows["vq"]["result"]["results"]] == ["fp32", "bf16_cl"]
    assert rows["text_head"]["result"][0]["tflop_per_step"] > 0 and rows["float"]["result"]["training"]["samples_per_s"]
    assert {r["data"] for r in rows["align"]["result"]} >= {"images", "latent cache"}
    for stage in ("zero2", "zero3"):  # two optimizer steps under DeepSpeed, logged like any run
        assert rows[stage]["result"]["step"] == 2 and rows[stage]["result"]["loss"] > 0
    saved = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert saved["dry_run"] and saved["parts"] == report["parts"]
    block = (tmp_path / "gpu_suite.md").read_text()
    assert all(f"**{name}**: ok" in block for name in BENCH_PARTS) and "| fp32 |" in block and "step 2: loss" in block


def test_a_part_past_its_cap_is_stopped_and_reported(tmp_path):
    part = SUITE["Part"]("sleeper", 1, [sys.executable, "-c", "import time; print('| row |'); time.sleep(60)"])
    row = SUITE["run_part"](part, tmp_path, 1.0)
    assert row["status"] == "stopped at its cap of 1 s" and row["seconds"] < 30


def test_a_part_that_does_not_fit_the_budget_is_skipped_with_a_line(tmp_path, capsys):
    report = SUITE["main"](["--dry_run", "--out_dir", str(tmp_path), "--only", "vq", "--budget_s", "5"])
    assert report["parts"][0]["status"].startswith("skipped: its cap of 120 s exceeds the")
    assert "vq: skipped" in capsys.readouterr().out
