"""`loom shards`: the command module's plan/run and its wiring into the config loader."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_pipeline.index import read_index
from data_pipeline.writer import ShardsConfig
from launch.commands import Command
from launch.commands.shards import COMMAND, plan, run


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _folder(root, n=5):
    root.mkdir()
    for i in range(n):
        (root / f"img{i}.png").write_bytes(_png(i))
        (root / f"img{i}.txt").write_text(f"picture number {i}")
    (root / "nocap.png").write_bytes(_png(99))
    return root


def test_command_definition():
    assert isinstance(COMMAND, Command)
    assert COMMAND.name == "shards" and COMMAND.positional == "source"
    assert COMMAND.config_cls is ShardsConfig and COMMAND.run is run and COMMAND.plan is plan
    assert "demo" in COMMAND.help


def test_run_demo_and_refuse_a_second_time(tmp_path, capsys):
    out = tmp_path / "demo"
    cfg = ShardsConfig(source="demo", output_dir=str(out), progress=False)
    assert run(cfg) == 0
    printed = capsys.readouterr().out
    assert "train: 2 shard(s), 1617 samples" in printed and "val: 1 shard(s), 180 samples" in printed
    assert read_index(out / "val.shardindex.json").total_samples == 180
    before = (out / "train-000000.tar").read_bytes()

    assert run(cfg) == 1
    assert "overwrite=true" in capsys.readouterr().err
    again = ShardsConfig(source="demo", output_dir=str(out), overwrite=True, progress=False)
    assert run(again) == 0
    assert (out / "train-000000.tar").read_bytes() == before


def test_run_folder_with_small_shards(tmp_path, capsys):
    src = _folder(tmp_path / "imgs")
    out = tmp_path / "out"
    cfg = ShardsConfig(source="folder", input=str(src), output_dir=str(out), max_samples_per_shard=2,
                       prefix="pics", image_format="jpg", progress=False)
    assert run(cfg) == 0
    printed = capsys.readouterr().out
    assert "pics: 3 shard(s), 5 samples" in printed and "missing_caption 1 (e.g. nocap.png)" in printed
    index = read_index(out / "pics.shardindex.json")
    assert [s.nsamples for s in index.shards] == [2, 2, 1] and index.skipped == {"missing_caption": 1}
    with tarfile.open(out / "pics-000000.tar") as tar:
        assert tar.getnames() == ["000000000.jpg", "000000000.json", "000000000.txt",
                                  "000000001.jpg", "000000001.json", "000000001.txt"]


def test_run_table(tmp_path, capsys):
    _folder(tmp_path / "imgs")
    rows = [{"file": f"imgs/img{i}.png", "text": f"row {i}", "rating": i} for i in range(3)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    cfg = ShardsConfig(source="table", input=str(tmp_path / "pairs.jsonl"), output_dir=str(tmp_path / "out"),
                       image_column="file", caption_column="text", progress=False)
    assert run(cfg) == 0
    assert "bad_row 1 (e.g. pairs.jsonl:4)" in capsys.readouterr().out
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        meta = json.loads(tar.extractfile("000000002.json").read())
    assert meta["rating"] == 2 and meta["caption"] == "row 2" and meta["source"] == "imgs/img2.png"


def test_run_reports_failure_when_nothing_is_written(tmp_path, capsys):
    (tmp_path / "pairs.csv").write_text("image,caption\nmissing.png,hello\n")
    cfg = ShardsConfig(source="table", input=str(tmp_path / "pairs.csv"), output_dir=str(tmp_path / "o"),
                       progress=False)
    assert run(cfg) == 1
    captured = capsys.readouterr()
    assert "missing_image 1" in captured.out and "no samples" in captured.err


def test_run_reports_bad_columns(tmp_path, capsys):
    (tmp_path / "pairs.csv").write_text("path,text\nx.png,hello\n")
    cfg = ShardsConfig(source="table", input=str(tmp_path / "pairs.csv"), output_dir=str(tmp_path / "o"),
                       progress=False)
    assert run(cfg) == 1
    assert "image_column" in capsys.readouterr().err


def test_plan_describes_the_run(tmp_path):
    src = _folder(tmp_path / "imgs")
    text = plan(ShardsConfig(source="folder", input=str(src), output_dir=str(tmp_path / "o"),
                             max_samples_per_shard=500, max_size=256, image_format="jpg", jpeg_quality=90))
    assert f"folder {src}" in text and "6 image files" in text
    assert "shard-NNNNNN.tar" in text and str(tmp_path / "o") in text
    assert "at most 500 samples" in text and "jpg (quality 90), longer side at most 256px" in text
    demo_text = plan(ShardsConfig(source="demo", output_dir=str(tmp_path / "d"), seed=2))
    assert "1617 train / 180 val" in demo_text and "seed=2" in demo_text and "png" in demo_text
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()  # planning writes nothing


def test_plan_warns_about_existing_shards(tmp_path):
    (tmp_path / "shard-000000.tar").write_bytes(b"")
    (tmp_path / "imgs").mkdir()
    cfg = ShardsConfig(source="folder", input=str(tmp_path / "imgs"), output_dir=str(tmp_path))
    assert "refuse" in plan(cfg)


def test_overrides_build_the_config(tmp_path):
    cli = pytest.importorskip("launch.cli")
    config = pytest.importorskip("training.config_io")
    src = _folder(tmp_path / "imgs")
    cfg = cli.build_config(COMMAND, "folder", [], [f"input={src}", f"output_dir={tmp_path}/out",
                                                   "max_samples_per_shard=500", "max_size=128"])
    assert (cfg.source, cfg.input, cfg.max_samples_per_shard, cfg.max_size) == ("folder", str(src), 500, 128)
    with pytest.raises(config.ConfigError, match="max_samples_per_shard"):
        cli.build_config(COMMAND, "demo", [], ["max_samples_per_shard=-1"])
    with pytest.raises(config.ConfigError, match="input"):
        cli.build_config(COMMAND, "table", [], [f"output_dir={tmp_path}"])


def test_loom_main_dry_run_and_run(tmp_path, capsys):
    cli = pytest.importorskip("launch.cli")
    assert cli.main(["shards", "demo", f"output_dir={tmp_path}/d", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "source: demo" in printed and "1617 train / 180 val" in printed
    assert not (tmp_path / "d").exists()
    src = _folder(tmp_path / "imgs")
    args = ["shards", "folder", f"input={src}", f"output_dir={tmp_path}/f", "max_samples_per_shard=2", "progress=false"]
    assert cli.main(args) == 0
    assert read_index(tmp_path / "f" / "shard.shardindex.json").total_samples == 5
    assert cli.main(args) == 1  # exists; not overwritten
    assert cli.main(["shards", "folder", f"output_dir={tmp_path}/f"]) == 2  # config error: no input
    assert "input" in capsys.readouterr().err
