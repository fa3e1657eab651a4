"""The ``lora`` stage: teach a trained denoiser a new concept with LoRA adapters, leaving its weights untouched.

The denoiser (U-Net or DiT, as ``diffusion`` configures it) is loaded from the base weights and wrapped by peft
with one adapter on its attention projections, optionally its feed-forward and projection layers
(:mod:`training.finetune`). Only the adapter's ``lora_A``/``lora_B`` tensors require grad, so only they reach the
optimizer, the gradient clipping, DDP's all-reduce and the EMA (which keeps parameters with ``requires_grad``
only). The loss is the diffusion stage's, unchanged: same process, target, weighting and conditioning dropout.

Under mixed precision the frozen base weights are held in the compute dtype (``cast_base``): half their memory,
while the adapters stay fp32. Gradient checkpointing is the denoiser's own
(``diffusion.model.dit.gradient_checkpointing`` or ``diffusion.model.unet.gradient_checkpointing``); its
non-reentrant form gives the adapters their gradients even though every input of a checkpointed block is frozen.

Export: ``lora/export/adapter.safetensors`` (+ ``adapter.json``) with the EMA adapter weights and a SHA-256
fingerprint of the base weights; before writing it the stage recomputes the base fingerprint from the trained
model and refuses to export if a base weight changed. ``export_merged`` also writes the merged denoiser
(``model.safetensors`` + ``model.json``) for tools that want one file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file
from torch import nn

from training.config_io import to_dict
from training.finetune import (
    LoraAdapterConfig,
    add_lora,
    base_state_dict,
    cast_frozen_,
    held_dtype,
    merged_state_dict,
    save_adapter,
    weights_fingerprints,
)
from training.stages.diffusion import DiffusionStage, DiffusionStageConfig
from training.trainer import OptimConfig, TrainConfig

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"


def _lora_train_defaults() -> TrainConfig:
    return TrainConfig(max_steps=500, optim=OptimConfig(lr=1e-4, warmup_steps=20), ema_decay=None,
                       checkpoint_every=250)


@dataclass
class LoraStageConfig:
    """LoRA fine-tuning of the denoiser ``diffusion`` describes, starting from its trained weights."""

    adapter: LoraAdapterConfig = field(default_factory=LoraAdapterConfig)  # rank, alpha, dropout, init, targets
    cond_dropout: Optional[float] = None  # probability of the null text conditioning; null: diffusion.cond_dropout
    batch_size: Optional[int] = None  # per-rank batch size (null: data.batch_size)
    train: TrainConfig = field(default_factory=_lora_train_defaults)  # steps, optimizer, EMA (of the adapters)
    cast_base: bool = True  # under bf16/fp16 hold the frozen base weights in that dtype (adapters stay fp32)
    export_merged: bool = False  # also export the merged denoiser (model.safetensors) beside the adapter
    validation_prompts: list[str] = field(default_factory=list)  # drawn at each validation; []: diffusion's

    def __post_init__(self) -> None:
        if self.cond_dropout is not None and not 0.0 <= self.cond_dropout <= 1.0:
            raise ValueError(f"cond_dropout: {self.cond_dropout} must be in [0, 1] or null")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size: {self.batch_size} must be >= 1 or null")


def finetune_diffusion_config(cfg: DiffusionStageConfig, weights: str, cond_dropout: Optional[float],
                              validation_prompts: list[str]) -> DiffusionStageConfig:
    """The diffusion config a fine-tuning stage runs with: base ``weights``, its own dropout and prompts."""
    return dataclasses.replace(
        cfg, weights=weights, cond_dropout=cfg.cond_dropout if cond_dropout is None else cond_dropout,
        validation_prompts=list(validation_prompts or cfg.validation_prompts),
    )


class AdapterMixin:
    """What the LoRA-trained stages share: frozen-base casting, autocast for the eval copies, adapter export."""

    model: nn.Module
    compute_dtype: torch.dtype = torch.float32
    base_fingerprints: dict[torch.dtype, str] = {}  # the base weights' fingerprint at fp32, bf16 and fp16

    @property
    def base_fingerprint(self) -> Optional[str]:
        """The fp32 fingerprint (stored in the adapter file; compared when adapters are attached to a base)."""
        return self.base_fingerprints.get(torch.float32)

    def fingerprint_base(self, model: nn.Module) -> None:
        self.base_fingerprints = weights_fingerprints(model.state_dict())

    def cast_base_weights(self, dtype: torch.dtype, enabled: bool) -> None:
        self.compute_dtype = dtype
        if enabled and dtype != torch.float32:
            n = cast_frozen_(self.model, dtype)
            log.info("LoRA: %d frozen base tensors held in %s", n, dtype)

    def autocast(self, device: torch.device) -> Any:
        """Autocast to the compute dtype where the base weights were cast (eval copies run outside Accelerate's
        autocast); a no-op in fp32."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.compute_dtype)

    def check_base_unchanged(self, model: nn.Module) -> bool:
        """Recompute the base fingerprint from ``model`` in the precision its base is held in (fp32, or bf16/fp16
        where ``cast_base`` or DeepSpeed's half-precision mode cast it) and raise if a base weight moved. False
        (not checked) when the base tensors are held in a mix of precisions."""
        state = base_state_dict(model)
        dtype = held_dtype(state)
        if dtype not in self.base_fingerprints:
            log.warning("LoRA: base weights held in mixed or unknown precision; not verified unchanged")
            return False
        if weights_fingerprints(state, (dtype,))[dtype] != self.base_fingerprints[dtype]:
            raise RuntimeError(f"LoRA: the base weights changed during training (fingerprint mismatch in {dtype}); "
                               "only adapter weights may train")
        return True

    def export_adapter(self, model: nn.Module, out_dir: Path, cfg: LoraAdapterConfig, denoiser: str,
                       extra: dict[str, Any], merged: bool = False, model_config: Any = None) -> Path:
        verified = self.check_base_unchanged(model)
        path = save_adapter(model, out_dir / ADAPTER_FILE, cfg, denoiser=denoiser,
                            base_sha256=self.base_fingerprint, extra=dict(extra, base_unchanged_verified=verified))
        log.info("adapter exported to %s (base weights unchanged: %s)", path,
                 "verified" if verified else "not checked")
        if merged:
            state = merged_state_dict(model)
            save_file(state, str(out_dir / "model.safetensors"),
                      metadata={"format": "pt", "config": json.dumps(to_dict(model_config))})
            (out_dir / "model.json").write_text(json.dumps(to_dict(model_config), indent=1))
        return path


