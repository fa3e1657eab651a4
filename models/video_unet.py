"""The spatio-temporal latent U-Net of Stable Video Diffusion, and the inflation of an image U-Net into one.

Architecture (Blattmann et al. 2023, "Align your Latents" = VideoLDM, Sec. 3.1; and "Stable Video Diffusion",
Sec. 3/App. D): the latent-diffusion U-Net of :mod:`models.unet`, run on the frames of a clip folded into the batch,
with *temporal* layers interleaved:

* after every spatial ResBlock, a temporal ResBlock (3-D convolutions of kernel ``(k, 1, 1)``: time only) —
  :class:`SpatioTemporalResBlock`;
* after every spatial transformer block, a temporal transformer block (self-attention over the frames of each
  spatial position, cross-attention to the clip's context, GEGLU feed-forwards), fed the spatial features plus a
  learned *frame position embedding* (an MLP of the sinusoidal embedding of the frame index) —
  :class:`SpatioTemporalTransformer`;
* each temporal branch merged with its spatial input by a learned mix factor, ``α·spatial + (1 − α)·temporal``
  with ``α = sigmoid(mix_factor)`` (:class:`AlphaBlender`; SVD's ``"learned_with_images"`` strategy also sets
  ``α = 1`` for image batches, so an image skips every temporal layer).

SVD's added conditioning: the clip's fps (minus one, as SVD was trained), motion bucket id and the noise-augmentation
strength of the conditioning frame, each embedded as 256 sinusoidal (Fourier) features, go through an MLP and are
added to the timestep embedding. Image-to-video input: the conditioning frame's latent (``cond.image_latents``,
broadcast over the frames) is concatenated to ``x_t``'s channels (4 + 4 = 8 in SVD), and the cross-attention context
is the CLIP image embedding (``cond.image_embeds``, ``(B, 1, 1024)``) or the text states (``cond.context``), as the
config says.

Calling convention (every denoiser in :mod:`models`): ``unet(x_t, timesteps, cond) -> tensor shaped like x_t``, with
``x_t`` a clip ``(B, C, T, H, W)`` (an image is a one-frame clip; a 4-D input is an error). Conditioning fields read
(:class:`~models.conditioning.Conditioning`): ``image_latents`` (``concat_image_latents``), ``image_embeds`` or
``context``/``context_mask`` (``context_source``), ``fps``, ``motion_bucket``, ``aug_strength`` (``add_time_ids``).

Weights: diffusers' ``UNetSpatioTemporalConditionModel`` layout (:func:`from_diffusers_state_dict`) and the original
Stability AI (``generative-models``/SGM ``VideoUNet``) single-file naming ``model.diffusion_model.*``
(:func:`from_sgm_state_dict`; registered as the ``"ldm"`` naming, like the image U-Net's original files). The
spatial layers keep the image U-Net's parameter names, so an image U-Net's state dict is a subset of this one's:
:meth:`VideoUNet.from_image_unet` (VideoLDM's inflation) copies it and adds temporal layers initialised to add
nothing, so the new network starts as the image network applied frame by frame.

A numerical detail of diffusers: its SVD U-Net builds the ResBlocks of the cross-attention down levels and of all up
levels with GroupNorm eps 1e-6 (1e-5 elsewhere), while SGM's original uses 1e-5 throughout. ``resnet_eps_layout``
selects either (``"diffusers_svd"``, the preset's default, reproduces diffusers; ``"uniform"`` the original); the
weights are the same.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import Attention, FeedForward
from models.blocks import Downsample, ResBlock, Upsample, fold_frames, group_norm, unfold_frames
from models.conditioning import Conditioning
from models.embeddings import TimestepMLP, broadcast_timesteps, fourier_features, timestep_embedding
from models.registry import register_architecture, register_preset
from models.unet import SpatialTransformer, UNet, UNetConfig, build_levels
from models.utils import checkpointed

ADD_TIME_IDS: tuple[str, ...] = ("fps", "motion_bucket", "aug_strength")  # SVD's added conditioning, in its order
MERGE_STRATEGIES: tuple[str, ...] = ("learned_with_images", "learned", "fixed")
# UNetConfig fields that this config shares (same meaning), used to build the spatial description.
_SHARED_FIELDS: tuple[str, ...] = (
    "in_channels", "out_channels", "block_out_channels", "layers_per_block", "attention_levels", "transformer_depth",
    "transformer_depth_mid", "num_heads", "head_dim", "cross_attention_dim", "use_linear_projection",
    "norm_num_groups", "norm_eps", "flip_sin_to_cos", "freq_shift", "dropout", "attention_backend",
)  # fmt: skip


@dataclass
class VideoUNetConfig:
    """Architecture of :class:`VideoUNet`. Per-level lists run from the highest resolution to the lowest.

    The defaults are Stable Video Diffusion (img2vid and img2vid-xt share the U-Net).
    """

    in_channels: int = 8  # channels entering conv_in: x_t's plus image_latents' when concatenated (SVD: 4 + 4)
    out_channels: int = 4  # channels of the prediction
    block_out_channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])  # width per level
    layers_per_block: int = 2  # ResBlocks per level on the way down (the way up has one more)
    attention_levels: list[bool] = field(default_factory=lambda: [True, True, True, False])  # transformers per level
    transformer_depth: list[int] = field(default_factory=lambda: [1, 1, 1, 1])  # transformer blocks per level
    transformer_depth_mid: Optional[int] = None  # transformer blocks in the mid block; None: transformer_depth[-1]
    num_heads: Optional[list[int]] = None  # heads per level (diffusers' num_attention_heads), or set head_dim
    head_dim: Optional[int] = 64  # channels per head (SVD: 64 → 5, 10, 20, 20 heads)
    cross_attention_dim: Optional[int] = 1024  # width of the cross-attention context; None: no cross-attention
    context_source: Literal["image_embeds", "context"] = "image_embeds"  # cond field read as context (SVD: image)
    use_linear_projection: bool = True  # transformer proj_in/out as Linear (SVD) instead of 1×1 conv (SD 1.x)
    norm_num_groups: int = 32  # GroupNorm groups (spatial and temporal)
    norm_eps: float = 1e-5  # GroupNorm epsilon of the ResBlocks and the output norm
    resnet_eps_layout: Literal["diffusers_svd", "uniform"] = "diffusers_svd"  # see the module docstring
    flip_sin_to_cos: bool = True  # cosines first in the sinusoidal timestep embedding
    freq_shift: float = 0.0  # frequency shift of the sinusoidal timestep embedding
    concat_image_latents: bool = True  # concatenate cond.image_latents to x_t's channels (image-to-video)
    add_time_ids: list[str] = field(default_factory=lambda: list(ADD_TIME_IDS))  # added conditioning; []: none
    addition_time_embed_dim: int = 256  # Fourier features per added number (SVD: 256 → 768 into the MLP)
    fps_offset: float = -1.0  # added to cond.fps before embedding (SVD was trained on fps - 1)
    temporal_kernel: int = 3  # temporal ResBlock kernel length in frames (3-D kernel (k, 1, 1))
    merge_strategy: Literal["learned_with_images", "learned", "fixed"] = "learned_with_images"  # AlphaBlender rule
    merge_factor: float = 0.5  # initial mix factor (α = sigmoid of it for the learned strategies)
    single_frame_is_image: bool = False  # learned_with_images: a one-frame clip skips the temporal layers (α = 1)
    dropout: float = 0.0  # dropout inside ResBlocks
    gradient_checkpointing: bool = False  # recompute ResBlock and transformer-block activations in backward
    attention_backend: str = "sdpa"  # sdpa | xformers | math

    def __post_init__(self) -> None:
        spatial = self.spatial  # runs UNetConfig's checks on the shared fields
        for level, c in enumerate(self.block_out_channels):
            heads, head_dim = spatial.heads_at(level)
            if heads * head_dim != c:
                raise ValueError(
                    f"VideoUNetConfig: level {level} has {c} channels but {heads} heads × {head_dim} = "
                    f"{heads * head_dim}; the frame embedding needs heads × head_dim == channels "
                    f"(num_heads={self.num_heads}, head_dim={self.head_dim})"
                )
        if self.context_source not in ("image_embeds", "context"):
            raise ValueError(
                f"VideoUNetConfig.context_source={self.context_source!r}; choose 'image_embeds' or 'context'"
            )
        unknown = [n for n in self.add_time_ids if n not in ADD_TIME_IDS]
        if unknown or len(set(self.add_time_ids)) != len(self.add_time_ids):
            raise ValueError(
                f"VideoUNetConfig.add_time_ids={self.add_time_ids}: each must be one of {list(ADD_TIME_IDS)}, "
                "at most once"
            )
        if self.add_time_ids and self.addition_time_embed_dim < 1:
            raise ValueError(f"VideoUNetConfig.addition_time_embed_dim={self.addition_time_embed_dim}; it must be >= 1")
        if self.temporal_kernel < 1 or self.temporal_kernel % 2 == 0:
            raise ValueError(f"VideoUNetConfig.temporal_kernel={self.temporal_kernel}; it must be odd and >= 1")
        if self.merge_strategy not in MERGE_STRATEGIES:
            raise ValueError(
                f"VideoUNetConfig.merge_strategy={self.merge_strategy!r}; choose one of {list(MERGE_STRATEGIES)}"
            )
        if self.resnet_eps_layout not in ("diffusers_svd", "uniform"):
            raise ValueError(
                f"VideoUNetConfig.resnet_eps_layout={self.resnet_eps_layout!r}; choose 'diffusers_svd' or 'uniform'"
            )

    @property
    def spatial(self) -> UNetConfig:
        """The image U-Net these spatial layers form (its config, validated)."""
        kwargs = {name: getattr(self, name) for name in _SHARED_FIELDS}
        kwargs = {k: list(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        return UNetConfig(**kwargs, gradient_checkpointing=self.gradient_checkpointing)

    @property
    def embed_dim(self) -> int:
        """Width of the timestep embedding every ResBlock receives (4 × the first level's width)."""
        return 4 * self.block_out_channels[0]

    @property
    def downsample_factor(self) -> int:
        """Total spatial downsampling of the U-Net."""
        return 2 ** (len(self.block_out_channels) - 1)

    def resnet_eps(self, part: Literal["down", "mid", "up"], level: int) -> float:
        """GroupNorm epsilon of the ResBlocks of ``part`` at ``level`` (see ``resnet_eps_layout``)."""
        if self.resnet_eps_layout == "uniform" or part == "mid":
            return self.norm_eps
        if part == "up" or self.attention_levels[level]:
            return 1e-6
        return self.norm_eps


# ------------------------------------------------------------------------------------------------- building blocks


@dataclass
class FrameInfo:
    """What every block of one forward pass needs to know about the clip (built once in :meth:`VideoUNet.forward`)."""

    num_frames: int  # T
    image_only: bool  # learned_with_images and a batch of images: temporal layers are skipped (α = 1)
    context: Optional[Tensor]  # (B, L, D) per-clip cross-attention context (temporal cross-attention)
    mask: Optional[Tensor]  # (B, L) bool key mask of context
    context_frames: Optional[Tensor]  # (B*T, L, D) the context repeated per frame (spatial cross-attention)
    mask_frames: Optional[Tensor]  # (B*T, L) its mask


class AlphaBlender(nn.Module):
    """Merge a spatial and a temporal branch: ``α·spatial + (1 − α)·temporal`` (VideoLDM, Blattmann et al. 2023).

    ``α = sigmoid(mix_factor)`` for the ``"learned"`` and ``"learned_with_images"`` strategies (a parameter), or
    ``α = mix_factor`` for ``"fixed"`` (a buffer). ``"learned_with_images"`` uses ``α = 1`` on image batches.
    """

    def __init__(self, strategy: str = "learned_with_images", factor: float = 0.5):
        super().__init__()
        if strategy not in MERGE_STRATEGIES:
            raise ValueError(f"AlphaBlender strategy={strategy!r}; choose one of {list(MERGE_STRATEGIES)}")
        self.strategy = strategy
        value = torch.tensor([float(factor)])
        if strategy == "fixed":
            self.register_buffer("mix_factor", value)
        else:
            self.mix_factor = nn.Parameter(value)

    def alpha(self) -> Tensor:
        """The weight of the spatial branch, shape ``(1,)``."""
        return self.mix_factor if self.strategy == "fixed" else torch.sigmoid(self.mix_factor)

    def forward(self, spatial: Tensor, temporal: Tensor) -> Tensor:
        a = self.alpha().to(spatial.dtype)
        # = a·spatial + (1 − a)·temporal, written so that a temporal branch equal to its input returns that input
        # bit for bit (an inflated network's start, see VideoUNet.from_image_unet), whatever a.
        return spatial + (1.0 - a) * (temporal - spatial)


class TemporalResBlock(nn.Module):
    """Pre-activation residual block over time only: like :class:`~models.blocks.ResBlock`, with 3-D convolutions
    of kernel ``(k, 1, 1)`` on ``(B, C, T, H, W)`` and the per-frame timestep embedding added after the first one.
    GroupNorm statistics span the whole clip (channels × frames × pixels), as in SVD."""

    def __init__(self, channels: int, emb_dim: int, groups: int, eps: float, dropout: float, kernel: int):
        super().__init__()
        pad = (kernel // 2, 0, 0)
        self.norm1 = group_norm(channels, groups, eps)
        self.conv1 = nn.Conv3d(channels, channels, kernel_size=(kernel, 1, 1), padding=pad)
        self.emb_proj = nn.Linear(emb_dim, channels)
        self.norm2 = group_norm(channels, groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv3d(channels, channels, kernel_size=(kernel, 1, 1), padding=pad)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x ``(B, C, T, H, W)``; emb ``(B, T, E)`` (the timestep embedding of each frame)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C, T, H, W)
        e = self.emb_proj(F.silu(emb)).transpose(1, 2)[..., None, None]  # (B, C, T, 1, 1)
        h = self.norm2(h + e)  # (B, C, T, H, W)
        h = self.conv2(self.dropout(F.silu(h)))  # (B, C, T, H, W)
        return x + h


class SpatioTemporalResBlock(ResBlock):
    """SVD's video ResBlock: the spatial :class:`~models.blocks.ResBlock` (same parameters and names) per frame,
    then a :class:`TemporalResBlock` across frames, merged by an :class:`AlphaBlender` (``temporal``, ``mix``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        groups: int,
        eps: float,
        dropout: float,
        kernel: int,
        strategy: str,
        factor: float,
    ):
        super().__init__(in_channels, out_channels, emb_dim, groups, eps, dropout)
        self.temporal = TemporalResBlock(out_channels, emb_dim, groups, eps, dropout, kernel)
        self.mix = AlphaBlender(strategy, factor)

    def forward(self, x: Tensor, emb: Tensor, frames: FrameInfo) -> Tensor:  # type: ignore[override]
        """x ``(B*T, Cin, H, W)`` (frames folded, frame index fastest); emb ``(B*T, E)``."""
        h = super().forward(x, emb)  # (B*T, Cout, H, W)
        if frames.image_only:
            return h
        t = frames.num_frames
        h5 = unfold_frames(h, t)  # (B, Cout, T, H, W)
        ht = self.temporal(h5, emb.reshape(-1, t, emb.shape[-1]))  # (B, Cout, T, H, W)
        return fold_frames(self.mix(h5, ht))  # (B*T, Cout, H, W)


class TemporalTransformerBlock(nn.Module):
    """SVD's temporal transformer block, over the frames of each spatial position: a residual GEGLU feed-forward
    (``ff_in``), self-attention across frames, cross-attention to the clip's context, a GEGLU feed-forward; each
    after a LayerNorm, each residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: Optional[int], backend: str):
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.ff_in = FeedForward(dim, 4 * dim, activation="geglu")
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, None, heads, head_dim, qkv_bias=False, backend=backend)
        self.norm2 = nn.LayerNorm(dim) if context_dim is not None else None
        self.cross_attn = (
            Attention(dim, context_dim, heads, head_dim, qkv_bias=False, backend=backend)
            if context_dim is not None
            else None
        )
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, 4 * dim, activation="geglu")

    def forward(self, x: Tensor, num_frames: int, context: Optional[Tensor], mask: Optional[Tensor]) -> Tensor:
        """x ``(B*T, S, D)`` (S = H·W positions); context ``(B, L, Dc)``; mask ``(B, L)`` → ``(B*T, S, D)``."""
        bt, s, d = x.shape
        b = bt // num_frames
        h = x.reshape(b, num_frames, s, d).transpose(1, 2).reshape(b * s, num_frames, d)  # (B*S, T, D)
        h = h + self.ff_in(self.norm_in(h))  # (B*S, T, D)
        h = h + self.self_attn(self.norm1(h))  # (B*S, T, D): attention across frames
        if self.cross_attn is not None:
            # Queries do not interact in cross-attention, so every (position, frame) of a clip attends to the
            # clip's context at once: (B, S*T, D) against (B, L, Dc), no copy of the context per position.
            q = self.norm2(h).reshape(b, s * num_frames, d)  # (B, S*T, D)
            h = h + self.cross_attn(q, context, mask).reshape(b * s, num_frames, d)  # (B*S, T, D)
        h = h + self.ff(self.norm3(h))  # (B*S, T, D)
        return h.reshape(b, s, num_frames, d).transpose(1, 2).reshape(bt, s, d)  # (B*T, S, D)


