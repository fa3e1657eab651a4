"""The streaming loader: config checks, url patterns, transforms, captions, mixing, arrays, epoch modes."""

from __future__ import annotations

import io
import os
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))

from shardmaker import image_bytes, make_shards, npy_bytes, write_shardset  # noqa: E402

from data_pipeline.batch import Batch  # noqa: E402
from data_pipeline.data_config import BucketConfig, DataConfig, SourceConfig  # noqa: E402
from data_pipeline.errors import DataError  # noqa: E402
from data_pipeline.loader import build_loader  # noqa: E402
from data_pipeline.shardlists import expand_pattern  # noqa: E402
from data_pipeline.transforms import cover_geometry, decode_image  # noqa: E402


def cfg_for(urls: str = "", **kw) -> DataConfig:
    base = dict(urls=urls, resolution=16, batch_size=4, num_workers=0, shuffle_buffer=0)
    base.update(kw)
    return DataConfig(**base)


def epoch_keys(loader) -> list[str]:
    return [k for b in loader for k in b.keys]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    make_shards(d, n_shards=4, per_shard=6)
    return d


# ------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("crop", "middle"), ("resolution", 4),
                                          ("shuffle_buffer", -1), ("num_workers", -2), ("epoch_samples", 0)])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: got"):
        DataConfig(**{field: value})


def test_config_other_checks():
    with pytest.raises(ValueError, match="epoch_samples"):
        DataConfig(urls="x.tar", resampled=True)
    with pytest.raises(ValueError, match="^urls: .*either urls"):
        DataConfig(urls="a.tar", sources=[SourceConfig(urls="b.tar")])
    with pytest.raises(ValueError, match="^weight: got"):
        SourceConfig(urls="a.tar", weight=0)
    with pytest.raises(ValueError, match="^max_aspect: got"):
        BucketConfig(max_aspect=0.5)
    cfg = DataConfig(sources=[{"urls": "a.tar", "weight": 2}], buckets={"enabled": True, "step": 32})
    assert cfg.sources[0].weight == 2.0 and cfg.buckets.step == 32
    assert DataConfig().source_list() == []  # the default is valid, just empty
    with pytest.raises(DataError, match="no data configured"):
        build_loader(DataConfig())


# -------------------------------------------------------------------------------------------------- urls


def test_brace_glob_list_folder_and_pipe_patterns_agree(shards):
    d = str(shards)
    brace = expand_pattern(f"{d}/shard-{{000000..000003}}.tar")
    assert len(brace) == 4 and all(os.path.isfile(p) for p in brace)
    assert expand_pattern(f"{d}/shard-*.tar") == brace
    assert expand_pattern(d) == brace
    assert expand_pattern(f"{d}/shard-00000[01].tar::{d}/shard-{{000002..000003}}.tar") == brace
    want = sorted(epoch_keys(build_loader(cfg_for(f"{d}/shard-*.tar"))))
    assert len(want) == 24 and len(set(want)) == 24
    for pattern in (f"{d}/shard-{{000000..000003}}.tar", d, f"pipe:cat {d}/shard-{{000000..000003}}.tar"):
        loader = build_loader(cfg_for(pattern))
        assert loader.batches_per_epoch == 6  # pipe:cat of a local tar still finds its index
        assert sorted(epoch_keys(loader)) == want


