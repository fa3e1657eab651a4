"""Convolutional pieces shared by the autoencoder and the U-Net: GroupNorm, the residual block, resampling.

The residual block is the pre-activation ResNet block of Ho et al. 2020 (DDPM), itself after Wide ResNets
(Zagoruyko & Komodakis 2016), as used by Latent Diffusion (Rombach et al. 2022) in both its autoencoder (no
timestep input) and its denoiser (timestep embedding added, or applied as scale-and-shift, Dhariwal & Nichol 2021).
One class serves both, so the maths lives in one place.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int, groups: int, eps: float) -> nn.GroupNorm:
    """GroupNorm (Wu & He 2018) with an affine transform; ``channels`` must divide into ``groups``."""
    if channels % groups:
        raise ValueError(f"GroupNorm needs channels divisible by groups, got channels={channels}, groups={groups}")
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=eps, affine=True)


class ResBlock(nn.Module):
    """Pre-activation residual block: ``x + conv(SiLU(GN(conv(SiLU(GN(x))) [+ emb])))``.

    With ``emb_dim`` set, the (timestep) embedding ``emb`` ``(B, emb_dim)`` enters after the first convolution:
    added as a per-channel bias (DDPM) or, with ``scale_shift=True``, as ``GN(h) * (1 + scale) + shift``
    (Dhariwal & Nichol 2021, "adaptive group normalisation"). Without ``emb_dim`` it is the autoencoder's block.
    A 1×1 convolution (``skip``) matches channels on the shortcut when they change.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: Optional[int] = None,
        emb_dim: Optional[int] = None,
        groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
        scale_shift: bool = False,
    ):
        super().__init__()
        out_channels = out_channels if out_channels is not None else in_channels
        self.scale_shift = scale_shift
        self.norm1 = group_norm(in_channels, groups, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.emb_proj = (
            nn.Linear(emb_dim, out_channels * (2 if scale_shift else 1)) if emb_dim is not None else None
        )
        self.norm2 = group_norm(out_channels, groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.skip = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor, emb: Optional[Tensor] = None) -> Tensor:
        """x ``(B, Cin, H, W)``; emb ``(B, emb_dim)`` when the block was built with ``emb_dim``."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cout, H, W)
        if self.emb_proj is not None:
            if emb is None:
                raise ValueError("this ResBlock was built with emb_dim, so it needs an embedding; got None")
            e = self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, Cout or 2*Cout, 1, 1)
            if self.scale_shift:
                scale, shift = e.chunk(2, dim=1)
                h = self.norm2(h) * (1 + scale) + shift  # (B, Cout, H, W)
            else:
                h = self.norm2(h + e)
        else:
            h = self.norm2(h)
        h = self.conv2(self.dropout(F.silu(h)))  # (B, Cout, H, W)
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3×3 convolution.

    ``padding="symmetric"`` pads one pixel on every side (the LDM U-Net); ``"asymmetric"`` pads only right and
    bottom (the LDM autoencoder, which follows the TensorFlow "SAME" convention). Both are needed to load
    published weights exactly.
    """

    def __init__(self, channels: int, padding: Literal["symmetric", "asymmetric"] = "symmetric"):
        super().__init__()
        if padding not in ("symmetric", "asymmetric"):
            raise ValueError(f"Downsample padding={padding!r}; choose 'symmetric' or 'asymmetric'")
        self.asymmetric = padding == "asymmetric"
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0 if self.asymmetric else 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))  # (B, C, H+1, W+1)
        return self.conv(x)  # (B, C, ceil(H/2), ceil(W/2))


class Upsample(nn.Module):
    """Double the resolution by nearest-neighbour interpolation, then a 3×3 convolution.

    ``size`` forces the output height and width (the U-Net passes its skip connection's size so inputs whose
    side is not a multiple of the total downsampling factor still line up).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor, size: Optional[tuple[int, int]] = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")  # (B, C, *size)
        return self.conv(x)


def fold_frames(x: Tensor) -> Tensor:
    """``(B, C, T, H, W)`` → ``(B*T, C, H, W)``: a video batch seen as a batch of frames (frame index fastest)."""
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def unfold_frames(x: Tensor, num_frames: int) -> Tensor:
    """Inverse of :func:`fold_frames`: ``(B*T, C, H, W)`` → ``(B, C, T, H, W)``."""
    bt, c, h, w = x.shape
    if bt % num_frames:
        raise ValueError(f"cannot unfold a batch of {bt} frames into clips of num_frames={num_frames}")
    return x.reshape(bt // num_frames, num_frames, c, h, w).permute(0, 2, 1, 3, 4)
