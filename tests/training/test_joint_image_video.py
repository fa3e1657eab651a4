"""Joint image+video training (Imagen Video, Ho et al. 2022: images as one-frame clips): a video run whose data mixes
an image shard set with a clip shard set caches both, trains on one-frame and five-frame batches through the one
model, and never hands an image its own frame as image-to-video conditioning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_pipeline.demo import digit_samples, write_split_set
from data_pipeline.moving_digits import CRF, clip_samples
from data_pipeline.writer import WriterOptions
from models.autoencoder import AutoencoderConfig, AutoencoderKL
from training.config_io import load_config
from training.run_config import RunConfig
from training.runner import run_pipeline
from training.stages.autoencoder import export_module


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory) -> tuple[Path, RunConfig]:
    root = tmp_path_factory.mktemp("joint")
    write_split_set(root / "clips", lambda split: clip_samples(split)[:16], WriterOptions(16, video_crf=CRF), 0.1,
                    False)
    write_split_set(root / "images", lambda split: digit_samples(split)[:16], WriterOptions(16), 0.1, False)
    torch.manual_seed(0)
    ae = AutoencoderKL(AutoencoderConfig(block_out_channels=[8, 8, 8], layers_per_block=1, norm_num_groups=4,
                                         latent_channels=4))
    ae_path = export_module(ae, ae.config, root / "ae")
    overrides = [
        "data.urls=", "data.image_keys=[mp4, png]", "data.num_workers=0", "data.batch_size=4",
        f"data.sources=[{{urls: {root}/clips/train-000000.tar, name: clips}}, "
        f"{{urls: {root}/images/train-000000.tar, name: images}}]",
        f"val_data.urls={root}/clips/val-000000.tar",
        f"run.output_dir={root / 'runs'}", "run.name=joint", "pipeline=[cache,diffusion]", "diffusion.batch_size=4", "diffusion.inflate_from=null",
        f"diffusion.autoencoder_weights={ae_path}", "diffusion.text_encoder.checkpoint=null",
        "diffusion.model.dit.hidden_size=32", "diffusion.model.dit.depth=1", "diffusion.model.dit.num_heads=2",
        "diffusion.train.max_steps=8", "diffusion.train.checkpoint_every=8", "diffusion.train.progress=false",
        "diffusion.sampling.steps=2", "diffusion.validation_prompts=[]", "report.enabled=false",
    ]
    cfg = load_config(RunConfig, ["quickstart-video"], overrides)
    produced = run_pipeline(cfg)
    assert produced["diffusion"].step == 8
    return root / "runs" / "joint", cfg


def test_joint_run_trains_on_images_and_clips(joint_run, monkeypatch):
    from data_pipeline.loader import build_loader
    from training.builders import diffusion_stage

    run_dir, cfg = joint_run
    cached = sorted(p.name for p in (run_dir / "cache").glob("train-*.tar"))
    assert cached, "the cache stage wrote no shards"
    stage, data = diffusion_stage(cfg, run_dir, with_validation_data=False)  # the stage exactly as the run built it
    stage.setup(torch.device("cpu"), torch.float32)
    model = stage.trainable()
    seen: list[tuple[int, bool]] = []  # (frames, image conditioning all null) per batch the objective sees
    forward = model.forward

    def spy(x_t, timesteps, cond):
        seen.append((x_t.shape[2], bool((cond.image_latents == 0).all())))
        return forward(x_t, timesteps, cond)

    monkeypatch.setattr(model, "forward", spy)
    for i, batch in enumerate(build_loader(data, rank=0, world_size=1)):
        stage.loss(model, batch)
        if i == 11:
            break
    frames = {f for f, _ in seen}
    assert frames == {1, 5}, seen  # both kinds of batch reach the model from the one mixed, cached stream
    assert all(null for f, null in seen if f == 1), seen  # an image never conditions on itself
    assert not all(null for f, null in seen if f == 5), seen  # clips keep their first frame (dropout 0.4)
