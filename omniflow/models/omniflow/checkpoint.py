"""Reading and writing OmniFlow transformer checkpoints in the released layout.

``transformer/`` holds ``diffusion_pytorch_model.bin`` (the release: a torch pickle of the transformer's
state dict with the text VAE attached), ``diffusion_pytorch_model.safetensors``, or sharded safetensors
with ``diffusion_pytorch_model.safetensors.index.json``. Keys: the transformer's own, then
``text_decoder.*`` (the text VAE) and optionally ``text_decoder.encoder.*`` (a copy of the T5 encoder).

Loading is strict: every expected key must be present with its shape, and no key may be left over,
except two documented groups: the T5 copy (all or none of its keys) and the Q-Former's unused text-input
FFN (``intermediate.*``/``output.*``) that older transformers versions created. Files are read shard by
shard (``.bin`` memory-mapped with ``weights_only=True``), so memory stays bounded by one shard.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ...runtime.weights import open_safetensors, read_weights_file
from .errors import CheckpointError, MissingComponentError
from .layout import ENCODER_PREFIX

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model"
TEXT_PREFIX = "text_decoder."
EMA_NAME = "ema_transformer.pt"
UNUSED_QFORMER_KEY = re.compile(r"^text_decoder\.qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")
_SHOWN = 12  # keys listed per problem in an error message


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files of a ``transformer/`` folder, in shard order."""
    folder = Path(folder)
    for suffix in ("safetensors", "bin"):
        index = folder / f"{WEIGHTS_NAME}.{suffix}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a shard index with a 'weight_map' ({err})") from None
            files = [folder / name for name in sorted(set(weight_map.values()))]
            absent = [str(f) for f in files if not f.is_file()]
            if absent:
                raise MissingComponentError(f"{index} lists shards that do not exist: {absent}")
            return files
        single = folder / f"{WEIGHTS_NAME}.{suffix}"
        if single.is_file():
            return [single]
    raise MissingComponentError(
        f"no transformer weights in {folder}: expected {WEIGHTS_NAME}.safetensors, {WEIGHTS_NAME}.bin "
        f"or a {WEIGHTS_NAME}.safetensors.index.json with its shards"
    )


@contextmanager
def open_weights(path: Path) -> Iterator[dict[str, "_LazyTensor"]]:
    """Maps each key of one weight file to a lazy tensor (shape/dtype known, data read on ``load()``)."""
    if path.suffix == ".safetensors":
        with open_safetensors(path) as handle:
            yield {k: _LazyTensor(handle.get_slice(k), lambda k=k: handle.get_tensor(k)) for k in handle.keys()}
        return
    state = read_weights_file(path, mmap=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    yield {k: _LazyTensor(v, lambda v=v: v) for k, v in state.items()}


@dataclass
class _LazyTensor:
    meta: object  # anything with get_shape()/get_dtype() or shape/dtype
    load: callable

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.meta.get_shape() if hasattr(self.meta, "get_shape") else self.meta.shape)

    @property
    def nbytes(self) -> int:
        dtype = self.meta.get_dtype() if hasattr(self.meta, "get_dtype") else self.meta.dtype
        itemsize = _SAFETENSORS_ITEMSIZE[dtype] if isinstance(dtype, str) else dtype.itemsize
        return _numel(self.shape) * itemsize


def _numel(shape) -> int:
    numel = 1
    for n in shape:
        numel *= n
    return numel


_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class LoadReport:
    """What a strict load read and what it knowingly skipped."""

    files: list[str]
    loaded: int = 0
    encoder_keys_loaded: int = 0
    skipped_encoder_keys: int = 0
    skipped_unused_keys: list[str] = field(default_factory=list)


