"""The moving-digits check reads true clips as moving the way they move, showing the digit they show, and catches
clips that move the other way, stand still, or change digit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.demo import load_digits_split
from data_pipeline.moving_digits import DIRECTIONS, clip_frames
from training.evaluation import DigitClassifier
from training.motion_check import (
    fitted_velocity,
    ink_centroids,
    read_clips,
    registration_offsets,
    scores,
    shift_frames,
)


@pytest.fixture(scope="module")
def classifier():
    return DigitClassifier.for_demo(0)[0]


@pytest.fixture(scope="module")
def stills():
    _, _, xva, yva = load_digits_split(0)
    pick = np.concatenate([np.flatnonzero(yva == d)[:3] for d in range(10)])  # 3 per digit, 30 stills
    return xva[pick], yva[pick]


def _clips(stills: np.ndarray, directions: np.ndarray, frames: slice = slice(2, 7)) -> torch.Tensor:
    """(N, 3, T, 32, 32) in [-1, 1]: each still moving in its direction, 1 px per frame, frames of the 9."""
    clips = np.stack([clip_frames(img, DIRECTIONS[k])[frames] for img, k in zip(stills, directions)])  # (N,T,H,W,C)
    return torch.from_numpy(clips).float().permute(0, 4, 1, 2, 3) / 127.5 - 1


def test_true_clips_read_as_asked(classifier, stills):
    images, labels = stills
    directions = np.arange(len(labels)) % 4
    got = scores(read_clips(_clips(images, directions), classifier), labels, directions)
    assert got["direction_accuracy"] == 1.0
    assert got["digit_accuracy"] >= 0.9 and got["temporal_consistency"] >= 0.85, got


def test_reversed_clips_move_the_other_way(classifier, stills):
    images, labels = stills
    directions = np.arange(len(labels)) % 4
    reading = read_clips(_clips(images, directions).flip(2), classifier)  # time runs backwards
    opposite = np.array([DIRECTIONS.index({"left": "right", "right": "left", "up": "down", "down": "up"}[
        DIRECTIONS[k]]) for k in directions])
    assert (reading.direction == opposite).all()
    assert scores(reading, labels, directions)["direction_accuracy"] == 0.0


def test_registration_recovers_the_shifts(stills):
    images, _ = stills
    clips = _clips(images[:4], np.array([0, 1, 2, 3]))  # left, right, up, down
    offsets = registration_offsets(clips)  # (4, 5, 2)
    k = np.arange(5) - 2
    expected = np.stack([np.stack([k * dx, k * dy], -1) for dx, dy in ((-1, 0), (1, 0), (0, -1), (0, 1))])
    np.testing.assert_array_equal(offsets, expected)
    v = fitted_velocity(ink_centroids(clips))
    assert v[0, 0] < 0 < v[1, 0] and v[2, 1] < 0 < v[3, 1]


def test_changing_digit_is_inconsistent(classifier, stills):
    images, labels = stills
    a = np.flatnonzero(labels == 3)[0]
    b = np.flatnonzero(labels == 8)[0]
    clip = _clips(images[[a]], np.array([0]))
    other = _clips(images[[b]], np.array([0]))
    clip[:, :, 3:] = other[:, :, 3:]  # a three that turns into an eight
    reading = read_clips(clip, classifier)
    assert not reading.consistent[0]
    assert set(reading.frame_digits[0][:3]) == {3} and set(reading.frame_digits[0][3:]) == {8}


def test_shift_frames_and_shape_errors(classifier):
    x = torch.full((1, 3, 4, 4), -1.0)
    x[0, :, 1, 1] = 1.0
    y = shift_frames(x, np.array([2]), np.array([1]))
    assert y[0, 0, 2, 3] == 1.0 and y.sum() == x.sum()  # moved right 2, down 1; nothing lost
    assert (shift_frames(x, np.array([5]), np.array([0])) == -1).all()  # moved out: black
    with pytest.raises(ValueError, match="expected clips"):
        read_clips(torch.zeros(2, 3, 32, 32), classifier)


def test_diagonal_reading_accepts_diagonal_clips_only(stills):
    from training.motion_check import diagonal_accuracy, is_diagonal, registered_velocity

    images, _ = stills
    diagonal = np.stack([clip_frames(img, "diagonally")[2:7] for img in images])  # (N, T, H, W, C)
    diagonal = torch.from_numpy(diagonal).float().permute(0, 4, 1, 2, 3) / 127.5 - 1
    velocity = registered_velocity(diagonal)
    assert np.allclose(velocity, 1.0), velocity  # exactly one pixel per frame on each axis
    assert diagonal_accuracy(velocity) == 1.0
    assert diagonal_accuracy(registered_velocity(diagonal.flip(2))) == 0.0  # up and to the left
    for k in range(4):  # the four straight directions never read as diagonal
        straight = registered_velocity(_clips(images, np.full(len(images), k)))
        assert diagonal_accuracy(straight) == 0.0, (DIRECTIONS[k], straight)
    still = registered_velocity(diagonal[:, :, 2:3].expand_as(diagonal).contiguous())
    assert diagonal_accuracy(still) == 0.0
    # The rule at its edges: both axes >= 0.25 px/frame and the slower >= half the faster.
    got = is_diagonal(np.array([[1.0, 0.5], [1.0, 0.49], [0.24, 0.24], [-1.0, -1.0], [1.0, -1.0], [0.3, 0.6]]))
    assert got.tolist() == [True, False, False, False, False, True]


def test_diagonal_clip_samples_leave_the_quickstart_set_alone():
    from data_pipeline import moving_digits as md

    diagonal = md.clip_samples("val", directions=("diagonally",))
    plain = md.clip_samples("val")
    assert [s.extra["index"] for s in diagonal] == [s.extra["index"] for s in plain]  # the same digits
    assert {s.extra["direction"] for s in diagonal} == {"diagonally"}
    assert diagonal[0].caption == f"{md.caption_for_digit(diagonal[0].extra['label'])} moving diagonally"
    assert diagonal[0].caption.startswith("a handwritten digit ") and "diagonally" not in plain[0].caption
    assigned = md.directions(1797, 0)  # the quickstart's assignment, unchanged by the new argument
    assert [s.extra["direction"] for s in plain] == [md.DIRECTIONS[assigned[s.extra["index"]]] for s in plain]
    with pytest.raises(ValueError, match="directions"):
        md.clip_samples("val", directions=("sideways",))
