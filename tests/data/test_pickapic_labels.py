"""Preference data read as Pick-a-Pic means it: unlabelled rows, the same image twice and labels that do not sum
to 1 are skipped and counted by reason (``unlabelled``, ``same_images``, ``inconsistent_labels``), in a table
written by ``loom shards pairs`` and in shards read by the DPO stage's pair reader (issue 16, item 5)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.data_config import DataConfig
from data_pipeline.preference import PairTableSource, iter_preference_pairs, write_preference_shards
from data_pipeline.sources import SkipLog


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


ROWS = [  # (row fields beyond caption/jpg_0/jpg_1, expected: None = written, else the skip reason)
    ({"label_0": 1, "label_1": 0, "has_label": True, "are_different": True}, None),
    ({"label_0": 0.5, "label_1": 0.5, "has_label": True, "are_different": True}, None),  # a real tie
    ({"label_0": 1}, None),  # the minimal layout: label_0 only
    ({"label_0": 0.5, "label_1": 0.5, "has_label": False, "are_different": True}, "unlabelled"),
    ({"label_0": 1, "label_1": 0, "has_label": True, "are_different": False}, "same_images"),
    ({"label_0": 1, "label_1": 1, "has_label": True, "are_different": True}, "inconsistent_labels"),
    ({"label_0": 0, "label_1": 0}, "inconsistent_labels"),
    ({"label_0": 1, "label_1": 0.25}, "inconsistent_labels"),
    ({"label_0": 1, "label_1": "lots"}, "bad_label"),
    ({"label_0": 1, "has_label": "maybe"}, "bad_row"),
]


def test_pick_a_pic_rows_in_a_table(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(_png(40))
    (tmp_path / "b.png").write_bytes(_png(200))
    rows = [{"caption": f"row {i}", "jpg_0": "a.png", "jpg_1": "b.png", **fields} for i, (fields, _) in enumerate(ROWS)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = PairTableSource(tmp_path / "p.jsonl")
    result = write_preference_shards(source, tmp_path / "out", "p")
    expected = [r for _, r in ROWS if r]
    assert source.skips.counts == {r: expected.count(r) for r in set(expected)}
    assert result.samples == sum(r is None for _, r in ROWS) and result.ties == 1
    with tarfile.open(tmp_path / "out" / "p-000000.tar") as tf:
        metas = [json.loads(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".json")]
    assert [m["caption"] for m in metas] == ["row 0", "row 1", "row 2"]
    assert all(m["label_0"] + m["label_1"] == 1 for m in metas)
    index = json.loads((tmp_path / "out" / "p.shardindex.json").read_text())
    assert index["skipped"] == dict(sorted(source.skips.counts.items()))


def test_csv_flags_are_read_as_booleans(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(_png(40))
    (tmp_path / "b.png").write_bytes(_png(200))
    (tmp_path / "p.csv").write_text("caption,jpg_0,jpg_1,label_0,label_1,has_label,are_different\n"
                                    "ok,a.png,b.png,1,0,True,True\n"
                                    "ok2,a.png,b.png,0,1,,\n"  # empty cells: not given
                                    "unl,a.png,b.png,0.5,0.5,False,True\n"
                                    "same,a.png,b.png,1,0,true,false\n"
                                    "both,a.png,b.png,1,1,1,1\n")
    source = PairTableSource(tmp_path / "p.csv")
    result = write_preference_shards(source, tmp_path / "out", "p")
    assert result.samples == 2
    assert source.skips.counts == {"unlabelled": 1, "same_images": 1, "inconsistent_labels": 1}


def test_pick_a_pic_fields_in_shards(tmp_path: Path):
    def pair(meta: dict) -> dict[str, bytes]:
        return {"jpg_0": _png(40), "jpg_1": _png(200), "txt": b"a caption", "json": json.dumps(meta).encode()}

    with tarfile.open(tmp_path / "s-000000.tar", "w") as tf:
        for i, (fields, _) in enumerate(ROWS):
            for ext, data in pair(fields).items():
                ti = tarfile.TarInfo(f"{i:04d}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    skips = SkipLog()
    pairs = list(iter_preference_pairs(DataConfig(urls=str(tmp_path / "s-000000.tar"), resolution=8), "keep", skips))
    expected = [r for _, r in ROWS if r]
    assert skips.counts == {r: expected.count(r) for r in set(expected)}
    assert [p.key for p in pairs] == [f"{i:04d}" for i, (_, r) in enumerate(ROWS) if r is None]


def test_parse_flag():
    from data_pipeline.preference import parse_flag

    assert [parse_flag(v) for v in (True, False, 1, 0, "True", " false ", "1", "no", None, "", float("nan"))] == \
        [True, False, True, False, True, False, True, False, None, None, None]
    with pytest.raises(ValueError):
        parse_flag("maybe")
