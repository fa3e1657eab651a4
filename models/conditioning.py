"""The one conditioning contract every denoiser consumes.

Every denoiser in :mod:`models` is called ``denoiser(x_t, timesteps, cond)`` and returns a tensor shaped like
``x_t``. ``cond`` is a :class:`Conditioning`; a model reads the fields its config asks for and ignores the rest,
so the same batch drives a U-Net or a DiT, an image model or a video model. Conditioning is routed by *field name*,
never by tensor rank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """What a denoiser may be conditioned on. Every tensor field has the batch on its first axis.

    Attributes:
        context: per-token text states ``(B, L, D)`` for cross-attention.
        context_mask: ``(B, L)`` bool, True where a token may be attended to; None means all tokens are valid.
        pooled: pooled text embedding ``(B, Dp)`` (SDXL adds it to the timestep embedding).
        vector: an extra conditioning vector ``(B, Dv)``, e.g. SDXL original-size / crop / target-size
            micro-conditioning already turned into Fourier features (:func:`models.embeddings.fourier_features`).
        class_labels: ``(B,)`` int64 class ids for class-conditional models (ImageNet-style benchmarks).
        num_frames: frames per clip for video models; 1 for images. Not a tensor, so shared by the batch.
    """

    context: Optional[Tensor] = None
    context_mask: Optional[Tensor] = None
    pooled: Optional[Tensor] = None
    vector: Optional[Tensor] = None
    class_labels: Optional[Tensor] = None
    num_frames: int = 1

    def tensors(self) -> dict[str, Tensor]:
        """The fields that are tensors, by name."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }

    @property
    def batch_size(self) -> int:
        sizes = {t.shape[0] for t in self.tensors().values()}
        if len(sizes) != 1:
            raise ValueError(f"Conditioning fields disagree on the batch size: {sorted(sizes)}")
        return sizes.pop()

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Conditioning":
        """Move every tensor; floating tensors also take ``dtype`` (masks and labels keep theirs)."""
        moved = {}
        for name, t in self.tensors().items():
            moved[name] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
        return dataclasses.replace(self, **moved)

    def trim_context(self) -> "Conditioning":
        """Drop trailing token positions that no sample may attend to (exact: masked keys add nothing).

        CLIP pads every prompt to 77 tokens; a batch of short captions needs only the first few, which makes
        cross-attention several times cheaper. Without a mask nothing is trimmed.
        """
        if self.context is None or self.context_mask is None:
            return self
        valid = self.context_mask.any(dim=0).nonzero()
        length = int(valid.max()) + 1 if valid.numel() else 1
        if length == self.context.shape[1]:
            return self
        return dataclasses.replace(self, context=self.context[:, :length], context_mask=self.context_mask[:, :length])

