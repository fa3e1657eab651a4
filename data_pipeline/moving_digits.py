"""The bundled video set of the quickstart: the demo digits moving left, right, up or down, as real mp4 clips.

Each of the 1,797 digits of the demo set (:mod:`data_pipeline.demo`: scikit-learn's digits as 32×32 RGB, white
ink on black) becomes one clip of :data:`NUM_FRAMES` (9) frames at :data:`FPS` (8) frames per second, 32×32 RGB on
black: the digit slides :data:`SPEED` pixel(s) per frame in one direction, on a path centred on the still image
(frame 4 is the demo image itself; frame *k* is it shifted by ``(k - 4) × SPEED`` pixels, the uncovered edge black,
what leaves the frame lost). Directions are balanced (each direction for a quarter of the digits, give or take
one) and assigned by a seeded permutation, independent of the label. Captions read ``"a handwritten digit three
moving left"``; the json adds ``label``, ``digit``, ``direction``, ``split`` and ``index`` to the video fields.

The clips go through the shard writer as raw frames (:class:`~data_pipeline.sources.VideoFrames`) and come out as
H.264 mp4 (libx264, yuv420p, High profile: what any player and the loader's PyAV decode path read), so the demo
goes through the same decode path as users' videos. The codec setting is constant rate factor :data:`CRF` = 10:
at 32×32 the container and codec headers dominate the file (about 2.2 kB a clip whatever the quality), so a low CRF
costs almost nothing, and it keeps the digit readable: decoded frames are within about 48 dB PSNR of the encoded
ones (CRF 18: about 44 dB, 23: about 40 dB), and the demo digit classifier reads re-centred decoded frames as well
as the originals (tests/data/test_video_shards.py). The gray digits have no colour, so 4:2:0 chroma subsampling
loses nothing. The train/validation split is the demo set's (stratified by digit, seeded); the same seed writes
the same bytes (small videos encode single-threaded without x264's SIMD; see :mod:`data_pipeline.writer`).

    loom shards moving-digits output_dir=data/moving-digits

A motion the quickstart set never shows, for teaching one to a trained model (``benchmarks/video_lora_evidence.py``):
``build_moving_digits(out, directions=("diagonally",))`` writes every digit moving down and to the right, one
pixel on each axis per frame, captioned ``"a handwritten digit three moving diagonally"`` (the default
``directions`` writes the quickstart set, byte for byte as before).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from data_pipeline.demo import SPLITS, _digits, caption_for_digit, stratified_split, write_split_set
from data_pipeline.sources import Sample, VideoFrames
from data_pipeline.writer import WriterOptions, WriteSummary

NUM_FRAMES = 9  # frames per clip
FPS = 8.0  # frames per second of the clips
SPEED = 1  # pixels the digit moves per frame
CRF = 10  # x264 constant rate factor of the clips (module docstring)
DIRECTIONS = ("left", "right", "up", "down")  # the directions of the quickstart set
EXTRA_DIRECTIONS = ("diagonally",)  # motions the quickstart set never shows (the video LoRA evidence teaches them)
ALL_DIRECTIONS = DIRECTIONS + EXTRA_DIRECTIONS
# direction -> (dx, dy) per frame; "diagonally" is down and to the right
STEPS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "diagonally": (1, 1)}


def offsets(direction: str) -> np.ndarray:
    """(NUM_FRAMES, 2) integer (dx, dy) of the digit in each frame, relative to the still image."""
    if direction not in STEPS:
        raise ValueError(f"direction: got {direction!r}; allowed: {', '.join(ALL_DIRECTIONS)}")
    k = np.arange(NUM_FRAMES) - NUM_FRAMES // 2  # (T,) -4..4
    return k[:, None] * SPEED * np.array(STEPS[direction])  # (T, 2)


def shift(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``image`` (H, W, C) moved ``dx`` pixels right and ``dy`` down; uncovered pixels black, the rest cut off."""
    h, w = image.shape[:2]
    out = np.zeros_like(image)
    if abs(dx) < w and abs(dy) < h:
        out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def clip_frames(image: np.ndarray, direction: str) -> np.ndarray:
    """(32, 32, 3) uint8 digit → (NUM_FRAMES, 32, 32, 3) uint8 frames of it moving in ``direction``."""
    return np.stack([shift(image, int(dx), int(dy)) for dx, dy in offsets(direction)])


