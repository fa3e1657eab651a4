"""Clip buckets (frames, h, w) at a token budget, joint image + video batches, the motion filter, and the shared
bucket schedule across ranks.

Clips are stored as ``.npy`` frame stacks under a made-up member extension and read by a fake clip decoder
(first ``T`` frames, nearest-neighbour resize to the target; fewer than ``T`` frames is a ``short_clip``), so these
tests pin the loader's side without a video codec."""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from shardmaker import npy_bytes, sample, write_shardset  # noqa: E402

from data_pipeline import decoders  # noqa: E402
from data_pipeline.buckets import ClipBucketSet  # noqa: E402
from data_pipeline.data_config import BucketConfig, DataConfig, SourceConfig  # noqa: E402
from data_pipeline.errors import DataError  # noqa: E402
from data_pipeline.loader import build_loader  # noqa: E402
from data_pipeline.transforms import Decoded, array_shape  # noqa: E402
from data_pipeline.worker import bucket_set, clip_frames  # noqa: E402


class ShortClip(ValueError):
    reason = "short_clip"


def _probe(data: bytes, cfg=None) -> tuple[int, ...]:
    return array_shape(data, "npy")[:-1]  # (F, H, W, 3) -> (F, H, W)


def _decode(data: bytes, request: decoders.DecodeRequest) -> Decoded:
    frames = np.load(io.BytesIO(data), allow_pickle=False)  # (F, H, W, 3)
    t, th, tw = request.target
    if frames.shape[0] < t:
        raise ShortClip(f"{frames.shape[0]} frames < {t}")
    ys = np.arange(th) * frames.shape[1] // th
    xs = np.arange(tw) * frames.shape[2] // tw
    out = frames[:t][:, ys][:, :, xs]  # (T, th, tw, 3)
    return Decoded(np.ascontiguousarray(out), frames.shape[1:3], (0, 0), (th, tw))


FAKE = decoders.MemberDecoder("clip", ("vclip",), _probe, _decode)


@pytest.fixture
def clips(monkeypatch):
    monkeypatch.setattr(decoders, "DECODERS", dict(decoders.DECODERS))
    decoders.register(FAKE)


def clip_sample(key: str, f: int, h: int, w: int, meta: dict | None = None) -> dict[str, bytes]:
    """A clip whose frame ``t`` is filled with ``t`` (so a batch shows which frames it holds) plus noise."""
    rng = np.random.default_rng(abs(hash(key)) % 2**32)
    frames = (rng.integers(0, 8, (f, h, w, 3)) + 10 * np.arange(f)[:, None, None, None]).astype(np.uint8)
    return {"vclip": npy_bytes(frames), "txt": f"clip {key}".encode(),
            "json": json.dumps({"num_frames": f, "height": h, "width": w, **(meta or {})}).encode()}


CLIP_SHAPES = [(20, 40, 40), (10, 40, 40), (6, 16, 16), (12, 24, 48), (20, 20, 20), (9, 48, 24)]


def write_clips(d, prefix: str = "v", n_shards: int = 3, per_shard: int = 8, shapes=CLIP_SHAPES) -> dict[str, tuple]:
    shards, truth = [], {}
    for s in range(n_shards):
        samples = []
        for j in range(per_shard):
            i = s * per_shard + j
            key = f"{prefix}{i:04d}"
            shape = shapes[i % len(shapes)]
            truth[key] = shape
            samples.append((key, clip_sample(key, *shape)))
        shards.append(samples)
    write_shardset(d, prefix, shards)
    return truth


def video_cfg(urls: str, **kw) -> DataConfig:
    buckets = kw.pop("buckets", BucketConfig(enabled=True, step=8, max_aspect=2.0, frames=[16, 8, 4],
                                             resolutions=[32, 16]))
    base = dict(urls=urls, image_keys=["vclip", "png"], resolution=32, batch_size=2, num_workers=0,
                shuffle_buffer=4, buckets=buckets)
    base.update(kw)
    return DataConfig(**base)


# ------------------------------------------------------------------------------------------ the bucket set


