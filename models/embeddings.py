"""Timestep and Fourier-feature embeddings shared by the U-Net and the DiT."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn


def timestep_embedding(
    t: Tensor,
    dim: int,
    max_period: float = 10000.0,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017; Ho et al. 2020).

    ``t`` ``(B,)`` → ``(B, dim)``. Frequencies ``exp(-log(max_period) * i / (half - freq_shift))``;
    ``flip_sin_to_cos`` puts the cosines first (Stable Diffusion and DiT both do).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([args.sin(), args.cos()], dim=-1)  # (B, 2*half)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


def broadcast_timesteps(timesteps: Tensor | float | int, batch: int, device: torch.device) -> Tensor:
    """A denoiser's ``timesteps`` argument as ``(B,)`` on ``device``: a scalar is repeated, a ``(B,)`` kept."""
    t = torch.as_tensor(timesteps, device=device)
    t = t.expand(batch) if t.ndim == 0 else t
    if t.shape != (batch,):
        raise ValueError(f"timesteps must be a scalar or shaped ({batch},); got {tuple(t.shape)}")
    return t


def fourier_features(values: Tensor, dim: int) -> Tensor:
    """Embed each scalar of ``values`` ``(B, K)`` with :func:`timestep_embedding` → ``(B, K*dim)``.

    SDXL (Podell et al. 2023) micro-conditioning: original size, crop offsets and target size, 6 numbers per sample.
    """
    b, k = values.shape
    return timestep_embedding(values.reshape(-1), dim).reshape(b, k * dim)


class TimestepMLP(nn.Module):
    """``Linear → SiLU → Linear`` over a sinusoidal embedding (the U-Net's and the DiT's timestep embedder)."""

    def __init__(self, in_dim: int, dim: int, out_dim: Optional[int] = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, out_dim if out_dim is not None else dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def micro_vector(original_size: Tensor, crop_top_left: Tensor, target_size: Tensor,
                 dim: int = 256) -> Tensor:
    """SDXL micro-conditioning (Podell et al. 2023, sec. 2.2): original size, crop top-left, target size (each
    ``(B, 2)``), each number as ``dim`` Fourier features."""
    values = torch.cat([original_size, crop_top_left, target_size], dim=1).float()  # (B, 6)
    return fourier_features(values, dim)  # (B, 6*dim)
