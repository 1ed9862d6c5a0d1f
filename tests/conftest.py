import os

# Tests are offline and CPU-only; keep thread counts low so parallel helpers share 2 cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest
import torch

# With pytest-xdist (-n 2) each worker gets one core's worth of threads.
torch.set_num_threads(1 if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 else min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    # Files with end-to-end (slow) tests run first, a file's tests kept together: with -n 2 --dist loadfile the
    # short files then fill the end, so both workers finish at about the same time.
    slow_files = {item.path for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: item.path not in slow_files)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test gets the environment back as it found it: scripts run in-process set variables (train_vqgan's
    --device cpu sets ACCELERATE_USE_CPU), which would otherwise change every later subprocess's launch."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


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
