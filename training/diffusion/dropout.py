"""Conditioning dropout for classifier-free guidance training.

Ho & Salimans 2022 ("Classifier-Free Diffusion Guidance", Algorithm 1) train
one network for both the conditional and the unconditional model by replacing
the conditioning with a null token with probability ``p_uncond`` (0.1 here,
as in Stable Diffusion fine-tuning).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .cond_ops import batch_size_of, batched_tensors, expand_batch, where
from .process import rand_device


def dropout_mask(
    batch_size: int,
    p: float,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``(B,)`` bool mask, each entry True with probability ``p`` (drawn with ``generator``)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: got {p!r}; expected a probability in [0, 1]")
    device = torch.device(device)
    u = torch.rand((batch_size,), generator=generator, device=rand_device(generator, device))
    return (u < p).to(device)


def drop_conditioning(
    cond: Any,
    null_cond: Any,
    p: float = 0.1,
    generator: Optional[torch.Generator] = None,
    fields: Optional[Sequence[str]] = None,
) -> tuple[Any, Tensor]:
    """Replace each sample's conditioning by ``null_cond`` with probability ``p``.

    Args:
        cond: batch conditioning (a dataclass of batch-first tensors, or a tensor).
        null_cond: the null conditioning, batch ``B`` or 1 (broadcast).
        p: drop probability per sample.
        generator: ``torch.Generator`` for the draw; one uniform number per sample is
            always drawn, whatever ``p``, so the random stream does not depend on it.
        fields: if given, only these top-level fields are replaced (e.g. ``("context",
            "mask", "pooled")`` to drop text but keep image conditioning).

    Returns:
        ``(new_cond, dropped)``: dropped rows equal ``null_cond`` exactly, the others are
        unchanged; ``dropped`` is the ``(B,)`` bool mask on ``cond``'s device.
    """
    batch = batch_size_of(cond)
    if batch is None:
        raise ValueError("cond holds no batched tensor, cannot infer the batch size")
    tensors = batched_tensors(cond)
    mask = dropout_mask(batch, p, generator, tensors[0].device)
    null_cond = expand_batch(null_cond, batch)
    return where(mask, null_cond, cond, fields=fields), mask
