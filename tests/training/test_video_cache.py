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
