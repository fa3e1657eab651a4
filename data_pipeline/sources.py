"""Where shard samples come from: a folder of images and videos with caption files, a JSONL/CSV table, or the
demo digits.

Every source is an iterable of :class:`Sample` with a :class:`SkipLog` (``source.skips``) that counts what it had
to leave out, by reason, with a few example paths. Sources decode each image once with PIL (``Image.open(...)
.load()``) so a broken file is caught here, counted as ``corrupt_image``, and never reaches a shard; the decoded
image travels with the sample so the writer does not decode it again.

Videos (``VIDEO_SUFFIXES``: mp4, webm, mov, mkv, avi, gif) are probed with PyAV (:func:`probe_video`: every
packet demuxed, which counts the frames and finds a truncated container, and the first frame decoded, which proves
the codec decodes and gives the rotation); the probe travels with the sample as ``Sample.video`` and becomes the
sample's json fields (:data:`VIDEO_FIELDS`). Video skip reasons: ``corrupt_video`` (PyAV cannot open or demux it,
or its first frame does not decode), ``audio_only`` (no video stream, an audio one), ``no_frames`` (a video
stream without one decodable frame), ``unsupported_codec`` (no decoder in this FFmpeg build), ``bad_metadata``
(no usable frame rate or size).

Skip reasons used here: ``missing_caption`` (no caption file, or an empty caption), ``missing_image`` (a table
row names a file that is not there), ``corrupt_image`` (PIL cannot decode it), ``image_too_large`` (PIL's
decompression-bomb guard), ``bad_caption`` (a caption file that is not UTF-8, or a table's caption holding a lone
surrogate), ``bad_metadata`` (a side-car ``.json`` that is not a JSON object, nests deeper than
:data:`~data_pipeline.sampletext.MAX_JSON_DEPTH` levels or holds a string that is not UTF-8), ``bad_row`` (a table
line that is not a JSON object or nests too deep, lacks the image column, or has a column holding a string that is
not UTF-8).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
from PIL import Image

from data_pipeline.sampletext import json_text_problem, parse_json_object, text_problem

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")  # kept under their own extension in a shard
VIDEO_FIELDS = ("width", "height", "fps", "num_frames", "duration", "rotation", "codec")  # json fields of a video
MAX_VIDEO_FPS = 1000.0  # a probed frame rate above this (or <= 0) is bad_metadata
MEDIA_SUFFIXES = IMAGE_SUFFIXES + VIDEO_SUFFIXES
TABLE_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}
MAX_SKIP_EXAMPLES = 3

@dataclass
class VideoFrames:
    """Raw frames of a clip to be encoded by the writer (H.264 in mp4), e.g. a synthetic clip."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    fps: float  # frames per second of the clip

    def __post_init__(self) -> None:
        f = self.frames
        if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3 or not len(f):
            what = f"{f.dtype} {f.shape}" if isinstance(f, np.ndarray) else type(f).__name__
            raise ValueError(f"video frames: got {what}; expected a uint8 array (T >= 1, H, W, 3)")
        if not (isinstance(self.fps, (int, float)) and 0 < self.fps <= MAX_VIDEO_FPS):
            raise ValueError(f"video fps: got {self.fps!r}; expected a number in (0, {MAX_VIDEO_FPS:g}]")


ImageLike = Union[bytes, Image.Image, np.ndarray, VideoFrames]


@dataclass
class VideoInfo:
    """What a probe learns about a video; its :meth:`fields` are the sample's json (the shared video contract)."""

    width: int  # pixels, as stored (before rotation)
    height: int  # pixels, as stored (before rotation)
    fps: float  # average frames per second
    num_frames: int  # frames in the video stream (packets demuxed, or frames encoded)
    duration: float  # seconds, first frame's start to last frame's end
    rotation: int  # degrees counter-clockwise to turn the stored frames for display (0, 90, 180, 270)
    codec: str  # FFmpeg decoder name: h264, hevc, vp9, av1, gif, mpeg4, ...

    def fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in VIDEO_FIELDS}


