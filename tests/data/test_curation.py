"""Video curation (data_pipeline.curation): cut detection and motion scores on synthetic clips made with PyAV."""

from __future__ import annotations

import io
import json
import tarfile

import av
import cv2
import numpy as np
import pytest

from data_pipeline.curation import (
    ANALYSIS_SIDE,
    analyse_video,
    analysis_size,
    content_value,
    flow_magnitude,
)
from data_pipeline.sources import Sample, probe_video
from data_pipeline.writer import WriterOptions, write_shards

FPS = 10


def _texture(seed: int = 0, h: int = 160, w: int = 480) -> np.ndarray:
    """A smooth random (h, w) uint8 texture with structure at several scales (what optical flow can follow)."""
    noise = np.random.default_rng(seed).standard_normal((h, w))
    tex = sum(cv2.GaussianBlur(noise, (0, 0), s) * s for s in (2, 4, 8))
    return cv2.normalize(tex, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def _scene(speed: float, n: int, tint: tuple[float, float, float], seed: int = 0, h: int = 128,
           w: int = 160) -> list[np.ndarray]:
    """n (h, w, 3) frames of a tinted texture panning left by ``speed`` pixels per frame (the camera moves right)."""
    tex = _texture(seed)
    frames = []
    for k in range(n):
        x = int(round(k * speed))
        grey = tex[:h, x:x + w].astype(np.float64)
        frames.append(np.stack([grey * c for c in tint], -1).clip(0, 255).astype(np.uint8))
    return frames


def _mp4(frames: list[np.ndarray], fps: int = FPS) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        s.options = {"crf": "16"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


WARM = (1.0, 0.45, 0.2)  # an orange-ish scene
COLD = (0.2, 0.55, 1.0)  # a blue-ish scene


def test_a_known_cut_is_found_at_its_frame():
    video = _mp4(_scene(1, 23, WARM) + _scene(0.5, 17, COLD, seed=1))  # the cut: frame 23 starts scene 2
    a = analyse_video(video, FPS, split_scenes=True)
    assert a.num_frames == 40 and a.duration == pytest.approx(4.0)
    assert len(a.scenes) == 2 and not a.dropped
    first, second = a.scenes
    assert abs(second.start_frame - 23) <= 1 and first.end_frame == second.start_frame
    assert (first.start_frame, second.end_frame) == (0, 40)
    assert first.start == 0.0 and second.start == pytest.approx(second.start_frame / FPS)
    assert second.end == pytest.approx(4.0) and first.end == second.start
    values = a.content_values
    assert values.shape == (40,) and values[second.start_frame] >= 27.0
    assert np.delete(values, second.start_frame).max() < 10.0  # within a scene, panning changes little


def test_without_split_the_video_is_one_scene_and_cuts_respect_min_scene_seconds():
    frames = _scene(1, 15, WARM) + _scene(0, 5, COLD, seed=1) + _scene(1, 20, WARM, seed=2)  # cuts at 15 and 20
    video = _mp4(frames)
    whole = analyse_video(video, FPS)
    assert [(s.start_frame, s.end_frame) for s in whole.scenes] == [(0, 40)]
    both = analyse_video(video, FPS, split_scenes=True, min_scene_seconds=0.4)
    assert [s.start_frame for s in both.scenes] == [0, 15, 20]
    # a cut 0.5 s after the previous one is ignored when scenes must last 1 s: one cut, two scenes
    gated = analyse_video(video, FPS, split_scenes=True, min_scene_seconds=1.0)
    assert [(s.start_frame, s.end_frame) for s in gated.scenes] == [(0, 15), (15, 40)]


def test_a_short_remnant_after_the_last_cut_is_dropped():
    video = _mp4(_scene(1, 20, WARM) + _scene(1, 6, COLD, seed=1))
    a = analyse_video(video, FPS, split_scenes=True, min_scene_seconds=1.0)
    assert [(s.start_frame, s.end_frame) for s in a.scenes] == [(0, 20)]
    assert [(d.start_frame, d.end_frame) for d in a.dropped] == [(20, 26)]
    short = analyse_video(_mp4(_scene(1, 6, WARM)), FPS, split_scenes=True, min_scene_seconds=1.0)
    assert len(short.scenes) == 1 and not short.dropped  # a video without a cut is kept whatever its length


def test_static_clip_scores_near_zero_and_moving_ones_in_proportion_to_speed():
    scores = {}
    for speed in (0, 0.5, 1, 2):
        a = analyse_video(_mp4(_scene(speed, 21, WARM)), FPS, motion=True)
        scores[speed] = a.scenes[0].motion_score
    assert scores[0] < 0.05
    assert scores[0.5] > 20 * max(scores[0], 0.05)
    # at 10 fps, samples 0.5 s apart: speed x 5 frames of displacement, on frames already 128 px tall
    for speed in (0.5, 1, 2):
        assert scores[speed] == pytest.approx(speed * FPS * 0.5, rel=0.2), scores
    assert scores[1] / scores[0.5] == pytest.approx(2.0, rel=0.1)
    assert scores[2] / scores[1] == pytest.approx(2.0, rel=0.1)


def test_motion_is_per_half_second_whatever_the_frame_rate_and_resolution():
    slow_fps = analyse_video(_mp4(_scene(2, 11, WARM), fps=5), 5).scenes[0].motion_score  # 2 px/frame at 5 fps
    fast_fps = analyse_video(_mp4(_scene(0.5, 41, WARM), fps=20), 20).scenes[0].motion_score  # same px per second
    assert slow_fps == pytest.approx(fast_fps, rel=0.15)
    # the same pan at half the resolution: the analysis frames are scaled to 128 px, so the score is the same
    small = [cv2.resize(f, (80, 64), interpolation=cv2.INTER_AREA) for f in _scene(2, 21, WARM)]
    big = analyse_video(_mp4(_scene(1, 21, WARM)), FPS).scenes[0].motion_score
    assert analyse_video(_mp4(small), FPS).scenes[0].motion_score == pytest.approx(2 * big, rel=0.2)


def test_a_scene_shorter_than_a_sampling_interval_scores_first_against_last():
    a = analyse_video(_mp4(_scene(1, 4, WARM)), FPS)  # 0.4 s: no second sample at 2 fps
    assert a.scenes[0].motion_score == pytest.approx(5.0, rel=0.25)  # 3 px in 0.3 s, as pixels per 0.5 s
    one = analyse_video(_mp4(_scene(1, 1, WARM)), FPS)
    assert one.scenes[0].motion_score == 0.0


def test_building_blocks():
    assert analysis_size(1920, 1080) == (228, ANALYSIS_SIDE) and analysis_size(32, 32) == (128, 128)
    hsv = cv2.cvtColor(_scene(0, 1, WARM)[0], cv2.COLOR_RGB2HSV)
    assert content_value(hsv, hsv) == 0.0
    other = hsv.copy()
    other[..., 2] = np.clip(other[..., 2].astype(int) + 30, 0, 255)
    assert 0 < content_value(hsv, other) <= 10.0  # only V changed, by at most 30: a third of it at most
    tex = _texture()
    assert flow_magnitude(tex[:128, :160], tex[:128, :160]) < 0.01
    assert flow_magnitude(tex[:128, :160], tex[:128, 3:163]) == pytest.approx(3.0, rel=0.1)


def test_writer_splits_at_cuts_and_writes_motion_scores(tmp_path):
    video = _mp4(_scene(1, 20, WARM) + _scene(0, 20, COLD, seed=1) + _scene(1, 4, WARM, seed=2))
    samples = [Sample(video, "a long video", {"id": 7}, "long.mp4", video=probe_video(video)),
               Sample(_mp4(_scene(0, 12, COLD)), "static", {}, "still.mp4")]
    samples[1].video = probe_video(samples[1].image)  # type: ignore[arg-type]
    summary = write_shards(samples, tmp_path, "v", WriterOptions(split_scenes=True))
    assert summary.samples == 3 and summary.index.skipped == {"short_scene": 1}
    assert summary.skips.examples["short_scene"] == ["long.mp4 4.00-4.40s"]
    with tarfile.open(tmp_path / "v-000000.tar") as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    metas = [json.loads(got[f"00000000{i}.json"]) for i in range(3)]
    assert [m["source"] for m in metas] == ["long.mp4", "long.mp4", "still.mp4"]
    assert [(m.get("clip_start"), m.get("clip_end")) for m in metas] == [(0.0, 2.0), (2.0, 4.0), (None, None)]
    assert [m["num_frames"] for m in metas] == [20, 20, 12] and metas[0]["id"] == 7
    assert metas[0]["motion_score"] > 3.0 and metas[1]["motion_score"] < 0.1 and metas[2]["motion_score"] < 0.1
    assert got["000000002.mp4"] == samples[1].image  # one scene, no limit: kept byte for byte
    clip = probe_video(got["000000001.mp4"])
    assert (clip.num_frames, clip.width, clip.height, clip.codec) == (20, 160, 128, "h264")
    with av.open(io.BytesIO(got["000000001.mp4"])) as c:
        first = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert first[..., 2].mean() > first[..., 0].mean()  # the second (blue) scene, not the first (orange)


def test_motion_score_option_without_split_keeps_the_file(tmp_path):
    video = _mp4(_scene(1, 20, WARM) + _scene(1, 20, COLD, seed=1))
    sample = Sample(video, "two scenes, not split", {}, "x.mp4", video=probe_video(video))
    summary = write_shards([sample], tmp_path, "m", WriterOptions(motion_score=True))
    with tarfile.open(tmp_path / "m-000000.tar") as tar:
        meta = json.loads(tar.extractfile("000000000.json").read())
        assert tar.extractfile("000000000.mp4").read() == video
    assert summary.samples == 1 and meta["motion_score"] > 3.0 and "clip_start" not in meta
