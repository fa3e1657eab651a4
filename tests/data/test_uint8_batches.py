"""Loader batches carry uint8 pixels (worker → main process → pinned memory → device) and become float in [-1, 1]
only where ``Batch.pixels`` is read, with the very values the loader produced when it made floats in its workers:
``v / 127.5 - 1`` in float32, compared bit for bit against that formula applied to the same decoded frames."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import sys
import tarfile

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from clipmaker import clip_bytes  # noqa: E402
from shardmaker import make_shards, write_shardset  # noqa: E402

from data_pipeline.batch import collate  # noqa: E402
from data_pipeline.data_config import DataConfig, VideoConfig  # noqa: E402
from data_pipeline.decoders import DecodeRequest, member_decoder  # noqa: E402
from data_pipeline.loader import build_loader  # noqa: E402
from data_pipeline.transforms import Decoded, normalize_by_table, normalize_pixels  # noqa: E402


def old_float(frames: np.ndarray) -> torch.Tensor:
    """The loader's former conversion, written out: channels-last uint8 ``(B, [T,] H, W, 3)`` → a contiguous float32
    ``(B, 3, [T,] H, W)``, divided by 127.5, minus 1, in place."""
    x = torch.from_numpy(frames).movedim(-1, 1).to(torch.float32, memory_format=torch.contiguous_format)
    return x.div_(127.5).sub_(1.0)


def bits(x: torch.Tensor) -> torch.Tensor:
    """The float32 tensor's bit patterns (so that equality is bitwise, -0.0 and 0.0 apart)."""
    assert x.dtype == torch.float32
    return x.contiguous().view(torch.int32)


