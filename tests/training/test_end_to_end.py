"""The whole pipeline on the digits demo shards: it learns, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from data_pipeline.demo import build_demo_set
from training.config_io import load_config
from training.run_config import RunConfig
from training.runner import run_pipeline


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    build_demo_set(out, progress=False)
    return out


def _config(demo, run_dir, name, *overrides):
    base = [
        f"data.urls={demo}/train-{{000000..000001}}.tar", f"val_data.urls={demo}/val-000000.tar",
        f"run.output_dir={run_dir}", f"run.name={name}", "data.num_workers=0",
        "autoencoder.train.progress=false", "diffusion.train.progress=false",
    ]
    return load_config(RunConfig, ["quickstart"], [*base, *overrides])


@pytest.mark.timeout(1500)  # ~1 min on a quiet 2-core machine; far longer when the cores are shared
def test_pixel_space_dit_learns_the_digits(demo, tmp_path):
    """A small pixel-space DiT on 8×8 digits: the loss falls and guided samples are read as the digit asked for
    far above chance (10%), while the unconditional model's are not."""
    cfg = _config(
        demo, tmp_path, "pixels", "pipeline=[diffusion]", "diffusion.latents=pixels",
        "data.resolution=8", "val_data.resolution=8", "diffusion.model.dit.in_channels=3",
        "diffusion.model.dit.hidden_size=96", "diffusion.model.dit.depth=3", "diffusion.train.max_steps=400",
        "diffusion.train.optim.lr=2.0e-3",
        "diffusion.train.optim.warmup_steps=20", "diffusion.train.ema_decay=0.99", "diffusion.train.log_every=20",
        "diffusion.sampling.steps=25", "report.samples_per_digit=6", "report.guidance_scales=[0.0, 3.0]",
        "diffusion.validation_prompts=[]",
    )
    produced = run_pipeline(cfg)
    result = produced["diffusion"]
    assert result.step == 400
    report = json.loads((tmp_path / "pixels" / "report.json").read_text())
    guided = report["digit_accuracy_guidance_3"]
    unconditional = report["digit_accuracy_guidance_0"]
    assert guided >= 0.5, report
    assert unconditional <= 0.3, report
    assert (tmp_path / "pixels" / "report" / "samples_guidance_3.png").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "pixels" / "diffusion" / "logs" / "diffusion")).Reload()
    losses = [e.value for e in events.Scalars("loss")]
    assert len(losses) >= 10 and losses[-1] < 0.6 * losses[0], losses

    # `loom sample` draws from the finished run (exported EMA weights, and the last checkpoint's EMA)
    from PIL import Image

    from launch import cli

    for weights in ("export", "latest"):
        code = cli.main(["sample", f"run_dir={tmp_path / 'pixels'}", f"weights={weights}",
                         "prompts=[a handwritten digit four, a handwritten digit seven]", "num_per_prompt=3",
                         "sampling.steps=20", f"output=sample_{weights}.png"])
        assert code == 0
        grid = Image.open(tmp_path / "pixels" / f"sample_{weights}.png")
        assert grid.size == (2 * (2 + 3 * (8 + 2)), 2 * (2 + 2 * (8 + 2)))  # 3 columns, 2 rows of 8 px, ×2


def test_latent_chain_resume_equals_uninterrupted(demo, tmp_path):
    """autoencoder → cache → diffusion; stopping the diffusion stage after 3 steps and re-running the same command
    gives bit-identical weights to a run that never stopped (data position, RNG, optimizer and EMA restored)."""
    common = ["autoencoder.train.max_steps=4", "autoencoder.train.checkpoint_every=4", "diffusion.batch_size=32",
              "diffusion.model.dit.hidden_size=32", "diffusion.model.dit.depth=1", "diffusion.model.dit.num_heads=2",
              "diffusion.train.checkpoint_every=3", "diffusion.validation_prompts=[]", "report.enabled=false",
              "data.num_workers=1", "diffusion.validation_loss_batches=1",
              "diffusion.train.optim.schedule=constant", "diffusion.train.optim.warmup_steps=0"]
    straight = _config(demo, tmp_path, "straight", *common, "diffusion.train.max_steps=6")
    run_pipeline(straight)
    interrupted = _config(demo, tmp_path, "interrupted", *common, "diffusion.train.max_steps=3")
    run_pipeline(interrupted)
    resumed = _config(demo, tmp_path, "interrupted", *common, "diffusion.train.max_steps=6")
    run_pipeline(resumed)

    a = load_file(str(tmp_path / "straight" / "diffusion" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "interrupted" / "diffusion" / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # and the run really stopped and resumed: its checkpoints are at steps 3 and 6
    steps = sorted(p.name for p in (tmp_path / "interrupted" / "diffusion" / "checkpoints").iterdir())
    assert steps[-1] == "step_00000006"
