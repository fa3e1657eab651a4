"""Writing WebDataset shards in the img2dataset / LAION layout, with a shard index beside them.

Each sample becomes three tar members sharing one key (webdataset groups members by the text before the first
dot of the file name, so keys are plain digits)::

    000000042.jpg    the image (.jpg, .png, or the source's own .webp when kept as-is)
    000000042.json   {"key", "width", "height", "caption", "source", ...the source's extra fields}
    000000042.txt    the caption, UTF-8

Keys are a 9-digit running index over the whole shard set (``{prefix}-000000.tar``, ``{prefix}-000001.tar``,
...), at most ``max_samples_per_shard`` samples per tar. A tar is written under ``<name>.tmp`` and renamed only
when complete, so a crash never leaves a partial tar under a final name. Bytes are deterministic: members are in
a fixed order (per sample: sorted by extension), with mtime 0, uid/gid 0, empty user/group names and mode 0644,
in the POSIX ustar format, so the same input gives byte-identical shards. After the last shard,
``<prefix>.shardindex.json`` (:mod:`data_pipeline.index`) records samples and bytes per shard and the skip counts.

Image handling (``image_format``): ``keep`` stores already-encoded jpg/png/webp bytes untouched and encodes
anything else (bmp, arrays, PIL images) as PNG; ``jpg`` and ``png`` re-encode, except that bytes already in the
requested format pass through untouched. An image is always re-encoded when ``max_size`` asks for a downscale
(longer side to ``max_size``, Lanczos) or its EXIF orientation tag asks for a rotation (applied to the pixels).
When re-encoding to jpg, transparency is composited onto white.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from data_pipeline.index import ShardIndex, ShardInfo, index_path, write_index
from data_pipeline.sources import TABLE_SUFFIXES, ImageLike, Sample, SkipLog, decode_image

log = logging.getLogger(__name__)

SOURCES = ("demo", "folder", "table", "pairs")
PAIR_TABLE_SUFFIXES = {**TABLE_SUFFIXES, ".parquet": "parquet"}  # source=pairs (data_pipeline.preference)
IMAGE_FORMATS = ("keep", "jpg", "png")
KEEPABLE = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> shard extension
RESERVED_FIELDS = ("key", "width", "height", "caption", "source")  # json fields the writer sets itself
DEFAULT_PREFIX = "shard"
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_EXIF_ORIENTATION = 0x0112


@dataclass
class WriterOptions:
    """How one shard set is written: tar size, how images are stored, and whether an existing set is replaced.

    :class:`ShardWriter`, :func:`write_shards` and :func:`~data_pipeline.preference.write_preference_shards` take
    it; ``loom shards``' :class:`ShardsConfig` is one (so its keys stay flat: ``max_samples_per_shard=500``)."""

    max_samples_per_shard: int = 1000  # at most this many samples in one tar
    image_format: Literal["keep", "jpg", "png"] = "keep"  # keep the source's jpg/png/webp bytes, or re-encode
    jpeg_quality: int = 95  # JPEG quality (1..100) when encoding jpg
    max_size: Optional[int] = None  # downscale so the longer side is at most this many pixels; None: never
    overwrite: bool = False  # replace existing shards of the same prefix in output_dir (else refuse)

    def __post_init__(self) -> None:
        n = self.max_samples_per_shard
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_samples_per_shard: got {n!r}; expected an integer >= 1")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format: got {self.image_format!r}; allowed: {', '.join(IMAGE_FORMATS)}")
        q = self.jpeg_quality
        if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= 100:
            raise ValueError(f"jpeg_quality: got {q!r}; allowed: an integer in 1..100")
        m = self.max_size
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"max_size: got {m!r}; allowed: null or an integer >= 1")

    def writer_options(self) -> "WriterOptions":
        """Just these options (a plain :class:`WriterOptions`, also from a config that extends it)."""
        return WriterOptions(**{f.name: getattr(self, f.name) for f in fields(WriterOptions)})