@dataclass
class Sample:
    """One image–text (or video–text) pair on its way into a shard."""

    image: ImageLike  # encoded bytes (kept as-is when allowed), a PIL image, a uint8 array (H, W[, C]), or frames
    caption: str  # the text, UTF-8 in the shard's ``.txt``
    extra: dict[str, Any] = field(default_factory=dict)  # more json fields (metadata columns, labels, ...)
    source_id: str = ""  # where it came from (path, row, dataset index); the json's "source" field
    decoded: Optional[Image.Image] = None  # ``image`` already decoded (a source's validation pass), if bytes
    video: Optional[VideoInfo] = None  # set when ``image`` holds a video file's bytes: the source's probe of it
    video_ext: str = "mp4"  # the member extension a kept video file is stored under (its own suffix)

    @property
    def is_video(self) -> bool:
        return self.video is not None or isinstance(self.image, VideoFrames)


class SkipLog:
    """Counts of skipped inputs by reason, with the first few examples of each."""

    def __init__(self, max_examples: int = MAX_SKIP_EXAMPLES):
        self.max_examples = max_examples
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(example)

    def add_counts(self, counts: dict[str, int]) -> None:
        """Add counts by reason from elsewhere (a loader's ``stats()["skipped"]``), without examples."""
        for reason, n in counts.items():
            if n:
                self.counts[reason] = self.counts.get(reason, 0) + int(n)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def format(self) -> str:
        """``"corrupt_image 2 (e.g. a.jpg, b.png); missing_caption 1 (e.g. c.png)"``, or ``"nothing"``."""
        if not self.counts:
            return "nothing"
        parts = []
        for reason in sorted(self.counts):
            shown = ", ".join(self.examples.get(reason, []))
            more = ", ..." if self.counts[reason] > len(self.examples.get(reason, [])) else ""
            parts.append(f"{reason} {self.counts[reason]} (e.g. {shown}{more})" if shown else
                         f"{reason} {self.counts[reason]}")
        return "; ".join(parts)


def decode_image(data: bytes) -> Image.Image:
    """Fully decode ``data`` with PIL (``load()``, not just the header); raises on a broken or truncated file."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


class BadVideoError(ValueError):
    """A video that cannot go into a shard; ``reason`` is its skip reason (module docstring)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _normal_rotation(degrees: Any) -> int:
    """Any angle → 0, 90, 180 or 270 (the nearest quarter turn, counter-clockwise)."""
    try:
        return int(round(float(degrees) / 90.0)) % 4 * 90
    except (TypeError, ValueError, OverflowError):
        return 0


