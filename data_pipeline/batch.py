"""The batch the loader yields: pixels, captions, keys, metadata, SDXL size/crop conditioning, precomputed arrays.

``pixels`` is float32 in [-1, 1] in the project's one layout: ``(B, C, H, W)`` for images, ``(B, C, T, H, W)``
for clips (an image may also come as ``T = 1``); one sample, ``pixels[i]``, is ``(C, H, W)`` or ``(C, T, H, W)``.
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

from data_pipeline.transforms import Decoded, to_float_pixels


@dataclass
class Batch:
    pixels: Optional[torch.Tensor]  # (B, C, H, W) images or (B, C, T, H, W) clips, float32 in [-1, 1]
    captions: list[str]  # one caption per sample
    keys: list[str]  # the sample keys (tar member stem)
    metadata: list[dict]  # the sample's json member ({} when absent)
    original_size: torch.Tensor  # (B, 2) int64 (h, w) of the stored image / frames
    crop_top_left: torch.Tensor  # (B, 2) int64 (top, left) of the crop in the resized image / frames
    target_size: torch.Tensor  # (B, 2) int64 (h, w) of pixels (the bucket's spatial size)
    latents: Optional[torch.Tensor] = None  # (B, ...) precomputed latents read from the shards
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # other precomputed arrays, (B, ...) each
    sources: list[str] = field(default_factory=list)  # the source name each sample came from

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_frames(self) -> int:
        """Frames per sample: ``T`` of ``(B, C, T, H, W)`` pixels, 1 for 4-D images or no pixels."""
        return 1 if self.pixels is None or self.pixels.ndim == 4 else int(self.pixels.shape[2])

    def _map(self, fn) -> "Batch":
        return Batch(
            pixels=None if self.pixels is None else fn(self.pixels),
            captions=self.captions, keys=self.keys, metadata=self.metadata,
            original_size=fn(self.original_size), crop_top_left=fn(self.crop_top_left),
            target_size=fn(self.target_size),
            latents=None if self.latents is None else fn(self.latents),
            extras={k: fn(v) for k, v in self.extras.items()}, sources=self.sources,
        )

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on ``device`` (lists are shared)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """A copy with every tensor in page-locked memory (DataLoader's ``pin_memory=True`` calls this)."""
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
            latents: Sequence[Optional[np.ndarray]] = (), extras: Optional[dict[str, list]] = None) -> Batch:
    """Stack per-sample pieces into a :class:`Batch` (pixels converted to float once, for the whole batch)."""
    n = len(keys)
    if decoded and decoded[0] is not None:
        pixels = to_float_pixels(np.stack([d.pixels for d in decoded]))  # (B, 3, H, W) or (B, 3, T, H, W)
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
