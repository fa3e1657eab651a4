"""``python -m fault_entry <loom args>``: ``loom`` with a fault injected into the diffusion stage, for the fault tests.

The launch scripts run it instead of ``launch`` (``TRAIN_MODULE=fault_entry``, with this folder on PYTHONPATH). The
fault is set by environment variables and hits one rank at its k-th training micro-batch (the k-th call of
``DiffusionStage.loss`` in that process; validation does not count):

* ``LOOM_FAULT_RANK``: the rank (``RANK``) that misbehaves; unset: no fault, plain ``loom``;
* ``LOOM_FAULT_AT``: k (default 3);
* ``LOOM_FAULT_KIND``: ``raise`` (a RuntimeError: the rank dies), ``hang`` (the rank sleeps
  ``LOOM_FAULT_HANG_S`` seconds, default 600: stuck, not dead, so only a collective timeout ends the job) or
  ``stall`` (the rank's data loader sleeps that long while forming its k-th batch, in the DataLoader worker when
  there is one: k counts that process's batches);
* ``LOOM_FAULT_ONCE``: a file path; the fault fires only while it does not exist and creates it, so a restarted
  worker group runs clean (an elastic restart after a crash).

``LOOM_STEP_SLEEP_S`` (every rank, every micro-batch) slows training down without changing any number, so that a
test's signal surely lands mid-training.
"""

from __future__ import annotations

import os
import sys
import time


def install() -> None:
    rank = os.environ.get("LOOM_FAULT_RANK")
    pause = float(os.environ.get("LOOM_STEP_SLEEP_S", "0"))
    faulty = rank is not None and os.environ.get("RANK", "0") == rank
    if not faulty and not pause:
        return
    at = int(os.environ.get("LOOM_FAULT_AT", "3"))
    kind = os.environ.get("LOOM_FAULT_KIND", "raise")
    once = os.environ.get("LOOM_FAULT_ONCE")

    if faulty and kind == "stall":
        _stall_loader(rank, at, float(os.environ.get("LOOM_FAULT_HANG_S", "600")))
        faulty = False
        if not pause:
            return

    from training.stages.diffusion import DiffusionStage

    original = DiffusionStage.loss
    calls = 0

    def loss(self, model, batch):
        nonlocal calls
        calls += 1
        time.sleep(pause)
        if faulty and calls == at and not (once and os.path.exists(once)):
            if once:
                open(once, "w").close()
            if kind == "hang":
                print(f"fault_entry: rank {rank} hangs at micro-batch {at}", file=sys.stderr, flush=True)
                time.sleep(float(os.environ.get("LOOM_FAULT_HANG_S", "600")))
            else:
                raise RuntimeError(f"injected fault on rank {rank} at micro-batch {at}")
        return original(self, model, batch)

    DiffusionStage.loss = loss


def _stall_loader(rank: str, at: int, seconds: float) -> None:
    from data_pipeline.worker import WorkerPipeline

    original = WorkerPipeline.next_batch
    calls = 0

    def next_batch(self):
        nonlocal calls
        calls += 1
        if calls == at:
            print(f"fault_entry: rank {rank}'s loader stalls at batch {at} (pid {os.getpid()})", file=sys.stderr,
                  flush=True)
            time.sleep(seconds)
        return original(self)

    WorkerPipeline.next_batch = next_batch


if __name__ == "__main__":
    install()
    from launch.cli import main

    sys.exit(main())
