"""Video members (mp4, webm, mov, mkv, avi, gif) through PyAV: header probe and clip decode from bytes in memory.

The ``video`` entry of the member-decoder table (:mod:`data_pipeline.decoders`). Both steps open the member's
bytes with ``av.open(io.BytesIO(data))``; nothing is written to disk.

``probe(data, cfg)``: the container and stream headers give the stored frame size, the average frame rate and the
frame count (the container's, else duration × rate). Absurd metadata is refused from these numbers alone, before
any frame is decoded: a rate that is 0 or not finite, no frame count and no duration, more than
``VideoConfig.max_frames`` frames (``bad_metadata``); frames of more than ``max_pixels`` pixels (``too_large``).
Only then is the first frame decoded (one key frame, a single codec thread), for two facts no header of PyAV 18
exposes: that the stream decodes at all (``no_frames``) and its display rotation (``VideoFrame.rotation``, from the
display-matrix side data), which swaps height and width at 90° and 270°. The probed shape is
``(frames available for a clip, h, w)`` after rotation: the largest ``T`` that :func:`clip_positions` can place at
the configured stride or rate (bucketing picks ``T <= num_frames`` from it).

``decode(data, request)``: a clip of ``T = request.target[0]`` frames. Sample times (seconds from the stream's
first timestamp): at a ``frame_stride`` ``s`` they are ``(start + k s) / r`` with ``r`` the average rate, i.e.
frames ``start, start + s, ...`` of a constant-rate file; at a target ``fps`` they are ``start / r + k / fps``.
Each sample takes the frame on display at its time (the last frame whose timestamp is at or before it), so
variable-frame-rate files sample by their timestamps, not their frame order. ``start`` (in frames at rate ``r``)
is drawn from the sample's counter-based ``rand`` (``clip_start: random``; the same value after a resume) or
centred. The decoder opens the bytes again, repeats the header checks, seeks to the nearest key frame at or before
the first sample time (``container.seek(..., backward=True)`` on the stream; the first frame is not decoded
again: the rotation is read from the clip's own frames), decodes forward, converts only the chosen frames to RGB
(``VideoFrame.reformat``, bicubic), each resized to cover the target, rotated upright, cropped at one offset and
flipped alike (the geometry of :func:`~data_pipeline.transforms.cover_geometry` /
:func:`~data_pipeline.transforms.crop_offset`, as for images). A clip's ``Decoded`` records ``clip_start`` and
each frame's timestamp (``clip_times``); the batch carries them in its metadata.
A clip with fewer positions than needed is skipped (``short_clip``) or, with ``short_clips: pad``, starts at
frame 0 and repeats its last frame. Damaged packets are skipped as FFmpeg's own tools do; a stream yielding no
frame at all is ``no_frames``.

Skip reasons (a :class:`~data_pipeline.errors.SkipSample` the reader and worker count by name):
``corrupt_video`` (unreadable container, or any other decoder error), ``no_frames``, ``short_clip``,
``audio_only``, ``unsupported_codec``, ``bad_metadata``, ``too_large``.
"""

from __future__ import annotations

import io
import itertools
import math
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np

from data_pipeline.errors import SkipSample
from data_pipeline.transforms import Decoded, cover_geometry, crop_offset

if TYPE_CHECKING:
    from data_pipeline.decoders import DecodeRequest

EXTENSIONS = ("mp4", "webm", "mov", "mkv", "avi", "gif")
SKIP_REASONS = ("corrupt_video", "no_frames", "short_clip", "audio_only", "unsupported_codec", "bad_metadata",
                "too_large")
MAX_FRAMES = 100_000  # default VideoConfig.max_frames
MAX_PIXELS = 4096 * 4096  # default VideoConfig.max_pixels
_EPS = 5e-4  # seconds: timestamps closer than this count as equal (Matroska and WebM round them to 1 ms)
T_CLIP = 0x636C6970  # purpose tag of the clip-start draw (independent of the crop and flip bits of ``rand``)


class VideoHeader:
    """What the headers say about a video stream (stored orientation; rotation from the first frame)."""

    __slots__ = ("frames", "height", "width", "fps", "start", "codec", "rotation")

    def __init__(self, frames: int, height: int, width: int, fps: float, start: float, codec: str,
                 rotation: int = 0):
        self.frames = frames  # frame count (the container's, else round(duration × fps))
        self.height, self.width = height, width  # stored frame size
        self.fps = fps  # average frame rate (frames per second)
        self.start = start  # the stream's first timestamp, seconds
        self.codec = codec  # FFmpeg decoder name
        self.rotation = rotation  # display rotation, degrees counter-clockwise, one of 0, 90, 180, 270

    @property
    def display_size(self) -> tuple[int, int]:
        """``(h, w)`` as displayed (after rotation)."""
        return (self.width, self.height) if self.rotation in (90, 270) else (self.height, self.width)


