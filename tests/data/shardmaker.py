"""Test helper: small WebDataset shards in the img2dataset layout (KEY.png|jpg, KEY.txt, KEY.json), good and broken,
with a matching ``<prefix>.shardindex.json`` written by ``data_pipeline.index.write_index``."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from data_pipeline.index import ShardIndex, ShardInfo, write_index


def image_bytes(h: int, w: int, seed: int = 0, fmt: str = "png", mode: str = "RGB") -> bytes:
    """A smooth random image (gradients plus a coloured block) encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)
    arr = np.stack([(base[c] + 100 * np.sin(xx / (3 + c) + yy / 7 + seed)) % 256 for c in range(3)], -1)
    arr = arr.astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    fmt_name = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    img.save(buf, format=fmt_name, **({"quality": 90} if fmt == "jpg" else {}))
    return buf.getvalue()


def sample(key: str, h: int = 24, w: int = 32, fmt: str = "png", seed: int = 0, caption: Optional[str] = None,
           meta: Optional[dict] = None, extra: Optional[dict[str, bytes]] = None) -> dict[str, bytes]:
    """Members of one good sample: ``{"png": ..., "txt": ..., "json": ...}``."""
    cap = f"a picture of {key}" if caption is None else caption
    members = {fmt: image_bytes(h, w, seed, fmt),
               "json": json.dumps({"key": key, "width": w, "height": h, **(meta or {})}).encode()}
    if cap:
        members["txt"] = cap.encode()
    members.update(extra or {})
    return members


def write_tar(path: str | os.PathLike, samples: Sequence[tuple[str, dict[str, bytes]]]) -> Path:
    """Write ``[(key, {ext: bytes})]`` as a tar (members sorted by extension per sample)."""
    path = Path(path)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in samples:
            for ext in sorted(members):
                data = members[ext]
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                ti.mode = 0o644
                tf.addfile(ti, io.BytesIO(data))
    return path


def write_shardset(directory: str | os.PathLike, prefix: str,
                   shards: Sequence[Sequence[tuple[str, dict[str, bytes]]]], counts: Optional[Sequence[int]] = None,
                   index: bool = True) -> list[str]:
    """Write one tar per entry of ``shards`` (``{prefix}-000000.tar``, ...) and, if ``index``, the shard index
    (``counts`` overrides the sample counts it records, e.g. to describe a tar that was later truncated)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths, infos = [], []
    for i, samples in enumerate(shards):
        p = write_tar(directory / f"{prefix}-{i:06d}.tar", samples)
        paths.append(str(p))
        infos.append(ShardInfo(p.name, len(samples) if counts is None else counts[i], p.stat().st_size))
    if index:
        write_index(directory, ShardIndex(name=prefix, shards=infos))
    return paths


def make_shards(directory: str | os.PathLike, prefix: str = "shard", n_shards: int = 4, per_shard: int = 8,
                size: Callable[[int], tuple[int, int]] = lambda i: (24, 32), fmt: str = "png", index: bool = True,
                extra: Optional[Callable[[int], dict[str, bytes]]] = None) -> list[str]:
    """``n_shards`` tars of ``per_shard`` good samples each; keys ``{prefix}{i:05d}``; image ``i`` has ``size(i)``."""
    shards = []
    for s in range(n_shards):
        samples = []
        for j in range(per_shard):
            i = s * per_shard + j
            h, w = size(i)
            key = f"{prefix}{i:05d}"
            samples.append((key, sample(key, h, w, fmt, seed=i, extra=extra(i) if extra else None)))
        shards.append(samples)
    return write_shardset(directory, prefix, shards, index=index)


def truncate(path: str | os.PathLike, fraction: float) -> None:
    """Cut a file to ``fraction`` of its bytes (a download that died half way)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * fraction)])


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()
