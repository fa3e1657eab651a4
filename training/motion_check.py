"""Does a video model move what it is asked to move? The learning check of the moving-digits quickstart.

Generated clips of "a handwritten digit three moving left" are read with three measurements, each a number in the
report rather than an impression:

* **direction**: the ink centroid of every frame (pixel brightness as mass; the digits are white on black) is fitted
  by least squares with a straight line over the frame index; the axis with the larger slope and its sign give
  left / right / up / down. Chance is 25% (the unconditional model).
* **digit**: each frame is shifted back along the fitted trajectory (so the digit sits where the clip's middle frame
  has it, as the still image of the demo set does) and read by the demo digit classifier
  (:class:`training.evaluation.DigitClassifier`); the clip's digit is the majority vote of its frames.
* **temporal consistency**: the share of clips whose every frame reads as the same digit (a clip that morphs a
  three into an eight fails, whatever was asked).

Image-to-video is read the same way: from a given first frame (a still digit of the demo validation split) the clip
must keep that digit (majority vote) and move as prompted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from data_pipeline.moving_digits import DIRECTIONS, STEPS


def ink_centroids(clips: Tensor) -> np.ndarray:
    """``(B, C, T, H, W)`` clips in [-1, 1] → ``(B, T, 2)`` ink centroid ``(x, y)`` of each frame, in pixels.

    The mass of a pixel is its gray level in [0, 1]; an empty (black) frame has its centroid at the centre."""
    gray = ((clips.detach().float().cpu().clamp(-1, 1).mean(1) + 1) / 2)  # (B, T, H, W) in [0, 1]
    h, w = gray.shape[-2:]
    ys = torch.arange(h, dtype=torch.float32)[:, None]  # (H, 1)
    xs = torch.arange(w, dtype=torch.float32)[None, :]  # (1, W)
    mass = gray.sum((-2, -1))  # (B, T)
    safe = mass.clamp_min(1e-6)
    cx = torch.where(mass > 1e-6, (gray * xs).sum((-2, -1)) / safe, torch.full_like(mass, (w - 1) / 2))
    cy = torch.where(mass > 1e-6, (gray * ys).sum((-2, -1)) / safe, torch.full_like(mass, (h - 1) / 2))
    return torch.stack([cx, cy], dim=-1).numpy()  # (B, T, 2)


def fitted_velocity(centroids: np.ndarray) -> np.ndarray:
    """``(B, T, 2)`` centroids → ``(B, 2)`` least-squares slope (pixels per frame) of ``x`` and ``y`` over the
    frame index. One frame: zero."""
    t = centroids.shape[1]
    k = np.arange(t, dtype=np.float64) - (t - 1) / 2  # (T,) centred frame index
    denom = float((k ** 2).sum())
    if denom == 0:
        return np.zeros((centroids.shape[0], 2))
    return np.einsum("t,btc->bc", k, centroids - centroids.mean(1, keepdims=True)) / denom  # (B, 2)


def direction_of(velocity: np.ndarray) -> np.ndarray:
    """``(B, 2)`` velocities ``(dx, dy)`` → ``(B,)`` index into :data:`~data_pipeline.moving_digits.DIRECTIONS`:
    the axis that moves more, and its sign (image rows grow downwards)."""
    index = {d: i for i, d in enumerate(DIRECTIONS)}
    out = np.empty(len(velocity), dtype=np.int64)
    for i, (dx, dy) in enumerate(velocity):
        if abs(dx) >= abs(dy):
            out[i] = index["right" if dx > 0 else "left"]
        else:
            out[i] = index["down" if dy > 0 else "up"]
    return out


#: "moved diagonally" (down and to the right): both fitted components at least this many pixels per frame ...
DIAGONAL_MIN_SPEED = 0.25
#: ... and the slower axis at least this fraction of the faster one (a true diagonal: 1; straight motion: 0)
DIAGONAL_MIN_RATIO = 0.5


def is_diagonal(velocity: np.ndarray, min_speed: float = DIAGONAL_MIN_SPEED,
                min_ratio: float = DIAGONAL_MIN_RATIO) -> np.ndarray:
    """``(B, 2)`` fitted velocities ``(dx, dy)`` → ``(B,)`` bool: the clip moved *diagonally*, down and to the right
    (the ``"diagonally"`` motion of :mod:`data_pipeline.moving_digits`, one pixel per frame on each axis).

    The rule: ``dx`` and ``dy`` both positive and at least ``min_speed`` pixels per frame (a still or jittering
    clip fails), and neither axis under ``min_ratio`` times the other (``min(dx, dy) >= min_ratio · max(dx, dy)``:
    the trajectory within about 18° of the 45° line for the default 0.5, so motion mostly right or mostly down
    fails). :func:`direction_of` knows only the four straight directions; this is a separate yes/no reading. Read
    it from :func:`registered_velocity` (the ink centroid under-reads vertical motion of these digits)."""
    velocity = np.asarray(velocity, dtype=np.float64).reshape(-1, 2)
    dx, dy = velocity[:, 0], velocity[:, 1]
    fast, slow = np.maximum(dx, dy), np.minimum(dx, dy)
    return (slow >= min_speed) & (slow >= min_ratio * fast)


def registered_velocity(clips: Tensor, max_shift: int = 6) -> np.ndarray:
    """``(B, C, T, H, W)`` → ``(B, 2)`` least-squares slope (pixels per frame) of the frames' whole-pixel shifts from
    the middle frame (:func:`registration_offsets`). The velocity to read diagonal motion from: the demo digits fill
    the frame's height, so a digit moving down loses rows at the bottom edge and its ink centroid lags (about 0.3 to
    0.7 px per frame for a true 1), while the registered shift does not."""
    return fitted_velocity(registration_offsets(clips, max_shift).astype(np.float64))


def diagonal_accuracy(velocity: np.ndarray, **rule: float) -> float:
    """The share of clips (``(B, 2)`` fitted velocities) that moved diagonally by :func:`is_diagonal`'s rule."""
    return float(is_diagonal(velocity, **rule).mean()) if len(velocity) else 0.0


