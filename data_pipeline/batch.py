"""The batch the loader yields: pixels, captions, keys, metadata, SDXL size/crop conditioning, precomputed arrays.

``pixels`` is float32 in [-1, 1] in the project's one layout: ``(B, C, H, W)`` for images, ``(B, C, T, H, W)``
for clips (an image may also come as ``T = 1``); one sample, ``pixels[i]``, is ``(C, H, W)`` or ``(C, T, H, W)``.
A loader batch carries them as uint8 (``pixel_data``, the same layout): that is what crosses from the worker
process to the main process (shared memory), gets pinned and is copied to the device — a quarter of float32's
bytes. Reading ``pixels`` converts them there, lazily and once per batch, by
:func:`~data_pipeline.transforms.normalize_pixels` (``v / 127.5 - 1``, the same float32 values on every device):
``batch.to(device).pixels`` is float on the device. A batch built from float pixels keeps them as they are.
Code that needs the frame size reads ``pixels.shape[-2:]`` (or ``target_size``), the frame count
:attr:`Batch.num_frames`. The geometry fields (``original_size``, ``crop_top_left``, ``target_size``) are
spatial, ``(h, w)`` / ``(top, left)`` per sample, the same for every frame of a clip. Without pixel members
(``image_keys: []``, latents-only shards) ``pixels`` is None.

Precomputed arrays come from ``.npy`` / ``.safetensors`` tar members (never pickles): the member named by
``DataConfig.latent_key`` (default ``KEY.latent.npy``) becomes ``latents`` ``(B, ...)`` when every sample of the
batch has one of the same shape (else None); each member in ``DataConfig.extra_keys`` (e.g. ``t5.npy``) becomes
``extras["t5"]``, stacked the same way.

A decoded clip adds where it was taken to its sample's metadata (a copy of the json dict): ``clip_start_frame``
(the first sampled frame, counted at the video's average rate) and ``clip_frame_times`` (each frame's timestamp in
seconds from the stream start). They are not ``clip_start`` / ``clip_end``, which a curated clip's json holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from data_pipeline.transforms import Decoded, normalize_pixels, to_float_pixels, to_uint8_pixels


@dataclass(init=False)
class Batch:
    pixel_data: Optional[torch.Tensor]  # (B, C, H, W) or (B, C, T, H, W): uint8 from the loader, or float in [-1, 1]
    captions: list[str]  # one caption per sample
    keys: list[str]  # the sample keys (tar member stem)
    metadata: list[dict]  # the sample's json member ({} when absent)
    original_size: torch.Tensor  # (B, 2) int64 (h, w) of the stored image / frames
    crop_top_left: torch.Tensor  # (B, 2) int64 (top, left) of the crop in the resized image / frames
    target_size: torch.Tensor  # (B, 2) int64 (h, w) of pixels (the bucket's spatial size)
    latents: Optional[torch.Tensor] = None  # (B, ...) precomputed latents read from the shards
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # other precomputed arrays, (B, ...) each
    sources: list[str] = field(default_factory=list)  # the source name each sample came from

    def __init__(self, pixels: Optional[torch.Tensor] = None, captions: Optional[list[str]] = None,
                 keys: Optional[list[str]] = None, metadata: Optional[list[dict]] = None,
                 original_size: Optional[torch.Tensor] = None, crop_top_left: Optional[torch.Tensor] = None,
                 target_size: Optional[torch.Tensor] = None, latents: Optional[torch.Tensor] = None,
                 extras: Optional[dict[str, torch.Tensor]] = None, sources: Optional[list[str]] = None, *,
                 pixel_data: Optional[torch.Tensor] = None):
        """``pixels``: uint8 (normalised when read, on their device) or float32 in [-1, 1] (kept). ``pixel_data``
        is the same argument under the field's name, so ``dataclasses.replace(batch, ...)`` works."""
        if pixel_data is not None:
            if pixels is not None:
                raise TypeError("Batch: give pixels or pixel_data, not both")
            pixels = pixel_data
        required = {"captions": captions, "keys": keys, "metadata": metadata, "original_size": original_size,
                    "crop_top_left": crop_top_left, "target_size": target_size}
        missing = [name for name, value in required.items() if value is None]
        if missing:
            raise TypeError(f"Batch: missing {', '.join(missing)}")
        self.pixel_data = pixels
        self.captions, self.keys, self.metadata = captions, keys, metadata
        self.original_size, self.crop_top_left, self.target_size = original_size, crop_top_left, target_size
        self.latents = latents
        self.extras = {} if extras is None else extras
        self.sources = [] if sources is None else sources
        self._float: Optional[torch.Tensor] = None  # pixels normalised, once read (never pickled)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def pixels(self) -> Optional[torch.Tensor]:
        """Float32 pixels in [-1, 1], on ``pixel_data``'s device: uint8 data is normalised on first read
        (:func:`~data_pipeline.transforms.normalize_pixels`, the only conversion of loader pixels) and kept."""
        x = self.pixel_data
        if x is None or x.dtype != torch.uint8:
            return x
        if self._float is None:
            self._float = normalize_pixels(x)
        return self._float

    @pixels.setter
    def pixels(self, value: Optional[torch.Tensor]) -> None:
        self.pixel_data, self._float = value, None

    @property
    def num_frames(self) -> int:
        """Frames per sample: ``T`` of ``(B, C, T, H, W)`` pixels, 1 for 4-D images or no pixels."""
        x = self.pixel_data
        return 1 if x is None or x.ndim == 4 else int(x.shape[2])

    @property
    def nbytes(self) -> int:
        """Bytes of the batch's tensors as they travel (worker to main process, host to device), pixels as held."""
        tensors = [self.pixel_data, self.original_size, self.crop_top_left, self.target_size, self.latents,
                   *self.extras.values()]
        return sum(t.nbytes for t in tensors if t is not None)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_float": None}  # the float copy is made where it is used, never sent

    def _map(self, fn) -> "Batch":
        out = Batch(
            pixels=None if self.pixel_data is None else fn(self.pixel_data),
            captions=self.captions, keys=self.keys, metadata=self.metadata,
            original_size=fn(self.original_size), crop_top_left=fn(self.crop_top_left),
            target_size=fn(self.target_size),
            latents=None if self.latents is None else fn(self.latents),
            extras={k: fn(v) for k, v in self.extras.items()}, sources=self.sources,
        )
        if out.pixel_data is self.pixel_data:  # nothing moved (already there): the float copy still holds
            out._float = self._float
        return out

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on ``device`` (lists are shared); uint8 pixels travel as uint8 and become float
        on ``device`` when :attr:`pixels` is read."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """A copy with every tensor in page-locked memory (DataLoader's ``pin_memory=True`` calls this): the uint8
        pixels, not a float copy."""
        return self._map(lambda t: t.pin_memory())


def _stack_optional(arrays: Sequence[Optional[np.ndarray]]) -> Optional[torch.Tensor]:
    if not arrays or any(a is None for a in arrays):
        return None
    shape = arrays[0].shape  # type: ignore[union-attr]
    if any(a.shape != shape for a in arrays):  # type: ignore[union-attr]
        return None
    return torch.from_numpy(np.stack(arrays))  # type: ignore[arg-type]


GEOMETRY_KEYS = ("original_size", "crop_top_left", "target_size")  # per-sample json keys (cache stage)
CLIP_START_KEY = "clip_start_frame"  # metadata of a decoded clip: its first frame (at the average frame rate)
CLIP_TIMES_KEY = "clip_frame_times"  # metadata of a decoded clip: each frame's timestamp (seconds from the start)


def collate(decoded: Sequence[Optional[Decoded]], captions: Sequence[str], keys: Sequence[str],
            metadata: Sequence[dict], sources: Sequence[str] = (),
            latents: Sequence[Optional[np.ndarray]] = (), extras: Optional[dict[str, list]] = None,
            float_pixels: bool = False) -> Batch:
    """Stack per-sample pieces into a :class:`Batch`: pixels as uint8 channels-first (``float_pixels``: float32 in
    [-1, 1] made here, the loader's former behaviour, for the before/after benchmark)."""
    n = len(keys)
    if decoded and decoded[0] is not None:
        stack = np.stack([d.pixels for d in decoded])  # (B, H, W, 3) or (B, T, H, W, 3) uint8
        pixels = to_float_pixels(stack) if float_pixels else to_uint8_pixels(stack)  # (B, 3, [T,] H, W)
        geo = lambda attr: torch.tensor([getattr(d, attr) for d in decoded], dtype=torch.int64)  # noqa: E731
        original, crop, target = geo("original_size"), geo("crop_top_left"), geo("target_size")
    elif n and all(all(k in m for k in GEOMETRY_KEYS) for m in metadata):
        # cached latents: the geometry of the image they were encoded from, as the cache stage recorded it
        pixels = None
        original, crop, target = (torch.tensor([m[k] for m in metadata], dtype=torch.int64).reshape(n, 2)
                                  for k in GEOMETRY_KEYS)
    else:
        pixels = None
        shapes = [tuple(a.shape[-2:]) if a is not None and a.ndim >= 2 else (0, 0) for a in latents] or [(0, 0)] * n
        original = torch.tensor(shapes, dtype=torch.int64).reshape(n, 2)
        crop = torch.zeros(n, 2, dtype=torch.int64)
        target = original.clone()
    ext = {}
    for name, arrs in (extras or {}).items():
        t = _stack_optional(arrs)
        if t is not None:
            ext[name] = t
    metadata = [m if d is None or d.clip_start is None else  # clips: where the clip was taken (a copy: the json
                {**m, CLIP_START_KEY: d.clip_start, CLIP_TIMES_KEY: list(d.clip_times or ())}  # stays untouched)
                for m, d in zip(metadata, decoded or [None] * n)]
    return Batch(pixels=pixels, captions=list(captions), keys=list(keys), metadata=list(metadata),
                 original_size=original, crop_top_left=crop, target_size=target,
                 latents=_stack_optional(list(latents)), extras=ext, sources=list(sources))
