"""The ``lora`` stage: teach a trained denoiser a new concept with LoRA adapters, leaving its weights untouched.

The stage is the diffusion stage (:class:`~training.stages.diffusion.DiffusionStage`) with one more part,
:class:`LoraAdapters` (:func:`make_lora_stage` puts them together): the denoiser (any architecture, image or video,
as ``diffusion`` configures it) is loaded from the base weights and wrapped by peft
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
    adapters_disabled,
    add_lora,
    base_state_dict,
    cast_frozen_,
    held_dtype,
    merged_state_dict,
    save_adapter,
    weights_fingerprints,
)
from training.stages.diffusion import DiffusionStage, DiffusionStageConfig, StagePart
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


class LoraAdapters(StagePart):
    """The LoRA part of a stage: one peft adapter on the denoiser's targets, the frozen base fingerprinted (and held
    in the compute dtype under bf16/fp16 when ``cast_base``), the adapter exported with the base's fingerprint.

    Used by the ``lora`` stage and by ``dpo`` with ``policy: lora`` (whose reference is the base with the adapter
    disabled, :meth:`disabled`). Any denoiser, image or video.
    """

    def __init__(self, cfg: LoraAdapterConfig, cast_base: bool = True, export_merged: bool = False):
        self.cfg = cfg
        self.cast_base = cast_base
        self.export_merged = export_merged
        self.base_fingerprints: dict[torch.dtype, str] = {}  # the base weights' fingerprint at fp32, bf16 and fp16

    @property
    def base_fingerprint(self) -> Optional[str]:
        """The fp32 fingerprint (stored in the adapter file; compared when adapters are attached to a base)."""
        return self.base_fingerprints.get(torch.float32)

    def attach(self, model: nn.Module) -> nn.Module:
        """Fingerprint the base weights, then wrap ``model`` with the adapter (only its tensors require grad)."""
        self.base_fingerprints = weights_fingerprints(model.state_dict())
        return add_lora(model, self.cfg)

    def setup(self, model: nn.Module, dtype: torch.dtype) -> None:
        """Hold the frozen base in the training precision (``cast_base``); the adapters stay fp32."""
        if self.cast_base and dtype != torch.float32:
            n = cast_frozen_(model, dtype)
            log.info("LoRA: %d frozen base tensors held in %s", n, dtype)

    @staticmethod
    def disabled(model: nn.Module) -> Any:
        """Context: ``model`` with its adapters disabled, i.e. the base (DPO's reference)."""
        return adapters_disabled(model)

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

    def export(self, model: nn.Module, out_dir: Path, extra: dict[str, Any]) -> Path:
        """``adapter.safetensors`` (+ json) after checking the base is unchanged; the merged denoiser too when
        ``export_merged``."""
        verified = self.check_base_unchanged(model)
        cfg = self.stage.cfg
        path = save_adapter(model, out_dir / ADAPTER_FILE, self.cfg, denoiser=cfg.architecture,
                            base_sha256=self.base_fingerprint, extra=dict(extra, base_unchanged_verified=verified))
        log.info("adapter exported to %s (base weights unchanged: %s)", path,
                 "verified" if verified else "not checked")
        if self.export_merged:
            config = to_dict(cfg.model_config)
            save_file(merged_state_dict(model), str(out_dir / "model.safetensors"),
                      metadata={"format": "pt", "config": json.dumps(config)})
            (out_dir / "model.json").write_text(json.dumps(config, indent=1))
        return path


def make_lora_stage(cfg: DiffusionStageConfig, lora: LoraStageConfig, text_encoder: nn.Module,
                    autoencoder: Optional[nn.Module], image_size: tuple[int, int],
                    val_batches: Optional[list[Any]] = None) -> DiffusionStage:
    """The ``lora`` stage: the diffusion stage's objective on the denoiser ``cfg`` describes, with LoRA adapters.
    ``cfg.weights`` are the base weights (see :func:`finetune_diffusion_config`)."""
    if not cfg.weights:
        raise ValueError("lora: needs base denoiser weights (diffusion.weights, or a diffusion stage before it)")
    adapters = LoraAdapters(lora.adapter, cast_base=lora.cast_base, export_merged=lora.export_merged)
    return DiffusionStage(cfg, text_encoder, autoencoder, image_size, val_batches, name="lora", adapters=adapters)
