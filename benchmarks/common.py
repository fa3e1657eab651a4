"""What the benchmarks share: synthetic cached-latent batches (trained through
:class:`data_pipeline.memory.InMemoryLoader`), the ``--profile`` helper, and ``loom train`` as a timed child
process (:func:`loom_train`)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch


def make_batches(text: Any, n: int, batch: int, generator: torch.Generator, side: int = 8) -> list:
    """``n`` cached-latent batches of ``batch`` samples: posterior moments (random mean ‖ log-variance −4) of
    ``4 × side × side`` latents and the text states of one caption per sample."""
    from data_pipeline.batch import Batch

    words = ["zero", "one", "two", "three"]
    out = []
    for i in range(n):
        cond = text.encode([f"a handwritten digit {words[j % 4]}" for j in range(batch)])
        moments = torch.cat([torch.randn(batch, 4, side, side, generator=generator),
                             torch.full((batch, 4, side, side), -4.0)], dim=1)  # (B, 8, h, w)
        zeros = torch.zeros(batch, 2, dtype=torch.long)
        out.append(Batch(pixels=None, captions=[""] * batch, keys=[str(i)] * batch, metadata=[{}] * batch,
                         original_size=zeros, crop_top_left=zeros, target_size=zeros, latents=moments,
                         extras={"context": cond.context, "context_mask": cond.context_mask.to(torch.uint8),
                                 "pooled": cond.pooled}))
    return out


@contextlib.contextmanager
def profiled(enabled: bool, label: str, cuda: bool, rows: int = 15) -> Iterator[None]:
    """Profile the block when ``enabled`` (else do nothing); afterwards print the top ``rows`` operators by GPU time
    (with ``cuda``) and by CPU time. Profiling inflates the block's own timings."""
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        yield
    table = prof.key_averages()
    print(f"\n### profile: {label}")
    if cuda:
        print(table.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60))
    print(table.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60), flush=True)


EPOCHS = 3  # epochs per timed loader run with worker processes (persistent: one start-up; restarted: one each)


def loader_epoch(loader, restart: bool):
    """One epoch of ``loader``; ``restart``: its worker processes are closed at the end (started again by the
    next epoch, as the loader did before its workers were persistent)."""
    yield from loader
    if restart:
        loader.close()


def loom_train(args: list[str], threads: int, cwd: Path) -> float:
    """``loom train ARGS`` in a fresh process with ``threads`` torch threads; its wall seconds. A failed run raises
    with the command and the end of its stderr."""
    cmd = [sys.executable, "-m", "launch", "train", *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start
