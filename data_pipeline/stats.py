"""Counting what the loader delivered, skipped and dropped, with rate-limited warnings.

Skip reasons (a sample is skipped, never fatal): ``corrupt_image`` (header or pixels unreadable),
``missing_image`` (both named after the pixel member's decoder kind, :mod:`data_pipeline.decoders`),
``missing_caption``, ``bad_caption`` (a caption that cannot be written as UTF-8: a lone surrogate from the json),
``bad_json`` (not a JSON object, nested deeper than :data:`~data_pipeline.sampletext.MAX_JSON_DEPTH`, or holding a
string that is not UTF-8), ``bad_array`` (a latent/extra member that does not load), ``missing_array`` (a
configured extra member absent), ``duplicate_key`` (a sample with the same key as the one before it, which is
kept: the tar's members would otherwise merge into one sample). Shard-level reasons count shards, not samples:
``truncated_tar`` (read error mid-tar, or fewer samples than its index lists), ``empty_shard``,
``unreadable_shard`` (cannot be opened, or not a tar).

Drop reasons count good samples not delivered: ``epoch_remainder`` (what is left of a rank's pass when its
batches for the epoch are done), ``last_partial`` (a final partial batch under ``drop_last``),
``resume_missing`` (a sample a saved state refers to that is no longer in its shard).

Each worker keeps its own :class:`Counters`; they travel with every batch's state to the main process, which
sums the latest of each worker (:func:`merge`). Warnings go to the ``data_pipeline`` logger: the first
``max_warnings`` per reason and worker with shard and key, then one line saying the rest are only counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Iterable, Optional

log = logging.getLogger("data_pipeline.loader")


class Counters:
    """Per-worker counts: delivered samples and batches, skips and drops by reason, buckets, merges, repeats."""

    def __init__(self, max_warnings: int = 5, where: str = ""):
        self.max_warnings = max_warnings
        self.where = where
        self.samples = 0
        self.batches = 0
        self.repeated = 0  # samples read again because a rank's pass ran short (wrap-around)
        self.merged = 0  # samples resized into a neighbouring bucket when leftovers were packed
        self.skipped: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.buckets: Counter[str] = Counter()

    def skip(self, reason: str, url: str, key: Optional[str], detail: str = "") -> None:
        self.skipped[reason] += 1
        n = self.skipped[reason]
        if n <= self.max_warnings:
            what = f"sample {key!r} of" if key is not None else "shard"
            log.warning("%sskipped %s %s: %s%s", self.where, what, url, reason, f" ({detail})" if detail else "")
        elif n == self.max_warnings + 1:
            log.warning("%smore than %d '%s' skips: further ones are only counted (see loader.stats())",
                        self.where, self.max_warnings, reason)

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.dropped[reason] += n

    def to_dict(self) -> dict:
        return {"samples": self.samples, "batches": self.batches, "repeated": self.repeated, "merged": self.merged,
                "skipped": dict(self.skipped), "dropped": dict(self.dropped), "buckets": dict(self.buckets)}

    def load(self, d: dict) -> None:
        self.samples = int(d.get("samples", 0))
        self.batches = int(d.get("batches", 0))
        self.repeated = int(d.get("repeated", 0))
        self.merged = int(d.get("merged", 0))
        self.skipped = Counter({k: int(v) for k, v in d.get("skipped", {}).items()})
        self.dropped = Counter({k: int(v) for k, v in d.get("dropped", {}).items()})
        self.buckets = Counter({k: int(v) for k, v in d.get("buckets", {}).items()})


def merge(stats: Iterable[Optional[dict]]) -> dict:
    """Sum per-worker stats dicts (None entries are workers that delivered nothing yet)."""
    out = {"samples": 0, "batches": 0, "repeated": 0, "merged": 0}
    skipped: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    for s in stats:
        if not s:
            continue
        for k in out:
            out[k] += int(s.get(k, 0))
        skipped.update(s.get("skipped", {}))
        dropped.update(s.get("dropped", {}))
        buckets.update(s.get("buckets", {}))
    return {**out, "skipped": dict(sorted(skipped.items())), "dropped": dict(sorted(dropped.items())),
            "buckets": dict(sorted(buckets.items()))}


def format_counts(counts: dict) -> str:
    """``{"corrupt_image": 12, "empty_shard": 1}`` → ``'12 corrupt_image, 1 empty_shard'``."""
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "nothing"
