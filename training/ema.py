"""Exponential moving average of the trained weights (Polyak averaging; used by DDPM, LDM, DiT, EDM)."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn


class EMA:
    """An fp32 shadow copy of a module's trainable parameters.

    ``decay`` is the target rate; with ``warmup`` the effective rate ramps as ``min(decay, (1 + n) / (10 + n))``
    after ``n`` updates (the schedule of Ho et al.'s and diffusers' EMA), so early averages are not dominated by the
    random initialisation. Buffers are not averaged; they are copied from the model when the EMA is applied.
    """

    def __init__(self, parameters: Iterable[tuple[str, nn.Parameter]], decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay: {decay} must be in [0, 1)")
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {
            name: p.detach().float().clone() for name, p in parameters if p.requires_grad
        }

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, parameters: Iterable[tuple[str, nn.Parameter]]) -> None:
        d = self.current_decay()
        named = [(self.shadow[name], p) for name, p in parameters if name in self.shadow]
        if named:
            shadows = [s for s, _ in named]
            params = [p.detach().to(device=s.device, dtype=s.dtype) for s, p in named]
            torch._foreach_lerp_(shadows, params, 1.0 - d)  # s += (1 - d) (p - s)
        self.num_updates += 1

    def to(self, device: torch.device | str) -> "EMA":
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    @torch.no_grad()
    def copy_to(self, module: nn.Module, prefix_map: Optional[dict[str, str]] = None) -> None:
        """Write the averaged weights into ``module`` (matching by parameter name)."""
        params = dict(module.named_parameters())
        missing = [k for k in self.shadow if k not in params]
        if missing:
            raise KeyError(f"EMA weights with no matching parameter in the module: {missing[:5]}")
        for name, value in self.shadow.items():
            params[name].copy_(value.to(dtype=params[name].dtype, device=params[name].device))

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (saved as safetensors): the shadow weights plus the update count."""
        out = {f"shadow.{k}": v.contiguous() for k, v in self.shadow.items()}
        out["num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        shadow = {k[len("shadow."):]: v for k, v in state.items() if k.startswith("shadow.")}
        if set(shadow) != set(self.shadow):
            extra, missing = set(shadow) - set(self.shadow), set(self.shadow) - set(shadow)
            raise KeyError(f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(extra)[:5]}")
        for k, v in shadow.items():
            self.shadow[k].copy_(v)
        self.num_updates = int(state["num_updates"])