def probe_video(data: bytes) -> VideoInfo:
    """Width, height, fps, frame count, duration, rotation and codec of a video file's bytes (no temporary file).

    Demuxes every packet of the first video stream (counting the frames; cheap, no decoding) and decodes until the
    first frame (the codec works; the rotation of its display matrix). Raises :class:`BadVideoError`.
    """
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as e:  # av.error.InvalidDataError, EOFError, ... : not a container FFmpeg can read
        raise BadVideoError("corrupt_video", f"cannot open the container ({e})") from e
    with container:
        if not container.streams.video:
            if container.streams.audio:
                raise BadVideoError("audio_only", "an audio stream and no video stream")
            raise BadVideoError("corrupt_video", "no video stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        codec = ctx.name if ctx is not None else ""
        try:
            av.codec.Codec(codec, "r")
        except Exception as e:
            raise BadVideoError("unsupported_codec", f"no decoder for codec {codec or '?'!r} ({e})") from e
        count, first, end, frame = 0, None, None, None
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's final flush packet
                    continue
                count += 1
                if packet.pts is not None:
                    first = packet.pts if first is None else min(first, packet.pts)
                    stop = packet.pts + (packet.duration or 0)
                    end = stop if end is None else max(end, stop)
                if frame is None:
                    frames = packet.decode()
                    frame = frames[0] if frames else None
            if frame is None:
                frames = ctx.decode(None)  # flush: a decoder with delay gives its first frame only now
                frame = frames[0] if frames else None
        except BadVideoError:
            raise
        except Exception as e:
            raise BadVideoError("corrupt_video", f"demuxing or decoding failed after {count} packets ({e})") from e
        if count == 0:
            raise BadVideoError("corrupt_video", "a video stream without one packet (a truncated file?)")
        if frame is None:
            raise BadVideoError("no_frames", f"no decodable frame in {count} packets")
        width, height = ctx.width or frame.width, ctx.height or frame.height
        duration = float((end - first) * stream.time_base) if first is not None and stream.time_base else 0.0
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else (count / duration if duration > 0 else 0.0)
        if not (0 < fps <= MAX_VIDEO_FPS) or width < 1 or height < 1:
            raise BadVideoError("bad_metadata", f"fps {fps!r}, size {width}x{height}")
        if duration <= 0:
            duration = count / fps
        return VideoInfo(int(width), int(height), round(fps, 6), count, round(duration, 6),
                         _normal_rotation(getattr(frame, "rotation", 0)), codec)


def iter_video_frames(data: bytes, fps: float) -> Iterator[tuple[float, Any]]:
    """``(seconds since the first frame, av.VideoFrame)`` for every frame of the first video stream of ``data``, in
    presentation order; a frame without a timestamp takes the previous one's plus ``1 / fps``. Decoding errors
    propagate (PyAV's exceptions)."""
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        t0: Optional[float] = None
        prev = -1.0 / fps
        for frame in container.decode(stream):
            t = frame.time
            if t is None:
                t = prev + 1.0 / fps + (t0 or 0.0)
            if t0 is None:
                t0 = t
            prev = t - t0
            yield prev, frame


def _read_video(path: Path, skips: SkipLog, example: str) -> Optional[tuple[bytes, VideoInfo]]:
    """The file's bytes and probe, or None after logging why it cannot be used."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        skips.add("missing_image", example)
        return None
    try:
        return data, probe_video(data)
    except BadVideoError as e:
        skips.add(e.reason, example)
    return None


def _read_media(path: Path, caption: str, extra: dict[str, Any], source_id: str, skips: SkipLog,
                example: str) -> Optional[Sample]:
    """A :class:`Sample` for an image or video file (by suffix), or None after logging why not."""
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        loaded_video = _read_video(path, skips, example)
        if loaded_video is None:
            return None
        data, info = loaded_video
        return Sample(image=data, caption=caption, extra=extra, source_id=source_id, video=info,
                      video_ext=suffix[1:])
    loaded = _read_image(path, skips, example)
    if loaded is None:
        return None
    data, img = loaded
    return Sample(image=data, caption=caption, extra=extra, source_id=source_id, decoded=img)


def _read_image(path: Path, skips: SkipLog, example: str) -> Optional[tuple[bytes, Image.Image]]:
    """The file's bytes and decoded image, or None after logging why it cannot be used."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        skips.add("missing_image", example)
        return None
    try:
        return data, decode_image(data)
    except Image.DecompressionBombError:
        skips.add("image_too_large", example)
    except Exception:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ValueError, ...)
        skips.add("corrupt_image", example)
    return None


def _caption_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return ""
    return str(value).strip()


class FolderSource:
    """Images and videos under ``root`` (recursive, sorted by relative path) with a same-stem ``.txt`` caption beside
    each.

    ``photos/cat.jpg`` takes its caption from ``photos/cat.txt`` and, when present, extra json fields from
    ``photos/cat.json`` (a JSON object). Without a caption the image is skipped as ``missing_caption`` unless
    ``allow_empty_caption`` (then the caption is ``""``). Files and folders whose names start with ``.`` are
    ignored.
    """

    def __init__(self, root: str | os.PathLike, allow_empty_caption: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"input: {str(root)!r} is not a folder (a folder source needs a directory of images)")
        self.allow_empty_caption = allow_empty_caption
        self.skips = SkipLog()
        self._files: Optional[list[Path]] = None

    def files(self) -> list[Path]:
        if self._files is None:
            found = []
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for name in filenames:
                    if not name.startswith(".") and Path(name).suffix.lower() in MEDIA_SUFFIXES:
                        found.append(Path(dirpath) / name)
            self._files = sorted(found, key=lambda p: p.relative_to(self.root).as_posix())
        return self._files

    def size_hint(self) -> int:
        return len(self.files())

    def __iter__(self) -> Iterator[Sample]:
        for path in self.files():
            rel = path.relative_to(self.root).as_posix()
            caption_path = path.with_suffix(".txt")
            caption = ""
            if caption_path.is_file():
                try:
                    caption = _caption_text(caption_path.read_text(encoding="utf-8-sig"))
                except UnicodeDecodeError:
                    self.skips.add("bad_caption", rel)
                    continue
            if not caption and not self.allow_empty_caption:
                self.skips.add("missing_caption", rel)
                continue
            extra: Optional[dict[str, Any]] = {}
            meta_path = path.with_suffix(".json")
            if meta_path.is_file():
                try:
                    extra, why = parse_json_object(meta_path.read_text(encoding="utf-8-sig"))
                except UnicodeDecodeError as e:
                    extra, why = None, str(e)[:100]
                why = why or json_text_problem(extra)  # a lone surrogate would stop the writer's json
                if extra is None or why:
                    self.skips.add("bad_metadata", f"{rel} ({why})")
                    continue
            sample = _read_media(path, caption, extra, rel, self.skips, rel)
            if sample is not None:
                yield sample


