"""Exact resume: k batches, state_dict, a new loader, load_state_dict, continue == one uninterrupted run."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from shardmaker import make_shards  # noqa: E402

from data_pipeline.data_config import BucketConfig, DataConfig, SourceConfig  # noqa: E402
from data_pipeline.errors import DataError  # noqa: E402
from data_pipeline.loader import build_loader  # noqa: E402

SIZES = [(24, 32), (32, 24), (32, 32), (16, 40), (40, 16), (28, 28)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    make_shards(d / "a", prefix="a", n_shards=5, per_shard=7, size=lambda i: SIZES[i % len(SIZES)])
    make_shards(d / "b", prefix="b", n_shards=3, per_shard=5, size=lambda i: SIZES[(i + 1) % len(SIZES)])
    make_shards(d / "noindex", prefix="n", n_shards=3, per_shard=6, index=False)
    return d


def take(loader, n: int) -> list[tuple]:
    """``n`` batches across epochs: (keys, bucket size, pixel checksum) each."""
    out = []
    while len(out) < n:
        got = False
        for b in loader:
            got = True
            x = b.pixels if b.pixels is not None else b.latents
            out.append((tuple(b.keys), tuple(x.shape[-2:]), round(float(x.double().sum()), 3)))
            if len(out) == n:
                break
        assert got, "an epoch yielded nothing"
    return out


def check_resume(cfg: DataConfig, total: int, cuts: list[int], rank: int = 0, world_size: int = 1) -> list:
    reference = take(build_loader(cfg, rank, world_size), total)
    for k in cuts:
        first = build_loader(cfg, rank, world_size)
        head = take(first, k)
        state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
        assert len(json.dumps(state)) < 20_000
        second = build_loader(cfg, rank, world_size)
        second.load_state_dict(state)
        tail = take(second, total - k)
        assert head + tail == reference, f"resume after {k} batches diverged"
        assert second.stats()["samples"] == first.stats()["samples"] + sum(len(t[0]) for t in tail)
    return reference


def base(data, **kw) -> DataConfig:
    d = dict(urls=str(data / "a"), resolution=32, batch_size=3, num_workers=0, shuffle_buffer=6, crop="random",
             flip=True)
    d.update(kw)
    return DataConfig(**d)


BUCKETS = BucketConfig(enabled=True, step=8, max_aspect=2.5)


@pytest.mark.parametrize("name, kw, cuts", [
    ("shuffle", {}, [1, 5, 11, 13]),  # 11 batches per epoch: cut at and across the epoch boundary
    ("buckets", {"buckets": BUCKETS}, [2, 11, 14]),
    ("no-shuffle", {"shuffle_buffer": 0, "shard_shuffle": False}, [4, 12]),
])
def test_resume_in_process(data, name, kw, cuts):
    cfg = base(data, **kw)
    assert build_loader(cfg).batches_per_epoch == 11
    ref = check_resume(cfg, 25, cuts)
    keys = [k for b in ref[:11] for k in b[0]]
    assert len(keys) == len(set(keys)) == 33  # an epoch reads no sample twice


@pytest.mark.parametrize("name, kw", [
    ("shuffle", {}),
    ("buckets", {"buckets": BUCKETS}),
])
def test_resume_with_two_workers(data, name, kw):
    cfg = base(data, num_workers=2, **kw)
    loader = build_loader(cfg)
    assert loader.quotas(0) == [7, 4] and loader.batches_per_epoch == 11  # 3 and 2 shards per worker
    check_resume(cfg, 14, [3, 12])  # 3: worker 1 is due (processes rotated); 12: inside the second epoch


def test_resume_nominal_modes(data):
    mixed = base(data, urls="", sources=[SourceConfig(urls=str(data / "a"), weight=2.0),
                                         SourceConfig(urls=str(data / "b"), weight=1.0)], buckets=BUCKETS)
    assert build_loader(mixed).mode == "nominal" and build_loader(mixed).batches_per_epoch == 16
    check_resume(mixed, 20, [7, 17])
    resampled = base(data, resampled=True, epoch_samples=30, num_workers=2)
    check_resume(resampled, 13, [4, 11])


def test_resume_until_exhaustion(data):
    cfg = base(data, urls=str(data / "noindex"), batch_size=4, num_workers=2, shuffle_buffer=4)
    loader = build_loader(cfg)
    sizes = [len(b) for b in loader]
    assert loader.mode == "exhaust" and sum(sizes) == 18
    check_resume(cfg, 2 * len(sizes), [2, len(sizes), len(sizes) + 1])


def test_state_with_bucket_indices_still_resumes(data):
    """States written before buckets were keyed by shape held bucket positions; they resume the same way."""
    from data_pipeline.buckets import BucketSet, make_buckets

    cfg = base(data, buckets=BUCKETS)
    order = BucketSet(make_buckets(32, 8, 2.5)).order
    reference = take(build_loader(cfg), 14)
    first = build_loader(cfg)
    head = take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    (worker,) = state["workers"]
    assert worker["queues"] and all(len(k) == 2 for k, _ in worker["queues"])  # saved as [h, w] shapes
    worker["queues"] = [[order[tuple(k)], refs] for k, refs in worker["queues"]]
    worker["ready"] = [[order[tuple(b)], refs] for b, refs in worker["ready"]]
    second = build_loader(cfg)
    second.load_state_dict(state)
    assert head + take(second, 9) == reference


def test_resume_latents_only_shape_queues(tmp_path):
    import numpy as np
    from shardmaker import npy_bytes, write_shardset

    shards = [[(f"l{s}{j}", {"latent.npy": npy_bytes(np.full([(2, 4, 6), (2, 6, 4)][(s + j) % 2], s * 10 + j,
                                                              np.float32)), "txt": b"x"}) for j in range(5)]
              for s in range(3)]
    write_shardset(tmp_path, "l", shards)
    cfg = DataConfig(urls=str(tmp_path), image_keys=[], batch_size=2, num_workers=0, shuffle_buffer=3)
    check_resume(cfg, 12, [3, 8])


def test_states_of_zero_and_one_worker_are_interchangeable(data):
    cfg0 = base(data, buckets=BUCKETS)
    cfg1 = base(data, buckets=BUCKETS, num_workers=1)
    ref = take(build_loader(cfg0), 15)
    a = build_loader(cfg0)
    head = take(a, 6)
    b = build_loader(cfg1)
    b.load_state_dict(a.state_dict())
    assert head + take(b, 9) == ref


def test_mismatched_state_is_refused_or_restarted(data):
    cfg = base(data)
    a = build_loader(cfg)
    take(a, 4)
    sd = a.state_dict()
    other = build_loader(base(data, batch_size=5))
    with pytest.raises(DataError, match="batch_size: 3 -> 5"):
        other.load_state_dict(sd)
    other.load_state_dict(sd, strict=False)  # starts the next epoch afresh, keeps the counts
    assert other.epoch == 1 and other.stats()["samples"] == 12
    with pytest.raises(DataError, match="rank 0"):
        build_loader(cfg, rank=1, world_size=2).load_state_dict(sd)
    with pytest.raises(DataError, match="not a streaming-loader state"):
        a.load_state_dict({"epoch": 3})


def test_ranks_resume_independently(data):
    cfg = base(data, batch_size=2, buckets=BUCKETS)
    for rank in range(2):
        ref = check_resume(cfg, 12, [5], rank=rank, world_size=2)
        assert len(ref) == 12


@pytest.mark.parametrize("workers", [0, 2])
def test_loading_leaves_the_global_rng_alone(data, workers):
    """The training step's noise comes from the global torch RNG, which a checkpoint restores; a loader that drew
    from it (a DataLoader does, for its workers' seeds) would shift every random number after a resume."""
    import torch

    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    take(build_loader(base(data, num_workers=workers), 0, 1), 13)  # across an epoch boundary: a new iterator
    assert torch.equal(torch.rand(4), expected)
