"""Training-state checkpoints: atomic, verified on load, pickle-free, with per-rank data positions.

Layout of ``<output_dir>/checkpoint-<step>/``::

    model.safetensors, model_1.safetensors, ...   trained weights (DeepSpeed: pytorch_model/, its engine's files)
    optimizer.json/.safetensors, optimizer_1...   optimizer states (not under DeepSpeed: the engine saves them)
    scheduler.json/.safetensors, scaler...        LR schedulers, the fp16 gradient scaler
    state_<name>.json/.safetensors                objects a script registered (best metric, EMA weights, ...)
    rng_rank<r>.json/.safetensors                 python, numpy and torch (CPU, CUDA) RNG states of rank r
    train_state_rank<r>.json                      step, data position and process count of rank r
    manifest_rank<r>.json                         size and sha256 of each file rank r wrote (written last)

Every state file is JSON or safetensors (see :mod:`.state_files`); DeepSpeed's own ``.pt`` files are
read with ``torch.load(weights_only=True)`` and an allowlist of its plain data classes. So resuming
never runs code from a checkpoint. Loading first checks every file against the manifests: a
missing, truncated or replaced file stops the run with one line naming it, so a resume is exact or
it does not happen. Each save goes to ``checkpoint-<step>.tmp`` and is renamed only after every
rank has finished writing: a crash mid-save never touches the last good checkpoint.

On several nodes the output folder may be shared (one file system) or node-local (each node its own scratch
disk; see :func:`output_shared_between_nodes`). On node-local disks (DDP) each node's first process writes the
replicated files (weights, optimizer, schedulers, states) into its own disk's checkpoint, completes and prunes
it there, and every rank restores from its own node's copy; ``latest`` is the newest step complete on every node.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils.deepspeed import DeepSpeedSchedulerWrapper
from safetensors.torch import save_file

from .errors import CheckpointError
from .export import load_state_dict_strict
from .state_files import load_state, own_storage, read_safetensors, save_state

logger = logging.getLogger("omniflow")

_NAME = re.compile(r"^checkpoint-(\d+)$")
DEEPSPEED_TAG = "pytorch_model"  # accelerate's folder name for the engine's files


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (``.tmp`` leftovers are ignored)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | os.PathLike) -> int | None:
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def resolve_checkpoint(output_dir: str | os.PathLike, resume_from: str | None) -> Path | None:
    """``latest`` -> newest complete checkpoint (None if there is none); a path -> that path."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from}: no such checkpoint directory")
    return path


def node_of(accelerator: Accelerator) -> tuple[int, int, int]:
    """(this process's node, the number of nodes, processes per node), from torchrun's LOCAL_WORLD_SIZE."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    return accelerator.process_index // per_node, max(1, accelerator.num_processes // per_node), per_node


def output_shared_between_nodes(accelerator: Accelerator, output_dir: Path) -> bool:
    """Whether every node sees the same ``output_dir``: each node's first process writes a marker named by a
    token rank 0 drew, and the folder is shared when every node sees every node's marker."""
    node, nodes, _ = node_of(accelerator)
    if nodes == 1:
        return True
    token = torch.randint(0, 2**62, (1,), device=accelerator.device) if accelerator.is_main_process else \
        torch.zeros(1, dtype=torch.long, device=accelerator.device)
    token = int(accelerator.reduce(token, reduction="sum").item())
    mine = output_dir / f".node-marker-{token}-{node}"
    if accelerator.is_local_main_process:
        mine.touch()
    accelerator.wait_for_everyone()
    sees_all = all((output_dir / f".node-marker-{token}-{n}").exists() for n in range(nodes))
    shared = all_ranks_ok(accelerator, sees_all)
    accelerator.wait_for_everyone()
    if accelerator.is_local_main_process:
        mine.unlink(missing_ok=True)
    return shared


def _numbered(name: str, index: int) -> str:
    return name if index == 0 else f"{name}_{index}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, source: Path) -> None:
    try:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{source}: cannot restore the random states ({type(err).__name__}: {err})") from None