class TableSource:
    """Rows of a JSONL (``.jsonl``/``.ndjson``) or CSV (``.csv``; ``.tsv`` tab-separated) table.

    Each row names an image or video file in ``image_column`` (absolute, or relative to the table's folder; a video
    by its suffix, :data:`VIDEO_SUFFIXES`) and its text in ``caption_column``; every other column goes into the
    sample's json unchanged (CSV values are strings). Skips: ``bad_row`` (a JSONL line that is not a UTF-8 JSON
    object, or a row without the image column; the example names the line number), ``missing_image``,
    ``corrupt_image`` (and the video reasons), ``missing_caption`` (empty or absent caption, unless
    ``allow_empty_caption``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_column: str = "image",
        caption_column: str = "caption",
        allow_empty_caption: bool = False,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"input: {str(path)!r} is not a file (a table source needs a .jsonl or .csv file)")
        kind = TABLE_SUFFIXES.get(self.path.suffix.lower())
        if kind is None:
            raise ValueError(f"input: {str(path)!r} has suffix {self.path.suffix!r}; "
                             f"allowed: {', '.join(sorted(TABLE_SUFFIXES))}")
        self.kind = kind
        self.image_column = image_column
        self.caption_column = caption_column
        self.allow_empty_caption = allow_empty_caption
        self.skips = SkipLog()
        if kind != "jsonl":
            with self.path.open(newline="", encoding="utf-8-sig") as f:
                header = self._csv_reader(f).fieldnames or []
            missing = [c for c in (image_column, caption_column) if c not in header]
            if missing:
                raise ValueError(f"input: {self.path} has no column {', '.join(map(repr, missing))} "
                                 f"(columns: {', '.join(header) or 'none'}); set image_column/caption_column")

    def _csv_reader(self, f) -> csv.DictReader:
        return csv.DictReader(f, delimiter="\t" if self.kind == "tsv" else ",")

    def size_hint(self) -> int:
        """Rows in the table (non-blank lines; for CSV minus the header): a progress-bar total, not a promise."""
        with self.path.open("rb") as f:
            lines = sum(1 for line in f if line.strip())
        return lines if self.kind == "jsonl" else max(lines - 1, 0)

    def _rows(self) -> Iterator[tuple[int, Optional[dict[str, Any]]]]:
        """(line number, row) pairs; row is None for a line that is not a JSON object."""
        if self.kind == "jsonl":
            with self.path.open("rb") as f:
                for lineno, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue
                    try:
                        row, _why = parse_json_object(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
                    except UnicodeDecodeError:
                        row = None
                    yield lineno, row
        else:  # undecodable bytes become U+FFFD: the row still counts (e.g. as missing_image), the run goes on
            with self.path.open(newline="", encoding="utf-8-sig", errors="replace") as f:
                reader = self._csv_reader(f)
                for row in reader:
                    yield reader.line_num, row

    def __iter__(self) -> Iterator[Sample]:
        folder = self.path.parent
        name = self.path.name
        for lineno, row in self._rows():
            where = f"{name}:{lineno}"
            image_ref = None if row is None else row.get(self.image_column)
            if row is None or not isinstance(image_ref, str) or not image_ref.strip():
                self.skips.add("bad_row", where)
                continue
            image_ref = image_ref.strip()
            caption = _caption_text(row.get(self.caption_column))
            problem = text_problem(caption)
            if problem:
                self.skips.add("bad_caption", f"{where} {image_ref} (caption {problem})")
                continue
            if not caption and not self.allow_empty_caption:
                self.skips.add("missing_caption", f"{where} {image_ref}")
                continue
            extra = {k: v for k, v in row.items() if k not in (self.image_column, self.caption_column) and k}
            problem = json_text_problem(extra)
            if problem:
                self.skips.add("bad_row", f"{where} {image_ref} ({problem})")
                continue
            sample = _read_media(folder / image_ref, caption, extra, image_ref, self.skips, f"{where} {image_ref}")
            if sample is not None:
                yield sample


