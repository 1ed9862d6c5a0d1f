"""Scripts answer --help and refuse a wrong flag before importing torch (benchmarks/bench_startup.py times it)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from runtime_helpers import REPO, env

SCRIPTS = sorted(path.name for path in (REPO / "scripts").glob("*.py"))
PROBE = """
import runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    heavy = sorted(m for m in ("torch", "accelerate", "transformers", "diffusers", "datasets") if m in sys.modules)
    print("heavy modules:", heavy, file=sys.stderr)
"""


def probe(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, str(REPO / "scripts" / script), *args], env=env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_imports_no_heavy_library(script):
    result = probe(script, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    assert "heavy modules: []" in result.stderr, result.stderr


@pytest.mark.parametrize("script", ["train_text.py", "generate_text.py"])
def test_a_wrong_flag_fails_in_one_line_before_torch_loads(script):
    result = probe(script, "--model_path", "m", "--data_config", "d.json", "--batch_size", "0")
    assert result.returncode == 2
    assert "--batch_size must be >= 1, got 0" in result.stderr and "heavy modules: []" in result.stderr, result.stderr


@pytest.mark.parametrize(("script", "args"), [
    ("train_vqgan.py", ("--config", "configs/vq/tiny/vqgan_f16.json")),
    ("train_align_with_args.py", ("--train_data_dir", "photos")),
])
def test_gradient_checkpointing_is_refused_where_it_would_do_nothing(script, args):
    result = probe(script, *args, "--gradient_checkpointing")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert f"--gradient_checkpointing is not implemented by {script}" in errors[0]
