"""The ``autoencoder`` stage: train the KL autoencoder of Latent Diffusion (Rombach et al. 2022, sec. 3 and app. G).

Loss per image, summed over pixels and averaged over the batch as in LDM: reconstruction (L1 or L2) plus
``kl_weight`` × KL(q(z|x) ‖ N(0, I)) summed over latent elements (LDM: 1e-6, so the latent stays close to the image
while its scale stays bounded). A perceptual (LPIPS) term needs its pretrained weights, which cannot be fetched
here: it is loaded from a local file (:mod:`training.perceptual`), and asking for it without one is a config
error, not a silent no-op.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from models.autoencoder import AutoencoderConfig, AutoencoderKL
from training.config_io import to_dict
from training.evaluation import psnr, save_grid
from training.perceptual import LPIPS
from training.stages.base import Stage
from training.trainer import TrainConfig
from training.weights import load_weights


@dataclass
class AutoencoderStageConfig:
    """Train (or load) the KL autoencoder."""

    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)  # architecture and latent scaling
    weights: Optional[str] = None  # start from these weights (.safetensors, our names or diffusers'); null: random
    reconstruction: Literal["l1", "l2"] = "l1"  # pixel reconstruction loss (LDM: l1)
    kl_weight: float = 1e-6  # weight of the KL term (LDM: 1e-6)
    perceptual_weight: float = 0.0  # LPIPS weight (LDM: 1.0); needs lpips_weights (pretrained, not downloadable here)
    lpips_weights: Optional[str] = None  # LPIPS .safetensors (training/perceptual.py converts the published files)
    batch_size: Optional[int] = None  # per-rank batch size for this stage (null: data.batch_size)
    train: TrainConfig = field(default_factory=TrainConfig)  # steps, optimizer, EMA, checkpoints
    validation_images: int = 16  # validation images reconstructed for PSNR and the grid
    fit_scaling_factor: bool = True  # at export set scaling_factor = 1 / std of the latents (LDM's scale-by-std)

    def __post_init__(self) -> None:
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight: {self.kl_weight} must be >= 0")
        if self.perceptual_weight < 0:
            raise ValueError(f"perceptual_weight: {self.perceptual_weight} must be >= 0")
        if self.perceptual_weight > 0 and not self.lpips_weights:
            raise ValueError(
                f"perceptual_weight: {self.perceptual_weight} needs lpips_weights (a local LPIPS weights file); "
                "pretrained LPIPS weights cannot be downloaded at run time. Set perceptual_weight=0 or give the file"
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size: {self.batch_size} must be >= 1 or null")


def export_module(module: nn.Module, config: object, out_dir: Path, name: str = "model") -> Path:
    """``<out_dir>/<name>.safetensors`` + ``<name>.json`` (its config), the format every stage loads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.safetensors"
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "config": json.dumps(to_dict(config))})
    (out_dir / f"{name}.json").write_text(json.dumps(to_dict(config), indent=1))
    return path


class AutoencoderStage(Stage):
    name = "autoencoder"

    def __init__(self, cfg: AutoencoderStageConfig, val_pixels: Optional[Tensor] = None):
        self.cfg = cfg
        self.model = AutoencoderKL(cfg.model)
        if cfg.weights:
            load_weights(self.model, cfg.weights)
        self.val_pixels = val_pixels
        self.lpips = LPIPS.from_file(cfg.lpips_weights) if cfg.perceptual_weight > 0 else None

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"lpips": self.lpips} if self.lpips is not None else {}

    def trainable(self) -> nn.Module:
        return self.model

    def loss(self, model: nn.Module, batch) -> tuple[Tensor, dict[str, float]]:
        x = batch.pixels  # (B, C, H, W) in [-1, 1]
        recon, posterior = model(x)  # (B, C, H, W)
        err = recon.float() - x.float()
        diff = err.abs() if self.cfg.reconstruction == "l1" else err**2
        rec = diff.flatten(1).sum(1)  # (B,) per-image sum
        logs = {}
        if self.lpips is not None:
            # LDM adds the per-image LPIPS distance to every pixel's error before summing, i.e. weight × C·H·W
            p = self.lpips(recon.to(next(self.lpips.parameters()).dtype), x.to(next(self.lpips.parameters()).dtype))
            rec = rec + self.cfg.perceptual_weight * p.float() * x[0].numel()
            logs["lpips"] = float(p.detach().mean())
        rec = rec.mean()
        kl = posterior.kl().mean()  # (B,) summed over latent elements → mean
        loss = rec + self.cfg.kl_weight * kl
        return loss, {"reconstruction": float(rec.detach()) / x[0].numel(), "kl": float(kl.detach()), **logs}

    @torch.no_grad()
    def validate(self, model: nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        if self.val_pixels is None:
            return {}
        device = next(model.parameters()).device
        x = self.val_pixels[: self.cfg.validation_images].to(device)
        mode = model.encode(x).mode()
        recon = model.decode(mode).clamp(-1, 1)
        save_grid(torch.cat([x, recon]), out_dir / f"reconstruction_{step:08d}.png", nrow=len(x), scale=2)
        z = model.scale_latents(mode)
        return {"psnr": psnr(recon, x), "latent_std": float(z.std())}

    def export(self, model: nn.Module, out_dir: Path) -> Optional[Path]:
        config = self.cfg.model
        if self.cfg.fit_scaling_factor and self.val_pixels is not None:
            with torch.no_grad():
                x = self.val_pixels.to(next(model.parameters()).device)
                z = model.encode(x).mode() - config.shift_factor
                config = dataclasses.replace(config, scaling_factor=float(1.0 / z.float().std()))
            model.config = config
        return export_module(model, config, out_dir)