def test_a_clip_goes_to_the_largest_bucket_it_fits_never_more_frames():
    b = ClipBucketSet([16, 8, 4], [32, 16], step=8, max_aspect=2.0, multi_aspect=True, token_budget=2 * 16 * 32 * 32)
    assert b.assign((20, 40, 40)) == (16, 32, 32)
    assert b.assign((10, 40, 40)) == (8, 32, 32)  # 10 frames: not 16, the largest count <= 10
    assert b.assign((16, 40, 40)) == (16, 32, 32)
    assert b.assign((3, 40, 40)) == (4, 32, 32)  # shorter than every bucket: the shortest (decoder pads or skips)
    assert b.assign((16, 20, 20)) == (16, 16, 16)  # 400 pixels < 0.8 * 32^2: the smaller budget
    assert b.assign((16, 29, 29)) == (16, 32, 32)  # 841 >= 0.8 * 1024: upsampled a little, as Open-Sora allows
    assert b.assign((16, 20, 60)) == (16, 24, 40)  # 1200 pixels: the 32^2 budget, its widest aspect
    assert b.assign((40, 40)) == (1, 32, 32)  # an image: a one-frame clip
    for f, h, w in CLIP_SHAPES + [(5, 30, 90), (100, 8, 8)]:
        t = b.assign((f, h, w))[0]
        assert t <= f and t in (16, 8, 4)


def test_batch_sizes_keep_each_batch_at_about_the_same_memory():
    b = ClipBucketSet([16, 8, 4], [32, 16], step=8, max_aspect=2.0, multi_aspect=True, token_budget=2 * 16 * 32 * 32)
    assert [b.batch_size(s) for s in [(16, 32, 32), (8, 32, 32), (4, 32, 32), (1, 32, 32), (16, 16, 16)]] == \
        [2, 4, 8, 32, 8]
    for s in b.sizes:  # every batch holds at most the budget and at least half of it (aspects: <= r^2 pixels each)
        t, h, w = s
        r = b.group_of[s][1]
        assert b.batch_size(s) * t * r * r <= b.token_budget < 2 * b.batch_size(s) * t * r * r
        assert h * w <= r * r
    capped = ClipBucketSet([16], [32], 8, 2.0, False, 2 * 16 * 32 * 32, max_batch_size=5)
    assert capped.sizes == [(16, 32, 32), (1, 32, 32)]
    assert [capped.batch_size(s) for s in capped.sizes] == [2, 5]


def test_video_run_detection_and_image_runs_unchanged(clips):
    assert clip_frames(DataConfig()) == [] and bucket_set(DataConfig()) is None
    img = DataConfig(buckets=BucketConfig(enabled=True, step=8), resolution=32)
    assert type(bucket_set(img)).__name__ == "BucketSet"
    assert clip_frames(DataConfig(image_keys=["vclip"])) == [16]  # a clip member: video.num_frames (16 default)
    assert clip_frames(DataConfig(image_keys=["png"], buckets=BucketConfig(frames=[4, 8]))) == [4, 8]
    assert clip_frames(DataConfig(image_keys=[], buckets=BucketConfig(frames=[4]))) == []  # latents-only
    square = bucket_set(DataConfig(image_keys=["vclip"], resolution=32, batch_size=3))
    assert square.sizes == [(16, 32, 32), (1, 32, 32)] and square.batch_size((16, 32, 32)) == 3
    with pytest.raises(ValueError, match=r"buckets.frames: got \[0\]"):
        BucketConfig(frames=[0])
    with pytest.raises(ValueError, match="buckets.min_fill"):
        BucketConfig(min_fill=0)


