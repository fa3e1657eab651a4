"""Forward FLOPs of a model, measured with PyTorch's ``FlopCounterMode`` on the meta device.

Conventions, stated once: :func:`count_flops` returns FLOPs with **2 per multiply-accumulate** (what
``torch.utils.flop_counter`` counts). Papers in this area usually tabulate multiply-adds and call them "Gflops"
(DiT's 118.6 for DiT-XL/2 is multiply-adds); :func:`count_macs` is ``count_flops // 2`` for comparing with them.
Only matrix products and convolutions are counted (linear, conv, bmm/matmul, attention); normalisations,
activations and elementwise ops are not, as in those papers.

Everything runs on the meta device: the model's parameters and buffers are swapped for meta tensors through
``torch.func.functional_call`` (the model itself is not modified), and the inputs (tensors, a
:class:`~models.conditioning.Conditioning`, or lists/tuples/dicts of them) are turned into meta tensors of the
same shape and dtype, so nothing is allocated however large the model. On meta, ``F.scaled_dot_product_attention``
decomposes into batched matmuls, so attention FLOPs are counted for every attention backend (on a real CPU tensor
the fused SDPA kernel is invisible to the counter, which is another reason to count on meta).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from models.conditioning import Conditioning


def to_meta(obj: Any) -> Any:
    """Meta copies (same shape, dtype) of every tensor in ``obj``: a tensor, Conditioning, dataclass, list, tuple,
    dict; anything else is returned unchanged."""
    if isinstance(obj, Tensor):
        return torch.empty_like(obj, device="meta")
    if isinstance(obj, Conditioning) or (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        changes = {f.name: to_meta(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_meta(o) for o in obj)
    if isinstance(obj, dict):
        return {k: to_meta(v) for k, v in obj.items()}
    return obj


def count_flops(model: nn.Module, *inputs: Any, **kwargs: Any) -> int:
    """Forward FLOPs (2 per multiply-accumulate) of ``model(*inputs, **kwargs)``, computed on meta tensors."""
    state = {name: to_meta(t) for name, t in model.named_parameters(remove_duplicate=False)}
    state.update({name: to_meta(t) for name, t in model.named_buffers(remove_duplicate=False) if t is not None})
    args, kw = to_meta(inputs), to_meta(kwargs)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        torch.func.functional_call(model, state, args, kw, tie_weights=True, strict=False)
    return int(counter.get_total_flops())


def count_macs(model: nn.Module, *inputs: Any, **kwargs: Any) -> int:
    """Forward multiply-accumulates (``count_flops // 2``): the unit of the DiT paper's "Gflops" column."""
    return count_flops(model, *inputs, **kwargs) // 2
