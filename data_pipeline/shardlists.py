"""Shard lists: expanding url patterns, counting samples from shard indexes, and splitting shards over slots.

Patterns (``SourceConfig.urls``) are one or more parts joined by ``::``; each part is

* a local tar path, a folder (all ``*.tar`` in it), a brace pattern ``data-{000000..000099}.tar``
  (``braceexpand``), or a glob ``data-*.tar``: every expanded path must exist, else :class:`DataError` names the
  pattern;
* a ``pipe:`` command (``pipe:curl -s https://.../a-{000..009}.tar``, ``pipe:aws s3 cp s3://b/x.tar -``) or a
  ``scheme://`` url: braces are expanded, nothing is checked until the stream is opened (``webdataset.gopen``).

A *slot* is one (rank, logical worker) pair: ``slot = rank + world_size * worker`` of ``world_size * workers``.
Per pass over a source, its shards are ordered (shuffled from ``(seed, source, pass)``) and slot ``s`` takes
``order[s::n_slots]``, which is ``order[rank::world_size][worker::workers]`` (split by node, then by worker).
With fewer shards than slots every slot reads every shard of the pass and keeps the samples whose running index
``g`` over the pass has ``g % n_slots == s``: still disjoint, at the cost of reading the bytes ``n_slots`` times.

Randomness everywhere in the loader is *counter based* (:func:`mix64`): a draw is a hash of the seed, a purpose
tag and counters, so a loader's state is a handful of integers and a resumed stream draws the same numbers.
"""

from __future__ import annotations

import glob
import os
import random
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

from braceexpand import braceexpand

from data_pipeline.data_config import SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.index import read_index, sample_counts

_M64 = (1 << 64) - 1

# purpose tags of counter-based draws
T_SHARDS, T_RESAMPLE, T_SHUFFLE, T_MIX, T_AUG = 1, 2, 3, 4, 5


def mix64(*values: int) -> int:
    """A 64-bit hash of a sequence of integers (a splitmix64 chain): the loader's only random number source."""
    h = 0x243F6A8885A308D3
    for v in values:
        z = (h ^ (v & _M64)) + 0x9E3779B97F4A7C15 & _M64
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _M64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _M64
        h = z ^ (z >> 31)
    return h


def url_id(url: str) -> int:
    return zlib.crc32(url.encode())


def _is_remote(part: str) -> bool:
    return part.startswith("pipe:") or "://" in part


def expand_pattern(pattern: str) -> list[str]:
    """All shard urls of a pattern, in pattern order (globs and folders sorted); errors name the pattern."""
    urls: list[str] = []
    parts = [p.strip() for p in pattern.split("::") if p.strip()]
    if not parts:
        raise DataError(f"pattern {pattern!r}: empty")
    for part in parts:
        if _is_remote(part):
            urls.extend(braceexpand(part))
            continue
        expanded = [os.path.expanduser(p[5:] if p.startswith("file:") else p) for p in braceexpand(part)]
        missing = []
        for p in expanded:
            if any(c in p for c in "*?["):
                hits = sorted(h for h in glob.glob(p) if os.path.isfile(h))
                if not hits:
                    raise DataError(f"pattern {part!r}: the glob {p!r} matches no file")
                urls.extend(hits)
            elif os.path.isdir(p):
                hits = sorted(glob.glob(os.path.join(p, "*.tar")))
                if not hits:
                    raise DataError(f"pattern {part!r}: the folder {p} holds no *.tar file")
                urls.extend(hits)
            elif os.path.isfile(p):
                urls.append(p)
            else:
                missing.append(p)
        if missing:
            raise DataError(f"pattern {part!r} matches no file for {len(missing)} of {len(expanded)} expanded "
                            f"paths (first missing: {missing[0]})")
    return urls


def _tar_token(url: str) -> Optional[str]:
    """The tar file a remote url / pipe command names (its last token ending in .tar/.tgz/.tar.gz), if any."""
    for tok in reversed(url[5:].split() if url.startswith("pipe:") else [url]):
        if tok.endswith((".tar", ".tgz", ".tar.gz")):
            return tok
    return None


def count_samples(urls: Sequence[str], index: str = "") -> list[Optional[int]]:
    """Samples per shard from the shard indexes (``data_pipeline.index``); None where no index lists the shard.

    Local tars are looked up in the indexes beside them (and ``index``). A ``pipe:`` command naming a local tar
    (``pipe:cat /data/a.tar``) counts as that tar; other remote urls are matched by file name in ``index``.
    """
    local = {}
    for u in urls:
        tok = _tar_token(u) if _is_remote(u) else u
        if tok is not None and os.path.isfile(tok):
            local[u] = tok
    extra = [index] if index else []
    found = sample_counts(list(dict.fromkeys(local.values())), extra_indexes=extra) if local or extra else {}
    by_name: dict[str, int] = {}
    if index:
        for s in read_index(index).shards:
            by_name[os.path.basename(s.url)] = s.nsamples
    out: list[Optional[int]] = []
    for u in urls:
        n = found.get(local[u]) if u in local else None
        if n is None and by_name:
            tok = _tar_token(u) if _is_remote(u) else u
            n = by_name.get(os.path.basename(tok)) if tok else None
        out.append(n)
    return out


@dataclass(frozen=True)
class ResolvedSource:
    """A source after expansion: its shard urls and (where an index knows them) samples per shard."""

    name: str
    weight: float
    pattern: str
    urls: tuple[str, ...]
    counts: tuple[Optional[int], ...]

    @property
    def total(self) -> Optional[int]:
        """Samples in all shards, or None when some shard has no index entry."""
        return None if any(c is None for c in self.counts) else sum(self.counts)  # type: ignore[misc]

    @property
    def known(self) -> int:
        return sum(c is not None for c in self.counts)


def resolve_sources(sources: Sequence[SourceConfig]) -> list[ResolvedSource]:
    if not sources:
        raise DataError("no data configured: set data.urls (one pattern) or data.sources (weighted patterns)")
    out = []
    names = set()
    for i, s in enumerate(sources):
        urls = expand_pattern(s.urls)
        if not urls:
            raise DataError(f"pattern {s.urls!r} (source {i}) expands to no shard")
        if s.index and not os.path.isfile(s.index):
            raise DataError(f"source {s.label!r}: index {s.index!r} does not exist")
        name = s.label if s.label not in names else f"{s.label}#{i}"
        names.add(name)
        out.append(ResolvedSource(name, s.weight, s.urls, tuple(urls), tuple(count_samples(urls, s.index))))
    return out


def shard_order(n_shards: int, seed: int, source: int, pass_: int, shuffle: bool) -> list[int]:
    """The shard order of one pass: ``range(n)`` or its shuffle from ``(seed, source, pass)``."""
    order = list(range(n_shards))
    if shuffle:
        random.Random(mix64(seed, T_SHARDS, source, pass_)).shuffle(order)
    return order


def slot_share(order: Sequence[int], slot: int, n_slots: int) -> tuple[list[int], bool]:
    """(shards this slot reads in this pass, whether it keeps only every n_slots-th sample of them)."""
    if len(order) >= n_slots:
        return list(order[slot::n_slots]), False
    return list(order), True


def slot_samples(counts: Sequence[int], share: Sequence[int], modulo: bool, slot: int, n_slots: int) -> int:
    """Samples a slot reads in one pass, from known shard counts."""
    if not modulo:
        return sum(counts[i] for i in share)
    total = sum(counts[i] for i in share)
    return len(range(slot, total, n_slots))
