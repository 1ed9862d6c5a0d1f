import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from omniflow.data import ResumableLoader, load_hf_dataset
from omniflow.runtime.errors import DataError
from omniflow.runtime.run import TrainingOptions, TrainingRun


def rows(n):
    return datasets.Dataset.from_dict({"x": list(range(n))})


def collate(batch):
    return [r["x"] for r in batch]


def drain(loader, batches):
    out = []
    it = iter(loader)
    for _ in range(batches):
        out.append(next(it))
    return out


def test_ranks_get_disjoint_equal_shards_of_uneven_data():
    ds = rows(23)
    per_rank = [list(ResumableLoader(ds, 4, collate_fn=collate, rank=r, world_size=3)) for r in range(3)]
    assert [len(b) for b in per_rank] == [1, 1, 1]  # 23 // 3 = 7 samples -> one full batch of 4 each
    seen = [x for batches in per_rank for b in batches for x in b]
    assert len(seen) == len(set(seen)) == 12


@pytest.mark.parametrize("shuffle", [False, True])
def test_evaluation_scores_every_sample_once_in_equal_batch_counts(shuffle):
    """Without drop_last every index is in one batch of one rank, and all ranks run the same number of
    batches (a ZeRO-3 forward is a collective), none empty and none over the batch size but for size 1."""
    for n in range(1, 24):
        for world in range(1, min(n, 5) + 1):
            for batch_size in range(1, 6):
                loaders = [ResumableLoader(list(range(n)), batch_size, collate_fn=list, shuffle=shuffle,
                                           drop_last=False, rank=r, world_size=world) for r in range(world)]
                shares = [list(loader) for loader in loaders]  # the items are their own indices
                case = (n, world, batch_size)
                assert sorted(i for share in shares for batch in share for i in batch) == list(range(n)), case
                assert {len(share) for share in shares} == {len(loaders[0])}, case
                sizes = [len(batch) for share in shares for batch in share]
                assert min(sizes) >= 1 and max(sizes) <= max(batch_size, 2) and max(sizes) - min(sizes) <= 1, case
                if batch_size > 1:
                    assert max(sizes) <= batch_size, case


def test_indexed_batches_name_their_dataset_indices():
    indexed = list(ResumableLoader(rows(7), 2, collate_fn=collate, seed=4, rank=1, world_size=2).indexed())
    assert len(indexed) == 1 and all(indices == batch for indices, batch in indexed)  # x is the row index


def test_evaluation_refuses_a_rank_without_samples_and_a_stream():
    with pytest.raises(DataError, match=r"2 samples: too few for 3 process\(es\) \(each needs a sample\)"):
        ResumableLoader(list(range(2)), 4, drop_last=False, world_size=3)
    with pytest.raises(DataError, match="streaming dataset"):
        ResumableLoader(rows(4).to_iterable_dataset(), 2, drop_last=False, world_size=2)
    alone = ResumableLoader(rows(5).to_iterable_dataset(), 2, collate_fn=collate, shuffle=False, drop_last=False)
    assert list(alone) == [[0, 1], [2, 3], [4]]  # one process streams every sample


def test_epochs_reshuffle_deterministically():
    a = ResumableLoader(rows(20), 5, collate_fn=collate, seed=3)
    b = ResumableLoader(rows(20), 5, collate_fn=collate, seed=3)
    first, second = list(a), list(a)
    assert first == list(b) and second == list(b)
    assert first != second and sorted(sum(first, [])) == list(range(20))


@pytest.mark.parametrize("streaming", [False, True])
def test_state_dict_resumes_mid_epoch_exactly(streaming):
    def make():
        ds = rows(40)
        if streaming:
            ds = ds.to_iterable_dataset(num_shards=4)
        return ResumableLoader(ds, 4, collate_fn=collate, seed=1, rank=1, world_size=2, shuffle_buffer=8)

    reference = make()
    expected = list(reference) + list(reference)  # two epochs
    interrupted = make()
    head = drain(interrupted, 3)
    state = json.loads(json.dumps(interrupted.state_dict()))  # what a checkpoint stores
    resumed = make()
    resumed.load_state_dict(state)
    tail = list(resumed) + list(resumed)
    assert head + tail == expected


def test_too_small_dataset_is_a_clear_error():
    with pytest.raises(DataError, match="too few for 2 process"):
        ResumableLoader(rows(3), 4, world_size=2)