def members(directory) -> dict[str, bytes]:
    """``{key.ext: bytes}`` of every tar in ``directory``."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(directory, name)) as tf:
                for ti in tf:
                    out[ti.name] = tf.extractfile(ti).read()
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("u8images")
    make_shards(d, n_shards=2, per_shard=4, size=lambda i: (20 + 3 * i, 28 - i))
    return d


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("u8clips")
    shards = [[(f"c{s}{j}", {"mp4": clip_bytes(10 + 2 * j, h=24, w=32 + 8 * s, ext="mp4"),
                             "txt": b"a clip", "json": json.dumps({"key": f"c{s}{j}"}).encode()})
               for j in range(3)] for s in range(2)]
    write_shardset(d, "c", shards)
    return d


VIDEO = VideoConfig(num_frames=4, frame_stride=2, clip_start="center")


def image_cfg(d, workers: int) -> DataConfig:
    return DataConfig(urls=str(d), resolution=16, batch_size=4, num_workers=workers, shuffle_buffer=0,
                      shard_shuffle=False, crop="center", flip=False, pin_memory=False)


def clip_cfg(d, workers: int) -> DataConfig:
    return DataConfig(urls=str(d), image_keys=["mp4"], resolution=16, batch_size=3, num_workers=workers,
                      shuffle_buffer=0, shard_shuffle=False, crop="center", flip=False, pin_memory=False, video=VIDEO)


def check_against_old_path(cfg: DataConfig, reference, workers: int) -> None:
    """Every batch: uint8 data (shared memory when it came from a worker process) whose ``pixels`` after the move
    are bitwise the old formula on independently decoded frames, and bitwise the old in-worker float batches."""
    new, old = build_loader(cfg), build_loader(cfg, float_pixels=True)
    pairs = list(zip(new, old))
    new.close()
    old.close()
    assert len(pairs) == new.batches_per_epoch == 2
    for b, f in pairs:
        assert b.keys == f.keys
        data = b.pixel_data
        assert data.dtype == torch.uint8 and data.element_size() == 1 and data.is_contiguous()
        assert data.is_shared() == (workers > 0)  # written into shared memory by the worker, not pickled
        assert f.pixel_data.dtype == torch.float32  # the former batches: float made in the worker
        assert f.pixel_data.nbytes == 4 * data.nbytes and b.nbytes < f.nbytes
        frames = np.stack([reference(k) for k in b.keys])  # (B, [T,] H, W, 3) uint8
        assert torch.equal(data, torch.from_numpy(frames).movedim(-1, 1))
        moved = b.to("cpu")
        assert moved.pixel_data.dtype == torch.uint8  # the move carries uint8
        x = moved.pixels
        assert x.dtype == torch.float32 and x.shape == data.shape
        assert torch.equal(bits(x), bits(old_float(frames)))
        assert torch.equal(bits(x), bits(f.pixels))
        assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0


@pytest.mark.parametrize("workers", [0, 2])
def test_image_batches_travel_as_uint8_and_normalise_to_the_old_values(images, workers):
    raw = members(images)

    def decoded(key: str) -> np.ndarray:
        req = DecodeRequest((16, 16), "center", False, 0, True)
        return member_decoder("png").decode(raw[f"{key}.png"], req).pixels  # (16, 16, 3)

    check_against_old_path(image_cfg(images, workers), decoded, workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_clip_batches_travel_as_uint8_and_normalise_to_the_old_values(clips, workers):
    raw = members(clips)

    def decoded(key: str) -> np.ndarray:
        req = DecodeRequest((4, 16, 16), "center", False, 0, True, video=VIDEO)
        return member_decoder("mp4").decode(raw[f"{key}.mp4"], req).pixels  # (4, 16, 16, 3)

    check_against_old_path(clip_cfg(clips, workers), decoded, workers)


def test_table_gather_gives_the_cpu_arithmetic_bit_for_bit():
    """The device path (a gather from a 256-entry table) equals the CPU arithmetic for every uint8 value and for a
    clip-shaped batch; floats are refused (a batch is normalised once, never twice)."""
    every = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(bits(normalize_by_table(every)), bits(normalize_pixels(every)))
    assert torch.equal(bits(normalize_pixels(every)), bits(every.float() / 127.5 - 1))
    assert float(normalize_pixels(every)[0]) == -1.0 and float(normalize_pixels(every)[255]) == 1.0
    x = torch.randint(0, 256, (2, 3, 4, 5, 6), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x = x.movedim(1, -1).contiguous().movedim(-1, 1)  # a channels-last layout: the result still has x's shape
    assert torch.equal(bits(normalize_by_table(x)), bits(normalize_pixels(x)))
    assert normalize_by_table(x).shape == x.shape
    with pytest.raises(TypeError, match="uint8"):
        normalize_pixels(x.float())


def test_batch_reads_float_once_and_never_sends_it():
    rng = np.random.default_rng(0)
    d = Decoded(rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8), (8, 8), (0, 0), (8, 8))
    b = collate([d, d], ["a", "b"], ["k0", "k1"], [{}, {}])
    assert b.pixel_data.dtype == torch.uint8 and b.num_frames == 3
    sent = len(pickle.dumps(b))
    x = b.pixels
    assert b.pixels is x  # normalised once per batch
    assert b.to("cpu").pixels is x  # a move that moves nothing keeps it
    assert len(pickle.dumps(b)) == sent  # the float copy stays where it was made
    assert pickle.loads(pickle.dumps(b)).pixels.equal(x)
    assert b.nbytes == 2 * 3 * 3 * 8 * 8 + 3 * 2 * 2 * 8  # uint8 pixels + three (B, 2) int64 geometries
    float_batch = collate([d, d], ["a", "b"], ["k0", "k1"], [{}, {}], float_pixels=True)
    assert float_batch.pixels is float_batch.pixel_data and torch.equal(bits(float_batch.pixels), bits(x))
    b.pixels = float_batch.pixels  # a float tensor set by hand is kept as it is
    assert b.pixels is float_batch.pixels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_uint8_batches_normalise_on_the_gpu_bit_for_bit(images, clips):
    for cfg in (image_cfg(images, 2), clip_cfg(clips, 2)):
        cfg = dataclasses.replace(cfg, pin_memory=True)
        loader = build_loader(cfg)
        for b in loader:
            assert b.pixel_data.dtype == torch.uint8 and b.pixel_data.is_pinned()
            x = b.to("cuda", non_blocking=True).pixels
            assert x.device.type == "cuda" and x.dtype == torch.float32
            assert torch.equal(bits(x.cpu()), bits(old_float(b.pixel_data.movedim(1, -1).numpy())))
        loader.close()


def test_dataclasses_replace_keeps_the_uint8_pixels():
    """``dataclasses.replace`` (a user's or a test's way to edit a batch) keeps the uint8 pixels and their reading."""
    from data_pipeline.batch import Batch

    pixels = torch.arange(2 * 3 * 2 * 2, dtype=torch.uint8).reshape(2, 3, 2, 2)
    size = torch.tensor([[2, 2], [2, 2]])
    batch = Batch(pixels, ["a", "b"], ["k0", "k1"], [{}, {}], size, torch.zeros_like(size), size)
    edited = dataclasses.replace(batch, captions=["c", "d"])
    assert edited.captions == ["c", "d"] and edited.pixel_data.dtype == torch.uint8
    assert torch.equal(edited.pixels, batch.pixels)
    with pytest.raises(TypeError, match="missing keys"):
        Batch(pixels, ["a", "b"], None, [{}, {}], size, size, size)
