"""``loom data``: the plan, a few streamed batches, the preview grid, and errors as exit codes."""

from __future__ import annotations

import os
import sys

import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))

from shardmaker import make_shards  # noqa: E402

cli = pytest.importorskip("launch.cli")


def test_loom_data_streams_and_saves_a_preview(tmp_path, capsys):
    make_shards(tmp_path / "shards", n_shards=2, per_shard=6, size=lambda i: [(24, 32), (32, 24)][i % 2])
    code = cli.main(["data", f"data.urls={tmp_path}/shards/shard-{{000000..000001}}.tar", "data.num_workers=0",
                     "data.batch_size=4", "data.resolution=16", "data.buckets.enabled=true", "data.buckets.step=8",
                     f"run.output_dir={tmp_path}/runs", "run.name=preview", "preview_batches=5"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2 shards, 12 samples" in out and "batches per epoch" in out
    assert out.count("batch ") >= 5 and "pixels 4x3x" in out and "a picture of shard" in out
    assert "samples/s" in out and "skipped: nothing" in out
    png = tmp_path / "runs" / "preview" / "preview.png"
    assert png.exists() and Image.open(png).size[0] > 16  # a grid of the first batch


def test_loom_data_dry_run_and_errors(tmp_path, capsys):
    make_shards(tmp_path, n_shards=1, per_shard=4)
    assert cli.main(["data", f"data.urls={tmp_path}", "data.batch_size=2", "--dry-run"]) == 0
    assert "1 shards, 4 samples" in capsys.readouterr().out
    assert cli.main(["data", f"data.urls={tmp_path}", "--dry-run"]) == 0  # the plan says what is wrong
    assert "less than one batch per rank" in capsys.readouterr().out
    assert cli.main(["data", f"data.urls={tmp_path}/nothing-*.tar", f"run.output_dir={tmp_path}/r"]) == 1
    assert "matches no file" in capsys.readouterr().err
    assert cli.main(["data", "data.batch_size=0"]) == 2  # config error, before any work
