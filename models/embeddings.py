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


SIZE_CONDITIONING = ("none", "sdxl", "pixart")  # the kinds of image-size conditioning a denoiser takes in cond.vector


def size_conditioning_vector(kind: str, original_size: Tensor, crop_top_left: Tensor, target_size: Tensor,
                             fourier_dim: int = 256) -> Optional[Tensor]:
    """``cond.vector`` of a denoiser trained with image-size conditioning of kind ``kind``; geometry ``(B, 2)``
    (height, width) in pixels, as a :class:`~data_pipeline.batch.Batch` holds it (at sampling: the drawn size as
    original and target, no crop).

    * ``"sdxl"``: :func:`micro_vector` (Podell et al. 2023): original size, crop top-left, target size →
      ``(B, 6·fourier_dim)``.
    * ``"pixart"``: PixArt-α's multi-scale conditioning (Chen et al. 2023; its ``InternalDataMS`` training data):
      the image's original resolution (height, width) and the aspect ratio height / width of the bucket it was
      resized to, 256 sinusoid features each → ``(B, 768)``
      (:func:`models.dit_checkpoints.pixart_size_vector`). An unknown original size (zeros) counts as the target's.
    * ``"none"``: None.
    """
    if kind == "none":
        return None
    if kind == "sdxl":
        return micro_vector(original_size, crop_top_left, target_size, fourier_dim)
    if kind == "pixart":
        from models.dit_checkpoints import pixart_size_vector

        target = target_size.reshape(-1, 2).float()  # (B, 2)
        if (target <= 0).any():
            raise ValueError(f"pixart size conditioning: target sizes {target.tolist()} must be positive (height, "
                             "width) pixels")
        original = original_size.reshape(-1, 2).float().to(target.device)  # (B, 2)
        known = (original > 0).all(dim=1, keepdim=True)  # (B, 1)
        resolution = torch.where(known, original, target)  # (B, 2)
        return pixart_size_vector(resolution, target[:, :1] / target[:, 1:])  # (B, 768)
    raise ValueError(f"size conditioning {kind!r}: expected one of {', '.join(SIZE_CONDITIONING)}")


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE)
# ----------------------------------------------------------------------------------------------------------------


def default_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """How a head's features are split between the (time, height, width) axes of 3-D RoPE, in Wan's proportions:
    ``2·⌊d/6⌋`` features for each spatial axis, the rest for time (e.g. 128 → (44, 42, 42))."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def rope_angles(positions: Tensor, dim: int, theta: float = 10000.0) -> Tensor:
    """Rotation angles of 1-D RoPE (Su et al. 2021, "RoFormer"): ``positions`` ``(N,)`` → ``(N, dim/2)`` float64.

    Feature pair ``k`` (features ``2k, 2k+1``) turns by ``position · θ^(-2k/dim)``. Computed in float64 so that the
    cosines and sines of large positions are exact to float32.
    """
    if dim % 2:
        raise ValueError(f"RoPE axis width {dim} must be even (features rotate in pairs)")
    exponent = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim  # (dim/2,)
    return positions.to(torch.float64)[:, None] * theta ** -exponent[None]  # (N, dim/2)


def rope_3d(
    frames: int,
    grid_h: int,
    grid_w: int,
    axes_dims: tuple[int, int, int],
    theta: float = 10000.0,
    device: Optional[torch.device] = None,
) -> tuple[Tensor, Tensor]:
    """3-D RoPE tables for ``frames × grid_h × grid_w`` tokens in (frame, row, column) raster order.

    A head of ``sum(axes_dims)`` features is split into three consecutive groups that rotate with the token's
    frame, row and column index respectively (axial RoPE as in Wan 2.1, HunyuanVideo, CogVideoX). Returns
    ``(cos, sin)``, each ``(T·h·w, d/2)`` float32 — one angle per feature pair — for :func:`apply_rope`. The
    product ``q_m · k_n`` of two rotated vectors then depends on positions only through ``m − n``.
    """
    grids = (frames, grid_h, grid_w)
    parts = []
    for axis, (size, dim) in enumerate(zip(grids, axes_dims)):
        angles = rope_angles(torch.arange(size, device=device), dim, theta)  # (size, dim/2)
        shape = [1, 1, 1, dim // 2]
        shape[axis] = size
        parts.append(angles.view(shape).expand(frames, grid_h, grid_w, dim // 2))  # (T, h, w, dim/2)
    angles = torch.cat(parts, dim=-1).reshape(frames * grid_h * grid_w, -1)  # (N, d/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate each consecutive feature pair ``(x₂ₖ, x₂ₖ₊₁)`` of ``x`` ``(..., N, d)`` by the angles whose
    ``(cos, sin)`` are given (each broadcastable to ``(..., N, d/2)``, see :func:`rope_3d`). Computed in float32,
    returned in ``x``'s dtype."""
    cos, sin = rope
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., N, d/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]  # (..., N, d/2) each
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)  # (..., N, d/2, 2)
    return rotated.flatten(-2).to(x.dtype)  # (..., N, d)
