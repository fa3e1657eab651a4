"""What a training stage is: the trainer knows nothing else about it.

A stage builds its modules from config, says which module trains, turns a batch into a loss, and knows how to
validate and export what it trained. Frozen parts (text encoder, autoencoder) belong to the stage and are kept out
of the optimizer: only :meth:`Stage.trainable` is prepared (wrapped, sharded) by the trainer.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn


class Stage(abc.ABC):
    """One training stage (``autoencoder``, ``diffusion``, ``lora``, ``dpo``, ...)."""

    name: str = "stage"

    @abc.abstractmethod
    def trainable(self) -> nn.Module:
        """The module whose parameters the optimizer updates (the trainer prepares it for DDP/ZeRO/FSDP)."""

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Modules used but never trained; moved to the device, put in eval mode, gradients off."""
        return {}

    def setup(self, device: torch.device, dtype: torch.dtype) -> None:
        """Called once by the trainer before training: place frozen modules on ``device`` in ``dtype``."""
        for module in self.frozen_modules().values():
            module.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def parameters_to_optimize(self, module: nn.Module) -> Iterable[nn.Parameter]:
        return [p for p in module.parameters() if p.requires_grad]

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        """A scalar loss for ``batch`` and extra values to log: floats, or 0-dim tensors left on the device (the
        trainer reads them only at its log lines, so a ``float(t)`` here would stall the GPU every micro-batch)."""

    def validate(self, model: nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        """Fixed-seed evaluation (validation loss, sample grids under ``out_dir``); runs on the main process with
        the EMA weights. Returns scalars to log."""
        return {}

    def keep_media(self, tag: str, pictures: Tensor, fps: float = 8.0) -> None:
        """Hand images ``(B, C, H, W)`` or clips ``(B, C, T, H, W)`` in [-1, 1] drawn in :meth:`validate` to the
        trainer, which writes them to TensorBoard at this validation's step (:mod:`training.tensorboard_media`)."""
        self.__dict__.setdefault("_media", {})[tag] = (pictures.detach().float().cpu(), float(fps))

    def take_media(self) -> dict[str, tuple[Tensor, float]]:
        """The pictures kept since the last call (tag → ``(pictures, fps)``), forgotten here."""
        return self.__dict__.pop("_media", {})

    def export(self, model: nn.Module, out_dir: Path) -> Optional[Path]:
        """Write the trained weights (safetensors + their config) under ``out_dir``; return the weights' path."""
        return None
