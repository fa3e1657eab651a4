"""Decoding and geometric transforms: image header, resize-to-cover, crop, flip; array members.

The image functions here are the ``image`` entry of the member-decoder table (:mod:`data_pipeline.decoders`).

Per sample: PIL opens the bytes (header only), optionally asks the JPEG decoder for a reduced DCT scale that still
covers the target (``draft``), converts to 8-bit RGB (:func:`to_rgb`: every mode PIL reads; transparency
composited onto white; 16/32-bit integer and float greys scaled by their range), turns the pixels upright as the
EXIF orientation tag says (:func:`exif_orientation`), and resizes the crop region of the source straight to the
target size with an antialiased bicubic filter (``Image.resize(box=...)``: the same pixels as "resize the shorter
side, then crop", without producing the cropped-away part). The crop offset ``(top, left)`` is recorded in the
coordinates of the resized (uncropped, unflipped) image and the original size ``(h, w)`` is the image's size as
displayed (after the EXIF rotation; the probe :func:`image_size` reports the same), as SDXL's size and crop
micro-conditioning (Podell et al. 2023, sec. 2.2) expects. Flips (probability 0.5) and random crops draw from a
per-sample counter-based number, so a sample looks the same whenever (and in whichever process) it is decoded.
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

_BICUBIC = Image.Resampling.BICUBIC
ARRAY_SUFFIXES = (".npy", ".safetensors")


@dataclass
class Decoded:
    """One decoded sample's pixels and geometry (what every :mod:`data_pipeline.decoders` entry returns).

    Pixels are channels last, as decoders produce them: ``(H, W, 3)`` for an image, ``(T, H, W, 3)`` for a clip.
    The geometry is spatial and the same for every frame of a clip (SDXL micro-conditioning)."""

    pixels: np.ndarray  # (H, W, 3) uint8 for an image; (T, H, W, 3) uint8 for a clip
    original_size: tuple[int, int]  # (h, w) of the stored image / frames
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    target_size: tuple[int, int]  # (h, w) of pixels
    clip_start: Optional[int] = None  # clips: the first sampled frame (at the average rate); None for an image
    clip_times: Optional[tuple[float, ...]] = None  # clips: each frame's timestamp, seconds from the stream start

    @property
    def shape(self) -> tuple[int, ...]:
        """The pixels' shape without channels: ``(h, w)`` for an image, ``(frames, h, w)`` for a clip."""
        return tuple(self.pixels.shape[:-1])

    @property
    def num_frames(self) -> int:
        """Frames held: 1 for an image."""
        return 1 if self.pixels.ndim == 3 else int(self.pixels.shape[0])


# EXIF orientation tag value -> the transpose that turns the stored pixels upright (TIFF 6.0 / EXIF 2.3, tag 0x0112)
EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION_TAG = 0x0112


