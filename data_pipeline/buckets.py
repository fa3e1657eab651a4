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

**Clip buckets** (:class:`ClipBucketSet`, a video run: ``buckets.frames`` set or clip members in ``image_keys``),
after Open-Sora's bucket config (Zheng et al. 2024, "Open-Sora: Democratizing Efficient Video Production"): a
bucket is ``(frames, h, w)``; the groups are every ``(T, r)`` of the frame counts ``buckets.frames`` and the
spatial budgets ``buckets.resolutions`` (default ``[resolution]``), each group holding the aspect set of
:func:`make_buckets` at ``r`` (or the square ``r x r`` when multi-aspect bucketing is off). A clip probed as
``(F, h, w)`` goes to the largest bucket it fits, never upsampled in time: the largest ``r`` with
``h * w >= min_fill * r**2`` (the smallest ``r`` if none), then the largest ``T <= F`` (the smallest ``T`` if
none: the decoder then pads or skips the short clip), then the nearest aspect. An image (probed ``(h, w)``) is a
one-frame clip (Imagen Video, Ho et al. 2022: "treating individual images as single-frame videos") and goes to
``(1, H, W)``. Each group has its own batch size so every batch costs about the same memory (activations grow
with the number of pixels, hence latent tokens): ``batch = token_budget // (T * r**2)`` (at least 1, at most
``max_batch_size``); the default budget ``batch_size * max(frames) * max(r)**2`` gives the largest bucket
``batch_size``. Leftovers are packed within a group only (never into more frames or a larger size).

**The same bucket on every rank** (``same_bucket_across_ranks``): DDP and ZeRO/FSDP do not need equal shapes
across ranks at a step (each rank's gradient is a sum over its own batch; the all-reduce / reduce-scatter is
over parameter-shaped buffers), only equal batch counts, which the loader guarantees anyway. Sequence or
context parallelism does (a clip's tokens are split across ranks, so they must hold the same shape), and equal
shapes also keep per-step time and memory equal across ranks (no rank waits for a slower, larger bucket). Then
the bucket of worker ``w``'s ``j``-th batch is drawn from ``(seed, w, j)`` alone (:meth:`ClipBucketSet.scheduled`:
a group uniformly, an aspect uniformly in it), the same on every rank; the loader gives every rank's workers
equal batch quotas so that step ``i`` is worker ``i % N``'s batch ``i // N`` everywhere. A worker fills the drawn
bucket from its own queue first, then from queued samples of groups that dominate it (as many frames or more,
as large a budget or larger: a clip may lose frames or size, never gain them), nearest aspect first. A drawn
bucket no queued sample can fill for a long time is an error (:class:`~data_pipeline.errors.DataError`): the data
has nothing of that many frames.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, TypeVar

from data_pipeline.shardlists import mix64

T = TypeVar("T")
Shape = tuple[int, ...]  # a bucket: the sample shape without channels, (h, w) or (frames, h, w)
Group = tuple[int, int]  # a clip bucket group: (frames, spatial budget side r)
T_BUCKET = 6  # counter-based stream tag of the shared bucket schedule (data_pipeline.shardlists uses 1..5)


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


