"""Preference pairs in the Pick-a-Pic layout: writing them as shards, and reading them back two images at a time.

The layout (Kirstain et al. 2023, "Pick-a-Pic"; the data Diffusion-DPO trains on), one sample per prompt and pair::

    000000042.jpg_0   the first image (bytes as given: JPEG in Pick-a-Pic, PNG for lossless sources; readers
    000000042.jpg_1   the second image               sniff the format, so the member name stays the layout's)
    000000042.txt     the caption, UTF-8
    000000042.json    {"key", "caption", "label_0", "label_1", "width_0", "height_0", "format_0", ..., extra columns}

``label_0`` is the probability that ``jpg_0`` is preferred: 1 (it won), 0 (``jpg_1`` won) or 0.5 (a tie);
``label_1 = 1 - label_0``.

**Clip pairs** (Diffusion-DPO on video) have ``mp4_0`` / ``mp4_1`` members instead (any container the video decoder
reads: ``webm_0``, ``gif_0``, ...; both of one pair the same kind), and the json adds ``num_frames_i`` / ``fps_i``.
They are written from raw frames (:class:`~data_pipeline.sources.VideoFrames`, encoded H.264 like every clip) or
video bytes with their probe (:class:`PreferenceSample` ``video_0`` / ``video_1``); the bundled example is
:func:`moving_digit_pair_samples` (``loom shards moving-digit-pairs``): a digit moving the captioned way is preferred
to the same digit moving the opposite way, so only the clips' motion tells winner from loser. A pair of an image
and a clip, or of two clips whose frame counts or frame sizes differ, is skipped as ``mismatched_clips`` (when
written, and when read from shards written elsewhere): the two sides of a pair must be comparable frame for frame.

**Writing** (``loom shards pairs input=pairs.jsonl``): a JSONL, CSV/TSV or parquet table with columns ``caption``,
``jpg_0``, ``jpg_1``, ``label_0`` (Pick-a-Pic's names; the caption column follows ``caption_column``), or ``mp4_0``,
``mp4_1`` instead of the image columns for clip pairs (video files of any container the loader decodes, kept as-is). An
image cell is a file path (relative to the table's folder), raw bytes (parquet binary, as in Pick-a-Pic's own parquet
files) or a ``{"bytes": ..., "path": ...}`` struct (Hugging Face ``datasets`` images). Rows are skipped and counted by
reason: ``bad_row`` (not an object, an image cell of an unknown kind, a flag that is not a boolean, or another column
holding text that is not UTF-8), ``missing_caption``, ``bad_caption`` (not UTF-8: a lone surrogate), ``missing_image``
(an absent cell or a path that is not there), ``corrupt_image``, ``image_too_large``, ``bad_label`` (``label_0`` absent
or outside [0, 1], ``label_1`` given but not a number in [0, 1]), and, read as Pick-a-Pic means them
(:func:`label_problem`): ``unlabelled`` (``has_label`` false: nobody chose), ``same_images`` (``are_different`` false:
the same image twice), ``inconsistent_labels`` (``label_0 + label_1`` not 1, such as both 1). Ties are written; readers
decide.

**Reading** (:func:`iter_preference_pairs`): one pass over the shards in order (the streaming loader's url syntax:
paths, braces, globs, ``pipe:``), both images decoded to ``resolution``² RGB the way the streaming loader decodes
(resize to cover, centre crop); both clips of a clip pair through the loader's video decoder
(:mod:`data_pipeline.video`) with the data config's ``video`` section (``num_frames`` frames at its stride or rate, the
centred clip, as the cache stage takes it), after both headers were probed and compared (``mismatched_clips``; the
decoder's own reasons, such as ``short_clip`` or ``corrupt_video``, are counted too). A pair with a missing or
undecodable image, bad json, no caption or a bad label is skipped and counted (the reasons above, ``bad_json`` also for
nesting too deep or text that is not UTF-8, ``duplicate_key`` for a sample with the key of the one before it, plus the
shard-level ``truncated_tar`` / ``unreadable_shard`` / ``empty_shard``); ties are dropped (counted as ``tie``) or kept,
by config. The DPO stage encodes what it reads once into cached latent pairs and trains on those through the ordinary
streaming loader (shuffle buffer, rank and worker split, exact resume), so the loader itself needs no two-image mode.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_pipeline.data_config import DataConfig
from data_pipeline.decoders import DecodeRequest, member_decoder
from data_pipeline.errors import SkipSample
from data_pipeline.index import index_path
from data_pipeline.sampletext import json_text_problem, text_problem
from data_pipeline.shardlists import resolve_sources
from data_pipeline.sources import BadVideoError, SkipLog, TableSource, VideoFrames, VideoInfo, decode_image
from data_pipeline.stream import close_shard, iter_groups, open_shard, read_meta, select_caption, text_checks
from data_pipeline.transforms import decode_image as decode_to_target
from data_pipeline.video import EXTENSIONS as VIDEO_EXTENSIONS
from data_pipeline.writer import (
    PAIR_TABLE_SUFFIXES,
    CorruptImageError,
    ShardWriter,
    WriterOptions,
    WriteSummary,
    encode_image,
    encode_video,
)

PAIR_IMAGE_COLUMNS = ("jpg_0", "jpg_1")  # the table columns and tar members of the two images
PAIR_VIDEO_COLUMNS = ("mp4_0", "mp4_1")  # the table columns of the two clips of a clip pair (any container)
LABEL_COLUMN = "label_0"
DEFAULT_PAIR_PREFIX = "pairs"
IMAGE_MEMBERS = (("jpg_0", "jpeg_0", "png_0", "webp_0"), ("jpg_1", "jpeg_1", "png_1", "webp_1"))
VIDEO_MEMBERS = tuple(tuple(f"{ext}_{i}" for ext in VIDEO_EXTENSIONS) for i in (0, 1))  # mp4_0, webm_0, ...
MISMATCH = "mismatched_clips"  # skip reason: an image against a clip, or clips of different frames or sizes
TIE = 0.5


@dataclass
class PreferenceSample:
    """One caption with two images and the preference between them, on its way into a shard."""

    image_0: Any  # encoded bytes, a PIL image or a uint8 array
    image_1: Any
    caption: str
    label_0: float  # probability that image_0 is preferred: 1, 0, or 0.5 (tie)
    extra: dict[str, Any] = field(default_factory=dict)  # more json fields
    source_id: str = ""  # where it came from (table:line)
    decoded_0: Optional[Image.Image] = None  # image_0 already decoded (when bytes)
    decoded_1: Optional[Image.Image] = None
    video_0: Optional[VideoInfo] = None  # set when image_0 holds a video file's bytes: its probe (a clip pair)
    video_1: Optional[VideoInfo] = None
    video_exts: tuple[str, str] = ("mp4", "mp4")  # member extensions kept video bytes are stored under (containers)

    @property
    def clips(self) -> tuple[bool, bool]:
        """Whether each side is a clip (raw frames or probed video bytes) rather than an image."""
        return (isinstance(self.image_0, VideoFrames) or self.video_0 is not None,
                isinstance(self.image_1, VideoFrames) or self.video_1 is not None)


def parse_label(value: Any) -> Optional[float]:
    """``label_0`` as a float in [0, 1], or None when it is missing or not a number in range."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        label = float(value)
    except (TypeError, ValueError):
        return None
    return label if math.isfinite(label) and 0.0 <= label <= 1.0 else None


