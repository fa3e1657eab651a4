"""Video curation while writing shards: cut detection (split a long video into scenes) and motion scores.

Both follow the "video pretraining" data stage of Stable Video Diffusion (Blattmann et al., 2023, Sec. 3 and
App. C): long videos are cut into clips at scene changes, so a clip never spans a cut, and each clip gets a motion
score, the mean optical-flow magnitude at 2 fps, so that a loader can drop static clips (``DataConfig
.min_motion_score``; the writer only records the score).

One decoding pass per video gives both. Every frame is scaled so its shorter side is :data:`ANALYSIS_SIDE` pixels
(up or down, so scores of different resolutions compare) and converted to HSV and grey with OpenCV.

**Cuts** — the content detector of PySceneDetect (``ContentDetector``): the score of frame *i* is the mean absolute
difference of its HSV pixels from frame *i−1*, averaged over the three channels with equal weights (PySceneDetect's
default weights 1, 1, 1 and no edge channel; hue is compared as a plain 0..179 value, as there). Frame *i* starts a
new scene when its score is at least ``threshold`` (PySceneDetect's default 27) and the current scene is already
``min_scene_seconds`` long. With ``split_scenes`` the scenes shorter than ``min_scene_seconds`` (the remnant after
the last cut) are dropped; a video without a cut is one scene whatever its length.

Why not the PySceneDetect package itself: its content detector is these few lines of OpenCV (HSV conversion, a mean
absolute difference, a threshold and a minimum scene length), OpenCV is a dependency anyway for the optical flow,
and PySceneDetect would add a second video-reading stack (it opens files by path through OpenCV or PyAV, while the
writer holds the bytes in memory) and one more dependency (plus its click/platformdirs/tqdm pins) for the same
algorithm. The threshold keeps PySceneDetect's scale, so its documented tuning advice applies.

**Motion** — OpenCV's Farnebäck dense optical flow (G. Farnebäck, "Two-frame motion estimation based on polynomial
expansion", SCIA 2003; ``calcOpticalFlowFarneback`` with OpenCV's documented parameters: pyramid scale 0.5, 3
levels, window 15, 3 iterations, poly_n 5, poly_sigma 1.2) between frames sampled at :data:`MOTION_FPS` (2) frames
per second within each scene, on the grey analysis frames. A pair's value is its mean flow magnitude, in analysis
pixels, rescaled to a 0.5 s gap (``× 0.5 s / actual gap``, so that 25 fps or variable-rate videos, where samples are
not exactly 0.5 s apart, score the same motion alike); the clip's ``motion_score`` is the mean over its pairs: pixels
(at 128 px on the shorter side) moved per sampled frame at 2 fps. A scene shorter than one sampling interval scores
its first against its last frame. A static clip scores about 0; an object or camera moving at *v* pixels per second
scores in proportion to *v* (and to the moving area's share of the frame). SVD uses RAFT for the flow; Farnebäck
runs on a CPU in about a millisecond per pair at this size, which is what a shard writer can afford.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import cv2
import numpy as np

from data_pipeline.sources import iter_video_frames

ANALYSIS_SIDE = 128  # shorter side of the frames the cut detector and the flow see, pixels
MOTION_FPS = 2.0  # frames per second sampled for the motion score (SVD)
DEFAULT_THRESHOLD = 27.0  # PySceneDetect ContentDetector's default threshold
DEFAULT_MIN_SCENE_SECONDS = 1.0  # shortest scene: no cut closer than this to the previous one
_FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)


@dataclass
class Scene:
    """One scene of a video: frames ``[start_frame, end_frame)`` and their time span."""

    start_frame: int  # index of the scene's first decoded frame
    end_frame: int  # one past its last frame
    start: float  # seconds from the video's first frame to the scene's first frame
    end: float  # seconds to the end of its last frame
    motion_score: float = 0.0  # mean Farnebäck flow magnitude (module docstring); 0.0 when motion is off

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class VideoAnalysis:
    """What one pass over a video found."""

    num_frames: int  # frames decoded
    duration: float  # seconds, first frame's start to last frame's end
    scenes: list[Scene]  # the kept scenes in order (one, the whole video, unless split)
    dropped: list[Scene] = field(default_factory=list)  # scenes shorter than min_scene_seconds, not kept
    content_values: Optional[np.ndarray] = None  # (num_frames,) the cut detector's score per frame (0 for frame 0)


def analysis_size(width: int, height: int, side: int = ANALYSIS_SIDE) -> tuple[int, int]:
    """(width, height) scaled so the shorter side is ``side`` pixels (aspect kept, at least 1 pixel)."""
    scale = side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def content_value(prev_hsv: np.ndarray, hsv: np.ndarray) -> float:
    """PySceneDetect's content score of two (H, W, 3) uint8 HSV frames: mean |difference| over H, S, V."""
    diff = np.abs(hsv.astype(np.int16) - prev_hsv.astype(np.int16))  # (H, W, 3)
    return float(diff.reshape(-1, 3).mean(0).mean())


