"""Bad input is skipped and counted by reason, warned about (rate-limited), never fatal unless nothing is usable."""

from __future__ import annotations

import logging
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from shardmaker import image_bytes, make_shards, sample, truncate, write_shardset  # noqa: E402

from data_pipeline.data_config import DataConfig, SourceConfig  # noqa: E402
from data_pipeline.errors import DataError  # noqa: E402
from data_pipeline.index import ShardIndex, ShardInfo, read_index, write_index  # noqa: E402
from data_pipeline.loader import build_loader  # noqa: E402


def good(i: int):
    return f"k{i:04d}", sample(f"k{i:04d}", seed=i)


def without(members: dict, ext: str) -> dict:
    return {k: v for k, v in members.items() if k != ext}


@pytest.fixture
def broken(tmp_path):
    """5 shards: one with one bad sample of each kind, one truncated mid-tar, one empty, one zero-byte, one good."""
    jpg = image_bytes(24, 32, 5, "jpg")
    s0 = [good(0),
          ("k0001", {**sample("k0001"), "png": b"not an image at all" * 5}),  # corrupt header
          ("k0002", without(sample("k0002"), "txt")),  # missing caption
          ("k0003", {**sample("k0003"), "json": b"{oops"}),  # unreadable json
          ("k0004", without(sample("k0004"), "png")),  # missing image
          ("k0005", {**without(sample("k0005"), "png"), "jpg": jpg[: len(jpg) // 2]}),  # truncated pixels
          good(6)]
    s1 = [good(i) for i in range(10, 18)]
    s3 = [good(i) for i in range(20, 28)]
    paths = write_shardset(tmp_path, "bad", [s0, s1, [], s3])
    truncate(paths[1], 0.6)  # dies inside sample 5 of 8: the index still says 8
    (tmp_path / "bad-000004.tar").write_bytes(b"")
    idx = read_index(tmp_path / "bad.shardindex.json")
    write_index(tmp_path, ShardIndex("bad", idx.shards + [ShardInfo("bad-000004.tar", 0, 0)]))
    return tmp_path


EXPECTED = {"bad_json": 1, "corrupt_image": 2, "missing_caption": 1, "missing_image": 1, "truncated_tar": 1,
            "empty_shard": 2}


def run_epoch(directory, workers: int, **kw):
    args = dict(urls=str(directory), resolution=16, batch_size=2, num_workers=workers, shuffle_buffer=3,
                shard_shuffle=False, max_warnings=2)
    cfg = DataConfig(**{**args, **kw})
    loader = build_loader(cfg)
    keys = [k for b in loader for k in b.keys]
    return loader, keys


@pytest.mark.parametrize("workers", [0, 2])
def test_every_kind_of_bad_input_is_skipped_and_counted(broken, workers):
    loader, keys = run_epoch(broken, workers)
    st = loader.stats()
    assert st["skipped"] == EXPECTED  # aggregated over the workers, each bad thing counted once
    good_keys = {"k0000", "k0006"} | {f"k{i:04d}" for i in range(10, 15)} | {f"k{i:04d}" for i in range(20, 28)}
    assert set(keys) <= good_keys and len(keys) == loader.batches_per_epoch * 2 == 22  # 23 indexed // 2
    assert set(keys) == good_keys or workers == 2  # one worker wraps around; with two the split decides
    assert st["samples"] == 22 and st["repeated"] >= 22 - 15


def test_warnings_name_shard_and_key_and_are_rate_limited(tmp_path, caplog):
    shard = [(f"z{i}", {**sample(f"z{i}"), "png": b"garbage"}) for i in range(6)] + [good(1), good(2)]
    write_shardset(tmp_path, "z", [shard])
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        loader, keys = run_epoch(tmp_path, 0)
    msgs = [r.getMessage() for r in caplog.records]
    per_sample = [m for m in msgs if "corrupt_image" in m and "sample 'z" in m]
    assert len(per_sample) == 2  # max_warnings
    assert "z-000000.tar" in per_sample[0] and "'z0'" in per_sample[0]
    assert any("further ones are only counted" in m for m in msgs)
    assert any("epoch 0 done" in m and "6 corrupt_image" in m for m in msgs)  # the summary
    # the index promises 8 samples (4 batches): the two good ones are read again, the bad ones counted once
    assert loader.stats()["skipped"] == {"corrupt_image": 6} and set(keys) == {"k0001", "k0002"}
    assert len(keys) == 8 and loader.stats()["repeated"] == 6


def test_nothing_usable_is_an_error_naming_the_source(tmp_path):
    bad = [[(f"x{s}{i}", {**sample(f"x{s}{i}"), "png": b"garbage"}) for i in range(4)] for s in range(3)]
    write_shardset(tmp_path / "idx", "x", bad)
    cfg = DataConfig(sources=[SourceConfig(urls=str(tmp_path / "idx"), name="junk")], resolution=16, batch_size=2,
                     num_workers=0, shuffle_buffer=0)
    with pytest.raises(DataError, match=r"all 3 shards of source 'junk' produced 0 usable samples: 12 corrupt_image"):
        list(build_loader(cfg))
    # without an index (streams until exhaustion), and through worker processes
    write_shardset(tmp_path / "noidx", "x", bad, index=False)
    for workers in (0, 2):
        cfg = DataConfig(urls=str(tmp_path / "noidx"), resolution=16, batch_size=2, num_workers=workers)
        with pytest.raises(DataError, match=r"0 usable samples.*12 corrupt_image"):
            list(build_loader(cfg))
    # endless (mixing) streams must not loop forever either
    make_shards(tmp_path / "ok", n_shards=1, per_shard=4)
    cfg = DataConfig(sources=[SourceConfig(urls=str(tmp_path / "ok")), SourceConfig(urls=str(tmp_path / "idx"),
                                                                                  name="junk")],
                     resolution=16, batch_size=2, num_workers=0, epoch_samples=50)
    with pytest.raises(DataError, match="source 'junk'"):
        list(build_loader(cfg))


def test_undecodable_pixels_in_a_row_are_an_error(tmp_path):
    jpg = image_bytes(24, 32, 1, "jpg")
    shard = [(f"t{i}", {**without(sample(f"t{i}"), "png"), "jpg": jpg[: len(jpg) // 2]}) for i in range(6)]
    write_shardset(tmp_path, "t", [shard])
    cfg = DataConfig(urls=str(tmp_path), resolution=16, batch_size=2, num_workers=0, max_consecutive_bad=5)
    with pytest.raises(DataError, match="5 samples in a row could not be decoded"):
        list(build_loader(cfg))


def test_unreadable_pipe_is_counted(tmp_path):
    make_shards(tmp_path, n_shards=1, per_shard=4)
    cfg = DataConfig(urls=f"pipe:cat {tmp_path}/shard-000000.tar::pipe:cat {tmp_path}/missing.tar",
                     resolution=16, batch_size=2, num_workers=0, epoch_samples=4, shard_shuffle=False,
                     shuffle_buffer=0)
    keys = [k for b in build_loader(cfg) for k in b.keys]
    assert len(keys) == 4
    loader = build_loader(cfg.replace(epoch_samples=None))  # no index for pipes: until exhaustion
    assert sorted(k for b in loader for k in b.keys) == [f"shard{i:05d}" for i in range(4)]
    assert loader.stats()["skipped"] == {"unreadable_shard": 1}
