"""Inference without training objects: ``Inference.generate`` is the sampling path the stages, the report and
``loom sample`` share; ``open_run`` rebuilds it from a run directory; the latent shape comes from the autoencoder."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.autoencoder import AutoencoderConfig, AutoencoderKL
from models.dit import DiT, DiTConfig
from models.text_encoder import TextEncoderConfig
from training.builders import build_text_encoder, open_run
from training.config_io import from_dict, save_config
from training.diffusion import DiffusionConfig, build_process
from training.inference import Inference
from training.run_config import RunConfig
from training.sampling import SamplingConfig, sample_latents
from training.stages.autoencoder import export_module
from training.stages.diffusion import DiffusionStage, DiffusionStageConfig

TE = TextEncoderConfig(model="openclip-tiny-text", layer="last")  # width 64, pooled 32
PROMPTS = ["a handwritten digit four", "a handwritten digit seven"]


pytestmark = pytest.mark.usefixtures("one_thread")


def dit(in_channels: int = 3, **kw) -> DiT:
    torch.manual_seed(0)
    return DiT(DiTConfig(sample_size=4, patch_size=2, in_channels=in_channels, hidden_size=32, depth=2, num_heads=2,
                         context_dim=64, pooled_dim=32, **kw)).eval()


def tiny_autoencoder() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(AutoencoderConfig(block_out_channels=[8, 8], layers_per_block=1, latent_channels=4,
                                           norm_num_groups=4)).eval()


def pixel_run(tmp_path) -> tuple:
    """A finished pixel-space run directory: config.yaml, the random text encoder, an exported DiT."""
    cfg = from_dict(RunConfig, {
        "run": {"output_dir": str(tmp_path), "name": "run", "seed": 3}, "data": {"resolution": 8},
        "diffusion": {"latents": "pixels", "text_encoder": {"model": TE.model, "layer": TE.layer},
                      "model": {"dit": {"sample_size": 4, "patch_size": 2, "in_channels": 3, "hidden_size": 32,
                                        "depth": 2, "num_heads": 2, "context_dim": 64, "pooled_dim": 32}},
                      "process": {"schedule": "cosine", "prediction": "v_prediction"},
                      "sampling": {"steps": 4, "guidance": 3.0, "seed": 5}},
    })
    run_dir = tmp_path / "run"
    save_config(cfg, run_dir / "config.yaml")
    model = dit()
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero starts at zero: make the output depend on everything
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    export_module(model, cfg.diffusion.model_config, run_dir / "diffusion" / "export")
    return cfg, run_dir, model


def test_open_run_generates_what_the_parts_generate_by_hand(tmp_path):
    cfg, run_dir, model = pixel_run(tmp_path)
    pipe = open_run(run_dir, device="cpu")
    assert pipe.image_size == (8, 8) and pipe.autoencoder is None
    images = pipe.generate(PROMPTS)
    assert images.shape == (2, 3, 8, 8)

    # the same draw spelled out: text encoder → trimmed (prompt, empty prompt) → guided DDIM in pixel space
    text = build_text_encoder(cfg.diffusion.text_encoder, run_dir, cfg.run.seed)
    from models.conditioning import trim_together

    cond, null = trim_together(text.encode(PROMPTS), text.encode(["", ""]))
    by_hand = sample_latents(model, build_process(cfg.diffusion.process), cond, null, (2, 3, 8, 8),
                             cfg.diffusion.sampling, torch.device("cpu")).clamp(-1, 1)
    torch.testing.assert_close(images, by_hand, rtol=0, atol=1e-6)

    # guidance 0 is the unconditional model alone; another seed gives other images; the sampling override holds
    assert not torch.allclose(pipe.generate(PROMPTS, guidance=0.0), images)
    other = dataclasses.replace(pipe.sampling, seed=6)
    assert not torch.allclose(pipe.generate(PROMPTS, sampling=other), images)
    assert pipe.generate(PROMPTS, height=12, width=16).shape == (2, 3, 12, 16)


def test_open_run_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        open_run(tmp_path / "nothing")
    _, run_dir, _ = pixel_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="latest"):
        open_run(run_dir, weights="latest")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        open_run(run_dir, weights=str(tmp_path / "missing.safetensors"))


def test_latent_shape_comes_from_the_autoencoder():
    ae = tiny_autoencoder()
    f = ae.spatial_factor
    pipe = Inference(dit(in_channels=4), build_process(DiffusionConfig()), None, ae, SamplingConfig(),
                     (8 * f, 8 * f))
    assert pipe.latent_shape() == (4, 8, 8)
    assert pipe.latent_shape(4 * f, 6 * f) == (4, 4, 6)
    assert pipe.latent_shape(4 * f, 6 * f, num_frames=3) == (4, 3, 4, 6)
    pixels = Inference(dit(), build_process(DiffusionConfig()), None, None, SamplingConfig(), (8, 8))
    assert pixels.latent_shape(num_frames=2) == (3, 2, 8, 8)


def test_clips_are_generated_in_the_clip_layout(tmp_path):
    """``num_frames`` asks for (B, C, T, H, W) clips; each frame is drawn through the same per-frame decoder."""
    from training.builders import build_text_encoder

    ae = tiny_autoencoder()
    text = build_text_encoder(TE, tmp_path, 0)
    f = ae.spatial_factor
    pipe = Inference(dit(in_channels=4), build_process(DiffusionConfig()), text, ae,
                     SamplingConfig(steps=2), (4 * f, 4 * f))
    clips = pipe.generate(PROMPTS, num_frames=3)
    assert clips.shape == (2, 3, 3, 4 * f, 4 * f)
    assert torch.isfinite(clips).all()


def test_validation_samples_of_a_micro_conditioned_denoiser(tmp_path):
    """A DiT trained with SDXL size/crop micro-conditioning needs ``cond.vector`` at sampling too: validation and
    ``Inference`` give it the vector of an uncropped image of the requested size (they gave none and the DiT
    refused)."""
    text = build_text_encoder(TE, tmp_path, 0)
    cfg = DiffusionStageConfig(
        model={"dit": dataclasses.replace(dit().config, vector_dim=6 * 8)}, text_encoder=TE, latents="pixels",
        micro_conditioning=True, sampling=SamplingConfig(steps=2), validation_prompts=PROMPTS)
    stage = DiffusionStage(cfg, text, None, (8, 8))
    stage.setup(torch.device("cpu"), torch.float32)
    stage.validate(stage.model.eval(), 1, tmp_path / "validation")
    assert (tmp_path / "validation" / "samples_00000001.png").exists()
    pipe = stage.inference(stage.model)
    assert pipe.micro_fourier_dim == 8
    cond, _ = pipe.conditioning(PROMPTS, "", 8, 12)
    assert cond.vector.shape == (2, 6 * 8)
    cond_other, _ = pipe.conditioning(PROMPTS, "", 16, 12)
    assert not torch.equal(cond.vector, cond_other.vector)  # the size enters the vector


def test_loom_sample_writes_clips_as_mp4_gif_and_contact_sheet(tmp_path):
    """``loom sample num_frames=N``: a contact sheet (one clip per row), an mp4 per clip, an animated grid per
    prompt."""
    import av
    from PIL import Image

    from launch import cli

    _, run_dir, _ = pixel_run(tmp_path)
    code = cli.main(["sample", f"run_dir={run_dir}", "prompts=[a handwritten digit four, a handwritten digit two]",
                     "num_per_prompt=2", "num_frames=3", "fps=6", "sampling.steps=2", "device=cpu",
                     "output=clips.png"])
    assert code == 0
    sheet = Image.open(run_dir / "clips.png")
    assert sheet.size == (2 * (2 + 3 * (8 + 2)), 2 * (2 + 4 * (8 + 2)))  # 3 frames a row, 4 clips, ×2
    for i in range(2):
        with Image.open(run_dir / f"clips-p{i}.gif") as gif:
            assert gif.n_frames == 3
        for j in range(2):
            with av.open(str(run_dir / f"clips-p{i}-{j}.mp4")) as container:
                assert sum(1 for _ in container.decode(video=0)) == 3


def test_validation_of_a_clip_run_writes_a_contact_sheet_mp4s_and_an_animation(tmp_path):
    text = build_text_encoder(TE, tmp_path, 0)
    cfg = DiffusionStageConfig(model={"dit": dit().config}, text_encoder=TE, latents="pixels",
                               sampling=SamplingConfig(steps=2), validation_prompts=PROMPTS, validation_num_frames=3,
                               validation_fps=4.0)
    stage = DiffusionStage(cfg, text, None, (8, 8))
    stage.setup(torch.device("cpu"), torch.float32)
    stage.validate(stage.model.eval(), 7, tmp_path / "validation")
    from PIL import Image

    out = tmp_path / "validation"
    assert Image.open(out / "samples_00000007.png").size == (2 * (2 + 3 * (8 + 2)), 2 * (2 + 2 * (8 + 2)))
    with Image.open(out / "samples_00000007.gif") as gif:
        assert gif.n_frames == 3
    assert (out / "samples_00000007-p0.mp4").stat().st_size > 0 and (out / "samples_00000007-p1.mp4").exists()
    with pytest.raises(ValueError, match="validation_num_frames"):
        DiffusionStageConfig(validation_num_frames=0)