def recentre(frames: np.ndarray, direction: str) -> np.ndarray:
    """Undo the motion: each (T, H, W, C) frame shifted back so the digit sits where the still image has it."""
    return np.stack([shift(f, -int(dx), -int(dy)) for f, (dx, dy) in zip(frames, offsets(direction))])


def caption_for(digit: int, direction: str) -> str:
    """``(3, "left") -> "a handwritten digit three moving left"``."""
    if direction not in STEPS:
        raise ValueError(f"direction: got {direction!r}; allowed: {', '.join(ALL_DIRECTIONS)}")
    return f"{caption_for_digit(digit)} moving {direction}"


def directions(n: int, seed: int = 0, count: int = len(DIRECTIONS)) -> np.ndarray:
    """(n,) direction index (into :data:`DIRECTIONS`, or into a tuple of ``count`` directions) of each digit:
    balanced, by a seeded permutation."""
    rng = np.random.default_rng((seed, 1))  # a stream of its own, not the split's
    return rng.permutation(np.arange(n) % count)


_assign = directions  # clip_samples' argument `directions` shadows the function


def _check_directions(chosen: Sequence[str]) -> tuple[str, ...]:
    chosen = tuple(chosen)
    unknown = [d for d in chosen if d not in STEPS]
    if not chosen or unknown or len(set(chosen)) != len(chosen):
        raise ValueError(f"directions: got {list(chosen)}; give distinct names from {', '.join(ALL_DIRECTIONS)}")
    return chosen


def clip_samples(split: str, seed: int = 0, val_fraction: float = 0.1,
                 directions: Sequence[str] = DIRECTIONS) -> list[Sample]:
    """The clips of one split, in dataset order, as raw frames ready for the shard writer.

    ``directions``: the motions, spread evenly over the digits by a seeded permutation (the default, the
    quickstart's four, gives the quickstart set; ``("diagonally",)`` moves every digit diagonally)."""
    if split not in SPLITS:
        raise ValueError(f"split: got {split!r}; allowed: {', '.join(SPLITS)}")
    chosen = _check_directions(directions)
    images, labels = _digits()
    train_idx, val_idx = stratified_split(labels, seed, val_fraction)
    dirs = _assign(len(labels), seed, len(chosen))
    out = []
    for i in train_idx if split == "train" else val_idx:
        label, direction = int(labels[i]), chosen[int(dirs[i])]
        extra = {"label": label, "digit": caption_for_digit(label).split()[-1], "direction": direction,
                 "split": split, "index": int(i)}
        frames = VideoFrames(clip_frames(images[i], direction), FPS)
        out.append(Sample(frames, caption_for(label, direction), extra, f"sklearn-digits/{int(i)}/{direction}"))
    return out


def build_moving_digits(
    output_dir: str | os.PathLike,
    seed: int = 0,
    val_fraction: float = 0.1,
    max_samples_per_shard: int = 1000,
    overwrite: bool = False,
    progress: bool = False,
    motion_score: bool = False,
    directions: Sequence[str] = DIRECTIONS,
) -> dict[str, WriteSummary]:
    """Write ``train-*.tar``, ``val-*.tar`` and their ``.shardindex.json`` into ``output_dir``.

    Returns ``{"train": summary, "val": summary}`` (no val entry, and no val files, when ``val_fraction`` is 0).
    Refuses, before writing anything, when either split's files exist and ``overwrite`` is off. ``motion_score``
    adds each clip's motion score to its json (:mod:`data_pipeline.curation`). ``directions``: the motions
    (:func:`clip_samples`); the default writes the quickstart set.
    """
    chosen = _check_directions(directions)
    options = WriterOptions(max_samples_per_shard, overwrite=overwrite, video_crf=CRF, motion_score=motion_score)
    return write_split_set(output_dir, lambda split: clip_samples(split, seed, val_fraction, chosen),
                           options, val_fraction, progress)
