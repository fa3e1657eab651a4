"""The member-decoder table: lookup by extension, config checks, one caption rule, and room for clips.

A fake clip decoder (frames stored as an ``.npy`` array under a made-up extension) stands in for the video entry:
registering it is all it takes for the loader to yield ``(B, C, T, H, W)`` batches."""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from shardmaker import npy_bytes, write_shardset  # noqa: E402

from data_pipeline import decoders  # noqa: E402
from data_pipeline.batch import collate  # noqa: E402
from data_pipeline.buckets import BucketSet  # noqa: E402
from data_pipeline.data_config import DataConfig  # noqa: E402
from data_pipeline.loader import build_loader  # noqa: E402
from data_pipeline.stream import read_meta, select_caption  # noqa: E402
from data_pipeline.transforms import Decoded, array_shape, to_float_pixels  # noqa: E402


def test_lookup_by_extension_or_its_last_part():
    assert decoders.member_decoder("png") is decoders.IMAGE
    assert decoders.member_decoder("hq.jpg") is decoders.IMAGE
    assert decoders.member_decoder("mp4") is decoders.VIDEO
    with pytest.raises(ValueError, match=r"no decoder for member extension 'xyz'; known: .*mp4.*png"):
        decoders.member_decoder("xyz")


def test_config_names_an_image_key_without_decoder():
    with pytest.raises(ValueError) as err:
        DataConfig(image_keys=["jpg", "xyz"])
    assert str(err.value).startswith("image_keys: got 'xyz'; allowed: a member extension with a decoder")


def test_an_extension_has_one_decoder(monkeypatch):
    monkeypatch.setattr(decoders, "DECODERS", dict(decoders.DECODERS))
    other = decoders.MemberDecoder("clip", ("png",), decoders.IMAGE.probe, decoders.IMAGE.decode)
    with pytest.raises(ValueError, match="'png': already decoded as image, cannot add clip"):
        decoders.register(other)


def test_image_decoder_probes_the_header_and_decodes_to_the_target():
    from shardmaker import image_bytes

    data = image_bytes(20, 30, 1, "png")
    assert decoders.IMAGE.probe(data) == (20, 30)
    d = decoders.IMAGE.decode(data, decoders.DecodeRequest((16, 8)))
    assert d.pixels.shape == (16, 8, 3) and d.shape == (16, 8) and d.num_frames == 1
    assert d.original_size == (20, 30) and d.target_size == (16, 8)


def test_caption_rule_and_json_member():
    members = {"txt": b"  ", "caption": b" from caption ", "json": b'{"caption": "from json"}'}
    meta, err = read_meta(members)
    assert meta == {"caption": "from json"} and err == ""
    assert select_caption(["txt", "caption", "json:caption"], members, meta) == "from caption"
    assert select_caption(["json:caption", "txt"], members, meta) == "from json"
    assert select_caption(["txt", "json:missing"], members, meta) == ""
    assert read_meta({}) == ({}, "")
    assert read_meta({"json": b"[1, 2]"}) == (None, "a list, not an object")
    assert read_meta({"json": b"{nope"})[0] is None


# ------------------------------------------------------------------------------------------- room for clips


def _clip_probe(data: bytes, cfg=None) -> tuple[int, ...]:
    return array_shape(data, "npy")[:-1]  # (T, H, W, 3) -> (T, H, W)


def _clip_decode(data: bytes, request: decoders.DecodeRequest) -> Decoded:
    frames = np.load(io.BytesIO(data), allow_pickle=False)  # (T, H, W, 3)
    th, tw = request.target[-2:]
    return Decoded(np.ascontiguousarray(frames[:, :th, :tw]), frames.shape[1:3], (0, 0), (th, tw))


FAKE_CLIP = decoders.MemberDecoder("clip", ("fakeclip",), _clip_probe, _clip_decode)


def test_clip_layout_is_channels_then_frames():
    frames = np.arange(2 * 3 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 3, 4, 5, 3)  # (B, T, H, W, 3)
    x = to_float_pixels(frames)
    assert x.shape == (2, 3, 3, 4, 5)  # (B, C, T, H, W)
    assert torch.equal(x, torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float() / 127.5 - 1)
    d = Decoded(frames[0], (4, 5), (0, 0), (4, 5))
    assert d.shape == (3, 4, 5) and d.num_frames == 3
    batch = collate([d, d], ["a", "b"], ["k0", "k1"], [{}, {}])
    assert batch.pixels.shape == (2, 3, 3, 4, 5) and batch.num_frames == 3
    assert batch.target_size.tolist() == [[4, 5]] * 2  # geometry stays spatial


def test_buckets_take_shape_tuples_with_a_frame_axis():
    b = BucketSet([(4, 16, 32), (4, 24, 24), (4, 32, 16)])
    assert b.assign((4, 10, 30)) == (4, 16, 32) and b.assign((9, 50, 40)) == (4, 24, 24)


def test_one_registered_entry_streams_clips(tmp_path, monkeypatch):
    monkeypatch.setattr(decoders, "DECODERS", dict(decoders.DECODERS))
    decoders.register(FAKE_CLIP)
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (3, 10, 12, 3), dtype=np.uint8) for _ in range(4)]
    write_shardset(tmp_path, "clips", [[(f"c{i}", {"fakeclip": npy_bytes(c), "txt": f"clip {i}".encode()})
                                        for i, c in enumerate(clips)]])
    cfg = DataConfig(urls=str(tmp_path), image_keys=["fakeclip"], resolution=8, batch_size=2, num_workers=0,
                     shuffle_buffer=0)
    batches = list(build_loader(cfg))
    assert [b.keys for b in batches] == [["c0", "c1"], ["c2", "c3"]]
    for b in batches:
        assert b.pixels.shape == (2, 3, 3, 8, 8) and b.num_frames == 3  # (B, C, T, H, W)
        for key, px in zip(b.keys, b.pixels):
            want = torch.from_numpy(clips[int(key[1:])][:, :8, :8]).permute(3, 0, 1, 2).float() / 127.5 - 1
            assert torch.equal(px, want)  # one sample: (C, T, H, W)
