"""Diffusion Transformer for image and video latents.

The backbone is DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"): patchify the latent,
add fixed sin-cos position embeddings, run transformer blocks whose LayerNorms are modulated by the conditioning
embedding (adaLN-Zero), then a modulated final layer and unpatchify. Text conditioning follows PixArt-α (Chen et
al. 2023): a cross-attention layer between self-attention and the MLP of every block, optionally a caption
projection MLP, and optionally "adaLN-single" (one modulation MLP shared by every block plus a learned per-block
table).

Video uses the same code path. A ``(B, C, T, H, W)`` latent is patchified frame by frame into ``T·(H/p)·(W/p)``
tokens ordered (frame, row, column); every token attends to every other (full spatio-temporal attention). The
position embedding is separable: the 2-D spatial sin-cos embedding of the token's (row, column), plus, when
``T > 1``, a 1-D sin-cos embedding of its frame index over the whole width (as in Latte, Ma et al. 2024). With
``T == 1`` no temporal term is added, so a one-frame clip and an image give the same tokens. The layout is read from
the tensor alone: an image model (``video=False``) takes ``(B, C, H, W)`` images or ``(B, C, T, H, W)`` clips, a
video model (``video=True``) only clips; nothing else is accepted (in particular not frames folded into the batch).
The position table is cached per (grid, device, dtype), as it depends on nothing else.

Video options (all off by default, so image DiTs are unchanged): ``patch_size_t`` cuts ``p_t × p × p`` tubelets
(ViViT, Arnab et al. 2021) with a 3-D convolution; ``rope`` rotates self-attention queries and keys by 3-D rotary
position embedding over (frame, row, column) (Su et al. 2021; axial split as in Wan 2.1), applied inside
:func:`models.attention.attention` for every backend, alone or besides the sin-cos table (``sincos_pos_embed``);
``attention_layout="factorised"`` alternates spatial blocks (attention within a frame, with cross-attention) and
temporal blocks (attention across frames at one position, without) as in Latte's interleaved variant, instead of
full spatio-temporal attention. All blocks are :class:`DiTBlock` (one FSDP/checkpointing unit class).

Wan 2.1 (Wan Team 2025) is a configuration of this DiT (:func:`wan_config`): Conv3d patches, RoPE only, q/k RMS
norms across heads, a LayerNorm before cross-attention, adaLN-single, a caption MLP over umT5 states zero-padded
instead of masked. Its weights load from diffusers' ``WanTransformer3DModel`` layout
(:func:`from_diffusers_wan_state_dict`, :func:`config_from_diffusers_wan`) and from the original Wan checkpoints
(:func:`from_wan_state_dict`), and give diffusers' outputs.

Calling convention (see :mod:`models.conditioning`): ``model(x_t, timesteps, cond) -> out``, ``out`` shaped like
``x_t`` (with ``learn_sigma`` it has twice the channels: see :meth:`DiT.split_learned_sigma`).

Presets: the paper's S/B/L/XL × patch 2/4/8 class-conditional models (Peebles & Xie 2023, Table 1; ImageNet 256 px →
32×32×4 latents, 1000 classes, learned sigma), text-conditioned variants ``DiT-XL/2-text`` etc. (PixArt-α style:
cross-attention, caption MLP, adaLN-single; ``context_dim`` 1024 = the OpenCLIP ViT-H/14 text width, override it,
e.g. 4096 for T5-XXL), ``wan2.1-t2v-1.3b`` / ``wan2.1-t2v-14b`` (1,418,996,800 and 14,288,491,584 parameters,
equal to diffusers'), ``wan-small`` (quickstart size), and tiny ones for tests (``dit-tiny``, ``dit-tiny-text``,
``wan-tiny``, ``latte-tiny``); the architecture is registered as ``"dit"`` (:mod:`models.registry`) with the
converters ``diffusers`` (Wan's diffusers layout) and ``wan`` (the original Wan layout).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from models.attention import BACKENDS, Attention, FeedForward, SequenceShard
from models.blocks import fold_frames
from models.conditioning import Conditioning
from models.embeddings import (
    TimestepMLP,
    broadcast_timesteps,
    default_rope_axes,
    rope_3d,
    rope_angles,
    timestep_embedding,
)
from models.registry import register_architecture, register_preset
from models.utils import checkpointed

POS_CACHE_SIZE = 16  # position tables kept per model (one per grid shape, device and dtype: buckets × devices)


@dataclass
class DiTConfig:
    """Architecture of a :class:`DiT`. Defaults are the class-conditional DiT-XL/2 of Peebles & Xie (2023)."""

    sample_size: int = 32
    """Nominal latent side (256 px → 32), for example inputs and FLOPs; any size divisible by the patch works."""
    patch_size: int = 2
    """Side of a square patch, in latent pixels (the p of DiT-XL/p)."""
    in_channels: int = 4
    """Latent channels of ``x_t``."""
    out_channels: Optional[int] = None
    """Predicted channels; None means ``in_channels``. Doubled when ``learn_sigma``."""
    learn_sigma: bool = False
    """Also predict the variance interpolation (Nichol & Dhariwal 2021), as DiT does: output has 2×out_channels."""
    hidden_size: int = 1152
    """Token width D."""
    depth: int = 28
    """Number of transformer blocks."""
    num_heads: int = 16
    """Attention heads; ``hidden_size`` must be divisible by it."""
    mlp_ratio: float = 4.0
    """MLP inner width as a multiple of ``hidden_size``."""
    qk_norm: bool = False
    """RMS-normalise queries and keys per head (stabilises large models)."""
    attention_backend: Literal["sdpa", "xformers", "math"] = "sdpa"
    """Attention implementation, see :mod:`models.attention`."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in backward (saves memory, costs one extra forward)."""
    frequency_embedding_size: int = 256
    """Width of the sinusoidal timestep features fed to the timestep MLP."""
    num_classes: Optional[int] = None
    """Number of classes for a class-conditional model (label ``num_classes`` = null class); None: unconditional."""
    context_dim: Optional[int] = None
    """Width of ``cond.context`` for cross-attention (PixArt-α); None: no cross-attention."""
    caption_projection: bool = False
    """Map ``cond.context`` to ``hidden_size`` with a 2-layer GELU MLP before cross-attention (PixArt-α)."""
    pooled_dim: Optional[int] = None
    """Width of ``cond.pooled``, added to the timestep embedding through an MLP; None: not used."""
    vector_dim: Optional[int] = None
    """Width of ``cond.vector`` (e.g. micro-conditioning features), added like ``pooled``; None: not used."""
    adaln_single: bool = False
    """PixArt-α adaLN-single: one modulation MLP shared by all blocks plus a learned (6, D) table per block."""
    pos_embed_base_size: Optional[int] = None
    """Patches each axis's positions are rescaled to span (PixArt multi-resolution); None: raw indices (DiT)."""
    pos_embed_interpolation: float = 1.0
    """Divide spatial positions by this (PixArt's ``pe_interpolation``, e.g. 2 for its 1024 px model)."""
    video: bool = False
    """A video model: ``x_t`` must be a ``(B, C, T, H, W)`` clip (a 4-D input is refused); False: an image model,
    taking ``(B, C, H, W)`` images (or ``(B, C, T, H, W)`` clips, a one-frame clip being an image)."""
    patch_size_t: int = 1
    """Frames per patch: 1 patchifies frame by frame (a 2-D convolution); > 1 uses a 3-D convolution over
    ``patch_size_t × p × p`` tubelets (ViViT) and then needs ``T`` divisible by it."""
    mlp_hidden_size: Optional[int] = None
    """MLP inner width; None: ``int(hidden_size · mlp_ratio)`` (Wan gives it directly, e.g. 8960)."""
    qk_norm_type: Literal["per_head", "across_heads"] = "per_head"
    """With ``qk_norm``: RMS-normalise each head's ``head_dim`` features, or all heads' features together (Wan)."""
    cross_attn_norm: bool = False
    """A LayerNorm (with affine weights) before cross-attention (Wan); False: none (PixArt-α)."""
    context_padding: Literal["mask", "zeros"] = "mask"
    """Padded text positions (``cond.context_mask`` False): ``mask`` them out of cross-attention, or set them to
    zero and attend to every position (what Wan was trained with: T5 states zero-padded to 512, no mask)."""
    sincos_pos_embed: bool = True
    """Add the fixed sin-cos position table to the patch tokens (DiT, PixArt, Latte)."""
    rope: bool = False
    """Rotate queries and keys of self-attention by 3-D RoPE over (frame, row, column) (Wan, HunyuanVideo)."""
    rope_axes_dims: Optional[tuple[int, int, int]] = None
    """Head features given to the (time, height, width) rotations; None: Wan's split (:func:`default_rope_axes`)."""
    rope_theta: float = 10000.0
    """RoPE base θ: feature pair ``k`` of an axis of width ``d`` turns by ``position · θ^(-2k/d)``."""
    attention_layout: Literal["full", "factorised"] = "full"
    """``full``: every block attends over all ``T·h·w`` tokens. ``factorised`` (Latte, Ma et al. 2024, its
    interleaved variant): even blocks attend within a frame (spatial, with cross-attention), odd blocks across
    frames at one position (temporal, no cross-attention)."""
    frame_position: Literal["sincos", "temporal_rope", "embedding"] = "sincos"
    """How tokens know their frame. ``sincos``: a 1-D sin-cos table of the frame index is added to every token
    with the spatial table (:func:`spatiotemporal_sincos`). ``temporal_rope`` (factorised layout only): tokens get
    the spatial table alone and the temporal blocks rotate queries and keys by the frame index (1-D RoPE over the
    whole head) — the spatial blocks then see exactly an image model's input, which makes an image DiT inflate
    into this video DiT with its per-frame output unchanged (:meth:`DiT.from_image_dit`). ``embedding``: the
    spatial table alone plus the learned ``frame_embedding`` (required), which starts at zero: an image DiT
    inflated into a full-attention video DiT this way gives the image DiT's output on a still clip exactly
    (attention over identical frames averages what one frame gives)."""
    frame_embedding: bool = False
    """Add a learned embedding of the absolute frame index to every token (an MLP of the frame's sin-cos features
    whose last layer starts at zero, as Stable Video Diffusion's frame embedding): the spatial blocks can then tell
    which frame they draw — what drawing motion needs — while an inflated model still starts as the image model."""
    concat_image_latents: bool = False
    """Image-to-video (Stable Video Diffusion's input): ``cond.image_latents`` (the conditioning frame's latent,
    ``(B, C', H, W)`` or ``(B, C', 1 or T, H, W)``, repeated over the frames) is concatenated to ``x_t``'s channels
    before the patch embedding, which then takes ``in_channels + image_latent_channels`` channels."""
    image_latent_channels: Optional[int] = None
    """Channels of ``cond.image_latents`` under ``concat_image_latents``; None: ``in_channels``."""

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"DiTConfig.{name}={value!r}: must be a positive number")

        for name in ("sample_size", "patch_size", "in_channels", "out_channels", "hidden_size", "depth",
                     "num_heads", "mlp_ratio", "frequency_embedding_size", "num_classes", "context_dim",
                     "pooled_dim", "vector_dim", "pos_embed_base_size", "pos_embed_interpolation", "patch_size_t",
                     "mlp_hidden_size", "rope_theta", "image_latent_channels"):
            positive(name)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"DiTConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.sincos_pos_embed and self.hidden_size % 4:
            raise ValueError(
                f"DiTConfig.hidden_size={self.hidden_size}: must be a multiple of 4 (2-D sin-cos position embedding)"
            )
        if self.sample_size % self.patch_size:
            raise ValueError(
                f"DiTConfig.sample_size={self.sample_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.attention_backend not in BACKENDS:
            raise ValueError(
                f"DiTConfig.attention_backend={self.attention_backend!r}: choose one of {list(BACKENDS)}"
            )
        if self.caption_projection and self.context_dim is None:
            raise ValueError("DiTConfig.caption_projection=True needs context_dim (the width of cond.context)")
        for name, allowed in (("qk_norm_type", ("per_head", "across_heads")), ("context_padding", ("mask", "zeros")),
                              ("attention_layout", ("full", "factorised")),
                              ("frame_position", ("sincos", "temporal_rope", "embedding"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"DiTConfig.{name}={getattr(self, name)!r}: choose one of {list(allowed)}")
        if self.frame_position == "temporal_rope" and (self.attention_layout != "factorised" or self.rope):
            raise ValueError(
                "DiTConfig.frame_position='temporal_rope' rotates the temporal blocks of a factorised model: it "
                f"needs attention_layout='factorised' and rope=false (got attention_layout={self.attention_layout!r}, "
                f"rope={self.rope}); a full-attention model takes rope=true for 3-D RoPE instead"
            )
        if self.frame_position == "embedding" and (not self.frame_embedding or self.rope):
            raise ValueError("DiTConfig.frame_position='embedding' tells frames apart by the learned frame embedding: "
                             f"set frame_embedding=true and rope=false (got frame_embedding={self.frame_embedding}, "
                             f"rope={self.rope})")
        if self.frame_position == "temporal_rope" and self.head_dim % 2:
            raise ValueError(f"DiTConfig.frame_position='temporal_rope': the head width {self.head_dim} must be even")
        if self.rope:
            axes = self.rope_axes
            if len(axes) != 3 or sum(axes) != self.head_dim or any(a <= 0 or a % 2 for a in axes):
                raise ValueError(
                    f"DiTConfig.rope_axes_dims={self.rope_axes_dims!r}: need three positive even widths summing to "
                    f"the head width hidden_size/num_heads={self.head_dim} (got {tuple(axes)})"
                )

    @property
    def head_dim(self) -> int:
        """Features per attention head."""
        return self.hidden_size // self.num_heads

    @property
    def rope_axes(self) -> tuple[int, ...]:
        """Head features rotated with (time, height, width) under ``rope``."""
        return tuple(self.rope_axes_dims) if self.rope_axes_dims is not None else default_rope_axes(self.head_dim)

    @property
    def mlp_width(self) -> int:
        """The MLP's inner width."""
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else int(self.hidden_size * self.mlp_ratio)

    @property
    def input_channels(self) -> int:
        """Channels the patch embedding reads: ``in_channels``, plus the image latents under
        ``concat_image_latents``."""
        extra = (self.image_latent_channels or self.in_channels) if self.concat_image_latents else 0
        return self.in_channels + extra

    @property
    def model_out_channels(self) -> int:
        """Channels the network actually outputs (doubled under ``learn_sigma``)."""
        base = self.out_channels if self.out_channels is not None else self.in_channels
        return 2 * base if self.learn_sigma else base


# --------------------------------------------------------------------------------------------------------------
# Position embeddings
# --------------------------------------------------------------------------------------------------------------


def sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """Fixed 1-D sinusoidal embedding (Vaswani et al. 2017) in the MAE/DiT layout ``[sin(p·ω), cos(p·ω)]``.

    ``positions`` ``(N,)`` (may be fractional) → ``(N, dim)`` float32, ``ω_k = 10000^(-k / (dim/2))``.
    """
    half = dim // 2
    omega = 1.0 / 10000.0 ** (torch.arange(half, dtype=torch.float32, device=positions.device) / half)  # (dim/2,)
    angles = positions.float()[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (N, dim)


def sincos_2d(
    grid_h: int,
    grid_w: int,
    dim: int,
    base_size: Optional[int] = None,
    interpolation: float = 1.0,
    device: Optional[torch.device] = None,
) -> Tensor:
    """2-D sin-cos position embedding of a ``grid_h × grid_w`` patch grid, raster order → ``(grid_h·grid_w, dim)``.

    The first ``dim/2`` features embed the column, the last ``dim/2`` the row (the layout of the DiT/MAE
    reference, so DiT checkpoints line up). Position of index ``i`` along an axis of ``n`` patches is
    ``i · (base_size / n if base_size else 1) / interpolation`` (PixArt's rescaling when ``base_size`` is set).
    """
    scale_h = (base_size / grid_h if base_size else 1.0) / interpolation
    scale_w = (base_size / grid_w if base_size else 1.0) / interpolation
    rows = torch.arange(grid_h, dtype=torch.float32, device=device) * scale_h  # (h,)
    cols = torch.arange(grid_w, dtype=torch.float32, device=device) * scale_w  # (w,)
    emb_cols = sincos_1d(cols, dim // 2)[None, :, :].expand(grid_h, grid_w, dim // 2)  # (h, w, D/2)
    emb_rows = sincos_1d(rows, dim // 2)[:, None, :].expand(grid_h, grid_w, dim // 2)  # (h, w, D/2)
    return torch.cat([emb_cols, emb_rows], dim=-1).reshape(grid_h * grid_w, dim)  # (h*w, D)


def spatiotemporal_sincos(
    frames: int,
    grid_h: int,
    grid_w: int,
    dim: int,
    base_size: Optional[int] = None,
    interpolation: float = 1.0,
    device: Optional[torch.device] = None,
) -> Tensor:
    """Separable position embedding for ``frames × grid_h × grid_w`` tokens → ``(frames·grid_h·grid_w, dim)``.

    Spatial 2-D sin-cos (:func:`sincos_2d`) plus, for ``frames > 1``, a 1-D sin-cos embedding of the frame index
    broadcast over the frame's tokens.
    """
    spatial = sincos_2d(grid_h, grid_w, dim, base_size, interpolation, device)  # (h*w, D)
    if frames == 1:
        return spatial
    temporal = sincos_1d(torch.arange(frames, dtype=torch.float32, device=device), dim)  # (T, D)
    return (temporal[:, None, :] + spatial[None, :, :]).reshape(frames * grid_h * grid_w, dim)  # (T*h*w, D)


# --------------------------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------------------------


def patchify(x: Tensor, patch_size: int, patch_size_t: int = 1) -> Tensor:
    """Cut ``(B, C, T, H, W)`` into ``p_t × p × p`` patches → ``(B, T'·h·w, p_t·p·p·C)`` with ``T' = T / p_t``,
    ``h = H / p``, ``w = W / p``: tokens in (frame, row, column) order, each token's features laid out
    (frame offset, row offset, column offset, channel). The patch embedding is a linear map of these vectors
    (what the strided convolution computes); :func:`unpatchify` is the exact inverse."""
    b, c, t, h, w = x.shape
    p, pt = patch_size, patch_size_t
    if t % pt or h % p or w % p:
        raise ValueError(f"patchify: shape {tuple(x.shape)} is not divisible by the patch ({pt}, {p}, {p})")
    x = x.reshape(b, c, t // pt, pt, h // p, p, w // p, p)  # (B, C, T', pt, h, p, w, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, T', h, w, pt, p, p, C)
    return x.reshape(b, (t // pt) * (h // p) * (w // p), pt * p * p * c)  # (B, N, pt*p*p*C)


def unpatchify(tokens: Tensor, grid: tuple[int, int, int], patch_size: int, patch_size_t: int = 1) -> Tensor:
    """Inverse of :func:`patchify`: ``(B, T'·h·w, p_t·p·p·C)`` tokens of a ``grid = (T', h, w)`` token grid →
    ``(B, C, T'·p_t, h·p, w·p)``."""
    (frames, grid_h, grid_w), p, pt = grid, patch_size, patch_size_t
    b, c = tokens.shape[0], tokens.shape[-1] // (pt * p * p)
    x = tokens.reshape(b, frames, grid_h, grid_w, pt, p, p, c)  # (B, T', h, w, pt, p, p, C)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, T', pt, h, p, w, p)
    return x.reshape(b, c, frames * pt, grid_h * p, grid_w * p)  # (B, C, T, H, W)


# --------------------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------------------


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x · (1 + scale) + shift``; ``shift, scale`` ``(B, D)`` per sample, ``x`` ``(B, N, D)`` tokens."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
    """One DiT block with adaLN-Zero (Peebles & Xie 2023, Fig. 3) and optional PixArt-α cross-attention.

    ``x += gate₁ · SelfAttn(adaLN₁(x))``; ``x += CrossAttn(x, context)`` (PixArt-α, no norm, no gate);
    ``x += gate₂ · MLP(adaLN₂(x))``. The six modulation vectors come from the block's own ``SiLU → Linear`` of the
    conditioning embedding, or, under adaLN-single, from a shared projection plus this block's learned table.
    Wan 2.1's block is this one with ``cross_attn_norm`` (``x += CrossAttn(LN(x), context)``), q/k RMS norms
    across heads, RoPE in self-attention and adaLN-single.

    The block sees a ``(B', N', D)`` token sequence whatever it is: all tokens of a clip, one frame's tokens
    (``B' = B·T``) or one position's frames (``B' = B·h·w``) in a factorised model, with ``c`` and ``context``
    repeated to ``B'`` rows by the caller.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float,
        context_dim: Optional[int] = None,
        qk_norm: bool = False,
        backend: str = "sdpa",
        adaln_single: bool = False,
        *,
        mlp_hidden: Optional[int] = None,
        qk_norm_across_heads: bool = False,
        cross_attn_norm: bool = False,
    ):
        super().__init__()
        self.dim, self.adaln_single = dim, adaln_single
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads=heads, qkv_bias=True, qk_norm=qk_norm, backend=backend,
                              qk_norm_across_heads=qk_norm_across_heads)
        self.cross_attn = (
            Attention(dim, context_dim=context_dim, heads=heads, qkv_bias=True, qk_norm=qk_norm, backend=backend,
                      qk_norm_across_heads=qk_norm_across_heads)
            if context_dim is not None
            else None
        )
        # Wan's cross-attention norm (affine); PixArt-α has none.
        self.norm_cross = (
            nn.LayerNorm(dim, eps=1e-6) if cross_attn_norm and context_dim is not None else None
        )
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, mlp_hidden if mlp_hidden is not None else int(dim * mlp_ratio),
                              activation="gelu_tanh")
        if adaln_single:
            self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(
        self,
        x: Tensor,
        c: Tensor,
        context: Optional[Tensor] = None,
        context_mask: Optional[Tensor] = None,
        rope: Optional[tuple[Tensor, Tensor]] = None,
    ) -> Tensor:
        """x ``(B, N, D)``; c ``(B, D)`` conditioning embedding, or ``(B, 6, D)`` shared modulation under adaLN-single;
        context ``(B, L, Dc)``; context_mask ``(B, L)`` bool; rope ``(cos, sin)`` ``(N, d/2)`` tables or None."""
        if self.adaln_single:
            mod = self.scale_shift_table[None] + c  # (B, 6, D)
        else:
            mod = self.adaLN_modulation(c).view(c.shape[0], 6, self.dim)  # (B, 6, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(dim=1)  # 6 × (B, D)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), rope=rope)  # (B, N, D)
        if self.cross_attn is not None:
            query = self.norm_cross(x) if self.norm_cross is not None else x  # (B, N, D)
            x = x + self.cross_attn(query, context=context, mask=context_mask)  # (B, N, D)
        x = x + gate2[:, None] * self.ff(modulate(self.norm2(x), shift2, scale2))  # (B, N, D)
        return x


class FinalLayer(nn.Module):
    """Modulated LayerNorm then a linear map from tokens to patches (DiT's final layer; PixArt's T2IFinalLayer
    under adaLN-single, where the (2, D) shift/scale table is added to the conditioning embedding)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, adaln_single: bool = False,
                 patch_size_t: int = 1):
        super().__init__()
        self.dim, self.adaln_single = dim, adaln_single
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size_t * patch_size * patch_size * out_channels)
        if adaln_single:
            self.scale_shift_table = nn.Parameter(torch.zeros(2, dim))
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x ``(B, N, D)``, c ``(B, D)`` → ``(B, N, p_t·p·p·C_out)``."""
        if self.adaln_single:
            mod = self.scale_shift_table[None] + c[:, None, :]  # (B, 2, D)
        else:
            mod = self.adaLN_modulation(c).view(c.shape[0], 2, self.dim)  # (B, 2, D)
        shift, scale = mod.unbind(dim=1)  # 2 × (B, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, pt*p*p*C_out)


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Diffusion Transformer (Peebles & Xie 2023) with optional PixArt-α text cross-attention; images and video.

    ``forward(x_t, timesteps, cond)``: ``x_t`` is ``(B, C, H, W)`` (image models only) or ``(B, C, T, H, W)``
    with ``H, W`` divisible by ``patch_size`` (any size and aspect ratio: position embeddings are computed for the
    actual grid, and cached). Per-sample inputs (timesteps, context, labels) have one row per image or clip.

    With ``learn_sigma`` the output has ``2 × out_channels`` channels: the first half is the prediction the
    diffusion process uses (ε, v or x₀ as trained), the second half the learned variance interpolation of Nichol &
    Dhariwal (2021); a process without learned variances uses only the first half (:meth:`split_learned_sigma`).
    """

    _no_split_modules = ("DiTBlock",)  # its repeated blocks: FSDP2 units, activation-checkpointing units
    # Sequence parallelism (training.sequence_parallel): splits the tokens over ranks after the patch embedding and
    # joins the final layer's outputs before unpatchify (full attention layout only); None: one process sees all.
    sequence_shard: Optional[SequenceShard] = None

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = config.gradient_checkpointing
        dim, p = config.hidden_size, config.patch_size
        self.out_channels = config.model_out_channels

        pt = config.patch_size_t
        self.x_embedder = (
            nn.Conv2d(config.input_channels, dim, kernel_size=p, stride=p)
            if pt == 1
            else nn.Conv3d(config.input_channels, dim, kernel_size=(pt, p, p), stride=(pt, p, p))
        )
        self.t_embedder = TimestepMLP(config.frequency_embedding_size, dim)
        self.frame_embedder = TimestepMLP(dim, dim) if config.frame_embedding else None
        # Row ``num_classes`` is the null class used for classifier-free guidance (Ho & Salimans 2022).
        self.y_embedder = nn.Embedding(config.num_classes + 1, dim) if config.num_classes else None
        self.pooled_embedder = TimestepMLP(config.pooled_dim, dim) if config.pooled_dim else None
        self.vector_embedder = TimestepMLP(config.vector_dim, dim) if config.vector_dim else None
        self.context_embedder = (
            nn.Sequential(nn.Linear(config.context_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
            if config.caption_projection
            else None
        )
        # adaLN-single (PixArt-α): the one shared modulation MLP.
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)) if config.adaln_single else None

        cross_dim = None
        if config.context_dim is not None:
            cross_dim = dim if config.caption_projection else config.context_dim
        self.blocks = nn.ModuleList(
            DiTBlock(dim, config.num_heads, config.mlp_ratio, None if self.is_temporal_block(i) else cross_dim,
                     config.qk_norm, config.attention_backend, config.adaln_single, mlp_hidden=config.mlp_width,
                     qk_norm_across_heads=config.qk_norm_type == "across_heads",
                     cross_attn_norm=config.cross_attn_norm)
            for i in range(config.depth)
        )
        self.final_layer = FinalLayer(dim, p, self.out_channels, config.adaln_single, patch_size_t=pt)
        self.initialize_weights()
        # (frames, grid_h, grid_w, device, dtype) -> (T*h*w, D) position table; not state (recomputed on demand)
        self._pos_cache: dict[tuple, Tensor] = {}
        # ("rope", frames, grid_h, grid_w, device) -> (cos, sin) rotary tables; not state either
        self._rope_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def is_temporal_block(self, index: int) -> bool:
        """Whether block ``index`` attends across frames at one position (odd blocks of a factorised model)."""
        return self.config.attention_layout == "factorised" and index % 2 == 1

    def temporal_module_prefixes(self) -> list[str]:
        """Names of the submodules that act across frames (LoRA ``targets: [temporal]``): the temporal blocks of a
        factorised model. A full-attention model has no separate temporal layers (every block attends across
        space and time at once), so asking for them is an error rather than an empty or arbitrary choice."""
        if self.config.attention_layout != "factorised":
            raise ValueError(
                f"this DiT (attention_layout={self.config.attention_layout!r}, video={self.config.video}) has no "
                "separate temporal layers: every block attends over all frames and positions at once. Adapt its "
                "spatio-temporal attention with targets [attention] (or feedforward), or use a factorised DiT"
            )
        return [f"blocks.{i}" for i in range(len(self.blocks)) if self.is_temporal_block(i)]

    # ---- initialisation ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier-uniform linears with zero biases, xavier patch embedding, N(0, 0.02)
        label table and timestep MLP, and zeros for every adaLN modulation and the final linear (adaLN-Zero),
        so the freshly built model outputs exactly zero. PixArt-α extras: N(0, 0.02) caption MLP and shared
        ``t_block``, tables ``randn / √D``, zero cross-attention output projections."""
        dim = self.config.hidden_size

        def basic(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for mlp in (self.t_embedder, self.pooled_embedder, self.vector_embedder):
            if mlp is not None:
                nn.init.normal_(mlp.linear_1.weight, std=0.02)
                nn.init.normal_(mlp.linear_2.weight, std=0.02)
        if self.frame_embedder is not None:  # silent at start: an inflated model is the image model
            nn.init.normal_(self.frame_embedder.linear_1.weight, std=0.02)
            nn.init.zeros_(self.frame_embedder.linear_2.weight)
            nn.init.zeros_(self.frame_embedder.linear_2.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        if self.context_embedder is not None:
            nn.init.normal_(self.context_embedder[0].weight, std=0.02)
            nn.init.normal_(self.context_embedder[2].weight, std=0.02)
        if self.t_block is not None:
            nn.init.normal_(self.t_block[1].weight, std=0.02)
        for block in self.blocks:
            if self.config.adaln_single:
                block.scale_shift_table.normal_(0.0, dim**-0.5)
            else:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.to_out.weight)
                nn.init.zeros_(block.cross_attn.to_out.bias)
        if self.config.adaln_single:
            self.final_layer.scale_shift_table.normal_(0.0, dim**-0.5)
        else:
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Turn per-block activation checkpointing on or off."""
        self.gradient_checkpointing = enabled

    # ---- helpers ----------------------------------------------------------------------------------------------

    def _as_clips(self, x_t: Tensor) -> Tensor:
        """Check ``x_t``'s layout and bring it to ``(B, C, T, H, W)`` (an image becomes a one-frame clip)."""
        p, pt, shape = self.config.patch_size, self.config.patch_size_t, tuple(x_t.shape)
        accepted = "(B, C, T, H, W) clips" if self.config.video else "(B, C, H, W) images or (B, C, T, H, W) clips"
        if x_t.ndim != 5 and (x_t.ndim != 4 or self.config.video):
            kind = "video" if self.config.video else "image"
            raise ValueError(f"this {kind} DiT takes {accepted}; got x_t of shape {shape} ({x_t.ndim}-D)")
        if x_t.shape[1] != self.config.in_channels:
            raise ValueError(f"DiT expects {self.config.in_channels} input channels, got x_t {shape}")
        if x_t.shape[-2] % p or x_t.shape[-1] % p:
            raise ValueError(f"DiT latent height and width must be divisible by patch_size={p}, got x_t {shape}")
        frames = x_t.shape[2] if x_t.ndim == 5 else 1
        if frames % pt:
            raise ValueError(f"DiT latent frames must be divisible by patch_size_t={pt}, got x_t {shape} "
                             f"({frames} frames)")
        return x_t if x_t.ndim == 5 else x_t[:, :, None]  # (B, C, T, H, W)

    def _image_latents(self, cond: Conditioning, x: Tensor) -> Tensor:
        """``cond.image_latents`` as ``(B, C', T, H, W)`` channels to concatenate to the clip ``x``."""
        lat = cond.image_latents
        want = self.config.input_channels - self.config.in_channels
        if lat is None:
            raise ValueError("this DiT concatenates cond.image_latents to x_t (concat_image_latents); it is None "
                             "(the null image conditioning is zeros: models.conditioning)")
        if lat.ndim == 4:
            lat = lat[:, :, None]  # (B, C', 1, H, W)
        b, _, t, h, w = x.shape
        if lat.ndim != 5 or lat.shape[0] != b or lat.shape[1] != want or lat.shape[2] not in (1, t) \
                or tuple(lat.shape[-2:]) != (h, w):
            raise ValueError(f"cond.image_latents has shape {tuple(lat.shape)}; expected (B, C', H, W) or "
                             f"(B, C', 1 or T, H, W) with B={b}, C'={want}, T={t}, H×W={h}×{w} (x_t {tuple(x.shape)})")
        return lat.to(x.dtype).expand(b, want, t, h, w)  # (B, C', T, H, W)

    def position_table(self, frames: int, grid_h: int, grid_w: int, device: torch.device, dtype: torch.dtype
                       ) -> Tensor:
        """The ``(T·h·w, D)`` sin-cos position table of a token grid (:func:`spatiotemporal_sincos`), cached per
        (grid, device, dtype): it depends on nothing else, so it is built once instead of every forward."""
        key = (frames, grid_h, grid_w, torch.device(device), dtype)
        table = self._pos_cache.get(key)
        if table is None:
            cfg = self.config
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable later under autograd too
                if cfg.frame_position != "sincos":  # frames told apart by temporal RoPE or the frame embedding
                    table = sincos_2d(grid_h, grid_w, cfg.hidden_size, cfg.pos_embed_base_size,
                                      cfg.pos_embed_interpolation, device=device).repeat(frames, 1).to(dtype)
                else:
                    table = spatiotemporal_sincos(frames, grid_h, grid_w, cfg.hidden_size, cfg.pos_embed_base_size,
                                                  cfg.pos_embed_interpolation, device=device).to(dtype)  # (N, D)
            if len(self._pos_cache) >= POS_CACHE_SIZE:
                self._pos_cache.pop(next(iter(self._pos_cache)))  # the oldest
            self._pos_cache[key] = table
        return table

    def rope_tables(self, frames: int, grid_h: int, grid_w: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The ``(cos, sin)`` 3-D RoPE tables (each ``(T·h·w, d/2)`` float32, :func:`~models.embeddings.rope_3d`)
        of a token grid, cached per (grid, device) like :meth:`position_table`."""
        key = (frames, grid_h, grid_w, torch.device(device))
        tables = self._rope_cache.get(key)
        if tables is None:
            cfg = self.config
            with torch.inference_mode(False), torch.no_grad():
                tables = rope_3d(frames, grid_h, grid_w, cfg.rope_axes, cfg.rope_theta, device=device)
            if len(self._rope_cache) >= POS_CACHE_SIZE:
                self._rope_cache.pop(next(iter(self._rope_cache)))
            self._rope_cache[key] = tables
        return tables

    def frame_rope_tables(self, frames: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` ``(T', d/2)`` of 1-D RoPE over the frame index across the whole head (the temporal blocks
        under ``frame_position: temporal_rope``), cached like :meth:`rope_tables`."""
        key = ("frames", frames, torch.device(device))
        tables = self._rope_cache.get(key)
        if tables is None:
            with torch.inference_mode(False), torch.no_grad():
                angles = rope_angles(torch.arange(frames, device=device), self.config.head_dim,
                                     self.config.rope_theta)  # (T', d/2)
                tables = angles.cos().float(), angles.sin().float()
            if len(self._rope_cache) >= POS_CACHE_SIZE:
                self._rope_cache.pop(next(iter(self._rope_cache)))
            self._rope_cache[key] = tables
        return tables

    def embed_conditioning(self, timesteps: Tensor, cond: Conditioning, batch: int) -> Tensor:
        """The vector that drives adaLN: timestep MLP (+ class embedding, + pooled / vector MLPs) → ``(B, D)``."""
        dtype = self.t_embedder.linear_1.weight.dtype
        freqs = timestep_embedding(timesteps, self.config.frequency_embedding_size).to(dtype)  # (B, F)
        emb = self.t_embedder(freqs)  # (B, D)
        if self.y_embedder is not None:
            if cond.class_labels is None:
                raise ValueError(
                    "this DiT is class-conditional: pass cond.class_labels (use label num_classes="
                    f"{self.config.num_classes} for the null class)"
                )
            emb = emb + self.y_embedder(cond.class_labels.to(torch.long))  # (B, D)
        if self.pooled_embedder is not None:
            if cond.pooled is None:
                raise ValueError(f"this DiT has pooled_dim={self.config.pooled_dim}: pass cond.pooled")
            emb = emb + self.pooled_embedder(cond.pooled.to(dtype))  # (B, D)
        if self.vector_embedder is not None:
            if cond.vector is None:
                raise ValueError(f"this DiT has vector_dim={self.config.vector_dim}: pass cond.vector")
            emb = emb + self.vector_embedder(cond.vector.to(dtype))  # (B, D)
        if emb.shape[0] != batch:
            raise ValueError(f"conditioning has batch {emb.shape[0]} but x_t holds {batch} samples/clips")
        return emb

    def unpatchify(self, tokens: Tensor, frames: int, grid_h: int, grid_w: int) -> Tensor:
        """``(B, T'·h·w, p_t·p·p·C)`` → ``(B, C, T'·p_t, h·p, w·p)`` for a ``(T', h, w)`` token grid; each token's
        features are laid out (frame offset, row, col, channel) (:func:`unpatchify`)."""
        return unpatchify(tokens, (frames, grid_h, grid_w), self.config.patch_size, self.config.patch_size_t)

    def _factorised_blocks(self, tokens: Tensor, grid: tuple[int, int, int], mod: Tensor,
                           context: Optional[Tensor], context_mask: Optional[Tensor]) -> Tensor:
        """Latte's interleaved factorisation (Ma et al. 2024, variant 1): even blocks see one frame's ``h·w``
        tokens (the clip's frames folded into the batch), odd blocks one position's ``T'`` tokens (positions
        folded into the batch). Per-clip inputs are repeated to the folded batch. Under RoPE a spatial block
        rotates by (row, column) and a temporal block by frame: the pairs a block compares share the other
        coordinates, so this is the full 3-D rotation restricted to them. ``tokens`` ``(B, T'·h·w, D)``."""
        (frames, gh, gw), cfg = grid, self.config
        b, n, dim = tokens.shape
        hw = gh * gw
        rope_s = self.rope_tables(1, gh, gw, tokens.device) if cfg.rope else None  # 2 × (h*w, d/2)
        rope_t = None
        if cfg.rope:
            rope_t = self.rope_tables(frames, 1, 1, tokens.device)  # 2 × (T', d/2), the time axis's features
        elif cfg.frame_position == "temporal_rope":
            rope_t = self.frame_rope_tables(frames, tokens.device)  # 2 × (T', d/2), the whole head
        mod_s = mod.repeat_interleave(frames, dim=0)  # (B*T', 6, D) or (B*T', D)
        mod_t = mod.repeat_interleave(hw, dim=0)  # (B*hw, 6, D) or (B*hw, D)
        context_s = context.repeat_interleave(frames, dim=0) if context is not None else None  # (B*T', L, Dc)
        mask_s = context_mask.repeat_interleave(frames, dim=0) if context_mask is not None else None  # (B*T', L)
        for i, block in enumerate(self.blocks):
            if self.is_temporal_block(i):
                x = tokens.view(b, frames, hw, dim).transpose(1, 2).reshape(b * hw, frames, dim)  # (B*hw, T', D)
                x = checkpointed(block, x, mod_t, None, None, rope_t, enabled=self.gradient_checkpointing)
                tokens = x.view(b, hw, frames, dim).transpose(1, 2).reshape(b, n, dim)  # (B, N, D)
            else:
                x = tokens.reshape(b * frames, hw, dim)  # (B*T', hw, D)
                x = checkpointed(block, x, mod_s, context_s, mask_s, rope_s, enabled=self.gradient_checkpointing)
                tokens = x.reshape(b, n, dim)  # (B, N, D)
        return tokens

    # ---- inflation --------------------------------------------------------------------------------------------

    image_architecture = "dit"  # the registered architecture an image model to inflate from has (:meth:`inflate`)

    @classmethod
    def inflate(cls, image_dit: "DiT", config: DiTConfig) -> "DiT":
        """The video DiT ``config`` inflated from ``image_dit`` (:meth:`from_image_dit`; the interface the
        training stages use for every inflatable architecture)."""
        return cls.from_image_dit(image_dit, config=config)

    @staticmethod
    def inflated_config(image: DiTConfig, *, layout: str = "factorised", concat_image_latents: bool = False,
                        image_latent_channels: Optional[int] = None, **overrides: Any) -> DiTConfig:
        """The video config an image DiT's config inflates to (:meth:`from_image_dit`). ``layout="factorised"``:
        each image block followed by a new temporal block (depth doubled), frames told apart by the temporal
        blocks' RoPE. ``layout="full"``: the same blocks attending over every token of the clip, frames told apart
        by the learned frame embedding. ``overrides`` set other fields (gradient checkpointing, backend, ...)."""
        if image.video or image.attention_layout != "full" or image.patch_size_t != 1 or image.rope:
            raise ValueError("DiT.from_image_dit: the model to inflate must be an image DiT (video=false, "
                             "attention_layout=full, patch_size_t=1, rope=false)")
        if layout not in ("factorised", "full"):
            raise ValueError(f"DiT.from_image_dit: layout={layout!r}; choose factorised or full")
        factorised = layout == "factorised"
        fields = {**dataclasses.asdict(image), "video": True, "attention_layout": layout,
                  "depth": 2 * image.depth if factorised else image.depth,
                  "frame_position": "temporal_rope" if factorised else "embedding", "frame_embedding": True,
                  "concat_image_latents": concat_image_latents, "image_latent_channels": image_latent_channels}
        return DiTConfig(**{**fields, **overrides})

    @classmethod
    def from_image_dit(cls, image_dit: "DiT", *, config: Optional[DiTConfig] = None, **kwargs: Any) -> "DiT":
        """Inflate a trained image DiT into a factorised video DiT that, at initialisation, computes exactly the
        image DiT frame by frame (the image-pretraining-first recipe of VideoLDM and Stable Video Diffusion,
        Blattmann et al. 2023, applied to Latte's interleaved spatial/temporal blocks, Ma et al. 2024).

        Image block ``i`` becomes spatial block ``2i``; the new temporal blocks ``2i + 1`` keep DiT's adaLN-Zero
        initialisation (zero gates: each returns its input) and still get gradients from the first step (their
        modulation layer's gradient is not zero). Tokens get the image's spatial position table and frames are
        told apart by 1-D RoPE in the temporal blocks (``frame_position: temporal_rope``), so no new input
        reaches the spatial blocks but the frame embedding, whose last layer starts at zero.

        ``layout="full"`` (the config's ``attention_layout`` when ``config`` is given) keeps the image blocks as
        they are, each now attending over all ``T·h·w`` tokens (Wan, Sora-style 3-D attention, which draws motion
        in one step) with the zero-started frame embedding: exact on still clips (attention over ``T`` copies of a
        frame's keys gives what one copy gives), approximately the image model frame by frame on moving ones.
        Under ``concat_image_latents`` the patch embedding gains zero-initialised input channels. ``config``: the
        target config (checked against :meth:`inflated_config` of the image's); otherwise ``kwargs`` build it."""
        if config is not None:
            kwargs.setdefault("layout", config.attention_layout)
        want = cls.inflated_config(image_dit.config, **kwargs)
        if config is not None:
            mismatched = [f.name for f in dataclasses.fields(DiTConfig)
                          if f.name not in INFLATION_FREE_FIELDS
                          and getattr(config, f.name) != getattr(want, f.name)
                          and f.name not in ("concat_image_latents", "image_latent_channels")]
            if mismatched:
                raise ValueError(
                    "DiT.from_image_dit: the video config does not extend the image DiT's; differing fields: "
                    + ", ".join(f"{n}={getattr(config, n)!r} (inflation needs {getattr(want, n)!r})"
                                for n in mismatched))
            want = config
        param = next(image_dit.parameters())
        with torch.device(param.device):
            video = cls(want)
        state: dict[str, Tensor] = {}
        stride = 2 if want.attention_layout == "factorised" else 1
        for name, value in image_dit.state_dict().items():
            if name.startswith("blocks.") and stride == 2:
                _, index, rest = name.split(".", 2)
                name = f"blocks.{2 * int(index)}.{rest}"
            state[name] = value
        extra = want.input_channels - image_dit.config.input_channels
        if extra:
            weight = state["x_embedder.weight"]  # (D, C, p, p)
            state["x_embedder.weight"] = torch.cat([weight, weight.new_zeros(weight.shape[0], extra,
                                                                             *weight.shape[2:])], dim=1)
        missing, unexpected = video.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"DiT.from_image_dit: image weights without a place in the video DiT: {unexpected[:8]}")
        stray = [k for k in missing if not (k.startswith("blocks.") and video.is_temporal_block(int(k.split(".")[1])))
                 and not k.startswith("frame_embedder.")]
        if stray:
            raise ValueError(f"DiT.from_image_dit: video weights left uninitialised: {stray[:8]}")
        return video.to(param.dtype)

    @staticmethod
    def split_learned_sigma(output: Tensor) -> tuple[Tensor, Tensor]:
        """Split a ``learn_sigma`` output into (prediction, variance interpolation) along channels."""
        return output.chunk(2, dim=1)

    # ---- forward ----------------------------------------------------------------------------------------------

    def forward(
        self, x_t: Tensor, timesteps: Union[Tensor, float, int], cond: Optional[Conditioning] = None
    ) -> Tensor:
        """``x_t`` ``(B, C, H, W)`` (image models) or ``(B, C, T, H, W)``; ``timesteps`` ``(B,)`` or a scalar →
        same layout as ``x_t`` with ``model_out_channels`` channels."""
        cond = cond if cond is not None else Conditioning()
        cfg, dim, p, pt = self.config, self.config.hidden_size, self.config.patch_size, self.config.patch_size_t
        x = self._as_clips(x_t)  # (B, C, T, H, W)
        if cfg.concat_image_latents:
            x = torch.cat([x, self._image_latents(cond, x)], dim=1)  # (B, C + C', T, H, W)
        b, c, _, h, w = x.shape
        frames, gh, gw = x.shape[2] // pt, h // p, w // p  # the token grid (T', h, w)
        timesteps = broadcast_timesteps(timesteps, b, x.device)  # (B,)

        if pt == 1:
            tokens = self.x_embedder(fold_frames(x))  # (B*T, D, h, w)
            tokens = tokens.flatten(2).transpose(1, 2).reshape(b, frames * gh * gw, dim)  # (B, N, D), N = T*h*w
        else:
            tokens = self.x_embedder(x).flatten(2).transpose(1, 2)  # (B, N, D), N = T'*h*w
        if cfg.sincos_pos_embed:
            tokens = tokens + self.position_table(frames, gh, gw, tokens.device, tokens.dtype)[None]  # (B, N, D)
        if self.frame_embedder is not None:
            index = torch.arange(frames, device=tokens.device)
            table = self.frame_embedder(sincos_1d(index, dim).to(tokens.dtype))  # (T', D)
            tokens = tokens + table.repeat_interleave(gh * gw, dim=0)[None]  # (B, N, D): frame-major tokens

        emb = self.embed_conditioning(timesteps, cond, b)  # (B, D)
        mod = self.t_block(emb).view(b, 6, dim) if self.t_block is not None else emb  # (B, 6, D) or (B, D)

        context, context_mask = None, None
        if cfg.context_dim is not None:
            if cond.context is None:
                raise ValueError(f"this DiT cross-attends to text (context_dim={cfg.context_dim}): pass cond.context")
            context = cond.context.to(tokens.dtype)  # (B, L, Dc)
            context_mask = cond.context_mask  # (B, L) or None
            if cfg.context_padding == "zeros" and context_mask is not None:
                context = context * context_mask[..., None].to(context.dtype)  # padded positions → 0, all attended
                context_mask = None
            if self.context_embedder is not None:
                context = self.context_embedder(context)  # (B, L, D)

        if cfg.attention_layout == "full":
            rope = self.rope_tables(frames, gh, gw, tokens.device) if cfg.rope else None  # 2 × (N, d/2)
            if self.sequence_shard is not None:
                tokens, rope = self.sequence_shard.scatter(tokens, rope)  # this rank's (B, n, D), 2 × (n, d/2)
            for block in self.blocks:
                tokens = checkpointed(block, tokens, mod, context, context_mask, rope,
                                      enabled=self.gradient_checkpointing)  # (B, N, D)
        else:
            tokens = self._factorised_blocks(tokens, (frames, gh, gw), mod, context, context_mask)  # (B, N, D)
        out = self.final_layer(tokens, emb)  # (B, N, pt*p*p*C_out)
        if self.sequence_shard is not None:
            out = self.sequence_shard.gather(out)  # every rank's tokens: (B, N, pt*p*p*C_out)
        out = self.unpatchify(out, frames, gh, gw)  # (B, C_out, T, H, W)
        return out if x_t.ndim == 5 else out[:, :, 0]  # like x_t: (B, C_out, T, H, W) or (B, C_out, H, W)


# --------------------------------------------------------------------------------------------------------------
# Registration and presets
# --------------------------------------------------------------------------------------------------------------


# Fields a video config may set freely when an image DiT is inflated into it (they change no weight's meaning).
INFLATION_FREE_FIELDS = frozenset({"gradient_checkpointing", "attention_backend", "sample_size"})

# Peebles & Xie (2023), Table 1: name -> (depth, hidden size, heads).
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
DIT_PATCHES: tuple[int, ...] = (2, 4, 8)
TEXT_CONTEXT_DIM = 1024  # OpenCLIP ViT-H/14 text width (Stable Diffusion 2.x); override for other encoders


def dit_class_conditional(size: str, patch: int) -> DiTConfig:
    """The paper's ImageNet 256×256 model: 32×32×4 latents, 1000 classes (+ null), learned sigma."""
    depth, hidden, heads = DIT_SIZES[size]
    return DiTConfig(sample_size=32, patch_size=patch, in_channels=4, learn_sigma=True, hidden_size=hidden,
                     depth=depth, num_heads=heads, num_classes=1000)


def dit_text_conditional(size: str, patch: int, context_dim: int = TEXT_CONTEXT_DIM) -> DiTConfig:
    """PixArt-α-style text-to-image DiT: cross-attention to ``context_dim``-wide text states through a caption
    MLP, adaLN-single; predicts ``in_channels`` channels (no learned sigma)."""
    depth, hidden, heads = DIT_SIZES[size]
    return DiTConfig(sample_size=32, patch_size=patch, in_channels=4, hidden_size=hidden, depth=depth,
                     num_heads=heads, context_dim=context_dim, caption_projection=True, adaln_single=True)


for _size in DIT_SIZES:
    for _patch in DIT_PATCHES:
        register_preset(f"DiT-{_size}/{_patch}", lambda s=_size, p=_patch: dit_class_conditional(s, p))
        register_preset(f"DiT-{_size}/{_patch}-text", lambda s=_size, p=_patch: dit_text_conditional(s, p))


@register_preset("dit-tiny")
def _dit_tiny() -> DiTConfig:
    """Class-conditional toy DiT for tests (10 classes, learned sigma)."""
    return DiTConfig(sample_size=8, patch_size=2, in_channels=4, learn_sigma=True, hidden_size=32, depth=2,
                     num_heads=2, num_classes=10)


@register_preset("dit-tiny-text")
def _dit_tiny_text() -> DiTConfig:
    """Text-conditional toy DiT matching ``models/configs/openclip-tiny-text.json`` (width 64, embed 32)."""
    return DiTConfig(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                     context_dim=64, pooled_dim=32, caption_projection=True, adaln_single=True)


@register_preset("latte-tiny")
def _latte_tiny() -> DiTConfig:
    """Toy Latte-style video DiT (factorised spatial/temporal blocks, sin-cos positions) for tests."""
    return DiTConfig(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2,
                     context_dim=64, caption_projection=True, adaln_single=True, video=True,
                     attention_layout="factorised")


# --------------------------------------------------------------------------------------------------------------
# Wan 2.1 (Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models")
# --------------------------------------------------------------------------------------------------------------
#
# Wan's transformer is this DiT with: a Conv3d patch embedding (1, 2, 2); no sin-cos table but 3-D RoPE in
# self-attention; q/k RMS norms across heads in both attentions; a LayerNorm (affine) before cross-attention;
# adaLN-single (a shared ``SiLU → Linear(D, 6D)`` of the time embedding plus a (6, D) table per block, a (2, D) table
# for the head); the PixArt-α caption MLP on the T5 states (zero-padded to 512, no mask); a timestep embedding of 256
# sinusoid features, cosines first. So it is a DiT config, not a separate class.

WAN_TEXT_DIM = 4096  # umT5-XXL encoder width
WAN_LATENT_CHANNELS = 16  # Wan 2.1 VAE latent channels


def wan_config(
    num_heads: int,
    mlp_hidden_size: int,
    depth: int,
    head_dim: int = 128,
    in_channels: int = WAN_LATENT_CHANNELS,
    out_channels: Optional[int] = None,
    text_dim: int = WAN_TEXT_DIM,
    patch_size: tuple[int, int, int] = (1, 2, 2),
    frequency_embedding_size: int = 256,
    cross_attn_norm: bool = True,
) -> DiTConfig:
    """A :class:`DiTConfig` with Wan 2.1's architecture (``WanTransformer3DModel`` of diffusers); arguments are
    diffusers' ``num_attention_heads``, ``ffn_dim``, ``num_layers``, ``attention_head_dim``, ``in_channels``,
    ``out_channels``, ``text_dim``, ``patch_size``, ``freq_dim``, ``cross_attn_norm``."""
    pt, ph, pw = patch_size
    if ph != pw:
        raise ValueError(f"Wan patch_size={tuple(patch_size)}: only square spatial patches are supported")
    return DiTConfig(
        sample_size=ph * 8, patch_size=ph, patch_size_t=pt, in_channels=in_channels, out_channels=out_channels,
        hidden_size=num_heads * head_dim, depth=depth, num_heads=num_heads, mlp_hidden_size=mlp_hidden_size,
        qk_norm=True, qk_norm_type="across_heads", frequency_embedding_size=frequency_embedding_size,
        context_dim=text_dim, caption_projection=True, adaln_single=True, cross_attn_norm=cross_attn_norm,
        context_padding="zeros", sincos_pos_embed=False, rope=True, video=True,
    )


def is_wan_config(config: DiTConfig) -> bool:
    """Whether ``config`` has Wan's structure (the converters below apply to it)."""
    return (config.adaln_single and config.caption_projection and config.context_dim is not None and config.qk_norm
            and config.qk_norm_type == "across_heads" and config.rope and not config.sincos_pos_embed
            and config.attention_layout == "full" and config.num_classes is None and config.pooled_dim is None
            and config.vector_dim is None and not config.learn_sigma)


# Our name → diffusers' (whole dotted segments, in order), and → the original Wan checkpoints'.
_WAN_DIFFUSERS_RULES: tuple[tuple[str, str], ...] = (
    (r"^x_embedder\.", "patch_embedding."),
    (r"^t_embedder\.", "condition_embedder.time_embedder."),
    (r"^t_block\.1\.", "condition_embedder.time_proj."),
    (r"^context_embedder\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^context_embedder\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"\.attn\.", ".attn1."),
    (r"\.cross_attn\.", ".attn2."),
    (r"\.to_out\.", ".to_out.0."),
    (r"\.q_norm\.", ".norm_q."),
    (r"\.k_norm\.", ".norm_k."),
    (r"\.norm_cross\.", ".norm2."),
    (r"\.ff\.proj_in\.", ".ffn.net.0.proj."),
    (r"\.ff\.proj_out\.", ".ffn.net.2."),
    (r"^final_layer\.linear\.", "proj_out."),
    (r"^final_layer\.scale_shift_table$", "scale_shift_table"),
)
_WAN_ORIGINAL_RULES: tuple[tuple[str, str], ...] = (
    (r"^x_embedder\.", "patch_embedding."),
    (r"^t_embedder\.linear_1\.", "time_embedding.0."),
    (r"^t_embedder\.linear_2\.", "time_embedding.2."),
    (r"^t_block\.1\.", "time_projection.1."),
    (r"^context_embedder\.", "text_embedding."),
    (r"\.attn\.", ".self_attn."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.", ".o."),
    (r"\.q_norm\.", ".norm_q."),
    (r"\.k_norm\.", ".norm_k."),
    (r"\.norm_cross\.", ".norm3."),
    (r"\.ff\.proj_in\.", ".ffn.0."),
    (r"\.ff\.proj_out\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^final_layer\.linear\.", "head.head."),
    (r"^final_layer\.scale_shift_table$", "head.modulation"),
)
WAN_ORIGINAL_PREFIX = "model.diffusion_model."  # ComfyUI-style single files put the Wan names under this


def _rewriter(rules: tuple[tuple[str, str], ...]):
    compiled = tuple((re.compile(pattern), replacement) for pattern, replacement in rules)

    def rename(name: str) -> str:
        for pattern, replacement in compiled:
            name = pattern.sub(replacement, name)
        return name

    return rename


wan_diffusers_name = _rewriter(_WAN_DIFFUSERS_RULES)
wan_original_name = _rewriter(_WAN_ORIGINAL_RULES)


def _check_wan(config: DiTConfig, what: str) -> None:
    if not is_wan_config(config):
        raise ValueError(f"{what}: this DiT config is not Wan-shaped (build it with models.dit.wan_config or a "
                         "wan2.1-* preset)")


def _squeeze_tables(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Wan stores the modulation tables as (1, 6, D) / (1, 2, D); ours are (6, D) / (2, D)."""
    return {k: v[0] if k.endswith(("scale_shift_table", "modulation")) and v.ndim == 3 and v.shape[0] == 1 else v
            for k, v in state_dict.items()}


def _from_wan(state_dict: Mapping[str, Tensor], config: DiTConfig, rename, what: str) -> dict[str, Tensor]:
    from models.convert import _meta_shapes, _rename  # lazily: models.convert imports the U-Net and autoencoder

    _check_wan(config, what)
    return _rename(_squeeze_tables(state_dict), _meta_shapes(lambda: DiT(config)), rename, what)


def _to_wan(state_dict: Mapping[str, Tensor], config: DiTConfig, rename) -> dict[str, Tensor]:
    _check_wan(config, "export to Wan naming")
    out = {}
    for name, value in state_dict.items():
        if name.endswith("scale_shift_table"):
            value = value[None]  # (1, 6, D) / (1, 2, D)
        elif name == "x_embedder.weight" and value.ndim == 4:
            value = value[:, :, None]  # (D, C, 1, p, p): Wan's Conv3d
        out[rename(name)] = value
    return out


def from_diffusers_wan_state_dict(state_dict: Mapping[str, Tensor], config: DiTConfig) -> dict[str, Tensor]:
    """A diffusers ``WanTransformer3DModel`` state dict → ours (load with ``strict=True``)."""
    return _from_wan(state_dict, config, wan_diffusers_name, "diffusers Wan transformer")


def to_diffusers_wan_state_dict(state_dict: Mapping[str, Tensor], config: DiTConfig) -> dict[str, Tensor]:
    """Our Wan-shaped DiT state dict → diffusers ``WanTransformer3DModel`` names and shapes."""
    return _to_wan(state_dict, config, wan_diffusers_name)


def from_wan_state_dict(state_dict: Mapping[str, Tensor], config: DiTConfig) -> dict[str, Tensor]:
    """An original Wan 2.1 checkpoint (Wan-AI's ``diffusion_pytorch_model*.safetensors``: ``blocks.N.self_attn.q``,
    ``head.modulation``, ...; optionally under ``model.diffusion_model.``) → ours."""
    from models.convert import _strip_prefix

    return _from_wan(_strip_prefix(state_dict, WAN_ORIGINAL_PREFIX), config, wan_original_name,
                     "original Wan checkpoint")


def to_wan_state_dict(state_dict: Mapping[str, Tensor], config: DiTConfig) -> dict[str, Tensor]:
    """Our Wan-shaped DiT state dict → the original Wan checkpoint names."""
    return _to_wan(state_dict, config, wan_original_name)


_WAN_USED = {"patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
             "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm"}
_WAN_FIXED: dict[str, Any] = {"qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
                              "added_kv_proj_dim": None, "pos_embed_seq_len": None}
_WAN_IGNORED = {"rope_max_seq_len"}  # positions are computed for the actual grid, without a table limit


def config_from_diffusers_wan(config: Mapping[str, Any], **overrides: Any) -> DiTConfig:
    """A diffusers ``WanTransformer3DModel`` ``config.json`` (as a dict) → :class:`DiTConfig`. The image-to-video
    variant (``image_dim``, ``added_kv_proj_dim``) is not supported and raises ``ValueError``."""
    from models.convert import _check_keys

    _check_keys(config, _WAN_FIXED, _WAN_USED, _WAN_IGNORED, "diffusers Wan transformer")
    in_channels = int(config.get("in_channels", 16))
    out_channels = config.get("out_channels")
    out_channels = None if out_channels in (None, 0, in_channels) else int(out_channels)  # None: like the input
    built = wan_config(
        num_heads=int(config.get("num_attention_heads", 40)), mlp_hidden_size=int(config.get("ffn_dim", 13824)),
        depth=int(config.get("num_layers", 40)), head_dim=int(config.get("attention_head_dim", 128)),
        in_channels=in_channels, out_channels=out_channels,
        text_dim=int(config.get("text_dim", 4096)), patch_size=tuple(config.get("patch_size", (1, 2, 2))),
        frequency_embedding_size=int(config.get("freq_dim", 256)),
        cross_attn_norm=bool(config.get("cross_attn_norm", True)),
    )
    return dataclasses.replace(built, **overrides)


from models.dit_checkpoints import from_diffusers_state_dict, from_original_state_dict  # noqa: E402

# "diffusers": Wan, DiT or PixArt by the config's shape; "original": facebookresearch DiT / PixArt-α/Σ files.
register_architecture("dit", DiTConfig, DiT,
                      converters={"diffusers": from_diffusers_state_dict, "wan": from_wan_state_dict,
                                  "original": from_original_state_dict})


# Published Wan 2.1 text-to-video models (the diffusers conversion configs of Wan-AI/Wan2.1-T2V-*):
# name -> (heads, ffn width, layers); head width 128, umT5-XXL text (4096), 16 latent channels, patch (1, 2, 2).
WAN_SIZES: dict[str, tuple[int, int, int]] = {
    "wan2.1-t2v-1.3b": (12, 8960, 30),
    "wan2.1-t2v-14b": (40, 13824, 40),
}
for _name, (_heads, _ffn, _layers) in WAN_SIZES.items():
    register_preset(_name, lambda h=_heads, f=_ffn, n=_layers: wan_config(h, f, n))


@register_preset("wan-tiny")
def _wan_tiny() -> DiTConfig:
    """Toy Wan-shaped DiT for tests: width 32 (2 heads of 16), 2 blocks, text width 64
    (``models/configs/openclip-tiny-text.json``)."""
    return wan_config(num_heads=2, mlp_hidden_size=64, depth=2, head_dim=16, text_dim=64)


@register_preset("wan-small")
def _wan_small() -> DiTConfig:
    """Quickstart-size Wan-shaped DiT: width 384 (6 heads of 64), 8 blocks, MLP 1024, text width 64."""
    return wan_config(num_heads=6, mlp_hidden_size=1024, depth=8, head_dim=64, text_dim=64)
