"""Decoding and geometric transforms: image header, resize-to-cover, crop, flip; array members.

The image functions here are the ``image`` entry of the member-decoder table (:mod:`data_pipeline.decoders`).

Per sample: PIL opens the bytes (header only), optionally asks the JPEG decoder for a reduced DCT scale that still
covers the target (``draft``), converts to RGB (transparency composited onto white), and resizes the crop region
of the source straight to the target size with an antialiased bicubic filter (``Image.resize(box=...)``: the
same pixels as "resize the shorter side, then crop", without producing the cropped-away part). The crop offset
``(top, left)`` is recorded in the coordinates of the resized (uncropped, unflipped) image and the original size
``(h, w)`` is the stored image's size, as SDXL's size and crop micro-conditioning (Podell et al. 2023,
sec. 2.2) expects. Flips (probability 0.5) and random crops draw from a per-sample counter-based number, so a
sample looks the same whenever (and in whichever process) it is decoded.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

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


def image_size(data: bytes) -> tuple[int, int]:
    """``(h, w)`` from the image header only (PIL's lazy open); raises on bytes PIL cannot identify."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
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


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, target: tuple[int, int], crop: str = "center", flip: bool = False, rand: int = 0,
                 draft: bool = True) -> Decoded:
    """Decode ``data`` into a ``target = (th, tw)`` RGB array: resize to cover, crop, maybe flip (see module doc)."""
    th, tw = target
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    rh, rw = cover_geometry(h, w, th, tw)
    top, left = crop_offset(rh, rw, th, tw, crop, rand)
    if draft and img.format == "JPEG":
        img.draft("RGB", (rw, rh))  # decode at 1/2, 1/4 or 1/8 scale when that still covers (rw, rh)
    img = _to_rgb(img)
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


def to_float_pixels(stack: np.ndarray):
    """Channels-last uint8 numpy → channels at axis 1, float32 torch tensor in [-1, 1]: ``(B, H, W, 3)`` →
    ``(B, 3, H, W)`` for images, ``(B, T, H, W, 3)`` → ``(B, 3, T, H, W)`` for clips.

    Inside a DataLoader worker the result is written straight into shared memory (as DataLoader's own collate
    does), so sending the batch to the main process does not copy it once more.
    """
    import torch
    from torch.utils.data import get_worker_info

    x = torch.from_numpy(stack).movedim(-1, 1)  # (B, 3, [T,] H, W) uint8 view
    out = None
    if get_worker_info() is not None:
        storage = torch.empty(0).untyped_storage()._new_shared(x.numel() * 4)
        out = torch.empty(0).set_(storage, 0, tuple(x.shape))  # (B, 3, [T,] H, W) float32, shared
        out.copy_(x)
    else:
        out = x.to(torch.float32, memory_format=torch.contiguous_format)
    return out.div_(127.5).sub_(1.0)
