"""What the scripts in benchmarks/ share, so that a documented command gives comparable figures on any machine:
a fixed torch thread count, no network (benchmarks build random weights) and repeated timings reported as
median and range."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# dense bf16 peak FLOP/s by device name (SXM parts), the denominator of MFU
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a CUDA device named ``device_name``, None when unknown."""
    return next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in device_name), None)


def add_benchmark_flags(parser: argparse.ArgumentParser, repeats: int = 3) -> None:
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a shared CPU, "
                                                               "spinning OpenMP threads make timings erratic)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs per row: median and range shown")


@contextmanager
def benchmark_settings(threads: int) -> Iterator[None]:
    """Within: ``threads`` torch CPU threads and the Hugging Face libraries offline; both restored after."""
    import torch

    saved_threads, saved_env = torch.get_num_threads(), {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    hub = sys.modules.get("huggingface_hub.constants")  # it reads HF_HUB_OFFLINE once, at import
    saved_hub = getattr(hub, "HF_HUB_OFFLINE", None)
    os.environ.update({name: "1" for name in OFFLINE_VARIABLES})
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if hub is not None:
            hub.HF_HUB_OFFLINE = saved_hub


@dataclass(frozen=True)
class Spread:
    """Median and range of repeated measurements."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Iterable[float]) -> "Spread":
        values = list(values)
        return cls(statistics.median(values), min(values), max(values))

    def format(self, spec: str = ".1f") -> str:
        return f"{self.median:{spec}} ({self.low:{spec}}-{self.high:{spec}})"

    def as_dict(self) -> dict[str, float]:
        return asdict(self)
