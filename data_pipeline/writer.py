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
When re-encoding to jpg, transparency is composited onto white. A re-encoded image is 8-bit (L, LA, RGB or RGBA:
:func:`~data_pipeline.transforms.normalize_mode`; 16/32-bit integer and float greys are scaled by their range, not
clipped), and its ``width`` / ``height`` are those of the upright image.

A sample whose caption or json cannot be written as UTF-8 (a lone surrogate such as ``"\\ud800"``, valid in JSON)
or whose json nests deeper than :data:`~data_pipeline.sampletext.MAX_JSON_DEPTH` is counted (``bad_caption``,
``bad_json``) and skipped; nothing of it reaches the tar.

Videos (a source's mp4/webm/mov/mkv/avi/gif bytes with their probe, or raw :class:`~data_pipeline.sources
.VideoFrames`) are stored as ``KEY.<container ext>`` + ``KEY.txt`` + ``KEY.json``; the json holds, beside key,
caption and source, the probe (:data:`~data_pipeline.sources.VIDEO_FIELDS`): ``width``, ``height`` (as stored,
before rotation), ``fps`` (float), ``num_frames`` (int), ``duration`` (seconds), ``rotation`` (degrees
counter-clockwise to turn the stored frames for display, as in the container's display matrix: 0, 90, 180 or 270)
and ``codec`` (FFmpeg's decoder name). The file is kept byte for byte unless it must change: ``video_reencode``,
a longer side above ``max_size``, a frame rate above ``video_max_fps``, or a scene split. A re-encoded video is
H.264 (libx264, ``video_crf``, preset medium, yuv420p so every player decodes it; sides rounded to even) in mp4,
at most ``max_size`` on the longer side (area resampling), frames dropped by timestamp down to ``video_max_fps``
(constant frame rate out), the rotation applied to the pixels (``rotation`` 0 then). Raw frames are always encoded
so. With ``motion_score`` (or ``split_scenes``) the json also holds ``motion_score``; with ``split_scenes`` a
video is cut at scene changes into one sample per scene, each with ``clip_start`` / ``clip_end`` (seconds in the
source) when the video had more than one scene (:mod:`data_pipeline.curation`); scenes shorter than
``min_scene_seconds`` are counted as ``short_scene``. A video that fails to decode while analysed or re-encoded is
counted as ``corrupt_video``. Small videos (up to :data:`SMALL_VIDEO_PIXELS` a frame, such as the moving-digits
set) encode byte-reproducibly: single-threaded and without x264's SIMD, whose reads past the rows of tiny frames
made about one 32x32 clip in a hundred encode to different bytes from run to run. Larger videos use x264's
threads and SIMD; their encoded bytes may differ between runs, while kept files, json and keys never do.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tarfile
import time
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from data_pipeline.errors import SkipSample
from data_pipeline.index import ShardIndex, ShardInfo, index_path, write_index
from data_pipeline.sampletext import encode_json, text_problem
from data_pipeline.sources import (
    TABLE_SUFFIXES,
    VIDEO_FIELDS,
    BadVideoError,
    ImageLike,
    Sample,
    SkipLog,
    VideoFrames,
    VideoInfo,
    decode_image,
    iter_video_frames,
    probe_video,
)
from data_pipeline.transforms import normalize_mode

log = logging.getLogger(__name__)

SOURCES = ("demo", "moving-digits", "moving-digit-pairs", "folder", "table", "pairs")
BUNDLED = ("demo", "moving-digits", "moving-digit-pairs")  # sources that read no input and write train-* / val-*
PAIR_TABLE_SUFFIXES = {**TABLE_SUFFIXES, ".parquet": "parquet"}  # source=pairs (data_pipeline.preference)
IMAGE_FORMATS = ("keep", "jpg", "png")
KEEPABLE = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> shard extension
RESERVED_FIELDS = ("key", "width", "height", "caption", "source")  # json fields the writer sets itself
VIDEO_RESERVED_FIELDS = RESERVED_FIELDS + VIDEO_FIELDS  # ... and for a video
CLIP_FIELDS = ("motion_score", "clip_start", "clip_end")  # json fields of curated video clips (when computed)
H264_PRESET = "medium"  # x264 speed/size trade-off of re-encoded videos
SMALL_VIDEO_PIXELS = 256 * 256  # frames up to this size encode single-threaded without SIMD: reproducible bytes
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
    video_reencode: bool = False  # re-encode every video to H.264 mp4 (else only when a limit or a split asks)
    video_max_fps: Optional[float] = None  # drop frames so videos have at most this frame rate; None: keep
    video_crf: int = 18  # x264 constant rate factor of (re-)encoded videos, 0..51, lower is better (18: near lossless)
    motion_score: bool = False  # write each video's motion_score (mean Farneback flow at 2 fps, data_pipeline.curation)
    split_scenes: bool = False  # cut videos at scene changes into one clip per scene (implies motion_score)
    min_scene_seconds: float = 1.0  # shortest scene: no cut sooner after the last one; shorter remnants are dropped
    scene_threshold: float = 27.0  # content-detector threshold (PySceneDetect's scale: mean HSV difference, 0..255)

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
        f = self.video_max_fps
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1000):
            raise ValueError(f"video_max_fps: got {f!r}; allowed: null or a number in (0, 1000]")
        c = self.video_crf
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= 51:
            raise ValueError(f"video_crf: got {c!r}; allowed: an integer in 0..51")
        for name in ("video_reencode", "motion_score", "split_scenes"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: got {getattr(self, name)!r}; expected true or false")
        ms = self.min_scene_seconds
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 <= ms < 1e6:
            raise ValueError(f"min_scene_seconds: got {ms!r}; allowed: a number of seconds >= 0")
        th = self.scene_threshold
        if isinstance(th, bool) or not isinstance(th, (int, float)) or not 0 < th <= 255:
            raise ValueError(f"scene_threshold: got {th!r}; allowed: a number in (0, 255]")

    def writer_options(self) -> "WriterOptions":
        """Just these options (a plain :class:`WriterOptions`, also from a config that extends it)."""
        return WriterOptions(**{f.name: getattr(self, f.name) for f in fields(WriterOptions)})


@dataclass
class ShardsConfig(WriterOptions):
    """What ``loom shards`` writes: the source, where the shards go, and how (the :class:`WriterOptions` fields)."""

    # bundled sets (moving-digit-pairs: clip preference pairs, data_pipeline.preference), folder, table, pairs
    source: Literal["demo", "moving-digits", "moving-digit-pairs", "folder", "table", "pairs"] = "demo"
    input: Optional[str] = None  # the folder (folder), .jsonl/.csv (table) or .jsonl/.csv/.parquet (pairs); demo: none
    output_dir: str = "data/shards"  # where the tars and their .shardindex.json go (created if missing)
    prefix: Optional[str] = None  # shard names {prefix}-000000.tar; None: "shard" (pairs: "pairs"; demo: train/val)
    image_column: str = "image"  # table column with the image path (relative to the table's folder)
    caption_column: str = "caption"  # table column with the caption
    allow_empty_caption: bool = False  # keep images without a caption (caption ""), instead of skipping them
    seed: int = 0  # demo, moving-digits: seed of the stratified train/validation split (and of the directions)
    val_fraction: float = 0.1  # demo, moving-digits: fraction of each digit class held out for validation, in [0, 1)
    progress: bool = True  # show a tqdm progress bar

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source: got {self.source!r}; allowed: {', '.join(SOURCES)}")
        if self.source in BUNDLED:
            what = f"the {self.source} source"
            if self.input is not None:
                raise ValueError(f"input: got {self.input!r}; {what} is bundled and reads no input")
            if self.prefix is not None:
                raise ValueError(f"prefix: got {self.prefix!r}; {what} always writes train-* and val-*")
            if self.source == "demo" and self.image_format == "jpg":
                raise ValueError("image_format: got 'jpg'; the demo set is stored as lossless PNG (use keep or png)")
            if self.max_size is not None:
                raise ValueError(f"max_size: got {self.max_size!r}; {what}'s frames are 32x32, leave it null")
            if self.source in ("moving-digits", "moving-digit-pairs"):
                for name in ("video_max_fps", "split_scenes"):
                    if getattr(self, name):
                        raise ValueError(f"{name}: got {getattr(self, name)!r}; the moving-digits clips are "
                                         "9-frame single scenes with fixed codec settings, leave it unset")
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
    img = normalize_mode(img)  # L, LA, RGB or RGBA; 16/32-bit and float greys scaled by their range
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


# ------------------------------------------------------------------------------------------------ videos


@dataclass
class EncodedVideo:
    """One video sample as stored: the file's bytes, its extension, its probe and the curation fields."""

    data: bytes  # the file's bytes
    ext: str  # member extension: the source's own (mp4, webm, ...) when kept, "mp4" when encoded here
    info: VideoInfo  # width, height, fps, num_frames, duration, rotation, codec of ``data``
    extra: dict[str, Any] = field(default_factory=dict)  # motion_score, clip_start, clip_end (when computed)


def _even(n: float) -> int:
    return max(2, 2 * round(n / 2))


def video_output_size(width: int, height: int, max_size: Optional[int]) -> tuple[int, int]:
    """(width, height) of a re-encoded video: the longer side at most ``max_size``, both sides even (4:2:0)."""
    scale = min(1.0, max_size / max(width, height)) if max_size else 1.0
    return _even(width * scale), _even(height * scale)


class H264Encoder:
    """Frames in, an H.264 mp4 file's bytes out (libx264, constant rate factor ``crf``, yuv420p, constant frame
    rate ``fps``), in memory. Frames of another size are resampled to ``(width, height)`` (area averaging)."""

    def __init__(self, width: int, height: int, fps: float, crf: int = 18):
        import av

        self.width, self.height = width, height
        self.rate = Fraction(fps).limit_denominator(1001)  # 29.97 -> 30000/1001
        self._buf = io.BytesIO()
        # bitexact: no library version strings in the container, so that bytes depend only on the input
        self._container = av.open(self._buf, mode="w", format="mp4", options={"fflags": "+bitexact"})
        self._stream = self._container.add_stream("libx264", rate=self.rate)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        options = {"crf": str(crf), "preset": H264_PRESET}
        small = width * height <= SMALL_VIDEO_PIXELS
        if small:  # x264's SIMD reads past the rows of tiny frames: without it the bytes depend only on the input
            options["x264-params"] = "asm=0"
        self._stream.options = options
        self._stream.codec_context.thread_count = 1 if small else 0  # 0: x264 decides
        self.frames = 0

    def add(self, frame: Any) -> None:
        """Append one frame: an ``av.VideoFrame`` or an (H, W, 3) uint8 RGB array."""
        import av

        if isinstance(frame, np.ndarray):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        frame = frame.reformat(width=self.width, height=self.height, format="yuv420p", interpolation="AREA")
        frame = _fresh_copy(frame)
        frame.pts = self.frames
        frame.time_base = 1 / self.rate
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def finish(self) -> bytes:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        return self._buf.getvalue()


def _fresh_copy(frame: Any) -> Any:
    """``frame``'s pixels in a frame PyAV allocated itself (zero-filled past the planes). libx264's SIMD reads a
    little past the rows of tiny frames; on swscale's output those bytes are uninitialised, which made about one
    32x32 clip in a thousand encode to different bytes from run to run."""
    import av

    out = av.VideoFrame(frame.width, frame.height, frame.format.name)
    for src, dst in zip(frame.planes, out.planes):
        rows = np.frombuffer(src, np.uint8).reshape(-1, src.line_size)[:, :src.width]  # (h, w) of this plane
        full = np.zeros((dst.buffer_size // dst.line_size, dst.line_size), np.uint8)
        full[:rows.shape[0], :rows.shape[1]] = rows
        dst.update(full.tobytes())
    return out


def _rotated(frame: Any, rotation: int) -> Any:
    """The frame turned ``rotation`` degrees counter-clockwise (an RGB array), or the frame itself for 0."""
    if rotation % 360 == 0:
        return frame
    return np.rot90(frame.to_ndarray(format="rgb24"), k=rotation // 90)


@dataclass
class _ClipPlan:
    start_frame: int
    end_frame: int
    extra: dict[str, Any]


def _reencode(data: bytes, info: VideoInfo, clips: list[_ClipPlan], o: WriterOptions) -> list[EncodedVideo]:
    """Decode ``data`` once and encode each clip's frames (module docstring: size, frame rate, rotation)."""
    quarter = info.rotation % 180 == 90
    width, height = video_output_size(info.height if quarter else info.width,
                                      info.width if quarter else info.height, o.max_size)
    fps = min(info.fps, float(o.video_max_fps)) if o.video_max_fps else info.fps
    out: list[EncodedVideo] = []
    k, enc, t0, slot = 0, None, 0.0, -1
    for i, (t, frame) in enumerate(iter_video_frames(data, info.fps)):
        while k < len(clips) and i >= clips[k].end_frame:
            if enc is not None:
                out.append(_finish(enc, clips[k]))
                enc = None
            k += 1
        if k == len(clips):
            break
        if i < clips[k].start_frame:
            continue
        if enc is None:
            enc, t0, slot = H264Encoder(width, height, fps, o.video_crf), t, -1
        if o.video_max_fps and info.fps > o.video_max_fps:
            s = int(np.floor((t - t0) * fps + 1e-6))  # keep the first frame of each 1/fps slot
            if s <= slot:
                continue
            slot = s
        enc.add(_rotated(frame, info.rotation))
    if enc is not None:
        out.append(_finish(enc, clips[k]))
    return out


def _finish(enc: H264Encoder, clip: _ClipPlan) -> EncodedVideo:
    data = enc.finish()
    fps = float(enc.rate)
    info = VideoInfo(enc.width, enc.height, round(fps, 6), enc.frames, round(enc.frames / fps, 6), 0, "h264")
    return EncodedVideo(data, "mp4", info, dict(clip.extra))


def encode_video(
    video: bytes | VideoFrames,
    options: Optional[WriterOptions] = None,
    info: Optional[VideoInfo] = None,
    ext: str = "mp4",
) -> tuple[list[EncodedVideo], list[tuple[float, float]]]:
    """The shard file(s) of one video (rules in the module docstring) and the (start, end) seconds of the scenes
    dropped as too short. Raw frames are encoded first (H.264 mp4, ``video_crf``); bytes need their probe ``info``
    (probed here when None) and keep their extension ``ext`` unless re-encoded.

    Raises :class:`~data_pipeline.sources.BadVideoError` for a video that cannot be used.
    """
    import av

    o = (options or WriterOptions()).writer_options()
    if isinstance(video, VideoFrames):
        h, w = video.frames.shape[1:3]
        fps = min(video.fps, float(o.video_max_fps)) if o.video_max_fps else video.fps
        enc = H264Encoder(*video_output_size(w, h, o.max_size), fps, o.video_crf)
        step = video.fps / fps
        for j in range(int(np.floor(len(video.frames) / step - 1e-9)) + 1):
            enc.add(video.frames[min(int(np.floor(j * step + 1e-6)), len(video.frames) - 1)])
        data = enc.finish()
        info, ext, o.video_max_fps, o.max_size, o.video_reencode = probe_video(data), "mp4", None, None, False
    else:
        data = bytes(video)
        info = info if info is not None else probe_video(data)
    try:
        plans = [_ClipPlan(0, 1 << 62, {})]  # the whole video, however many frames decode
        dropped: list[tuple[float, float]] = []
        whole = True
        if o.split_scenes or o.motion_score:
            from data_pipeline.curation import analyse_video

            analysis = analyse_video(data, info.fps, split_scenes=o.split_scenes, threshold=o.scene_threshold,
                                     min_scene_seconds=o.min_scene_seconds, motion=True)
            dropped = [(s.start, s.end) for s in analysis.dropped]
            whole = len(analysis.scenes) == 1 and not dropped
            plans = [_ClipPlan(s.start_frame, s.end_frame, {"motion_score": round(s.motion_score, 4)} if whole else {
                "motion_score": round(s.motion_score, 4), "clip_start": round(s.start, 6), "clip_end": round(s.end, 6)})
                for s in analysis.scenes]
        too_big = o.max_size is not None and max(info.width, info.height) > o.max_size
        too_fast = o.video_max_fps is not None and info.fps > o.video_max_fps + 1e-6
        if whole and not (o.video_reencode or too_big or too_fast):
            return [EncodedVideo(data, ext, info, plans[0].extra)], dropped
        return _reencode(data, info, plans, o), dropped
    except BadVideoError:
        raise
    except av.error.FFmpegError as e:
        raise BadVideoError("corrupt_video", f"decoding failed ({e})") from e
    except ValueError as e:  # analyse_video: no decodable frame
        raise BadVideoError("no_frames", str(e)) from e


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
        """Add one sample; returns its key, or None when the image could not be used (counted in ``skips``).

        A video split into scenes becomes several samples: the key of the first is returned."""
        if self.index is not None:
            raise RuntimeError(f"shard writer {self.prefix!r} is closed")
        if sample.is_video:
            return self._write_video(sample)
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
        if not self._text_ok(caption, sample):
            return None
        meta = {k: v for k, v in sample.extra.items() if k not in RESERVED_FIELDS}
        meta.update(key=key, width=enc.width, height=enc.height, caption=caption, source=sample.source_id)
        try:
            return self.write_members({enc.ext: enc.data, "txt": caption.encode("utf-8")}, meta)
        except SkipSample as e:
            self.skips.add(e.reason, f"{sample.source_id or f'sample {self.count + self.skips.total}'} ({e.detail})")
            return None

    def _text_ok(self, caption: str, sample: Sample) -> bool:
        """False after counting ``bad_caption`` (a caption that cannot be written as UTF-8: a lone surrogate)."""
        problem = text_problem(caption)
        if problem:
            where = sample.source_id or f"sample {self.count + self.skips.total}"
            self.skips.add("bad_caption", f"{where} (caption {problem})")
        return not problem

    def _write_video(self, sample: Sample) -> Optional[str]:
        where = sample.source_id or f"sample {self.count + self.skips.total}"
        try:
            clips, dropped = encode_video(sample.image, self.options, sample.video,  # type: ignore[arg-type]
                                          sample.video_ext)
        except BadVideoError as e:
            self.skips.add(e.reason, where)
            return None
        for start, end in dropped:
            self.skips.add("short_scene", f"{where} {start:.2f}-{end:.2f}s")
        caption = sample.caption if sample.caption is not None else ""
        if not self._text_ok(caption, sample):
            return None
        keys = []
        for clip in clips:
            meta = {k: v for k, v in sample.extra.items() if k not in VIDEO_RESERVED_FIELDS}
            meta.update(clip.info.fields(), **clip.extra)
            meta.update(caption=caption, source=sample.source_id)
            try:
                keys.append(self.write_members({clip.ext: clip.data, "txt": caption.encode("utf-8")}, meta))
            except SkipSample as e:
                self.skips.add(e.reason, f"{where} ({e.detail})")
        return keys[0] if keys else None

    def write_members(self, members: dict[str, bytes], meta: dict[str, Any]) -> str:
        """Add one sample made of ready member bytes by extension (``{"latent.npy": ..., "txt": ...}``) plus its
        json (``key`` is set here); returns the key. Used for derived shards such as cached latents.

        Raises :class:`~data_pipeline.errors.SkipSample` (reason ``bad_json``) when ``meta`` cannot be written as
        UTF-8 JSON (a lone surrogate, nesting too deep), before anything is added: the caller counts the skip and
        the tar stays whole."""
        if self.index is not None:
            raise RuntimeError(f"shard writer {self.prefix!r} is closed")
        key = f"{self.count:09d}"
        meta = dict(meta, key=key)
        meta_bytes = encode_json(meta, _json_default)  # SkipSample("bad_json") before anything reaches the tar
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
    with writer, tqdm(total=total, desc=prefix, unit="file", disable=not progress, dynamic_ncols=True) as bar:
        counted = skips.total  # skips already on the bar; the source's own skips are inputs too
        for sample in samples:
            skipped_by_source = skips.total - counted
            writer.write(sample)  # written (maybe as several clips) or skipped by the writer
            counted = skips.total
            bar.update(1 + skipped_by_source)  # inputs seen
            if bar.n % 256 == 0:
                bar.set_postfix(skipped=skips.total, written=writer.count, refresh=False)
        bar.update(skips.total - counted)
    index = writer.close()
    summary = WriteSummary(Path(output_dir), prefix, index, index_path(output_dir, prefix), skips,
                           time.perf_counter() - start)
    if not index.shards:
        log.warning("%s: no samples written to %s (skipped: %s)", prefix, output_dir, skips.format())
    return summary
