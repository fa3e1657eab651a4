"""Video shards: folder/table sources with videos, the video json, re-encoding, bad videos, and moving-digits."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest

from data_pipeline import moving_digits as md
from data_pipeline.demo import _digits, load_digits_split
from data_pipeline.index import read_index
from data_pipeline.sources import (
    VIDEO_FIELDS,
    BadVideoError,
    FolderSource,
    Sample,
    SkipLog,
    TableSource,
    VideoFrames,
    probe_video,
)
from data_pipeline.writer import ShardsConfig, WriterOptions, encode_video, write_shards
from launch.commands.shards import plan, run


def _frames(n: int, h: int = 32, w: int = 48, seed: int = 0) -> np.ndarray:
    """(n, h, w, 3) uint8: a smooth gradient with a white 4x4 marker in the top-left corner, drifting right."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((n, h, w, 3), np.uint8)
    for k in range(n):
        out[k, ..., 0] = (xx * 4 + k * 8) % 256
        out[k, ..., 1] = yy * 4 % 256
        out[k, ..., 2] = 60 + seed
        out[k, :4, :4] = 255
    return out


def _video(frames: np.ndarray, fps: int = 8, fmt: str = "mp4", codec: str = "libx264", pix: str = "yuv420p",
           rotation: int = 0) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix
        if rotation:
            s.set_display_rotation(rotation)
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def _audio_only() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for i in range(4):
            frame.pts = i * 1024
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def _decode(data: bytes) -> tuple[np.ndarray, float]:
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(stream)])
        return frames, float(stream.average_rate)


def _read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 10 * np.log10(255.0**2 / max(mse, 1e-10))


