"""The bundled demo set: scikit-learn's handwritten digits as 32×32 RGB image–caption shards.

``sklearn.datasets.load_digits()`` ships 1,797 8×8 grayscale digits (values 0..16, 16 = full ink) with the
package, so the demo needs no download. Each one becomes:

* pixels: the value scale 0..16 mapped linearly to 0..255, then bilinear upsampling 8×8 → 32×32 (half-pixel
  centres with edge clamping, the convention of PIL / OpenCV / ``torch`` ``align_corners=False``), computed in
  float64 numpy and rounded to uint8 (so the bytes do not depend on an image library's resampler); white ink on
  a black background (the data's own polarity, like MNIST); the gray channel copied to R, G and B.
* a lossless PNG, the caption ``"a handwritten digit seven"``, and json fields ``label`` (int), ``digit``
  (``"seven"``), ``split`` (``"train"``/``"val"``) and ``index`` (the row in ``load_digits()``).

The train/validation split is stratified by label and seeded: each class is shuffled with
``numpy.random.default_rng(seed)`` and the validation set takes ``round(1797 * val_fraction)`` samples in all,
shared between classes in proportion to their sizes (largest-remainder rounding; 18 per class, 180 in all, at
the default 0.1). :func:`build_demo_set` writes ``train-*.tar`` and ``val-*.tar`` with their indexes; the same
seed rebuilds byte-identical files. :func:`load_digits_split` gives the same split as arrays, for a digit
classifier that later reads generated samples.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable

import numpy as np

from data_pipeline.sources import Sample, SkipLog
from data_pipeline.writer import WriterOptions, WriteSummary, existing_shard_files, write_shards

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEMO_SIZE = 32  # output side, pixels
SOURCE_MAX = 16.0  # load_digits' value for full ink
SPLITS = ("train", "val")


def caption_for_digit(d: int) -> str:
    """``7 -> "a handwritten digit seven"``."""
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 0 <= int(d) <= 9:
        raise ValueError(f"digit: got {d!r}; allowed: an integer 0..9")
    return f"a handwritten digit {DIGIT_WORDS[int(d)]}"


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D bilinear resampling with half-pixel centres and clamped edges."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5  # output pixel centre in input coordinates
    lo = np.floor(src).astype(np.int64)
    frac = src - lo
    m = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(m, (rows, np.clip(lo, 0, n_in - 1)), 1.0 - frac)
    np.add.at(m, (rows, np.clip(lo + 1, 0, n_in - 1)), frac)
    return m


def upsample_digits(images: np.ndarray, size: int = DEMO_SIZE) -> np.ndarray:
    """(N, 8, 8) values 0..16 → (N, size, size, 3) uint8 0..255, white ink on black (see the module docstring)."""
    x = np.asarray(images, dtype=np.float64) * (255.0 / SOURCE_MAX)  # (N, 8, 8)
    rows = _bilinear_matrix(x.shape[1], size)  # (S, 8)
    cols = _bilinear_matrix(x.shape[2], size)  # (S, 8)
    up = np.einsum("ih,nhw,jw->nij", rows, x, cols)  # (N, S, S)
    gray = np.clip(np.rint(up), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)  # (N, S, S, 3)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = upsample_digits(d.images)
    labels = d.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def stratified_split(labels: np.ndarray, seed: int = 0, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices), each sorted; per class a seeded shuffle, val sizes by largest remainder."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: got {val_fraction!r}; allowed: 0 <= val_fraction < 1")
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * val_fraction
    n_val = np.floor(quota).astype(np.int64)
    remaining = int(round(len(labels) * val_fraction)) - int(n_val.sum())
    order = np.argsort(-(quota - n_val), kind="stable")  # largest remainder first; ties: smaller label first
    n_val[order[:remaining]] += 1
    rng = np.random.default_rng(seed)
    val = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, n_val)]
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    if len(train_idx) == 0:
        raise ValueError(f"val_fraction: got {val_fraction!r}; it leaves no training samples")
    return train_idx, val_idx


def load_digits_split(
    seed: int = 0, val_fraction: float = 0.1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_images, train_labels, val_images, val_labels): images (N, 32, 32, 3) uint8 exactly as in the
    shards' PNGs, labels (N,) int64; the same split :func:`build_demo_set` writes for this seed."""
    images, labels = _digits()
    train_idx, val_idx = stratified_split(labels, seed, val_fraction)
    return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]


def split_sizes(seed: int = 0, val_fraction: float = 0.1) -> tuple[int, int]:
    """(train, val) sample counts of the split for this seed and fraction."""
    train_idx, val_idx = stratified_split(_digits()[1], seed, val_fraction)
    return len(train_idx), len(val_idx)


def digit_samples(split: str, seed: int = 0, val_fraction: float = 0.1) -> list[Sample]:
    """The samples of one split, in dataset order, ready for the shard writer."""
    if split not in SPLITS:
        raise ValueError(f"split: got {split!r}; allowed: {', '.join(SPLITS)}")
    images, labels = _digits()
    train_idx, val_idx = stratified_split(labels, seed, val_fraction)
    out = []
    for i in train_idx if split == "train" else val_idx:
        label = int(labels[i])
        extra = {"label": label, "digit": DIGIT_WORDS[label], "split": split, "index": int(i)}
        out.append(Sample(images[i], caption_for_digit(label), extra, f"sklearn-digits/{int(i)}"))
    return out


def build_demo_set(
    output_dir: str | os.PathLike,
    seed: int = 0,
    val_fraction: float = 0.1,
    max_samples_per_shard: int = 1000,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, WriteSummary]:
    """Write ``train-*.tar``, ``val-*.tar`` and their ``.shardindex.json`` into ``output_dir``.

    Returns ``{"train": summary, "val": summary}`` (no val entry, and no val files, when ``val_fraction`` is 0).
    Refuses, before writing anything, when either split's files exist and ``overwrite`` is off.
    """
    options = WriterOptions(max_samples_per_shard, image_format="png", overwrite=overwrite)
    return write_split_set(output_dir, lambda split: digit_samples(split, seed, val_fraction), options,
                           val_fraction, progress)


def write_split_set(output_dir: str | os.PathLike, samples_of: Callable[[str], list[Sample]], options: WriterOptions,
                    val_fraction: float, progress: bool = False) -> dict[str, WriteSummary]:
    """A bundled train/val set: ``samples_of(split)`` written as ``<split>-*.tar`` + index for each split (no val
    split when ``val_fraction`` is 0). Refuses, before writing anything, when either split's files exist and
    ``options.overwrite`` is off; with it, a stale val set is removed too."""
    splits = [s for s in SPLITS if s == "train" or val_fraction > 0]
    if not options.overwrite:
        existing = demo_output_files(output_dir)
        if existing:
            raise FileExistsError(f"{output_dir} already holds shards (e.g. {existing[0].name}); "
                                  "set overwrite=true to replace them")
    else:
        for path in existing_shard_files(output_dir, "val"):  # a stale val set must not outlive val_fraction=0
            path.unlink()
    summaries = {}
    for split in splits:
        samples = samples_of(split)
        summaries[split] = write_shards(samples, output_dir, split, options, skips=SkipLog(), total=len(samples),
                                        progress=progress)
    return summaries


def demo_output_files(output_dir: str | os.PathLike) -> list[Path]:
    """Every demo file in ``output_dir`` (tars and indexes of both splits)."""
    return [p for s in SPLITS for p in existing_shard_files(output_dir, s)]