def deepspeed_safe_globals() -> list:
    """DeepSpeed's plain data classes found in its optimizer files (no code runs when they are rebuilt)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def load_deepspeed_file(path: str, map_location=None):
    """What the DeepSpeed checkpoint engine's ``torch.load(weights_only=False)`` is replaced with."""
    with torch.serialization.safe_globals(deepspeed_safe_globals()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")  # DeepSpeed writes protocol 4
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(f"{path}: not a weights-only DeepSpeed file (it asks to rebuild objects that "
                                  "could run code; it is not loaded)") from None
        except Exception as err:  # damaged archives
            raise CheckpointError(f"{path}: not a readable DeepSpeed file ({type(err).__name__}: {err})") from None


class CheckpointManager:
    """Saves and restores what :meth:`track` and :meth:`register` were given, plus RNG and train state."""

    def __init__(self, accelerator: Accelerator, output_dir: str | os.PathLike, total_limit: int | None = None):
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.total_limit = total_limit
        self.deepspeed = accelerator.state.deepspeed_plugin is not None
        self.models: list[torch.nn.Module] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.schedulers: list[Any] = []
        self.states: dict[str, Any] = {}
        self._saved_steps: set[int] = set()
        self.shared = True  # set by use_node_local_disks()

    def use_node_local_disks(self) -> None:
        """Each node keeps complete checkpoints on its own disk (DDP; DeepSpeed's files assume one folder)."""
        if self.deepspeed:
            raise CheckpointError(f"--output_dir {self.output_dir} is not shared between the nodes (node-local "
                                  "disks): supported with DDP; under DeepSpeed give a folder every node sees")
        self.shared = False

    @property
    def leader(self) -> bool:
        """The process that completes checkpoints on this folder: rank 0, or each node's first on local disks."""
        return self.accelerator.is_main_process if self.shared else self.accelerator.is_local_main_process

    def _leader_rank(self) -> int:
        """The rank whose manifest lists the replicated files this rank reads."""
        node, _, per_node = node_of(self.accelerator)
        return 0 if self.shared else node * per_node

    # -- what is saved --------------------------------------------------------------------------
    def track(self, *prepared) -> None:
        """Record models, optimizers and schedulers returned by ``accelerator.prepare``."""
        for obj in prepared:
            if isinstance(obj, torch.nn.Module):
                self.models.append(obj)
            elif isinstance(obj, torch.optim.Optimizer):
                self.optimizers.append(obj)
            elif isinstance(obj, (AcceleratedScheduler, torch.optim.lr_scheduler.LRScheduler)):
                self.schedulers.append(obj)

    def register(self, name: str, obj: Any) -> None:
        """An object with ``state_dict``/``load_state_dict`` (tensors, numbers, strings) saved as ``state_<name>``."""
        if not re.fullmatch(r"[A-Za-z0-9_]+", name) or name in self.states:
            raise ValueError(f"state name {name!r} must be unique and made of letters, digits and '_'")
        self.states[name] = obj

    def _own_schedulers(self) -> list:
        # A scheduler DeepSpeed built from its config lives in the engine's files.
        return [s for s in self.schedulers if not isinstance(s, DeepSpeedSchedulerWrapper)]

    def remove_incomplete(self) -> None:
        """Main process: delete ``checkpoint-*.tmp`` folders left by an interrupted save."""
        for stale in self.output_dir.glob("checkpoint-*.tmp"):
            logger.warning("removing incomplete checkpoint %s (a save was interrupted)", stale)
            shutil.rmtree(stale, ignore_errors=True)

    # -- save -----------------------------------------------------------------------------------
    def save(self, step: int, train_state: dict) -> Path:
        """Save on every rank together (DeepSpeed shards its state per rank); returns the final directory.

        A write that fails on any rank (disk full, read-only folder) removes the partial save on all
        ranks and raises one :class:`CheckpointError` naming the last good checkpoint."""
        acc = self.accelerator
        final = self.output_dir / f"checkpoint-{step}"
        if step in self._saved_steps:
            return final
        tmp = final.with_name(final.name + ".tmp")
        if self.leader:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        error = None
        try:
            self._write(tmp, step, train_state)
        except Exception as err:  # a full disk is OSError, RuntimeError (torch.save) or SafetensorError
            logger.debug("checkpoint write failed", exc_info=True)
            error = err
        if not all_ranks_ok(acc, error is None):
            if self.leader:
                shutil.rmtree(tmp, ignore_errors=True)
            acc.wait_for_everyone()
            kept = list_checkpoints(self.output_dir)
            reason = f"{type(error).__name__}: {error}" if error is not None else "it failed on another rank"
            raise CheckpointError(f"cannot write {final} ({reason}); the last good checkpoint is "
                                  f"{kept[-1] if kept else 'none'}")
        if self.leader:
            if final.exists():  # written by another run that got this far: this run's state replaces it
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
            if acc.is_main_process:
                logger.info("saved checkpoint %s%s", final, "" if self.shared else " (and on every node's disk)")
        acc.wait_for_everyone()
        self._saved_steps.add(step)
        return final

    def _write(self, folder: Path, step: int, train_state: dict) -> None:
        acc, rank = self.accelerator, self.accelerator.process_index
        written: list[Path] = []
        if self.deepspeed:
            for i, engine in enumerate(self.models):
                engine.save_checkpoint(str(folder), _numbered(DEEPSPEED_TAG, i))
            acc.wait_for_everyone()
            written += self._deepspeed_files(folder, rank)
        if self.leader:  # the replicated state: once per folder
            if not self.deepspeed:
                for i, model in enumerate(self.models):
                    path = folder / f"{_numbered('model', i)}.safetensors"
                    save_file(own_storage(acc.get_state_dict(model)), str(path), metadata={"format": "pt"})
                    written.append(path)
                for i, optimizer in enumerate(self.optimizers):
                    written += save_state(optimizer.state_dict(), folder / _numbered("optimizer", i))
            for i, scheduler in enumerate(self._own_schedulers()):
                written += save_state(scheduler.state_dict(), folder / _numbered("scheduler", i))
            if acc.scaler is not None:
                written += save_state(acc.scaler.state_dict(), folder / "scaler")
            for name, obj in self.states.items():
                written += save_state(obj.state_dict(), folder / f"state_{name}")
        written += save_state(_rng_state(), folder / f"rng_rank{rank}")
        state_file = folder / f"train_state_rank{rank}.json"
        state_file.write_text(json.dumps({**train_state, "step": step, "num_processes": acc.num_processes,
                                          "accelerator_step": acc.step}))
        written.append(state_file)
        manifest = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in written}
        (folder / f"manifest_rank{rank}.json").write_text(json.dumps(manifest, indent=1))

    def _deepspeed_files(self, folder: Path, rank: int) -> list[Path]:
        """The engine files of this rank: its ``zero_pp_rank_<rank>_*`` shards; rank 0 also the shared ones."""
        own = re.compile(rf"zero_pp_rank_{rank}_")
        any_rank = re.compile(r"zero_pp_rank_\d+_")
        files = [p for i in range(len(self.models)) for p in (folder / _numbered(DEEPSPEED_TAG, i)).rglob("*")
                 if p.is_file()]
        return [p for p in files if own.search(p.name) or (rank == 0 and not any_rank.search(p.name))]

    # -- load -----------------------------------------------------------------------------------
    def verify(self, path: str | os.PathLike) -> None:
        """Check before anything is written or loaded that ``path`` can be restored exactly by this run:
        the same process count, and every file this rank reads present and byte-identical to the saved one."""
        path = Path(path)
        self._train_state(path)
        self._verify(path)

    def load(self, path: str | os.PathLike) -> dict:
        """Restore everything from a :meth:`verify`-ed checkpoint; return this rank's train state."""
        acc = self.accelerator
        path = Path(path)
        state = self._train_state(path)
        if self.deepspeed:
            self._load_deepspeed(path)
        else:
            for i, model in enumerate(self.models):
                source = path / f"{_numbered('model', i)}.safetensors"
                load_state_dict_strict(acc.unwrap_model(model), read_safetensors(source), str(source))
            for i, optimizer in enumerate(self.optimizers):
                self._restore(optimizer, path / _numbered("optimizer", i), "the optimizer")
        for i, scheduler in enumerate(self._own_schedulers()):
            self._restore(scheduler, path / _numbered("scheduler", i), "the LR scheduler")
        if acc.scaler is not None:
            self._restore(acc.scaler, path / "scaler", "the gradient scaler")
        for name, obj in self.states.items():
            self._restore(obj, path / f"state_{name}", name)
        rng = path / f"rng_rank{acc.process_index}"
        _set_rng_state(load_state(rng), rng.with_suffix(".json"))
        acc.step = int(state.get("accelerator_step", 0))
        logger.info("resumed from %s at step %d", path, state["step"])
        return state

    def _train_state(self, path: Path) -> dict:
        acc = self.accelerator
        first = path / f"train_state_rank{self._leader_rank()}.json"
        if not first.is_file():
            pickles = sorted(p.name for p in path.glob("*.pkl"))
            hint = f" (it holds {', '.join(pickles)}: an older pickle-based layout, not loaded)" if pickles else ""
            raise CheckpointError(f"{path} is not a training checkpoint of this version (no {first.name}){hint}")
        written_by = _read_json(first).get("num_processes")
        if written_by != acc.num_processes:
            raise CheckpointError(f"{path} was written by {written_by} process(es); resuming it exactly needs the same "
                                  f"number, this run has {acc.num_processes}")
        return _read_json(path / f"train_state_rank{acc.process_index}.json")

    def _verify(self, path: Path) -> None:
        """Every file this rank reads must be present and byte-identical to what was saved."""
        acc = self.accelerator
        entries = dict(_read_json(path / f"manifest_rank{acc.process_index}.json"))
        leader = self._leader_rank()
        if acc.process_index != leader:
            own = re.compile(r"_rank\d+\.|zero_pp_rank_\d+_")  # other ranks' files are theirs to check
            entries.update({k: v for k, v in _read_json(path / f"manifest_rank{leader}.json").items()
                            if not own.search(k)})
        for name, expected in sorted(entries.items()):
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"{file} is missing: this checkpoint cannot be restored")
            if file.stat().st_size != expected["size"] or _sha256(file) != expected["sha256"]:
                raise CheckpointError(f"{file} differs from the file that was saved (truncated or replaced): "
                                      "this checkpoint cannot be restored")
        if not any(name.startswith("rng_rank") for name in entries):
            raise CheckpointError(f"{path}: the manifest lists no random states")

    def _load_deepspeed(self, path: Path) -> None:
        for i, engine in enumerate(self.models):
            if engine.load_universal_checkpoint():
                raise CheckpointError("DeepSpeed universal checkpoints are not supported for resuming")
            engine.checkpoint_engine.load = load_deepspeed_file  # the engine's own load unpickles code
            tag = _numbered(DEEPSPEED_TAG, i)
            try:
                loaded, _ = engine.load_checkpoint(str(path), tag, load_module_strict=True, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
            except CheckpointError:
                raise
            except (RuntimeError, KeyError, ValueError, AssertionError) as err:
                raise CheckpointError(f"{path / tag}: cannot restore the DeepSpeed state ({type(err).__name__}: "
                                      f"{err})") from None
            if loaded is None:
                raise CheckpointError(f"{path / tag}: DeepSpeed found no checkpoint to restore")

    @staticmethod
    def _restore(obj: Any, stem: Path, what: str) -> None:
        tree = load_state(stem)
        try:
            obj.load_state_dict(tree)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
            raise CheckpointError(f"{stem}.json does not fit {what} ({type(err).__name__}: {err})") from None

    def _prune(self) -> None:
        if not self.total_limit:
            return
        for old in list_checkpoints(self.output_dir)[: -self.total_limit]:
            shutil.rmtree(old, ignore_errors=True)
            logger.info("removed old checkpoint %s (--checkpoints_total_limit %d)", old, self.total_limit)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: this checkpoint cannot be restored")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not readable JSON ({err})") from None


def all_ranks_ok(accelerator: Accelerator, ok: bool) -> bool:
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == 0