@dataclass
class ShardsConfig(WriterOptions):
    """What ``loom shards`` writes: the source, where the shards go, and how (the :class:`WriterOptions` fields)."""

    source: Literal["demo", "folder", "table", "pairs"] = "demo"  # demo digits, folder, table, or preference pairs
    input: Optional[str] = None  # the folder (folder), .jsonl/.csv (table) or .jsonl/.csv/.parquet (pairs); demo: none
    output_dir: str = "data/shards"  # where the tars and their .shardindex.json go (created if missing)
    prefix: Optional[str] = None  # shard names {prefix}-000000.tar; None: "shard" (pairs: "pairs"; demo: train/val)
    image_column: str = "image"  # table column with the image path (relative to the table's folder)
    caption_column: str = "caption"  # table column with the caption
    allow_empty_caption: bool = False  # keep images without a caption (caption ""), instead of skipping them
    seed: int = 0  # demo: seed of the stratified train/validation split
    val_fraction: float = 0.1  # demo: fraction of each digit class held out for validation, in [0, 1)
    progress: bool = True  # show a tqdm progress bar

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source: got {self.source!r}; allowed: {', '.join(SOURCES)}")
        if self.source == "demo":
            if self.input is not None:
                raise ValueError(f"input: got {self.input!r}; the demo source is bundled and reads no input")
            if self.prefix is not None:
                raise ValueError(f"prefix: got {self.prefix!r}; the demo source always writes train-* and val-*")
            if self.image_format == "jpg":
                raise ValueError("image_format: got 'jpg'; the demo set is stored as lossless PNG (use keep or png)")
            if self.max_size is not None:
                raise ValueError(f"max_size: got {self.max_size!r}; the demo images are 32x32, leave it null")
        else:
            _check_input(self.source, self.input)
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"output_dir: got {self.output_dir!r}; expected a folder path")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ValueError(f"output_dir: {self.output_dir!r} exists and is not a folder")
        if self.prefix is not None:
            check_prefix(self.prefix)
        super().__post_init__()
        for name in ("image_column", "caption_column"):
            if not getattr(self, name):
                raise ValueError(f"{name}: got {getattr(self, name)!r}; expected a column name")
        if self.image_column == self.caption_column:
            raise ValueError(f"caption_column: got {self.caption_column!r}, the same as image_column")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: got {self.seed!r}; expected an integer")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: got {self.val_fraction!r}; allowed: 0 <= val_fraction < 1")

    @property
    def shard_prefix(self) -> str:
        """The prefix folder/table shards are written under."""
        if self.prefix is not None:
            return self.prefix
        return "pairs" if self.source == "pairs" else DEFAULT_PREFIX


def _check_input(source: str, value: Optional[str]) -> None:
    if not value:
        what = {"folder": "a folder of images", "pairs": "a .jsonl, .csv or .parquet table of pairs"}.get(
            source, "a .jsonl or .csv table")
        raise ValueError(f"input: got {value!r}; source={source} needs input=<{what}>")
    path = Path(value)
    if not path.exists():
        raise ValueError(f"input: got {value!r}; no such file or folder")
    if source == "folder" and not path.is_dir():
        raise ValueError(f"input: got {value!r}; source=folder needs a folder, this is a file")
    if source == "pairs":
        if not path.is_file() or path.suffix.lower() not in PAIR_TABLE_SUFFIXES:
            raise ValueError(f"input: got {value!r}; source=pairs needs a file with suffix "
                             f"{', '.join(sorted(PAIR_TABLE_SUFFIXES))} (columns caption, jpg_0, jpg_1, label_0)")
    if source == "table":
        if not path.is_file():
            raise ValueError(f"input: got {value!r}; source=table needs a .jsonl or .csv file, this is a folder")
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise ValueError(f"input: got {value!r}; allowed table suffixes: {', '.join(sorted(TABLE_SUFFIXES))}")


def check_prefix(prefix: str) -> None:
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
        raise ValueError(f"prefix: got {prefix!r}; allowed: letters, digits, '_', '-', '.' (no '/'), not empty")


# ------------------------------------------------------------------------------------------------ images


class CorruptImageError(ValueError):
    """Image bytes PIL cannot decode."""


@dataclass
class EncodedImage:
    data: bytes  # the file's bytes
    ext: str  # "jpg", "png" or "webp"
    width: int
    height: int


