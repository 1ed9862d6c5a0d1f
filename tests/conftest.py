import os

# Tests are offline and CPU-only; keep thread counts low so parallel helpers share 2 cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def empty_hub(tmp_path):
    """A torch hub cache with no weights in it."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


@pytest.fixture(scope="session")
def text_world(tmp_path_factory):
    """The text job's tiny OmniFlow (decoder fitted) and sample data, built once for the modules that read it."""
    from text_job_helpers import build_world

    return build_world(tmp_path_factory.mktemp("text_world"))
