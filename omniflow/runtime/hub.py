"""One resolver for pretrained models: a local folder, a short registry name, or a Hub repo id.

`resolve_model_path` returns a local folder for all three. Hub downloads go through
`snapshot_download`, honour `HF_HUB_OFFLINE`, and read the token from `HF_TOKEN` or
`HUGGINGFACE_TOKEN`. The token is never logged and never appears in an error message.
A model that cannot be had raises `MissingModelError` whose one line names what is missing
and the `download_models.py` command that fetches it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HTTPError,
    RepositoryNotFoundError,
)

logger = logging.getLogger(__name__)

TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGINGFACE_TOKEN")
DOWNLOAD_SCRIPT = "python download_models.py"
# Failures of the Hub client that mean "could not get the files": HTTP and transport errors
# (httpx), connection errors and cache misses (OSError: LocalEntryNotFoundError, OfflineModeIsEnabled).
HUB_ERRORS = (HTTPError, OSError)


class MissingModelError(FileNotFoundError):
    """A model folder is absent locally and cannot be downloaded now."""


class MissingDatasetError(FileNotFoundError):
    """A dataset cannot be read from the Hub or the local datasets cache."""


@dataclass(frozen=True)
class HubModel:
    """A model that `download_models.py` knows by a short name."""

    name: str
    repo_id: str
    used_by: str
    allow_patterns: tuple[str, ...] | None = None
    ignore_patterns: tuple[str, ...] | None = None
    subfolder: str | None = None  # folder inside the repo that a short-name lookup returns
    note: str = ""

    @property
    def local_name(self) -> str:
        return self.repo_id.split("/")[-1]

    def patterns(self) -> dict:
        """`allow_patterns` / `ignore_patterns` keyword arguments for snapshot_download."""
        return {"allow_patterns": list(self.allow_patterns) if self.allow_patterns else None,
                "ignore_patterns": list(self.ignore_patterns) if self.ignore_patterns else None}

    def covers(self, subfolder: str | None) -> bool:
        """Whether this entry's download holds `subfolder` (None: the whole entry)."""
        if subfolder is None or self.allow_patterns is None:
            return True
        return any(p.startswith(f"{subfolder}/") for p in self.allow_patterns)


_VAE_ONLY = ("vae/config.json", "vae/diffusion_pytorch_model.safetensors")

MODELS: dict[str, HubModel] = {
    m.name: m
    for m in (
        HubModel("omniflow", "jacklishufan/OmniFlow-v0.5", "text",
                 ignore_patterns=("*.fp16.safetensors",),
                 note="transformer, VAEs, text VAE config, tokenizers, scheduler"),
        HubModel("clip_vit_l", "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K", "text",
                 allow_patterns=("*.json", "*.txt", "model.safetensors")),
        HubModel("t5_large", "google/flan-t5-large", "text",
                 allow_patterns=("*.json", "spiece.model", "model.safetensors")),
        HubModel("languagebind_audio", "LanguageBind/LanguageBind_Audio_FT", "text"),
        HubModel("tinyllama", "TinyLlama/TinyLlama_v1.1", "text",
                 allow_patterns=("tokenizer*", "special_tokens_map.json", "config.json",
                                 "generation_config.json"),
                 note="tokenizer and config only: the decoder weights ship inside OmniFlow"),
        HubModel("audioldm2_vae", "cvssp/audioldm2", "text",
                 allow_patterns=("vae/*",), subfolder="vae"),
        HubModel("sd15_vae", "stable-diffusion-v1-5/stable-diffusion-v1-5", "align",
                 allow_patterns=_VAE_ONLY, subfolder="vae"),
        HubModel("flux_vae", "black-forest-labs/FLUX.1-dev", "align",
                 allow_patterns=_VAE_ONLY, subfolder="vae",
                 note="gated: accept the licence on the Hub and set HF_TOKEN"),
        HubModel("wav2vec2_base", "facebook/wav2vec2-base-960h", "float",
                 allow_patterns=("*.json", "model.safetensors")),
        HubModel("wav2vec2_emotion", "r-f/wav2vec-english-speech-emotion-recognition", "float",
                 allow_patterns=("config.json", "preprocessor_config.json", "pytorch_model.bin")),
        # The FLOAT authors publish float.pth on Google Drive only; this Hub repo is a community
        # mirror holding float.pth and the two wav2vec2 folders. Override with --repo_id.
        HubModel("float", "yuvraj108c/float", "float",
                 note="community mirror of the released float.pth (+ wav2vec2 folders)"),
    )
}


