"""The trainer's speed options: the non-finite skip decided on the device (fused AdamW's ``found_inf``, the EMA's
zero weight) gives the run of the host-decided skip; activation checkpointing (blocks, selective) leaves losses and
gradients unchanged; channels-last trains and checkpoints; bad option values are refused by name."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_trainer import Regression, regression_batches  # noqa: E402

from data_pipeline.memory import InMemoryLoader  # noqa: E402
from models.conditioning import Conditioning  # noqa: E402
from models.dit import DiT, DiTConfig  # noqa: E402
from training.speedups import apply_activation_checkpointing, apply_channels_last, compile_blocks  # noqa: E402
from training.stages.base import Stage  # noqa: E402
from training.trainer import OptimConfig, TrainConfig, Trainer, adamw_kernel  # noqa: E402


def _fit(tmp: Path, stage: Stage, batches, implementation: str, **kw) -> Trainer:
    cfg = TrainConfig(max_steps=kw.pop("max_steps", 10), log_every=kw.pop("log_every", 4), checkpoint_every=5,
                      cpu=True, resume="none", progress=False, ema_decay=0.9, grad_accum=kw.pop("grad_accum", 2),
                      optim=OptimConfig(lr=1e-2, implementation=implementation), **kw)
    trainer = Trainer(cfg, stage, InMemoryLoader(batches), tmp, micro_batch_size=len(batches[0][0]), seed=3)
    trainer.fit()
    return trainer


def test_device_skip_equals_host_skip(tmp_path):
    """Poisoned micro-batches 5 and 12 (steps 3 and 6 with 2 micro-batches a step): the fused run skips on the device
    and reads the flags only at log lines; the for-loop run decides on the host. Same weights, EMA, counts."""
    runs = {}
    for impl in ("fused", "for_loop"):
        stage = Regression(poison_steps={5, 12})
        trainer = _fit(tmp_path / impl, stage, regression_batches(), impl)
        assert trainer.state.skip_on_device == (impl == "fused")
        runs[impl] = (stage.model.state_dict(), trainer.state.ema, trainer.state.result.metrics)
    (w_f, ema_f, m_f), (w_l, ema_l, m_l) = runs["fused"], runs["for_loop"]
    assert m_f["nonfinite_steps"] == m_l["nonfinite_steps"] == 2
    assert ema_f.num_updates == ema_l.num_updates == 8
    for k in w_f:
        assert torch.isfinite(w_f[k]).all()
        torch.testing.assert_close(w_f[k], w_l[k], rtol=1e-6, atol=1e-7, msg=k)
    for k in ema_f.shadow:
        torch.testing.assert_close(ema_f.shadow[k], ema_l.shadow[k], rtol=1e-6, atol=1e-7, msg=k)
    assert m_f["loss"] == pytest.approx(m_l["loss"], rel=1e-6)


def _dit() -> DiT:
    torch.manual_seed(0)
    return DiT(DiTConfig(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                         context_dim=16, caption_projection=True, adaln_single=True))


@pytest.mark.parametrize("mode", ["blocks", "selective"])
def test_activation_checkpointing_keeps_losses_and_gradients(mode):
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700])
    cond = Conditioning(context=torch.randn(2, 5, 16, generator=g))
    grads = []
    for m in ("none", mode):
        model = _dit()
        assert apply_activation_checkpointing(model, m) == (0 if m == "none" else 2)
        loss = model(x, t, cond).square().mean()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        assert list(model.state_dict()) == list(_dit().state_dict())  # names unchanged
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=0)
    for n, gr in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][n], gr, rtol=1e-6, atol=1e-7, msg=n)


class _Conv(Stage):
    name = "conv"

    def __init__(self):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 1, 3, padding=1))

    def trainable(self):
        return self.model

    def loss(self, model, batch):
        x, y = batch
        return (model(x).mean(dim=(1, 2, 3)) - y).square().mean(), {}


def test_channels_last_trains_and_checkpoints(tmp_path):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 4, 6, 6, generator=g), torch.randn(4, generator=g)) for _ in range(4)]
    stage = _Conv()
    trainer = _fit(tmp_path, stage, batches, "fused", max_steps=5, grad_accum=1, channels_last=True)
    assert stage.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert (tmp_path / "checkpoints" / "step_00000005").is_dir()
    plain = _Conv()
    _fit(tmp_path / "plain", plain, batches, "fused", max_steps=5, grad_accum=1)
    for (n, p), q in zip(stage.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert trainer.state.step == 5
    assert apply_channels_last(nn.Linear(2, 2)) == 0


@pytest.mark.slow
def test_compiled_blocks_give_the_same_output():
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700])
    cond = Conditioning(context=torch.randn(2, 5, 16, generator=g))
    plain, compiled = _dit(), _dit()
    assert compile_blocks(compiled) == 2
    torch.testing.assert_close(compiled(x, t, cond), plain(x, t, cond), rtol=1e-5, atol=1e-5)


def test_bad_option_values_are_refused_by_name():
    with pytest.raises(ValueError, match="compile: 'everything'"):
        TrainConfig(compile="everything")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="activation_checkpointing: 'all'"):
        TrainConfig(activation_checkpointing="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="implementation: 'apex'"):
        OptimConfig(implementation="apex")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="names no repeated blocks"):
        apply_activation_checkpointing(nn.Linear(2, 2), "blocks")
    assert adamw_kernel("auto", "single") == {"fused": True}
    assert adamw_kernel("auto", "fsdp2") == {"foreach": True}
    assert adamw_kernel("auto", "zero2") == {"fused": True}
    assert adamw_kernel("for_loop", "single") == {"foreach": False, "fused": False}
