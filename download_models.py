"""Download the pretrained models the training scripts use into `models/`.

    python download_models.py                          # the text job's models
    python download_models.py --models clip_vit_l t5_large
    python download_models.py --models all --force
    python download_models.py --models owner/repo      # any other Hub repo, whole
    python download_models.py --models float --repo_id someone/float-mirror
    python download_models.py --models lpips_alex lpips_vgg fid_inception   # the metrics' networks

A model lands in `<output_dir>/<repo name>` (e.g. models/OmniFlow-v0.5), where
`omniflow.runtime.hub.resolve_model_path` finds it, also with HF_HUB_OFFLINE=1. The metrics' networks
(LPIPS backbones, FID Inception; not on the Hub) land in torch hub's checkpoint folder, where
`omniflow.metrics.image` looks for them.
A completed download leaves `.omniflow_download.json` in its folder; it is skipped next
time unless --force. The token comes from HF_TOKEN or HUGGINGFACE_TOKEN (gated models).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import huggingface_hub

from omniflow.metrics.weights import METRIC_WEIGHTS
from omniflow.runtime.hub import (
    HUB_ERRORS,
    MODELS,
    HubModel,
    access_refused,
    describe_error,
    hf_token,
    is_offline,
    local_model_dir,
)

MARKER = ".omniflow_download.json"
DEFAULT_GROUP = "text"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    listing = "\n".join([*(f"  {m.name:<20} {m.repo_id:<48} [{m.used_by}] {m.note}" for m in MODELS.values()),
                         *(f"  {name:<20} {url.rsplit('/', 1)[1]:<48} [metrics] {url}"
                           for name, url in METRIC_WEIGHTS.items())])
    parser = argparse.ArgumentParser(
        description="Download pretrained models from the Hugging Face Hub into models/.",
        epilog=f"Known models (default: those marked [{DEFAULT_GROUP}]):\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--models", nargs="+", default=None, metavar="NAME",
                        help="model names from the list below, Hub repo ids, or 'all'")
    parser.add_argument("--output_dir", default="models", help="folder that receives one subfolder per model")
    parser.add_argument("--cache_dir", default=None, help="Hugging Face cache folder used while downloading")
    parser.add_argument("--force", action="store_true", help="download again even if already complete")
    parser.add_argument("--repo_id", default=None,
                        help="download the single named model from this Hub repo instead (e.g. a mirror)")
    return parser.parse_args(argv)


def select_models(names: list[str] | None, repo_id: str | None) -> list[HubModel | str]:
    """Hub models, and names of METRIC_WEIGHTS files."""
    if not names:
        chosen = [m for m in MODELS.values() if m.used_by == DEFAULT_GROUP]
    elif names == ["all"]:
        chosen = [*MODELS.values(), *METRIC_WEIGHTS]
    else:
        chosen = []
        for name in names:
            if name in MODELS:
                chosen.append(MODELS[name])
            elif name in METRIC_WEIGHTS:
                chosen.append(name)
            elif name.count("/") == 1:
                chosen.append(HubModel(name, name, "custom"))
            else:
                raise SystemExit(f"download_models: unknown model '{name}'; known: {', '.join([*MODELS, *METRIC_WEIGHTS])} "
                                 "(or a Hub id owner/name, or 'all')")
    if repo_id is not None:
        if len(chosen) != 1 or isinstance(chosen[0], str):
            raise SystemExit("download_models: --repo_id needs exactly one model in --models")
        chosen = [replace(chosen[0], repo_id=repo_id)]
    return chosen


def _marker_matches(folder: Path, model: HubModel) -> bool:
    """A completed download of the same repo and patterns whose files are all still there."""
    try:
        record = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    wanted = {"repo_id": model.repo_id, **model.patterns()}
    same = all(record.get(k) == v for k, v in wanted.items())
    return same and all((folder / f).exists() for f in record.get("files", []))


def _write_marker(folder: Path, model: HubModel) -> None:
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                   if p.is_file() and ".cache" not in p.parts and p.name != MARKER)
    record = {"repo_id": model.repo_id, **model.patterns(), "files": files,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    tmp = folder / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, folder / MARKER)


def _size_gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9


def download(model: HubModel, output_dir: Path, cache_dir: str | None, force: bool) -> tuple[str, str]:
    """(status, detail) for one model: 'skipped', 'downloaded' or 'failed'."""
    folder = local_model_dir(model.repo_id, output_dir)
    if not force and _marker_matches(folder, model):
        return "skipped", f"already complete in {folder}"
    if is_offline():
        return "failed", (f"{model.repo_id} is not complete in {folder} and HF_HUB_OFFLINE=1 forbids downloading; "
                          f"run this command where the Hub is reachable, or copy the folder here")
    try:
        huggingface_hub.snapshot_download(
            model.repo_id, local_dir=folder, cache_dir=cache_dir, token=hf_token(), force_download=force,
            **model.patterns())
    except HUB_ERRORS as err:
        hint = (f"; access refused: accept its terms on https://huggingface.co/{model.repo_id} and set HF_TOKEN "
                "(or HUGGINGFACE_TOKEN)") if access_refused(err) else ""
        return "failed", f"{model.repo_id}: {describe_error(err)}{hint}"
    _write_marker(folder, model)
    return "downloaded", f"{_size_gb(folder):.2f} GB in {folder}"


def download_metric_weights(name: str, force: bool) -> tuple[str, str]:
    """(status, detail) for one file of METRIC_WEIGHTS, fetched into torch hub's checkpoint folder."""
    import torch.hub

    from omniflow.metrics.image import cached_weights_path

    url, target = METRIC_WEIGHTS[name], cached_weights_path(name)
    if target.is_file() and not force:
        return "skipped", f"already in {target}"
    if is_offline():
        return "failed", (f"{target} is missing and HF_HUB_OFFLINE=1 forbids downloading {url}; run this command "
                          f"where it is reachable, or copy the file there")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=False)  # via a temporary file: never half
    except OSError as err:  # URLError and connection failures are OSErrors
        return "failed", f"{url}: {err}"
    return "downloaded", f"{target.stat().st_size / 1e6:.1f} MB in {target}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = select_models(args.models, args.repo_id)
    output_dir = Path(args.output_dir)
    results = []
    for model in models:
        if isinstance(model, str):
            print(f"[{model}] {METRIC_WEIGHTS[model]}", flush=True)
            name, (status, detail) = model, download_metric_weights(model, args.force)
        else:
            print(f"[{model.name}] {model.repo_id} -> {local_model_dir(model.repo_id, output_dir)}", flush=True)
            name, (status, detail) = model.name, download(model, output_dir, args.cache_dir, args.force)
        if status == "failed":
            print(f"download_models: {name} failed: {detail}", file=sys.stderr, flush=True)
        results.append((name, status, detail))
    width = max(len(name) for name, _, _ in results)
    print(f"\n{'model':<{width}}  {'status':<10}  detail")
    for name, status, detail in results:
        print(f"{name:<{width}}  {status:<10}  {detail}")
    return 1 if any(status == "failed" for _, status, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