def hf_token() -> str | None:
    """The Hub token from `HF_TOKEN` or `HUGGINGFACE_TOKEN`, or None (then the hub login is used)."""
    for var in TOKEN_ENV_VARS:
        value = os.environ.get(var, "").strip()
        if value:
            return value
    return None


def is_offline() -> bool:
    """`HF_HUB_OFFLINE` read now (huggingface_hub reads it once at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def redact(text: str) -> str:
    """`text` with any token value from the environment masked."""
    for var in TOKEN_ENV_VARS:
        value = os.environ.get(var, "").strip()
        if len(value) >= 4:
            text = text.replace(value, "<token>")
    return text


def describe_error(err: BaseException) -> str:
    """One redacted line naming a Hub client failure."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return redact(f"{type(err).__name__}: {first}" if first else type(err).__name__)


def access_refused(err: BaseException) -> bool:
    """A Hub answer meaning the repo is gated or private for this token (or no token)."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    return isinstance(err, GatedRepoError) or status in (401, 403)


def find_registered(repo_id: str) -> HubModel | None:
    return next((m for m in MODELS.values() if m.repo_id == repo_id), None)


def download_command(repo_id: str, subfolder: str | None = None) -> str:
    """The `download_models.py` call that fetches `repo_id` (with `subfolder`)."""
    entry = find_registered(repo_id)
    name = entry.name if entry is not None and entry.covers(subfolder) else repo_id
    return f"{DOWNLOAD_SCRIPT} --models {name}"


def local_model_dir(repo_id: str, models_dir: str | os.PathLike = "models") -> Path:
    """Where `download_models.py` puts `repo_id`: `<models_dir>/<repo name>`."""
    return Path(models_dir) / repo_id.split("/")[-1]


def _with_subfolder(folder: Path, subfolder: str | None, hint: str) -> Path:
    path = folder / subfolder if subfolder else folder
    if not path.exists():
        raise MissingModelError(f"model folder {folder} has no subfolder '{subfolder}'{hint}")
    return path


def _entry_for_path(name: str) -> HubModel | None:
    """The registry entry whose download folder a path like `models/OmniFlow-v0.5` names."""
    return next((m for m in MODELS.values() if m.local_name == Path(name).name and m.repo_id != name), None)


def _looks_local(name: str, models_dir: str | os.PathLike) -> bool:
    """A string meant as a filesystem path rather than a Hub id (`models/x`, `./x`, `a/b/c`)."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return True
    first = name.split("/")[0]
    return "/" in name and (first == Path(models_dir).name or Path(first).is_dir())


def _hint_for_path(name: str) -> str:
    entry = _entry_for_path(name)
    return f"; fetch it with: {DOWNLOAD_SCRIPT} --models {entry.name}" if entry else ""