def test_local_files_load(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"id": str(i), "text": f"t{i}"}) + "\n" for i in range(3)))
    assert load_hf_dataset(str(tmp_path), "train")["text"] == ["t0", "t1", "t2"]
    assert [r["id"] for r in load_hf_dataset(str(tmp_path / "train.jsonl"), "train", streaming=True)] == ["0", "1", "2"]
    rows(4).to_parquet(tmp_path / "p.parquet")
    assert load_hf_dataset(str(tmp_path / "p.parquet"))["x"] == [0, 1, 2, 3]
    images = tmp_path / "imgs"
    images.mkdir()
    for name, img in (("astronaut", skdata.astronaut()), ("coffee", skdata.coffee())):
        Image.fromarray(img[::8, ::8]).save(images / f"{name}.png")
    (images / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{n}.png", "caption": n}) + "\n" for n in ("astronaut", "coffee")))
    folder = load_hf_dataset(str(images), "train")
    assert sorted(folder["caption"]) == ["astronaut", "coffee"]
    assert np.asarray(folder[0]["image"]).ndim == 3


def test_missing_local_source_is_clear():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_dataset("./no/such/data")
    with pytest.raises(DataError, match="unsupported data file type"):
        load_hf_dataset(__file__)


def tag_with_process(row):
    """A transform that shows where it ran."""
    import os

    return {"x": row["x"], "pid": os.getpid()}


def test_streaming_with_two_workers_resumes_exactly_and_transforms_in_the_workers():
    import os

    def make(workers):
        ds = rows(40).to_iterable_dataset(num_shards=4)
        return ResumableLoader(ds, 4, collate_fn=list, seed=1, shuffle_buffer=8, num_workers=workers,
                               transform=tag_with_process)

    reference = make(0)
    expected = [[r["x"] for r in b] for b in list(reference) + list(reference)]  # two epochs, in this process
    interrupted = make(2)
    head = drain(interrupted, 3)
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = make(2)
    resumed.load_state_dict(state)
    tail = list(resumed) + list(resumed)  # the rest of the epoch, then the next one
    assert [[r["x"] for r in b] for b in head + tail] == expected
    pids = {r["pid"] for b in head + tail for r in b}
    assert os.getpid() not in pids and len(pids) >= 2  # prepared in worker processes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_pinning_keeps_the_batch_structure():
    from omniflow.data.core import pinned

    batch = {"a": torch.ones(2), "b": [torch.zeros(1), "text"], "c": (torch.arange(3),)}
    out = pinned(batch)
    assert out.keys() == batch.keys() and out["b"][1] == "text" and torch.equal(out["c"][0], torch.arange(3))
    assert out["a"].is_pinned() and out["b"][0].is_pinned() and out["c"][0].is_pinned()


@pytest.fixture
def signal_handlers_restored():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def signal_mask(pid: int, mask: str, sig: int) -> bool:
    """Whether ``sig`` is in process ``pid``'s ``mask``: SigIgn (ignored) or SigCgt (caught by a handler)."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return bool(int(status[mask], 16) >> (sig - 1) & 1)


def pool_workers() -> list:
    return [p for p in multiprocessing.active_children() if "PoolWorker" in p.name]


def test_data_workers_of_a_training_run_stop_when_terminated(tmp_path, signal_handlers_restored):
    """A training run defers SIGTERM/SIGINT to save a checkpoint; its forked data workers inherit the handler but
    must stop when terminated, or the pool's exit (end of training) can wait for ever (seen as a hung resume)."""
    TrainingRun(TrainingOptions(output_dir=str(tmp_path), report_to="none", mixed_precision="no"), micro_batch_size=1)
    assert signal_mask(os.getpid(), "SigCgt", signal.SIGTERM)
    loader = ResumableLoader(rows(40).to_iterable_dataset(num_shards=4), 4, collate_fn=list, seed=1,
                             shuffle_buffer=8, num_workers=2, transform=tag_with_process)
    batches = iter(loader)
    next(batches)
    workers = pool_workers()
    assert len(workers) == 2

    def started(worker):  # has run the pool's initializer
        return signal_mask(worker.pid, "SigIgn", signal.SIGINT)

    deadline = time.monotonic() + 20
    while not all(map(started, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(map(started, workers))  # Ctrl-C is the training process's to handle
    # SIGTERM is not caught: its default action ends a worker. (Not sent here: a worker killed outside the
    # pool's own terminate can die holding the task queue's lock, and the pool then waits for ever.)
    assert not any(signal_mask(w.pid, "SigCgt", signal.SIGTERM) for w in workers)
    batches.close()  # terminates the pool: returns once every worker is gone
    assert not pool_workers()
    # Any other forked child (a DataLoader worker) stops on SIGTERM too.
    fork = multiprocessing.get_context("fork")
    running = fork.Event()
    child = fork.Process(target=lambda: (running.set(), time.sleep(60)), daemon=True)
    child.start()
    try:
        assert running.wait(timeout=20)  # a signal that comes before Python's after-fork reset is dropped
        os.kill(child.pid, signal.SIGTERM)
        child.join(timeout=20)
        assert child.exitcode == -signal.SIGTERM
    finally:
        child.kill()
