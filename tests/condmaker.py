"""A small conditioning dataclass of its own for the conditioning and guidance tests: the batch ops, dropout and the
guider work on any dataclass of batch-first tensors, not only ``models.conditioning.Conditioning``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from models.conditioning import cond_field


@dataclass
class TinyCond:
    """A conditioning type of its own: the ops work on any dataclass of batch-first tensors."""

    context: Tensor = cond_field("text")  # (B, L, D) text tokens
    mask: Tensor = cond_field("text")  # (B, L) bool, True = valid token
    pooled: Optional[Tensor] = cond_field("style")  # (B, D), its own dropout group
    num_frames: int = 1  # not a tensor: shared by the batch


def make_cond(batch: int, seed: int, length: int = 5, dim: int = 8, pooled: bool = True) -> TinyCond:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, length, generator=g) > 0.3
    mask[:, 0] = True
    return TinyCond(
        context=torch.randn(batch, length, dim, generator=g),
        mask=mask,
        pooled=torch.randn(batch, dim, generator=g) if pooled else None,
        num_frames=3,
    )


def null_of(batch: int, length: int = 5, dim: int = 8, pooled: bool = True) -> TinyCond:
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, 0] = True
    return TinyCond(
        context=torch.zeros(batch, length, dim),
        mask=mask,
        pooled=torch.zeros(batch, dim) if pooled else None,
        num_frames=3,
    )
