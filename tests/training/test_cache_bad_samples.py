"""The cache stage and the DPO pair cache never end on one bad sample: a caption holding a lone surrogate, json
nested too deep, adjacent samples sharing a key are skipped, counted and recorded in the cache's shard index
(issue 16, items 2 and 6)."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "data"))

from shardmaker import image_bytes, sample, write_shardset  # noqa: E402

from data_pipeline.batch import Batch  # noqa: E402
from data_pipeline.data_config import DataConfig  # noqa: E402
from models.autoencoder import AutoencoderConfig, AutoencoderKL  # noqa: E402
from training.stages import cache as cache_stage  # noqa: E402
from training.stages.cache import CacheConfig, cache_shards  # noqa: E402
from training.stages.dpo import cache_preference_pairs  # noqa: E402

AE = AutoencoderConfig(block_out_channels=[8], layers_per_block=1, norm_num_groups=4, latent_channels=2,
                       mid_block_attention=False)
DEEP = b"[" * 200_000 + b"]" * 200_000


class StubTextEncoder:
    """Stands in for the frozen text encoder: fixed-size zeros, and it fails on text that is not UTF-8 as a
    tokenizer would."""

    def encode(self, captions: list[str]):
        for c in captions:
            c.encode("utf-8")
        n = len(captions)
        return SimpleNamespace(context=torch.zeros(n, 3, 4), context_mask=torch.ones(n, 3, dtype=torch.bool),
                               pooled=torch.zeros(n, 4))


def index_of(folder, prefix: str) -> dict:
    return json.loads((folder / f"{prefix}.shardindex.json").read_text())


def test_cache_stage_skips_and_records_bad_samples(tmp_path):
    shard = [("a", sample("a", 16, 16)),
             ("b", {**sample("b", 16, 16), "json": b'{"caption": "\\ud800"}'}),  # UnicodeEncodeError before
             ("c", {**sample("c", 16, 16), "json": DEEP}),  # RecursionError before
             ("d", sample("d", 16, 16, seed=1)), ("d", sample("d", 16, 16, seed=2)),  # the second was lost
             ("e", sample("e", 16, 16))]
    write_shardset(tmp_path / "in", "s", [shard])
    data = DataConfig(urls=str(tmp_path / "in"), resolution=16, num_workers=0, caption_keys=["json:caption", "txt"])
    ae = AutoencoderKL(AE).eval().requires_grad_(False)
    n = cache_shards(data, "train", tmp_path / "cache", ae, StubTextEncoder(), CacheConfig(batch_size=2),
                     torch.device("cpu"), progress=False)
    assert n == 3
    assert index_of(tmp_path / "cache", "train")["skipped"] == {"bad_caption": 1, "bad_json": 1, "duplicate_key": 1}


def test_cache_stage_guards_what_it_writes(tmp_path, monkeypatch, caplog):
    """Text the loader let through (a custom loader, say) is counted, not fatal, and never half-written."""
    def batch(captions, metas):
        n = len(captions)
        return Batch(pixels=torch.zeros(n, 3, 8, 8), captions=captions, keys=[f"k{i}" for i in range(n)],
                     metadata=metas, original_size=torch.full((n, 2), 8), crop_top_left=torch.zeros(n, 2),
                     target_size=torch.full((n, 2), 8), sources=["src"] * n)

    class FakeLoader:
        def __iter__(self):
            yield batch(["fine", "\ud800", "fine"], [{}, {}, {"note": "\udc80"}])

        def stats(self):
            return {"skipped": {"corrupt_image": 2}}

    monkeypatch.setattr(cache_stage, "build_loader", lambda *a, **k: FakeLoader())
    ae = AutoencoderKL(AE).eval().requires_grad_(False)
    n = cache_shards(DataConfig(urls=str(tmp_path)), "t", tmp_path / "cache", ae, SimpleNamespace(
        encode=lambda caps: StubTextEncoder().encode(["x"] * len(caps))), CacheConfig(), torch.device("cpu"),
        progress=False)
    assert n == 1
    assert index_of(tmp_path / "cache", "t")["skipped"] == {"bad_caption": 1, "bad_json": 1, "corrupt_image": 2}
    with tarfile.open(tmp_path / "cache" / "t-000000.tar") as tf:
        assert {m.name.split(".")[0] for m in tf.getmembers()} == {"000000000"}
    assert any("'k1'" in r.getMessage() and "bad_caption" in r.getMessage() for r in caplog.records)


def test_dpo_pair_cache_skips_and_records_bad_pairs(tmp_path):
    def pair(label: float = 1.0, **meta) -> dict[str, bytes]:
        return {"jpg_0": image_bytes(8, 8, 1), "jpg_1": image_bytes(8, 8, 2), "txt": b"a pair",
                "json": json.dumps({"label_0": label, **meta}).encode()}

    samples = [("p0", pair()), ("p1", {**pair(), "json": b'{"label_0": 1, "caption": "\\ud800"}'}),
               ("p2", {**pair(), "json": DEEP}), ("p3", pair()), ("p3", pair(0.0)),
               ("p4", pair(1.0, label_1=1.0)), ("p5", pair(0.0, has_label=False)), ("p6", pair(0.0))]
    with tarfile.open(tmp_path / "pairs-000000.tar", "w") as tf:
        for key, members in samples:
            for ext, payload in members.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
    data = DataConfig(urls=str(tmp_path / "pairs-000000.tar"), resolution=8, caption_keys=["json:caption", "txt"])
    n, skips = cache_preference_pairs(data, "train", tmp_path / "cache", None, StubTextEncoder(), "keep",
                                      torch.device("cpu"), batch_size=2)
    assert n == 3
    expected = {"bad_caption": 1, "bad_json": 1, "duplicate_key": 1, "inconsistent_labels": 1, "unlabelled": 1}
    assert skips.counts == expected and index_of(tmp_path / "cache", "train")["skipped"] == expected
