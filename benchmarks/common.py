"""What the benchmarks share: synthetic cached-latent batches, an in-memory loader, and the ``--profile`` helper."""

from __future__ import annotations

import contextlib
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


class MemoryLoader:
    """The same pre-built batches, cycled, with a position (checkpointed) and the batch size (read by the trainer)."""

    def __init__(self, batches: list):
        self.batches, self.pos = batches, 0
        self.batch_size = len(batches[0])

    def __iter__(self):
        while True:
            b = self.batches[self.pos % len(self.batches)]
            self.pos += 1
            yield b

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, sd: dict) -> None:
        self.pos = sd["pos"]


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
