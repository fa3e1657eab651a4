"""Video in the cache stage: clips (and images, as one-frame clips) encoded once into posterior moments
``(2C, T, h, w)`` equal to what the online mode (``diffusion.latents: encode``) computes from the same batch, the
cached shards streaming back as ``(B, 2C, T, h, w)``, and ``loom data`` saying what either mode costs."""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("av")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "data"))

from clipmaker import clip_bytes  # noqa: E402
from shardmaker import sample, write_shardset  # noqa: E402

from data_pipeline.data_config import BucketConfig, DataConfig, VideoConfig  # noqa: E402
from data_pipeline.loader import build_loader  # noqa: E402
from models.autoencoder import AutoencoderConfig, AutoencoderKL  # noqa: E402
from models.text_encoder import TextEncoder, TextEncoderConfig  # noqa: E402
from training.stages.cache import CacheConfig, cache_data_config, cache_shards, posterior_moments  # noqa: E402

AE = AutoencoderConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, latent_channels=2,
                       mid_block_attention=False)
FRAMES = {"v0": 9, "v1": 5, "v2": 12, "v3": 3, "v4": 8}  # v3 is shorter than every bucket: padded


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("vcache")
    vids = [(k, {"mp4": clip_bytes(n, h=24, w=32), "txt": f"clip {k}".encode()}) for k, n in FRAMES.items()]
    imgs = [(f"i{j}", sample(f"i{j}", 16, 24, seed=j)) for j in range(3)]
    write_shardset(d, "v", [vids[:3], vids[3:] + imgs])
    return d


def data_cfg(shards) -> DataConfig:
    return DataConfig(urls=str(shards), image_keys=["mp4", "png"], resolution=16, batch_size=2, num_workers=0,
                      video=VideoConfig(num_frames=8, frame_stride=1, short_clips="pad"),
                      buckets=BucketConfig(frames=[8, 4]))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ae = AutoencoderKL(AE).eval().requires_grad_(False)
    te = TextEncoder(TextEncoderConfig(model="openclip-tiny-text", layer="last")).eval()
    return ae, te


def test_cached_clip_latents_equal_the_online_posterior_and_stream_back_5d(shards, models, tmp_path):
    ae, te = models
    data = data_cfg(shards)
    n = cache_shards(data, "train", tmp_path, ae, te, CacheConfig(batch_size=2), torch.device("cpu"), progress=False)
    assert n == len(FRAMES) + 3

    # online: the pass the cache stage makes, encoded in the training step instead
    one_pass = dataclasses.replace(data, shuffle_buffer=0, shard_shuffle=False, full_pass=True, crop="center",
                                   video=dataclasses.replace(data.video, clip_start="center"))
    online, shapes = {}, {}
    for batch in build_loader(one_pass):
        assert batch.pixels.ndim == 5  # images too: (B, C, 1, H, W)
        moments = posterior_moments(ae, batch.pixels)  # (B, 2C, T, h, w)
        z = ae.latents_from_pixels(batch.pixels, sample=False)  # what diffusion.latents=encode feeds the denoiser
        assert z.shape == (len(batch), 2, batch.num_frames, 8, 8)
        assert torch.allclose(z, ae.scale_latents(torch.from_numpy(moments[:, :2])), atol=1e-6)
        for k, m in zip(batch.keys, moments):
            online[k], shapes[k] = m, batch.num_frames
    assert shapes == {"v0": 8, "v1": 4, "v2": 8, "v3": 4, "v4": 8, "i0": 1, "i1": 1, "i2": 1}

    cached = cache_data_config(tmp_path, "train", data)
    seen = set()
    for batch in build_loader(dataclasses.replace(cached, full_pass=True, shuffle_buffer=0)):
        assert batch.pixels is None and batch.latents.ndim == 5  # (B, 2C, T, h, w)
        assert len({tuple(x.shape) for x in batch.latents}) == 1
        for lat, meta in zip(batch.latents, batch.metadata):
            src = meta["source_key"]
            seen.add(src)
            assert lat.shape == (4, shapes[src], 8, 8)
            np.testing.assert_allclose(lat.numpy(), online[src], rtol=1e-5, atol=1e-6)
            assert meta["clip_frames"] == shapes[src] and meta["target_size"] == [16, 16]
            if src.startswith("v"):
                assert "clip_start_frame" in meta  # where the decoder took the clip
        assert batch.extras["context"].shape[0] == len(batch)
    assert seen == set(online)


