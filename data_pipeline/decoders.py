"""One decoder per kind of pixel member: the table that turns a tar member's bytes into a :class:`Decoded`.

A sample's pixel member is the first of ``DataConfig.image_keys`` present in the sample; its extension picks a
:class:`MemberDecoder` from :data:`DECODERS` (the exact extension, else the part after its last dot, so
``hq.png`` is a ``png``). Each decoder has two steps:

* ``probe(data, cfg) -> shape``: the header only, cheap, run when the sample is read (before the shuffle buffer):
  the shape without channels, ``(h, w)`` for an image, ``(frames, h, w)`` for a clip. ``cfg`` is the loader's
  :class:`~data_pipeline.data_config.DataConfig` (limits, clip sampling; None outside a loader). Buckets and
  queues are keyed by the shape; bytes the probe rejects are skipped as ``corrupt_<kind>``, or under the reason
  a :class:`~data_pipeline.errors.SkipSample` names (``short_clip``, ``audio_only``, ...).
* ``decode(data, request) -> Decoded``: the pixels at ``request.target`` (the same axes as the probe's shape),
  cropped and flipped as the request says, channels last as decoders produce them: ``(h, w, 3)`` for an image,
  ``(frames, h, w, 3)`` for a clip. :func:`data_pipeline.batch.collate` moves channels to axis 1, giving the
  project's one layout, ``(B, C, H, W)`` or ``(B, C, T, H, W)``.

Video (mp4, webm, mov, mkv, avi, gif) is the ``video`` entry, :mod:`data_pipeline.video` (PyAV); a clip's
sampling (frames, stride or rate, clip start, short clips, limits) travels in ``DecodeRequest.video``. A new
member type is one more :class:`MemberDecoder` registered with :func:`register`. Precomputed arrays (``.npy`` /
``.safetensors``) are not pixels and keep their own readers
(:func:`data_pipeline.transforms.array_shape`, :func:`~data_pipeline.transforms.load_array`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from data_pipeline.transforms import Decoded, decode_image, image_size
from data_pipeline.video import EXTENSIONS as VIDEO_EXTENSIONS
from data_pipeline.video import decode_video, probe_video

if TYPE_CHECKING:
    from data_pipeline.data_config import VideoConfig


@dataclass(frozen=True)
class DecodeRequest:
    """What the worker asks of a decoder for one sample: the output geometry and the augmentation draw."""

    target: tuple[int, ...]  # output shape without channels: (h, w) for an image, (frames, h, w) for a clip
    crop: str = "center"  # "center", or "random" (offsets from ``rand``)
    flip: bool = False  # flip horizontally when the lowest bit of ``rand`` is set
    rand: int = 0  # the sample's counter-based 64-bit draw (the same whenever and wherever it is decoded)
    jpeg_draft: bool = True  # JPEG only: decode at a reduced DCT scale that still covers the target
    video: Optional["VideoConfig"] = None  # clips: stride or rate, clip start, short clips, limits (None: defaults)


@dataclass(frozen=True)
class MemberDecoder:
    """How one kind of pixel member is probed and decoded (see the module docstring)."""

    kind: str  # what the member holds ("image"); names the skip reason corrupt_<kind>
    extensions: tuple[str, ...]  # member extensions (lower case) this decoder reads
    probe: Callable[..., tuple[int, ...]]  # (bytes, DataConfig or None) -> shape without channels; raises on bad bytes
    decode: Callable[[bytes, DecodeRequest], Decoded]  # bytes -> pixels at request.target; raises on bad bytes


def _decode_image_member(data: bytes, request: DecodeRequest) -> Decoded:
    return decode_image(data, request.target, request.crop, request.flip, request.rand,  # type: ignore[arg-type]
                        request.jpeg_draft)


def _probe_image_member(data: bytes, cfg: Any = None) -> tuple[int, int]:
    return image_size(data)


IMAGE = MemberDecoder(
    kind="image",
    extensions=("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff"),  # PIL sniffs the format from the bytes
    probe=_probe_image_member,
    decode=_decode_image_member,
)

VIDEO = MemberDecoder(
    kind="video",
    extensions=VIDEO_EXTENSIONS,  # mp4, webm, mov, mkv, avi, gif (an animated gif is a clip; PyAV reads them all)
    probe=probe_video,
    decode=decode_video,
)

DECODERS: dict[str, MemberDecoder] = {}  # member extension -> its decoder


def register(decoder: MemberDecoder) -> None:
    """Add ``decoder`` to :data:`DECODERS` under each of its extensions (an extension already taken is an error)."""
    for ext in decoder.extensions:
        taken = DECODERS.get(ext)
        if taken is not None and taken is not decoder:
            raise ValueError(f"member extension {ext!r}: already decoded as {taken.kind}, cannot add {decoder.kind}")
        DECODERS[ext] = decoder


register(IMAGE)
register(VIDEO)


def member_decoder(ext: str) -> MemberDecoder:
    """The decoder of member extension ``ext`` (``'png'``, or ``'hq.png'`` by its last part); a ``ValueError``
    naming the known extensions when there is none."""
    dec = DECODERS.get(ext) or DECODERS.get(ext.rsplit(".", 1)[-1])
    if dec is None:
        raise ValueError(f"no decoder for member extension {ext!r}; known: {', '.join(sorted(DECODERS))}")
    return dec
