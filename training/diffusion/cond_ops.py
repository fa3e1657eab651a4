"""Batch operations on conditioning objects of any (dataclass) type.

The denoiser takes its conditioning as a dataclass of batch-first tensors
(``models.conditioning.Conditioning``), but this package must not depend on
that type.  These helpers work on any value built from:

* tensors with at least one dimension: the first dimension is the batch;
* ``None``: stays ``None`` (and must be ``None`` on both sides of a binary op);
* dataclass instances, tuples, lists and dicts of the above: handled field by
  field / item by item (dataclasses are rebuilt with ``dataclasses.replace``);
* anything else (an ``int`` frame count, a string, a 0-d tensor, ...): passed
  through unchanged, and required to be equal on both sides of a binary op.

A bare tensor is a valid conditioning object too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor


def _is_batched(value: Any) -> bool:
    return isinstance(value, Tensor) and value.ndim >= 1


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b.to(a.device)))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects whose == is not a plain bool
        return a is b


def _combine(fn: Callable[[Tensor, Tensor], Tensor], a: Any, b: Any, path: str) -> Any:
    """Apply ``fn`` to matching batched tensors of ``a`` and ``b``; check the rest is equal."""
    if a is None or b is None:
        if a is None and b is None:
            return None
        raise ValueError(f"conditioning field {path or '<root>'} is None on one side only")
    if _is_batched(a) or _is_batched(b):
        if not (_is_batched(a) and _is_batched(b)):
            raise ValueError(f"conditioning field {path or '<root>'} is a batched tensor on one side only")
        return fn(a, b)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        if type(a) is not type(b):
            raise ValueError(f"conditioning field {path or '<root>'}: type {type(a).__name__} vs {type(b).__name__}")
        changes = {
            f.name: _combine(fn, getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}" if path else f.name)
            for f in dataclasses.fields(a)
            if f.init
        }
        return dataclasses.replace(a, **changes)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        if len(a) != len(b):
            raise ValueError(f"conditioning field {path or '<root>'}: lengths {len(a)} vs {len(b)}")
        items = [_combine(fn, x, y, f"{path}[{i}]") for i, x, y in zip(range(len(a)), a, b)]
        return type(a)(items)
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            raise ValueError(f"conditioning field {path or '<root>'}: keys {sorted(a)} vs {sorted(b)}")
        return {k: _combine(fn, a[k], b[k], f"{path}[{k!r}]") for k in a}
    if not _same(a, b):
        raise ValueError(f"conditioning field {path or '<root>'} differs and is not batched: {a!r} vs {b!r}")
    return a


def map_batched(fn: Callable[[Tensor], Tensor], cond: Any) -> Any:
    """Apply ``fn`` to every batched tensor in ``cond``; everything else is kept."""
    if _is_batched(cond):
        return fn(cond)
    if dataclasses.is_dataclass(cond) and not isinstance(cond, type):
        changes = {f.name: map_batched(fn, getattr(cond, f.name)) for f in dataclasses.fields(cond) if f.init}
        return dataclasses.replace(cond, **changes)
    if isinstance(cond, (tuple, list)):
        return type(cond)([map_batched(fn, v) for v in cond])
    if isinstance(cond, dict):
        return {k: map_batched(fn, v) for k, v in cond.items()}
    return cond


def batched_tensors(cond: Any) -> list[Tensor]:
    """All batched tensors in ``cond``, in field order."""
    found: list[Tensor] = []

    def visit(t: Tensor) -> Tensor:
        found.append(t)
        return t

    map_batched(visit, cond)
    return found


def batch_size_of(cond: Any) -> Optional[int]:
    """The common batch size of ``cond``'s tensors (``None`` if it holds none)."""
    sizes = {t.shape[0] for t in batched_tensors(cond)}
    if not sizes:
        return None
    if len(sizes) > 1:
        raise ValueError(f"conditioning tensors disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def expand_batch(cond: Any, batch_size: int) -> Any:
    """Broadcast batch-1 tensors to ``batch_size`` (e.g. a single null embedding); others must match."""

    def expand(t: Tensor) -> Tensor:
        if t.shape[0] == batch_size:
            return t
        if t.shape[0] == 1:
            return t.expand(batch_size, *t.shape[1:])
        raise ValueError(f"cannot broadcast a conditioning tensor of batch {t.shape[0]} to batch {batch_size}")

    return map_batched(expand, cond)


def cat_conditioning(a: Any, b: Any) -> Any:
    """Concatenate two conditioning objects along the batch dimension, field by field."""
    return _combine(lambda x, y: torch.cat([x, y.to(x.device)], dim=0), a, b, "")


def select(cond: Any, index: Tensor | slice | int | Sequence[int]) -> Any:
    """Index every batched tensor along the batch: a bool mask, index tensor/list or slice.

    An ``int`` index keeps the batch dimension (``select(c, 3)`` has batch 1).
    """
    if isinstance(index, int):
        index = slice(index, index + 1 if index != -1 else None)
    if isinstance(index, (list, tuple)):
        index = torch.as_tensor(index, dtype=torch.long)

    def take(t: Tensor) -> Tensor:
        return t[index.to(t.device) if isinstance(index, Tensor) else index]

    return map_batched(take, cond)


def where(mask: Tensor, a: Any, b: Any, fields: Optional[Sequence[str]] = None) -> Any:
    """Per-sample choice: rows of ``a`` where ``mask`` is True, rows of ``b`` elsewhere.

    ``mask`` is a ``(B,)`` bool tensor; batch-1 tensors broadcast.  If
    ``fields`` names top-level dataclass fields, only those are mixed and every
    other field is taken from ``b`` unchanged.
    """
    if mask.ndim != 1:
        raise ValueError(f"mask must be 1-D (batch,), got shape {tuple(mask.shape)}")
    mask = mask.bool()

    def pick(x: Tensor, y: Tensor) -> Tensor:
        m = mask.to(y.device).reshape((-1,) + (1,) * (y.ndim - 1))
        return torch.where(m, x.to(y.device), y)

    if fields is None:
        return _combine(pick, a, b, "")
    if not (dataclasses.is_dataclass(b) and not isinstance(b, type)):
        raise ValueError("fields= is only supported for dataclass conditioning")
    names = {f.name for f in dataclasses.fields(b)}
    unknown = [f for f in fields if f not in names]
    if unknown:
        raise ValueError(f"unknown conditioning fields {unknown}; {type(b).__name__} has {sorted(names)}")
    changes = {name: _combine(pick, getattr(a, name), getattr(b, name), name) for name in fields}
    return dataclasses.replace(b, **changes)
