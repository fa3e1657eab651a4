"""Video members: clips decoded from bytes with PyAV (stride, fps by timestamps, seek, rotation, one crop per
clip), and every kind of bad video skipped and counted by reason through the real loader."""

from __future__ import annotations

import json
import os
import sys
from fractions import Fraction

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from clipmaker import (  # noqa: E402
    CONTAINERS,
    absurd_length_bytes,
    audio_bytes,
    clip_bytes,
    frame_index,
    undecodable_bytes,
    unknown_codec_bytes,
)
from shardmaker import write_shardset  # noqa: E402

from data_pipeline import video as video_mod  # noqa: E402
from data_pipeline.data_config import DataConfig, VideoConfig  # noqa: E402
from data_pipeline.decoders import DecodeRequest, member_decoder  # noqa: E402
from data_pipeline.errors import SkipSample  # noqa: E402
from data_pipeline.loader import build_loader  # noqa: E402
from data_pipeline.video import check_header, clip_frames_available, decode_video, probe_video  # noqa: E402

VIDEO_KEYS = ["mp4", "webm", "mov", "mkv", "avi", "gif"]


def request(target, rand: int = 0, crop: str = "center", flip: bool = False, **video) -> DecodeRequest:
    return DecodeRequest(tuple(target), crop, flip, rand, video=VideoConfig(**video))


def indices(decoded) -> list[int]:
    return [frame_index(f) for f in decoded.pixels]


@pytest.fixture(scope="module")
def clips() -> dict[str, bytes]:
    """30 marked frames at 10 fps in every container, key frame every 4 frames (H.264 / VP9 / MPEG-4 / GIF)."""
    return {ext: clip_bytes(30, ext=ext) for ext in CONTAINERS}


@pytest.mark.parametrize("ext", list(CONTAINERS))
def test_registered_probe_and_stride(clips, ext):
    dec = member_decoder(ext)
    assert dec.kind == "video" and dec.decode is decode_video
    assert probe_video(clips[ext]) == (30, 32, 48)
    cfg = DataConfig(video=VideoConfig(frame_stride=3))
    assert dec.probe(clips[ext], cfg) == (10, 32, 48)  # (30 - 1) // 3 + 1 frames available at stride 3
    d = decode_video(clips[ext], request((5, 32, 48), clip_start="center", frame_stride=3))
    assert d.pixels.shape == (5, 32, 48, 3) and d.pixels.dtype == np.uint8
    assert d.clip_start == 8 and indices(d) == [8, 11, 14, 17, 20]  # 18 positions, centre (18 - 1) // 2
    assert d.clip_times == pytest.approx([0.8, 1.1, 1.4, 1.7, 2.0])
    assert d.original_size == (32, 48) and d.target_size == (32, 48) and d.crop_top_left == (0, 0)


def test_random_start_is_seeded_and_covers_positions(clips):
    starts = set()
    for rand in range(40):
        d = decode_video(clips["mp4"], request((4, 32, 48), rand=rand * 0x9E3779B97F4A7C15 % 2**64, frame_stride=2))
        assert indices(d) == [d.clip_start + 2 * k for k in range(4)]
        assert 0 <= d.clip_start <= 30 - 7
        again = decode_video(clips["mp4"], request((4, 32, 48), rand=rand * 0x9E3779B97F4A7C15 % 2**64,
                                                   frame_stride=2))
        assert again.clip_start == d.clip_start and np.array_equal(again.pixels, d.pixels)
        starts.add(d.clip_start)
    assert len(starts) >= 10