@functools.cache
def _pillow_orients_tiff() -> bool:
    """Whether this Pillow turns TIFF pixels upright itself (its header size is then the displayed size already and
    the tag is dropped on load): checked once on a 2x1 TIFF tagged "rotate 90"."""
    buf = io.BytesIO()
    Image.new("L", (2, 1)).save(buf, format="TIFF", tiffinfo={_ORIENTATION_TAG: 6})
    with Image.open(buf) as im:
        return im.size == (1, 2)


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8, 1 = upright) still to apply to ``img``'s pixels, read from the header of an
    image just opened (JPEG APP1, WebP EXIF, PNG eXIf before the image data, XMP ``tiff:Orientation``), without
    decoding pixels; 1 when absent, unreadable or out of range, and for a TIFF this Pillow orients on load.

    Call it before ``load()``: the probe (:func:`image_size`) and the decoder (:func:`decode_image`) then agree."""
    if img.format == "TIFF" and _pillow_orients_tiff():
        return 1
    try:
        value = Image.Image.getexif(img).get(_ORIENTATION_TAG, 1)  # the base method: header only, even for PNG
        value = int(value)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not worth dropping the image for
        return 1
    return value if value in EXIF_TRANSPOSE else 1


def image_size(data: bytes) -> tuple[int, int]:
    """``(h, w)`` as displayed (EXIF orientation applied) from the image header only (PIL's lazy open); raises on
    bytes PIL cannot identify."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if exif_orientation(im) >= 5:  # orientations 5..8 turn the image by a quarter: width and height swap
            w, h = h, w
    if w < 1 or h < 1:
        raise ValueError(f"image size {w}x{h}")
    return h, w


def cover_geometry(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
    """Size ``(rh, rw)`` of the image scaled (aspect kept) to just cover ``(th, tw)``."""
    s = max(tw / w, th / h)
    return max(th, round(h * s)), max(tw, round(w * s))


def crop_offset(rh: int, rw: int, th: int, tw: int, crop: str, rand: int) -> tuple[int, int]:
    """``(top, left)`` of a ``(th, tw)`` crop in an ``(rh, rw)`` image: centred, or from the draw ``rand``."""
    if crop == "center":
        return (rh - th) // 2, (rw - tw) // 2
    return ((rand >> 8) & 0xFFFFFF) % (rh - th + 1), ((rand >> 32) & 0xFFFFFF) % (rw - tw + 1)


# modes holding one grey channel of more than 8 bits, read as numbers and scaled by their range (see gray_range)
HIGH_BIT_GRAY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def gray_range(img: Image.Image) -> tuple[float, float]:
    """``(black, white)``: the values of a high-bit grey image (:data:`HIGH_BIT_GRAY_MODES`) that map to 0 and 255.

    * ``I;16*``: unsigned 16 bit, ``(0, 65535)``;
    * ``I`` (Pillow's int32): the file's sample type where it says, as its full range: a PPM/PGM (Pillow scales
      its ``maxval`` to 16 bits) ``(0, 65535)``, a TIFF by ``BitsPerSample`` and ``SampleFormat`` (unsigned
      ``(0, 2**b - 1)``, signed ``(-2**(b-1), 2**(b-1) - 1)``); otherwise int32's range ``(-2**31, 2**31 - 1)``;
    * ``F`` (float32): ``(0.0, 1.0)``, the convention of float images (values outside are clipped, NaN is 0).
    """
    mode = img.mode
    if mode.startswith("I;16"):
        return 0.0, 65535.0
    if mode == "F":
        return 0.0, 1.0
    if img.format == "PPM":
        return 0.0, 65535.0
    if img.format == "TIFF":
        tags = getattr(img, "tag_v2", {})
        bits, fmt = tags.get(258, (32,)), tags.get(339, (1,))
        bits = int(bits[0] if isinstance(bits, tuple) else bits)
        fmt = int(fmt[0] if isinstance(fmt, tuple) else fmt)
        if 1 <= bits <= 32:
            if fmt == 2:
                return -float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1)
            return 0.0, float(2**bits - 1)
    return -float(2**31), float(2**31 - 1)


def _high_bit_to_l(img: Image.Image) -> Image.Image:
    """A high-bit grey image as 8-bit ``L``, its :func:`gray_range` mapped linearly onto 0..255 (rounded)."""
    lo, hi = gray_range(img)
    values = np.asarray(img)  # (h, w) uint16 (either byte order), int32 or float32
    if img.mode == "I" and img.format == "TIFF" and lo == 0.0 and hi == 2.0**32 - 1:
        values = values.view(np.uint32)  # an unsigned 32-bit TIFF: Pillow stores it in int32 (bits kept)
    scaled = (values.astype(np.float64) - lo) * (255.0 / (hi - lo))  # (h, w)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _unpremultiply_la(img: Image.Image) -> Image.Image:
    """``La`` (grey premultiplied by alpha; Pillow converts it to nothing) as ``LA``."""
    la = np.asarray(img).astype(np.float64)  # (h, w, 2)
    alpha = la[..., 1]
    grey = np.where(alpha > 0, la[..., 0] * 255.0 / np.maximum(alpha, 1.0), 0.0)
    out = np.stack([np.clip(np.rint(grey), 0, 255), alpha], -1).astype(np.uint8)  # (h, w, 2)
    return Image.fromarray(out, mode="LA")


def normalize_mode(img: Image.Image) -> Image.Image:
    """``img`` in one of the 8-bit modes every encoder and resampler takes: ``L``, ``LA``, ``RGB`` or ``RGBA``.

    ``L``/``LA``/``RGB``/``RGBA`` stay as they are; high-bit greys (``I``, ``I;16``, ``I;16B``, ``F``, ...) become
    ``L`` scaled by their range (:func:`gray_range`, not clipped at 255 as ``Image.convert`` does); premultiplied
    ``La``/``RGBa`` become ``LA``/``RGBA``; ``PA`` and a palette with transparency become ``RGBA``; everything else
    (``1``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``, ...) becomes ``RGB`` by Pillow's conversion."""
    mode = img.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return img
    if mode in HIGH_BIT_GRAY_MODES:
        return _high_bit_to_l(img)
    if mode == "La":
        return _unpremultiply_la(img)
    if mode in ("PA", "RGBa") or (mode == "P" and "transparency" in img.info):
        return img.convert("RGBA")
    return img.convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit ``RGB`` (:func:`normalize_mode`, then any alpha composited onto white)."""
    if img.mode == "RGB":
        return img
    img = normalize_mode(img)
    if img.mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, target: tuple[int, int], crop: str = "center", flip: bool = False, rand: int = 0,
                 draft: bool = True) -> Decoded:
    """Decode ``data`` into a ``target = (th, tw)`` RGB array: resize to cover, crop, maybe flip (see module doc)."""
    th, tw = target
    img = Image.open(io.BytesIO(data))
    orientation = exif_orientation(img)
    quarter = orientation >= 5  # stored sideways: the displayed image is the stored one transposed
    w, h = img.size[::-1] if quarter else img.size  # as displayed
    rh, rw = cover_geometry(h, w, th, tw)
    top, left = crop_offset(rh, rw, th, tw, crop, rand)
    if draft and img.format == "JPEG":
        img.draft("RGB", (rh, rw) if quarter else (rw, rh))  # decode at 1/2, 1/4 or 1/8 scale that still covers
    img = to_rgb(img)
    if orientation != 1:
        img = img.transpose(EXIF_TRANSPOSE[orientation])  # upright, before the crop box is taken
    fx, fy = img.width / rw, img.height / rh  # resized-image pixels -> (drafted) source pixels
    box = (left * fx, top * fy, (left + tw) * fx, (top + th) * fy)
    out = img.resize((tw, th), _BICUBIC, box=box)
    if flip and rand & 1:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(out, dtype=np.uint8)  # (th, tw, 3)
    return Decoded(pixels, (h, w), (top, left), (th, tw))


def array_name(ext: str) -> str:
    """Batch.extras name of an array member: ``'t5.npy'`` → ``'t5'``."""
    for suf in ARRAY_SUFFIXES:
        if ext.endswith(suf):
            return ext[: -len(suf)].rstrip(".") or suf.lstrip(".")
    return ext


def array_shape(data: bytes, ext: str) -> tuple[int, ...]:
    """Shape of an ``.npy`` / ``.safetensors`` member from its header only (no array is read)."""
    if ext.endswith("safetensors"):
        n = int.from_bytes(data[:8], "little")
        header = {k: v for k, v in json.loads(data[8:8 + n]).items() if k != "__metadata__"}
        entry = next(iter(header.values())) if len(header) == 1 else header[array_name(ext)]
        return tuple(int(x) for x in entry["shape"])
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return tuple(int(x) for x in read(f)[0])


def load_array(data: bytes, ext: str) -> np.ndarray:
    """An ``.npy`` member (no pickles) or a ``.safetensors`` member (its only tensor, or the one named like
    the member) as a numpy array."""
    if ext.endswith("safetensors"):
        from safetensors.numpy import load

        tensors = load(data)
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        name = array_name(ext)
        if name in tensors:
            return tensors[name]
        raise ValueError(f"{len(tensors)} tensors ({', '.join(sorted(tensors))}) and none named {name!r}")
    return np.load(io.BytesIO(data), allow_pickle=False)


PIXEL_SCALE = 127.5  # uint8 value v -> float32 v / 127.5 - 1: 0 -> -1.0, 255 -> 1.0


def _scale_(x):
    """The one place of the pixel arithmetic: a float32 tensor holding uint8 values, in place, ``x / 127.5 - 1``
    (true float32 division, then subtraction: the values batches have always held, so cached latents and
    resumed runs are unchanged)."""
    return x.div_(PIXEL_SCALE).sub_(1.0)


def _channels_first(stack: np.ndarray, dtype, itemsize: int):
    """Channels-last uint8 numpy → a contiguous ``dtype`` torch tensor with channels at axis 1; inside a DataLoader
    worker it is written straight into shared memory (as DataLoader's own collate does), so sending the batch to
    the main process does not copy it once more."""
    import torch
    from torch.utils.data import get_worker_info

    if stack.dtype != np.uint8:
        raise TypeError(f"pixels must be uint8, got {stack.dtype}")
    x = torch.from_numpy(stack).movedim(-1, 1)  # (B, 3, [T,] H, W) uint8 view
    if get_worker_info() is None:
        return x.to(dtype, memory_format=torch.contiguous_format)
    storage = torch.empty(0, dtype=torch.uint8).untyped_storage()._new_shared(x.numel() * itemsize)
    out = torch.empty(0, dtype=dtype).set_(storage, 0, tuple(x.shape))  # (B, 3, [T,] H, W), shared
    return out.copy_(x)


def to_uint8_pixels(stack: np.ndarray):
    """Channels-last uint8 numpy → channels at axis 1, a contiguous uint8 torch tensor: ``(B, H, W, 3)`` →
    ``(B, 3, H, W)`` for images, ``(B, T, H, W, 3)`` → ``(B, 3, T, H, W)`` for clips — what a loader batch holds
    (:class:`data_pipeline.batch.Batch`) on its way to the device: one byte a value, a quarter of float32's."""
    import torch

    return _channels_first(stack, torch.uint8, 1)


@functools.cache
def pixel_table(device) -> torch.Tensor:
    """The 256 float32 values of :func:`normalize_pixels`, index = uint8 value, computed on the CPU by
    :func:`_scale_` and copied to ``device`` (once per device)."""
    import torch

    table = _scale_(torch.arange(256, dtype=torch.uint8).to(torch.float32))  # (256,)
    return table.to(device)


def normalize_by_table(x):
    """:func:`normalize_pixels` as a gather from :func:`pixel_table`: the CPU's values on any device, bit for bit."""
    import torch

    out = pixel_table(x.device).index_select(0, x.reshape(-1).to(torch.int32))  # (numel,)
    return out.view(x.shape)


def normalize_pixels(x):
    """uint8 pixels → float32 in [-1, 1] (``v / 127.5 - 1``), same shape, on ``x``'s device: the one conversion
    every consumer of loader pixels goes through (:attr:`data_pipeline.batch.Batch.pixels`).

    On the CPU the arithmetic runs as it always did (:func:`_scale_`). Elsewhere the values are gathered from a
    256-entry table computed on the CPU (:func:`normalize_by_table`): CUDA divides a tensor by a Python number as a
    multiplication by its float32 reciprocal, which rounds 126 of the 256 values differently, so the arithmetic
    on a GPU would give other latents than a CPU run (and than the float batches made before).
    """
    import torch

    if x.dtype != torch.uint8:
        raise TypeError(f"normalize_pixels: expected uint8 pixels, got {x.dtype}")
    if x.device.type == "cpu":
        return _scale_(x.to(torch.float32, memory_format=torch.contiguous_format))
    return normalize_by_table(x)


def to_float_pixels(stack: np.ndarray):
    """Channels-last uint8 numpy → channels at axis 1, float32 torch tensor in [-1, 1]: ``(B, H, W, 3)`` →
    ``(B, 3, H, W)`` for images, ``(B, T, H, W, 3)`` → ``(B, 3, T, H, W)`` for clips, on the CPU (in shared
    memory inside a DataLoader worker). Loader batches no longer carry these (they hold :func:`to_uint8_pixels`,
    normalised on the device); this is the float path for code that needs it on the host (and
    ``build_loader(..., float_pixels=True)``, the loader's former behaviour kept for the before/after benchmark)."""
    import torch

    return _scale_(_channels_first(stack, torch.float32, 4))
