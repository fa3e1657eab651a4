"""Shared fixtures of the multi-process tests: the digits demo shards and one uninterrupted two-rank reference run
that the fault tests compare their resumed runs with."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    from data_pipeline.demo import build_demo_set

    out = tmp_path_factory.mktemp("demo")
    build_demo_set(out, progress=False)
    return out


@dataclass
class Run:
    stage_dir: Path  # <run>/diffusion
    statuses: list[int]  # exit status of each launcher
    logs: Path  # the launchers' output and the per-node logs


@pytest.fixture(scope="session")
def reference_run(demo_shards, tmp_path_factory) -> Run:
    """``loom train`` on two nodes × one process each (two torchrun_multinode.sh on 127.0.0.1), never interrupted."""
    root = tmp_path_factory.mktemp("reference")
    config = harness.tiny_config(root / "tiny.yaml", demo_shards, root / "runs")
    logs = root / "logs"
    statuses = harness.run_nodes(config, nodes=2, nproc=1, logs=logs, LOG_DIR=logs)
    return Run(root / "runs" / "tiny" / "diffusion", statuses, logs)


@pytest.fixture(scope="session")
def single_reference_run(demo_shards, tmp_path_factory) -> Run:
    """``loom train`` in one process (no launcher), never interrupted: the reference of the one-process fault
    tests."""
    root = tmp_path_factory.mktemp("single-reference")
    config = harness.tiny_config(root / "tiny.yaml", demo_shards, root / "runs")
    proc = harness.start([sys.executable, "-m", "launch", "train", "--config", str(config)], harness.launch_env(),
                         root / "run.out")
    status = harness.finish(proc, timeout=240)
    return Run(root / "runs" / "tiny" / "diffusion", [status], root)
