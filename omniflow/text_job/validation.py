"""Validation of a text head during training: loaders over the evaluation sets (each example on exactly one
rank), the loss terms summed over the whole sets, and texts sampled with the head for a few examples."""
from __future__ import annotations

import math

import torch
from accelerate.utils import extract_model_from_parallel, send_to_device
from torch.utils.data import Subset

from ..data import ResumableLoader
from ..data.text import DataConfig, build_eval_datasets, collate_examples
from ..models.vq.quantizers import perplexity_from_counts
from ..runtime.errors import ConfigError
from ..runtime.noise import sample_generators
from ..runtime.run import TrainingRun
from .model import TextJobModel


def eval_loaders(config: DataConfig, batch_size: int, max_eval_samples: int | None, rank: int,
                 world_size: int) -> dict[str, ResumableLoader]:
    """One loader per evaluation set: its first ``max_eval_samples`` examples, each on exactly one rank."""
    loaders = {}
    for name, dataset in build_eval_datasets(config).items():
        if not hasattr(dataset, "__len__"):  # a stream: read its first examples once, so that they can be dealt
            if max_eval_samples is None:
                raise ConfigError(f"evaluation set {name!r} streams: give --max_eval_samples (how many of its "
                                  "examples to score)")
            dataset = list(dataset.take(max_eval_samples))
        elif max_eval_samples is not None:
            dataset = Subset(dataset, range(min(max_eval_samples, len(dataset))))
        loaders[name] = ResumableLoader(dataset, batch_size, collate_fn=collate_examples, shuffle=False,
                                        drop_last=False, rank=rank, world_size=world_size)
    return loaders


def sample_batches(config, count: int) -> dict[str, dict]:
    """The first ``count`` examples of each evaluation set, one batch per set, the same on every rank."""
    batches = {}
    for name, dataset in build_eval_datasets(config).items() if count else ():
        examples = (list(dataset.take(count)) if not hasattr(dataset, "__len__")
                    else [dataset[i] for i in range(min(count, len(dataset)))])
        if examples:
            batches[name] = collate_examples(examples)
    return batches


@torch.no_grad()
def sample_texts(job: TextJobModel, stack, batches: dict, run: TrainingRun, seed: int, num_inference_steps: int,
                 max_new_tokens: int) -> list[dict]:
    """Texts sampled with the head as generate_text.py samples them, with their references. Every rank
    samples (ZeRO-3 gathers the head's weights in its forward); the training RNG streams are left as they were,
    so a resumed run stays exact."""
    records = []
    decoder_mode = job.text_vae.model.training  # train mode under gradient checkpointing, which disables the KV cache
    stack.eval()
    job.text_vae.model.eval()
    devices = [run.device] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), run.accelerator.autocast():
        for k, (name, batch) in enumerate(batches.items()):
            texts = job.generate(send_to_device(batch, run.device), stack, generator=torch.Generator().manual_seed(
                seed + k), num_inference_steps=num_inference_steps, max_new_tokens=max_new_tokens)
            records += [{"dataset": name, "task": task, "id": i, "prediction": text.strip(), "references": refs}
                        for i, task, text, refs in zip(batch["id"], batch["task"], texts, batch["references"])]
    job.text_vae.model.train(decoder_mode)
    stack.train()
    return records


# Per evaluation set, summed over its examples: CE x tokens, accuracy x tokens, tokens, auxiliary loss x examples,
# examples. Each term is then averaged over the whole set, so no value depends on how the set was batched.
SUMS = ("ce", "accuracy", "tokens", "aux", "examples")


@torch.no_grad()
def validation_sums(job: TextJobModel, stack, loaders: dict, seed: int, device,
                    num_codes: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's sums (:data:`SUMS`, one row per set; each example has its own noise, seeded by its index)
    and how often each of the ``num_codes`` VQ codes was picked over all sets."""
    sums = torch.zeros(len(loaders), len(SUMS), dtype=torch.float64, device=device)
    code_counts = torch.zeros(num_codes, dtype=torch.float64, device=device)
    for k, loader in enumerate(loaders.values()):
        for indices, batch in loader.indexed():
            out = job.head_terms(stack, send_to_device(batch, device), sample_generators(seed, indices))
            tokens, ce = out.num_tokens, out.terms["ce"].item()
            sums[k] += torch.tensor([ce * tokens, out.terms["token_accuracy"].item() * tokens, tokens,
                                     (out.loss.item() - ce) * len(indices), len(indices)], dtype=torch.float64,
                                    device=device)
            if out.codes is not None:
                code_counts += torch.bincount(out.codes.flatten(), minlength=num_codes)
    return sums, code_counts


def validation_values(names: list[str], sums: torch.Tensor, code_counts: torch.Tensor) -> dict[str, float]:
    """The logged values of summed :data:`SUMS`: the loss is the token-mean CE plus the example-mean auxiliary loss;
    with VQ, the share of codes used and the code perplexity over the whole validation set."""
    ce, accuracy, tokens, aux, examples = sums.sum(0)
    values = {"val/loss": ce / tokens + aux / examples, "val/ce": ce / tokens, "val/token_accuracy": accuracy / tokens}
    values["val/perplexity"] = math.exp(min(float(values["val/ce"]), 50.0))
    for name, (ce, _, tokens, aux, examples) in zip(names, sums):
        values[f"val/{name}/loss"] = ce / tokens.clamp(min=1) + aux / examples.clamp(min=1)
    if code_counts.numel():
        values["val/vq_usage"] = (code_counts > 0).double().mean()
        values["val/vq_perplexity"] = perplexity_from_counts(code_counts)
    return {key: float(value) for key, value in values.items()}


def validate(job: TextJobModel, stack, loaders: dict, run: TrainingRun, seed: int) -> dict[str, float]:
    """Loss terms over the evaluation sets, summed over ranks; the same noise at every evaluation."""
    vq = extract_model_from_parallel(stack).vq
    stack.eval()
    with run.accelerator.autocast():
        sums, code_counts = validation_sums(job, stack, loaders, seed, run.device,
                                            vq.quantizer.num_codes if vq is not None else 0)
    if run.accelerator.num_processes > 1:
        sums, code_counts = run.accelerator.reduce((sums, code_counts), reduction="sum")
    stack.train()
    return validation_values(list(loaders), sums, code_counts)