def flow_magnitude(prev_grey: np.ndarray, grey: np.ndarray) -> float:
    """Mean Farnebäck flow magnitude, in pixels, from one (H, W) uint8 grey frame to the next."""
    flow = cv2.calcOpticalFlowFarneback(prev_grey, grey, None, **_FARNEBACK)  # (H, W, 2) dx, dy
    return float(np.hypot(flow[..., 0], flow[..., 1]).mean())


class _SceneMotion:
    """The motion score of one scene, fed frame by frame: samples at MOTION_FPS, flow between consecutive samples."""

    def __init__(self, t: float, grey: np.ndarray, motion_fps: float):
        self.interval = 1.0 / motion_fps
        self.start = t
        self.first = (t, grey)
        self.last = (t, grey)
        self.sample = (t, grey)
        self.slot = 0  # index of the sampling slot of the last sample: floor((t - start) / interval)
        self.pairs: list[float] = []

    def add(self, t: float, grey: np.ndarray) -> None:
        self.last = (t, grey)
        slot = int(np.floor((t - self.start) / self.interval + 1e-6))
        if slot > self.slot:  # the first frame at or after the next 0.5 s mark
            (t0, g0) = self.sample
            self.pairs.append(flow_magnitude(g0, grey) * self.interval / max(t - t0, 1e-6))
            self.sample, self.slot = (t, grey), slot

    def score(self) -> float:
        if self.pairs:
            return float(np.mean(self.pairs))
        (t0, g0), (t1, g1) = self.first, self.last
        if t1 <= t0:
            return 0.0
        return flow_magnitude(g0, g1) * self.interval / (t1 - t0)


def analyse_video(
    data: bytes,
    fps: float,
    *,
    split_scenes: bool = False,
    threshold: float = DEFAULT_THRESHOLD,
    min_scene_seconds: float = DEFAULT_MIN_SCENE_SECONDS,
    motion: bool = True,
    motion_fps: float = MOTION_FPS,
) -> VideoAnalysis:
    """Scenes (cut at content changes when ``split_scenes``) and their motion scores (when ``motion``) of a video's
    bytes; ``fps`` is its probed frame rate (for frames without timestamps and the last frame's length).

    Raises PyAV's exceptions for a video that does not decode, ``ValueError`` for one without frames.
    """
    starts: list[tuple[int, float]] = []  # (frame index, time) of each scene's first frame
    motions: list[_SceneMotion] = []
    values: list[float] = []
    prev_hsv: Optional[np.ndarray] = None
    last_t, n = 0.0, 0
    for i, (t, frame) in enumerate(iter_video_frames(data, fps)):
        w, h = analysis_size(frame.width, frame.height)
        rgb = frame.to_ndarray(width=w, height=h, format="rgb24")  # (h, w, 3) uint8
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if motion else None
        value = 0.0
        if split_scenes:
            hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
            if prev_hsv is not None:
                value = content_value(prev_hsv, hsv)
            prev_hsv = hsv
        new_scene = not starts or (split_scenes and value >= threshold and t - starts[-1][1] >= min_scene_seconds)
        if new_scene:
            starts.append((i, t))
            if motion:
                motions.append(_SceneMotion(t, grey, motion_fps))  # type: ignore[arg-type]
        elif motion:
            motions[-1].add(t, grey)  # type: ignore[arg-type]
        values.append(value)
        last_t, n = t, i + 1
    if n == 0:
        raise ValueError("no decodable frame")
    duration = last_t + 1.0 / fps
    scenes = []
    for k, (start_frame, start_t) in enumerate(starts):
        end_frame, end_t = starts[k + 1] if k + 1 < len(starts) else (n, duration)
        scenes.append(Scene(start_frame, end_frame, start_t, end_t, motions[k].score() if motion else 0.0))
    kept, dropped = scenes, []
    if len(scenes) > 1:
        kept = [s for s in scenes if s.seconds >= min_scene_seconds - 1e-9]
        dropped = [s for s in scenes if s.seconds < min_scene_seconds - 1e-9]
    return VideoAnalysis(n, duration, kept, dropped, np.asarray(values, dtype=np.float64))
