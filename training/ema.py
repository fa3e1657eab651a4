"""Exponential moving average of the trained weights (Polyak averaging; used by DDPM, LDM, DiT, EDM).

Under sharding (DeepSpeed ZeRO-3, FSDP2) each rank averages only the part of each parameter it owns
(:func:`training.sharding.local_shard`): no communication per step and the EMA's memory is divided like the
model's, instead of gathering every parameter every step to average it whole on one rank (a full all-gather per
step, and a full fp32 copy per rank). The averages are consolidated only when they are written or used:
:meth:`EMA.full_state_dict` gathers them (a checkpoint's ``ema.safetensors`` and the exported weights therefore hold
whole tensors, whatever the strategy or world size), :meth:`EMA.load_full_state_dict` gives each rank its part back.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from training.sharding import gather_full, is_sharded, local_shard, shard_of


class EMA:
    """An fp32 shadow copy of a module's trainable parameters (of this rank's shard of each, when sharded).

    ``decay`` is the target rate; with ``warmup`` the effective rate ramps as ``min(decay, (1 + n) / (10 + n))``
    after ``n`` updates (the schedule of Ho et al.'s and diffusers' EMA), so early averages are not dominated by the
    random initialisation. Buffers are not averaged; they are copied from the model when the EMA is applied.

    The (shadow, live parameter) pairs are resolved once, here: build the EMA from the module whose parameter
    objects training updates in place — after Accelerate's ``prepare``, ``acc.unwrap_model(model)``. DDP, ZeRO-1/2/3
    and FSDP2 keep those objects for the whole run (ZeRO-3 and FSDP2 update each one's partition or local chunk in
    place); :meth:`tracks` checks it. Each :meth:`update` is then one ``torch._foreach_lerp_`` over the pairs.

    ``update(skip=flag)`` takes the skip decision as a 0-dim bool tensor on the device (the trainer's "the loss was
    not finite on some rank"), so that no step waits for the device to answer a Python ``if``: the update count then
    lives on the device too (float64, so the warm-up decay is computed exactly as the host's float64 arithmetic) and
    the lerp weight is ``0`` for a skipped step — bit for bit the host path's result for an applied step and a no-op
    for a skipped one. :attr:`num_updates` reads the device count (a synchronisation) only when asked.
    """

    def __init__(self, parameters: Iterable[tuple[str, nn.Parameter]], decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay: {decay} must be in [0, 1)")
        self.decay, self.warmup = decay, warmup
        self._host_updates = 0  # updates counted on the host (update() without a device flag)
        self._device_updates: Optional[Tensor] = None  # updates counted on the device (update(skip=...)), float64
        self.params: dict[str, nn.Parameter] = {name: p for name, p in parameters if p.requires_grad}  # module order
        self.shadow: dict[str, Tensor] = {
            name: local_shard(p).detach().float().clone() for name, p in self.params.items()
        }
        self._bind()

    def _bind(self) -> None:
        """Resolve the pairs the updates run over (again whenever the shadow tensors are replaced)."""
        self._shadows = list(self.shadow.values())
        self._live = list(self.params.values())
        self._sharded = any(is_sharded(p) for p in self._live)  # then read each rank's part at every update
        self._cast = any(local_shard(p).dtype != s.dtype or local_shard(p).device != s.device
                         for p, s in zip(self._live, self._shadows))

    def tracks(self, parameters: Iterable[tuple[str, nn.Parameter]]) -> bool:
        """Whether ``parameters`` (a module's ``named_parameters()``) are the very objects this EMA averages."""
        live = {name: p for name, p in parameters if name in self.params}
        return live.keys() == self.params.keys() and all(live[n] is p for n, p in self.params.items())

    @property
    def num_updates(self) -> int:
        """Updates applied so far (skipped ones not counted). Reading it after ``update(skip=...)`` waits for the
        device."""
        if self._device_updates is None:
            return self._host_updates
        return self._host_updates + int(self._device_updates.item())

    @num_updates.setter
    def num_updates(self, n: int) -> None:
        self._host_updates, self._device_updates = int(n), None

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    def _live_parts(self) -> list[Tensor]:
        live = [local_shard(p) for p in self._live] if self._sharded else self._live
        if self._cast:
            live = [p.to(device=s.device, dtype=s.dtype) for s, p in zip(self._shadows, live)]
        return live

    @torch.no_grad()
    def update(self, skip: Optional[Tensor] = None) -> None:
        """``s ← d·s + (1 − d)·p`` for every tracked parameter ``p`` (this rank's part of it), ``d`` the current
        decay. ``skip``: a 0-dim bool tensor; where true, nothing changes (decided on the device, no
        synchronisation)."""
        if skip is None and self._device_updates is None:
            d = self.current_decay()
            if self._shadows:
                torch._foreach_lerp_(self._shadows, self._live_parts(), 1.0 - d)  # s += (1 - d) (p - s)
            self._host_updates += 1
            return
        device = self._shadows[0].device if self._shadows else (skip.device if skip is not None else "cpu")
        if self._device_updates is None:
            self._device_updates = torch.zeros((), dtype=torch.float64, device=device)
        n = self._host_updates + self._device_updates  # float64: the host formula's exact arithmetic
        d = torch.clamp((1.0 + n) / (10.0 + n), max=self.decay) if self.warmup else torch.full_like(n, self.decay)
        weight = 1.0 - d
        applied = torch.ones((), dtype=torch.bool, device=device) if skip is None else ~skip.to(device)
        if self._shadows:
            w = torch.where(applied, weight, torch.zeros_like(weight)).to(self._shadows[0].dtype)
            torch._foreach_lerp_(self._shadows, self._live_parts(), [w] * len(self._shadows))
        self._device_updates += applied.to(torch.float64)

    def to(self, device: torch.device | str) -> "EMA":
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        if self._device_updates is not None:
            self._device_updates = self._device_updates.to(device)
        self._bind()
        return self

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (saved as safetensors): the shadow weights plus the update count."""
        out = {f"shadow.{k}": v.contiguous() for k, v in self.shadow.items()}
        out["num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        shadow = self._shadow_entries(state)
        for k, v in shadow.items():
            self.shadow[k].copy_(v)
        self.num_updates = int(state["num_updates"])

    def _shadow_entries(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        shadow = ema_weights(state)
        if set(shadow) != set(self.shadow):
            extra, missing = set(shadow) - set(self.shadow), set(self.shadow) - set(shadow)
            raise KeyError(f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(extra)[:5]}")
        return shadow

    # ---- consolidated (whole-tensor) form, whatever the sharding

    def full_state_dict(self, dst: Optional[int] = 0) -> Optional[dict[str, Tensor]]:
        """Like :meth:`state_dict` but with whole tensors (on CPU), gathered from every rank's shard.

        Collective under sharding: call it on every rank. Returns the dict on rank ``dst`` (``None``: every rank)
        and None on the others.
        """
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        keep = dst is None or rank == dst
        out: dict[str, Tensor] = {}
        for name, p in self.params.items():  # the module's order: the same on every rank
            full = gather_full(p, self.shadow[name], dst=dst)
            if keep:
                out[f"shadow.{name}"] = full.float().contiguous()
        if not keep:
            return None
        out["num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return out

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore from :meth:`full_state_dict`'s whole tensors: each rank keeps its own part (no communication)."""
        shadow = self._shadow_entries(state)
        for name, p in self.params.items():
            self.shadow[name].copy_(shard_of(p, shadow[name].float()))
        self.num_updates = int(state["num_updates"])

    def full_weights(self, dst: Optional[int] = 0) -> Optional[dict[str, Tensor]]:
        """The averaged weights as a consolidated ``{name: tensor}`` (collective, like :meth:`full_state_dict`)."""
        state = self.full_state_dict(dst=dst)
        if state is None:
            return None
        return ema_weights(state)


def ema_weights(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The averaged weights ``{parameter name: tensor}`` of an EMA state dict (an ``ema.safetensors`` checkpoint
    file, or :meth:`EMA.state_dict` / :meth:`EMA.full_state_dict`): its ``shadow.*`` entries, prefix removed."""
    return {k[len("shadow."):]: v for k, v in state.items() if k.startswith("shadow.")}