# -------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("workers", [0, 2])
def test_every_clip_batch_has_one_shape_and_its_bucket_batch_size(tmp_path, clips, workers):
    truth = write_clips(tmp_path)
    cfg = video_cfg(str(tmp_path), num_workers=workers, full_pass=True)
    loader = build_loader(cfg)
    buckets = loader.ctx.buckets
    seen = []
    for batch in loader:
        px = batch.pixels
        assert px.ndim == 5 and px.shape[1] == 3  # (B, C, T, H, W)
        t, h, w = px.shape[2:]
        assert (t, h, w) in buckets.sizes and batch.num_frames == t
        assert len(batch) <= buckets.batch_size((t, h, w))
        for key, clip in zip(batch.keys, px):
            f = truth[key][0]
            assert t <= f  # never upsampled in time
            frame_means = ((clip + 1) * 127.5).mean(dim=(0, 2, 3))  # frame k holds values 10k + [0, 8)
            assert torch.all((frame_means - 10 * torch.arange(t)).abs() < 8)
        seen += batch.keys
    assert sorted(seen) == sorted(truth)  # a full pass: every clip once
    st = loader.stats()
    assert st["skipped"] == {} and sum(st["buckets"].values()) == len(truth)
    assert sum(len(b) for b in loader) == len(truth)  # the next epoch: every clip once again


def test_short_clips_are_counted_by_the_decoders_reason(tmp_path, clips):
    truth = write_clips(tmp_path, shapes=[(3, 32, 32), (8, 32, 32)], n_shards=1, per_shard=4)
    loader = build_loader(video_cfg(str(tmp_path), full_pass=True, shuffle_buffer=0))
    keys = [k for b in loader for k in b.keys]
    assert keys == [k for k, s in truth.items() if s[0] >= 4]
    assert loader.stats()["skipped"] == {"short_clip": 2}


def test_images_and_clips_mix_as_one_frame_clips(tmp_path, clips):
    write_clips(tmp_path / "v", n_shards=2, per_shard=8)
    imgs = [[(f"i{s}{j}", sample(f"i{s}{j}", 24 + 8 * (j % 2), 32, seed=j)) for j in range(8)] for s in range(2)]
    write_shardset(tmp_path / "i", "i", imgs)
    cfg = video_cfg("", sources=[SourceConfig(str(tmp_path / "v"), 3.0, "video"),
                                 SourceConfig(str(tmp_path / "i"), 1.0, "images")],
                    epoch_samples=48, batch_size=2,
                    buckets=BucketConfig(enabled=True, step=8, max_aspect=2.0, frames=[16, 8, 4], resolutions=[32, 16],
                                         max_batch_size=4))
    loader = build_loader(cfg)
    assert loader.mode == "nominal"
    kinds = set()
    for batch in loader:
        assert batch.pixels.ndim == 5
        t = batch.num_frames
        assert len(set(batch.sources)) == 1  # images and clips never share a batch: they differ in T
        kind = batch.sources[0]
        kinds.add(kind)
        assert (t == 1) == (kind == "images")
        if kind == "images":
            # an image batch is as big as the budget allows for one frame (2 * 16), capped at max_batch_size
            assert len(batch) == 4 and len(batch) == loader.ctx.buckets.batch_size(tuple(batch.pixels.shape[2:]))
    assert kinds == {"images", "video"}
    assert "images are 1-frame clips" in loader.describe()


def test_an_image_run_is_unchanged_by_the_video_fields(tmp_path):
    imgs = [[(f"i{j}", sample(f"i{j}", 24, 32, seed=j)) for j in range(6)]]
    write_shardset(tmp_path, "i", imgs)
    cfg = DataConfig(urls=str(tmp_path), resolution=16, batch_size=2, num_workers=0, shuffle_buffer=0)
    batches = list(build_loader(cfg))
    assert [tuple(b.pixels.shape) for b in batches] == [(2, 3, 16, 16)] * 3


# ----------------------------------------------------------------------------------------------- motion filter