def test_patterns_matching_nothing_fail_at_once_naming_the_pattern(tmp_path, shards):
    with pytest.raises(DataError, match=r"nothing/\*\.tar.*matches no file"):
        build_loader(cfg_for(f"{tmp_path}/nothing/*.tar"))
    with pytest.raises(DataError, match=r"shard-\{000000\.\.000009\}\.tar.*6 of 10"):
        build_loader(cfg_for(f"{shards}/shard-{{000000..000009}}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        build_loader(cfg_for(str(tmp_path / "empty")))


# ---------------------------------------------------------------------------------------------- transforms


def test_decode_geometry_range_and_reference():
    data = image_bytes(30, 50, seed=3)
    d = decode_image(data, (16, 16), "center", flip=False)
    assert d.pixels.shape == (16, 16, 3) and d.pixels.dtype == np.uint8
    assert d.original_size == (30, 50) and d.target_size == (16, 16)
    rh, rw = cover_geometry(30, 50, 16, 16)
    assert (rh, rw) == (16, 27) and d.crop_top_left == (0, (27 - 16) // 2)
    # same pixels as the textbook path: resize the shorter side, then crop
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((rw, rh), Image.Resampling.BICUBIC)
    ref = np.asarray(img.crop((5, 0, 21, 16)), dtype=np.float32)
    assert np.abs(d.pixels.astype(np.float32) - ref).mean() < 4.0
    # random crops stay inside; flips mirror
    for r in range(20):
        top, left = decode_image(data, (16, 16), "random", rand=r * 0x9E3779B97F4A7C15 % 2**64).crop_top_left
        assert top == 0 and 0 <= left <= rw - 16
    plain = decode_image(data, (16, 16), "center", flip=True, rand=0).pixels
    flipped = decode_image(data, (16, 16), "center", flip=True, rand=1).pixels
    np.testing.assert_array_equal(plain[:, ::-1], flipped)


def test_batch_pixels_shapes_range_and_conditioning(shards):
    loader = build_loader(cfg_for(str(shards), resolution=16, crop="random", flip=True))
    batches = list(loader)
    assert len(batches) == loader.batches_per_epoch == len(loader) == 6
    for b in batches:
        assert isinstance(b, Batch) and len(b) == 4
        assert b.pixels.shape == (4, 3, 16, 16) and b.pixels.dtype == torch.float32
        assert b.pixels.min() >= -1.0 and b.pixels.max() <= 1.0 and b.pixels.std() > 0.1
        assert b.original_size.tolist() == [[24, 32]] * 4 and b.target_size.tolist() == [[16, 16]] * 4
        assert b.crop_top_left.dtype == torch.int64 and (b.crop_top_left[:, 0] == 0).all()
        assert ((b.crop_top_left[:, 1] >= 0) & (b.crop_top_left[:, 1] <= 21 - 16)).all()
        assert b.captions == [f"a picture of {k}" for k in b.keys]
        assert [m["key"] for m in b.metadata] == b.keys
        assert b.to("cpu").pixels.shape == b.pixels.shape
    # the same seed gives the same batches, bit for bit; another seed another order
    again = list(build_loader(cfg_for(str(shards), resolution=16, crop="random", flip=True)))
    assert all(torch.equal(a.pixels, b.pixels) and a.keys == b.keys for a, b in zip(batches, again))
    other = list(build_loader(cfg_for(str(shards), resolution=16, crop="random", flip=True), seed=5))
    assert [b.keys for b in other] != [b.keys for b in batches]


def test_modes_alpha_webp_and_grayscale(tmp_path):
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent red -> white
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    samples = [("a0", {"png": buf.getvalue(), "txt": b"transparent"}),
               ("a1", {"webp": image_bytes(20, 24, 1, "webp"), "txt": b"webp"}),
               ("a2", {"jpg": image_bytes(20, 24, 2, "jpg", mode="L"), "txt": b"gray"}),
               ("a3", {"png": image_bytes(20, 24, 3, "png", mode="P"), "txt": b"palette"})]
    write_shardset(tmp_path, "m", [samples])
    (b,) = list(build_loader(cfg_for(str(tmp_path), batch_size=4)))
    assert b.pixels.shape == (4, 3, 16, 16)
    i = b.keys.index("a0")
    assert torch.allclose(b.pixels[i], torch.ones(3, 16, 16))
    assert sorted(b.captions) == ["gray", "palette", "transparent", "webp"]


def test_caption_priority(tmp_path):
    samples = [("c0", {"png": image_bytes(8, 8), "txt": b"  from txt ", "json": b'{"caption": "from json"}'}),
               ("c1", {"png": image_bytes(8, 8), "txt": b"   ", "json": b'{"caption": "from json"}'}),
               ("c2", {"png": image_bytes(8, 8), "caption": b"from caption member"}),
               ("c3", {"png": image_bytes(8, 8), "json": b'{"caption": ""}'})]
    write_shardset(tmp_path, "c", [samples])
    caps = {}
    for b in build_loader(cfg_for(str(tmp_path), batch_size=1)):
        caps.update(zip(b.keys, b.captions))
    assert caps == {"c0": "from txt", "c1": "from json", "c2": "from caption member"}  # c3: no caption
    caps = {}
    for b in build_loader(cfg_for(str(tmp_path), batch_size=1, caption_keys=["json:caption", "txt"],
                                  require_caption=False)):
        caps.update(zip(b.keys, b.captions))
    assert caps == {"c0": "from json", "c1": "from json", "c2": "", "c3": ""}


def test_latents_and_extras_from_npy_and_safetensors(tmp_path):
    from safetensors.numpy import save

    def extra(i):
        lat = np.full((4, 2, 2), i, np.float32)
        return {"latent.npy": npy_bytes(lat), "t5.safetensors": save({"t5": np.full((3, 5), -i, np.float16)})}

    make_shards(tmp_path, n_shards=1, per_shard=4, extra=extra)
    (b,) = list(build_loader(cfg_for(str(tmp_path), extra_keys=["t5.safetensors"])))
    idx = [int(k[-5:]) for k in b.keys]
    assert b.latents.shape == (4, 4, 2, 2) and b.latents[:, 0, 0, 0].tolist() == idx
    assert b.extras["t5"].shape == (4, 3, 5) and b.extras["t5"].dtype == torch.float16
    assert b.extras["t5"][:, 0, 0].tolist() == [-i for i in idx]
    # latents-only shards: no image members, pixels None
    (b,) = list(build_loader(cfg_for(str(tmp_path), image_keys=[])))
    assert b.pixels is None and b.latents.shape == (4, 4, 2, 2)


def test_cached_latents_keep_the_geometry_the_cache_recorded(tmp_path):
    """Latent shards written by the cache stage carry the source image's size and crop in their json: batches of
    them give those (SDXL micro-conditioning), not the latent's own shape; without it, the latent shape."""
    import json

    def extra(i):
        meta = {"original_size": [480 + i, 640], "crop_top_left": [0, 80 + i], "target_size": [32, 32]}
        return {"latent.npy": npy_bytes(np.zeros((8, 4, 4), np.float32)), "json": json.dumps(meta).encode()}

    make_shards(tmp_path / "meta", n_shards=1, per_shard=4, extra=extra)
    (b,) = list(build_loader(cfg_for(str(tmp_path / "meta"), image_keys=[])))
    idx = [int(k[-5:]) for k in b.keys]
    assert b.original_size.tolist() == [[480 + i, 640] for i in idx]
    assert b.crop_top_left.tolist() == [[0, 80 + i] for i in idx]
    assert b.target_size.tolist() == [[32, 32]] * 4
    make_shards(tmp_path / "plain", n_shards=1, per_shard=4,
                extra=lambda i: {"latent.npy": npy_bytes(np.zeros((8, 4, 4), np.float32))})
    (b,) = list(build_loader(cfg_for(str(tmp_path / "plain"), image_keys=[])))
    assert b.original_size.tolist() == [[4, 4]] * 4 and b.crop_top_left.tolist() == [[0, 0]] * 4


# -------------------------------------------------------------------------------------------------- mixing


def test_mixing_weights_give_empirical_proportions(tmp_path):
    make_shards(tmp_path / "a", prefix="a", n_shards=2, per_shard=10)
    make_shards(tmp_path / "b", prefix="b", n_shards=3, per_shard=10)
    cfg = cfg_for(sources=[SourceConfig(urls=str(tmp_path / "a"), weight=3.0, name="A"),
                           SourceConfig(urls=str(tmp_path / "b"), weight=1.0, name="B")],
                  epoch_samples=800, batch_size=8, resolution=8, shuffle_buffer=16)
    loader = build_loader(cfg)
    assert loader.mode == "nominal" and loader.batches_per_epoch == 100
    srcs = Counter(s for b in loader for s in b.sources)
    assert sum(srcs.values()) == 800
    assert abs(srcs["A"] / 800 - 0.75) < 0.05, srcs
    keys = [k for b in loader for k in b.keys]  # second epoch: sources cycle on (a holds only 20 samples)
    assert {k[0] for k in keys} == {"a", "b"} and len(keys) == 800


def test_resampled_mode_draws_with_replacement(shards):
    loader = build_loader(cfg_for(str(shards), resampled=True, epoch_samples=40))
    assert loader.mode == "nominal" and loader.batches_per_epoch == 10
    keys = epoch_keys(loader)
    assert len(keys) == 40 and len(set(keys)) < 40  # 24 samples exist: some must repeat
    assert keys == epoch_keys(build_loader(cfg_for(str(shards), resampled=True, epoch_samples=40)))


def test_without_index_streams_until_exhaustion(tmp_path):
    make_shards(tmp_path, n_shards=3, per_shard=5, index=False)
    loader = build_loader(cfg_for(str(tmp_path), batch_size=4))
    assert loader.mode == "exhaust" and loader.batches_per_epoch is None
    sizes = [len(b) for b in loader]
    assert sizes == [4, 4, 4, 3] and loader.epoch == 1
    assert [len(b) for b in build_loader(cfg_for(str(tmp_path), batch_size=4, drop_last=True))] == [4, 4, 4]
    with pytest.raises(TypeError):
        len(loader)
    with pytest.raises(DataError, match="epoch_samples"):
        build_loader(cfg_for(str(tmp_path)), rank=0, world_size=2)
    assert build_loader(cfg_for(str(tmp_path), epoch_samples=16), rank=1, world_size=2).batches_per_epoch == 2


def test_describe_names_the_plan(shards):
    text = build_loader(cfg_for(str(shards), num_workers=2, buckets=BucketConfig(enabled=True, step=8)),
                        rank=1, world_size=2).describe()
    for part in ("rank 1 of 2", "4 shards, 24 samples", "batches per epoch", "2 rank(s) x 2 worker(s)",
                 "buckets (", "16x16", "center crop", "txt > caption > json:caption"):
        assert part in text, (part, text)


def test_full_pass_reads_every_sample_once_source_after_source(tmp_path):
    make_shards(tmp_path / "a", prefix="a", n_shards=3, per_shard=5)  # indexed: would otherwise be epoch-aligned
    make_shards(tmp_path / "b", prefix="b", n_shards=1, per_shard=4)
    cfg = cfg_for(sources=[SourceConfig(urls=str(tmp_path / "a"), weight=5.0), SourceConfig(urls=str(tmp_path / "b"))],
                  full_pass=True, batch_size=4, shard_shuffle=False)
    loader = build_loader(cfg)
    assert loader.mode == "exhaust" and loader.batches_per_epoch is None
    batches = list(loader)
    keys = [k for b in batches for k in b.keys]
    assert keys == [f"a{i:05d}" for i in range(15)] + [f"b{i:05d}" for i in range(4)]  # in order, a then b
    assert [len(b) for b in batches] == [4, 4, 4, 4, 3]
    assert [k for b in loader for k in b.keys] == keys  # the next epoch: the same pass again
    # split over two ranks: disjoint, complete (batch counts may differ: not for DDP training)
    ranks = [[k for b in build_loader(cfg, rank=r, world_size=2) for k in b.keys] for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and sorted(ranks[0] + ranks[1]) == sorted(keys)
    with pytest.raises(ValueError, match="^full_pass"):
        cfg_for(str(tmp_path / "a"), full_pass=True, resampled=True, epoch_samples=10)
