"""Small helpers shared by the networks: activation checkpointing, repeated blocks and parameter counts."""

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


def block_class_names(model: nn.Module) -> list[str]:
    """The class names ``model`` gives for its repeated blocks (``_no_split_modules``, the transformers/diffusers
    convention that Accelerate's ``TRANSFORMER_BASED_WRAP`` reads) that it really contains, in its order.

    Looked up on ``model`` itself (a wrapper such as a peft model forwards the attribute to the model inside)."""
    names = list(getattr(model, "_no_split_modules", None) or ())
    present = {type(m).__name__ for m in model.modules()}
    return [n for n in names if n in present]


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """Every sub-module of ``model`` whose class it names as a repeated block (see :func:`block_class_names`), in
    module order: the units that FSDP2 shards one by one and that activation checkpointing wraps. A block nested
    inside another named block is listed too (both are units)."""
    names = set(block_class_names(model))
    return [m for m in model.modules() if m is not model and type(m).__name__ in names]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (works on the meta device: nothing is allocated)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
