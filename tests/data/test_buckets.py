"""Multi-aspect buckets: the bucket set, nearest-bucket assignment, single-sized batches, leftover packing."""

from __future__ import annotations

import math
import os
import sys
from collections import Counter

import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))

from shardmaker import image_bytes, make_shards  # noqa: E402

from data_pipeline.buckets import BucketSet, make_buckets, pack_leftovers  # noqa: E402
from data_pipeline.data_config import BucketConfig, DataConfig  # noqa: E402
from data_pipeline.loader import build_loader  # noqa: E402
from data_pipeline.transforms import cover_geometry, image_size  # noqa: E402

SIZES = [(24, 32), (32, 24), (32, 32), (16, 40), (40, 16), (28, 28), (20, 36)]


@pytest.mark.parametrize("res, step, max_aspect", [(256, 64, 2.0), (1024, 64, 4.0), (64, 8, 1.5), (32, 8, 2.5)])
def test_bucket_set_respects_budget_step_and_aspect(res, step, max_aspect):
    sizes = make_buckets(res, step, max_aspect)
    assert (res, res) in sizes
    for h, w in sizes:
        assert h % step == 0 and w % step == 0
        assert h * w <= res * res
        assert max(h / w, w / h) <= max_aspect + 1e-9
    ratios = [w / h for h, w in sizes]
    assert ratios == sorted(ratios) and len(set(ratios)) == len(ratios)
    assert sizes == [(w, h) for h, w in reversed(sizes)]  # symmetric: every landscape bucket has its portrait
    if (res, step) == (1024, 64):  # the SDXL-style set has e.g. 768x1344 (ratio 1.75)
        assert (768, 1344) in sizes and (1344, 768) in sizes


def test_nearest_bucket_in_log_space():
    b = BucketSet([(64, 16), (32, 32), (16, 64)])
    assert b.assign((100, 100)) == (32, 32)
    assert b.assign((10, 100)) == (16, 64)  # wider than the widest: the extreme bucket
    # ratio 2.0 is exactly between 1 and 4 in log space, but 2.1 is nearer 4 only in log space (linear: nearer 1)
    assert b.assign((100, 210)) == (16, 64)
    assert b.assign((100, 190)) == (32, 32)


def test_pack_leftovers_merges_neighbours_into_full_batches():
    b = BucketSet(make_buckets(32, 8, 2.5))
    items = [(24, 40)] * 3 + [(32, 32)] * 2 + [(40, 24)] * 2  # (h, w) per sample
    queues = {}
    for i, hw in enumerate(items):
        queues.setdefault(b.assign(hw), []).append((i, hw))
    batches, rest = pack_leftovers(queues, lambda x: math.log(x[1][1] / x[1][0]), 3, b)
    assert [len(r) for _, r in batches] == [3, 3]
    assert sum(len(v) for v in rest.values()) == 1
    seen = [x for _, r in batches for x in r] + [x for v in rest.values() for x in v]
    assert sorted(seen) == sorted(enumerate(items))
    assert batches[0][0][0] > batches[0][0][1]  # the tall group went to a tall bucket


