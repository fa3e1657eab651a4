"""Test helper: small video files written with PyAV into memory, each frame marked with its index.

Frame ``i`` of :func:`clip_bytes` is uniform grey at :func:`level` ``(i)`` (``20 + 4 i``, 4 levels apart, so a
lossy codec's rounding cannot confuse neighbours; :func:`frame_index` reads it back), optionally with a white
``corner`` block (top-left, a quarter of each side) to check rotation, crop and flip.
"""

from __future__ import annotations

import io
from fractions import Fraction
from typing import Optional, Sequence

import av
import numpy as np

CONTAINERS = {"mp4": "mp4", "mov": "mov", "mkv": "matroska", "webm": "webm", "avi": "avi", "gif": "gif"}
CODECS = {"mp4": "libx264", "mov": "libx264", "mkv": "libx264", "webm": "libvpx-vp9", "avi": "mpeg4",
          "gif": "gif"}
MAX_INDEX = 58  # 20 + 4 * 58 = 252


def level(i: int) -> int:
    """The grey level of frame ``i``."""
    if not 0 <= i <= MAX_INDEX:
        raise ValueError(f"frame index {i} outside 0..{MAX_INDEX}")
    return 20 + 4 * i


def frame_index(frame: np.ndarray) -> int:
    """The index of a decoded ``(h, w, 3)`` frame from its median grey level (the corner block ignored)."""
    return int(round((float(np.median(frame)) - 20) / 4))


def frame_array(i: int, h: int, w: int, corner: bool = False) -> np.ndarray:
    a = np.full((h, w, 3), level(i), np.uint8)
    if corner:
        a[: h // 4, : w // 4] = 255
    return a


def clip_bytes(n: int = 12, h: int = 32, w: int = 48, ext: str = "mp4", rate: int = 10, gop: int = 4,
               pts: Optional[Sequence[int]] = None, time_base: Optional[Fraction] = None, rotation: int = 0,
               corner: bool = False, codec: Optional[str] = None) -> bytes:
    """A clip of ``n`` marked frames as ``ext`` (mp4/mov/mkv: H.264, webm: VP9, avi: MPEG-4, gif) at ``rate`` fps
    with a key frame every ``gop`` frames; ``pts`` (in ``time_base``) makes a variable-frame-rate file;
    ``rotation``: display-matrix rotation, degrees counter-clockwise (as ``VideoFrame.rotation`` reads it)."""
    buf = io.BytesIO()
    codec = codec or CODECS[ext]
    with av.open(buf, "w", format=CONTAINERS[ext]) as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height = w, h
        s.pix_fmt = "gray" if codec == "gif" else "yuv420p"
        if time_base is not None:
            s.codec_context.time_base = time_base
        if codec == "libx264":
            s.options = {"g": str(gop), "keyint_min": str(gop), "crf": "12", "preset": "ultrafast"}
        elif codec == "libvpx-vp9":
            s.options = {"g": str(gop), "deadline": "realtime", "cpu-used": "8", "crf": "10", "b:v": "0"}
        elif codec == "mpeg4":
            s.options = {"g": str(gop), "qmin": "1", "qmax": "2"}
        if rotation:
            s.set_display_rotation(rotation)
        for i in range(n):
            f = av.VideoFrame.from_ndarray(frame_array(i, h, w, corner), format="rgb24")
            if pts is not None:
                f.pts, f.time_base = pts[i], time_base
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def audio_bytes(ext: str = "mp4") -> bytes:
    """A container holding only an AAC audio stream (0.6 s of silence)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=CONTAINERS[ext]) as c:
        s = c.add_stream("aac", rate=16000)
        for i in range(10):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = 16000, i * 1024
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def undecodable_bytes(n: int = 5) -> bytes:
    """A Matroska file with a valid MPEG-4 video stream header whose packets are random bytes: no frame decodes."""
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    with av.open(buf, "w", format="matroska") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        s.codec_context.open()
        for i in range(n):
            p = av.Packet(bytes(rng.integers(0, 256, 300, dtype=np.uint8)))
            p.stream, p.pts, p.dts = s, i * 100, i * 100
            c.mux(p)
    return buf.getvalue()


def unknown_codec_bytes() -> bytes:
    """An AVI whose video stream's codec tag names no decoder (``ZZZZ``)."""
    data = clip_bytes(6, ext="avi")
    assert data.count(b"FMP4") == 2
    return data.replace(b"FMP4", b"ZZZZ")


def absurd_length_bytes() -> bytes:
    """A Matroska clip whose last frame is stamped 10^5 s after the others: the header claims ~10^6 frames."""
    tb = Fraction(1, 10)
    return clip_bytes(5, ext="mkv", codec="mpeg4", pts=[0, 1, 2, 3, 1_000_000], time_base=tb)
