"""Shard writer, its config, and the folder / table sources."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.index import read_index
from data_pipeline.sources import FolderSource, Sample, SkipLog, TableSource
from data_pipeline.writer import ShardsConfig, ShardWriter, WriterOptions, encode_image, write_shards


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _samples(n: int, start: int = 0) -> list[Sample]:
    return [Sample(_encode(_rgb(6, 5, i), "PNG"), f"caption {i}", {"i": i}, f"src/{i}.png")
            for i in range(start, start + n)]


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def _read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}}, grouping by the text before the first dot as webdataset does."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


# ------------------------------------------------------------------------------------------------ writer


def test_layout_members_json_and_txt(tmp_path):
    jpg = _encode(_rgb(10, 14, 1), "JPEG", quality=90)
    png = _encode(_rgb(7, 3, 2), "PNG")
    samples = [
        Sample(jpg, "a jpeg", {"url": "http://x/1.jpg", "score": 0.5}, "photos/1.jpg"),
        Sample(png, "ein Bild mit Umlauten: äöü — ✓", {}, "photos/2.png"),
        Sample(_rgb(4, 9, 3), "an array", {"label": np.int64(3)}, "arr"),
        Sample(Image.fromarray(_rgb(5, 6, 4)).convert("L"), "a PIL image", {}, "pil"),
    ]
    summary = write_shards(samples, tmp_path, "set")
    assert [s.url for s in summary.index.shards] == ["set-000000.tar"]
    names = [m.name for m in _members(tmp_path / "set-000000.tar")]
    assert names == [
        "000000000.jpg", "000000000.json", "000000000.txt",
        "000000001.json", "000000001.png", "000000001.txt",
        "000000002.json", "000000002.png", "000000002.txt",
        "000000003.json", "000000003.png", "000000003.txt",
    ]
    got = _read_tar(tmp_path / "set-000000.tar")
    assert got["000000000"]["jpg"] == jpg  # kept byte for byte
    assert got["000000001"]["png"] == png
    assert got["000000001"]["txt"].decode("utf-8") == samples[1].caption
    metas = [json.loads(got[k]["json"]) for k in sorted(got)]
    assert [(m["width"], m["height"]) for m in metas] == [(14, 10), (3, 7), (9, 4), (6, 5)]
    assert [m["key"] for m in metas] == sorted(got)
    assert [m["caption"] for m in metas] == [s.caption for s in samples]
    assert [m["source"] for m in metas] == ["photos/1.jpg", "photos/2.png", "arr", "pil"]
    assert metas[0]["url"] == "http://x/1.jpg" and metas[0]["score"] == 0.5 and metas[2]["label"] == 3
    arr_back = np.asarray(Image.open(io.BytesIO(got["000000002"]["png"])))
    np.testing.assert_array_equal(arr_back, samples[2].image)  # png is lossless
    assert Image.open(io.BytesIO(got["000000003"]["png"])).mode == "L"


def test_max_per_shard_and_index_match_the_tars(tmp_path):
    summary = write_shards(_samples(7), tmp_path, "train", WriterOptions(max_samples_per_shard=3))
    tars = sorted(tmp_path.glob("*.tar"))
    assert [t.name for t in tars] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    index = read_index(tmp_path / "train.shardindex.json")
    assert index.name == "train" and index.total_samples == 7 == summary.samples
    keys = []
    for info, tar in zip(index.shards, tars):
        content = _read_tar(tar)
        assert info.url == tar.name
        assert info.nsamples == len(content)
        assert info.filesize == tar.stat().st_size
        assert all(set(v) == {"png", "json", "txt"} for v in content.values())
        keys += sorted(content)
    assert [s.nsamples for s in index.shards] == [3, 3, 1]
    assert keys == [f"{i:09d}" for i in range(7)]
    assert summary.total_bytes == sum(t.stat().st_size for t in tars)
    assert not list(tmp_path.glob("*.tmp"))


def test_webdataset_reads_the_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    write_shards(_samples(5), tmp_path, "w", WriterOptions(max_samples_per_shard=2))
    urls = [str(p) for p in sorted(tmp_path.glob("w-*.tar"))]
    seen = []
    for url in urls:
        for s in wds.WebDataset(url, shardshuffle=False):
            meta = json.loads(s["json"])
            assert s["txt"].decode() == meta["caption"]
            assert Image.open(io.BytesIO(s["png"])).size == (meta["width"], meta["height"])
            seen.append((s["__key__"], meta["i"]))
    assert seen == [(f"{i:09d}", i) for i in range(5)]


def _raising(samples, after):
    for i, s in enumerate(samples):
        if i == after:
            raise RuntimeError("source broke")
        yield s


def test_a_failing_source_leaves_no_partial_tar(tmp_path):
    with pytest.raises(RuntimeError, match="source broke"):
        write_shards(_raising(_samples(10), after=4), tmp_path, "x",
                     WriterOptions(max_samples_per_shard=100))
    assert list(tmp_path.iterdir()) == []  # no final-name tar, no .tmp, no index

    with pytest.raises(RuntimeError):
        write_shards(_raising(_samples(10), after=5), tmp_path, "y", WriterOptions(max_samples_per_shard=2))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["y-000000.tar", "y-000001.tar"]  # finished shards stay whole; no index, no temp file
    assert [len(_read_tar(tmp_path / n)) for n in left] == [2, 2]


def test_tmp_name_is_used_while_writing(tmp_path):
    seen = []

    def watch():
        for s in _samples(3):
            yield s
            seen.append(sorted(p.name for p in tmp_path.iterdir()))

    write_shards(watch(), tmp_path, "t", WriterOptions(max_samples_per_shard=10))
    assert seen[0] == ["t-000000.tar.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t-000000.tar", "t.shardindex.json"]


def test_bytes_are_deterministic(tmp_path, monkeypatch):
    import time

    write_shards(_samples(5), tmp_path / "a", "d", WriterOptions(max_samples_per_shard=2))
    monkeypatch.setattr(time, "time", lambda: 2_000_000_000.0)  # a different "now" must not matter
    write_shards(_samples(5), tmp_path / "b", "d", WriterOptions(max_samples_per_shard=2))
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for m in _members(tmp_path / "a" / "d-000000.tar"):
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)


def test_reencode_to_jpg_with_downscale(tmp_path):
    rgba = np.dstack([_rgb(20, 40, 5), np.full((20, 40), 128, np.uint8)])
    samples = [Sample(_encode(rgba, "PNG"), "transparent", {}, "t.png")]
    write_shards(samples, tmp_path, "j", WriterOptions(image_format="jpg", jpeg_quality=80, max_size=16))
    got = _read_tar(tmp_path / "j-000000.tar")["000000000"]
    assert set(got) == {"jpg", "json", "txt"}
    img = Image.open(io.BytesIO(got["jpg"]))
    meta = json.loads(got["json"])
    assert img.format == "JPEG" and img.mode == "RGB" and img.size == (16, 8) == (meta["width"], meta["height"])


def test_keep_reencodes_only_when_needed():
    png = _encode(_rgb(30, 10, 6), "PNG")
    kept = encode_image(png, "keep", max_size=30)
    assert kept.data == png and (kept.width, kept.height) == (10, 30)
    small = encode_image(png, "keep", max_size=15)
    assert small.ext == "png" and (small.width, small.height) == (5, 15)
    assert Image.open(io.BytesIO(small.data)).size == (5, 15)
    bmp = _encode(_rgb(4, 4, 7), "BMP")
    as_png = encode_image(bmp, "keep")
    assert as_png.ext == "png"
    back = np.asarray(Image.open(io.BytesIO(as_png.data)))
    np.testing.assert_array_equal(back, np.asarray(Image.open(io.BytesIO(bmp))))
    jpg = _encode(_rgb(8, 8, 8), "JPEG")
    assert encode_image(jpg, "jpg").data == jpg  # already jpg: no lossy second pass
    assert encode_image(jpg, "png").ext == "png"


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buf = io.BytesIO()
    Image.fromarray(_rgb(10, 30, 9)).save(buf, format="JPEG", exif=exif)
    enc = encode_image(buf.getvalue(), "keep")
    assert enc.ext == "jpg" and (enc.width, enc.height) == (10, 30)
    assert Image.open(io.BytesIO(enc.data)).size == (10, 30)


def test_writer_counts_corrupt_bytes(tmp_path):
    good = _samples(2)
    bad = Sample(b"\x89PNG\r\n\x1a\n not really", "broken", {}, "bad.png")
    truncated = Sample(_encode(_rgb(64, 64, 1), "PNG")[:200], "cut", {}, "cut.png")
    summary = write_shards([good[0], bad, truncated, good[1]], tmp_path, "c")
    assert summary.samples == 2
    assert summary.skips.counts == {"corrupt_image": 2}
    assert summary.skips.examples["corrupt_image"] == ["bad.png", "cut.png"]
    assert read_index(summary.index_path).skipped == {"corrupt_image": 2}
    assert "corrupt_image 2 (e.g. bad.png, cut.png)" in summary.format()


def test_overwrite_is_refused_unless_asked(tmp_path):
    write_shards(_samples(5), tmp_path, "o", WriterOptions(max_samples_per_shard=2))
    write_shards(_samples(2), tmp_path, "other")  # another prefix in the same folder is no conflict
    with pytest.raises(FileExistsError, match="overwrite"):
        ShardWriter(tmp_path, "o")
    assert len(list(tmp_path.glob("o-*.tar"))) == 3  # refusing touched nothing
    write_shards(_samples(1, start=10), tmp_path, "o", WriterOptions(overwrite=True))
    assert sorted(p.name for p in tmp_path.glob("o-*.tar")) == ["o-000000.tar"]  # stale shards 1, 2 gone
    assert read_index(tmp_path / "o.shardindex.json").total_samples == 1
    assert len(list(tmp_path.glob("other-*.tar"))) == 1


def test_array_of_wrong_dtype_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_shards([Sample(np.zeros((4, 4), np.float32), "x")], tmp_path, "e")
    assert not list(tmp_path.glob("*.tar*"))


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"source": "web"}, "source"),
        ({"source": "folder"}, "input"),
        ({"source": "folder", "input": "/no/such/folder"}, "input"),
        ({"source": "table", "input": "."}, "input"),
        ({"max_samples_per_shard": 0}, "max_samples_per_shard"),
        ({"image_format": "gif"}, "image_format"),
        ({"image_format": "jpg"}, "image_format"),  # demo stays lossless
        ({"jpeg_quality": 101}, "jpeg_quality"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"prefix": "x"}, "prefix"),  # demo names its own sets
        ({"input": "x.jsonl"}, "input"),  # demo reads no input
    ],
)
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError) as err:
        ShardsConfig(**kwargs)
    assert str(err.value).startswith(f"{field}:")


def test_config_table_and_folder_checks(tmp_path):
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(ValueError, match=r"^input:.*\.csv"):
        ShardsConfig(source="table", input=str(tmp_path / "t.txt"))
    with pytest.raises(ValueError, match="^input:.*folder"):
        ShardsConfig(source="folder", input=str(tmp_path / "t.txt"))
    with pytest.raises(ValueError, match="^prefix:"):
        ShardsConfig(source="folder", input=str(tmp_path), prefix="a/b")
    with pytest.raises(ValueError, match="^max_size:"):
        ShardsConfig(source="folder", input=str(tmp_path), max_size=0)
    cfg = ShardsConfig(source="folder", input=str(tmp_path), image_format="jpg", max_size=64)
    assert cfg.shard_prefix == "shard"


# ------------------------------------------------------------------------------------------------ sources


def _folder(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.jpg").write_bytes(_encode(_rgb(8, 8, 1), "JPEG"))
    (root / "a.txt").write_text("  a photo of a cat\n")
    (root / "sub" / "b.PNG").write_bytes(_encode(_rgb(5, 7, 2), "PNG"))
    (root / "sub" / "b.txt").write_text("b caption")
    (root / "sub" / "b.json").write_text(json.dumps({"license": "cc-by", "width": 999}))
    (root / "sub" / "c.png").write_bytes(_encode(_rgb(4, 4, 3), "PNG"))  # no caption
    (root / "sub" / "deeper" / "d.jpg").write_bytes(b"not a jpeg at all")
    (root / "sub" / "deeper" / "d.txt").write_text("d caption")
    (root / "e.webp").write_bytes(_encode(_rgb(6, 6, 4), "WEBP"))
    (root / "e.txt").write_text("e caption")
    (root / "f.bmp").write_bytes(_encode(_rgb(3, 5, 5), "BMP"))
    (root / "f.txt").write_text("f caption")
    (root / "g.png").write_bytes(_encode(_rgb(4, 4, 6), "PNG"))
    (root / "g.txt").write_text("   \n")  # empty caption
    (root / "h.png").write_bytes(_encode(_rgb(4, 4, 7), "PNG"))
    (root / "h.txt").write_text("h caption")
    (root / "h.json").write_text("[1, 2]")  # not an object
    (root / "notes.txt").write_text("no image here")
    (root / ".hidden" / "x.png").write_bytes(_encode(_rgb(4, 4, 8), "PNG"))
    (root / ".hidden" / "x.txt").write_text("hidden")
    return root


def test_folder_source_reads_and_skips(tmp_path):
    src = FolderSource(_folder(tmp_path / "imgs"))
    samples = list(src)
    assert [s.source_id for s in samples] == ["a.jpg", "e.webp", "f.bmp", "sub/b.PNG"]
    assert [s.caption for s in samples] == ["a photo of a cat", "e caption", "f caption", "b caption"]
    assert samples[3].extra == {"license": "cc-by", "width": 999}
    assert all(s.decoded is not None for s in samples)
    assert src.skips.counts == {"missing_caption": 2, "corrupt_image": 1, "bad_metadata": 1}
    assert src.skips.examples["missing_caption"] == ["g.png", "sub/c.png"]
    assert src.skips.examples["corrupt_image"] == ["sub/deeper/d.jpg"]
    assert src.size_hint() == 8


def test_folder_source_allow_empty_caption_and_shards(tmp_path):
    src = FolderSource(_folder(tmp_path / "imgs"), allow_empty_caption=True)
    summary = write_shards(src, tmp_path / "out", "f", WriterOptions(max_samples_per_shard=4))
    assert summary.samples == 6 and summary.skips.counts == {"corrupt_image": 1, "bad_metadata": 1}
    index = read_index(summary.index_path)
    assert index.skipped == {"corrupt_image": 1, "bad_metadata": 1}
    got = {}
    for tar in sorted((tmp_path / "out").glob("f-*.tar")):
        got.update(_read_tar(tar))
    metas = {json.loads(v["json"])["source"]: (json.loads(v["json"]), sorted(v)) for v in got.values()}
    assert metas["sub/c.png"][0]["caption"] == "" and metas["g.png"][0]["caption"] == ""
    assert metas["e.webp"][1] == ["json", "txt", "webp"]  # kept as webp
    assert metas["f.bmp"][1] == ["json", "png", "txt"]  # bmp re-encoded losslessly
    b = metas["sub/b.PNG"][0]
    assert b["license"] == "cc-by" and (b["width"], b["height"]) == (7, 5)  # the writer's width wins


def _table_dir(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "images" / "ok1.png").write_bytes(_encode(_rgb(5, 5, 1), "PNG"))
    (root / "images" / "ok2.jpg").write_bytes(_encode(_rgb(6, 4, 2), "JPEG"))
    (root / "images" / "bad.png").write_bytes(b"garbage")
    return root


def test_jsonl_source(tmp_path):
    root = _table_dir(tmp_path / "t")
    lines = [
        json.dumps({"path": "images/ok1.png", "text": "first", "score": 0.9, "tags": ["x"]}),
        json.dumps({"path": "images/missing.png", "text": "gone"}),
        "{not json",
        "",
        json.dumps({"path": "images/bad.png", "text": "corrupt"}),
        json.dumps({"path": "images/ok2.jpg", "text": ""}),
        json.dumps({"text": "no image column"}),
        json.dumps(["a", "list"]),
        json.dumps({"path": str((root / "images" / "ok2.jpg").resolve()), "text": "absolute path"}),
    ]
    table = root / "pairs.jsonl"
    table.write_bytes(("\ufeff" + "\n".join(lines) + "\n").encode() + b'{"path": "\xff\xfe"}\n')
    src = TableSource(table, image_column="path", caption_column="text")
    samples = list(src)
    assert [s.caption for s in samples] == ["first", "absolute path"]
    assert samples[0].extra == {"score": 0.9, "tags": ["x"]}
    assert samples[0].source_id == "images/ok1.png"
    assert src.skips.counts == {"missing_image": 1, "bad_row": 4, "corrupt_image": 1, "missing_caption": 1}
    assert src.skips.examples["bad_row"] == ["pairs.jsonl:3", "pairs.jsonl:7", "pairs.jsonl:8"]  # and :10
    assert src.skips.examples["missing_image"] == ["pairs.jsonl:2 images/missing.png"]
    assert src.size_hint() == 9


def test_jsonl_source_allow_empty_caption(tmp_path):
    root = _table_dir(tmp_path / "t")
    (root / "p.jsonl").write_text(json.dumps({"image": "images/ok2.jpg"}) + "\n")
    assert list(TableSource(root / "p.jsonl")) == []
    src = TableSource(root / "p.jsonl", allow_empty_caption=True)
    assert [s.caption for s in src] == [""]


def test_csv_source_and_shards(tmp_path):
    root = _table_dir(tmp_path / "t")
    (root / "pairs.csv").write_text(
        "image,caption,score,author\n"
        "images/ok1.png,\"a caption, with a comma\",0.5,ann\n"
        "images/bad.png,corrupt,0.1,bob\n"
        "images/nope.png,missing,0.2,cy\n"
        "images/ok2.jpg,,0.3,dee\n"
        "images/ok2.jpg,second,0.4,eve\n"
    )
    src = TableSource(root / "pairs.csv")
    summary = write_shards(src, tmp_path / "out", "csv")
    assert summary.samples == 2
    assert read_index(summary.index_path).skipped == {"corrupt_image": 1, "missing_caption": 1, "missing_image": 1}
    got = _read_tar(tmp_path / "out" / "csv-000000.tar")
    metas = [json.loads(got[k]["json"]) for k in sorted(got)]
    assert [m["caption"] for m in metas] == ["a caption, with a comma", "second"]
    assert [(m["score"], m["author"]) for m in metas] == [("0.5", "ann"), ("0.4", "eve")]
    assert sorted(got["000000001"]) == ["jpg", "json", "txt"]
    assert src.skips.examples["missing_image"] == ["pairs.csv:4 images/nope.png"]


def test_csv_without_the_columns_is_a_clear_error(tmp_path):
    (tmp_path / "p.csv").write_text("file,text\nx.png,hello\n")
    with pytest.raises(ValueError, match="'image', 'caption'"):
        TableSource(tmp_path / "p.csv")
    assert TableSource(tmp_path / "p.csv", image_column="file", caption_column="text").size_hint() == 1


def test_skip_log_keeps_a_few_examples():
    log = SkipLog(max_examples=2)
    for i in range(5):
        log.add("missing_image", f"f{i}")
    assert log.counts == {"missing_image": 5} and log.examples["missing_image"] == ["f0", "f1"]
    assert log.format() == "missing_image 5 (e.g. f0, f1, ...)"
    assert SkipLog().format() == "nothing"


def test_writer_options_are_one_dataclass_that_the_command_config_extends(tmp_path):
    cfg = ShardsConfig(source="folder", input=str(tmp_path), max_samples_per_shard=7, image_format="png",
                       overwrite=True)
    assert isinstance(cfg, WriterOptions)
    assert cfg.writer_options() == WriterOptions(7, "png", 95, None, True)
    with pytest.raises(ValueError, match="^max_samples_per_shard: got 0"):
        WriterOptions(max_samples_per_shard=0)
    with pytest.raises(ValueError, match="^max_size: got 0"):
        ShardWriter(tmp_path, "w", WriterOptions(max_size=0))
