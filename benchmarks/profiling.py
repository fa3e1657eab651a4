"""The benchmarks' shared ``--profile`` helper: torch.profiler around a block, then its top operators."""

from __future__ import annotations

import contextlib
from typing import Iterator


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
