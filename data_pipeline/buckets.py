"""Multi-aspect buckets (SDXL, Podell et al. 2023, sec. 2.3; NovelAI's aspect-ratio bucketing).

The bucket set is fixed by the config: for every short side ``s`` (a multiple of ``step``, at most ``resolution``)
the longest long side ``l`` (also a multiple of ``step``) with ``s * l <= resolution**2``, kept when
``l / s <= max_aspect``, in both orientations.
A bucket is a shape without channels, ``(h, w)`` for images (a clip bucket would be ``(frames, h, w)``); the
worker's queues and its saved state are keyed by that shape. A sample goes to the bucket whose aspect ratio (of
the last two axes) is nearest its own in log space (``|log(w/h) - log(bw/bh)|``), read from the member's header
only (its decoder's ``probe``); it is later resized to cover the bucket and cropped to it. Images wider than
``max_aspect`` land in the extreme bucket and lose more to the crop. Leading axes (frames) are not matched yet: a
clip bucket set adds that rule where it builds its shapes.

A worker keeps one queue of undecoded samples per bucket and emits a batch as soon as a queue holds
``batch_size`` samples, so every batch is single-sized. Rare aspect ratios fill their queue slowly; at the end
of each pass (and, for endless streams, at each epoch boundary) :func:`pack_leftovers` sorts every queued sample
by aspect ratio and cuts the sorted run into full batches, each sent to the bucket nearest its mean log aspect
("merged into the nearest bucket"); what does not fill a batch stays queued for later.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
Shape = tuple[int, ...]  # a bucket: the sample shape without channels, (h, w) or (frames, h, w)


def make_buckets(resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """Bucket sizes ``(h, w)``, sorted from tallest to widest; symmetric (each portrait has its landscape)."""
    budget = resolution * resolution
    out = set()
    short = step
    while short <= resolution:
        long = (budget // short) // step * step
        if long >= short and long / short <= max_aspect + 1e-9:
            out.update({(long, short), (short, long)})
        short += step
    if not out:
        raise ValueError(f"no bucket of sides multiple of {step} fits {resolution}**2 within aspect {max_aspect}")
    return sorted(out, key=lambda hw: hw[1] / hw[0])


def bucket_name(shape: Shape) -> str:
    """``(32, 64)`` → ``'32x64'`` (also the name of a latent-shape queue)."""
    return "x".join(map(str, shape))


def log_aspect(shape: Shape) -> float:
    """``log(w / h)`` of the last two axes of a shape."""
    return math.log(shape[-1] / shape[-2])


class BucketSet:
    """The bucket shapes, in a fixed order (tallest to widest: ties and packing follow it), and the nearest-bucket
    lookup."""

    def __init__(self, sizes: Sequence[Shape]):
        self.sizes: list[Shape] = [tuple(s) for s in sizes]
        self.order = {s: i for i, s in enumerate(self.sizes)}  # bucket shape -> its position in sizes
        self.log_ar = [log_aspect(s) for s in self.sizes]

    def __len__(self) -> int:
        return len(self.sizes)

    def nearest_log(self, log_ar: float) -> Shape:
        """The bucket whose log aspect is nearest ``log_ar`` (the earlier one on a tie)."""
        return self.sizes[min(range(len(self.sizes)), key=lambda i: (abs(self.log_ar[i] - log_ar), i))]

    def assign(self, shape: Shape) -> Shape:
        """The bucket for a sample of ``shape`` (``(h, w)`` from its header): the aspect nearest ``w / h`` in log
        space."""
        return self.nearest_log(log_aspect(shape))

    def describe(self) -> str:
        return ", ".join(f"{bucket_name(s)} ({s[-1] / s[-2]:.2f})" for s in self.sizes)


def pack_leftovers(queues: dict[Shape, list[T]], log_ar: Callable[[T], float], batch_size: int,
                   buckets: BucketSet) -> tuple[list[tuple[Shape, list[T]]], dict[Shape, list[T]]]:
    """Pack queued samples into full batches across neighbouring buckets.

    ``queues`` maps bucket shape → samples (in arrival order); ``log_ar(sample)`` is a sample's log aspect ratio.
    Returns ``(batches, rest)``: ``batches`` is a list of ``(bucket, samples)`` with ``len(samples) ==
    batch_size``, the bucket nearest the batch's mean log aspect; ``rest`` holds the (< batch_size) samples
    that did not fill a batch, back in their own buckets. Deterministic: sorted by (log aspect, bucket position,
    arrival).
    """
    flat = [(log_ar(x), buckets.order[b], i, x) for b in queues for i, x in enumerate(queues[b])]
    flat.sort(key=lambda t: (t[0], t[1], t[2]))
    n_full = len(flat) // batch_size * batch_size
    batches = []
    for start in range(0, n_full, batch_size):
        chunk = flat[start:start + batch_size]
        mean = sum(t[0] for t in chunk) / batch_size
        batches.append((buckets.nearest_log(mean), [t[3] for t in chunk]))
    rest: dict[Shape, list[T]] = {}
    for t in sorted(flat[n_full:], key=lambda t: (t[1], t[2])):
        rest.setdefault(buckets.sizes[t[1]], []).append(t[3])
    return batches, rest