class SpatioTemporalTransformer(SpatialTransformer):
    """SVD's video transformer: the spatial transformer of :mod:`models.unet` (same parameters and names), where
    each spatial block is followed by a :class:`TemporalTransformerBlock` (``temporal_blocks``) fed the spatial
    output plus a learned frame position embedding (``frame_embed``: MLP of the sinusoidal embedding of the frame
    index), merged by an :class:`AlphaBlender` (``mix``)."""

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        depth: int,
        context_dim: Optional[int],
        groups: int,
        linear_projection: bool,
        backend: str,
        strategy: str,
        factor: float,
    ):
        super().__init__(channels, heads, head_dim, depth, context_dim, groups, linear_projection, backend)
        inner = heads * head_dim
        self.temporal_blocks = nn.ModuleList(
            [TemporalTransformerBlock(inner, heads, head_dim, context_dim, backend) for _ in range(depth)]
        )
        self.frame_embed = TimestepMLP(channels, 4 * channels, channels)
        self.mix = AlphaBlender(strategy, factor)

    def forward(self, x: Tensor, frames: FrameInfo) -> Tensor:  # type: ignore[override]
        """x ``(B*T, C, H, W)`` → ``(B*T, C, H, W)``."""
        bt, c, height, width = x.shape
        t = frames.num_frames
        h = self.norm(x)  # (B*T, C, H, W)
        if not self.linear_projection:
            h = self.proj_in(h)  # (B*T, D, H, W)
        h = h.permute(0, 2, 3, 1).reshape(bt, height * width, h.shape[1])  # (B*T, HW, C or D)
        if self.linear_projection:
            h = self.proj_in(h)  # (B*T, HW, D)
        pos = None
        if not frames.image_only:
            index = torch.arange(t, device=x.device)
            pos = self.frame_embed(timestep_embedding(index, c).to(h.dtype))  # (T, D)
            pos = pos.repeat(bt // t, 1)[:, None, :]  # (B*T, 1, D)
        for block, temporal in zip(self.blocks, self.temporal_blocks):
            h = checkpointed(
                block, h, frames.context_frames, frames.mask_frames, enabled=self.gradient_checkpointing
            )  # (B*T, HW, D)
            if pos is not None:
                ht = checkpointed(
                    temporal, h + pos, t, frames.context, frames.mask, enabled=self.gradient_checkpointing
                )  # (B*T, HW, D)
                h = self.mix(h, ht)  # (B*T, HW, D)
        if self.linear_projection:
            h = self.proj_out(h)  # (B*T, HW, C)
        h = h.reshape(bt, height, width, h.shape[-1]).permute(0, 3, 1, 2)  # (B*T, C or D, H, W)
        if not self.linear_projection:
            h = self.proj_out(h)  # (B*T, C, H, W)
        return x + h


def _resblock(cin: int, cout: int, eps: float, config: VideoUNetConfig) -> SpatioTemporalResBlock:
    return SpatioTemporalResBlock(
        cin, cout, config.embed_dim, config.norm_num_groups, eps, config.dropout, config.temporal_kernel,
        config.merge_strategy, config.merge_factor,
    )  # fmt: skip


def _transformer(channels: int, level: int, depth: int, config: VideoUNetConfig) -> SpatioTemporalTransformer:
    heads, head_dim = config.spatial.heads_at(level)
    return SpatioTemporalTransformer(
        channels, heads, head_dim, depth, config.cross_attention_dim, config.norm_num_groups,
        config.use_linear_projection, config.attention_backend, config.merge_strategy, config.merge_factor,
    )  # fmt: skip


class VideoDownLevel(nn.Module):
    """One resolution of the contracting path (as :class:`models.unet.DownLevel`, with video blocks)."""

    def __init__(self, level: int, cin: int, config: VideoUNetConfig, downsample: bool):
        super().__init__()
        cout = config.block_out_channels[level]
        eps = config.resnet_eps("down", level)
        n = config.layers_per_block
        self.res = nn.ModuleList([_resblock(cin if j == 0 else cout, cout, eps, config) for j in range(n)])
        self.attn = nn.ModuleList(
            [_transformer(cout, level, config.transformer_depth[level], config) for _ in range(n)]
            if config.attention_levels[level]
            else []
        )
        self.downsample = Downsample(cout, padding="symmetric") if downsample else None
        self.gradient_checkpointing = False

    def forward(self, h: Tensor, emb: Tensor, frames: FrameInfo, skips: list[Tensor]) -> Tensor:
        for j, res in enumerate(self.res):
            h = checkpointed(res, h, emb, frames, enabled=self.gradient_checkpointing)  # (B*T, C, H, W)
            if len(self.attn):
                h = self.attn[j](h, frames)  # (B*T, C, H, W)
            skips.append(h)
        if self.downsample is not None:
            h = self.downsample(h)  # (B*T, C, H/2, W/2)
            skips.append(h)
        return h


class VideoUpLevel(nn.Module):
    """One resolution of the expanding path (as :class:`models.unet.UpLevel`, with video blocks)."""

    def __init__(self, level: int, cin: int, skip_channels: list[int], config: VideoUNetConfig, upsample: bool):
        super().__init__()
        cout = config.block_out_channels[level]
        eps = config.resnet_eps("up", level)
        self.res = nn.ModuleList(
            [_resblock((cin if j == 0 else cout) + s, cout, eps, config) for j, s in enumerate(skip_channels)]
        )
        self.attn = nn.ModuleList(
            [_transformer(cout, level, config.transformer_depth[level], config) for _ in skip_channels]
            if config.attention_levels[level]
            else []
        )
        self.upsample = Upsample(cout) if upsample else None
        self.gradient_checkpointing = False

    def forward(self, h: Tensor, emb: Tensor, frames: FrameInfo, skips: list[Tensor]) -> Tensor:
        for j, res in enumerate(self.res):
            h = torch.cat([h, skips.pop()], dim=1)  # (B*T, C + Cskip, H, W)
            h = checkpointed(res, h, emb, frames, enabled=self.gradient_checkpointing)  # (B*T, C, H, W)
            if len(self.attn):
                h = self.attn[j](h, frames)  # (B*T, C, H, W)
        if self.upsample is not None:
            h = self.upsample(h, size=skips[-1].shape[-2:])  # (B*T, C, 2H, 2W), matched to the next skip
        return h


class VideoMidBlock(nn.Module):
    """Video ResBlock → video transformer → video ResBlock at the lowest resolution."""

    def __init__(self, config: VideoUNetConfig):
        super().__init__()
        level = len(config.block_out_channels) - 1
        c = config.block_out_channels[level]
        depth = config.transformer_depth_mid
        depth = depth if depth is not None else config.transformer_depth[-1]
        eps = config.resnet_eps("mid", level)
        self.res = nn.ModuleList([_resblock(c, c, eps, config) for _ in range(2)])
        self.attn = _transformer(c, level, depth, config)
        self.gradient_checkpointing = False

    def forward(self, h: Tensor, emb: Tensor, frames: FrameInfo) -> Tensor:
        h = checkpointed(self.res[0], h, emb, frames, enabled=self.gradient_checkpointing)  # (B*T, C, H, W)
        h = self.attn(h, frames)  # (B*T, C, H, W)
        return checkpointed(self.res[1], h, emb, frames, enabled=self.gradient_checkpointing)  # (B*T, C, H, W)


# ------------------------------------------------------------------------------------------------------- the model


class VideoUNet(nn.Module):
    """Spatio-temporal latent U-Net (SVD). ``forward(x_t (B, C, T, H, W), timesteps, cond) -> (B, C_out, T, H, W)``."""

    _no_split_modules = ("SpatioTemporalResBlock", "TransformerBlock", "TemporalTransformerBlock")

    def __init__(self, config: Optional[VideoUNetConfig] = None):
        super().__init__()
        self.config = cfg = config if config is not None else VideoUNetConfig()
        widths = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], kernel_size=3, padding=1)
        self.time_embed = TimestepMLP(widths[0], cfg.embed_dim)
        self.add_embed = (
            TimestepMLP(len(cfg.add_time_ids) * cfg.addition_time_embed_dim, cfg.embed_dim)
            if cfg.add_time_ids
            else None
        )
        self.down, self.mid, self.up = build_levels(cfg, widths, VideoDownLevel, VideoMidBlock, VideoUpLevel)
        self.norm_out = group_norm(widths[0], cfg.norm_num_groups, cfg.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = cfg.gradient_checkpointing

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the video ResBlocks and the (spatial and temporal) transformer blocks recompute in backward."""
        return self.mid.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        for module in self.modules():
            if isinstance(module, (VideoDownLevel, VideoUpLevel, VideoMidBlock, SpatioTemporalTransformer)):
                module.gradient_checkpointing = bool(enabled)

    # --- conditioning -------------------------------------------------------------------------------------------

    def _context(self, cond: Conditioning) -> tuple[Optional[Tensor], Optional[Tensor]]:
        cfg = self.config
        if cfg.cross_attention_dim is None:
            return None, None
        if cfg.context_source == "image_embeds":
            if cond.image_embeds is None:
                raise ValueError(
                    "this video U-Net cross-attends to the image embedding (context_source='image_embeds'); "
                    "cond.image_embeds is None"
                )
            context, mask = cond.image_embeds, None
        else:
            if cond.context is None:
                raise ValueError(
                    "this video U-Net cross-attends to text (context_source='context'); cond.context is None"
                )
            context, mask = cond.context, cond.context_mask
        if context.ndim != 3 or context.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(
                f"cond.{cfg.context_source} has shape {tuple(context.shape)}; the video U-Net expects "
                f"(B, L, {cfg.cross_attention_dim})"
            )
        return context, mask

    def _embedding(self, timesteps: Tensor, cond: Conditioning, frames: int, dtype: torch.dtype) -> Tensor:
        """Timestep embedding plus SVD's added conditioning (fps, motion bucket, augmentation), one row per frame
        → ``(B*T, E)``. Computed on the per-frame rows (not computed per clip and repeated) so that the numbers are
        those of the image U-Net on folded frames, bit for bit (:meth:`from_image_unet`)."""
        cfg = self.config
        t_freq = timestep_embedding(
            timesteps.repeat_interleave(frames), cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
        )  # (B*T, C0)
        emb = self.time_embed(t_freq.to(dtype))  # (B*T, E)
        if self.add_embed is not None:
            values = []
            for name in cfg.add_time_ids:
                v = getattr(cond, name)
                if v is None:
                    raise ValueError(
                        f"this video U-Net adds {cfg.add_time_ids} to its timestep embedding (add_time_ids); "
                        f"cond.{name} is None — give a (B,) tensor"
                    )
                v = torch.as_tensor(v, device=timesteps.device).float().reshape(-1)
                if v.numel() == 1:
                    v = v.expand(timesteps.shape[0])
                if v.shape != timesteps.shape:
                    raise ValueError(
                        f"cond.{name} has {v.numel()} values; expected one per sample ({timesteps.shape[0]})"
                    )
                values.append(v + cfg.fps_offset if name == "fps" else v)
            values = torch.stack(values, dim=1).repeat_interleave(frames, dim=0)  # (B*T, K)
            feats = fourier_features(values, cfg.addition_time_embed_dim)  # (B*T, K*Dt)
            emb = emb + self.add_embed(feats.to(dtype))  # (B*T, E)
        return emb

    def _input(self, x_t: Tensor, cond: Conditioning) -> Tensor:
        """x_t with the conditioning frame's latent concatenated on channels when configured → ``(B, Cin, T, H, W)``."""
        cfg = self.config
        x = x_t
        if cfg.concat_image_latents:
            lat = cond.image_latents
            if lat is None:
                raise ValueError(
                    "this video U-Net concatenates cond.image_latents to x_t (concat_image_latents); it is None"
                )
            b, _, t, h, w = x_t.shape
            if lat.ndim == 4:
                lat = lat[:, :, None]  # (B, Ci, 1, H, W)
            if lat.ndim != 5 or lat.shape[0] != b or lat.shape[2] not in (1, t) or tuple(lat.shape[-2:]) != (h, w):
                raise ValueError(
                    f"cond.image_latents has shape {tuple(lat.shape)}; expected (B, C, H, W) or (B, C, T or 1, H, W) "
                    f"matching x_t {tuple(x_t.shape)}"
                )
            x = torch.cat([x, lat.to(x.dtype).expand(-1, -1, t, -1, -1)], dim=1)  # (B, C + Ci, T, H, W)
        if x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"the video U-Net takes {cfg.in_channels} input channels, got {x.shape[1]} (x_t has {x_t.shape[1]}"
                f"{', plus cond.image_latents' if cfg.concat_image_latents else ''})"
            )
        return x

    def forward(
        self, x_t: Tensor, timesteps: Union[Tensor, float, int], cond: Optional[Conditioning] = None
    ) -> Tensor:
        """x_t ``(B, C, T, H, W)``; timesteps ``(B,)`` or a scalar → ``(B, C_out, T, H, W)``."""
        if x_t.ndim != 5:
            raise ValueError(
                f"the video U-Net takes clips (B, C, T, H, W); got x_t of shape {tuple(x_t.shape)} ({x_t.ndim}-D). "
                "Pass an image as a one-frame clip, x[:, :, None]"
            )
        cond = cond if cond is not None else Conditioning()
        b, _, t = x_t.shape[:3]
        steps = broadcast_timesteps(timesteps, b, x_t.device)  # (B,)
        x = self._input(x_t, cond)  # (B, Cin, T, H, W)
        context, mask = self._context(cond)
        if context is not None:
            context = context.to(x.dtype)
        frames = FrameInfo(
            num_frames=t,
            image_only=self.config.single_frame_is_image and self.config.merge_strategy == "learned_with_images"
            and t == 1,
            context=context,
            mask=mask,
            context_frames=None if context is None else context.repeat_interleave(t, dim=0),  # (B*T, L, D)
            mask_frames=None if mask is None else mask.repeat_interleave(t, dim=0),  # (B*T, L)
        )
        emb = self._embedding(steps, cond, t, x.dtype)  # (B*T, E)
        h = self.conv_in(fold_frames(x))  # (B*T, C0, H, W)
        skips = [h]
        for level in self.down:
            h = level(h, emb, frames, skips)  # (B*T, Ci, H/2^i, W/2^i)
        h = self.mid(h, emb, frames)  # (B*T, Clast, H/f, W/f)
        for level in self.up:
            h = level(h, emb, frames, skips)  # (B*T, Ci, H/2^i, W/2^i)
        out = self.conv_out(F.silu(self.norm_out(h)))  # (B*T, Cout, H, W)
        return unfold_frames(out, t)  # (B, Cout, T, H, W)

    # --- inflation ----------------------------------------------------------------------------------------------

    @classmethod
    def from_image_unet(
        cls,
        image_unet: UNet,
        *,
        concat_image_latents: bool = False,
        image_latent_channels: Optional[int] = None,
        add_time_ids: tuple[str, ...] = (),
        context_source: Literal["image_embeds", "context"] = "context",
        **overrides: Any,
    ) -> "VideoUNet":
        """Inflate a trained image U-Net (ours, e.g. SD 1.5 loaded with :func:`training.weights.load_weights`)
        into a video U-Net that, at initialisation, computes exactly the image U-Net frame by frame (VideoLDM,
        Blattmann et al. 2023, Sec. 3.1: train only the new temporal layers, or everything, from there).

        Every spatial weight is copied (the names agree). The new layers start at zero contribution: each temporal
        branch's output layers (temporal ResBlock ``conv2``; temporal transformer ``ff_in``/attention/feed-forward
        output projections and the frame embedding's last layer) are zero, so every temporal branch returns its
        input and the merge ``α·x + (1 − α)·x`` is ``x`` whatever α (kept at ``merge_factor``, so α and the
        temporal layers receive gradients from the first step; setting α to 1 instead would freeze them).
        Optional SVD-style inputs also start silent: ``concat_image_latents`` adds zero-initialised input channels
        to ``conv_in`` (``image_latent_channels``, default the image U-Net's input channels), and ``add_time_ids``
        adds an embedding MLP whose last layer is zero. ``overrides`` set other :class:`VideoUNetConfig` fields
        (temporal kernel, merge strategy, gradient checkpointing, ...).
        """
        icfg = image_unet.config
        if icfg.num_classes is not None or icfg.addition_embed_type != "none" or icfg.resnet_scale_shift:
            raise ValueError(
                "VideoUNet.from_image_unet: the image U-Net uses class labels, SDXL's text-time embedding or "
                "scale-shift ResBlocks (num_classes, addition_embed_type, resnet_scale_shift), which the video U-Net "
                "does not have"
            )
        if icfg.time_embed_dim is not None and icfg.time_embed_dim != 4 * icfg.block_out_channels[0]:
            raise ValueError(
                f"VideoUNet.from_image_unet: time_embed_dim={icfg.time_embed_dim} is not 4 × block_out_channels[0]"
            )
        extra = (image_latent_channels or icfg.in_channels) if concat_image_latents else 0
        shared = {name: getattr(icfg, name) for name in _SHARED_FIELDS}
        shared["in_channels"] = icfg.in_channels + extra
        config = VideoUNetConfig(
            **shared,
            context_source=context_source,
            resnet_eps_layout="uniform",
            concat_image_latents=concat_image_latents,
            add_time_ids=list(add_time_ids),
            **overrides,
        )
        device = next(image_unet.parameters()).device
        with torch.device(device):
            video = cls(config)
        image_state = image_unet.state_dict()
        if extra:
            weight = image_state["conv_in.weight"]
            image_state = dict(image_state)
            image_state["conv_in.weight"] = torch.cat([weight, weight.new_zeros(weight.shape[0], extra, 3, 3)], 1)
        missing, unexpected = video.load_state_dict(image_state, strict=False)
        if unexpected:
            raise AssertionError(f"from_image_unet: image weights without a place in the video U-Net: {unexpected[:8]}")
        video.to(next(image_unet.parameters()).dtype)
        video.zero_temporal_outputs()
        new = set(missing)
        stray = sorted(k for k in new if not _is_new_layer(k))
        if stray:
            raise AssertionError(f"from_image_unet: spatial weights left uninitialised: {stray[:8]}")
        return video

    def temporal_module_prefixes(self) -> list[str]:
        """Names of the submodules that act across frames (LoRA ``targets: [temporal]``): every temporal ResBlock,
        temporal transformer block and frame-position embedding (the layers VideoLDM adds to an image U-Net; the
        mix factors hold no Linear/Conv)."""
        return [name for name, module in self.named_modules()
                if isinstance(module, (TemporalResBlock, TemporalTransformerBlock)) or name.endswith(".frame_embed")]

    image_architecture = "unet"  # the registered architecture an image model to inflate from has (:meth:`inflate`)

    @classmethod
    def inflate(cls, image_unet: UNet, config: VideoUNetConfig) -> "VideoUNet":
        """The video U-Net ``config`` inflated from ``image_unet`` (:meth:`from_image_unet` with the settings
        ``config`` names; its shared fields must be the image U-Net's, checked)."""
        shared = set(_SHARED_FIELDS) | {"resnet_eps_layout", "concat_image_latents", "add_time_ids", "context_source"}
        overrides = {f.name: getattr(config, f.name) for f in dataclasses.fields(VideoUNetConfig)
                     if f.name not in shared}
        extra = config.in_channels - image_unet.config.in_channels
        video = cls.from_image_unet(image_unet, concat_image_latents=config.concat_image_latents,
                                    image_latent_channels=extra if config.concat_image_latents else None,
                                    add_time_ids=tuple(config.add_time_ids), context_source=config.context_source,
                                    **overrides)
        differing = [f.name for f in dataclasses.fields(VideoUNetConfig)
                     if f.name != "resnet_eps_layout" and getattr(video.config, f.name) != getattr(config, f.name)]
        if differing:
            raise ValueError("VideoUNet.inflate: the video config does not extend the image U-Net's; differing "
                             "fields: " + ", ".join(f"{n}={getattr(config, n)!r} (inflation gives "
                                                    f"{getattr(video.config, n)!r})" for n in differing))
        return video

    @torch.no_grad()
    def zero_temporal_outputs(self) -> None:
        """Zero the output layers of every temporal branch (and of the added-conditioning MLP), so that each branch
        returns its input: the network then computes its spatial part frame by frame (see :meth:`from_image_unet`)."""
        zeroed: list[nn.Module] = []
        for module in self.modules():
            if isinstance(module, TemporalResBlock):
                zeroed.append(module.conv2)
            elif isinstance(module, TemporalTransformerBlock):
                zeroed += [module.ff_in.proj_out, module.self_attn.to_out, module.ff.proj_out]
                if module.cross_attn is not None:
                    zeroed.append(module.cross_attn.to_out)
            elif isinstance(module, SpatioTemporalTransformer):
                zeroed.append(module.frame_embed.linear_2)
        if self.add_embed is not None:
            zeroed.append(self.add_embed.linear_2)
        for module in zeroed:
            for p in module.parameters():
                p.zero_()


