"""The autoencoder stage for clips: the architecture picked by config (image, SVD's temporal decoder, causal 3-D),
started from an exported image autoencoder (exact at step 0 where claimed), the decoder alone trained with the
encoder frozen, exported with its architecture and loaded back, and a whole autoencoder → cache → diffusion run on
moving-digit clips with the causal 3-D autoencoder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import av
import pytest
import torch
from PIL import Image

from data_pipeline.batch import Batch
from data_pipeline.data_config import BucketConfig, DataConfig, VideoConfig
from data_pipeline.demo import write_split_set
from data_pipeline.loader import build_loader
from data_pipeline.moving_digits import CRF, clip_samples
from data_pipeline.writer import WriterOptions
from models.autoencoder import AutoencoderConfig, AutoencoderKL
from models.video_autoencoder import CausalAutoencoder3D, TemporalDecoderAutoencoder
from training.builders import first_batches, load_autoencoder, open_run
from training.config_io import ConfigError, from_dict, load_config
from training.evaluation import temporal_flicker
from training.run_config import RunConfig
from training.runner import run_pipeline
from training.stages.autoencoder import (
    AutoencoderStage,
    AutoencoderStageConfig,
    encoder_parameters,
    export_module,
    inflate_temporal_decoder,
)
from training.stages.cache import cache_data_config
from training.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is faster

IMAGE_AE = AutoencoderConfig(block_out_channels=[8, 8, 8], layers_per_block=1, norm_num_groups=4, latent_channels=4)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """Moving-digit clip shards (16 clips a split) and an exported tiny image autoencoder (an export of the old
    format: model.json without an architecture field)."""
    root = tmp_path_factory.mktemp("video-ae")
    write_split_set(root / "clips", lambda split: clip_samples(split)[:16], WriterOptions(16, video_crf=CRF), 0.1,
                    False)
    torch.manual_seed(0)
    ae = AutoencoderKL(IMAGE_AE)
    return {"root": root, "ae": export_module(ae, IMAGE_AE, root / "ae"), "clips": root / "clips"}


def clip_data(base: dict[str, Path], split: str = "train", frames: int = 5, batch_size: int = 4) -> DataConfig:
    return DataConfig(urls=str(base["clips"] / f"{split}-000000.tar"), image_keys=["mp4"], resolution=32,
                      batch_size=batch_size, num_workers=0, shuffle_buffer=0,
                      video=VideoConfig(num_frames=frames, clip_start="center"), buckets=BucketConfig(frames=[frames]))


def clips_of(base: dict[str, Path], n: int = 4, split: str = "train") -> torch.Tensor:
    return torch.cat([b.pixels for b in first_batches(clip_data(base, split), n, 4)])[:n]  # (n, 3, 5, 32, 32)


def stage_config(base: dict[str, Path], **fields) -> AutoencoderStageConfig:
    return from_dict(AutoencoderStageConfig, {"inflate_from": str(base["ae"]), **fields})


def as_batch(x: torch.Tensor) -> Batch:
    n = len(x)
    return Batch(pixels=x, captions=[""] * n, keys=[str(i) for i in range(n)], metadata=[{}] * n,
                 original_size=torch.zeros(n, 2), crop_top_left=torch.zeros(n, 2), target_size=torch.zeros(n, 2))


def test_config_picks_the_architecture_and_errors_name_the_key(base):
    cfg = stage_config(base, architecture="autoencoder-causal-3d", model={"chunk_latent_frames": 0})
    assert cfg.architecture_name == "autoencoder-causal-3d"
    assert cfg.model_config.temporal_factor == 4 and cfg.model_config.chunk_latent_frames == 0
    assert cfg.model_config.block_out_channels == [8, 8, 8]  # from the image autoencoder's model.json
    sections = from_dict(AutoencoderStageConfig, {"architecture": "tiny-svd-vae", "model": {
        "tiny-svd-vae": {"merge_factor": 1.0}, "autoencoder-kl": {"latent_channels": 2}}})
    assert type(sections.model_config).__name__ == "TemporalAutoencoderConfig"
    assert sections.model_config.merge_factor == 1.0 and sections.model_config.block_out_channels == [32, 64]
    old = from_dict(AutoencoderStageConfig, {"model": {"block_out_channels": [8, 8], "norm_num_groups": 4}})
    assert old.architecture_name == "autoencoder-kl" and old.model_config.block_out_channels == [8, 8]

    def error(*overrides: str) -> str:
        with pytest.raises(ConfigError) as e:
            load_config(RunConfig, [], [f"autoencoder.inflate_from={base['ae']}", *overrides])
        return str(e.value)

    assert "autoencoder.architecture: unknown model 'autoencoder-kl-temprl'" in error(
        "autoencoder.architecture=autoencoder-kl-temprl")
    assert "autoencoder.architecture: 'dit' is registered as an architecture of role 'denoiser'" in error(
        "autoencoder.architecture=dit")
    assert "autoencoder.inflate_from:" in error("autoencoder.architecture=autoencoder-kl")
    assert "autoencoder.inflate_from:" in error("autoencoder.architecture=autoencoder-causal-3d",
                                                "autoencoder.weights=w.safetensors")
    msg = error("autoencoder.architecture=autoencoder-kl-temporal", "autoencoder.model.merge_fctor=1")
    assert "model.merge_fctor: unknown key; did you mean 'merge_factor'" in msg
    msg = error("autoencoder.architecture=autoencoder-causal-3d", "autoencoder.model.chunk_latent_frames=many")
    assert "model.chunk_latent_frames: got 'many'" in msg
    msg = error("autoencoder.architecture=autoencoder-causal-3d", "autoencoder.model.autoencoder-kl.norm_eps=1",
                "autoencoder.model.chunk_latent_frames=0")
    assert "mixes config fields with sections named by architecture" in msg
    msg = error("autoencoder.architecture=autoencoder-causal-3d", "pipeline=[autoencoder]",
                "data.buckets.frames=[5,8]")
    assert "data.buckets.frames: clips of [8] frames" in msg and "1 + 4·k frames" in msg
    with pytest.raises(FileNotFoundError, match="inflate_from='absent.safetensors': does not exist"):
        AutoencoderStage(from_dict(AutoencoderStageConfig, {"architecture": "autoencoder-causal-3d",
                                                            "inflate_from": "absent.safetensors"}))


@pytest.mark.parametrize("image_config", [IMAGE_AE, dataclasses.replace(
    IMAGE_AE, use_quant_conv=False, use_post_quant_conv=False, mid_block_attention=False)],
    ids=["quant-convs-attention", "bare"])
def test_temporal_decoder_starts_as_the_image_autoencoder_frame_by_frame(base, image_config):
    torch.manual_seed(1)
    image = AutoencoderKL(image_config).eval()
    video = inflate_temporal_decoder(image).eval()
    x = clips_of(base)
    with torch.no_grad():
        z = image.encode(x).mode()  # (B, 4, 5, 8, 8), per frame
        assert torch.equal(video.encode(x).mode(), z)  # the latent space, bit for bit
        per_frame = image.decode(z)
        torch.testing.assert_close(video.decode(z), per_frame, rtol=0, atol=1e-5)
        torch.testing.assert_close(video.decode(z[:, :, 2]), per_frame[:, :, 2], rtol=0, atol=1e-5)  # an image
        # what the silent start prevents: the default initialisation of the temporal layers mixes frames
        fresh = TemporalDecoderAutoencoder(video.config).state_dict()
        default = TemporalDecoderAutoencoder(video.config).eval()
        default.load_state_dict({k: fresh[k] if (".temporal." in k or "time_conv_out" in k) else v
                                 for k, v in video.state_dict().items()})
        assert (default.decode(z) - per_frame).abs().max() > 1e-2


def test_causal_inflation_reconstructs_first_and_static_frames_as_the_image_autoencoder(base):
    cfg = stage_config(base, architecture="autoencoder-causal-3d")
    video = AutoencoderStage(cfg).model.eval()
    image = load_autoencoder(base["ae"])
    assert isinstance(video, CausalAutoencoder3D)
    x = clips_of(base)
    static = x[:, :, :1].expand(-1, -1, 5, -1, -1)
    with torch.no_grad():
        assert video.encode(x).mode().shape == (4, 4, 2, 8, 8)  # T' = 1 + (5 - 1) / 4
        recon = video.decode(video.encode(x).mode())
        image_first = image.decode(image.encode(x[:, :, 0]).mode())
        torch.testing.assert_close(recon[:, :, 0], image_first, rtol=0, atol=1e-5)
        torch.testing.assert_close(video.decode(video.encode(static).mode()),
                                   image_first[:, :, None].expand(-1, -1, 5, -1, -1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("architecture", ["autoencoder-kl-temporal", "autoencoder-causal-3d"])
def test_a_few_steps_lower_the_clip_reconstruction_loss(base, architecture):
    torch.manual_seed(0)
    stage = AutoencoderStage(stage_config(base, architecture=architecture, reconstruction="l2"))
    batch = as_batch(clips_of(base))
    opt = torch.optim.AdamW(stage.parameters_to_optimize(stage.model), lr=2e-3)

    def reconstruction() -> float:
        torch.manual_seed(5)  # the same posterior noise each time
        with torch.no_grad():
            return stage.loss(stage.model, batch)[1]["reconstruction"]

    before = reconstruction()
    for _ in range(8):
        loss, _ = stage.loss(stage.model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert reconstruction() < 0.8 * before


def test_frozen_encoder_stays_bit_identical_without_optimizer_state(base, tmp_path):
    data = clip_data(base)
    val = clips_of(base, 3, "val")
    train = TrainConfig(max_steps=3, cpu=True, log_every=1, checkpoint_every=3, progress=False, ema_decay=0.9)
    cfg = stage_config(base, architecture="autoencoder-kl-temporal", train_encoder=False, validation_images=2,
                       train=train)
    torch.manual_seed(0)
    stage = AutoencoderStage(cfg, val)
    before = {n: p.detach().clone() for n, p in stage.model.state_dict().items()}
    encoder = {n for n, _ in encoder_parameters(stage.model)}
    trainer = Trainer(train, stage, build_loader(data), tmp_path, micro_batch_size=data.batch_size)
    result = trainer.fit()
    assert result.step == 3

    optimized = {id(p) for group in trainer.state.opt.param_groups for p in group["params"]}
    named = dict(stage.model.named_parameters())
    assert not any(id(named[n]) in optimized for n in encoder)
    assert {id(p) for p in trainer.state.opt.state} == optimized  # no state for anything but the decoder
    assert len(optimized) == len(named) - len(encoder)
    assert set(trainer.state.ema.params) == set(named) - encoder
    for n in encoder:
        assert torch.equal(named[n].detach(), before[n]), n
    assert not torch.equal(named["decoder.time_conv_out.weight"].detach(), before["decoder.time_conv_out.weight"])

    # the export: the encoder's weights and latent scale unchanged, the architecture recorded, loaded back
    exported = load_autoencoder(result.export_path)
    assert isinstance(exported, TemporalDecoderAutoencoder)
    assert json.loads(result.export_path.with_suffix(".json").read_text())["architecture"] == "autoencoder-kl-temporal"
    assert exported.config.scaling_factor == IMAGE_AE.scaling_factor  # no refit with a frozen encoder
    state = exported.state_dict()
    for n in encoder:
        assert torch.equal(state[n], before[n]), n
    # validation on clips: PSNR, flicker, a contact sheet of 2 clips each over its reconstruction (5 frames a row)
    assert {"val/psnr", "val/flicker"} <= set(result.metrics)
    sheet = Image.open(sorted((tmp_path / "validation").glob("reconstruction_*.png"))[-1])
    assert sheet.size == ((2 + 5 * 34) * 2, (2 + 4 * 34) * 2)


def test_export_round_trip_and_clip_scaling_fit(base, tmp_path):
    val = clips_of(base, 4, "val")
    torch.manual_seed(0)
    stage = AutoencoderStage(stage_config(base, architecture="autoencoder-causal-3d"), val)
    path = stage.export(stage.model, tmp_path / "export")
    assert json.loads(path.with_suffix(".json").read_text())["architecture"] == "autoencoder-causal-3d"
    loaded = load_autoencoder(path)
    assert isinstance(loaded, CausalAutoencoder3D) and not loaded.training
    with torch.no_grad():
        z = loaded.encode(val).mode()  # (4, 4, 2, 8, 8): clip latents
        assert z.shape[2] == 2
        torch.testing.assert_close(loaded.config.scaling_factor, float(1 / z.std()), rtol=1e-5, atol=0)
        assert abs(float(loaded.scale_latents(z).std()) - 1.0) < 1e-4
        assert torch.equal(loaded.decode(z), stage.model.eval().decode(z))
    # an export of the image stage before this change (model.json without "architecture") loads as autoencoder-kl
    assert "architecture" not in json.loads(base["ae"].with_suffix(".json").read_text())
    assert isinstance(load_autoencoder(base["ae"]), AutoencoderKL)


def test_flicker_measures_frame_to_frame_change():
    x = torch.zeros(1, 3, 4, 8, 8)
    assert temporal_flicker(x + 0.5, x) == 0.0  # a constant error does not flicker
    noisy = x.clone()
    noisy[:, :, 1] += 0.4  # one frame off: two frame pairs change by 0.4 where the clip does not
    assert temporal_flicker(noisy, x) == pytest.approx(0.4 * 2 / 3)
    with pytest.raises(ValueError, match="T >= 2"):
        temporal_flicker(x[:, :, :1], x[:, :, :1])


@pytest.mark.parametrize("architecture, latent_frames", [("autoencoder-causal-3d", (2, 3)),
                                                         ("autoencoder-kl-temporal", (5, 9))])
def test_pipeline_caches_clip_latents_trains_and_samples_clips(base, tmp_path, architecture, latent_frames):
    """autoencoder → cache → diffusion on moving-digit clips: the causal 3-D autoencoder (T' = 1 + (T-1)/4, encoder
    trained) and SVD's temporal decoder (T' = T, encoder frozen: the cache holds the image autoencoder's latents)."""
    clips = base["clips"]
    overrides = [
        f"data.urls={clips}/train-000000.tar", f"val_data.urls={clips}/val-000000.tar", "data.num_workers=0",
        f"run.output_dir={tmp_path}", "run.name=video", "pipeline=[autoencoder,cache,diffusion]",
        f"autoencoder.architecture={architecture}", f"autoencoder.inflate_from={base['ae']}",
        f"autoencoder.train_encoder={architecture == 'autoencoder-causal-3d'}", "autoencoder.batch_size=4",
        "autoencoder.train.max_steps=2", "autoencoder.train.checkpoint_every=2", "autoencoder.train.progress=false",
        "autoencoder.validation_images=2", "diffusion.inflate_from=null", "diffusion.text_encoder.checkpoint=null",
        "diffusion.model.dit.hidden_size=32", "diffusion.model.dit.depth=1", "diffusion.model.dit.num_heads=2",
        "diffusion.batch_size=4", "diffusion.train.max_steps=2", "diffusion.train.checkpoint_every=2",
        "diffusion.train.progress=false", "diffusion.sampling.steps=2",
        "diffusion.validation_prompts=[a handwritten digit one moving up]", "data.batch_size=4", "cache.batch_size=8",
    ]
    if architecture == "autoencoder-causal-3d":  # compresses time: a window of cached latent frames would be wrong
        overrides.append("cache.clip_frames=null")
    cfg = load_config(RunConfig, ["video-autoencoder"], overrides)  # the preset, at toy size
    produced = run_pipeline(cfg)
    assert produced["diffusion"].step == 2
    run = tmp_path / "video"
    ae = load_autoencoder(run / "autoencoder" / "export" / "model.safetensors")
    assert type(ae) is {"autoencoder-causal-3d": CausalAutoencoder3D,
                        "autoencoder-kl-temporal": TemporalDecoderAutoencoder}[architecture]

    # the cache holds clip latents of T' frames: the posterior of the trained encoder
    val = dataclasses.replace(cfg.val_data, batch_size=4)
    cached = next(iter(build_loader(cache_data_config(run / "cache", "val", val))))
    assert cached.latents.shape[1:] == (8, latent_frames[0], 8, 8)
    first = first_batches(val, 1, 1)[0]
    assert cached.metadata[0]["source_key"] == first.keys[0]
    encoders = [ae] + ([load_autoencoder(base["ae"])] if architecture == "autoencoder-kl-temporal" else [])
    for encoder in encoders:  # a frozen encoder: the image autoencoder's latents
        with torch.no_grad():
            posterior = encoder.encode(first.pixels)
        torch.testing.assert_close(cached.latents[0], torch.cat([posterior.mean, posterior.logvar], 1)[0],
                                   rtol=1e-4, atol=1e-5)

    # validation during training drew 5-frame clips (mp4), decoded from T' latent frames
    mp4 = sorted((run / "diffusion" / "validation").glob("*.mp4"))
    assert mp4
    with av.open(str(mp4[-1])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5

    # sampling from the finished run: clips of the asked length; image-to-video conditioning = first latent frame
    pipe = open_run(run, device="cpu")
    assert pipe.latent_shape(num_frames=5) == (4, latent_frames[0], 8, 8)
    assert pipe.latent_shape(num_frames=9) == (4, latent_frames[1], 8, 8)
    assert pipe.generate(["a handwritten digit one moving up"], num_frames=9).shape == (1, 3, 9, 32, 32)
    with torch.no_grad():
        clip_first = ae.scale_latents(ae.encode(first.pixels).mode())[:, :, :1]
    torch.testing.assert_close(pipe.first_frame_latents(first.pixels[:, :, 0]), clip_first, rtol=1e-4, atol=1e-5)
