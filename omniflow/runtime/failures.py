"""A rank that fails stops the others within seconds, and their one line names it.

A collective notices a dead peer only when its socket closes (gloo) or when it times out (NCCL: ``--ddp_timeout``,
after which the watchdog aborts the process without a word). So a rank whose code raises first writes
"rank R (node N, host H) failed after step S: Type: message" into the job's rendezvous store (the TCPStore that
``accelerate launch``/torchrun keeps on node 0 at MASTER_ADDR:MASTER_PORT), under a key of its own and under every
rank's key; each rank keeps one blocking wait on its key in a thread (no polling), which it releases itself at
exit. When another rank's report arrives, a rank whose own code has not failed
within a few seconds (it is blocked in a collective, or busy alone) prints one line naming the failed rank and the
last complete checkpoint, and exits with status 1; one whose collective failed prints the same line. A rank that
dies without a word (killed, its node lost) is noticed by the collectives; that line then says no rank reported.
"""
from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch

from . import errors
from .checkpoint import list_checkpoints, node_of

logger = logging.getLogger("omniflow")

FAILURE_KEY = "omniflow/failure"  # the first report; each rank's watch waits on FAILURE_KEY/<rank>
FINISHED = "finished"  # what a rank writes under its own key at exit, to release its watch
GRACE_SECONDS = 5.0  # how long a rank's own code may take to fail too before the watch stops it


class FailureWatch:
    """Report this rank's failure to the others and stop when another rank reports one (see the module)."""

    def __init__(self, accelerator, output_dir: Path, step: Callable[[], int], timeout_s: int):
        node, _, _ = node_of(accelerator)
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        self.name = f"rank {self.rank} (node {node}, host {socket.gethostname()})"
        self.output_dir, self.step, self.timeout_s = Path(output_dir), step, timeout_s
        address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        timeout = timedelta(seconds=30)
        self._store = torch.distributed.TCPStore(address, port, is_master=False, timeout=timeout)
        waiting = torch.distributed.TCPStore(address, port, is_master=False, timeout=timeout)  # its own socket
        self._own_failure = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(waiting,), daemon=True, name="omniflow-failure-watch")
        self._thread.start()
        errors.add_error_hook(self.on_error)
        # A thread still inside the store's C++ wait when the interpreter exits aborts the process.
        atexit.register(self.stop)

    @classmethod
    def start(cls, accelerator, output_dir: Path, step: Callable[[], int], timeout_s: int) -> FailureWatch | None:
        """A watch for a run of several processes started by a launcher that set MASTER_ADDR/MASTER_PORT."""
        if accelerator.num_processes == 1 or not {"MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys():
            return None
        return cls(accelerator, output_dir, step, timeout_s)

    def stop(self) -> None:
        """Release this rank's watch and wait for its thread to end."""
        try:
            self._store.set(self._key(self.rank), FINISHED)
        except Exception:  # the store is gone, and the wait with it
            pass
        self._thread.join(timeout=10)

    def on_error(self, err: BaseException) -> str | None:
        """Called by :func:`errors.run_main` with this rank's exception: the line to stop with when the exception
        is a collective that failed because of another rank; None after reporting this rank's own failure."""
        self._own_failure.set()
        if _is_collective_failure(err):
            # the failed rank reported before it exited, which is what broke this collective: a moment suffices
            return self._stop_line(self._other_report(wait_s=1.0), err)
        report = f"{self.name} failed after step {self.step()}: {type(err).__name__}: {_first_line(err)}"
        try:
            first = self._store.compare_set(FAILURE_KEY, "", report).decode()  # the first report stays
            self._store.multi_set([self._key(rank) for rank in range(self.world_size)], [first] * self.world_size)
        except Exception:  # the store is gone (node 0's launcher ended): the collectives tell the others
            pass
        return None

    # -- internals ------------------------------------------------------------------------------
    def _watch(self, waiting) -> None:
        try:
            waiting.wait([self._key(self.rank)], timedelta(days=365))
            report = waiting.get(self._key(self.rank)).decode()
        except Exception:  # the store closed: node 0's launcher ended, or this process is exiting
            return
        if report == FINISHED or self._is_own(report) or self._own_failure.wait(GRACE_SECONDS):
            return  # nothing failed, or this rank's own failure, reported by run_main
        line = self._stop_line(report, None)
        logger.debug(line)
        print(line, file=sys.stderr, flush=True)
        os._exit(1)  # the main thread may be blocked in a collective that only a timeout would end

    def _other_report(self, wait_s: float) -> str | None:
        deadline = time.monotonic() + wait_s
        try:  # checks, not a wait: a store wait that times out warns on stderr
            while not self._store.check([FAILURE_KEY]):
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.05)
            report = self._store.get(FAILURE_KEY).decode()
        except Exception:  # the store is gone
            return None
        return None if self._is_own(report) else report

    def _is_own(self, report: str) -> bool:
        return report.startswith(f"{self.name} ")

    @staticmethod
    def _key(rank: int) -> str:
        return f"{FAILURE_KEY}/{rank}"

    def _stop_line(self, report: str | None, err: BaseException | None) -> str:
        kept = list_checkpoints(self.output_dir)
        resume = (f"the last complete checkpoint is {kept[-1]} (--resume_from_checkpoint latest)" if kept
                  else f"no checkpoint was saved in {self.output_dir}")
        if report is not None:
            return f"error: {report}; {self.name} stopped with it after step {self.step()}; {resume}"
        return (f"error: {self.name} stopped after step {self.step()}: a collective with the other ranks failed "
                f"({_first_line(err) or type(err).__name__}); no rank reported an error: one died, hangs or lost its "
                f"node (collectives wait --ddp_timeout {self.timeout_s} s); {resume}")


def _is_collective_failure(err: BaseException) -> bool:
    """torch.distributed's errors, and gloo's, which reach Python as a RuntimeError naming gloo's source."""
    return isinstance(err, torch.distributed.DistError) or (isinstance(err, RuntimeError) and "gloo" in str(err))


def _first_line(err: BaseException) -> str:
    return next(iter(str(err).strip().splitlines()), "")