def _array_to_image(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        raise ValueError(f"image array: dtype {arr.dtype}; expected uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    modes = {2: "L", 3: "RGB", 4: "RGBA"}
    mode = "L" if arr.ndim == 2 else modes.get(arr.shape[2]) if arr.ndim == 3 else None
    if mode is None:
        raise ValueError(f"image array: shape {arr.shape}; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    return Image.fromarray(np.ascontiguousarray(arr), mode=mode)


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block is not worth dropping the image for
        return 1


def _normalize_mode(img: Image.Image) -> Image.Image:
    """L, LA, RGB or RGBA (palette, CMYK, 16-bit, ... converted), so any encoder and resampler accepts it."""
    if img.mode in ("L", "LA", "RGB", "RGBA"):
        return img
    has_alpha = img.mode in ("PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info)
    return img.convert("RGBA" if has_alpha else "RGB")


def _to_jpeg_mode(img: Image.Image) -> Image.Image:
    if img.mode in ("L", "RGB"):
        return img
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def encode_image(
    image: ImageLike,
    image_format: str = "keep",
    jpeg_quality: int = 95,
    max_size: Optional[int] = None,
    decoded: Optional[Image.Image] = None,
) -> EncodedImage:
    """Turn bytes / a PIL image / a uint8 array into the shard's image file (rules in the module docstring).

    ``decoded`` is ``image`` already decoded, when ``image`` is bytes. Raises :class:`CorruptImageError` for bytes
    PIL cannot decode, ``ValueError`` for an array of the wrong dtype or shape.
    """
    data: Optional[bytes] = None
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if decoded is None:
            try:
                decoded = decode_image(data)
            except Image.DecompressionBombError:
                raise
            except Exception as e:
                raise CorruptImageError(f"cannot decode image bytes ({e})") from e
        img = decoded
    elif isinstance(image, np.ndarray):
        img = _array_to_image(image)
    elif isinstance(image, Image.Image):
        img = image
    else:
        raise TypeError(f"image: got {type(image).__name__}; expected bytes, a PIL image or a uint8 numpy array")

    src_ext = KEEPABLE.get(img.format or "") if data is not None else None
    orientation = _orientation(img) if data is not None else 1
    too_big = max_size is not None and max(img.size) > max_size
    if src_ext is not None and image_format in ("keep", src_ext) and orientation == 1 and not too_big:
        return EncodedImage(data, src_ext, img.width, img.height)  # type: ignore[arg-type]

    target = image_format if image_format != "keep" else ("jpg" if src_ext == "jpg" else "png")
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    img = _normalize_mode(img)
    if too_big:
        scale = max_size / max(img.size)  # type: ignore[operator]
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if target == "jpg":
        _to_jpeg_mode(img).save(buf, format="JPEG", quality=jpeg_quality)
    else:
        img.save(buf, format="PNG")
    return EncodedImage(buf.getvalue(), target, img.width, img.height)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# ------------------------------------------------------------------------------------------------ writer


def shard_name(prefix: str, n: int) -> str:
    return f"{prefix}-{n:06d}.tar"


def existing_shard_files(output_dir: str | os.PathLike, prefix: str) -> list[Path]:
    """Files of the shard set ``prefix`` in ``output_dir``: its tars, leftover ``.tmp`` tars and its index."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(prefix)}-\d{{6,}}\.tar(\.tmp)?$")
    found = [p for p in folder.iterdir() if pattern.match(p.name)]
    idx = index_path(folder, prefix)
    if idx.exists():
        found.append(idx)
    return sorted(found)


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class ShardWriter:
    """Writes samples into ``{prefix}-NNNNNN.tar`` files in ``output_dir`` and the index when closed.

    Use as a context manager: a clean exit finishes the last tar and writes the index; an exception removes the
    tar in progress (its ``.tmp`` file) and writes no index. Shards finished before the exception stay, complete.
    Refuses (``FileExistsError``) to start over existing shards of the same prefix unless ``options.overwrite``,
    which deletes them first.
    """

    def __init__(self, output_dir: str | os.PathLike, prefix: str = DEFAULT_PREFIX,
                 options: Optional[WriterOptions] = None, skips: Optional[SkipLog] = None):
        check_prefix(prefix)
        self.options = (options or WriterOptions()).writer_options()  # a copy: checked, and not shared
        self.output_dir = Path(output_dir)
        self.prefix = prefix
        self.skips = skips if skips is not None else SkipLog()
        existing = existing_shard_files(self.output_dir, prefix)
        if existing and not self.options.overwrite:
            raise FileExistsError(
                f"{self.output_dir} already holds {len(existing)} file(s) of shard set {prefix!r} "
                f"(e.g. {existing[0].name}); set overwrite=true to replace them"
            )
        for path in existing:
            path.unlink()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.shards: list[ShardInfo] = []
        self.count = 0  # samples written so far (the next key)
        self.index: Optional[ShardIndex] = None  # set by close()
        self._file: Optional[io.BufferedWriter] = None
        self._tar: Optional[tarfile.TarFile] = None
        self._in_shard = 0

    # -- shards

    def _tmp_path(self) -> Path:
        return self.output_dir / (shard_name(self.prefix, len(self.shards)) + ".tmp")

    def _open_shard(self) -> None:
        self._file = open(self._tmp_path(), "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._in_shard = 0

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._file is not None
        tmp = self._tmp_path()
        final = self.output_dir / shard_name(self.prefix, len(self.shards))
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._tar = self._file = None
        os.replace(tmp, final)
        self.shards.append(ShardInfo(final.name, self._in_shard, final.stat().st_size))

    def _add(self, name: str, data: bytes) -> None:
        assert self._tar is not None
        self._tar.addfile(_tar_member(name, len(data)), io.BytesIO(data))

    # -- samples

    def write(self, sample: Sample) -> Optional[str]:
        """Add one sample; returns its key, or None when the image could not be used (counted in ``skips``)."""
        if self.index is not None:
            raise RuntimeError(f"shard writer {self.prefix!r} is closed")
        o = self.options
        try:
            enc = encode_image(sample.image, o.image_format, o.jpeg_quality, o.max_size, sample.decoded)
        except Image.DecompressionBombError:
            self.skips.add("image_too_large", sample.source_id or f"sample {self.count + self.skips.total}")
            return None
        except CorruptImageError:
            self.skips.add("corrupt_image", sample.source_id or f"sample {self.count + self.skips.total}")
            return None
        key = f"{self.count:09d}"
        caption = sample.caption if sample.caption is not None else ""
        meta = {k: v for k, v in sample.extra.items() if k not in RESERVED_FIELDS}
        meta.update(key=key, width=enc.width, height=enc.height, caption=caption, source=sample.source_id)
        return self.write_members({enc.ext: enc.data, "txt": caption.encode("utf-8")}, meta)

    def write_members(self, members: dict[str, bytes], meta: dict[str, Any]) -> str:
        """Add one sample made of ready member bytes by extension (``{"latent.npy": ..., "txt": ...}``) plus its
        json (``key`` is set here); returns the key. Used for derived shards such as cached latents."""
        if self.index is not None:
            raise RuntimeError(f"shard writer {self.prefix!r} is closed")
        key = f"{self.count:09d}"
        meta = dict(meta, key=key)
        meta_bytes = json.dumps(meta, ensure_ascii=False, sort_keys=True, default=_json_default).encode("utf-8")
        members = dict(members, json=meta_bytes)
        if self._tar is None:
            self._open_shard()
        for ext in sorted(members):
            self._add(f"{key}.{ext}", members[ext])
        self.count += 1
        self._in_shard += 1
        if self._in_shard >= self.options.max_samples_per_shard:
            self._finish_shard()
        return key

    def close(self) -> ShardIndex:
        """Finish the last tar and write ``<prefix>.shardindex.json``; returns the index (idempotent)."""
        if self.index is None:
            if self._tar is not None:
                self._finish_shard()
            self.index = ShardIndex(name=self.prefix, shards=list(self.shards), skipped=dict(self.skips.counts))
            write_index(self.output_dir, self.index)
        return self.index

    def abort(self) -> None:
        """Drop the tar in progress (delete its temporary file); write no index."""
        if self._tar is not None:
            try:
                self._tar.close()
            finally:
                self._file.close()  # type: ignore[union-attr]
                self._tar = self._file = None
        self._tmp_path().unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ------------------------------------------------------------------------------------------------ driver


@dataclass
class WriteSummary:
    """What one :func:`write_shards` call produced."""

    output_dir: Path
    prefix: str
    index: ShardIndex
    index_path: Path
    skips: SkipLog
    seconds: float

    @property
    def samples(self) -> int:
        return self.index.total_samples

    @property
    def total_bytes(self) -> int:
        return sum(s.filesize for s in self.index.shards)

    def format(self) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.prefix}: {len(self.index.shards)} shard(s), {self.samples} samples, "
            f"{self.total_bytes / 1e6:.2f} MB in {self.output_dir} ({self.seconds:.1f} s, {rate:.0f} samples/s); "
            f"index {self.index_path.name}\n"
            f"{self.prefix}: skipped {self.skips.total}: {self.skips.format()}"
        )


def write_shards(
    samples: Iterable[Sample],
    output_dir: str | os.PathLike,
    prefix: str = DEFAULT_PREFIX,
    options: Optional[WriterOptions] = None,
    *,
    skips: Optional[SkipLog] = None,
    total: Optional[int] = None,
    progress: bool = False,
) -> WriteSummary:
    """Write every sample of ``samples`` (a source, or any iterable of :class:`Sample`) as one shard set, as
    ``options`` says (defaults: :class:`WriterOptions`).

    ``skips`` defaults to the source's own ``skips`` log (so its skip reasons land in the index too), ``total``
    (for the progress bar) to its ``size_hint()``.
    """
    if skips is None:
        skips = getattr(samples, "skips", None) or SkipLog()
    if total is None and hasattr(samples, "size_hint"):
        total = samples.size_hint()  # type: ignore[attr-defined]
    start = time.perf_counter()
    writer = ShardWriter(output_dir, prefix, options, skips)
    with writer, tqdm(total=total, desc=prefix, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for sample in samples:
            writer.write(sample)
            bar.update(writer.count + skips.total - bar.n)  # inputs seen, written or skipped
            if bar.n % 256 == 0:
                bar.set_postfix(skipped=skips.total, refresh=False)
        bar.update(writer.count + skips.total - bar.n)
    index = writer.close()
    summary = WriteSummary(Path(output_dir), prefix, index, index_path(output_dir, prefix), skips,
                           time.perf_counter() - start)
    if not index.shards:
        log.warning("%s: no samples written to %s (skipped: %s)", prefix, output_dir, skips.format())
    return summary
