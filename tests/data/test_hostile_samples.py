"""One bad sample never ends a run: text that is valid JSON but cannot be written back (a lone surrogate), json
nested deep enough to exhaust the parser's stack, and two adjacent samples with one key are each skipped and
counted (``bad_caption``, ``bad_json``, ``duplicate_key``) by the loader, ``loom data``, ``loom shards`` (folder
and table sources), the preference reader and writer (issue 16, items 2 and 6)."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import tarfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from shardmaker import image_bytes, sample, write_shardset  # noqa: E402

from data_pipeline.data_config import DataConfig  # noqa: E402
from data_pipeline.errors import SkipSample  # noqa: E402
from data_pipeline.loader import build_loader  # noqa: E402
from data_pipeline.preference import PairTableSource, iter_preference_pairs, write_preference_shards  # noqa: E402
from data_pipeline.sources import FolderSource, SkipLog, TableSource  # noqa: E402
from data_pipeline.writer import ShardWriter, write_shards  # noqa: E402

DEEP = b"[" * 200_000 + b"]" * 200_000  # valid JSON; json.loads raises RecursionError
SURROGATE_CAPTION = b'{"caption": "\\ud800 a lone surrogate"}'  # valid JSON; "\ud800".encode("utf-8") fails


def with_json(key: str, raw: bytes, **kw) -> tuple[str, dict]:
    return key, {**sample(key, **kw), "json": raw}


def epoch(directory, workers: int = 0, **kw):
    cfg = DataConfig(**{**dict(urls=str(directory), resolution=16, batch_size=1, num_workers=workers, shuffle_buffer=0,
                               shard_shuffle=False, full_pass=True), **kw})
    loader = build_loader(cfg)
    keys = [k for b in loader for k in b.keys]
    return loader.stats(), keys


# ------------------------------------------------------------------------------------------------ helpers


def test_the_text_checks():
    from data_pipeline.sampletext import (
        MAX_JSON_DEPTH,
        encode_json,
        json_text_problem,
        parse_json_object,
        printable,
        text_problem,
    )

    assert parse_json_object(DEEP)[0] is None and "nested" in parse_json_object(DEEP)[1]
    deep_enough = b'{"a": ' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}"  # one level more than allowed
    assert parse_json_object(deep_enough)[0] is None
    shallow = b'{"a": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    assert parse_json_object(shallow)[0] is not None
    assert parse_json_object(b'{"brackets": "' + b"[" * 100 + b'"}')[1] == ""  # in a string: not nesting
    assert parse_json_object(b"[1]") == (None, "a list, not an object")
    assert text_problem("fine é 日本") == "" and "U+D800" in text_problem("a\ud800")
    meta = json.loads(b'{"ok": "\\ud83d\\ude00", "bad": ["x", "\\udfff"]}')  # a surrogate pair is fine
    assert json_text_problem(meta) == "bad[1] holds a lone surrogate U+DFFF at character 0"
    with pytest.raises(SkipSample) as e:
        encode_json(meta)
    assert e.value.reason == "bad_json" and "bad[1]" in e.value.detail
    assert printable(b"caf\xe9".decode("utf-8", "surrogateescape")) == "caf\\xe9" and printable("é") == "é"


# ------------------------------------------------------------------------------------------------ the loader


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_skips_and_counts_unwritable_text_and_deep_json(tmp_path, workers):
    shard = [("a0", sample("a0")),
             with_json("a1", SURROGATE_CAPTION),  # the caption read from the json: bad_caption
             with_json("a2", DEEP),  # bad_json (RecursionError before)
             with_json("a3", b'{"note": "\\udc80"}'),  # another field that cannot be written back: bad_json
             ("a4", {**sample("a4"), "txt": b"\xed\xa0\x80 surrogate bytes in the txt"}),  # not UTF-8: replaced, kept
             ("a5", sample("a5"))]
    write_shardset(tmp_path, "h", [shard])
    stats, keys = epoch(tmp_path, workers, caption_keys=["json:caption", "txt"])
    assert stats["skipped"] == {"bad_caption": 1, "bad_json": 2}
    assert sorted(keys) == ["a0", "a4", "a5"]


def test_a_tar_name_that_is_not_utf8_still_streams(tmp_path):
    path = tmp_path / "n-000000.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        for key, members in [("ok", sample("ok")), (b"caf\xe9".decode("utf-8", "surrogateescape"), sample("x"))]:
            for ext, data in sorted(members.items()):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    stats, keys = epoch(tmp_path)
    assert keys == ["ok", "caf\\xe9"] and stats["skipped"] == {}
    for k in keys:
        k.encode("utf-8")  # every key can be logged and written into a cache shard's json


def test_loom_data_survives_deep_json(tmp_path, capsys):
    cli = pytest.importorskip("launch.cli")
    write_shardset(tmp_path / "s", "d", [[("d0", sample("d0")), with_json("d1", DEEP), ("d2", sample("d2"))]])
    code = cli.main(["data", f"data.urls={tmp_path}/s", "data.num_workers=0", "data.batch_size=1",
                     "data.resolution=16", f"run.output_dir={tmp_path}/runs", "run.name=deep", "preview_batches=2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "bad_json" in out


# ------------------------------------------------------------------------------------------------ duplicate keys


def test_adjacent_samples_with_one_key_are_counted_not_merged(tmp_path, caplog):
    first, second = sample("dup", seed=1, caption="the first"), sample("dup", seed=2, caption="the second")
    write_shardset(tmp_path, "k", [[("a", sample("a")), ("dup", first), ("dup", second), ("b", sample("b")),
                                    ("b", sample("b", seed=5)), ("b", sample("b", seed=6)), ("c", sample("c"))]])
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        stats, keys = epoch(tmp_path)
    # the index lists 7 samples and the reader numbers 7 too: no truncated_tar, two duplicates of b, one of dup
    assert stats["skipped"] == {"duplicate_key": 3}
    assert keys == ["a", "dup", "b", "c"]
    loader = build_loader(DataConfig(urls=str(tmp_path), resolution=16, batch_size=1, num_workers=0,
                                     shuffle_buffer=0, shard_shuffle=False, full_pass=True))
    captions = [c for batch in loader for c in batch.captions]
    assert captions[1] == "the first"  # the first of the two is the one kept
    assert any("duplicate_key" in r.getMessage() and "'dup'" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("cut", [1, 2, 4])
def test_duplicate_keys_resume_exactly(tmp_path, cut):
    shards = [[(f"s{i}k{2 if j == 3 else j}", sample(f"s{i}k{j}", seed=10 * i + j)) for j in range(6)]
              for i in range(2)]  # in each shard samples 2 and 3 share one key
    write_shardset(tmp_path, "r", shards)
    cfg = DataConfig(urls=str(tmp_path), resolution=16, batch_size=2, num_workers=0, shuffle_buffer=4, seed=3)
    full = build_loader(cfg)
    reference = [tuple(b.keys) for b in full]
    assert full.stats()["skipped"] == {"duplicate_key": 2}
    first = build_loader(cfg)
    it = iter(first)
    head = [tuple(next(it).keys) for _ in range(cut)]
    state = json.loads(json.dumps(first.state_dict()))
    second = build_loader(cfg)
    second.load_state_dict(state)
    tail = [tuple(b.keys) for b in second]
    assert head + tail == reference
    assert second.stats()["skipped"] == {"duplicate_key": 2}  # counted once in all, before or after the cut


# ------------------------------------------------------------------------------------------------ loom shards


def test_writer_sources_skip_unwritable_text_and_deep_json(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("good", "deep", "surrogate"):
        (folder / f"{name}.png").write_bytes(image_bytes(12, 12, 1))
        (folder / f"{name}.txt").write_text(f"a {name} picture")
    (folder / "deep.json").write_bytes(DEEP)  # RecursionError before
    (folder / "surrogate.json").write_text('{"note": "\\ud800"}')  # UnicodeEncodeError in the writer before
    source = FolderSource(folder)
    summary = write_shards(source, tmp_path / "out_folder", "f")
    assert summary.samples == 1 and source.skips.counts == {"bad_metadata": 2}

    (tmp_path / "img.png").write_bytes(image_bytes(12, 12, 2))
    rows = [b'{"image": "img.png", "caption": "fine"}',
            b'{"image": "img.png", "caption": "\\ud800"}',  # bad_caption
            b'{"image": "img.png", "caption": "fine", "tag": "\\udc80"}',  # bad_row
            b'{"image": "img.png", "caption": "fine", "x": ' + DEEP + b"}"]  # bad_row (RecursionError before)
    (tmp_path / "t.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    table = TableSource(tmp_path / "t.jsonl")
    summary = write_shards(table, tmp_path / "out_table", "t")
    assert summary.samples == 1 and table.skips.counts == {"bad_caption": 1, "bad_row": 2}
    index = json.loads((tmp_path / "out_table" / "t.shardindex.json").read_text())
    assert index["skipped"] == {"bad_caption": 1, "bad_row": 2}


def test_shard_writer_counts_what_it_cannot_write_and_keeps_the_tar_whole(tmp_path):
    from data_pipeline.sources import Sample

    skips = SkipLog()
    with ShardWriter(tmp_path, "w", skips=skips) as writer:
        assert writer.write(Sample(image_bytes(8, 8), "\ud800", source_id="a")) is None
        assert writer.write(Sample(image_bytes(8, 8), "fine", extra={"x": "\udc80"}, source_id="b")) is None
        assert writer.write(Sample(image_bytes(8, 8), "fine", source_id="c")) == "000000000"
        with pytest.raises(SkipSample):
            writer.write_members({"txt": b"x"}, {"nested": json.loads(b"[" * 100 + b"]" * 100)})
    assert skips.counts == {"bad_caption": 1, "bad_json": 1}
    with tarfile.open(tmp_path / "w-000000.tar") as tf:
        assert sorted(tf.getnames()) == ["000000000.json", "000000000.png", "000000000.txt"]


def test_loom_shards_table_with_a_lone_surrogate_caption(tmp_path, capsys):
    cli = pytest.importorskip("launch.cli")
    (tmp_path / "img.png").write_bytes(image_bytes(12, 12, 2))
    (tmp_path / "t.jsonl").write_bytes(b'{"image": "img.png", "caption": "fine"}\n'
                                       b'{"image": "img.png", "caption": "\\ud800"}\n')
    code = cli.main(["shards", "table", f"input={tmp_path / 't.jsonl'}", f"output_dir={tmp_path / 'out'}",
                     "progress=false"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "bad_caption 1" in out


# ------------------------------------------------------------------------------------------------ preference pairs


def _pair(label: str = '"label_0": 1', extra: bytes = b"") -> dict[str, bytes]:
    return {"jpg_0": image_bytes(8, 8, 1), "jpg_1": image_bytes(8, 8, 2), "txt": b"a pair",
            "json": b"{" + label.encode() + extra + b"}"}


def _pair_tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


def test_preference_reader_skips_unwritable_text_deep_json_and_duplicates(tmp_path):
    _pair_tar(tmp_path / "p-000000.tar", [
        ("000", _pair()),
        ("001", _pair(extra=b', "caption": "\\ud800"')),  # read as the caption (json:caption first): bad_caption
        ("002", {**_pair(), "json": DEEP}),  # bad_json (RecursionError before)
        ("003", _pair(extra=b', "note": "\\udfff"')),  # bad_json
        ("004", _pair()), ("004", _pair('"label_0": 0')),  # duplicate_key: the first is kept
        ("005", _pair()),
    ])
    skips = SkipLog()
    cfg = DataConfig(urls=str(tmp_path / "p-000000.tar"), resolution=8, caption_keys=["json:caption", "txt"])
    pairs = list(iter_preference_pairs(cfg, "keep", skips))
    assert [p.key for p in pairs] == ["000", "004", "005"] and pairs[1].label_0 == 1.0
    assert skips.counts == {"bad_caption": 1, "bad_json": 2, "duplicate_key": 1}


def test_preference_table_with_a_lone_surrogate(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes(8, 8, 1))
    (tmp_path / "b.png").write_bytes(image_bytes(8, 8, 2))
    row = b'"jpg_0": "a.png", "jpg_1": "b.png", "label_0": 1'
    (tmp_path / "p.jsonl").write_bytes(b"{" + row + b', "caption": "fine"}\n'
                                       b"{" + row + b', "caption": "\\ud800"}\n'
                                       b"{" + row + b', "caption": "fine", "rater": "\\udc80"}\n'
                                       b"{" + row + b', "caption": "fine", "x": ' + DEEP + b"}\n")
    source = PairTableSource(tmp_path / "p.jsonl")
    result = write_preference_shards(source, tmp_path / "out", "p")
    assert result.samples == 1 and source.skips.counts == {"bad_caption": 1, "bad_row": 2}