@pytest.fixture
def video_folder(tmp_path):
    root = tmp_path / "clips"
    (root / "sub").mkdir(parents=True)
    files = {
        "a.mp4": _video(_frames(9), rotation=90),
        "b.gif": _video(_frames(6, seed=1), fmt="gif", codec="gif", pix="rgb8"),
        "c.webm": _video(_frames(5, seed=2), fmt="webm", codec="libvpx-vp9"),
        "sub/d.mkv": _video(_frames(7, seed=3), fmt="matroska"),
        "e.avi": _video(_frames(4, seed=4), fmt="avi", codec="mpeg4"),
        "f.mov": _video(_frames(3, seed=5), fmt="mov"),
        "broken.mp4": _video(_frames(9))[:300],
        "junk.webm": b"not a video at all",
        "sound.mp4": _audio_only(),
        "nocap.mp4": _video(_frames(2)),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
        if name != "nocap.mp4":
            (root / name).with_suffix(".txt").write_text(f"clip {name}")
    (root / "a.json").write_text(json.dumps({"fps": 1000, "url": "http://x/a.mp4"}))
    return root, files


# ------------------------------------------------------------------------------------------------ probe + sources


def test_probe_reads_the_video_fields():
    info = probe_video(_video(_frames(9), fps=8, rotation=90))
    assert info.fields() == {"width": 48, "height": 32, "fps": 8.0, "num_frames": 9, "duration": 1.125,
                             "rotation": 90, "codec": "h264"}
    assert list(info.fields()) == list(VIDEO_FIELDS)
    assert probe_video(_video(_frames(4), rotation=-90)).rotation == 270
    gif = probe_video(_video(_frames(6), fmt="gif", codec="gif", pix="rgb8"))
    assert (gif.codec, gif.num_frames, gif.width, gif.height) == ("gif", 6, 48, 32)
    assert probe_video(_video(_frames(5), fmt="webm", codec="libvpx-vp9")).num_frames == 5  # no count in the header


@pytest.mark.parametrize("data, reason", [
    (b"", "corrupt_video"),
    (b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64, "corrupt_video"),
    (None, "audio_only"),
])
def test_probe_refuses_bad_videos(data, reason):
    with pytest.raises(BadVideoError) as e:
        probe_video(_audio_only() if data is None else data)
    assert e.value.reason == reason


def test_truncated_video_is_corrupt():
    full = _video(_frames(9))
    for cut in (len(full) // 3, len(full) - 100):
        with pytest.raises(BadVideoError) as e:
            probe_video(full[:cut])
        assert e.value.reason in ("corrupt_video", "no_frames")


def test_folder_source_reads_videos_and_counts_bad_ones(video_folder):
    root, files = video_folder
    src = FolderSource(root)
    samples = list(src)
    assert [s.source_id for s in samples] == ["a.mp4", "b.gif", "c.webm", "e.avi", "f.mov", "sub/d.mkv"]
    assert all(s.is_video and s.video is not None for s in samples)
    assert [s.video_ext for s in samples] == ["mp4", "gif", "webm", "avi", "mov", "mkv"]
    assert [s.video.num_frames for s in samples] == [9, 6, 5, 4, 3, 7]
    assert samples[0].image == files["a.mp4"] and samples[0].extra["url"] == "http://x/a.mp4"
    assert src.skips.counts == {"corrupt_video": 2, "audio_only": 1, "missing_caption": 1}
    assert sorted(src.skips.examples["corrupt_video"]) == ["broken.mp4", "junk.webm"]
    assert src.size_hint() == len(files)


def test_table_source_mixes_images_and_videos(tmp_path):
    from PIL import Image

    (tmp_path / "v.mp4").write_bytes(_video(_frames(4)))
    Image.fromarray(_frames(1)[0]).save(tmp_path / "p.png")
    rows = [{"path": "v.mp4", "text": "a video", "score": 2}, {"path": "p.png", "text": "an image"},
            {"path": "gone.mp4", "text": "missing"}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    src = TableSource(tmp_path / "t.jsonl", "path", "text")
    summary = write_shards(src, tmp_path / "out", "mix")
    got = _read_tar(tmp_path / "out" / "mix-000000.tar")
    assert sorted(got["000000000"]) == ["json", "mp4", "txt"] and sorted(got["000000001"]) == ["json", "png", "txt"]
    meta = json.loads(got["000000000"]["json"])
    assert meta["num_frames"] == 4 and meta["score"] == 2 and meta["source"] == "v.mp4"
    assert "fps" not in json.loads(got["000000001"]["json"])
    assert summary.index.skipped == {"missing_image": 1}


# ------------------------------------------------------------------------------------------------ writer


def test_videos_are_kept_with_their_json(video_folder, tmp_path):
    root, files = video_folder
    summary = write_shards(FolderSource(root), tmp_path / "out", "v")
    assert summary.samples == 6
    assert read_index(tmp_path / "out" / "v.shardindex.json").skipped == {
        "corrupt_video": 2, "audio_only": 1, "missing_caption": 1}
    got = _read_tar(tmp_path / "out" / "v-000000.tar")
    exts = [next(e for e in got[k] if e not in ("json", "txt")) for k in sorted(got)]
    assert exts == ["mp4", "gif", "webm", "avi", "mov", "mkv"]
    for key, ext, name in zip(sorted(got), exts, ["a.mp4", "b.gif", "c.webm", "e.avi", "f.mov", "sub/d.mkv"]):
        assert got[key][ext] == files[name]  # byte for byte
        meta = json.loads(got[key]["json"])
        assert set(VIDEO_FIELDS) <= set(meta) and meta["source"] == name and meta["caption"] == f"clip {name}"
        assert isinstance(meta["fps"], float) and isinstance(meta["num_frames"], int)
        assert isinstance(meta["duration"], float) and isinstance(meta["rotation"], int)
    a = json.loads(got["000000000"]["json"])
    assert (a["width"], a["height"], a["rotation"], a["fps"], a["url"]) == (48, 32, 90, 8.0, "http://x/a.mp4")


def test_reencode_applies_max_size_max_fps_and_rotation(tmp_path):
    frames = _frames(16, h=48, w=64)
    data = _video(frames, fps=8, rotation=90)
    opts = WriterOptions(max_size=32, video_max_fps=4)
    [clip], dropped = encode_video(data, opts, probe_video(data), "mp4")
    assert not dropped and clip.ext == "mp4"
    decoded, fps = _decode(clip.data)
    # turned 90 degrees counter-clockwise: 64x48 stored -> 48 wide, 64 tall -> longer side 32: 24x32
    assert decoded.shape == (8, 32, 24, 3) and fps == 4.0
    assert clip.info.fields() == {"width": 24, "height": 32, "fps": 4.0, "num_frames": 8, "duration": 2.0,
                                  "rotation": 0, "codec": "h264"}
    grey = decoded[0].mean(-1)  # the 2x2 (after halving) top-left marker of the stored frame ends bottom-left
    assert grey[-2:, :2].min() > 220 and max(grey[:2, :2].max(), grey[-2:, -2:].max(), grey[:2, -2:].max()) < 200

    def area_half(f: np.ndarray) -> np.ndarray:  # (64, 48, 3) -> (32, 24, 3) means of 2x2 blocks
        return f.reshape(32, 2, 24, 2, 3).mean((1, 3))

    # every other frame is kept: output frame 2 is source frame 4, turned and halved (not frame 3 or 5)
    errors = [np.abs(decoded[2] - area_half(np.rot90(frames[i], k=1))).mean() for i in (3, 4, 5)]
    assert errors[1] < 5.0 and errors[1] < 0.6 * min(errors[0], errors[2]), errors


def test_reencode_flag_and_untouched_videos(tmp_path):
    data = _video(_frames(9))
    [kept], _ = encode_video(data, WriterOptions(max_size=48, video_max_fps=8))  # within both limits
    assert kept.data == data
    [again], _ = encode_video(data, WriterOptions(video_reencode=True, video_crf=0))
    assert again.data != data and again.info.num_frames == 9 and again.info.codec == "h264"
    assert _psnr(_decode(again.data)[0], _decode(data)[0]) > 40


def test_raw_frames_and_deterministic_bytes(tmp_path):
    frames = _frames(7, h=30, w=45)  # odd sizes become even for 4:2:0
    samples = [Sample(VideoFrames(frames, 6.0), "raw", {"n": 1}, "raw/0")]
    a = write_shards(samples, tmp_path / "a", "r", WriterOptions(video_crf=10))
    b = write_shards(samples, tmp_path / "b", "r", WriterOptions(video_crf=10))
    assert a.samples == b.samples == 1
    assert (tmp_path / "a" / "r-000000.tar").read_bytes() == (tmp_path / "b" / "r-000000.tar").read_bytes()
    meta = json.loads(_read_tar(tmp_path / "a" / "r-000000.tar")["000000000"]["json"])
    assert (meta["width"], meta["height"], meta["num_frames"], meta["fps"], meta["n"]) == (44, 30, 7, 6.0, 1)
    with pytest.raises(ValueError, match="video frames"):
        VideoFrames(frames[..., :1], 8.0)
    with pytest.raises(ValueError, match="video fps"):
        VideoFrames(frames, 0)


def test_writer_counts_bad_video_bytes(tmp_path):
    good = _video(_frames(3))
    samples = [Sample(b"garbage", "bad", {}, "bad.mp4", video=probe_video(good)),
               Sample(good, "good", {}, "good.mp4", video=probe_video(good))]
    summary = write_shards(samples, tmp_path, "w", WriterOptions(video_reencode=True))
    assert summary.samples == 1 and summary.index.skipped == {"corrupt_video": 1}


@pytest.mark.parametrize("kwargs, field", [
    ({"video_max_fps": 0}, "video_max_fps"), ({"video_max_fps": True}, "video_max_fps"),
    ({"video_crf": 52}, "video_crf"), ({"video_crf": 1.5}, "video_crf"), ({"split_scenes": "yes"}, "split_scenes"),
    ({"min_scene_seconds": -1}, "min_scene_seconds"), ({"scene_threshold": 0}, "scene_threshold"),
])
def test_video_options_are_checked(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: got"):
        WriterOptions(**kwargs)


def test_command_plan_and_run_with_videos(video_folder, tmp_path, capsys):
    root, _ = video_folder
    cfg = ShardsConfig(source="folder", input=str(root), output_dir=str(tmp_path / "o"), max_size=32,
                       motion_score=True, progress=False)
    text = plan(cfg)
    assert "0 image files and 10 video files" in text
    assert "video format: keep the file as-is; re-encode to H.264 mp4 (crf 18) only above longer side 32px" in text
    assert "motion_score" in text
    assert run(cfg) == 0
    out = capsys.readouterr().out
    assert "shard: 1 shard(s), 6 samples" in out and "corrupt_video 2" in out and "audio_only 1" in out
    metas = [json.loads(m["json"]) for m in _read_tar(tmp_path / "o" / "shard-000000.tar").values()]
    assert all(max(m["width"], m["height"]) <= 32 and "motion_score" in m for m in metas)
    md_plan = plan(ShardsConfig(source="moving-digits", output_dir=str(tmp_path / "md")))
    assert "1617 train / 180 val" in md_plan and f"libx264 crf {md.CRF}" in md_plan and "image format" not in md_plan
    for bad in ({"max_size": 16}, {"video_max_fps": 4}, {"split_scenes": True}, {"input": str(root)}):
        with pytest.raises(ValueError):
            ShardsConfig(source="moving-digits", **bad)


# ------------------------------------------------------------------------------------------------ moving digits


def test_clip_frames_move_the_digit():
    img = np.zeros((32, 32, 3), np.uint8)
    img[10:20, 12:18] = 255
    for direction, axis, sign in (("left", 1, -1), ("right", 1, 1), ("up", 0, -1), ("down", 0, 1)):
        frames = md.clip_frames(img, direction)
        assert frames.shape == (md.NUM_FRAMES, 32, 32, 3) and frames.dtype == np.uint8
        np.testing.assert_array_equal(frames[md.NUM_FRAMES // 2], img)
        centre = [np.argwhere(f[..., 0] > 0).mean(0)[axis] for f in frames]
        assert np.allclose(np.diff(centre), sign * md.SPEED), (direction, centre)
        np.testing.assert_array_equal(md.recentre(frames, direction)[0], img)  # nothing of this box was cut off
    assert md.caption_for(3, "left") == "a handwritten digit three moving left"
    with pytest.raises(ValueError, match="direction"):
        md.caption_for(3, "sideways")
    counts = np.bincount(md.directions(1797, seed=0), minlength=4)
    assert counts.max() - counts.min() <= 1 and not np.array_equal(md.directions(40, 0), md.directions(40, 1))


@pytest.fixture(scope="module")
def moving_set(tmp_path_factory):
    _digits.cache_clear()

    out = tmp_path_factory.mktemp("moving_digits")
    return out, md.build_moving_digits(out, seed=0)


def test_moving_digits_build(moving_set):
    # its time is part of `make quickstart-video`'s, measured in benchmarks/RESULTS.md (no timed test here)
    out, summaries = moving_set
    assert summaries["train"].samples == 1617 and summaries["val"].samples == 180
    assert sorted(p.name for p in out.iterdir()) == [
        "train-000000.tar", "train-000001.tar", "train.shardindex.json", "val-000000.tar", "val.shardindex.json"]
    val = _read_tar(out / "val-000000.tar")
    _, _, _, val_y = load_digits_split(0, 0.1)
    metas = [json.loads(val[k]["json"]) for k in sorted(val)]
    assert [m["label"] for m in metas] == val_y.tolist()  # the demo set's split, in the same order
    for k, m in zip(sorted(val), metas):
        assert sorted(val[k]) == ["json", "mp4", "txt"]
        assert val[k]["txt"].decode() == m["caption"] == md.caption_for(m["label"], m["direction"])
        assert (m["width"], m["height"], m["num_frames"], m["fps"], m["codec"], m["rotation"]) == (
            32, 32, 9, 8.0, "h264", 0)
        assert m["split"] == "val" and m["source"] == f"sklearn-digits/{m['index']}/{m['direction']}"
    assert {m["direction"] for m in metas} == set(md.DIRECTIONS)


def test_moving_digits_decode_close_to_the_encoded_frames_and_stay_readable(moving_set):
    from training.evaluation import DigitClassifier

    out, _ = moving_set
    images, _ = _digits()
    val = _read_tar(out / "val-000000.tar")
    psnrs, recentred, labels = [], [], []
    for k in sorted(val):
        meta = json.loads(val[k]["json"])
        decoded, fps = _decode(val[k]["mp4"])
        encoded = md.clip_frames(images[meta["index"]], meta["direction"])
        assert decoded.shape == encoded.shape and fps == md.FPS
        psnrs.append(_psnr(decoded, encoded))
        recentred.append(md.recentre(decoded, meta["direction"]))
        labels += [meta["label"]] * len(decoded)
    assert min(psnrs) > 44.0, f"PSNR min {min(psnrs):.1f} dB, mean {np.mean(psnrs):.1f} dB"
    clf, _ = DigitClassifier.for_demo(0, 0.1)
    accuracy = clf.accuracy(np.concatenate(recentred), np.array(labels))
    assert accuracy >= 0.90, f"digit classifier reads {accuracy:.1%} of decoded, re-centred frames"


def test_moving_digits_are_reproducible(moving_set, tmp_path):
    """The same seed writes the same shard bytes: samples, json, keys and every mp4 (tiny frames encode without
    x264's SIMD, which read uninitialised bytes past the rows and made ~1 clip in 100 differ between runs)."""
    out, _ = moving_set
    samples = md.clip_samples("val", seed=0)
    for attempt in range(2):  # twice in one process: the differing clips showed up in long-running processes
        options = WriterOptions(overwrite=True, video_crf=md.CRF)
        write_shards(samples, tmp_path / str(attempt), "val", options, skips=SkipLog())
        assert (tmp_path / str(attempt) / "val-000000.tar").read_bytes() == (out / "val-000000.tar").read_bytes()


def test_moving_digits_refuses_existing_files(moving_set, tmp_path):
    (tmp_path / "train-000000.tar").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite"):
        md.build_moving_digits(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["train-000000.tar"]
