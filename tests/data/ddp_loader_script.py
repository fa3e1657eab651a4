"""Run by tests/data/test_distributed_data.py under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Each rank builds its loader from RANK/WORLD_SIZE, streams two epochs with an all_reduce per batch (as DDP would:
unequal batch counts would hang here), checks that the ranks' samples of an epoch are disjoint and together
cover the shard set, and that a loader resumed from a mid-epoch state continues exactly. Rank 0 writes a JSON
report to the path given as the second argument.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

from data_pipeline.data_config import BucketConfig, DataConfig
from data_pipeline.loader import build_loader


def main() -> None:
    shard_dir, report = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    cfg = DataConfig(urls=shard_dir, resolution=16, batch_size=2, num_workers=1, shuffle_buffer=4,
                     buckets=BucketConfig(enabled=True, step=8, max_aspect=2.5))
    loader = build_loader(cfg, rank=rank, world_size=world)
    epochs = []
    for _ in range(2):
        keys = []
        for batch in loader:
            t = torch.ones(1)
            dist.all_reduce(t)  # every rank must reach every step
            keys.append(list(batch.keys))
        epochs.append(keys)
    # resume: 3 batches, save, a new loader continues; compare with the uninterrupted sequence
    a = build_loader(cfg, rank=rank, world_size=world)
    head = [b.keys for _, b in zip(range(3), a)]
    b = build_loader(cfg, rank=rank, world_size=world)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    tail = [x.keys for x in b]
    tail += [x.keys for x in b]
    resumed_ok = head + tail == epochs[0] + epochs[1]
    gathered = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "epochs": epochs, "resumed_ok": resumed_ok,
                                      "batches_per_epoch": loader.batches_per_epoch, "stats": loader.stats()})
    if rank == 0:
        with open(report, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
