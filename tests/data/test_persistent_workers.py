"""Persistent DataLoader workers: the same processes serve every epoch, the request schedule keeps a fresh start's
order (so an epoch boundary stays an ordinary resume), and a consumer leaving an epoch half-way loses nothing."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from shardmaker import make_shards  # noqa: E402

from data_pipeline.data_config import DataConfig  # noqa: E402
from data_pipeline.loader import _Schedule, build_loader  # noqa: E402


def test_schedule_pads_with_idle_requests_to_keep_the_fresh_start_order():
    """Quotas (3, 1) on 2 workers: a fresh start gives 0, 1, 0, 0 each epoch (worker 1 done after one batch), every
    epoch from worker 0; request k must go to process k mod 2."""
    schedule = iter(_Schedule(lambda epoch: [3, 1], 2, epoch=0, consumed=[0, 0], due=0, rotation=0))
    requests = [next(schedule) for _ in range(12)]
    assert requests[:6] == [(0, 0), (0, 1), (0, 0), (0, -1), (0, 0), (1, -1)]
    for k, (_, w) in enumerate(requests):
        assert w in (-1, k % 2)
    real = [(e, w) for e, w in requests if w >= 0]
    assert real[:8] == [(0, 0), (0, 1), (0, 0), (0, 0), (1, 0), (1, 1), (1, 0), (1, 0)]
    # resumed mid-epoch with worker 1 due: process 0 now serves logical worker 1
    resumed = iter(_Schedule(lambda epoch: [3, 1], 2, epoch=0, consumed=[1, 0], due=1, rotation=1))
    assert [next(resumed) for _ in range(4)] == [(0, 1), (0, 0), (0, -1), (0, 0)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("persistent")
    make_shards(d / "a", prefix="a", n_shards=3, per_shard=7, size=lambda i: (16, 16))
    return d / "a"


def _keys(batch) -> tuple:
    return tuple(batch.keys)


def test_workers_live_across_epochs_and_a_left_epoch_restarts_exactly(shards):
    cfg = DataConfig(urls=str(shards), resolution=16, batch_size=2, num_workers=2, shuffle_buffer=4, seed=1)
    loader = build_loader(cfg)
    n = loader.batches_per_epoch
    epochs, pids = [], []
    for _ in range(3):
        epochs.append([_keys(b) for b in loader])
        pids.append(sorted(w.pid for w in loader._stream._workers))
    assert all(len(e) == n for e in epochs) and epochs[0] != epochs[1]
    assert pids[0] == pids[1] == pids[2]  # no restart at the epoch boundaries
    loader.close()

    again = build_loader(cfg)  # the same run, leaving each epoch half-way once (the workers restart from the states)
    seen = []
    for _ in range(3):
        it = iter(again)
        for i, b in enumerate(it):
            seen.append(_keys(b))
            if i == n // 2 and len(seen) < 2 * n:
                break
        else:
            continue
        it.close()  # the consumer leaves: workers closed, position kept
        assert again._stream is None
        seen.extend(_keys(b) for b in again)
    assert seen == [k for e in epochs for k in e]
    again.close()