def load_omniflow_weights(
    folder: str | Path,
    transformer: nn.Module | None = None,
    text_vae: nn.Module | None = None,
    dtype: torch.dtype | None = None,
) -> LoadReport:
    """Strictly loads a ``transformer/`` folder into the given modules (either may be None to skip it).

    Modules may live on the meta device (such tensors are replaced; materialised ones are copied into);
    ``dtype`` casts each tensor as it is read. ``text_decoder.encoder.*`` keys fill ``text_vae.encoder``
    when one is attached (all of them, or none and the attached weights stay); without an attached encoder
    they are skipped. Raises :class:`CheckpointError` listing every missing, unexpected and mis-shaped key
    with the file(s) read.
    """
    files = weight_files(folder)
    targets = {"": transformer, TEXT_PREFIX: text_vae}
    expected = _expected_shapes(targets)
    has_encoder = text_vae is not None and getattr(text_vae, "encoder", None) is not None
    encoder_keys = {k for k in expected if k.startswith(ENCODER_PREFIX)}
    report = LoadReport(files=[str(f) for f in files])
    loaded: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    replaced: dict[int, torch.Tensor] = {}
    for path in files:
        with open_weights(path) as lazy:
            parts: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in targets}
            for key, tensor in lazy.items():
                prefix = TEXT_PREFIX if key.startswith(TEXT_PREFIX) else ""
                if targets[prefix] is None:
                    continue
                if key.startswith(ENCODER_PREFIX) and not has_encoder:
                    report.skipped_encoder_keys += 1
                elif key not in expected:
                    if UNUSED_QFORMER_KEY.match(key):
                        report.skipped_unused_keys.append(key)
                    else:
                        unexpected.append(f"{key} ({path.name})")
                elif tensor.shape != expected[key]:
                    mismatched.append(f"{key}: file {list(tensor.shape)} vs model {list(expected[key])} ({path.name})")
                    loaded.add(key)  # reported as a mismatch, not also as missing
                else:
                    value = tensor.load()
                    parts[prefix][key[len(prefix):]] = value if dtype is None else value.to(dtype)
                    loaded.add(key)
            for prefix, state in parts.items():
                _fill(targets[prefix], state, replaced)
    missing = sorted(set(expected) - loaded - (encoder_keys if not loaded & encoder_keys else set()))
    if missing or unexpected or mismatched:
        raise CheckpointError(_describe(Path(folder), files, missing, unexpected, mismatched))
    report.loaded = len(loaded)
    report.encoder_keys_loaded = len(loaded & encoder_keys)
    if report.skipped_unused_keys:
        logger.info("skipped %d unused Q-Former text-branch keys", len(report.skipped_unused_keys))
    return report


def _fill(module: nn.Module, state: dict[str, torch.Tensor], replaced: dict[int, torch.Tensor]) -> None:
    """Puts each tensor into ``module``: copied into a materialised tensor (tied weights stay tied), or set
    in place of a meta-device one; tensors tied on the meta device receive the same new tensor."""
    for key, value in state.items():
        owner_name, _, name = key.rpartition(".")
        owner = module.get_submodule(owner_name)
        current = getattr(owner, name)
        if not current.is_meta:
            with torch.no_grad():
                current.copy_(value)
            continue
        if id(current) not in replaced:
            is_param = isinstance(current, nn.Parameter)
            replaced[id(current)] = nn.Parameter(value, requires_grad=current.requires_grad) if is_param else value
        setattr(owner, name, replaced[id(current)])


def _expected_shapes(targets: dict[str, nn.Module | None]) -> dict[str, tuple[int, ...]]:
    return {
        prefix + key: tuple(value.shape)
        for prefix, module in targets.items()
        if module is not None
        for key, value in module.state_dict().items()
    }


