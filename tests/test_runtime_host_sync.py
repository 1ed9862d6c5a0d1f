"""TrainingRun.end_step keeps the loss terms on the device between logging steps (no per-step host sync), and
still stops at a NaN naming the step it happened at."""
import json

import pytest
import torch

from omniflow.runtime.run import NonFiniteLossError, TrainingOptions, TrainingRun

HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts every read of a tensor's value by the host (what waits for a GPU)."""
    calls = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def make_run(tmp_path, logging_steps):
    opts = TrainingOptions(output_dir=str(tmp_path), logging_steps=logging_steps, checkpointing_steps=1000,
                           report_to="none", mixed_precision="no")
    return TrainingRun(opts, micro_batch_size=1)


def test_terms_are_read_once_per_logging_step(tmp_path, host_reads):
    run = make_run(tmp_path, logging_steps=5)
    reads_per_step = []
    for step in range(1, 11):
        before = len(host_reads)
        loss = torch.tensor(float(step))
        run.end_step({"loss": loss, "grad_norm": loss * 2}, samples=4, tokens=torch.tensor(7))
        reads_per_step.append(len(host_reads) - before)
    assert [n == 0 for n in reads_per_step] == [step % 5 != 0 for step in range(1, 11)], reads_per_step
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in logged] == [(5, 3.0, 6.0), (10, 8.0, 16.0)]
    assert logged[0]["samples_per_s"] > 0


def test_a_nan_between_logging_steps_stops_naming_its_step(tmp_path):
    run = make_run(tmp_path, logging_steps=5)
    for step in (1, 2):
        run.end_step({"loss": torch.tensor(1.0)}, samples=1)
    run.end_step({"loss": torch.tensor(float("nan")), "vq": torch.tensor(0.5)}, samples=1)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3: loss=nan, vq=0\.5; no checkpoint"):
        for _ in range(2):
            run.end_step({"loss": torch.tensor(1.0)}, samples=1)


@pytest.mark.parametrize(("dead_code_steps", "reads_per_step"), [(0, 0), (1, 1)])
def test_a_quantizer_training_step_reads_at_most_one_value(host_reads, dead_code_steps, reads_per_step):
    """After the first step (codebook initialised from data), a quantizer step reads nothing from the device;
    one restarting dead codes reads their count."""
    from omniflow.models.vq.quantizers import VectorQuantizer

    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 4, dead_code_steps=dead_code_steps, restart_pool=32, init_from_data=True).train()
    quantizer(torch.randn(2, 4, 3, 3))
    before = len(host_reads)
    for _ in range(3):
        quantizer(torch.randn(2, 4, 3, 3))
    assert len(host_reads) - before == 3 * reads_per_step, host_reads[before:]
    quantizer.load_state_dict(quantizer.state_dict())  # a load forgets the host copies: read once more, right
    assert quantizer._initialized_on_host is None and quantizer._pool_rows_on_host is None
    quantizer(torch.randn(2, 4, 3, 3))
    assert quantizer._pool_rows_on_host == int(quantizer.pool_filled) == 32
