"""Splitting over ranks and workers: disjoint, complete, equal batch counts; and a real 2-process gloo run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from shardmaker import make_shards, sample, write_shardset  # noqa: E402

from data_pipeline.data_config import BucketConfig, DataConfig  # noqa: E402
from data_pipeline.loader import build_loader  # noqa: E402
from data_pipeline.shardlists import shard_order, slot_samples, slot_share  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SIZES = [(24, 32), (32, 24), (32, 32), (16, 40)]


def rank_epochs(cfg: DataConfig, world: int, epochs: int) -> list[list[list[str]]]:
    """``out[epoch][rank]`` = that rank's keys in that epoch (each rank its own loader, as in DDP)."""
    loaders = [build_loader(cfg, rank=r, world_size=world) for r in range(world)]
    out = []
    for _ in range(epochs):
        per_rank = []
        for loader in loaders:
            batches = list(loader)
            assert len(batches) == loader.batches_per_epoch  # same count on every rank, every epoch
            per_rank.append([k for b in batches for k in b.keys])
        out.append(per_rank)
    return out


def test_slot_shares_partition_the_shards():
    for n_shards, slots in [(12, 6), (13, 4), (3, 4), (1, 2)]:
        order = shard_order(n_shards, seed=1, source=0, pass_=2, shuffle=True)
        assert sorted(order) == list(range(n_shards))
        shares = [slot_share(order, s, slots) for s in range(slots)]
        if n_shards >= slots:
            flat = [i for sh, modulo in shares for i in sh]
            assert sorted(flat) == list(range(n_shards)) and not any(m for _, m in shares)
        else:  # every slot reads all shards and keeps every slots-th sample
            assert all(m and sorted(sh) == list(range(n_shards)) for sh, m in shares)
            counts = [5] * n_shards
            assert sum(slot_samples(counts, sh, m, s, slots) for s, (sh, m) in enumerate(shares)) == 5 * n_shards
    assert shard_order(10, 1, 0, 0, True) != shard_order(10, 1, 0, 1, True)  # reshuffled every pass
    assert shard_order(10, 1, 0, 0, False) == list(range(10))


def test_ranks_and_workers_read_disjoint_complete_sets(tmp_path):
    make_shards(tmp_path, n_shards=12, per_shard=5)
    cfg = DataConfig(urls=str(tmp_path), resolution=8, batch_size=2, num_workers=2, shuffle_buffer=3)
    everything = {f"shard{i:05d}" for i in range(60)}
    for epoch in rank_epochs(cfg, world=3, epochs=2):
        flat = [k for keys in epoch for k in keys]
        assert len(flat) == len(set(flat)) == 60 and set(flat) == everything


def test_fewer_shards_than_slots_split_by_sample(tmp_path):
    make_shards(tmp_path, n_shards=3, per_shard=8)
    cfg = DataConfig(urls=str(tmp_path), resolution=8, batch_size=3, num_workers=2, shuffle_buffer=0)
    loader = build_loader(cfg, rank=0, world_size=2)
    assert "keeps every 4-th sample" in loader.describe()
    for epoch in rank_epochs(cfg, world=2, epochs=2):
        flat = [k for keys in epoch for k in keys]
        assert len(flat) == len(set(flat)) == 24  # 4 slots x 6 samples: all of them, none twice


def test_uneven_shards_equal_batches_and_no_cross_rank_overlap(tmp_path):
    shards = []
    for s, n in enumerate([9, 3, 7, 5, 11]):  # 35 samples in shards of unequal size
        shards.append([(f"u{s}{i:02d}", sample(f"u{s}{i:02d}", *SIZES[i % 4], seed=i)) for i in range(n)])
    write_shardset(tmp_path, "u", shards)
    cfg = DataConfig(urls=str(tmp_path), resolution=16, batch_size=2, num_workers=0, shuffle_buffer=4,
                     buckets=BucketConfig(enabled=True, step=8, max_aspect=2.5))
    assert build_loader(cfg, 0, 2).batches_per_epoch == 8  # 35 // (2 * 2)
    for epoch in rank_epochs(cfg, world=2, epochs=3):
        assert all(len(keys) == 16 for keys in epoch)
        assert not set(epoch[0]) & set(epoch[1])  # a rank that runs short re-reads its own shards only


@pytest.mark.distributed
def test_two_processes_with_torchrun(tmp_path):
    make_shards(tmp_path / "shards", n_shards=6, per_shard=6, size=lambda i: SIZES[i % 4])
    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).with_name("ddp_loader_script.py")), str(tmp_path / "shards"), str(report)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads(report.read_text())
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["resumed_ok"] for r in ranks)
    assert ranks[0]["batches_per_epoch"] == ranks[1]["batches_per_epoch"] == 9  # 36 // (2 * 2)
    for e in range(2):
        k0 = [k for b in ranks[0]["epochs"][e] for k in b]
        k1 = [k for b in ranks[1]["epochs"][e] for k in b]
        assert len(k0) == len(k1) == 18 and not set(k0) & set(k1)
        assert len(set(k0) | set(k1)) == 36  # even split: every sample once per epoch