def _limits(video: Any) -> tuple[int, int]:
    if video is None:
        return MAX_FRAMES, MAX_PIXELS
    return video.max_frames, video.max_pixels


def check_header(frames: int, fps: float, height: int, width: int, max_frames: int = MAX_FRAMES,
                 max_pixels: int = MAX_PIXELS) -> None:
    """Raise :class:`SkipSample` (``bad_metadata`` / ``too_large``) for numbers no clip should be decoded from."""
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise SkipSample("bad_metadata", f"frame rate {fps!r}")
    if height < 1 or width < 1:
        raise SkipSample("bad_metadata", f"frame size {width}x{height}")
    if frames > max_frames:
        raise SkipSample("bad_metadata", f"{frames} frames > max_frames {max_frames}")
    if frames < 1:
        raise SkipSample("no_frames", "frame count 0")
    if height * width > max_pixels:
        raise SkipSample("too_large", f"frames of {width}x{height} > max_pixels {max_pixels}")


def _open(data: bytes):
    import av

    try:
        return av.open(io.BytesIO(data), mode="r")
    except Exception as e:  # noqa: BLE001 - FFmpeg raises many error types on damaged containers
        raise SkipSample("corrupt_video", f"cannot open container: {str(e)[:100]}") from e


def _stream_header(container) -> tuple[Any, VideoHeader]:
    """The first video stream and its header numbers (no frame decoded); raises :class:`SkipSample`."""
    if not container.streams.video:
        if container.streams.audio:
            raise SkipSample("audio_only", f"{len(container.streams.audio)} audio stream(s), no video stream")
        raise SkipSample("corrupt_video", "no video stream")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    if ctx is None:
        tag = stream.codec_tag if hasattr(stream, "codec_tag") else "?"
        raise SkipSample("unsupported_codec", f"no decoder for the video stream (codec tag {tag!r})")
    ctx.thread_count = 1  # one loader worker = one core: parallelism comes from the workers
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    tb = stream.time_base
    start = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
    frames = int(stream.frames or 0)
    if frames <= 0:  # webm / mkv: no count in the header, estimate it from the duration
        if stream.duration is not None and tb:
            duration = float(stream.duration * tb)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        else:
            duration = 0.0
        if not (math.isfinite(fps) and fps > 0):
            raise SkipSample("bad_metadata", f"frame rate {fps!r}")
        if not (math.isfinite(duration) and duration > 0):
            raise SkipSample("bad_metadata", f"no frame count and duration {duration!r}")
        frames = round(duration * fps)
    return stream, VideoHeader(frames, int(ctx.height), int(ctx.width), fps, start, ctx.name)


def _frames(container, stream) -> Iterator:
    """Decoded frames in presentation order; packets the codec rejects are skipped, a demuxer error ends it."""
    import av

    demux = container.demux(stream)
    while True:
        try:
            packet = next(demux)
        except StopIteration:
            return
        except av.FFmpegError:  # truncated or damaged container: what was read so far is what there is
            return
        try:
            frames = packet.decode()
        except av.FFmpegError:  # one damaged packet
            continue
        yield from frames


def _rotation(frame) -> int:
    """The frame's display rotation in degrees counter-clockwise, rounded to a multiple of 90."""
    try:
        r = float(frame.rotation or 0)
    except Exception:  # noqa: BLE001 - a malformed display matrix: show the frame as stored
        return 0
    return int(round(r / 90.0)) % 4 * 90


def _header(data: bytes, video: Any, first_frame: bool = True) -> tuple[Any, Any, VideoHeader, Iterator]:
    """Open, read the header, refuse absurd numbers; with ``first_frame``, decode the first frame for its rotation
    (else the rotation stays 0 for the caller to read from the frames it decodes). Also returns the frame
    iterator (starting at that first frame)."""
    container = _open(data)
    try:
        stream, head = _stream_header(container)
        check_header(head.frames, head.fps, head.height, head.width, *_limits(video))
        frames = _frames(container, stream)
        if not first_frame:
            return container, stream, head, frames
        first = next(frames, None)
    except SkipSample:
        container.close()
        raise
    except Exception as e:  # noqa: BLE001
        container.close()
        raise SkipSample("corrupt_video", str(e)[:100]) from e
    if first is None:
        container.close()
        raise SkipSample("no_frames", "no frame decodes")
    head.rotation = _rotation(first)
    return container, stream, head, itertools.chain([first], frames)