def test_bucket_assignment_reads_the_header_only():
    data = image_bytes(30, 50, 1, "jpg")
    cut = data[: len(data) // 3]  # pixels truncated, header intact
    assert image_size(cut) == (30, 50)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_batch_has_one_bucket_size_and_records_geometry(tmp_path, workers):
    make_shards(tmp_path, n_shards=4, per_shard=9, size=lambda i: SIZES[i % len(SIZES)])
    cfg = DataConfig(urls=str(tmp_path), resolution=32, batch_size=3, num_workers=workers, shuffle_buffer=5,
                     buckets=BucketConfig(enabled=True, step=8, max_aspect=2.5))
    loader = build_loader(cfg)
    allowed = set(make_buckets(32, 8, 2.5))
    buckets = BucketSet(sorted(allowed, key=lambda hw: hw[1] / hw[0]))
    keys, shapes, moved = [], Counter(), 0
    for b in loader:
        h, w = b.pixels.shape[-2:]
        assert (h, w) in allowed and h * w <= 32 * 32
        assert b.target_size.tolist() == [[h, w]] * len(b)
        shapes[(h, w)] += len(b)
        for k, orig, crop in zip(b.keys, b.original_size.tolist(), b.crop_top_left.tolist()):
            i = int(k[-5:])
            assert tuple(orig) == SIZES[i % len(SIZES)]
            rh, rw = cover_geometry(orig[0], orig[1], h, w)
            assert crop == [(rh - h) // 2, (rw - w) // 2]
            moved += buckets.assign(tuple(orig)) != (h, w)
        keys += b.keys
    assert len(shapes) >= 3
    assert len(keys) == len(set(keys)) == loader.batches_per_epoch * 3 == 36  # all packed: none left over
    st = loader.stats()
    assert sum(st["buckets"].values()) == 36 and st["skipped"] == {}
    # samples not in their own (nearest) bucket are exactly the leftovers packed into a neighbour, and few
    assert st["merged"] == moved < 12


def test_rare_aspect_is_merged_not_stuck(tmp_path):
    # one very wide image among squares: it cannot fill its own bucket, so it is packed with its neighbours
    make_shards(tmp_path, n_shards=1, per_shard=6, size=lambda i: (16, 40) if i == 0 else (32, 32))
    cfg = DataConfig(urls=str(tmp_path), resolution=32, batch_size=3, num_workers=0, shuffle_buffer=0,
                     buckets=BucketConfig(enabled=True, step=8, max_aspect=2.5))
    keys = [k for b in build_loader(cfg) for k in b.keys]
    assert sorted(keys) == [f"shard{i:05d}" for i in range(6)]
    unmerged = cfg.replace(buckets=BucketConfig(enabled=True, step=8, max_aspect=2.5, merge_leftovers=False))
    loader = build_loader(unmerged)
    keys = [k for b in loader for k in b.keys]  # the lone wide sample stays queued; the rank wraps around
    assert "shard00000" not in keys and len(keys) == 6 and loader.stats()["repeated"] > 0


def test_wide_image_is_cropped_into_the_extreme_bucket(tmp_path):
    make_shards(tmp_path, n_shards=1, per_shard=2, size=lambda i: (10, 60))
    cfg = DataConfig(urls=str(tmp_path), resolution=32, batch_size=2, num_workers=0, shuffle_buffer=0,
                     buckets=BucketConfig(enabled=True, step=8, max_aspect=2.0))
    (b,) = list(build_loader(cfg))
    h, w = b.pixels.shape[-2:]
    assert (h, w) == max(make_buckets(32, 8, 2.0), key=lambda hw: hw[1] / hw[0])
    assert b.original_size.tolist() == [[10, 60]] * 2 and b.crop_top_left[0, 1] > 0
    assert Image  # PIL available for the helpers


def test_latents_only_shards_are_batched_by_latent_shape(tmp_path):
    import numpy as np
    from shardmaker import npy_bytes, write_shardset

    shapes = [(4, 4, 6), (4, 6, 4), (4, 5, 5)]
    shards = []
    for s in range(2):
        samples = []
        for j in range(6):
            i = s * 6 + j
            lat = np.full(shapes[i % 3], i, np.float16)
            samples.append((f"l{i:03d}", {"latent.npy": npy_bytes(lat), "txt": f"cached {i}".encode()}))
        shards.append(samples)
    write_shardset(tmp_path, "lat", shards)
    cfg = DataConfig(urls=str(tmp_path), image_keys=[], batch_size=2, num_workers=0, shuffle_buffer=4)
    loader = build_loader(cfg)
    keys = []
    for b in loader:
        assert b.pixels is None and b.latents is not None and b.latents.dtype.itemsize == 2
        assert len({tuple(x.shape) for x in b.latents}) == 1  # one latent shape per batch
        assert [int(x.flatten()[0]) for x in b.latents] == [int(k[1:]) for k in b.keys]
        keys += b.keys
    assert len(keys) == len(set(keys)) == 2 * loader.batches_per_epoch == 12
    assert loader.stats()["buckets"] == {"4x4x6": 4, "4x6x4": 4, "4x5x5": 4}


@pytest.mark.parametrize("merge", [True, False])
def test_a_bad_sample_does_not_make_its_batch_decode_the_others_again(tmp_path, monkeypatch, merge):
    """A bucket batch that loses a sample to a decode error goes back to its queue; the survivors keep what they
    decoded to, so every sample is decoded once (the batches are the same as before: decoding is pure)."""
    import dataclasses

    from shardmaker import sample, write_shardset

    from data_pipeline import decoders

    samples = []
    for i in range(10):
        m = sample(f"k{i:02d}", 32, 32, seed=i)
        if i in (1, 5):  # header intact, pixels cut: passes the probe, fails the decode
            m["png"] = m["png"][: len(m["png"]) // 3]
        samples.append((f"k{i:02d}", m))
    write_shardset(tmp_path, "s", [samples])
    calls = Counter()

    def counting(data, request):
        calls[data] += 1
        return decoders.IMAGE.decode(data, request)

    monkeypatch.setitem(decoders.DECODERS, "png", dataclasses.replace(decoders.IMAGE, decode=counting))
    cfg = DataConfig(urls=str(tmp_path), resolution=32, batch_size=3, num_workers=0, shuffle_buffer=0,
                     full_pass=True, buckets=BucketConfig(enabled=True, step=8, max_aspect=2.0,
                                                          merge_leftovers=merge))
    loader = build_loader(cfg)
    keys = [k for b in loader for k in b.keys]
    assert keys == ["k00", "k02", "k03", "k04", "k06", "k07", "k08", "k09"]  # arrival order, bad ones skipped
    assert loader.stats()["skipped"] == {"corrupt_image": 2}
    assert sum(calls.values()) == 10 and set(calls.values()) == {1}  # each sample decoded once