def _is_new_layer(name: str) -> bool:
    """Whether a video U-Net parameter name belongs to a layer an image U-Net does not have."""
    return bool(re.search(r"(^|\.)(temporal|mix|temporal_blocks|frame_embed|add_embed)\.", name))


# ------------------------------------------------------------------------------------------------------- presets


def svd_unet_config() -> VideoUNetConfig:
    """Stable Video Diffusion (img2vid, img2vid-xt, 1.1): 1,524,623,082 parameters; 8 input channels (noise + image
    latent), CLIP ViT-H image embedding as context (1024), fps / motion bucket / augmentation conditioning."""
    return VideoUNetConfig()


def svd_unet_tiny_config() -> VideoUNetConfig:
    """A small SVD-shaped U-Net for tests and the CPU video quick-start (8×8 or 16×16 latents, a few frames),
    conditioned on the tiny image encoder (``openclip-tiny-vision``, 32-wide embedding)."""
    return VideoUNetConfig(
        block_out_channels=[32, 64],
        layers_per_block=1,
        attention_levels=[True, True],
        transformer_depth=[1, 1],
        head_dim=32,
        cross_attention_dim=32,  # the tiny OpenCLIP vision tower's embedding (models/configs/openclip-tiny-vision)
        norm_num_groups=8,
        addition_time_embed_dim=16,
    )


