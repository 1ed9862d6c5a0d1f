"""What a run logs: gradient norms before clipping, values derived from averaged terms, a progress bar
that does not flood a log file. Driven through the tests/assets training job."""
import math

import pytest

from runtime_helpers import metrics, train

pytestmark = pytest.mark.slow


def test_derived_values_come_from_the_averaged_terms(tmp_path):
    train(tmp_path, "--logging_steps", "4")
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert all(r["rmse"] == pytest.approx(math.sqrt(r["loss"]), rel=1e-12) for r in rows)


def test_the_gradient_norm_is_logged_before_clipping_and_per_optimizer_step(tmp_path):
    once, accumulated, clipped = tmp_path / "once", tmp_path / "accumulated", tmp_path / "clipped"
    train(once, "--dropout", "0", "--batch_size", "16", "--max_train_steps", "1")
    train(accumulated, "--dropout", "0", "--batch_size", "8", "--gradient_accumulation_steps", "2",
          "--max_train_steps", "1")
    train(clipped, "--dropout", "0", "--batch_size", "16", "--max_train_steps", "1", "--max_grad_norm", "1e-3")
    norm = metrics(once)[0]["grad_norm"]
    assert norm > 1e-3  # so that the clipped run did clip
    # two half-batches accumulate to the same gradient as one batch; clipping does not change the logged norm
    assert metrics(accumulated)[0]["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert metrics(clipped)[0]["grad_norm"] == pytest.approx(norm, rel=1e-6)


def test_a_log_file_gets_a_few_progress_lines_not_one_per_step(tmp_path):
    result = train(tmp_path, "--max_train_steps", "40")  # stderr is a pipe, as in a batch job's log
    bar_updates = result.stderr.replace("\r", "\n").count("train:")
    assert 1 <= bar_updates <= 3, result.stderr[-2000:]
