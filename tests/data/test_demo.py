"""The bundled digits demo set: split, pixels, captions, shards, byte-identical rebuilds."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline import demo
from data_pipeline.demo import (
    DIGIT_WORDS,
    build_demo_set,
    caption_for_digit,
    load_digits_split,
    stratified_split,
    upsample_digits,
)
from data_pipeline.index import read_index


def _read_split(folder: Path, split: str) -> list[dict]:
    """Every sample of one split: {"key", "png", "txt", "json"} in tar order."""
    index = read_index(folder / f"{split}.shardindex.json")
    out = []
    for shard in index.shards:
        with tarfile.open(folder / shard.url) as tar:
            members = tar.getmembers()
            by_key: dict[str, dict] = {}
            for m in members:
                key, ext = m.name.split(".", 1)
                by_key.setdefault(key, {"key": key})[ext] = tar.extractfile(m).read()
        assert len(by_key) == shard.nsamples
        out += [by_key[k] for k in sorted(by_key)]
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    demo._digits.cache_clear()

    out = tmp_path_factory.mktemp("demo_a")
    return out, build_demo_set(out, seed=0)


def test_build_is_complete(built):
    # its time is part of `make quickstart`'s, measured in benchmarks/RESULTS.md (no timed test here)
    out, summaries = built
    assert summaries["train"].samples == 1617 and summaries["val"].samples == 180
    assert sorted(p.name for p in out.iterdir()) == [
        "train-000000.tar", "train-000001.tar", "train.shardindex.json", "val-000000.tar", "val.shardindex.json",
    ]
    assert read_index(out / "train.shardindex.json").total_samples + read_index(
        out / "val.shardindex.json").total_samples == 1797


def test_samples_agree_and_images_are_32x32_rgb(built):
    out, _ = built
    indices = {}
    for split in ("train", "val"):
        samples = _read_split(out, split)
        indices[split] = [json.loads(s["json"])["index"] for s in samples]
        for s in samples:
            meta = json.loads(s["json"])
            assert meta["split"] == split and meta["digit"] == DIGIT_WORDS[meta["label"]]
            assert s["txt"].decode() == meta["caption"] == caption_for_digit(meta["label"])
            assert meta["source"] == f"sklearn-digits/{meta['index']}"
            img = Image.open(io.BytesIO(s["png"]))
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
            assert (meta["width"], meta["height"]) == (32, 32)
    assert not set(indices["train"]) & set(indices["val"])
    assert sorted(indices["train"] + indices["val"]) == list(range(1797))


def test_shard_labels_match_sklearn(built):
    from sklearn.datasets import load_digits

    out, _ = built
    target = load_digits().target
    for s in _read_split(out, "val"):
        meta = json.loads(s["json"])
        assert meta["label"] == target[meta["index"]]


def test_split_is_stratified():
    labels = load_digits_split(0, 0.1)[3]
    assert np.bincount(labels, minlength=10).tolist() == [18] * 10
    for frac in (0.1, 0.25, 0.33):
        train_l = load_digits_split(3, frac)[1]
        val_l = load_digits_split(3, frac)[3]
        counts = np.bincount(np.concatenate([train_l, val_l]), minlength=10)
        val_counts = np.bincount(val_l, minlength=10)
        assert len(val_l) == round(1797 * frac)
        assert np.all(np.abs(val_counts - counts * frac) < 1.0), (frac, val_counts)


def test_stratified_split_on_uneven_classes():
    labels = np.array([0] * 10 + [1] * 30 + [2] * 5)
    train, val = stratified_split(labels, seed=1, val_fraction=0.2)
    assert len(val) == 9 and np.bincount(labels[val]).tolist() == [2, 6, 1]
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(45))
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(labels, val_fraction=1.5)


def test_rebuild_is_byte_identical(built, tmp_path):
    out, _ = built
    build_demo_set(tmp_path, seed=0)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_other_seed_gives_another_split(built, tmp_path):
    out, _ = built
    build_demo_set(tmp_path, seed=1)
    val0 = {json.loads(s["json"])["index"] for s in _read_split(out, "val")}
    val1 = {json.loads(s["json"])["index"] for s in _read_split(tmp_path, "val")}
    assert len(val0) == len(val1) == 180 and val0 != val1


def test_load_digits_split_matches_the_shards(built):
    out, _ = built
    train_x, train_y, val_x, val_y = load_digits_split(seed=0, val_fraction=0.1)
    assert train_x.shape == (1617, 32, 32, 3) and val_x.shape == (180, 32, 32, 3)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int64
    samples = _read_split(out, "val")
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(s["png"]))) for s in samples])
    np.testing.assert_array_equal(pixels, val_x)
    np.testing.assert_array_equal([json.loads(s["json"])["label"] for s in samples], val_y)
    again = load_digits_split(seed=0, val_fraction=0.1)
    np.testing.assert_array_equal(again[0], train_x)


def test_upsampling_scale_polarity_and_interpolation():
    from sklearn.datasets import load_digits

    full = upsample_digits(np.full((1, 8, 8), 16.0))
    assert full.shape == (1, 32, 32, 3) and np.all(full == 255)
    assert np.all(upsample_digits(np.zeros((1, 8, 8))) == 0)  # background is black, ink is white
    ramp = upsample_digits(np.tile(np.arange(8.0) * 2, (1, 8, 1)))[0, 0, :, 0].astype(int)
    assert np.all(np.diff(ramp) >= 0) and ramp[0] == 0 and ramp[-1] == round(14 * 255 / 16)
    digits = load_digits().images[:20]
    ours = upsample_digits(digits)
    assert np.all(ours[..., 0] == ours[..., 1]) and np.all(ours[..., 1] == ours[..., 2])
    pil = np.stack([
        np.asarray(Image.fromarray((d * 255 / 16).astype(np.float32), mode="F").resize((32, 32), Image.BILINEAR))
        for d in digits
    ])
    assert np.abs(ours[..., 0].astype(np.float64) - pil).max() <= 0.5 + 1e-3  # PIL's bilinear, up to rounding


def test_caption_for_digit():
    assert caption_for_digit(7) == "a handwritten digit seven"
    assert caption_for_digit(np.int64(0)) == "a handwritten digit zero"
    assert [caption_for_digit(d).split()[-1] for d in range(10)] == list(DIGIT_WORDS)
    for bad in (10, -1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="digit"):
            caption_for_digit(bad)


def test_refuses_existing_files_before_writing(tmp_path):
    (tmp_path / "val-000000.tar").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite"):
        build_demo_set(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val-000000.tar"]  # nothing new written
    summaries = build_demo_set(tmp_path, overwrite=True, val_fraction=0.0, max_samples_per_shard=2000)
    assert list(summaries) == ["train"] and summaries["train"].samples == 1797
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar", "train.shardindex.json"]


def test_webdataset_reads_the_demo_set(built):
    wds = pytest.importorskip("webdataset")
    out, _ = built
    ds = wds.WebDataset(str(out / "val-000000.tar"), shardshuffle=False).decode("rgb8")
    n = 0
    for s in ds:
        assert s["png"].shape == (32, 32, 3) and s["json"]["digit"] in s["txt"]
        n += 1
    assert n == 180
