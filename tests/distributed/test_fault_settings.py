"""The fault-handling settings, in one process: the collective timeout (config, Accelerate handler, a process group
that already exists) and the failure line that names the rank."""

from __future__ import annotations

import datetime
import json
import logging

import pytest
import torch

from training.config_io import ConfigError, load_config
from training.run_config import RunConfig
from training.trainer import TrainConfig, _apply_collective_timeout, _process_group_kwargs


def test_collective_timeout_config():
    assert TrainConfig().collective_timeout_s is None  # the backend's default unless asked
    with pytest.raises(ValueError, match=r"^collective_timeout_s: 0"):
        TrainConfig(collective_timeout_s=0)
    with pytest.raises(ConfigError, match=r"diffusion\.train\.collective_timeout_s"):
        load_config(RunConfig, [], ["diffusion.train.collective_timeout_s=-5"])
    cfg = load_config(RunConfig, [], ["diffusion.train.collective_timeout_s=90"])
    assert cfg.diffusion.train.collective_timeout_s == 90


def test_accelerator_gets_the_timeout():
    from accelerate.utils import InitProcessGroupKwargs

    assert _process_group_kwargs(None) == []
    [handler] = _process_group_kwargs(12.5)
    assert isinstance(handler, InitProcessGroupKwargs)
    assert handler.to_kwargs() == {"timeout": datetime.timedelta(seconds=12.5)}


def test_timeout_reaches_a_process_group_that_already_exists(tmp_path):
    """The pipeline's PartialState creates the process group before any Trainer; the trainer must still set it."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=1800))
    try:
        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        assert backend.options._timeout == datetime.timedelta(seconds=1800)
        _apply_collective_timeout(None)
        assert backend.options._timeout == datetime.timedelta(seconds=1800)
        _apply_collective_timeout(7)
        assert backend.options._timeout == datetime.timedelta(seconds=7)
    finally:
        dist.destroy_process_group()


def test_failure_line_names_the_rank(monkeypatch, tmp_path, caplog):
    from launch.cli import process_label, report_rank_failure

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "TORCHELASTIC_ERROR_FILE"):
        monkeypatch.delenv(key, raising=False)
    assert process_label() == "process"
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    with caplog.at_level(logging.ERROR, logger="loom"):
        try:
            raise ValueError("boom")
        except ValueError as exc:
            report_rank_failure(exc)
    assert any(r.getMessage().startswith("rank 3/8 (local 1 on ") and r.getMessage().endswith(
        "failed: ValueError: boom") for r in caplog.records), [r.getMessage() for r in caplog.records]
    # torchrun's failure summary reads this file
    assert json.loads(error_file.read_text())["message"]["message"] == "ValueError: boom"


def test_cli_reports_and_reraises(monkeypatch, caplog):
    import launch.cli as cli

    class Boom(RuntimeError):
        pass

    def explode(cfg):
        raise Boom("in the stage")

    commands = cli.load_commands()
    monkeypatch.setattr(commands["shards"], "run", explode)
    monkeypatch.setattr(cli, "load_commands", lambda: commands)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    with caplog.at_level(logging.ERROR, logger="loom"), pytest.raises(Boom):
        cli.main(["shards", "demo", "output_dir=unused"])
    assert any("rank 1/" in r.getMessage() and "failed: Boom: in the stage" in r.getMessage()
               for r in caplog.records)
