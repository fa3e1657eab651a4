"""The video quickstart's chain at toy size, through the real commands: image models exported → a video run that
caches clip latents, inflates the image DiT into an image-to-video DiT, trains, reports the motion check → `loom
sample` animates a given first frame into mp4 clips."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_pipeline.demo import write_split_set
from data_pipeline.moving_digits import CRF, clip_samples
from data_pipeline.writer import WriterOptions
from models.autoencoder import AutoencoderConfig, AutoencoderKL
from models.dit import DiT, DiTConfig
from training.config_io import load_config
from training.run_config import RunConfig
from training.runner import run_pipeline
from training.stages.autoencoder import export_module

REPO = Path(__file__).resolve().parents[2]
IMAGE_DIT = DiTConfig(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                      context_dim=64, pooled_dim=32)


@pytest.fixture(scope="module")
def image_base(tmp_path_factory) -> dict[str, Path]:
    """Moving-digit shards (24 clips a split) and an exported tiny image autoencoder and image DiT."""
    root = tmp_path_factory.mktemp("video-quickstart")
    write_split_set(root / "clips", lambda split: clip_samples(split)[:24], WriterOptions(24, video_crf=CRF), 0.1,
                    False)
    torch.manual_seed(0)
    ae = AutoencoderKL(AutoencoderConfig(block_out_channels=[8, 8, 8], layers_per_block=1, norm_num_groups=4,
                                         latent_channels=4))
    dit = DiT(IMAGE_DIT)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return {"root": root, "ae": export_module(ae, ae.config, root / "ae"),
            "dit": export_module(dit, IMAGE_DIT, root / "dit"), "clips": root / "clips"}


def _video_config(base: dict[str, Path], out: Path, *extra: str) -> RunConfig:
    clips = base["clips"]
    overrides = [
        f"data.urls={clips}/train-000000.tar", f"val_data.urls={clips}/val-000000.tar", "data.num_workers=0",
        f"run.output_dir={out}", "run.name=video", "pipeline=[cache,diffusion]", "data.batch_size=4", "diffusion.batch_size=4",
        f"diffusion.inflate_from={base['dit']}", f"diffusion.autoencoder_weights={base['ae']}",
        "diffusion.text_encoder.checkpoint=null", "diffusion.model.dit.hidden_size=32",
        "diffusion.model.dit.depth=1", "diffusion.model.dit.num_heads=2", "diffusion.train.max_steps=3",
        "diffusion.train.checkpoint_every=3", "diffusion.train.log_every=1", "diffusion.train.progress=false",
        "diffusion.sampling.steps=2", "diffusion.validation_prompts=[a handwritten digit one moving up]",
        "report.samples_per_prompt=1", "report.first_frames_per_digit=1", "report.guidance_scales=[0.0, 2.0]",
        *extra,
    ]
    return load_config(RunConfig, ["quickstart-video"], overrides)


@pytest.fixture(scope="module")
def video_run(image_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    produced = run_pipeline(_video_config(image_base, out))
    assert produced["diffusion"].step == 3
    return out / "video"


def test_video_run_reports_motion_and_image_to_video(video_run):
    report = json.loads((video_run / "report.json").read_text())
    for prefix, g in (("t2v", "0"), ("t2v", "2"), ("i2v", "2")):
        for name in ("direction_accuracy", "digit_accuracy", "temporal_consistency"):
            value = report[f"{prefix}_{name}_guidance_{g}"]
            assert 0.0 <= value <= 1.0, (prefix, name, value)
    sheet = Image.open(video_run / "report" / "clips_guidance_2.png")
    assert sheet.width > 4 * sheet.height / 40  # 40 rows of 5-frame clips: wider than one frame per row
    assert (video_run / "report" / "image_to_video.png").exists()
    assert "Image-to-video" in (video_run / "report.md").read_text()
    # validation during training wrote clips too, and put them in TensorBoard as an animated grid
    assert list((video_run / "diffusion" / "validation").glob("*.mp4"))
    logged = EventAccumulator(str(video_run / "diffusion" / "logs" / "diffusion"), size_guidance={"images": 0})
    logged.Reload()
    clip_events = logged.Images("validation/samples")
    assert [e.step for e in clip_events] == [3]
    assert Image.open(io.BytesIO(clip_events[0].encoded_image_string)).n_frames == 5
    exported = json.loads((video_run / "diffusion" / "export" / "model.json").read_text())
    assert exported["concat_image_latents"] and exported["attention_layout"] == "full"
    assert exported["frame_position"] == "embedding" and exported["frame_embedding"] and exported["depth"] == 1


def test_loom_sample_animates_a_first_frame(video_run, tmp_path):
    first = np.zeros((40, 48, 3), np.uint8)
    first[10:30, 20:28] = 255  # a bar, larger than the clips and not square: resized and centre-cropped
    Image.fromarray(first).save(tmp_path / "first.png")
    cmd = [sys.executable, "-m", "launch", "sample", f"run_dir={video_run}", f"image={tmp_path / 'first.png'}",
           "prompts=[a handwritten digit one moving up]", "num_per_prompt=2", "num_frames=5",
           f"output={tmp_path / 'i2v.png'}", "sampling.steps=2"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    clips = sorted(tmp_path.glob("i2v-p0-*.mp4"))
    assert len(clips) == 2
    with av.open(str(clips[0])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)
    # an image without num_frames, and a missing file, stop before any work with the key named
    bad = subprocess.run([sys.executable, "-m", "launch", "sample", f"run_dir={video_run}",
                          f"image={tmp_path / 'missing.png'}", "num_frames=5"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "missing.png" in bad.stderr


def test_image_to_video_generate_checks(video_run):
    from training.builders import open_run

    pipe = open_run(video_run, device="cpu")
    assert pipe.image_conditioned
    first = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="give num_frames"):
        pipe.generate(["a handwritten digit one moving up"], first_frames=first)
    with pytest.raises(ValueError, match="2 first frames for 1 prompts"):
        pipe.generate(["a handwritten digit one moving up"], num_frames=5, first_frames=first.repeat(2, 1, 1, 1))


def test_inflate_from_errors(image_base, tmp_path):
    with pytest.raises(FileNotFoundError, match="inflate_from"):
        run_pipeline(_video_config(image_base, tmp_path, f"diffusion.inflate_from={tmp_path / 'nothing.safetensors'}",
                                   "pipeline=[diffusion]", "diffusion.latents=encode"))
    with pytest.raises(ValueError, match="inflate_from=.* and weights="):
        _video_config(image_base, tmp_path, f"diffusion.weights={image_base['dit']}")
    with pytest.raises(ValueError, match="hidden_size=64"):
        run_pipeline(_video_config(image_base, tmp_path, "diffusion.model.dit.hidden_size=64",
                                   "pipeline=[diffusion]", "diffusion.latents=encode", "run.name=wide"))


def test_checkpoint_directory_as_weights(video_run):
    """`weights=<checkpoint dir>` opens that checkpoint's EMA weights (the same as `latest` for the last one), for
    reading a run's learning curve checkpoint by checkpoint."""
    from training.builders import open_run
    from training.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(video_run / "diffusion")
    by_dir = open_run(video_run, weights=str(ckpt), device="cpu").denoiser.state_dict()
    latest = open_run(video_run, weights="latest", device="cpu").denoiser.state_dict()
    assert by_dir.keys() == latest.keys()
    assert all(torch.equal(by_dir[k], latest[k]) for k in by_dir)