# "svd-unet" itself is the architecture's name, whose default config is the full SVD U-Net (svd_unet_config); a
# preset may not shadow an architecture name, so only the other sizes are presets.
VIDEO_UNET_PRESETS: dict[str, Callable[[], VideoUNetConfig]] = {
    "svd-unet-tiny": svd_unet_tiny_config,
}


# --------------------------------------------------------------------------------------------------- weight names


def _segments(rules: tuple[tuple[str, str], ...]) -> tuple[tuple[re.Pattern, str], ...]:
    """Compile rules matching only from the start of a dotted segment."""
    return tuple((re.compile(r"(?:(?<=\.)|^)" + pattern), repl) for pattern, repl in rules)


def _apply(name: str, rules: tuple[tuple[re.Pattern, str], ...]) -> str:
    for pattern, repl in rules:
        name = pattern.sub(repl, name, count=1)
    return name


# our name → diffusers UNetSpatioTemporalConditionModel, applied in order, each at most once
_DIFFUSERS = _segments((
    (r"time_embed\.", "time_embedding."), (r"add_embed\.", "add_embedding."), (r"norm_out\.", "conv_norm_out."),
    (r"res\.(\d+)\.temporal\.", r"resnets.\1.temporal_res_block."), (r"res\.(\d+)\.mix\.", r"resnets.\1.time_mixer."),
    (r"res\.(\d+)\.", r"resnets.\1.spatial_res_block."),
    (r"mid\.resnets\.", "mid_block.resnets."), (r"mid\.attn\.", "mid_block.attentions.0."),
    (r"down\.(\d+)\.", r"down_blocks.\1."), (r"up\.(\d+)\.", r"up_blocks.\1."), (r"attn\.(\d+)\.", r"attentions.\1."),
    (r"downsample\.", "downsamplers.0."), (r"upsample\.", "upsamplers.0."),
    (r"emb_proj\.", "time_emb_proj."), (r"skip\.", "conv_shortcut."),
    (r"frame_embed\.", "time_pos_embed."), (r"mix\.", "time_mixer."),
    (r"temporal_blocks\.(\d+)\.", r"temporal_transformer_blocks.\1."), (r"blocks\.(\d+)\.", r"transformer_blocks.\1."),
    (r"self_attn\.", "attn1."), (r"cross_attn\.", "attn2."), (r"to_out\.", "to_out.0."),
    (r"ff_in\.proj_in\.", "ff_in.net.0.proj."), (r"ff_in\.proj_out\.", "ff_in.net.2."),
    (r"ff\.proj_in\.", "ff.net.0.proj."), (r"ff\.proj_out\.", "ff.net.2."),
))  # fmt: skip


