"""``benchmarks/mfu.py --cpu-tiny`` end to end (without the DiT reference clone, which CI does not have): every
model trains through the Trainer and gets a row with its FLOPs; the peak table picks the card by name."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import mfu  # noqa: E402


def test_cpu_tiny_runs_every_model_through_the_trainer(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = mfu.main(["--cpu-tiny", "--steps", "1", "--warmup", "1", "--batch", "2", "--json", str(out)])
    assert [r["model"] for r in rows] == ["dit-tiny", "dit-tiny-text", "unet-tiny"]
    assert json.loads(out.read_text()) == rows
    for r in rows:
        assert r["loop"] == "latentloom Trainer" and r["device"] == "CPU" and r["mfu"] is None
        assert r["images_per_s"] > 0 and r["fwd_gflops_per_image"] > 0
        assert r["tflops"] == pytest.approx(r["images_per_s"] * 3 * r["fwd_gflops_per_image"] / 1e3)
    assert "device: CPU" in capsys.readouterr().out


def test_peak_table_and_bad_arguments():
    assert mfu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert mfu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert mfu.peak_tflops("NVIDIA H200") == 989.0
    assert mfu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert mfu.peak_tflops("NVIDIA GeForce RTX 4090") is None
    with pytest.raises(SystemExit, match="unknown"):
        mfu.main(["--cpu-tiny", "--models", "dit-xxl"])
    with pytest.raises(SystemExit, match="not a facebookresearch/DiT clone"):
        mfu.main(["--cpu-tiny", "--models", "dit-xl2", "--steps", "1", "--warmup", "1", "--batch", "2",
                  "--reference-dir", "/nonexistent"])