def test_low_motion_clips_are_skipped_before_decoding(tmp_path, clips, monkeypatch):
    scores = [0.1, 2.5, None, 0.99, 1.0, 7.0]
    samples = []
    for i, sc in enumerate(scores):
        meta = {} if sc is None else {"motion_score": sc}
        samples.append((f"m{i}", clip_sample(f"m{i}", 8, 16, 16, meta)))
    write_shardset(tmp_path, "m", [samples])
    decoded = []
    monkeypatch.setitem(decoders.DECODERS, "vclip", decoders.MemberDecoder(
        "clip", ("vclip",), _probe, lambda d, r: decoded.append(1) or _decode(d, r)))
    cfg = video_cfg(str(tmp_path), full_pass=True, shuffle_buffer=0, min_motion_score=1.0,
                    buckets=BucketConfig(frames=[8], resolutions=[16]))
    loader = build_loader(cfg)
    keys = [k for b in loader for k in b.keys]
    assert keys == ["m1", "m2", "m4", "m5"]  # no score passes; equal to the threshold passes
    assert loader.stats()["skipped"] == {"low_motion": 2}
    assert len(decoded) == 4  # the low-motion clips were never decoded
    assert "motion filter" in loader.describe()
    off = build_loader(cfg.replace(min_motion_score=None))
    assert len([k for b in off for k in b.keys]) == 6


# --------------------------------------------------------------------------------- same bucket on every rank


def shapes_and_keys(loader, n):
    out = []
    while len(out) < n:
        for b in loader:
            out.append((tuple(b.pixels.shape[2:]), tuple(b.keys)))
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_same_bucket_across_ranks_follows_one_schedule(tmp_path, clips, workers):
    write_clips(tmp_path, n_shards=4, per_shard=12,
                shapes=[(20, 40, 40), (20, 40, 40), (10, 40, 40), (9, 24, 48), (20, 20, 20), (16, 48, 24)])
    bk = BucketConfig(enabled=True, step=8, max_aspect=2.0, frames=[16, 8], resolutions=[32, 16],
                      same_bucket_across_ranks=True)
    cfg = video_cfg(str(tmp_path), buckets=bk, num_workers=workers, batch_size=1, shuffle_buffer=6)
    r0, r1 = (build_loader(cfg, rank=r, world_size=2) for r in (0, 1))
    assert r0.batches_per_epoch == r1.batches_per_epoch and r0.quotas(0) == r1.quotas(0)
    n = 2 * r0.batches_per_epoch
    a, b = shapes_and_keys(r0, n), shapes_and_keys(r1, n)
    assert [s for s, _ in a] == [s for s, _ in b]  # the same bucket at every step
    assert len({s for s, _ in a}) > 2  # and the schedule does move between buckets
    assert {k for _, ks in a[: len(a) // 2] for k in ks}.isdisjoint(k for _, ks in b[: len(b) // 2] for k in ks)
    for (t, h, w), keys in a:
        assert len(keys) == r0.ctx.buckets.batch_size((t, h, w))
    assert "same bucket on every rank" in r0.describe()
    # resume in the middle of the second epoch: the same shapes and keys as without the interruption
    fresh = build_loader(cfg, rank=0, world_size=2)
    first = shapes_and_keys(fresh, r0.batches_per_epoch + 3)
    state = json.loads(json.dumps(fresh.state_dict()))
    resumed = build_loader(cfg, rank=0, world_size=2)
    resumed.load_state_dict(state)
    assert first + shapes_and_keys(resumed, n - len(first)) == a


def test_a_scheduled_bucket_the_data_cannot_fill_is_an_error(tmp_path, clips):
    write_clips(tmp_path, shapes=[(5, 32, 32)], n_shards=2, per_shard=20)
    bk = BucketConfig(frames=[16, 4], resolutions=[32], same_bucket_across_ranks=True)
    cfg = video_cfg(str(tmp_path), buckets=bk, batch_size=1, shuffle_buffer=0, resampled=True, epoch_samples=400)
    loader = build_loader(cfg)
    with pytest.raises(DataError, match="scheduled bucket 16x32x32"):
        shapes_and_keys(loader, 50)


# ------------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("workers", [0, 2])
def test_clip_buckets_resume_exactly(tmp_path, clips, workers):
    write_clips(tmp_path, n_shards=4, per_shard=9)
    cfg = video_cfg(str(tmp_path), num_workers=workers, shuffle_buffer=5)
    whole = shapes_and_keys(build_loader(cfg), 14)
    first = build_loader(cfg)
    head = shapes_and_keys(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    again = build_loader(cfg)
    again.load_state_dict(state)
    assert head + shapes_and_keys(again, 9) == whole
