"""A cache (latents or DPO pairs) is encoded once: re-running or resuming a pipeline reuses it while what went into
it is the same, rebuilds it when anything changed (data, settings, a retrained autoencoder), and never reuses a
build that was interrupted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from training.stages.cache import file_identity, reuse_or_build


def _builder(out: Path, prefix: str, calls: list, fail: bool = False):
    def build() -> None:
        calls.append(prefix)
        (out / f"{prefix}.shardindex.json").write_text("{}")
        if fail:
            raise RuntimeError("pre-empted mid-encode")
    return build


def test_reuse_while_the_signature_matches_and_rebuild_when_it_changes(tmp_path):
    calls: list = []
    sig = {"data": {"urls": "a-{0..3}.tar", "resolution": 32}, "cache": {"dtype": "float32"}, "path": tmp_path}
    assert reuse_or_build(tmp_path, "train", sig, _builder(tmp_path, "train", calls)) is True
    assert reuse_or_build(tmp_path, "train", dict(sig), _builder(tmp_path, "train", calls)) is False
    assert calls == ["train"]
    changed = dict(sig, cache={"dtype": "float16"})
    assert reuse_or_build(tmp_path, "train", changed, _builder(tmp_path, "train", calls)) is True
    assert calls == ["train", "train"]
    # the other split has its own stamp
    assert reuse_or_build(tmp_path, "val", changed, _builder(tmp_path, "val", calls)) is True
    (tmp_path / "val.shardindex.json").unlink()  # shards gone: rebuilt even with a matching stamp
    assert reuse_or_build(tmp_path, "val", changed, _builder(tmp_path, "val", calls)) is True
    assert calls == ["train", "train", "val", "val"]


def test_an_interrupted_build_is_not_reused(tmp_path):
    calls: list = []
    sig = {"data": "x"}
    reuse_or_build(tmp_path, "train", sig, _builder(tmp_path, "train", calls))
    with pytest.raises(RuntimeError, match="pre-empted"):
        reuse_or_build(tmp_path, "train", {"data": "y"}, _builder(tmp_path, "train", calls, fail=True))
    assert not (tmp_path / "train.cache.json").exists()
    assert reuse_or_build(tmp_path, "train", {"data": "y"}, _builder(tmp_path, "train", calls)) is True
    assert calls == ["train"] * 3


def test_a_rewritten_file_has_another_identity_the_same_bytes_do_not(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"a" * 8)
    before = file_identity(f)
    f.write_bytes(b"a" * 8)  # exported again, unchanged (a resumed pipeline re-exports its autoencoder)
    os.utime(f, ns=(10**18, 10**18))
    assert file_identity(f) == before
    f.write_bytes(b"b" * 8)  # retrained
    assert file_identity(f) != before and file_identity(f)[0] == before[0]