def test_loom_data_says_what_cache_and_encode_will_do(shards, tmp_path, capsys):
    cli = pytest.importorskip("launch.cli")
    common = ["data", f"data.urls={shards}", "data.image_keys=[mp4,png]", "data.resolution=16", "data.batch_size=2",
              "data.buckets.frames=[8,4]", "data.num_workers=0", "autoencoder.model.block_out_channels=[8,16]",
              "autoencoder.model.norm_num_groups=4", "autoencoder.model.latent_channels=2",
              f"run.output_dir={tmp_path}", "--dry-run"]
    assert cli.main(common + ["diffusion.latents=cache", "cache.dtype=float16"]) == 0
    out = capsys.readouterr().out
    assert "clip buckets" in out and "8x16x16 (batch 2): latent (2, 8, 8, 8) per clip" in out
    assert "latent.npy (4, 8, 8, 8) float16 = 4.0 KiB per clip" in out  # 4 * 8 * 8 * 8 * 2 bytes
    assert "1x16x16 (batch 16): latent (2, 1, 8, 8) per image" in out
    assert "16 frame(s) through the encoder per step, ~" in out and "mode cache: the cache stage" in out
    assert cli.main(common + ["diffusion.latents=encode"]) == 0
    out = capsys.readouterr().out
    assert "mode encode: no cache on disk" in out