def clip_positions(frames: int, fps: float, num_frames: int, frame_stride: int = 1,
                   target_fps: Optional[float] = None) -> int:
    """How many start frames a clip of ``num_frames`` can take in a video of ``frames`` frames at ``fps``: the
    clip spans ``(num_frames - 1) * frame_stride`` frames, or ``(num_frames - 1) / target_fps`` seconds, and its
    last sample must fall before the end (``frames / fps`` seconds)."""
    span = (num_frames - 1) * frame_stride if target_fps is None else (num_frames - 1) * fps / target_fps
    return max(0, math.ceil(frames - span - 1e-9))


def clip_frames_available(frames: int, fps: float, frame_stride: int = 1, target_fps: Optional[float] = None) -> int:
    """The largest clip length with at least one position (see :func:`clip_positions`); 0 for no frames."""
    if frames < 1:
        return 0
    if target_fps is None:
        return (frames - 1) // frame_stride + 1
    return max(1, math.ceil((frames - 1e-9) * target_fps / fps))


def probe_video(data: bytes, cfg: Any = None) -> tuple[int, int, int]:
    """``(frames available for a clip, h, w)`` after rotation (module docstring); ``cfg``: a ``DataConfig`` (its
    ``video`` section gives stride, rate and limits), None for stride 1 and the default limits."""
    video = getattr(cfg, "video", None)
    container, _stream, head, _frames_it = _header(data, video)
    container.close()
    stride = video.frame_stride if video is not None else 1
    target_fps = video.fps if video is not None else None
    h, w = head.display_size
    return clip_frames_available(head.frames, head.fps, stride, target_fps), h, w


def _clip_start(positions: int, mode: str, rand: int) -> int:
    from data_pipeline.shardlists import mix64

    if mode == "center":
        return (positions - 1) // 2
    return mix64(rand, T_CLIP) % positions


def clip_lengths(cfg: Any) -> list[int]:
    """The clip lengths a ``DataConfig`` trains on: its ``buckets.frames``, else ``[video.num_frames]`` (16 without
    a ``video`` section)."""
    frames = list(getattr(getattr(cfg, "buckets", None), "frames", None) or [])
    return frames or [int(getattr(getattr(cfg, "video", None), "num_frames", 16))]


def training_clip_frames(cfg: Any) -> int:
    """Frames of the longest training clip of a ``DataConfig`` (:func:`clip_lengths`)."""
    return max(clip_lengths(cfg))


def latent_window(cfg: Any, shape: tuple[int, ...]) -> Optional[int]:
    """The frames a cached clip latent of ``shape`` ``(2C, T, h, w)`` is cut to, or None when it is used whole.

    A cache made with ``cache.clip_frames`` keeps more frames of each clip than a training clip has (the clip's
    whole length, say); every time such a latent is read, a window of :func:`training_clip_frames` consecutive latent
    frames is cut from it where ``video.clip_start`` says (:func:`cut_latent_window`), so cached training keeps the
    temporal crop that decoding the video would give. Latents with at most that many frames (images, short clips,
    a causal 3-D autoencoder's ``1 + (T-1)/r``) are used whole."""
    if len(shape) != 4:
        return None
    n = training_clip_frames(cfg)
    return n if int(shape[1]) > n else None


def cut_latent_window(latent: np.ndarray, n: int, mode: str, rand: int) -> tuple[np.ndarray, int]:
    """``latent`` ``(2C, T, h, w)`` → ``(latent[:, s:s + n], s)``: the window of ``n`` frames that starts where
    ``mode`` (``video.clip_start``) and the sample's ``rand`` put it — the draw a decoded clip's start uses, so a
    resumed run cuts the same windows."""
    s = _clip_start(int(latent.shape[1]) - n + 1, mode, rand)
    return np.ascontiguousarray(latent[:, s:s + n]), s


def _pick(frames: Iterator, times: list[float], frame_dur: float) -> list:
    """For each sample time (ascending, seconds), the frame on display then: ``[(frame, t), ...]``, shorter when
    the stream ends before the last times."""
    picked: list = []
    prev = None
    for frame in frames:
        t = float(frame.time) if frame.time is not None else (prev[1] + frame_dur if prev is not None else 0.0)
        while len(picked) < len(times) and t > times[len(picked)] + _EPS:
            picked.append(prev if prev is not None else (frame, t))
        if len(picked) == len(times):
            return picked
        prev = (frame, t)
    while prev is not None and len(picked) < len(times) and times[len(picked)] < prev[1] + frame_dur - _EPS:
        picked.append(prev)  # the last frame stays on display for one frame duration
    return picked


