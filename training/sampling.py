"""From prompts to images: text encoding, guided sampling in latent space, decoding.

``generate`` is shared by validation during training, ``loom sample`` and the quickstart report, so what the
report measures is exactly what a user gets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from models.conditioning import Conditioning
from training.diffusion import (
    DiscreteDiffusion,
    RectifiedFlow,
    ddim_sample,
    ddpm_sample,
    dpm_solver_2m_sample,
    euler_flow_sample,
)

SamplerName = Literal["ddim", "ddpm", "dpm_solver_2m", "euler"]


@dataclass
class SamplingConfig:
    """How images are drawn from a trained denoiser."""

    sampler: SamplerName = "ddim"  # ddim | ddpm | dpm_solver_2m (discrete process) · euler (flow)
    steps: int = 50  # sampler steps
    guidance: float = 3.0  # classifier-free guidance scale (1: no guidance; 0: unconditional)
    eta: float = 0.0  # DDIM stochasticity (0: deterministic DDIM)
    negative_prompt: str = ""  # the unconditional branch's prompt ('' = the training null conditioning)
    seed: int = 0  # noise seed (fixed: the same seed gives the same images)
    clip_x0: Optional[float] = None  # clamp predicted x0 to [-v, v] (pixel-space models); null: off

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps: {self.steps} must be >= 1")
        if self.guidance < 0:
            raise ValueError(f"guidance: {self.guidance} must be >= 0")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta: {self.eta} must be in [0, 1]")


def check_sampler(process: Any, sampler: str) -> None:
    flow = isinstance(process, RectifiedFlow)
    if flow and sampler != "euler":
        raise ValueError(f"sampler: {sampler!r} is for the discrete process; a flow process samples with 'euler'")
    if not flow and sampler == "euler":
        raise ValueError("sampler: 'euler' is for the flow process; use ddim, ddpm or dpm_solver_2m")


def sample_latents(
    denoiser: nn.Module,
    process: Any,
    cond: Conditioning,
    null_cond: Optional[Conditioning],
    shape: Sequence[int],
    cfg: SamplingConfig,
    device: torch.device,
    guidance: Optional[float] = None,
) -> Tensor:
    """Latents ``shape`` drawn by the configured sampler with classifier-free guidance (all channels)."""
    check_sampler(process, cfg.sampler)
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    noise = torch.randn(tuple(shape), generator=g).to(device)
    scale = cfg.guidance if guidance is None else guidance
    common = dict(cond=cond, null_cond=null_cond, guidance=scale, steps=cfg.steps, generator=g, clip_x0=cfg.clip_x0)
    if cfg.sampler == "euler":
        return euler_flow_sample(denoiser, process, noise, **common)
    assert isinstance(process, DiscreteDiffusion)
    if cfg.sampler == "ddim":
        return ddim_sample(denoiser, process, noise, eta=cfg.eta, **common)
    if cfg.sampler == "ddpm":
        return ddpm_sample(denoiser, process, noise, **common)
    return dpm_solver_2m_sample(denoiser, process, noise, **common)


def trim_together(*conds: Conditioning) -> tuple[Conditioning, ...]:
    """Cut every conditioning's context to the longest valid length among them (exact; see trim_context)."""
    length = max(c.trim_context().context.shape[1] for c in conds)
    return tuple(dataclasses.replace(c, context=c.context[:, :length], context_mask=c.context_mask[:, :length])
                 for c in conds)


@torch.no_grad()
def generate(
    denoiser: nn.Module,
    process: Any,
    text_encoder: Any,
    autoencoder: Optional[nn.Module],
    prompts: Sequence[str],
    latent_shape: Sequence[int],
    cfg: SamplingConfig,
    guidance: Optional[float] = None,
    vector: Optional[Tensor] = None,
) -> Tensor:
    """Images ``(B, C, H, W)`` in [-1, 1] for ``prompts``; ``latent_shape`` is one sample's ``(C, h, w)``.

    Guidance 0 samples the unconditional model alone (the null conditioning on both branches).
    """
    device = next(denoiser.parameters()).device
    scale = cfg.guidance if guidance is None else guidance
    cond = text_encoder.encode(list(prompts)).to(device)
    null = text_encoder.encode([cfg.negative_prompt] * len(prompts)).to(device)
    cond, null = trim_together(cond, null)
    if vector is not None:
        cond.vector = vector.to(device)
        null.vector = vector.to(device)
    if scale == 0.0:
        cond, null_cond, scale = null, None, 1.0
    else:
        null_cond = null
    latents = sample_latents(denoiser, process, cond, null_cond, (len(prompts), *latent_shape), cfg, device, scale)
    if autoencoder is None:
        return latents.clamp(-1, 1)
    return autoencoder.pixels_from_latents(latents.to(next(autoencoder.parameters()).dtype)).float().clamp(-1, 1)