def test_loom_data_plan_counts_causal_latent_frames(shards, tmp_path, capsys):
    """A causal 3-D autoencoder compresses time: the plan's latent and cache sizes count 1 + (T-1)/4 frames."""
    cli = pytest.importorskip("launch.cli")
    args = ["data", f"data.urls={shards}", "data.image_keys=[mp4,png]", "data.resolution=16", "data.batch_size=2",
            "data.buckets.frames=[9,5]", "data.num_workers=0", "autoencoder.architecture=autoencoder-causal-3d",
            "diffusion.latents=cache", "cache.dtype=float16", f"run.output_dir={tmp_path}", "--dry-run"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "T' = 1 + (T-1)/4" in out
    assert "9x16x16 (batch 2): latent (16, 3, 2, 2) per clip" in out  # 9 frames -> 3 latent frames, 8x per side
    assert "latent.npy (32, 3, 2, 2) float16 = 768 B per clip" in out  # 2 * 16 * 3 * 2 * 2 * 2 bytes
    assert "5x16x16 (batch 3): latent (16, 2, 2, 2) per clip" in out


# ----------------------------------------------------------------------------- cache.clip_frames: longer clips kept

def windowed_cfg(shards, clip_start: str = "random", seed: int = 0) -> DataConfig:
    """Training clips of 4 frames (short videos padded), images as one-frame clips."""
    return DataConfig(urls=str(shards), image_keys=["mp4", "png"], resolution=16, batch_size=2, num_workers=0,
                      seed=seed, video=VideoConfig(num_frames=4, frame_stride=1, clip_start=clip_start,
                                                   short_clips="pad"),
                      buckets=BucketConfig(frames=[4]))


def window_reads(cache_dir, data: DataConfig, epochs: int) -> list[tuple[str, int, np.ndarray]]:
    """``(source key, window start, latent)`` of every cached sample read in ``epochs`` passes of training."""
    cached = dataclasses.replace(cache_data_config(cache_dir, "train", data), full_pass=True)
    loader = build_loader(cached)
    out = []
    for _ in range(epochs):  # each pass over the loader is the next epoch
        for batch in loader:
            assert batch.latents.shape[2] in (1, 4)  # every clip comes out at the training length
            out += [(m["source_key"], m.get("latent_window_start", -1), lat.numpy())
                    for m, lat in zip(batch.metadata, batch.latents)]
    return out


def test_clip_frames_caches_long_clips_and_every_read_cuts_a_fresh_window(shards, models, tmp_path):
    """cache.clip_frames=8: videos with 8 frames or more are cached with 8, shorter ones at the training length;
    training reads windows of 4 frames at random starts, each the per-frame encoding of those 4 decoded frames."""
    ae, te = models
    data = windowed_cfg(shards)
    cache_shards(data, "train", tmp_path, ae, te, CacheConfig(batch_size=2, clip_frames=8), torch.device("cpu"),
                 progress=False)
    # the pixels the cache pass encodes: the centred 8 frames (4 for the short videos), decoded here once more
    one_pass = dataclasses.replace(data, shuffle_buffer=0, shard_shuffle=False, full_pass=True,
                                   video=dataclasses.replace(data.video, clip_start="center", num_frames=8),
                                   buckets=BucketConfig(frames=[8, 4]))
    pixels = {k: p for batch in build_loader(one_pass) for k, p in zip(batch.keys, batch.pixels)}
    assert {k: p.shape[1] for k, p in pixels.items()} == {"v0": 8, "v1": 4, "v2": 8, "v3": 4, "v4": 8,
                                                          "i0": 1, "i1": 1, "i2": 1}

    reads = window_reads(tmp_path, data, epochs=8)
    starts: dict[str, set] = {}
    for key, start, lat in reads:
        starts.setdefault(key, set()).add(start)
        if pixels[key].shape[1] == 8:  # a kept clip: the window is the encoding of its 4 frames
            assert 0 <= start <= 4 and lat.shape == (4, 4, 8, 8)
            window = pixels[key][None, :, start:start + 4]
            np.testing.assert_allclose(lat, posterior_moments(ae, window)[0], rtol=1e-4, atol=1e-5)
        else:  # clips of the training length and images: used whole, never cut
            assert start == -1 and lat.shape[1] == pixels[key].shape[1]
    # fresh windows across epochs, not one frozen clip (5 starts: the same one 8 times has odds 5**-7 per clip)
    assert all(len(starts[k]) >= 2 for k in ("v0", "v2", "v4")), starts
    assert starts["v1"] == starts["i0"] == {-1}

    # the draws are the sample's own: the same seed reads the same windows (a resumed run too), another seed others
    again = window_reads(tmp_path, data, epochs=8)
    assert [(k, s) for k, s, _ in again] == [(k, s) for k, s, _ in reads]
    other = window_reads(tmp_path, windowed_cfg(shards, seed=1), epochs=8)
    assert [s for _, s, _ in other] != [s for _, s, _ in reads]
    # clip_start: center takes the middle window every time (8 cached frames, 4 wanted: start 2)
    centre = window_reads(tmp_path, windowed_cfg(shards, "center"), epochs=2)
    assert {s for k, s, _ in centre if pixels[k].shape[1] == 8} == {2}


def test_clip_frames_is_refused_where_a_window_would_be_wrong(shards, models, tmp_path):
    from models.registry import build_model

    ae, te = models
    data = windowed_cfg(shards)
    with pytest.raises(ValueError, match=r"cache.clip_frames=3: fewer than the 4 frames of a training clip"):
        CacheConfig(clip_frames=3).check_clip_frames(data)
    images = dataclasses.replace(data, image_keys=["png"], buckets=BucketConfig())
    with pytest.raises(ValueError, match=r"cache.clip_frames=8: the data reads no clips"):
        CacheConfig(clip_frames=8).check_clip_frames(images)
    with pytest.raises(ValueError, match="clip_frames: got 0"):
        CacheConfig(clip_frames=0)
    causal = build_model("tiny-causal-vae").eval()  # 4x in time: a window of latent frames is not those frames
    with pytest.raises(ValueError, match=r"cache.clip_frames=9: the autoencoder \(CausalAutoencoder3D\) compresses "
                                         r"time 4x"):
        cache_shards(dataclasses.replace(data, buckets=BucketConfig(frames=[5])), "train", tmp_path, causal, te,
                     CacheConfig(clip_frames=9), torch.device("cpu"), progress=False)
    assert not list(tmp_path.iterdir())  # refused before writing anything


def test_loom_data_plans_the_longer_cached_clips_and_a_bad_clip_frames_stops_before_work(shards, tmp_path, capsys):
    cli = pytest.importorskip("launch.cli")
    common = ["data", f"data.urls={shards}", "data.image_keys=[mp4,png]", "data.resolution=16", "data.batch_size=2",
              "data.buckets.frames=[8,4]", "data.num_workers=0", "autoencoder.model.block_out_channels=[8,16]",
              "autoencoder.model.norm_num_groups=4", "autoencoder.model.latent_channels=2",
              "diffusion.latents=cache", "cache.dtype=float16", f"run.output_dir={tmp_path}", "--dry-run"]
    assert cli.main(common + ["cache.clip_frames=12"]) == 0
    out = capsys.readouterr().out
    assert "latent.npy (4, 12, 8, 8) float16 = 6.0 KiB per clip" in out  # 4 * 12 * 8 * 8 * 2 bytes, not 8 frames
    assert "latent.npy (4, 4, 8, 8) float16 = 2.0 KiB per clip" in out  # the shorter bucket keeps its length
    assert "cache.clip_frames=12: 8-frame clips are cached with up to 12 frames; every read cuts a 8-frame window" in out
    train = ["train", "pipeline=[cache,diffusion]", *common[1:-1], "--dry-run"]
    assert cli.main(train + ["cache.clip_frames=6"]) == 2  # a config error: nothing ran
    err = capsys.readouterr().err
    assert "cache.clip_frames=6: fewer than the 8 frames of a training clip" in err
    assert not any(tmp_path.iterdir())  # no run directory, no cache
