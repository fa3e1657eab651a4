"""The shard index: how many samples each tar holds, so a loader knows an epoch's length without opening tars.

One JSON file per shard set, ``<dir>/<prefix>.shardindex.json``, in webdataset's ``wids`` shard-index layout
(so ``wids`` reads it too), with a few extra top-level fields of ours::

    {
      "__kind__": "wids-shard-index-v1",
      "wids_version": 1,
      "name": "train",
      "shardlist": [{"url": "train-000000.tar", "nsamples": 1000, "filesize": 123456}, ...],
      "total_samples": 1617,
      "skipped": {"corrupt_image": 2, "missing_caption": 1},
      "created_by": "latentloom"
    }

Shard urls are relative to the index file's folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

INDEX_SUFFIX = ".shardindex.json"
INDEX_KIND = "wids-shard-index-v1"


@dataclass
class ShardInfo:
    url: str
    nsamples: int
    filesize: int = 0


@dataclass
class ShardIndex:
    name: str
    shards: list[ShardInfo]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def total_samples(self) -> int:
        return sum(s.nsamples for s in self.shards)

    def to_json(self) -> dict:
        return {
            "__kind__": INDEX_KIND,
            "wids_version": 1,
            "name": self.name,
            "shardlist": [{"url": s.url, "nsamples": s.nsamples, "filesize": s.filesize} for s in self.shards],
            "total_samples": self.total_samples,
            "skipped": dict(sorted(self.skipped.items())),
            "created_by": "latentloom",
        }


def index_path(directory: str | os.PathLike, prefix: str) -> Path:
    return Path(directory) / f"{prefix}{INDEX_SUFFIX}"


def write_index(directory: str | os.PathLike, index: ShardIndex) -> Path:
    """Write ``index`` atomically (temporary file, then rename) and return its path."""
    path = index_path(directory, index.name)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(index.to_json(), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_index(path: str | os.PathLike) -> ShardIndex:
    """Read one index file; errors name the file and what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: arrays nested too deep to parse
        raise ValueError(f"shard index {path}: cannot read it ({type(e).__name__}: {str(e)[:100]})") from e
    if not isinstance(data, dict) or data.get("__kind__") != INDEX_KIND or not isinstance(data.get("shardlist"), list):
        raise ValueError(f"shard index {path}: not a {INDEX_KIND} file (no '__kind__'/'shardlist')")
    shards = []
    for i, entry in enumerate(data["shardlist"]):
        try:
            shards.append(ShardInfo(str(entry["url"]), int(entry["nsamples"]), int(entry.get("filesize", 0))))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"shard index {path}: shardlist[{i}] needs 'url' and 'nsamples' ({e})") from e
    name = str(data.get("name") or path.name[: -len(INDEX_SUFFIX)])
    return ShardIndex(name=name, shards=shards, skipped={str(k): int(v) for k, v in data.get("skipped", {}).items()})


def sample_counts(urls: Iterable[str], extra_indexes: Iterable[str | os.PathLike] = ()) -> dict[str, Optional[int]]:
    """Samples per shard for each local ``url``, from the index files beside them (and ``extra_indexes``).

    Returns ``{url: nsamples or None}``; None where no index lists that shard (remote ``pipe:`` urls, or shards
    written by another tool).
    """
    known: dict[str, int] = {}
    seen_dirs: set[Path] = set()

    def absorb(index_file: Path) -> None:
        idx = read_index(index_file)
        for s in idx.shards:
            known[str((index_file.parent / s.url).resolve())] = s.nsamples

    for extra in extra_indexes:
        absorb(Path(extra))
    counts: dict[str, Optional[int]] = {}
    for url in urls:
        if url.startswith("pipe:") or "://" in url:
            counts[url] = known.get(url)
            continue
        p = Path(url).resolve()
        if p.parent not in seen_dirs:
            seen_dirs.add(p.parent)
            for f in sorted(p.parent.glob(f"*{INDEX_SUFFIX}")):
                absorb(f)
        counts[url] = known.get(str(p))
    return counts