_TRUE = ("true", "t", "yes", "y", "1")
_FALSE = ("false", "f", "no", "n", "0")
LABEL_SUM_TOLERANCE = 1e-6  # |label_0 + label_1 - 1| above this is inconsistent_labels


def _absent(value: Any) -> bool:
    """A cell with nothing in it: None, NaN (pandas / parquet), or blank text (CSV)."""
    return value is None or (isinstance(value, float) and value != value) or (isinstance(value, str)
                                                                                and not value.strip())


def parse_flag(value: Any) -> Optional[bool]:
    """A boolean column (``has_label``, ``are_different``): ``True`` / ``False`` from a bool, 0/1, or text such as
    ``"false"``, ``"True"``, ``"0"``; None when the cell is empty. Raises ``ValueError`` for anything else."""
    if _absent(value):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, (str, bytes)):
        text = (value.decode("utf-8", "replace") if isinstance(value, bytes) else value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError(f"{value!r} is not a boolean")


def label_problem(row: dict[str, Any], label_0: float) -> Optional[tuple[str, str]]:
    """``(reason, detail)`` when a Pick-a-Pic row (a table row or a shard's json) with a valid ``label_0`` is not a
    usable preference, else None; the checks, in order:

    * ``has_label`` false → ``unlabelled`` (the rater chose nothing; Pick-a-Pic stores 0.5/0.5 for these);
    * ``are_different`` false → ``same_images`` (the same image twice: no preference to learn);
    * ``label_1`` present but not a number in [0, 1] → ``bad_label``; ``label_0 + label_1`` not 1 (both 1, both 0,
      ...) → ``inconsistent_labels`` (never "repaired" by recomputing ``label_1``).

    A flag that is neither true nor false is ``bad_row``. Absent columns (the minimal layout: ``label_0`` only)
    pass."""
    for column, reason, meaning in (("has_label", "unlabelled", "no preference was recorded"),
                                    ("are_different", "same_images", "the two images are the same")):
        try:
            flag = parse_flag(row.get(column))
        except ValueError as e:
            return "bad_row", f"{column}: {e}"
        if flag is False:
            return reason, f"{column} is false: {meaning}"
    raw_1 = row.get("label_1")
    if _absent(raw_1):
        return None
    label_1 = parse_label(raw_1)
    if label_1 is None:
        return "bad_label", f"label_1={raw_1!r}"
    if abs(label_0 + label_1 - 1.0) > LABEL_SUM_TOLERANCE:
        return "inconsistent_labels", f"label_0={label_0:g} + label_1={label_1:g} is not 1"
    return None


# --------------------------------------------------------------------------------------------- table source


class PairTableSource:
    """Rows of a JSONL / CSV / TSV / parquet table of preference pairs (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, caption_column: str = "caption", allow_empty_caption: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"input: {str(path)!r} is not a file (a pairs source needs a .jsonl, .csv or .parquet)")
        suffix = self.path.suffix.lower()
        if suffix not in PAIR_TABLE_SUFFIXES:
            raise ValueError(f"input: {str(path)!r} has suffix {suffix!r}; allowed: "
                             f"{', '.join(sorted(PAIR_TABLE_SUFFIXES))}")
        self.kind = PAIR_TABLE_SUFFIXES[suffix]
        self.caption_column = caption_column
        self.allow_empty_caption = allow_empty_caption
        self.skips = SkipLog()
        self.ties = 0  # tie rows yielded
        self._table: Optional[TableSource] = None
        if self.kind != "parquet":  # the plain-table reader checks CSV headers and parses lines
            first_column = PAIR_IMAGE_COLUMNS[0]
            if self.kind != "jsonl":
                import csv

                with self.path.open(newline="", encoding="utf-8-sig") as f:
                    header = csv.DictReader(f, delimiter="\t" if self.kind == "tsv" else ",").fieldnames or []
                columns = PAIR_VIDEO_COLUMNS if set(PAIR_VIDEO_COLUMNS) <= set(header) else PAIR_IMAGE_COLUMNS
                first_column = columns[0]
                missing = [c for c in (*columns, LABEL_COLUMN) if c not in header]
                if missing:
                    raise ValueError(f"input: {self.path} has no column {', '.join(map(repr, missing))} "
                                     f"(columns: {', '.join(header)}); a pairs table needs "
                                     f"{caption_column}, jpg_0, jpg_1 (or mp4_0, mp4_1 for clips), label_0")
            self._table = TableSource(self.path, first_column, caption_column, allow_empty_caption)

    def size_hint(self) -> int:
        if self._table is not None:
            return self._table.size_hint()
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.path).metadata.num_rows

    def _rows(self) -> Iterator[tuple[str, Optional[dict[str, Any]]]]:
        if self._table is not None:
            for lineno, row in self._table._rows():
                yield f"{self.path.name}:{lineno}", row
            return
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ValueError("input: reading parquet needs pyarrow (pip install pyarrow)") from e
        parquet = pq.ParquetFile(self.path)
        n = 0
        for batch in parquet.iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield f"{self.path.name}:row {n}", row
                n += 1

    def _image(self, cell: Any, where: str) -> Optional[tuple[Any, Optional[Image.Image]]]:
        """(image, decoded) from a path / bytes / struct cell; None after counting why it is unusable."""
        if isinstance(cell, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
            cell = cell.get("bytes") or cell.get("path")
        if cell is None or (isinstance(cell, str) and not cell.strip()):
            self.skips.add("missing_image", where)
            return None
        if isinstance(cell, (bytes, bytearray, memoryview)):
            data = bytes(cell)
        elif isinstance(cell, str):
            try:
                data = (self.path.parent / cell.strip()).read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                self.skips.add("missing_image", f"{where} {cell.strip()}")
                return None
        else:
            self.skips.add("bad_row", f"{where} (image cell of type {type(cell).__name__})")
            return None
        try:
            return data, decode_image(data)
        except Image.DecompressionBombError:
            self.skips.add("image_too_large", where)
        except Exception:  # PIL raises many kinds on broken files
            self.skips.add("corrupt_image", where)
        return None

    def _video(self, cell: Any, where: str) -> Optional[tuple[bytes, VideoInfo, str]]:
        """(bytes, probe, container extension) of a clip cell (path / bytes / struct); None after counting why it
        is unusable (``missing_image``, or the video prober's reason)."""
        from data_pipeline.sources import probe_video

        if isinstance(cell, dict):
            cell = cell.get("bytes") or cell.get("path")
        ext = "mp4"
        if _absent(cell):
            self.skips.add("missing_image", f"{where} (no clip)")
            return None
        if isinstance(cell, (bytes, bytearray, memoryview)):
            data = bytes(cell)
        elif isinstance(cell, str):
            try:
                data = (self.path.parent / cell.strip()).read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                self.skips.add("missing_image", f"{where} {cell.strip()}")
                return None
            suffix = Path(cell.strip()).suffix.lower().lstrip(".")
            ext = suffix if suffix in VIDEO_EXTENSIONS else ext
        else:
            self.skips.add("bad_row", f"{where} (clip cell of type {type(cell).__name__})")
            return None
        try:
            return data, probe_video(data), ext
        except BadVideoError as e:
            self.skips.add(e.reason, f"{where} ({e})")
            return None

    def __iter__(self) -> Iterator[PreferenceSample]:
        for where, row in self._rows():
            if row is None:
                self.skips.add("bad_row", where)
                continue
            caption = row.get(self.caption_column)
            caption = "" if caption is None or (isinstance(caption, float) and caption != caption) \
                else str(caption).strip()
            problem = text_problem(caption)
            if problem:
                self.skips.add("bad_caption", f"{where} (caption {problem})")
                continue
            if not caption and not self.allow_empty_caption:
                self.skips.add("missing_caption", where)
                continue
            label = parse_label(row.get(LABEL_COLUMN))
            if label is None:
                self.skips.add("bad_label", f"{where} ({LABEL_COLUMN}={row.get(LABEL_COLUMN)!r})")
                continue
            refusal = label_problem(row, label)
            if refusal is not None:
                self.skips.add(refusal[0], f"{where} ({refusal[1]})")
                continue
            extra = {k: v for k, v in row.items()
                     if k not in (*PAIR_IMAGE_COLUMNS, *PAIR_VIDEO_COLUMNS, self.caption_column, LABEL_COLUMN)
                     and k and not isinstance(v, (bytes, bytearray, dict))}
            problem = json_text_problem(extra)
            if problem:
                self.skips.add("bad_row", f"{where} ({problem})")
                continue
            if _absent(row.get(PAIR_IMAGE_COLUMNS[0])) and not _absent(row.get(PAIR_VIDEO_COLUMNS[0])):
                clips = []
                for column in PAIR_VIDEO_COLUMNS:
                    clip = self._video(row.get(column), where)
                    if clip is None:
                        break
                    clips.append(clip)
                if len(clips) < 2:
                    continue
                self.ties += label == TIE
                yield PreferenceSample(clips[0][0], clips[1][0], caption, label, extra, where, video_0=clips[0][1],
                                       video_1=clips[1][1], video_exts=(clips[0][2], clips[1][2]))
                continue
            first = self._image(row.get(PAIR_IMAGE_COLUMNS[0]), where)
            if first is None:
                continue
            second = self._image(row.get(PAIR_IMAGE_COLUMNS[1]), where)
            if second is None:
                continue
            self.ties += label == TIE
            yield PreferenceSample(first[0], second[0], caption, label, extra, where, first[1], second[1])


# ------------------------------------------------------------------------------------------------- writer


@dataclass
class PairWriteSummary:
    """What :func:`write_preference_shards` produced: the shard summary plus how many pairs are ties."""

    summary: WriteSummary
    ties: int

    @property
    def samples(self) -> int:
        return self.summary.samples

    def format(self) -> str:
        return self.summary.format() + f"\n{self.summary.prefix}: {self.ties} of the {self.samples} pairs are ties " \
                                       "(label_0 = 0.5; the dpo stage drops or keeps them: dpo.ties)"


def write_preference_shards(
    samples: Iterable[PreferenceSample],
    output_dir: str | os.PathLike,
    prefix: str = DEFAULT_PAIR_PREFIX,
    options: Optional[WriterOptions] = None,
    *,
    skips: Optional[SkipLog] = None,
    progress: bool = False,
) -> PairWriteSummary:
    """Write preference pairs as Pick-a-Pic-layout shards + a shard index (skip counts land in the index), as
    ``options`` says (defaults: :class:`~data_pipeline.writer.WriterOptions`)."""
    if skips is None:
        skips = getattr(samples, "skips", None) or SkipLog()
    total = samples.size_hint() if hasattr(samples, "size_hint") else None  # type: ignore[attr-defined]
    start = time.perf_counter()
    ties = 0
    writer = ShardWriter(output_dir, prefix, options, skips)
    o = writer.options
    with writer, tqdm(total=total, desc=prefix, unit="pair", disable=not progress, dynamic_ncols=True) as bar:
        for s in samples:
            problem = text_problem(s.caption)
            refusal = ("bad_caption", f"caption {problem}") if problem else label_problem(s.extra, s.label_0)
            if refusal is not None:  # samples built in code meet the table's rules too
                skips.add(refusal[0], f"{s.source_id} ({refusal[1]})")
                bar.update(writer.count + skips.total - bar.n)
                continue
            meta = {k: v for k, v in s.extra.items() if k not in ("key", "caption", "label_0", "label_1", "source")}
            meta.update(caption=s.caption, label_0=s.label_0, label_1=1.0 - s.label_0, source=s.source_id)
            if any(s.clips):
                encoded = _encode_clip_pair(s, o, skips)
                if encoded is None:
                    continue
                members, fields = encoded
                meta.update(fields)
            else:
                try:
                    enc = [encode_image(img, o.image_format, o.jpeg_quality, o.max_size, dec)
                           for img, dec in ((s.image_0, s.decoded_0), (s.image_1, s.decoded_1))]
                except Image.DecompressionBombError:
                    skips.add("image_too_large", s.source_id)
                    continue
                except CorruptImageError:
                    skips.add("corrupt_image", s.source_id)
                    continue
                for i, e in enumerate(enc):
                    meta.update({f"width_{i}": e.width, f"height_{i}": e.height, f"format_{i}": e.ext})
                members = {"jpg_0": enc[0].data, "jpg_1": enc[1].data}
            try:
                writer.write_members({**members, "txt": s.caption.encode("utf-8")}, meta)
            except SkipSample as e:  # json that cannot be written (checked before anything reaches the tar)
                skips.add(e.reason, f"{s.source_id} ({e.detail})")
                continue
            ties += s.label_0 == TIE
            bar.update(writer.count + skips.total - bar.n)  # inputs seen, written or skipped
        bar.update(writer.count + skips.total - bar.n)
    index = writer.close()
    summary = WriteSummary(Path(output_dir), prefix, index, index_path(output_dir, prefix), skips,
                           time.perf_counter() - start)
    return PairWriteSummary(summary, ties)


def _encode_clip_pair(s: PreferenceSample, o: WriterOptions, skips: SkipLog
                      ) -> Optional[tuple[dict[str, bytes], dict[str, Any]]]:
    """The two clip members (``mp4_0``, ``mp4_1``, or the kept files' own containers) and their json fields; None
    after counting why the pair cannot be written (an image against a clip, clips that differ in frames or size,
    a video the writer refuses)."""
    if not all(s.clips):
        skips.add(MISMATCH, f"{s.source_id} (an image against a clip: {'clip' if s.clips[0] else 'image'}_0, "
                            f"{'clip' if s.clips[1] else 'image'}_1)")
        return None
    options = dataclasses.replace(o, split_scenes=False)  # one clip per side, whatever the shard options say
    encoded = []
    for i, (video, info) in enumerate(((s.image_0, s.video_0), (s.image_1, s.video_1))):
        try:
            clips, _ = encode_video(video, options, info, s.video_exts[i])
        except BadVideoError as e:
            skips.add(e.reason, f"{s.source_id} (clip {i}: {e})")
            return None
        encoded.append(clips[0])
    shapes = [(e.info.num_frames, e.info.width, e.info.height) for e in encoded]
    if shapes[0] != shapes[1]:
        skips.add(MISMATCH, f"{s.source_id} (clip 0: {_shape_text(shapes[0])}, clip 1: {_shape_text(shapes[1])})")
        return None
    members, fields = {}, {}
    for i, e in enumerate(encoded):
        members[f"{e.ext}_{i}"] = e.data
        fields.update({f"width_{i}": e.info.width, f"height_{i}": e.info.height, f"format_{i}": e.ext,
                       f"num_frames_{i}": e.info.num_frames, f"fps_{i}": e.info.fps})
    return members, fields


def _shape_text(shape: tuple[int, ...]) -> str:
    return f"{shape[0]} frames of {shape[1]}x{shape[2]}"


# ------------------------------------------------------------------------------------------------- reader


@dataclass
class PreferencePair:
    """A decoded pair: both images ``(H, W, 3)`` (or both clips ``(T, H, W, 3)``) uint8 at the target size, the
    caption and ``label_0``."""

    key: str
    url: str
    caption: str
    image_0: np.ndarray
    image_1: np.ndarray
    label_0: float
    meta: dict[str, Any]

    @property
    def winner_is_0(self) -> bool:
        return self.label_0 >= TIE

    @property
    def strength(self) -> float:
        """Probability that the winner is preferred: 1 for a clear choice, 0.5 for a tie."""
        return max(self.label_0, 1.0 - self.label_0)

    def ordered(self) -> tuple[np.ndarray, np.ndarray]:
        """(winner, loser); for a tie jpg_0 comes first."""
        return (self.image_0, self.image_1) if self.winner_is_0 else (self.image_1, self.image_0)


def parse_pair(cfg: DataConfig, key: str, url: str, members: dict[str, bytes], ties: str, skips: SkipLog
               ) -> Optional[PreferencePair]:
    """One tar sample → a decoded pair, or None after counting why not."""
    where = f"{url} {key}"
    meta, why = read_meta(members)
    if meta is None:
        skips.add("bad_json", f"{where} ({why})")
        return None
    caption = select_caption(cfg.caption_keys, members, meta)
    reason, detail = text_checks(members, meta, caption)
    if reason is not None:
        skips.add(reason, f"{where} ({detail})")
        return None
    if not caption and cfg.require_caption:
        skips.add("missing_caption", where)
        return None
    raw_label = meta.get(LABEL_COLUMN, members.get(LABEL_COLUMN, b"").decode("utf-8", "replace").strip() or None)
    label = parse_label(raw_label)
    if label is None:
        skips.add("bad_label", where)
        return None
    refusal = label_problem(meta, label)
    if refusal is not None:
        skips.add(refusal[0], f"{where} ({refusal[1]})")
        return None
    if label == TIE and ties == "drop":
        skips.add("tie", where)
        return None
    found = []
    for image_names, video_names in zip(IMAGE_MEMBERS, VIDEO_MEMBERS):
        name = next((n for n in (*image_names, *video_names) if n in members), None)
        if name is None:
            skips.add("missing_image", f"{where} (no {image_names[0]} or {video_names[0]})")
            return None
        found.append(name)
    clips = [n in VIDEO_MEMBERS[i] for i, n in enumerate(found)]
    if clips[0] != clips[1]:
        skips.add(MISMATCH, f"{where} (an image against a clip: {found[0]}, {found[1]})")
        return None
    if clips[0]:
        pixels = _decode_clip_pair(cfg, [(n, members[n]) for n in found], where, skips)
        if pixels is None:
            return None
        return PreferencePair(key, url, caption, pixels[0], pixels[1], label, meta)
    images = []
    for name in found:
        try:
            images.append(decode_to_target(members[name], (cfg.resolution, cfg.resolution), "center",
                                           draft=cfg.jpeg_draft).pixels)
        except Exception:  # truncated or garbage bytes: PIL raises many kinds
            skips.add("corrupt_image", f"{where} ({name})")
            return None
    return PreferencePair(key, url, caption, images[0], images[1], label, meta)


def _decode_clip_pair(cfg: DataConfig, clips: list[tuple[str, bytes]], where: str, skips: SkipLog
                      ) -> Optional[list[np.ndarray]]:
    """Both clips of a pair as ``(T, resolution, resolution, 3)`` uint8 (``T = cfg.video.num_frames``, the centred
    clip), or None after counting why not: a header the decoder refuses (its reason), headers that disagree on the
    frames available or the frame size (``mismatched_clips``), a clip that fails to decode (its reason)."""
    shapes = []
    for name, data in clips:
        decoder = member_decoder(name.rsplit("_", 1)[0])
        try:
            shapes.append(decoder.probe(data, cfg))  # (frames available for a clip, h, w)
        except SkipSample as e:
            skips.add(e.reason, f"{where} ({name}: {e.detail})")
            return None
        except Exception as e:  # noqa: BLE001 - a damaged container
            skips.add("corrupt_video", f"{where} ({name}: {str(e)[:80]})")
            return None
    if shapes[0] != shapes[1]:
        skips.add(MISMATCH, f"{where} ({clips[0][0]}: {_shape_text(shapes[0])}, {clips[1][0]}: "
                            f"{_shape_text(shapes[1])})")
        return None
    video = dataclasses.replace(cfg.video, clip_start="center")  # the same frames of both clips
    request = DecodeRequest((cfg.video.num_frames, cfg.resolution, cfg.resolution), "center", video=video)
    out = []
    for name, data in clips:
        try:
            out.append(member_decoder(name.rsplit("_", 1)[0]).decode(data, request).pixels)
        except SkipSample as e:
            skips.add(e.reason, f"{where} ({name}: {e.detail})")
            return None
        except Exception as e:  # noqa: BLE001
            skips.add("corrupt_video", f"{where} ({name}: {str(e)[:80]})")
            return None
    return out


def iter_preference_pairs(
    cfg: DataConfig, ties: Literal["drop", "keep"] = "drop", skips: Optional[SkipLog] = None
) -> Iterator[PreferencePair]:
    """Every usable pair of the shards ``cfg`` names, once, in shard order (see the module docstring); bad pairs
    and dropped ties are counted in ``skips``."""
    if ties not in ("drop", "keep"):
        raise ValueError(f"ties: got {ties!r}; allowed: drop, keep")
    skips = skips if skips is not None else SkipLog()
    for source in resolve_sources(cfg.source_list()):
        for url in source.urls:
            fh = None
            try:
                fh = open_shard(url)
            except OSError as e:
                skips.add("unreadable_shard", f"{url} ({e})")
                continue
            try:
                for item in iter_groups(fh, lambda g: True):
                    if item[0] == "error":
                        skips.add(item[1], f"{url} ({item[2][:80]})")
                        break
                    kind, _, key, members = item
                    if kind == "duplicate":
                        skips.add("duplicate_key", f"{url} {key} (same key as the pair before it, which is kept)")
                        continue
                    pair = parse_pair(cfg, key, url, members, ties, skips)
                    if pair is not None:
                        yield pair
            finally:
                close_shard(fh)


# ------------------------------------------------------------------------------------- bundled clip pairs

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}  # the rejected clip's direction


def moving_digit_pair_samples(split: str, seed: int = 0, val_fraction: float = 0.1, *,
                              directions: Optional[Iterable[str]] = None, limit: Optional[int] = None
                              ) -> list[PreferenceSample]:
    """Clip preference pairs from the moving-digits set (:mod:`data_pipeline.moving_digits`), one per digit of
    ``split`` (the demo set's stratified split, the clip set's seeded directions): the caption names the digit's
    direction (``"a handwritten digit three moving left"``); the preferred clip is that digit moving that way, the
    rejected one the same digit moving the opposite way (the same frames in reverse order), so only the motion tells
    them apart. Which side (``mp4_0`` or ``mp4_1``) holds the winner is a seeded coin, recorded in ``label_0``.
    ``directions`` keeps only the digits whose (captioned) direction is listed; ``limit``: at most that many pairs,
    in dataset order."""
    from data_pipeline import moving_digits as md
    from data_pipeline.demo import SPLITS, _digits, caption_for_digit, stratified_split

    if split not in SPLITS:
        raise ValueError(f"split: got {split!r}; allowed: {', '.join(SPLITS)}")
    images, labels = _digits()
    train_idx, val_idx = stratified_split(labels, seed, val_fraction)
    dirs = md.directions(len(labels), seed)
    first = np.random.default_rng((seed, 2)).integers(0, 2, len(labels))  # 1: the winner is mp4_0
    keep = set(md.DIRECTIONS if directions is None else directions)
    unknown = sorted(keep - set(md.DIRECTIONS))
    if unknown:
        raise ValueError(f"directions: {unknown} unknown; allowed: {', '.join(md.DIRECTIONS)}")
    out: list[PreferenceSample] = []
    for i in train_idx if split == "train" else val_idx:
        label, direction = int(labels[i]), md.DIRECTIONS[int(dirs[i])]
        if direction not in keep:
            continue
        if limit is not None and len(out) >= limit:
            break
        rejected = OPPOSITE[direction]
        good = VideoFrames(md.clip_frames(images[i], direction), md.FPS)
        bad = VideoFrames(md.clip_frames(images[i], rejected), md.FPS)
        pair = (good, bad) if first[i] else (bad, good)
        extra = {"label": label, "digit": caption_for_digit(label).split()[-1], "direction": direction,
                 "rejected_direction": rejected, "split": split, "index": int(i)}
        out.append(PreferenceSample(pair[0], pair[1], md.caption_for(label, direction), float(first[i]), extra,
                                    f"sklearn-digits/{int(i)}/{direction}-over-{rejected}"))
    return out


def build_moving_digit_pairs(
    output_dir: str | os.PathLike,
    seed: int = 0,
    val_fraction: float = 0.1,
    max_samples_per_shard: int = 1000,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, PairWriteSummary]:
    """Write :func:`moving_digit_pair_samples` as ``train-*.tar`` / ``val-*.tar`` clip-pair shards (H.264 mp4 at the
    moving-digits codec settings) with their indexes; refuses, before writing anything, when either split's files
    exist and ``overwrite`` is off."""
    from data_pipeline.demo import SPLITS, demo_output_files
    from data_pipeline.moving_digits import CRF
    from data_pipeline.writer import existing_shard_files

    if not overwrite:
        existing = demo_output_files(output_dir)
        if existing:
            raise FileExistsError(f"{output_dir} already holds shards (e.g. {existing[0].name}); "
                                  "set overwrite=true to replace them")
    else:
        for path in existing_shard_files(output_dir, "val"):  # a stale val set must not outlive val_fraction=0
            path.unlink()
    options = WriterOptions(max_samples_per_shard, overwrite=overwrite, video_crf=CRF)
    return {split: write_preference_shards(moving_digit_pair_samples(split, seed, val_fraction), output_dir, split,
                                           options, skips=SkipLog(), progress=progress)
            for split in SPLITS if split == "train" or val_fraction > 0}


__all__ = [
    "DEFAULT_PAIR_PREFIX", "MISMATCH", "PairTableSource", "PairWriteSummary", "PreferencePair", "PreferenceSample",
    "build_moving_digit_pairs", "iter_preference_pairs", "label_problem", "moving_digit_pair_samples", "parse_flag",
    "parse_label", "parse_pair", "write_preference_shards",
]
