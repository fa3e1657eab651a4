"""``loom data``: stream a few batches and print what the pipeline will do.

    loom data data.urls='data/demo/train-{000000..000001}.tar' preview_batches=4
    loom data --config quickstart --dry-run

Prints the loader's plan (:meth:`StreamingLoader.describe`), streams ``preview_batches`` batches with a progress
bar (per batch: shape, bucket, first keys and captions), then throughput and the skip/drop counts, and saves a
grid of the first batch as ``<run.output_dir>/<run.name>/preview.png``. The data order seed is
``run.seed + data.seed``, as in training.
"""

from __future__ import annotations

import itertools
import sys
import time
from typing import Iterator

from data_pipeline.batch import Batch
from data_pipeline.errors import DataError
from data_pipeline.loader import StreamingLoader, build_loader
from data_pipeline.stats import format_counts
from launch.commands import Command
from training.evaluation import save_grid
from training.run_config import RunConfig


def _loader(cfg: RunConfig) -> StreamingLoader:
    return build_loader(cfg.data, rank=0, world_size=1, seed=cfg.run.seed)


def plan(cfg: RunConfig) -> str:
    """The loader's plan (resolves the shard patterns and reads the shard indexes; decodes nothing)."""
    try:
        return _loader(cfg).describe()
    except DataError as e:
        return f"data: {e}"


def _endless(loader: StreamingLoader) -> Iterator[Batch]:
    while True:
        got = False
        for batch in loader:
            got = True
            yield batch
        if not got:
            return


def run(cfg: RunConfig) -> int:
    """Stream the preview batches; exit code 1 when the data cannot be streamed."""
    from tqdm import tqdm

    try:
        loader = _loader(cfg)
    except (DataError, ValueError) as e:
        print(f"loom data: {e}", file=sys.stderr)
        return 1
    print(loader.describe())
    out_dir = cfg.run.directory
    out_dir.mkdir(parents=True, exist_ok=True)
    n, samples, first = cfg.preview_batches, 0, None
    lines = []
    t0 = time.perf_counter()
    try:
        with tqdm(total=n, unit="batch", desc="loom data", file=sys.stderr) as bar:
            for i, batch in enumerate(itertools.islice(_endless(loader), n)):
                if first is None:
                    first = batch
                samples += len(batch)
                shape = "none" if batch.pixels is None else "x".join(map(str, batch.pixels.shape))
                h, w = batch.target_size[0].tolist()
                caps = " | ".join(c[:60] for c in batch.captions[:2])
                lines.append(f"batch {i}: pixels {shape}, bucket {h}x{w}, keys {batch.keys[:2]}, captions: {caps}")
                bar.update(1)
    except DataError as e:
        print(f"loom data: {e}", file=sys.stderr)
        return 1
    dt = time.perf_counter() - t0
    print("\n".join(lines))
    st = loader.stats()
    print(f"streamed {samples} samples in {len(lines)} batches in {dt:.2f}s ({samples / max(dt, 1e-9):.1f} "
          f"samples/s, including worker start-up)")
    print(f"skipped: {format_counts(st['skipped'])}; dropped: {format_counts(st['dropped'])}"
          + (f"; buckets: {st['buckets']}" if st["buckets"] else ""))
    if first is not None and first.pixels is not None:
        path = out_dir / "preview.png"
        save_grid(first.pixels, path)  # clips: one row of frames per clip
        print(f"preview of the first batch: {path}")
    if first is None:
        print("loom data: no batch could be streamed", file=sys.stderr)
        return 1
    return 0


COMMAND = Command(name="data", config_cls=RunConfig, run=run, plan=plan)