def resolve_model_path(
    name_or_path: str,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_patterns: list[str] | None = None,
    models_dir: str | os.PathLike = "models",
) -> Path:
    """Local folder (with `subfolder`) for a path, a registry name (`omniflow`) or a Hub id.

    Order: a registry name, else an existing path; then `<models_dir>/<repo name>` (what
    download_models.py writes); then the Hub (only its cache when `HF_HUB_OFFLINE=1`).
    """
    entry = MODELS.get(name_or_path)  # before paths: `omniflow` is also the package folder
    path = Path(name_or_path).expanduser()
    if entry is None and path.exists():
        return _with_subfolder(path, subfolder, _hint_for_path(name_or_path))
    if entry is not None:
        repo_id = entry.repo_id
        subfolder = subfolder if subfolder is not None else entry.subfolder
    elif _looks_local(name_or_path, models_dir):
        raise MissingModelError(f"model path {name_or_path} does not exist{_hint_for_path(name_or_path)}")
    else:
        repo_id = name_or_path
        entry = find_registered(repo_id)

    local = local_model_dir(repo_id, models_dir)
    wanted = local / subfolder if subfolder else local
    if wanted.exists():
        return wanted

    if allow_patterns is None and entry is not None and entry.covers(subfolder):
        patterns = entry.patterns()
    else:
        default = [f"{subfolder}/*"] if subfolder else None
        patterns = {"allow_patterns": allow_patterns or default, "ignore_patterns": None}
    snapshot = _snapshot(repo_id, subfolder, local, cache_dir, patterns)
    return _with_subfolder(snapshot, subfolder, f"; fetch it with: {download_command(repo_id, subfolder)}")


def _snapshot(repo_id: str, subfolder: str | None, local: Path, cache_dir, patterns: dict) -> Path:
    what = f"{repo_id} (subfolder {subfolder})" if subfolder else repo_id
    command = download_command(repo_id, subfolder)
    cache = cache_dir or huggingface_hub.constants.HF_HUB_CACHE
    offline = is_offline()
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, cache_dir=cache_dir, token=hf_token(), local_files_only=offline, **patterns,
        )
    except HfHubHTTPError as err:
        if access_refused(err):
            raise MissingModelError(
                f"the Hub refused access to {repo_id} ({describe_error(err)}): it is gated or private; "
                f"accept its terms on https://huggingface.co/{repo_id}, set HF_TOKEN (or HUGGINGFACE_TOKEN) "
                f"and run: {command}") from None
        if isinstance(err, RepositoryNotFoundError):
            raise MissingModelError(
                f"{repo_id} is neither a local folder nor a model repo on the Hub ({describe_error(err)})") from None
        raise MissingModelError(f"cannot download {what} ({describe_error(err)}); "
                                f"run: {command}") from None
    except HUB_ERRORS as err:
        if offline:
            raise MissingModelError(
                f"model {what} is not on this machine (looked in {local} and the Hub cache {cache}) and "
                f"HF_HUB_OFFLINE=1 forbids downloading it; fetch it on a connected machine with: {command}"
            ) from None
        raise MissingModelError(
            f"cannot reach the Hugging Face Hub to download {what} ({describe_error(err)}) and it is not in "
            f"{local} or the Hub cache {cache}; fetch it with: {command}") from None
    logger.info("model %s -> %s", what, folder)
    return Path(folder)


def from_pretrained_kwargs(subfolder: str | None = None, cache_dir: str | os.PathLike | None = None) -> dict:
    """Keyword arguments for transformers/diffusers `from_pretrained` given a Hub id or a folder."""
    kwargs: dict = {"token": hf_token()}
    if subfolder:
        kwargs["subfolder"] = subfolder
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    if is_offline():
        kwargs["local_files_only"] = True
    return kwargs


def check_dataset_access(repo_id: str) -> None:
    """Fail fast, in one line, when the Hub cannot serve dataset `repo_id` (skipped offline)."""
    if is_offline():
        return
    try:
        HfApi().repo_info(repo_id, repo_type="dataset", token=hf_token())
    except HUB_ERRORS as err:
        if access_refused(err):
            raise MissingDatasetError(
                f"the Hub refused access to dataset {repo_id} ({describe_error(err)}): accept its terms on "
                f"https://huggingface.co/datasets/{repo_id} and set HF_TOKEN (or HUGGINGFACE_TOKEN)") from None
        raise MissingDatasetError(
            f"cannot reach dataset {repo_id} on the Hugging Face Hub ({describe_error(err)})") from None