def shift_frames(frames: Tensor, dx: np.ndarray, dy: np.ndarray) -> Tensor:
    """``(N, C, H, W)`` frames in [-1, 1], each moved by integer ``(dx[i], dy[i])`` pixels (right, down); the
    uncovered edge black (-1), what leaves the frame cut off."""
    n, _, h, w = frames.shape
    out = torch.full_like(frames, -1.0)
    for i in range(n):
        x, y = int(dx[i]), int(dy[i])
        if abs(x) >= w or abs(y) >= h:
            continue
        out[i, :, max(y, 0):h + min(y, 0), max(x, 0):w + min(x, 0)] = \
            frames[i, :, max(-y, 0):h + min(-y, 0), max(-x, 0):w + min(-x, 0)]
    return out


def registration_offsets(clips: Tensor, max_shift: int = 6) -> np.ndarray:
    """``(B, C, T, H, W)`` → ``(B, T, 2)`` integer ``(dx, dy)`` of each frame relative to the clip's middle frame:
    the whole-pixel shift of the middle frame that best matches the frame (least sum of squared gray-level
    differences, shifts up to ``max_shift`` pixels). Unlike the centroid, it is not damped when part of the digit
    leaves the frame."""
    gray = (clips.detach().float().cpu().clamp(-1, 1).mean(1) + 1) / 2  # (B, T, H, W)
    b, t, h, w = gray.shape
    middle = gray[:, (t - 1) // 2]  # (B, H, W)
    shifts = [(dx, dy) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)]
    moved = torch.stack([shift_frames(middle[:, None] * 2 - 1, np.full(b, dx), np.full(b, dy))[:, 0]
                         for dx, dy in shifts], dim=1)  # (B, S, H, W): the middle frame under every shift
    moved = (moved + 1) / 2
    ssd = ((moved[:, None] - gray[:, :, None]) ** 2).sum((-2, -1))  # (B, T, S) squared differences
    best = ssd.argmin(-1).numpy()  # (B, T); ties: the first shift in the list
    table = np.array(shifts)  # (S, 2)
    return table[best]  # (B, T, 2)


def recentred_frames(clips: Tensor, offsets: np.ndarray) -> Tensor:
    """``(B, C, T, H, W)`` → ``(B·T, C, H, W)`` frames, each shifted back by its ``(B, T, 2)`` offset from the
    middle frame (:func:`registration_offsets`), so the digit sits where the middle frame has it."""
    b, c, t, h, w = clips.shape
    frames = clips.detach().float().cpu().permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # (B*T, C, H, W)
    return shift_frames(frames, -offsets[..., 0].reshape(-1), -offsets[..., 1].reshape(-1))


@dataclass
class MotionReading:
    """What the check reads from each clip."""

    direction: np.ndarray  # (B,) index into DIRECTIONS of the fitted motion
    velocity: np.ndarray  # (B, 2) fitted pixels per frame (dx, dy)
    frame_digits: np.ndarray  # (B, T) the classifier's digit for every re-centred frame
    digit: np.ndarray  # (B,) majority vote over the frames (ties: the smallest digit)
    consistent: np.ndarray  # (B,) bool: every frame reads as the same digit


def read_clips(clips: Tensor, classifier: object) -> MotionReading:
    """Measure direction, digit and consistency of ``(B, C, T, H, W)`` clips in [-1, 1] (module docstring)."""
    if clips.ndim != 5:
        raise ValueError(f"read_clips: expected clips (B, C, T, H, W); got shape {tuple(clips.shape)}")
    b, _, t = clips.shape[:3]
    velocity = fitted_velocity(ink_centroids(clips))
    frame_digits = np.asarray(classifier.predict(recentred_frames(clips, registration_offsets(clips)))).reshape(b, t)
    digit = np.array([np.bincount(row, minlength=10).argmax() for row in frame_digits])
    consistent = (frame_digits == frame_digits[:, :1]).all(1)
    return MotionReading(direction_of(velocity), velocity, frame_digits, digit, consistent)


def scores(reading: MotionReading, digits: Sequence[int], directions: Sequence[int]) -> dict[str, float]:
    """Direction accuracy, digit accuracy and temporal consistency of clips asked for ``digits`` moving
    ``directions`` (indices into DIRECTIONS)."""
    digits, directions = np.asarray(digits), np.asarray(directions)
    return {"direction_accuracy": float((reading.direction == directions).mean()),
            "digit_accuracy": float((reading.digit == digits).mean()),
            "temporal_consistency": float(reading.consistent.mean())}


def expected_velocity(direction: str, pixels_per_frame: float = 1.0) -> tuple[float, float]:
    """The ``(dx, dy)`` pixels per frame of a digit moving ``direction`` at ``pixels_per_frame``."""
    dx, dy = STEPS[direction]
    return dx * pixels_per_frame, dy * pixels_per_frame
