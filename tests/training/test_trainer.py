"""The trainer on a small real regression problem: loss falls, resume is exact, NaNs are skipped and counted,
a crash mid-save leaves the previous checkpoint loadable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from training.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from training.stages.base import Stage
from training.trainer import NonFiniteLossError, OptimConfig, TrainConfig, Trainer


class ListLoader:
    """A deterministic loader with a position (the trainer saves and restores it)."""

    def __init__(self, n: int = 64, batch: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
        self.batch, self.pos, self.epoch = batch, 0, 0

    def __iter__(self):
        while self.pos < len(self.x):
            i = self.pos
            self.pos += self.batch
            yield (self.x[i : i + self.batch], self.y[i : i + self.batch])
        self.pos, self.epoch = 0, self.epoch + 1

    def state_dict(self):
        return {"pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, sd):
        self.pos, self.epoch = sd["pos"], sd["epoch"]

    def stats(self):
        return {"skipped": {"corrupt_image": 0}}


class Regression(Stage):
    name = "regression"

    def __init__(self, poison_steps: set[int] = frozenset()):
        torch.manual_seed(1)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.poison_steps, self.calls = set(poison_steps), 0

    def trainable(self):
        return self.model

    def loss(self, model, batch):
        x, y = batch
        self.calls += 1
        noise = torch.randn_like(y) * 0.01  # uses the global RNG: resume must restore it
        loss = ((model(x) - y - noise) ** 2).mean()
        if self.calls in self.poison_steps:
            loss = loss * float("nan")
        return loss, {}


def _train(tmp: Path, steps: int, resume: str = "auto", stage: Stage | None = None, **kw) -> tuple:
    cfg = TrainConfig(max_steps=steps, log_every=1, checkpoint_every=kw.pop("checkpoint_every", 4), cpu=True,
                      resume=resume, progress=False, optim=OptimConfig(lr=1e-2), ema_decay=0.9, **kw)
    stage = stage or Regression()
    losses = []
    orig = stage.loss

    def recording(model, batch):
        loss, logs = orig(model, batch)
        losses.append(float(loss.detach()))
        return loss, logs

    stage.loss = recording
    result = Trainer(cfg, stage, ListLoader(), tmp, seed=3).fit()
    return result, losses, stage


def test_loss_falls_and_checkpoints_are_kept(tmp_path):
    result, losses, _ = _train(tmp_path, 24, keep_checkpoints=2)
    assert result.step == 24
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4
    steps = [s for s, _ in list_checkpoints(tmp_path)]
    assert steps == [20, 24]
    assert (tmp_path / "logs").exists()  # TensorBoard events


def test_resume_continues_with_identical_losses(tmp_path):
    _, full, _ = _train(tmp_path / "a", 12)
    _, first, _ = _train(tmp_path / "b", 8, checkpoint_every=8)
    _, rest, _ = _train(tmp_path / "b", 12, resume="latest", checkpoint_every=8)
    assert len(first) == 8 and len(rest) == 4
    torch.testing.assert_close(torch.tensor(first + rest), torch.tensor(full), rtol=0, atol=0)


def test_nonfinite_losses_are_skipped_and_counted(tmp_path):
    result, _, stage = _train(tmp_path, 8, stage=Regression(poison_steps={3, 5}))
    assert result.step == 8
    assert result.metrics["nonfinite_steps"] == 2
    assert all(torch.isfinite(p).all() for p in stage.model.parameters())


def test_too_many_nonfinite_in_a_row_stops_with_clear_error(tmp_path):
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        _train(tmp_path, 10, stage=Regression(poison_steps={2, 3, 4}), max_nonfinite_steps=3)


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    _train(tmp_path, 4)
    good = latest_checkpoint(tmp_path)
    assert good is not None and good.name == "step_00000004"

    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    boom = RuntimeError("disk full")

    def failing_save_state(path, **kw):
        os.makedirs(path, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        raise boom

    monkeypatch.setattr(acc, "save_state", failing_save_state)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(acc, tmp_path, 8, {}, None, None, None, keep=3)
    assert latest_checkpoint(tmp_path) == good
    state = json.loads((good / "trainer_state.json").read_text())
    assert state["step"] == 4
    # and the run resumes from it
    result, losses, _ = _train(tmp_path, 6, resume="latest")
    assert result.step == 6 and len(losses) == 2