def _to_pixels(frame, rotation: int, size: tuple[int, int], crop: tuple[int, int, int, int], flip: bool
               ) -> np.ndarray:
    """One frame → ``(th, tw, 3)`` uint8: scaled to the cover size ``size = (rh, rw)`` (display orientation),
    rotated upright, cropped at ``crop = (top, left, th, tw)``, maybe flipped."""
    rh, rw = size
    sw, sh = (rh, rw) if rotation in (90, 270) else (rw, rh)  # the cover size in stored orientation
    arr = frame.reformat(width=sw, height=sh, format="rgb24", interpolation="BICUBIC").to_ndarray()  # (sh, sw, 3)
    if rotation:
        arr = np.rot90(arr, rotation // 90)  # counter-clockwise, as the display matrix says
    top, left, th, tw = crop
    arr = arr[top:top + th, left:left + tw]
    if flip:
        arr = arr[:, ::-1]
    return arr


def decode_video(data: bytes, request: "DecodeRequest", seek: bool = True) -> Decoded:
    """A ``(T, th, tw, 3)`` uint8 clip at ``request.target = (T, th, tw)`` (module docstring). ``seek=False``
    decodes from the first frame instead of seeking (for tests: both give the same clip)."""
    video = request.video
    if video is None:
        from data_pipeline.data_config import VideoConfig

        video = VideoConfig()
    if len(request.target) != 3:
        raise ValueError(f"a video member needs a (frames, h, w) target, got {request.target}")
    n_out, th, tw = request.target
    container, stream, head, frames = _header(data, video, first_frame=False)  # rotation: from the clip's frames
    try:
        return _decode_clip(container, stream, head, frames, video, request, n_out, th, tw, seek)
    except SkipSample:
        raise
    except Exception as e:  # noqa: BLE001
        raise SkipSample("corrupt_video", str(e)[:100]) from e
    finally:
        container.close()


def _decode_clip(container, stream, head: VideoHeader, frames: Iterator, video: Any, request: "DecodeRequest",
                 n_out: int, th: int, tw: int, seek: bool) -> Decoded:
    positions = clip_positions(head.frames, head.fps, n_out, video.frame_stride, video.fps)
    if positions < 1 and video.short_clips != "pad":
        need = (f"{n_out} frames at stride {video.frame_stride}" if video.fps is None
                else f"{n_out} frames at {video.fps} fps")
        raise SkipSample("short_clip", f"{head.frames} frames at {head.fps:.3g} fps, need {need}")
    start = _clip_start(positions, video.clip_start, request.rand) if positions >= 1 else 0
    step = video.frame_stride / head.fps if video.fps is None else 1.0 / video.fps
    times = [head.start + start / head.fps + k * step for k in range(n_out)]
    frame_dur = 1.0 / head.fps
    picked = None
    t_first = times[0]
    if seek and t_first > head.start + _EPS:
        tb = stream.time_base
        try:
            container.seek(int(Fraction(t_first).limit_denominator(1 << 30) / tb), stream=stream, backward=True,
                           any_frame=False)
            picked = _pick(_frames(container, stream), times, frame_dur)
            if picked and picked[0][1] > t_first + _EPS:
                picked = None  # the seek landed after the clip start (a bad index): decode from the start
        except Exception:  # noqa: BLE001 - a container that cannot seek: decode from the start
            picked = None
        if picked is None:
            container.seek(0, stream=stream, backward=True, any_frame=False)
            frames = _frames(container, stream)
    if picked is None:
        picked = _pick(frames, times, frame_dur)
    if not picked:
        raise SkipSample("no_frames", f"no frame at or after {t_first:.3f} s")
    if len(picked) < n_out:
        if video.short_clips != "pad":
            raise SkipSample("short_clip", f"stream ended after {len(picked)} of {n_out} clip frames")
        picked = picked + [picked[-1]] * (n_out - len(picked))
    head.rotation = _rotation(picked[0][0])
    h, w = head.display_size
    rh, rw = cover_geometry(h, w, th, tw)
    top, left = crop_offset(rh, rw, th, tw, request.crop, request.rand)
    flip = request.flip and bool(request.rand & 1)
    out = np.empty((n_out, th, tw, 3), dtype=np.uint8)
    done: dict[int, int] = {}  # id(frame) -> the clip index it was converted for (a frame shown twice: once)
    for k, (frame, _t) in enumerate(picked):
        j = done.get(id(frame))
        if j is not None:
            out[k] = out[j]
            continue
        out[k] = _to_pixels(frame, head.rotation, (rh, rw), (top, left, th, tw), flip)
        done[id(frame)] = k
    return Decoded(out, (h, w), (top, left), (th, tw), clip_start=start,
                   clip_times=tuple(round(t - head.start, 6) for _, t in picked))