class ClipBucketSet(BucketSet):
    """Buckets ``(frames, h, w)`` in groups ``(T, r)``, with a batch size per group (see the module docstring).

    ``sizes`` (and so ``order``, ``nearest_log``) lists every bucket, group after group (groups from the largest
    budget and most frames down, aspects tallest to widest inside a group)."""

    def __init__(self, frames: Sequence[int], resolutions: Sequence[int], step: int, max_aspect: float,
                 multi_aspect: bool, token_budget: int, max_batch_size: Optional[int] = None,
                 min_fill: float = 0.8):
        self.frames = sorted(set(int(t) for t in frames), reverse=True)  # clip lengths, most first
        self.resolutions = sorted(set(int(r) for r in resolutions), reverse=True)  # spatial budgets, largest first
        if not self.frames or min(self.frames) < 1 or not self.resolutions:
            raise ValueError(f"clip buckets need frame counts >= 1 and resolutions; got {frames}, {resolutions}")
        self.token_budget, self.max_batch_size, self.min_fill = int(token_budget), max_batch_size, float(min_fill)
        frame_set = sorted(set(self.frames) | {1}, reverse=True)  # images are one-frame clips
        self.groups: list[Group] = [(t, r) for r in self.resolutions for t in frame_set]
        self.members: dict[Group, BucketSet] = {}  # group -> its aspect buckets (T, h, w)
        self.group_of: dict[Shape, Group] = {}  # bucket -> its group (the first, if two groups share a shape)
        sizes: list[Shape] = []
        for t, r in self.groups:
            spatial = make_buckets(r, step, max_aspect) if multi_aspect else [(r, r)]
            shapes = [(t, h, w) for h, w in spatial]
            self.members[(t, r)] = BucketSet(shapes)
            for s in shapes:
                if s not in self.group_of:
                    self.group_of[s] = (t, r)
                    sizes.append(s)
        super().__init__(sizes)

    def batch_size(self, bucket: Shape) -> int:
        """Samples per batch of ``bucket``: ``token_budget // (T * r**2)`` of its group, in [1, max_batch_size]."""
        t, r = self.group_of[tuple(bucket)]
        n = max(1, self.token_budget // (t * r * r))
        return n if self.max_batch_size is None else max(1, min(n, self.max_batch_size))

    def group(self, shape: Shape) -> Group:
        """The group ``(T, r)`` a sample probed as ``shape`` (``(F, h, w)`` clip or ``(h, w)`` image) goes to."""
        h, w = shape[-2:]
        r = next((r for r in self.resolutions if h * w >= self.min_fill * r * r), self.resolutions[-1])
        if len(shape) == 2:
            return 1, r
        f = int(shape[0])
        t = next((t for t in self.frames if t <= f), self.frames[-1])
        return t, r

    def assign(self, shape: Shape) -> Shape:
        """The bucket of a sample probed as ``shape``: the largest group it fits, then the nearest aspect."""
        return self.members[self.group(shape)].assign(shape[-2:])

    def dominates(self, have: Group, want: Group) -> bool:
        """A sample of group ``have`` can fill a bucket of group ``want`` (fewer or equal frames, budget, never
        more; an image, ``T = 1``, fills one-frame buckets only)."""
        return have[0] >= want[0] and have[1] >= want[1]

    def scheduled(self, seed: int, worker: int, draw: int) -> Shape:
        """The bucket of logical worker ``worker``'s ``draw``-th batch under ``same_bucket_across_ranks``: a
        group uniformly, then an aspect bucket uniformly in it, from ``(seed, worker, draw)`` only (no rank)."""
        u = mix64(seed, T_BUCKET, worker, draw)
        group = self.groups[u % len(self.groups)]
        shapes = self.members[group].sizes
        return shapes[(u >> 32) % len(shapes)]

    def describe(self) -> str:
        parts = []
        for g in self.groups:
            shapes = [s for s in self.members[g].sizes if self.group_of[s] == g]
            if shapes:
                parts.append(f"{g[0]} frame(s) at {g[1]}^2 (batch {self.batch_size(shapes[0])}): "
                             + ", ".join(bucket_name(s) for s in shapes))
        return "; ".join(parts)


def pack_clip_leftovers(queues: dict[Shape, list[T]], log_ar: Callable[[T], float], buckets: ClipBucketSet
                        ) -> tuple[list[tuple[Shape, list[T]]], dict[Shape, list[T]]]:
    """:func:`pack_leftovers` within each group ``(T, r)`` of ``buckets`` at the group's batch size (a clip is
    never packed into more frames or a larger budget); same return value."""
    batches: list[tuple[Shape, list[T]]] = []
    rest: dict[Shape, list[T]] = {}
    for g in buckets.groups:
        sub = {b: q for b, q in queues.items() if buckets.group_of[b] == g}
        if not sub:
            continue
        members = buckets.members[g]
        b_g, r_g = pack_leftovers(sub, log_ar, buckets.batch_size(next(iter(sub))), members)
        batches += b_g
        rest.update(r_g)
    return batches, rest
