"""A disk that fills up during a checkpoint write: the run stops with an error that says "no space", the partial
checkpoint is removed, the previous checkpoint stays the latest and resumes. Once with the writer made to fail
(ENOSPC), once on a real full file system (a 4 MiB tmpfs; needs root, else skipped)."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from data_pipeline.memory import InMemoryLoader
from training import checkpoint as ckpt_module
from training.checkpoint import list_checkpoints
from training.errors import NoSpaceError
from training.stages.base import Stage
from training.trainer import OptimConfig, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


class _Regression(Stage):
    name = "regression"

    def __init__(self):
        torch.manual_seed(1)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def trainable(self):
        return self.model

    def loss(self, model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean(), {}


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)]


def _trainer(run_dir: Path, steps: int) -> Trainer:
    cfg = TrainConfig(max_steps=steps, log_every=1, checkpoint_every=4, keep_checkpoints=5, cpu=True,
                      progress=False, optim=OptimConfig(lr=1e-2), ema_decay=0.9)
    return Trainer(cfg, _Regression(), InMemoryLoader(_batches()), run_dir, micro_batch_size=8, seed=3)


def _assert_stopped_at_4_and_resumable(run_dir: Path, error: NoSpaceError) -> None:
    message = str(error)
    assert message.startswith("no space left on the device of"), message
    assert "checkpoint step 8" in message and str(run_dir / "checkpoints" / "step_00000004") in message, message
    assert [s for s, _ in list_checkpoints(run_dir)] == [4]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # the partial folder went at once
    result = _trainer(run_dir, 12).fit()  # resume=auto: the previous checkpoint loads
    assert result.step == 12 and [s for s, _ in list_checkpoints(run_dir)] == [4, 8, 12]


def test_enospc_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    real = ckpt_module.save_file
    calls = []

    def full_disk(tensors, path, *args, **kwargs):  # the EMA write of the second checkpoint finds the disk full
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_module, "save_file", full_disk)
    with pytest.raises(NoSpaceError) as exc:
        _trainer(tmp_path, 12).fit()
    monkeypatch.setattr(ckpt_module, "save_file", real)
    _assert_stopped_at_4_and_resumable(tmp_path, exc.value)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MiB tmpfs (root and Linux only)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("needs Linux mount")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_really_full_disk_during_a_checkpoint_keeps_the_previous_one(tiny_disk, monkeypatch):
    """The disk fills up (another writer) after the first checkpoint; the second finds no space, whichever of its
    files (Accelerate's model, optimizer, RNG states, the EMA) hits it first."""
    run_dir = tiny_disk / "run"
    filler = tiny_disk / "filler"
    real_save = Trainer._save

    def save_then_fill(self, state):
        real_save(self, state)
        if not filler.exists():
            free = shutil.disk_usage(tiny_disk).free
            filler.write_bytes(b"\0" * max(0, free - 4096))

    monkeypatch.setattr(Trainer, "_save", save_then_fill)
    with pytest.raises(NoSpaceError) as exc:
        _trainer(run_dir, 12).fit()
    filler.unlink()
    monkeypatch.setattr(Trainer, "_save", real_save)
    _assert_stopped_at_4_and_resumable(run_dir, exc.value)