class LoraStage(AdapterMixin, DiffusionStage):
    """The diffusion stage's loss on a LoRA-wrapped denoiser."""

    name = "lora"

    def __init__(
        self,
        cfg: DiffusionStageConfig,
        lora: LoraStageConfig,
        text_encoder: nn.Module,
        autoencoder: Optional[nn.Module],
        image_size: tuple[int, int],
        val_batches: Optional[list[Any]] = None,
    ):
        """``cfg.weights`` are the base weights (see :func:`finetune_diffusion_config`)."""
        if not cfg.weights:
            raise ValueError("lora: needs base denoiser weights (diffusion.weights, or a diffusion stage before it)")
        super().__init__(cfg, text_encoder, autoencoder, image_size, val_batches)
        self.lora = lora
        self.fingerprint_base(self.model)
        self.model = add_lora(self.model, lora.adapter)

    def setup(self, device: torch.device, dtype: torch.dtype) -> None:
        super().setup(device, dtype)
        self.cast_base_weights(dtype, self.lora.cast_base)

    def validate(self, model: nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        with self.autocast(self.device):
            return super().validate(model, step, out_dir)

    def export(self, model: nn.Module, out_dir: Path) -> Optional[Path]:
        return self.export_adapter(model, out_dir, self.lora.adapter, self.cfg.architecture,
                                   {"stage": "lora", "base_weights": str(self.cfg.weights)},
                                   merged=self.lora.export_merged, model_config=self.cfg.model_config)