@pytest.mark.parametrize("ext", ["mp4", "webm", "mkv", "avi"])
def test_seek_equals_decode_from_start_and_decodes_less(clips, ext, monkeypatch):
    counted = []
    real = video_mod._frames

    def counting(container, stream):
        for f in real(container, stream):
            counted.append(f)
            yield f

    monkeypatch.setattr(video_mod, "_frames", counting)
    seeks = 0
    for rand in range(0, 2**64 - 1, 2**64 // 9):
        req = request((3, 32, 48), rand=rand, frame_stride=2)
        counted.clear()
        seeked = decode_video(clips[ext], req)
        n_seek = len(counted)
        counted.clear()
        straight = decode_video(clips[ext], req, seek=False)
        n_straight = len(counted)
        assert seeked.clip_start == straight.clip_start and np.array_equal(seeked.pixels, straight.pixels)
        assert indices(seeked) == [seeked.clip_start + 2 * k for k in range(3)]
        start = seeked.clip_start
        assert n_straight >= start + 5  # from the first frame through the last one sampled
        if start >= 8:  # two key-frame intervals in: the seek skipped decoding at least one
            assert n_seek <= n_straight - 4, (start, n_seek, n_straight)
            seeks += 1
    assert seeks >= 3


def test_fps_sampling_on_constant_rate():
    data = clip_bytes(40, ext="mp4", rate=30, gop=8)
    assert probe_video(data, DataConfig(video=VideoConfig(fps=10.0))) == (14, 32, 48)  # ceil(40 / 3)
    d = decode_video(data, request((4, 32, 48), clip_start="center", fps=10.0))
    # span 3 samples x 3 frames = 9 frames: 31 positions, centre 15
    assert d.clip_start == 15 and indices(d) == [15, 18, 21, 24]
    d = decode_video(data, request((4, 32, 48), clip_start="center", fps=60.0))  # faster than the source: repeats
    assert indices(d) == [d.clip_start, d.clip_start, d.clip_start + 1, d.clip_start + 1]


VFR_PTS = [0, 1, 2, 5, 6, 10, 11, 12, 20, 21, 22, 30, 31, 32, 40, 45]  # in 1/30 s: bursts and gaps


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
def test_fps_sampling_follows_timestamps_of_a_variable_rate_file(ext):
    import av

    tb = Fraction(1, 30)
    data = clip_bytes(len(VFR_PTS), ext=ext, rate=30, pts=VFR_PTS, time_base=tb, gop=4)
    with av.open(__import__("io").BytesIO(data)) as c:
        avg = float(c.streams.video[0].average_rate)
    times = [p / 30 for p in VFR_PTS]
    seen = set()
    for rand in range(12):
        d = decode_video(data, request((5, 32, 48), rand=rand * 7919, fps=10.0))
        t0 = d.clip_start / avg
        want = [max(i for i, t in enumerate(times) if t <= t0 + k / 10 + 1e-6) for k in range(5)]
        assert indices(d) == want, (d.clip_start, want)
        assert d.clip_times == pytest.approx([times[i] for i in want], abs=1e-3)
        straight = decode_video(data, request((5, 32, 48), rand=rand * 7919, fps=10.0), seek=False)
        assert np.array_equal(straight.pixels, d.pixels)
        seen.add(tuple(want))
    # frame order alone would give evenly spaced indices; timestamps give repeats and jumps
    assert any(len(set(w)) < 5 or np.ptp(np.diff(w)) > 1 for w in seen)


@pytest.mark.parametrize("rotation,corner", [(0, "tl"), (90, "bl"), (180, "br"), (270, "tr")])
def test_rotation_metadata_is_applied(rotation, corner):
    data = clip_bytes(8, h=32, w=48, ext="mp4", rotation=rotation, corner=True)
    shape = (48, 32) if rotation in (90, 270) else (32, 48)
    assert probe_video(data) == (8,) + shape
    d = decode_video(data, request((2,) + shape, clip_start="center"))
    assert d.original_size == shape and d.pixels.shape == (2,) + shape + (3,)
    h, w = shape
    quads = {"tl": d.pixels[:, : h // 8, : w // 8], "tr": d.pixels[:, : h // 8, -(w // 8):],
             "bl": d.pixels[:, -(h // 8):, : w // 8], "br": d.pixels[:, -(h // 8):, -(w // 8):]}
    for name, q in quads.items():
        assert (q.min() > 230) == (name == corner), (name, q.mean())


def test_one_crop_and_flip_for_every_frame():
    data = clip_bytes(12, h=32, w=48, ext="mp4", corner=True)
    masks = set()
    for rand in (1, 2, 2**40 + 3, 2**35 + 2**20 + 1):
        d = decode_video(data, request((6, 16, 16), rand=rand, crop="random", flip=True, clip_start="center"))
        assert d.original_size == (32, 48) and d.target_size == (16, 16)
        top, left = d.crop_top_left
        assert top == 0 and 0 <= left <= 8  # cover size (16, 24)
        white = d.pixels.min(axis=-1) > 200  # (T, 16, 16): the corner block, where the crop left it
        assert all(np.array_equal(white[0], m) for m in white[1:])
        cols = np.flatnonzero(white[0].any(axis=0))
        expect = 6 - left  # the block is 6 columns wide in the 24-wide cover image
        if rand & 1:  # flipped: the block sits at the right edge
            assert list(cols) == list(range(16 - expect, 16))
        else:
            assert list(cols) == list(range(expect))
        masks.add(white[0].tobytes())
    assert len(masks) >= 3


def test_short_clips_skip_or_pad():
    data = clip_bytes(6, ext="mp4")
    with pytest.raises(SkipSample) as e:
        decode_video(data, request((4, 32, 48), frame_stride=3))
    assert e.value.reason == "short_clip"
    d = decode_video(data, request((4, 32, 48), frame_stride=3, short_clips="pad"))
    assert d.clip_start == 0 and indices(d) == [0, 3, 3, 3]
    assert clip_frames_available(6, 10.0, 3) == 2 and clip_frames_available(6, 10.0, 1, 5.0) == 3


def test_absurd_headers_are_refused_before_decoding():
    for fps in (0, 0.0, float("nan"), float("inf"), -5):
        with pytest.raises(SkipSample) as e:
            check_header(10, fps, 32, 32)
        assert e.value.reason == "bad_metadata"
    with pytest.raises(SkipSample, match="max_frames") as e:
        check_header(10**6, 25.0, 32, 32)
    assert e.value.reason == "bad_metadata"
    with pytest.raises(SkipSample) as e:
        check_header(10, 25.0, 8192, 8192)
    assert e.value.reason == "too_large"
    check_header(10, 25.0, 32, 32)
    with pytest.raises(SkipSample) as e:
        probe_video(absurd_length_bytes())
    assert e.value.reason == "bad_metadata"


def test_large_frames_are_refused_before_any_frame_is_decoded(monkeypatch):
    data = clip_bytes(4, h=64, w=64, ext="mp4")
    monkeypatch.setattr(video_mod, "_frames", lambda *a: pytest.fail("decoded a frame of a too-large video"))
    with pytest.raises(SkipSample) as e:
        probe_video(data, DataConfig(video=VideoConfig(max_pixels=64 * 63)))
    assert e.value.reason == "too_large"


# ------------------------------------------------------------------------------------------ through the loader


def video_sample(key: str, data: bytes, ext: str = "mp4") -> tuple[str, dict]:
    return key, {ext: data, "txt": f"a clip {key}".encode(), "json": json.dumps({"key": key}).encode()}


@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("badvideo")
    mp4 = clip_bytes(12, ext="mp4")
    good = [video_sample(f"g{i}", clip_bytes(10 + i, ext=ext), ext) for i, ext in enumerate(["mp4", "webm", "mkv",
                                                                                                "avi", "mov", "gif"])]
    bad = [video_sample("truncated", mp4[: len(mp4) // 2]),  # moov atom lost: the container does not open
           video_sample("garbage", b"\x00\x01garbage" * 50, "mkv"),
           video_sample("nodecode", undecodable_bytes(), "mkv"),
           video_sample("short", clip_bytes(3, ext="mp4")),
           video_sample("audio", audio_bytes()),
           video_sample("codec", unknown_codec_bytes(), "avi"),
           video_sample("absurd", absurd_length_bytes(), "mkv"),
           video_sample("large", clip_bytes(4, h=96, w=96, ext="mp4"))]
    write_shardset(d, "v", [good[:3] + bad[:4], bad[4:] + good[3:]])
    return d


BAD_COUNTS = {"corrupt_video": 2, "no_frames": 1, "short_clip": 1, "audio_only": 1, "unsupported_codec": 1,
              "bad_metadata": 1, "too_large": 1}


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_videos_are_skipped_and_counted_through_the_loader(bad_videos, workers, caplog):
    cfg = DataConfig(urls=str(bad_videos), image_keys=VIDEO_KEYS, resolution=16, batch_size=2, num_workers=workers,
                     shuffle_buffer=0, shard_shuffle=False, full_pass=True,
                     video=VideoConfig(num_frames=4, max_pixels=64 * 64))
    loader = build_loader(cfg)
    with caplog.at_level("WARNING", logger="data_pipeline"):
        batches = list(loader)
    keys = sorted(k for b in batches for k in b.keys)
    assert keys == [f"g{i}" for i in range(6)]
    assert loader.stats()["skipped"] == BAD_COUNTS
    for b in batches:
        assert b.pixels.shape == (len(b), 3, 4, 16, 16) and b.num_frames == 4
        assert -1.0 <= float(b.pixels.min()) and float(b.pixels.max()) <= 1.0
        assert all("clip_start_frame" in m and len(m["clip_frame_times"]) == 4 for m in b.metadata)
    if workers == 0:
        msgs = " ".join(r.getMessage() for r in caplog.records)
        assert "audio_only" in msgs and "'audio'" in msgs and "v-000001.tar" in msgs


def test_loader_clip_pixels_are_the_sampled_frames(tmp_path):
    samples = [video_sample(f"c{i}", clip_bytes(20 + i, h=24, w=40, ext="mp4")) for i in range(4)]
    write_shardset(tmp_path, "c", [samples])
    cfg = DataConfig(urls=str(tmp_path), image_keys=["mp4"], resolution=16, batch_size=4, num_workers=0,
                     shuffle_buffer=0, shard_shuffle=False, full_pass=True,
                     video=VideoConfig(num_frames=3, frame_stride=4))
    (batch,) = list(build_loader(cfg))
    assert batch.pixels.shape == (4, 3, 3, 16, 16)  # (B, C, T, H, W)
    assert batch.original_size.tolist() == [[24, 40]] * 4 and batch.target_size.tolist() == [[16, 16]] * 4
    for i, m in enumerate(batch.metadata):
        start = m["clip_start_frame"]
        assert 0 <= start <= 20 + i - 9
        grey = ((batch.pixels[i] + 1) * 127.5).median(dim=-1).values.median(dim=-1).values  # (C, T)
        got = [int(round((float(v) - 20) / 4)) for v in grey[0]]
        assert got == [start, start + 4, start + 8]
        assert m["clip_frame_times"] == pytest.approx([(start + 4 * k) / 10 for k in range(3)], abs=1e-3)


def test_video_config_validation():
    with pytest.raises(ValueError, match="video.num_frames"):
        VideoConfig(num_frames=0)
    with pytest.raises(ValueError, match="video.fps"):
        VideoConfig(fps=0)
    with pytest.raises(ValueError, match="video.clip_start"):
        VideoConfig(clip_start="middle")
    with pytest.raises(ValueError, match="video.short_clips"):
        VideoConfig(short_clips="loop")
    assert DataConfig(video={"num_frames": 8, "fps": 4}).video == VideoConfig(num_frames=8, fps=4.0)
