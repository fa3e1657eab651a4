"""Run by test_ddp_equivalence.py, as one process or as two under ``accelerate launch``:

    python equivalence_script.py SHARDS OUT BATCH
    accelerate launch --config_file launch/accelerate/ddp_cpu_gloo.yaml equivalence_script.py SHARDS OUT BATCH

Trains a deterministic stage (a small autoencoder of the 8×8 pixels, plain MSE: no noise, no dropout, so the loss
of a batch is a function of the weights and the images alone) with the real Trainer on the real streaming loader
for a few steps. Each rank writes ``OUT/rank<r>.json`` (its rank, the world size and the keys of every batch it
trained on); rank 0 exports the weights (``OUT/export/model.safetensors``) and the TensorBoard log has the loss
and gradient norm of every step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from data_pipeline.data_config import DataConfig
from data_pipeline.loader import build_loader
from training.builders import distributed_position
from training.stages.base import Stage
from training.trainer import OptimConfig, TrainConfig, Trainer

STEPS = 4


class PixelAutoencoder(Stage):
    name = "pixels"

    def __init__(self) -> None:
        torch.manual_seed(0)  # the same initial weights in every process
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.Tanh(), nn.Linear(32, 3 * 8 * 8))
        self.keys: list[list[str]] = []

    def trainable(self) -> nn.Module:
        return self.model

    def loss(self, model, batch):
        self.keys.append(list(batch.keys))
        x = batch.pixels  # (B, 3, 8, 8)
        return ((model(x).view_as(x) - x) ** 2).mean(), {}

    def export(self, model, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "model.safetensors"
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
        return path


def main() -> None:
    shards, out, batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    rank, world = distributed_position()
    data = DataConfig(urls=shards, resolution=8, batch_size=batch, num_workers=0, shuffle_buffer=0,
                      shard_shuffle=False)
    stage = PixelAutoencoder()
    # Adam with eps = 1: for these small gradients (~1e-3) the update is ~ lr × (bias-corrected) gradient, so a
    # gradient summed over ranks instead of averaged would show in the weights (plain Adam would hide the scale).
    cfg = TrainConfig(max_steps=STEPS, cpu=True, progress=False, log_every=1, checkpoint_every=10_000,
                      ema_decay=None, resume="none",
                      optim=OptimConfig(lr=1.0, eps=1.0, max_grad_norm=1.0e6))  # clipping off, norm logged
    Trainer(cfg, stage, build_loader(data, rank, world), out, micro_batch_size=batch, seed=0).fit()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world": world, "keys": stage.keys}))


if __name__ == "__main__":
    main()
