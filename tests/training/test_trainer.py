"""The trainer on a small real regression problem: loss falls, resume is exact (losses, EMA, loader position), NaNs
are skipped and counted, a crash mid-save leaves the previous checkpoint loadable, a signal checkpoints and stops,
``train_step`` can be overridden; the EMA's fused update equals the per-parameter formula."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from data_pipeline.memory import InMemoryLoader
from training.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from training.ema import EMA
from training.stages.base import Stage
from training.trainer import NonFiniteLossError, OptimConfig, TrainConfig, Trainer


def regression_batches(n: int = 64, batch: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n // batch`` batches ``(x (B, 4), y (B, 1))`` of a noiseless linear regression."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


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


def _train(tmp: Path, steps: int, resume: str = "auto", stage: Stage | None = None, trainer_cls: type = Trainer,
           **kw) -> tuple:
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
    result = trainer_cls(cfg, stage, InMemoryLoader(regression_batches()), tmp, micro_batch_size=8, seed=3).fit()
    return result, losses, stage


def test_loss_falls_and_checkpoints_are_kept(tmp_path):
    result, losses, _ = _train(tmp_path, 24, keep_checkpoints=2)
    assert result.step == 24
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4
    steps = [s for s, _ in list_checkpoints(tmp_path)]
    assert steps == [20, 24]
    assert (tmp_path / "logs").exists()  # TensorBoard events


def test_resume_continues_with_identical_losses(tmp_path):
    """Cut at step 8 (the end of the loader's first epoch): the same losses, and a bit-identical EMA and loader
    position at step 12."""
    _, full, _ = _train(tmp_path / "a", 12)
    _, first, _ = _train(tmp_path / "b", 8, checkpoint_every=8)
    _, rest, _ = _train(tmp_path / "b", 12, resume="latest", checkpoint_every=8)
    assert len(first) == 8 and len(rest) == 4
    torch.testing.assert_close(torch.tensor(first + rest), torch.tensor(full), rtol=0, atol=0)
    ema_a = load_file(str(tmp_path / "a" / "checkpoints" / "step_00000012" / "ema.safetensors"))
    ema_b = load_file(str(tmp_path / "b" / "checkpoints" / "step_00000012" / "ema.safetensors"))
    assert ema_a.keys() == ema_b.keys() and int(ema_a["num_updates"]) == 12
    for k in ema_a:
        assert torch.equal(ema_a[k], ema_b[k]), k
    loader_a, loader_b = (json.loads((tmp_path / r / "checkpoints" / "step_00000012" / "loader_rank0.json")
                                     .read_text()) for r in "ab")
    assert loader_a == loader_b == {"epoch": 1, "index": 4, "batches_per_epoch": 8}


def test_train_step_can_be_overridden(tmp_path):
    """A subclass wraps ``train_step``: fit() calls it once per step and the run is the base trainer's."""

    class Counting(Trainer):
        seen: list = []

        def train_step(self, state):
            logs = super().train_step(state)  # on the device: read here only because the test asks
            self.seen.append((state.step, None if bool(logs.skipped) else round(float(logs.values["loss"]), 6)))
            return logs

    _, base, _ = _train(tmp_path / "base", 6)
    result, losses, _ = _train(tmp_path / "sub", 6, stage=Regression(poison_steps={2}), trainer_cls=Counting)
    assert [s for s, _ in Counting.seen] == [1, 2, 3, 4, 5, 6]
    assert Counting.seen[1][1] is None and Counting.seen[0][1] == round(losses[0], 6)
    assert result.metrics["nonfinite_steps"] == 1 and losses[0] == base[0]


def test_signal_checkpoints_and_stops_then_resumes(tmp_path):
    """SIGUSR1 mid-run (SLURM pre-emption): a checkpoint at the end of that step, then return; running again
    resumes to the same losses as a run never interrupted."""

    class Preempted(Regression):
        def loss(self, model, batch):
            if self.calls == 4:  # during step 5
                os.kill(os.getpid(), signal.SIGUSR1)
            return super().loss(model, batch)

    _, full, _ = _train(tmp_path / "a", 8)
    stopped, first, _ = _train(tmp_path / "b", 8, stage=Preempted())
    assert stopped.stopped_by_signal == signal.SIGUSR1 and stopped.step == 5 and stopped.export_path is None
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [4, 5]
    result, rest, _ = _train(tmp_path / "b", 8)
    assert result.step == 8 and result.stopped_by_signal is None
    torch.testing.assert_close(torch.tensor(first + rest), torch.tensor(full), rtol=0, atol=0)


def test_micro_batch_size_is_required_and_the_loader_checked(tmp_path):
    cfg = TrainConfig(max_steps=1, cpu=True, progress=False)
    loader = InMemoryLoader(regression_batches())
    with pytest.raises(TypeError, match="micro_batch_size"):
        Trainer(cfg, Regression(), loader, tmp_path)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="micro_batch_size=0"):
        Trainer(cfg, Regression(), loader, tmp_path, micro_batch_size=0)

    class Positionless:
        def __iter__(self):
            return iter(regression_batches())

    with pytest.raises(TypeError, match="Positionless: missing state_dict, load_state_dict, stats"):
        Trainer(cfg, Regression(), Positionless(), tmp_path, micro_batch_size=8)


# ------------------------------------------------------------------------------------------------ EMA


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    net[0].bias.requires_grad_(False)  # frozen: not averaged
    return net


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_update_equals_the_per_parameter_formula(warmup):
    """The fused update over the pairs resolved at construction equals ``s = d s + (1 - d) p`` computed parameter by
    parameter (the decay ramping under warm-up), including after ``.to()`` re-binds the shadow tensors."""
    net = _net()
    ema = EMA(net.named_parameters(), decay=0.95, warmup=warmup).to("cpu")
    reference = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    assert set(ema.shadow) == set(reference) == {"0.weight", "2.weight", "2.bias"}
    g = torch.Generator().manual_seed(1)
    for n_updates in range(12):
        with torch.no_grad():  # an optimizer step: in place, the same parameter objects
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        d = min(0.95, (1 + n_updates) / (10 + n_updates)) if warmup else 0.95
        ema.update()
        for name, p in net.named_parameters():
            if name in reference:
                reference[name] = d * reference[name] + (1 - d) * p.detach()
        if n_updates == 5:
            ema.to("cpu")
    assert ema.num_updates == 12
    for name, v in reference.items():
        torch.testing.assert_close(ema.shadow[name], v, msg=name)
        assert not torch.equal(ema.shadow[name], dict(net.named_parameters())[name].detach())


def test_ema_of_half_precision_parameters_and_tracking():
    """Parameters held in bf16 are averaged in fp32 (cast at each update); ``tracks`` says whether a module's
    parameters are still the objects the EMA averages."""
    net = _net().to(torch.bfloat16)
    ema = EMA(net.named_parameters(), decay=0.5, warmup=False)
    assert {v.dtype for v in ema.shadow.values()} == {torch.float32}
    before = {n: v.clone() for n, v in ema.shadow.items()}
    with torch.no_grad():
        net[2].weight.add_(1.0)
    ema.update()
    expected = 0.5 * before["2.weight"] + 0.5 * net[2].weight.detach().float()
    torch.testing.assert_close(ema.shadow["2.weight"], expected)
    assert ema.tracks(net.named_parameters())
    net[2].weight = nn.Parameter(net[2].weight.detach().clone())  # replaced: the EMA would average a stale tensor
    assert not ema.tracks(net.named_parameters())


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