def _describe(folder: Path, files: list[Path], missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    parts = []
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            shown = ", ".join(keys[:_SHOWN]) + (f", ... (+{len(keys) - _SHOWN})" if len(keys) > _SHOWN else "")
            parts.append(f"{len(keys)} {title}: {shown}")
    read = files[0].name if len(files) == 1 else f"{len(files)} shards"
    return f"{folder} ({read}): checkpoint does not fit the model: " + "; ".join(parts)


def omniflow_state_dict(transformer: nn.Module, text_vae: nn.Module | None) -> dict[str, torch.Tensor]:
    """The combined state dict in the released key layout (transformer keys, then ``text_decoder.*``)."""
    state = dict(transformer.state_dict())
    if text_vae is not None:
        state.update({TEXT_PREFIX + k: v for k, v in text_vae.state_dict().items()})
    return state


def save_sharded_safetensors(
    tensors: dict[str, "torch.Tensor | _LazyTensor"],
    folder: str | Path,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Writes tensors (real or lazy) as ``diffusion_pytorch_model[-0000i-of-0000n].safetensors`` (+ index),
    cast to ``dtype`` if given.

    Shards are planned from sizes first and each is materialised only while it is written, so a lazy
    source (a memory-mapped ``.bin``) is converted with one shard in memory. Tensors that share storage
    (tied weights) are written as separate copies.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {k: t.nbytes if dtype is None else _numel(t.shape) * dtype.itemsize for k, t in tensors.items()}
    shards: list[list[str]] = [[]]
    size = 0
    for key in tensors:
        nbytes = sizes[key]
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = (
        [f"{WEIGHTS_NAME}.safetensors"]
        if len(shards) == 1
        else [f"{WEIGHTS_NAME}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, keys in zip(names, shards):
        seen: set[int] = set()
        shard = {}
        for key in keys:
            value = tensors[key]
            value = (value.load() if isinstance(value, _LazyTensor) else value).detach().cpu()
            value = (value if dtype is None else value.to(dtype)).contiguous()
            if value.data_ptr() in seen:
                value = value.clone()
            seen.add(value.data_ptr())
            shard[key] = value
        save_file(shard, folder / name, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {key: name for name, keys in zip(names, shards) for key in keys},
        }
        (folder / f"{WEIGHTS_NAME}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [folder / name for name in names]


def ema_parameter_names(transformer: nn.Module, text_vae: nn.Module | None) -> list[str]:
    """Names in the order of the released ``transformer.parameters()`` (text VAE and its T5 last)."""
    names = [name for name, _ in transformer.named_parameters()]
    if text_vae is not None:
        names += [TEXT_PREFIX + name for name, _ in text_vae.named_parameters()]
    return names


def load_ema_weights(path: str | Path, transformer: nn.Module, text_vae: nn.Module | None = None) -> int:
    """Copies ``ema_transformer.pt`` (diffusers ``EMAModel`` state: a positional ``shadow_params`` list in
    the released ``transformer.parameters()`` order) into the parameters. Returns how many were copied.

    A list longer than ours is accepted only for a trailing T5 copy we did not attach; every pair is
    shape-checked, so a misaligned list fails with the first mismatching name.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingComponentError(f"EMA weights not found: {path}")
    state = read_weights_file(path, mmap=True)
    shadow = state.get("shadow_params") if isinstance(state, dict) else None
    if not isinstance(shadow, list):
        raise CheckpointError(f"{path}: expected a dict with a 'shadow_params' list (diffusers EMAModel state)")
    params = dict(transformer.named_parameters())
    if text_vae is not None:
        params.update({TEXT_PREFIX + n: p for n, p in text_vae.named_parameters()})
    names = ema_parameter_names(transformer, text_vae)
    encoder_attached = text_vae is not None and getattr(text_vae, "encoder", None) is not None
    if len(shadow) < len(names) or (len(shadow) > len(names) and encoder_attached):
        raise CheckpointError(f"{path}: {len(shadow)} EMA tensors for {len(names)} model parameters")
    with torch.no_grad():
        for i, (name, value) in enumerate(zip(names, shadow)):
            if tuple(value.shape) != tuple(params[name].shape):
                raise CheckpointError(
                    f"{path}: shadow_params[{i}] has shape {list(value.shape)} but parameter {name} "
                    f"has {list(params[name].shape)}"
                )
            params[name].copy_(value)
    return len(names)
