"""Small helpers shared by the networks: activation checkpointing and parameter counts."""

from __future__ import annotations

from typing import Any, Callable

import torch.utils.checkpoint
from torch import nn


def checkpointed(fn: Callable[..., Any], *args: Any, enabled: bool, **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)``, recomputing its activations in backward when ``enabled`` and grad is on.

    Non-reentrant checkpointing (works with keyword arguments, frozen inputs and DDP/FSDP).
    """
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (works on the meta device: nothing is allocated)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
