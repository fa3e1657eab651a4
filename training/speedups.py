"""Speed options the trainer applies to the trained module, by config (``train.compile``,
``train.activation_checkpointing``, ``train.channels_last``), without changing its parameters' names or values.

* **Regional compilation** (``compile: blocks``): ``torch.compile`` of each repeated block (the classes the model
  names in ``_no_split_modules``, :func:`models.utils.repeated_blocks`) rather than of the whole model: the blocks of
  a model share one compiled graph (same code, same shapes), so compiling costs one block's time, and the graph
  breaks of the model's outer code (conditioning, patching, variable clip shapes) stay outside. Applied after
  Accelerate's ``prepare`` (FSDP2's per-block wrapping first, as torch documents for ``fully_shard``).
* **Activation checkpointing** (``blocks``: each repeated block's activations recomputed in backward; ``selective``:
  torch's selective activation checkpointing, ``torch.utils.checkpoint.create_selective_checkpoint_contexts``,
  keeping the outputs of the matrix products, convolutions and attention kernels and recomputing the cheap
  element-wise ops and normalisations — most of the memory saving for a small share of the recomputation, as in
  Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models", 2022). The block's
  ``forward`` is wrapped on the instance, so parameter names, state dicts and checkpoints are unchanged.
* **Channels-last** (``channels_last: true``): 4-D convolution weights in ``torch.channels_last`` (5-D in
  ``channels_last_3d``), which makes cuDNN pick its NHWC kernels and propagate the layout to the activations.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from models.utils import repeated_blocks

_aten = torch.ops.aten
SAVED_OPS = frozenset(  # outputs kept by selective checkpointing: the expensive ops (matmul, conv, attention)
    op for op in (
        _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten.convolution.default,
        getattr(_aten, "_scaled_dot_product_flash_attention", None),
        getattr(_aten, "_scaled_dot_product_efficient_attention", None),
        getattr(_aten, "_scaled_dot_product_cudnn_attention", None),
        getattr(_aten, "_flash_attention_forward", None),
        getattr(_aten, "_efficient_attention_forward", None),
    ) if op is not None
)


def _save_expensive(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    packet = getattr(op, "overloadpacket", op)
    if op in SAVED_OPS or packet in SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed_forward(forward: Callable[..., Any], selective: bool, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():  # evaluation: nothing to recompute
        return forward(*args, **kwargs)
    context = functools.partial(create_selective_checkpoint_contexts, _save_expensive) if selective else None
    extra = {"context_fn": context} if context is not None else {}
    return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)


def blocks_of(model: nn.Module, what: str) -> list[nn.Module]:
    """The model's repeated blocks, outermost only (a block nested in another is covered by it)."""
    blocks = repeated_blocks(model)
    inside = {id(m) for b in blocks for m in b.modules() if m is not b}
    outer = [b for b in blocks if id(b) not in inside]
    if not outer:
        raise ValueError(f"train.{what}: {type(model).__name__} names no repeated blocks (_no_split_modules) to "
                         "apply it to")
    return outer


def apply_activation_checkpointing(model: nn.Module, mode: str) -> int:
    """Wrap each outermost repeated block's ``forward`` in activation checkpointing (``blocks`` or ``selective``;
    ``none``: nothing). Returns the number of blocks wrapped."""
    if mode == "none":
        return 0
    if mode not in ("blocks", "selective"):
        raise ValueError(f"train.activation_checkpointing: {mode!r} must be none, blocks or selective")
    blocks = blocks_of(model, "activation_checkpointing")
    for block in blocks:
        block.forward = functools.partial(_checkpointed_forward, block.forward, mode == "selective")
    return len(blocks)


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` each outermost repeated block in place (regional compilation). Returns how many."""
    blocks = blocks_of(model, "compile")
    for block in blocks:
        block.compile()
    return len(blocks)


def apply_channels_last(model: nn.Module) -> int:
    """Convolution weights to channels-last (4-D) / channels-last-3d (5-D), in place. Returns how many tensors."""
    n = 0
    with torch.no_grad():
        for p in model.parameters():
            fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(p.dim())
            if fmt is not None:
                p.data = p.data.contiguous(memory_format=fmt)
                n += 1
    return n
