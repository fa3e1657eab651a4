"""``benchmarks/video_evidence.py`` without training: mean and minimum over seeds, and the table it prints."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("benchmarks_video_evidence", REPO / "benchmarks" / "video_evidence.py")
ve = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = ve
spec.loader.exec_module(ve)


def test_summary_is_mean_and_minimum_over_seeds():
    key = "t2v_direction_accuracy_guidance_3"
    got = ve.summary([{key: 0.9, "seed": 0}, {key: 0.6, "seed": 1}, {key: 1.0, "seed": 2}])
    assert abs(got[key]["mean"] - 2.5 / 3) < 1e-12 and got[key]["min"] == 0.6
    # a measurement some seed lacks is left out rather than averaged over fewer seeds
    partial = ve.summary([{key: 0.9, "i2v_direction_accuracy_guidance_3": 0.5}, {key: 0.8}])
    assert "i2v_direction_accuracy_guidance_3" not in partial and partial[key]["min"] == 0.8


def test_table_rows_and_cells():
    key = "t2v_digit_accuracy_guidance_3"
    results = {"image": {"summary": ve.summary([{key: 1.0}, {key: 0.95}])}, "scratch": {"summary": {}}}
    text = ve.table(results)
    lines = text.splitlines()
    assert lines[0] == "| measurement | image init: mean / min | scratch init: mean / min |"
    assert len(lines) == 2 + len(ve.KEYS)
    assert "| digit, guided | 97.5% / 95.0% | — |" in lines