def diffusers_name(name: str) -> str:
    """Our video U-Net parameter name → diffusers' ``UNetSpatioTemporalConditionModel`` name."""
    return _apply(name, _DIFFUSERS)


SGM_PREFIX = "model.diffusion_model."
_SGM_RESBLOCK = {"norm1": "in_layers.0", "conv1": "in_layers.2", "emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "skip": "skip_connection"}  # fmt: skip
# inside a video transformer (after the positional prefix), SGM's SpatialVideoTransformer names
_SGM_TRANSFORMER = _segments((
    (r"temporal_blocks\.(\d+)\.", r"time_stack.\1."), (r"blocks\.(\d+)\.", r"transformer_blocks.\1."),
    (r"frame_embed\.linear_1\.", "time_pos_embed.0."), (r"frame_embed\.linear_2\.", "time_pos_embed.2."),
    (r"mix\.", "time_mixer."), (r"self_attn\.", "attn1."), (r"cross_attn\.", "attn2."), (r"to_out\.", "to_out.0."),
    (r"ff_in\.proj_in\.", "ff_in.net.0.proj."), (r"ff_in\.proj_out\.", "ff_in.net.2."),
    (r"ff\.proj_in\.", "ff.net.0.proj."), (r"ff\.proj_out\.", "ff.net.2."),
))  # fmt: skip


def _sgm_prefixes(config: VideoUNetConfig) -> dict[str, str]:
    """Our module prefix → SGM's positional prefix (``input_blocks.k.m.`` ...), as for the LDM image U-Net."""
    from models.convert import _ldm_unet_prefixes  # lazily: models.convert imports models.unet

    return _ldm_unet_prefixes(config.spatial)


def sgm_name(name: str, config: VideoUNetConfig, _table: Optional[Mapping[str, str]] = None) -> str:
    """Our video U-Net parameter name → the original SVD checkpoint's name (without ``model.diffusion_model.``)."""
    table = _table if _table is not None else _sgm_prefixes(config)
    best = max((p for p in table if name.startswith(p)), key=len, default="")
    if not best:
        raise KeyError(f"no SGM name for {name!r}")
    head, rest = table[best], name[len(best):]
    if ".res." in name:  # inside a video ResBlock: spatial ResBlock names, temporal one under time_stack
        if rest.startswith("mix."):
            return f"{head}time_mixer.{rest[4:]}"
        stack = ""
        if rest.startswith("temporal."):
            stack, rest = "time_stack.", rest[len("temporal."):]
        first, _, tail = rest.partition(".")
        return f"{head}{stack}{_SGM_RESBLOCK.get(first, first)}.{tail}"
    if ".attn." in name or name.startswith("mid.attn."):
        return head + _apply(rest, _SGM_TRANSFORMER)
    return head + rest


# ----------------------------------------------------------------------------------------------------- converters


def _convert_helpers() -> Any:
    import models.convert as convert  # lazily: models.convert imports models.unet

    return convert


def from_diffusers_state_dict(state_dict: Mapping[str, Tensor], config: VideoUNetConfig) -> dict[str, Tensor]:
    """A diffusers ``UNetSpatioTemporalConditionModel`` state dict → ours (load with ``strict=True``)."""
    c = _convert_helpers()
    return c._rename(state_dict, c._meta_shapes(lambda: VideoUNet(config)), diffusers_name, "diffusers SVD U-Net")


def to_diffusers_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our video U-Net state dict → diffusers' names."""
    return {diffusers_name(k): v for k, v in state_dict.items()}


def from_sgm_state_dict(
    state_dict: Mapping[str, Tensor], config: VideoUNetConfig, prefix: str = SGM_PREFIX
) -> dict[str, Tensor]:
    """An original SVD checkpoint (``svd.safetensors``, whole or its ``model.diffusion_model.`` part) → ours.

    Only the U-Net's weights under ``prefix`` are taken (the conditioner and first-stage model are ignored).
    """
    c = _convert_helpers()
    table = _sgm_prefixes(config)
    return c._rename(
        c._strip_prefix(state_dict, prefix),
        c._meta_shapes(lambda: VideoUNet(config)),
        lambda n: sgm_name(n, config, table),
        "SGM (original SVD) U-Net",
    )


def to_sgm_state_dict(state_dict: Mapping[str, Tensor], config: VideoUNetConfig, prefix: str = "") -> dict[str, Tensor]:
    """Our video U-Net state dict → the original SVD names (optionally under ``prefix``)."""
    table = _sgm_prefixes(config)
    return {prefix + sgm_name(k, config, table): v for k, v in state_dict.items()}


_DIFFUSERS_DOWN = {"CrossAttnDownBlockSpatioTemporal": True, "DownBlockSpatioTemporal": False}
_DIFFUSERS_UP = {"CrossAttnUpBlockSpatioTemporal": True, "UpBlockSpatioTemporal": False}


def config_from_diffusers(diffusers_config: Mapping[str, Any], **overrides: Any) -> VideoUNetConfig:
    """Our config for a published diffusers ``UNetSpatioTemporalConditionModel`` ``config.json`` (a dict)."""
    d = dict(diffusers_config)
    levels = len(d.get("block_out_channels", (320, 640, 1280, 1280)))

    def per_level(key: str, default: Any) -> list:
        value = d.get(key, default)
        return [value] * levels if isinstance(value, (int, float)) else list(value)

    try:
        attention = [_DIFFUSERS_DOWN[t] for t in d["down_block_types"]]
        up = [_DIFFUSERS_UP[t] for t in d["up_block_types"]]
    except KeyError as e:
        raise ValueError(f"diffusers SVD U-Net config: unknown block type {e}") from None
    if up != attention[::-1]:
        raise ValueError(
            f"diffusers SVD U-Net config: up_block_types {d['up_block_types']} do not mirror the down ones"
        )
    layers = per_level("layers_per_block", 2)
    cross = per_level("cross_attention_dim", 1024)
    if len(set(layers)) != 1 or len(set(cross)) != 1:
        raise ValueError(
            "diffusers SVD U-Net config: per-level layers_per_block / cross_attention_dim are not supported"
        )
    add_dim = d.get("addition_time_embed_dim", 256)
    proj = d.get("projection_class_embeddings_input_dim", 768)
    if proj % add_dim:
        raise ValueError(f"projection_class_embeddings_input_dim={proj} is not a multiple of addition_time_embed_dim")
    n_ids = proj // add_dim
    if n_ids > len(ADD_TIME_IDS):
        raise ValueError(f"diffusers SVD U-Net config: {n_ids} added time ids; SVD has {len(ADD_TIME_IDS)}")
    depth = per_level("transformer_layers_per_block", 1)
    config = dict(
        in_channels=d.get("in_channels", 8),
        out_channels=d.get("out_channels", 4),
        block_out_channels=list(d.get("block_out_channels", (320, 640, 1280, 1280))),
        layers_per_block=layers[0],
        attention_levels=attention,
        transformer_depth=depth,
        num_heads=per_level("num_attention_heads", (5, 10, 20, 20)),
        head_dim=None,
        cross_attention_dim=cross[0],
        addition_time_embed_dim=add_dim,
        add_time_ids=list(ADD_TIME_IDS[:n_ids]),
    )
    config.update(overrides)
    return VideoUNetConfig(**config)


def _registry_from_diffusers(state: Mapping[str, Tensor], config: VideoUNetConfig) -> dict[str, Tensor]:
    return from_diffusers_state_dict(state, config)


def _registry_from_sgm(state: Mapping[str, Tensor], config: VideoUNetConfig) -> dict[str, Tensor]:
    return from_sgm_state_dict(state, config)


register_architecture(
    "svd-unet",
    VideoUNetConfig,
    VideoUNet,
    converters={"diffusers": _registry_from_diffusers, "ldm": _registry_from_sgm},
)
for _name, _builder in VIDEO_UNET_PRESETS.items():
    register_preset(_name, _builder)
