"""Exact resume for clips: an interrupted epoch (state_dict → new loader → load_state_dict) delivers the same sample
keys, the same clip start frames and the same pixels as an uninterrupted one: no clip replayed, none skipped."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from clipmaker import clip_bytes  # noqa: E402
from shardmaker import write_shardset  # noqa: E402

from data_pipeline.data_config import DataConfig, VideoConfig  # noqa: E402
from data_pipeline.loader import build_loader  # noqa: E402

EXTS = ["mp4", "webm", "mkv"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("videoresume")
    shards = []
    for s in range(4):
        samples = []
        for j in range(5):
            i = 5 * s + j
            ext = EXTS[i % len(EXTS)]
            key = f"v{i:03d}"
            members = {ext: clip_bytes(14 + i % 9, h=24, w=32 + 8 * (i % 3), ext=ext, gop=4),
                       "txt": f"clip {key}".encode(), "json": json.dumps({"key": key}).encode()}
            samples.append((key, members))
        shards.append(samples)
    write_shardset(d, "v", shards)
    return d


def take(loader, n: int) -> list[tuple]:
    """``n`` batches across epochs: (keys, clip start frames, pixel checksum) each."""
    out = []
    while len(out) < n:
        got = False
        for b in loader:
            got = True
            starts = tuple(m["clip_start_frame"] for m in b.metadata)
            out.append((tuple(b.keys), starts, tuple(b.pixels.shape), round(float(b.pixels.double().sum()), 3)))
            if len(out) == n:
                break
        assert got, "an epoch yielded nothing"
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_epoch_gives_the_same_clips(shards, workers):
    cfg = DataConfig(urls=str(shards), image_keys=EXTS, resolution=16, batch_size=3, num_workers=workers,
                     shuffle_buffer=4, crop="random", flip=True, seed=3,
                     video=VideoConfig(num_frames=4, frame_stride=2, clip_start="random"))
    total = 2 * build_loader(cfg).batches_per_epoch + 1  # two epochs and a bit: a cut inside the second epoch too
    reference = take(build_loader(cfg), total)
    starts = [s for _, ss, _, _ in reference for s in ss]
    assert len(set(starts)) > 3  # random clip starts, not all the same
    keys_first_epoch = [k for ks, _, _, _ in reference[: total // 2] for k in ks]
    assert len(keys_first_epoch) == len(set(keys_first_epoch))  # an epoch replays nothing
    by_key: dict[str, set] = {}
    for ks, ss, _, _ in reference:
        for k, s in zip(ks, ss):
            by_key.setdefault(k, set()).add(s)
    assert any(len(v) > 1 for v in by_key.values())  # a clip seen in two epochs starts elsewhere (new draw)
    for cut in (1, 3, total // 2 + 1):
        first = build_loader(cfg)
        head = take(first, cut)
        state = json.loads(json.dumps(first.state_dict()))
        second = build_loader(cfg)
        second.load_state_dict(state)
        tail = take(second, total - cut)
        assert head + tail == reference, f"resume after {cut} batches diverged"


def test_center_clips_do_not_depend_on_the_seed(shards):
    def run(seed: int):
        cfg = DataConfig(urls=str(shards), image_keys=EXTS, resolution=16, batch_size=4, num_workers=0,
                         shuffle_buffer=0, shard_shuffle=False, full_pass=True, seed=seed,
                         video=VideoConfig(num_frames=3, clip_start="center"))
        return {k: m["clip_start_frame"] for b in build_loader(cfg) for k, m in zip(b.keys, b.metadata)}

    a, b = run(0), run(1)
    assert a == b and len(a) == 20
    assert all(s == (14 + int(k[1:]) % 9 - 3) // 2 for k, s in a.items())  # (positions - 1) // 2
