"""Preference shards (Pick-a-Pic layout): writing from JSONL / CSV / parquet tables, reading pairs back, and every
bad input skipped and counted by reason."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.data_config import DataConfig
from data_pipeline.preference import (
    PairTableSource,
    iter_preference_pairs,
    parse_label,
    write_preference_shards,
)
from data_pipeline.sources import SkipLog
from data_pipeline.writer import WriterOptions


def _png(value: int, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def pair_table(tmp_path: Path) -> Path:
    """A JSONL table: 4 good pairs (one a tie) and one row for each bad-input reason."""
    (tmp_path / "img").mkdir()
    for v in (10, 60, 110, 160, 210):
        (tmp_path / "img" / f"{v}.png").write_bytes(_png(v))
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [
        {"caption": "a", "jpg_0": "img/10.png", "jpg_1": "img/60.png", "label_0": 0, "extra": 1},
        {"caption": "b", "jpg_0": "img/110.png", "jpg_1": "img/60.png", "label_0": 1},
        {"caption": "c", "jpg_0": "img/160.png", "jpg_1": "img/210.png", "label_0": 0.5},
        {"caption": "d", "jpg_0": "img/210.png", "jpg_1": "img/10.png", "label_0": 1.0},
        {"caption": "e", "jpg_0": "img/nowhere.png", "jpg_1": "img/10.png", "label_0": 1},  # missing_image
        {"caption": "f", "jpg_0": "img/10.png", "jpg_1": "img/broken.png", "label_0": 0},  # corrupt_image
        {"caption": "g", "jpg_0": "img/10.png", "jpg_1": "img/60.png", "label_0": 1.7},  # bad_label
        {"caption": "h", "jpg_0": "img/10.png", "jpg_1": "img/60.png"},  # bad_label (absent)
        {"caption": "", "jpg_0": "img/10.png", "jpg_1": "img/60.png", "label_0": 1},  # missing_caption
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")  # bad_row
    return path


def _members(tar_path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def test_writer_layout_and_skip_counts(pair_table: Path, tmp_path: Path):
    source = PairTableSource(pair_table)
    result = write_preference_shards(source, tmp_path / "out", "pairs", WriterOptions(max_samples_per_shard=3))
    assert result.samples == 4 and result.ties == 1
    assert dict(source.skips.counts) == {"missing_image": 1, "corrupt_image": 1, "bad_label": 2,
                                         "missing_caption": 1, "bad_row": 1}
    index = json.loads((tmp_path / "out" / "pairs.shardindex.json").read_text())
    assert index["total_samples"] == 4 and index["skipped"] == dict(sorted(source.skips.counts.items()))
    assert [s["nsamples"] for s in index["shardlist"]] == [3, 1]
    samples = {**_members(tmp_path / "out" / "pairs-000000.tar"), **_members(tmp_path / "out" / "pairs-000001.tar")}
    first = samples["000000000"]
    assert set(first) == {"jpg_0", "jpg_1", "txt", "json"}
    assert first["jpg_0"] == (pair_table.parent / "img" / "10.png").read_bytes()  # png kept byte for byte
    meta = json.loads(first["json"])
    assert meta["label_0"] == 0 and meta["label_1"] == 1 and meta["caption"] == "a" and meta["extra"] == 1
    assert meta["format_0"] == "png" and meta["width_1"] == 12
    assert "ties" in result.format() and "missing_image 1" in result.format()


def test_reader_decodes_pairs_orders_winners_and_counts_ties(pair_table: Path, tmp_path: Path):
    write_preference_shards(PairTableSource(pair_table), tmp_path / "out", "pairs",
                            WriterOptions(max_samples_per_shard=3))
    cfg = DataConfig(urls=str(tmp_path / "out" / "pairs-*.tar"), resolution=8)
    skips = SkipLog()
    dropped = list(iter_preference_pairs(cfg, "drop", skips))
    assert [p.caption for p in dropped] == ["a", "b", "d"] and skips.counts == {"tie": 1}
    kept = list(iter_preference_pairs(cfg, "keep"))
    assert [p.caption for p in kept] == ["a", "b", "c", "d"]
    a = kept[0]
    assert a.image_0.shape == (8, 8, 3) and a.image_0.dtype == np.uint8
    winner, loser = a.ordered()  # label_0 = 0: the second image (value 60) won
    assert int(winner.mean()) == 60 and int(loser.mean()) == 10 and a.strength == 1.0
    tie = kept[2]
    assert tie.strength == 0.5 and int(tie.ordered()[0].mean()) == 160


def _write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for i, members in enumerate(samples):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_reader_skips_bad_pairs_in_shards(tmp_path: Path):
    good = {"jpg_0": _png(200), "jpg_1": _png(20), "txt": b"good", "json": b'{"label_0": 1}'}
    samples = [
        good,
        {"jpg_0": _png(200), "txt": b"no second image", "json": b'{"label_0": 1}'},  # missing_image
        {"jpg_0": b"garbage", "jpg_1": _png(20), "txt": b"x", "json": b'{"label_0": 0}'},  # corrupt_image
        {"jpg_0": _png(1), "jpg_1": _png(2), "txt": b"x", "json": b'{"label_0": "yes"}'},  # bad_label
        {"jpg_0": _png(1), "jpg_1": _png(2), "txt": b"x", "json": b"[1, 2]"},  # bad_json
        {"jpg_0": _png(1), "jpg_1": _png(2), "json": b'{"label_0": 1}'},  # missing_caption
        {"jpg_0": _png(1), "jpg_1": _png(2), "txt": b"label as member", "label_0": b"0"},  # good (member label)
    ]
    _write_tar(tmp_path / "p-000000.tar", samples)
    full = tmp_path / "p-000000.tar"
    (tmp_path / "p-000001.tar").write_bytes(full.read_bytes()[: 3 * 512 + 100])  # truncated mid-member
    skips = SkipLog()
    pairs = list(iter_preference_pairs(DataConfig(urls=str(tmp_path / "p-*.tar"), resolution=8), "keep", skips))
    assert [p.caption for p in pairs[:2]] == ["good", "label as member"]
    assert pairs[1].label_0 == 0.0 and not pairs[1].winner_is_0
    assert {k: v for k, v in skips.counts.items() if k != "truncated_tar"} == {
        "missing_image": 1, "corrupt_image": 1, "bad_label": 1, "bad_json": 1, "missing_caption": 1}
    assert skips.counts.get("truncated_tar") == 1


def test_csv_and_parquet_tables(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(_png(30))
    (tmp_path / "b.png").write_bytes(_png(90))
    (tmp_path / "pairs.csv").write_text("caption,jpg_0,jpg_1,label_0\nhi,a.png,b.png,1\nbad,a.png,b.png,x\n")
    src = PairTableSource(tmp_path / "pairs.csv")
    rows = list(src)
    assert len(rows) == 1 and rows[0].label_0 == 1.0 and src.skips.counts == {"bad_label": 1}
    (tmp_path / "bad.csv").write_text("caption,jpg_0,label_0\nhi,a.png,1\n")
    with pytest.raises(ValueError, match="jpg_1"):
        PairTableSource(tmp_path / "bad.csv")

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"caption": ["bytes", "struct", "broken"],
                      "jpg_0": [_png(5), _png(6), b"nope"], "jpg_1": [_png(7), _png(8), _png(9)],
                      "label_0": [0.0, 0.5, 1.0]})
    pq.write_table(table, tmp_path / "pairs.parquet")
    src = PairTableSource(tmp_path / "pairs.parquet")
    out = write_preference_shards(src, tmp_path / "pq", "pairs")
    assert out.samples == 2 and out.ties == 1 and src.skips.counts == {"corrupt_image": 1}


def test_parse_label():
    assert [parse_label(v) for v in (0, 1, 0.5, "0.25", "1")] == [0.0, 1.0, 0.5, 0.25, 1.0]
    assert [parse_label(v) for v in (None, True, -0.1, 1.01, "x", float("nan"))] == [None] * 6


def test_loom_shards_pairs_command(pair_table: Path, tmp_path: Path, capsys):
    from launch import cli

    out = tmp_path / "cli"
    assert cli.main(["shards", "pairs", f"input={pair_table}", f"output_dir={out}", "progress=false",
                     "--dry-run"]) == 0
    assert "Pick-a-Pic" in capsys.readouterr().out and not out.exists()
    assert cli.main(["shards", "pairs", f"input={pair_table}", f"output_dir={out}", "progress=false"]) == 0
    printed = capsys.readouterr().out
    assert "4 samples" in printed and "1 of the 4 pairs are ties" in printed and "bad_label 2" in printed
    assert (out / "pairs-000000.tar").exists() and (out / "pairs.shardindex.json").exists()
    assert cli.main(["shards", "pairs", f"input={tmp_path / 'nothing.jsonl'}", f"output_dir={out}"]) == 2
