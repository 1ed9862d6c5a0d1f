"""omniflow.runtime.benchmarking: the benchmarks' fixed threads, offline switch and median/range."""
import os

import torch

from omniflow.runtime.benchmarking import OFFLINE_VARIABLES, Spread, benchmark_settings


def test_settings_fix_threads_and_go_offline_then_restore_both(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    threads = torch.get_num_threads()
    wanted = 1 if threads != 1 else 2
    with benchmark_settings(wanted):
        assert torch.get_num_threads() == wanted
        assert all(os.environ[name] == "1" for name in OFFLINE_VARIABLES)
    assert torch.get_num_threads() == threads
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["HF_DATASETS_OFFLINE"] == "0"


def test_spread_is_the_median_and_range_whatever_the_order():
    spread = Spread.of([3.0, 1.0, 10.0, 2.0, 4.0])
    assert (spread.median, spread.low, spread.high) == (3.0, 1.0, 10.0)
    assert spread.format(".1f") == "3.0 (1.0-10.0)" and spread.as_dict() == {"median": 3.0, "low": 1.0, "high": 10.0}
