"""``launch/gpu_check.sh`` and the Python it runs (``benchmarks/strategies.py``), tested on the CPU so that the single
run on a lent GPU works the first time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from sharding_launch import REPO, base_env  # noqa: E402

SCRIPT = REPO / "launch" / "gpu_check.sh"
BENCH = REPO / "benchmarks" / "strategies.py"


def test_gpu_check_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(SCRIPT)], check=True)


def _bench(strategy: str, tmp_path: Path, precision: str = "bf16") -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / f"{strategy}.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--strategy", strategy, "--cpu", "--precision", precision,
                           "--steps", "2", "--warmup", "1", "--batch", "4", "--json", str(out)], cwd=REPO,
                          env=base_env(device="cpu"), capture_output=True, text=True, timeout=300)
    return proc, out


@pytest.mark.distributed
def test_strategy_benchmark_zero3_bf16_on_cpu(tmp_path):
    """The benchmark's whole path under ZeRO-3 in bf16, as on the GPU (the tiny DiT): trains, times, exports, resumes,
    says which strategy Accelerate really set up. DeepSpeed's bf16 casts the weights and not the inputs: without the
    trainer's autocast inside the module's forward this fails with "Input type (float) and bias type (BFloat16)"."""
    proc, out = _bench("zero3", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert len(line) == 1 and "strategy_used=zero3" in line[0]
    r = json.loads(out.read_text())
    assert r["strategy_used"] == "zero3" and r["precision"] == "bf16" and r["steps_measured"] == 2
    assert r["step_ms"] > 0
    assert r["export_ok"] is True and r["resume_ok"] is True


@pytest.mark.slow
@pytest.mark.distributed
def test_strategy_benchmark_zero3_offload_on_cpu(tmp_path):
    """ZeRO-3 with optimizer and parameter offload: Accelerate replaces the AdamW with DeepSpeed's CPU Adam (a
    compiled op), and training, export and resume work through it."""
    proc, out = _bench("zero3_offload", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert (r["strategy_used"], r["offload"], r["optimizer"]) == ("zero3", "cpu/cpu", "DeepSpeedCPUAdam")
    assert r["export_ok"] is True and r["resume_ok"] is True


@pytest.mark.slow
@pytest.mark.distributed
def test_strategy_benchmark_refuses_a_strategy_accelerate_did_not_set_up(tmp_path):
    """FSDP through Accelerate needs a GPU: on the CPU the run stops with the reason instead of timing plain DDP."""
    proc, _ = _bench("fsdp2", tmp_path)
    assert proc.returncode != 0
    assert "asked for FSDP but Accelerate set up" in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_gpu_check_cpu_mode_end_to_end(tmp_path):
    """``bash launch/gpu_check.sh --cpu``: every part runs, the summary has one row per strategy, the log is in $OUT."""
    env = base_env(device="cpu")
    env["OUT"] = str(tmp_path)
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:]
    log = (tmp_path / "gpu_check.log").read_text()
    rows = [("ddp", "ddp", "AdamW", "none/none"), ("zero2", "zero2", "AdamW", "none/none"),
            ("zero3", "zero3", "AdamW", "none/none"), ("zero3_offload", "zero3", "DeepSpeedCPUAdam", "cpu/cpu")]
    for name, used, optimizer, offload in rows:
        assert f"| {name} | {used} | {optimizer} | {offload} | cpu |" in proc.stdout, proc.stdout
        assert json.loads((tmp_path / f"strategy_{name}.json").read_text())["resume_ok"] is True
    assert "failed parts: none" in log
