"""DataLoader workers and the stop signals, in one process (the whole-job runs are in test_faults.py): a worker
ignores SIGTERM and SIGUSR1 (the main process decides), dies with its main process, a stuck one is still ended when
its loader closes, and a process that exits with a loader still open does not wait for its workers for ever."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from functools import partial

import pytest
from harness import alive
from torch.utils.data import DataLoader, IterableDataset

from data_pipeline.loader import _close_workers, _worker_init

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc: Linux")


class _Pids(IterableDataset):
    """Yields its worker's pid, slowly, for ever."""

    def __iter__(self):
        while True:
            yield os.getpid()
            time.sleep(0.05)


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def test_worker_ignores_stop_signals():
    loader = DataLoader(_Pids(), batch_size=None, num_workers=1, worker_init_fn=partial(_worker_init, os.getpid()))
    it = iter(loader)
    worker = next(it)
    assert worker != os.getpid()
    for sig in ("TERM", "USR1"):  # what SLURM sends every process of the job (scancel, pre-emption)
        subprocess.run(["kill", f"-{sig}", str(worker)], check=True)
    time.sleep(0.5)
    assert alive(worker)
    assert [next(it) for _ in range(3)] == [worker] * 3  # and it keeps delivering
    _close_workers(it)
    assert _gone(worker)


class _Stuck(IterableDataset):
    """Yields its worker's pid, then hangs (a read that never returns)."""

    def __iter__(self):
        yield os.getpid()
        time.sleep(600)


def test_a_stuck_worker_is_ended_when_its_loader_closes():
    it = iter(DataLoader(_Stuck(), batch_size=None, num_workers=1, worker_init_fn=partial(_worker_init, os.getpid())))
    worker = next(it)
    t0 = time.monotonic()
    _close_workers(it)  # the DataLoader's SIGTERM no longer ends it: SIGKILL after the DataLoader's own wait
    assert not alive(worker) and time.monotonic() - t0 < 15


def test_exit_with_an_open_loader_does_not_wait_for_its_workers():
    """The process ends (here: an error while a loader is open, as on a rank whose collective timed out) and its
    workers are idle or stuck: it exits at once instead of waiting for them in multiprocessing's exit handler."""
    script = textwrap.dedent(f"""
        import os, sys
        from functools import partial
        sys.path[:0] = {[os.path.dirname(__file__)]!r}
        from torch.utils.data import DataLoader
        from data_pipeline.loader import _OPEN_WORKER_ITERATORS, _worker_init
        from test_worker_signals import _Pids, _Stuck
        kept = []
        for ds in (_Pids(), _Stuck()):
            it = iter(DataLoader(ds, batch_size=None, num_workers=1, worker_init_fn=partial(_worker_init, os.getpid())))
            _OPEN_WORKER_ITERATORS.add(it)
            kept.append(it)
            print(next(it), flush=True)
        raise RuntimeError("collective timed out")
    """)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "collective timed out" in proc.stderr, proc.stderr[-2000:]
    assert "killed by signal" not in proc.stderr, proc.stderr[-2000:]
    workers = [int(x) for x in proc.stdout.split()]
    assert len(workers) == 2 and all(_gone(w) for w in workers)
    assert time.monotonic() - t0 < 30


def test_worker_dies_with_its_main_process(tmp_path):
    """SIGKILL to the main process (nothing of it runs any more): its worker does not outlive it."""
    script = textwrap.dedent(f"""
        import os, sys, time
        from functools import partial
        sys.path[:0] = {[os.path.dirname(__file__)]!r}
        from torch.utils.data import DataLoader
        from data_pipeline.loader import _close_workers, _worker_init
        from test_worker_signals import _Pids
        it = iter(DataLoader(_Pids(), batch_size=None, num_workers=1,
                             worker_init_fn=partial(_worker_init, os.getpid())))
        print(next(it), flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        worker = int(proc.stdout.readline())
        assert alive(worker)
        proc.kill()
        proc.wait()
        assert _gone(worker), "the DataLoader worker outlived its main process"
    finally:
        if proc.poll() is None:
            proc.kill()
