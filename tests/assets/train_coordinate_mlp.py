"""A small real training job on the shared runtime, used by the runtime tests.

Fits an MLP with dropout that maps pixel coordinates to the colours of a real photo
(scikit-image's astronaut), read through a Hugging Face ``datasets.Dataset``. It exercises
options, the accelerator, the resumable loader (map-style or streaming), checkpoints,
signals, metrics and the export exactly as the product scripts do.
"""
import math
import os
import signal
import time
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
from skimage import data as skdata
from skimage.transform import resize
from transformers import get_cosine_schedule_with_warmup

from omniflow.data import ResumableLoader
from omniflow.runtime.errors import run_main
from omniflow.runtime.export import load_export, load_state_dict_strict
from omniflow.runtime.options import parse_options
from omniflow.runtime.run import TrainingOptions, TrainingRun, optimizer_steps


@dataclass
class CoordOptions:
    batch_size: int = field(default=16, metadata={"help": "micro-batch size per process"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    num_epochs: int = field(default=1, metadata={"help": "epochs when --max_train_steps is unset"})
    image_size: int = field(default=16, metadata={"help": "side of the downscaled photo"})
    dropout: float = field(default=0.1, metadata={"help": "dropout after the first hidden layer"})
    streaming: bool = field(default=False, metadata={"help": "read the data as a streaming IterableDataset"})
    init_weights: str = field(default="", metadata={"help": "start from these exported weights (an export folder)"})
    nan_at_step: int = field(default=0, metadata={"help": "test hook: make the loss NaN at this step"})
    sleep_per_step: float = field(default=0.0, metadata={"help": "test hook: seconds to sleep per step"})
    fail_at_step: int = field(default=0, metadata={"help": "test hook: raise in this step on --fail_rank"})
    fail_rank: int = field(default=0, metadata={"help": "test hook: the rank --fail_at_step raises on"})
    hang_at_step: int = field(default=0, metadata={"help": "test hook: wait for SIGTERM in this step on --hang_rank"})
    hang_rank: int = field(default=0, metadata={"help": "test hook: the rank --hang_at_step sleeps on"})


def build_dataset(size: int) -> datasets.Dataset:
    image = resize(skdata.astronaut(), (size, size), anti_aliasing=True).astype(np.float32)
    ys, xs = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    coords = np.stack([xs, ys], -1).reshape(-1, 2).astype(np.float32)
    return datasets.Dataset.from_dict({"coord": coords.tolist(), "rgb": image.reshape(-1, 3).tolist()})


class LossHistory:
    """Script state a checkpoint must carry (as BestEval/EarlyStopping in the product scripts): the
    lowest loss and the number of steps seen, tensors and numbers mixed."""

    def __init__(self):
        self.lowest, self.steps = torch.tensor(math.inf), 0

    def update(self, loss: torch.Tensor) -> None:
        self.lowest, self.steps = torch.minimum(self.lowest, loss.detach().cpu()), self.steps + 1

    def state_dict(self) -> dict:
        return {"lowest": self.lowest, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.lowest, self.steps = state["lowest"], state["steps"]


def hang_until_sigterm():
    """Stand still, as a rank stuck in a collective, until the launcher stops it (no checkpoint, no word)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.sigwait({signal.SIGTERM})
    os._exit(128 + signal.SIGTERM)


def collate(rows):
    return {"coord": torch.tensor([r["coord"] for r in rows]), "rgb": torch.tensor([r["rgb"] for r in rows])}


def main():
    opts, train_opts = parse_options(CoordOptions, TrainingOptions)
    run = TrainingRun(train_opts, opts, micro_batch_size=opts.batch_size)
    run.derive("rmse", lambda means: math.sqrt(means["loss"]))
    acc = run.accelerator
    torch.manual_seed(train_opts.seed)  # identical initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.SiLU(), torch.nn.Dropout(opts.dropout),
                                torch.nn.Linear(64, 64), torch.nn.SiLU(), torch.nn.Linear(64, 3))
    if opts.init_weights:
        load_state_dict_strict(model, load_export(opts.init_weights)[0], opts.init_weights)
    dataset = build_dataset(opts.image_size)
    if opts.streaming:
        dataset = dataset.to_iterable_dataset(num_shards=4)
    loader = ResumableLoader(dataset, opts.batch_size, collate_fn=collate, seed=train_opts.seed,
                             rank=acc.process_index, world_size=acc.num_processes,
                             num_workers=train_opts.dataloader_num_workers)
    max_steps = train_opts.max_train_steps or optimizer_steps(len(loader), opts.num_epochs,
                                                              train_opts.gradient_accumulation_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=max_steps)
    model, optimizer, scheduler = run.prepare(model, optimizer, scheduler)
    history = LossHistory()
    run.register_state("loss_history", history)
    run.start(loader)
    for batch in run.batches(loader, max_steps):
        with run.accumulate(model):
            pred = model(batch["coord"])
            loss = torch.nn.functional.mse_loss(pred.float(), batch["rgb"])
            if opts.nan_at_step and run.step + 1 == opts.nan_at_step:
                loss = loss * math.nan
            if acc.process_index == opts.fail_rank and run.step + 1 == opts.fail_at_step:
                raise RuntimeError(f"test hook: rank {opts.fail_rank} fails in step {opts.fail_at_step}")
            if acc.process_index == opts.hang_rank and run.step + 1 == opts.hang_at_step:
                hang_until_sigterm()
            run.backward_and_step(loss, model, optimizer, scheduler)
        if run.end_step({"loss": loss}, samples=len(batch["rgb"])):
            history.update(loss)
        if opts.sleep_per_step:
            time.sleep(opts.sleep_per_step)
    run.export(model, {"layers": [2, 64, 64, 3], "lowest_loss": history.lowest.item(), "steps_seen": history.steps},
               os.path.join(train_opts.output_dir, "final"))
    run.finish()


if __name__ == "__main__":
    run_main(main)
