"""The latent-diffusion U-Net of Stable Diffusion 1.x/2.x and SDXL.

Architecture: the DDPM U-Net (Ho et al. 2020) with the improvements of Dhariwal & Nichol 2021, conditioned on text
by spatial transformers with cross-attention (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", Sec. 3.3), and, for SDXL, a pooled-text + micro-conditioning vector added to the timestep
embedding (Podell et al. 2023, "SDXL", Sec. 2.2).

Calling convention (every denoiser in :mod:`models`): ``unet(x_t, timesteps, cond) -> tensor shaped like x_t``,
``cond`` a :class:`~models.conditioning.Conditioning`. Fields read: ``context`` / ``context_mask`` (cross-attention,
when ``cross_attention_dim`` is set), ``class_labels`` (when ``num_classes`` is set), ``pooled`` and ``vector``
(when ``addition_embed_type="text_time"``).

Heads — a naming quirk worth knowing. In diffusers' ``UNet2DConditionModel`` config, ``attention_head_dim`` is in
fact the number of *heads* (SD 1.5: ``8`` → 8 heads of 40/80/160 channels; SD 2.x: ``[5, 10, 20, 20]`` → heads of
64 channels). The original LDM configs name it honestly: ``num_heads`` (SD 1.x) or ``num_head_channels`` (SD 2.x,
SDXL). This config follows LDM: set exactly one of ``num_heads`` (heads per level) or ``head_dim`` (channels per
head); :func:`models.convert.config_from_diffusers_unet` translates diffusers' field.

Video: ``x_t`` may be ``(B, C, T, H, W)`` (an image is ``(B, C, H, W)``; the layout is read from the tensor's rank
alone). The frames are folded into the batch (timesteps and every conditioning tensor repeated per frame) and
denoised *independently* by this image U-Net; there is no temporal layer yet, so frames do not exchange information.

Registered as the architecture ``"unet"`` (:mod:`models.registry`), with the diffusers and LDM weight namings of
:mod:`models.convert`; its repeated blocks (``_no_split_modules``) are the ResBlocks and transformer blocks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import BACKENDS, Attention, FeedForward
from models.blocks import Downsample, ResBlock, Upsample, fold_frames, group_norm, unfold_frames
from models.conditioning import Conditioning
from models.embeddings import TimestepMLP, broadcast_timesteps, timestep_embedding
from models.registry import register_architecture, register_preset
from models.utils import checkpointed

# GroupNorm epsilon in front of every spatial transformer (fixed in LDM and diffusers alike).
TRANSFORMER_GROUP_NORM_EPS = 1e-6


@dataclass
class UNetConfig:
    """Architecture of :class:`UNet`. Per-level lists run from the highest resolution to the lowest.

    The defaults are Stable Diffusion 1.5.
    """

    in_channels: int = 4  # channels of x_t (the autoencoder's latent channels)
    out_channels: int = 4  # channels of the prediction
    block_out_channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])  # width per level
    layers_per_block: int = 2  # ResBlocks per level on the way down (the way up has one more)
    attention_levels: list[bool] = field(default_factory=lambda: [True, True, True, False])  # transformers per level
    transformer_depth: list[int] = field(default_factory=lambda: [1, 1, 1, 1])  # transformer blocks per level
    transformer_depth_mid: Optional[int] = None  # transformer blocks in the mid block; None: transformer_depth[-1]
    num_heads: Optional[list[int]] = field(default_factory=lambda: [8, 8, 8, 8])  # heads per level (SD 1.x)
    head_dim: Optional[int] = None  # channels per head instead of num_heads (SD 2.x, SDXL: 64)
    cross_attention_dim: Optional[int] = 768  # width of cond.context; None: no cross-attention
    use_linear_projection: bool = False  # transformer proj_in/out as Linear (SD 2.x, SDXL) instead of 1×1 conv
    norm_num_groups: int = 32  # GroupNorm groups
    norm_eps: float = 1e-5  # GroupNorm epsilon in ResBlocks and the output norm
    time_embed_dim: Optional[int] = None  # timestep embedding width; None: 4 * block_out_channels[0]
    flip_sin_to_cos: bool = True  # cosines first in the sinusoidal timestep embedding
    freq_shift: float = 0.0  # frequency shift of the sinusoidal embedding (diffusers' freq_shift)
    resnet_scale_shift: bool = False  # embedding as GroupNorm scale and shift (Dhariwal & Nichol) instead of a bias
    num_classes: Optional[int] = None  # class-conditional: learned class embedding added to the timestep embedding
    addition_embed_type: Literal["none", "text_time"] = "none"  # "text_time": SDXL pooled text + vector embedding
    addition_embed_input_dim: Optional[int] = None  # width of cat(cond.pooled, cond.vector) (SDXL: 1280 + 6*256)
    addition_time_embed_dim: Optional[int] = None  # Fourier width per micro-conditioning number (SDXL: 256)
    dropout: float = 0.0  # dropout inside ResBlocks
    gradient_checkpointing: bool = False  # recompute ResBlock and transformer-block activations in backward
    attention_backend: str = "sdpa"  # sdpa | xformers | math

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if n < 1:
            raise ValueError("UNetConfig.block_out_channels=[]; give at least one level width")
        for name in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"UNetConfig.{name}={getattr(self, name)}; it must be >= 1")
        for c in self.block_out_channels:
            if c < 1 or c % self.norm_num_groups:
                raise ValueError(
                    f"UNetConfig.block_out_channels={self.block_out_channels}: every width must be a positive "
                    f"multiple of norm_num_groups={self.norm_num_groups}"
                )
        for name in ("attention_levels", "transformer_depth"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"UNetConfig.{name}={getattr(self, name)} has {len(getattr(self, name))} entries; "
                    f"it needs one per level ({n}, like block_out_channels)"
                )
        if any(d < 1 for d in self.transformer_depth) or (
            self.transformer_depth_mid is not None and self.transformer_depth_mid < 1
        ):
            raise ValueError(
                f"UNetConfig.transformer_depth={self.transformer_depth} / transformer_depth_mid="
                f"{self.transformer_depth_mid}: depths must be >= 1"
            )
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError(
                f"UNetConfig.num_heads={self.num_heads}, head_dim={self.head_dim}: set exactly one of them "
                "(num_heads: heads per level; head_dim: channels per head)"
            )
        if self.num_heads is not None and len(self.num_heads) != n:
            raise ValueError(f"UNetConfig.num_heads={self.num_heads} needs one entry per level ({n})")
        for level, c in enumerate(self.block_out_channels):
            heads, _ = self.heads_at(level)
            if heads < 1 or c % heads:
                raise ValueError(
                    f"UNetConfig: level {level} has {c} channels, which do not split into heads "
                    f"(num_heads={self.num_heads}, head_dim={self.head_dim})"
                )
        if self.cross_attention_dim is not None and self.cross_attention_dim < 1:
            raise ValueError(f"UNetConfig.cross_attention_dim={self.cross_attention_dim}; it must be >= 1 or None")
        if self.addition_embed_type not in ("none", "text_time"):
            raise ValueError(
                f"UNetConfig.addition_embed_type={self.addition_embed_type!r}; choose 'none' or 'text_time'"
            )
        if self.addition_embed_type == "text_time" and not self.addition_embed_input_dim:
            raise ValueError(
                "UNetConfig.addition_embed_input_dim must be set (pooled width + vector width) when "
                f"addition_embed_type='text_time'; got {self.addition_embed_input_dim}"
            )
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"UNetConfig.num_classes={self.num_classes}; it must be >= 1 or None")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout={self.dropout}; it must be in [0, 1)")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"UNetConfig.attention_backend={self.attention_backend!r}; choose one of {list(BACKENDS)}")

    def heads_at(self, level: int) -> tuple[int, int]:
        """``(heads, head_dim)`` of the transformers at ``level`` (the mid block uses the last level's)."""
        channels = self.block_out_channels[level]
        if self.num_heads is not None:
            heads = self.num_heads[level]
            return heads, channels // max(heads, 1)
        return channels // self.head_dim, self.head_dim

    @property
    def embed_dim(self) -> int:
        """Width of the timestep embedding that every ResBlock receives."""
        return self.time_embed_dim if self.time_embed_dim is not None else 4 * self.block_out_channels[0]

    @property
    def downsample_factor(self) -> int:
        """Total downsampling of the U-Net: inputs whose sides divide by it need no size fix-ups."""
        return 2 ** (len(self.block_out_channels) - 1)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block (Vaswani et al. 2017) as in LDM: self-attention, cross-attention to the text
    tokens (when ``context_dim`` is set), GEGLU feed-forward (Shazeer 2020); LayerNorm before each, residual after."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: Optional[int], backend: str):
        super().__init__()
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

    def forward(self, x: Tensor, context: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        """x ``(B, N, D)``; context ``(B, L, Dc)``; mask ``(B, L)`` bool (True = attend)."""
        x = x + self.self_attn(self.norm1(x))  # (B, N, D)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm2(x), context, mask)  # (B, N, D)
        return x + self.ff(self.norm3(x))  # (B, N, D)


class SpatialTransformer(nn.Module):
    """LDM's spatial transformer: GroupNorm → proj_in → ``depth`` × :class:`TransformerBlock` over the H·W
    positions → proj_out, added to the input. proj_in/out are 1×1 convolutions, or Linear layers with
    ``linear_projection`` (numerically the same map; the two layouts exist in published weights)."""

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
    ):
        super().__init__()
        inner = heads * head_dim
        self.linear_projection = linear_projection
        self.norm = group_norm(channels, groups, TRANSFORMER_GROUP_NORM_EPS)
        if linear_projection:
            self.proj_in, self.proj_out = nn.Linear(channels, inner), nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, kernel_size=1)
            self.proj_out = nn.Conv2d(inner, channels, kernel_size=1)
        self.blocks = nn.ModuleList(
            [TransformerBlock(inner, heads, head_dim, context_dim, backend) for _ in range(depth)]
        )
        self.gradient_checkpointing = False

    def forward(self, x: Tensor, context: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)  # (B, C, H, W)
        if not self.linear_projection:
            h = self.proj_in(h)  # (B, D, H, W)
        h = h.permute(0, 2, 3, 1).reshape(b, height * width, h.shape[1])  # (B, HW, C or D)
        if self.linear_projection:
            h = self.proj_in(h)  # (B, HW, D)
        for block in self.blocks:
            h = checkpointed(block, h, context, mask, enabled=self.gradient_checkpointing)  # (B, HW, D)
        if self.linear_projection:
            h = self.proj_out(h)  # (B, HW, C)
        h = h.reshape(b, height, width, h.shape[-1]).permute(0, 3, 1, 2)  # (B, C or D, H, W)
        if not self.linear_projection:
            h = self.proj_out(h)  # (B, C, H, W)
        return x + h


def _resblock(cin: int, cout: int, config: UNetConfig) -> ResBlock:
    return ResBlock(
        cin, cout, config.embed_dim, config.norm_num_groups, config.norm_eps, config.dropout, config.resnet_scale_shift
    )


def _transformer(channels: int, level: int, depth: int, config: UNetConfig) -> SpatialTransformer:
    heads, head_dim = config.heads_at(level)
    return SpatialTransformer(
        channels,
        heads,
        head_dim,
        depth,
        config.cross_attention_dim,
        config.norm_num_groups,
        config.use_linear_projection,
        config.attention_backend,
    )


class DownLevel(nn.Module):
    """One resolution of the contracting path: ResBlocks (each followed by a spatial transformer at attention
    levels), then a stride-2 convolution except at the lowest level. Every intermediate result is a skip."""

    def __init__(self, level: int, cin: int, config: UNetConfig, downsample: bool):
        super().__init__()
        cout = config.block_out_channels[level]
        n = config.layers_per_block
        self.res = nn.ModuleList([_resblock(cin if j == 0 else cout, cout, config) for j in range(n)])
        self.attn = nn.ModuleList(
            [_transformer(cout, level, config.transformer_depth[level], config) for _ in range(n)]
            if config.attention_levels[level]
            else []
        )
        self.downsample = Downsample(cout, padding="symmetric") if downsample else None
        self.gradient_checkpointing = False

    def forward(
        self, h: Tensor, emb: Tensor, context: Optional[Tensor], mask: Optional[Tensor], skips: list[Tensor]
    ) -> Tensor:
        for j, res in enumerate(self.res):
            h = checkpointed(res, h, emb, enabled=self.gradient_checkpointing)  # (B, C, H, W)
            if len(self.attn):
                h = self.attn[j](h, context, mask)  # (B, C, H, W)
            skips.append(h)
        if self.downsample is not None:
            h = self.downsample(h)  # (B, C, H/2, W/2)
            skips.append(h)
        return h


class UpLevel(nn.Module):
    """One resolution of the expanding path: ``layers_per_block + 1`` ResBlocks, each fed the running features
    concatenated with one skip (popped last-in first-out), optional spatial transformers, then ×2 upsampling
    except at the highest level."""

    def __init__(self, level: int, cin: int, skip_channels: list[int], config: UNetConfig, upsample: bool):
        super().__init__()
        cout = config.block_out_channels[level]
        self.res = nn.ModuleList(
            [_resblock((cin if j == 0 else cout) + s, cout, config) for j, s in enumerate(skip_channels)]
        )
        self.attn = nn.ModuleList(
            [_transformer(cout, level, config.transformer_depth[level], config) for _ in skip_channels]
            if config.attention_levels[level]
            else []
        )
        self.upsample = Upsample(cout) if upsample else None
        self.gradient_checkpointing = False

    def forward(
        self, h: Tensor, emb: Tensor, context: Optional[Tensor], mask: Optional[Tensor], skips: list[Tensor]
    ) -> Tensor:
        for j, res in enumerate(self.res):
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + Cskip, H, W)
            h = checkpointed(res, h, emb, enabled=self.gradient_checkpointing)  # (B, C, H, W)
            if len(self.attn):
                h = self.attn[j](h, context, mask)  # (B, C, H, W)
        if self.upsample is not None:
            h = self.upsample(h, size=skips[-1].shape[-2:])  # (B, C, 2H, 2W), matched to the next skip
        return h


class MidBlock(nn.Module):
    """ResBlock → spatial transformer → ResBlock at the lowest resolution."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        level = len(config.block_out_channels) - 1
        c = config.block_out_channels[level]
        depth = config.transformer_depth_mid
        depth = depth if depth is not None else config.transformer_depth[-1]
        self.res = nn.ModuleList([_resblock(c, c, config) for _ in range(2)])
        self.attn = _transformer(c, level, depth, config)
        self.gradient_checkpointing = False

    def forward(self, h: Tensor, emb: Tensor, context: Optional[Tensor], mask: Optional[Tensor]) -> Tensor:
        h = checkpointed(self.res[0], h, emb, enabled=self.gradient_checkpointing)  # (B, C, H, W)
        h = self.attn(h, context, mask)  # (B, C, H, W)
        return checkpointed(self.res[1], h, emb, enabled=self.gradient_checkpointing)  # (B, C, H, W)


def build_levels(cfg: Any, widths: list[int], down_cls: Callable[..., nn.Module], mid_cls: Callable[..., nn.Module],
                 up_cls: Callable[..., nn.Module]) -> tuple[nn.ModuleList, nn.Module, nn.ModuleList]:
    """A U-Net's down levels, middle block and up levels (Ronneberger et al. 2015, as Latent Diffusion lays them
    out): level i of ``widths[i]`` channels, every level but the last halving the size; each up level takes the
    skips its mirror pushed, last first. The image and the video U-Net build theirs here from their own classes."""
    skip_channels = [widths[0]]  # the channel count of every skip, in the order they are pushed
    down = nn.ModuleList()
    for level, c in enumerate(widths):
        last = level == len(widths) - 1
        down.append(down_cls(level, widths[max(level - 1, 0)], cfg, downsample=not last))
        skip_channels += [c] * (cfg.layers_per_block + (0 if last else 1))
    mid = mid_cls(cfg)
    up = nn.ModuleList()
    cin = widths[-1]
    for level in reversed(range(len(widths))):
        popped = [skip_channels.pop() for _ in range(cfg.layers_per_block + 1)]
        up.append(up_cls(level, cin, popped, cfg, upsample=level > 0))
        cin = widths[level]
    return down, mid, up


class UNet(nn.Module):
    """Text-conditioned latent U-Net (SD 1.x/2.x, SDXL). ``forward(x_t, timesteps, cond) -> (B, C_out, ...)``."""

    _no_split_modules = ("ResBlock", "TransformerBlock")  # its repeated blocks: FSDP2 and checkpointing units

    def __init__(self, config: Optional[UNetConfig] = None):
        super().__init__()
        self.config = cfg = config if config is not None else UNetConfig()
        widths = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], kernel_size=3, padding=1)
        self.time_embed = TimestepMLP(widths[0], cfg.embed_dim)
        self.class_embed = nn.Embedding(cfg.num_classes, cfg.embed_dim) if cfg.num_classes is not None else None
        self.add_embed = (
            TimestepMLP(cfg.addition_embed_input_dim, cfg.embed_dim) if cfg.addition_embed_type == "text_time" else None
        )

        self.down, self.mid, self.up = build_levels(cfg, widths, DownLevel, MidBlock, UpLevel)
        self.norm_out = group_norm(widths[0], cfg.norm_num_groups, cfg.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = cfg.gradient_checkpointing

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether ResBlocks and transformer blocks recompute their activations in backward."""
        return self.mid.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        for module in self.modules():
            if isinstance(module, (DownLevel, UpLevel, MidBlock, SpatialTransformer)):
                module.gradient_checkpointing = bool(enabled)

    def _embedding(self, timesteps: Tensor, cond: Conditioning, dtype: torch.dtype) -> Tensor:
        """Timestep embedding plus the optional class and SDXL text-time embeddings → ``(B, embed_dim)``."""
        cfg = self.config
        t_freq = timestep_embedding(
            timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
        )  # (B, C0)
        emb = self.time_embed(t_freq.to(dtype))  # (B, E)
        if self.class_embed is not None:
            if cond.class_labels is None:
                raise ValueError("this U-Net is class-conditional (num_classes is set); cond.class_labels is None")
            emb = emb + self.class_embed(cond.class_labels)  # (B, E)
        if self.add_embed is not None:
            if cond.pooled is None or cond.vector is None:
                raise ValueError(
                    "addition_embed_type='text_time' needs cond.pooled (pooled text) and cond.vector (Fourier "
                    "features of the micro-conditioning, see models.embeddings.fourier_features); got "
                    f"pooled={None if cond.pooled is None else tuple(cond.pooled.shape)}, "
                    f"vector={None if cond.vector is None else tuple(cond.vector.shape)}"
                )
            extra = torch.cat([cond.pooled, cond.vector], dim=-1).to(dtype)  # (B, Dp + Dv)
            if extra.shape[-1] != cfg.addition_embed_input_dim:
                raise ValueError(
                    f"cat(cond.pooled, cond.vector) has width {extra.shape[-1]}, but the U-Net's "
                    f"addition_embed_input_dim is {cfg.addition_embed_input_dim}"
                )
            emb = emb + self.add_embed(extra)  # (B, E)
        return emb

    def forward(
        self, x_t: Tensor, timesteps: Union[Tensor, float, int], cond: Optional[Conditioning] = None
    ) -> Tensor:
        """x_t ``(B, C, H, W)`` or ``(B, C, T, H, W)``; timesteps ``(B,)`` or a scalar → output shaped like x_t."""
        cond = cond if cond is not None else Conditioning()
        t = broadcast_timesteps(timesteps, x_t.shape[0], x_t.device)  # (B,)

        if x_t.ndim == 5:
            frames = x_t.shape[2]
            per_frame = {k: v.repeat_interleave(frames, dim=0) for k, v in cond.tensors().items()}
            frame_cond = dataclasses.replace(cond, **per_frame)  # one row per frame
            out = self._forward_images(fold_frames(x_t), t.repeat_interleave(frames), frame_cond)  # (B*T, C, H, W)
            return unfold_frames(out, frames)  # (B, C, T, H, W)
        if x_t.ndim != 4:
            raise ValueError(f"the U-Net takes (B, C, H, W) images or (B, C, T, H, W) clips; got x_t of shape "
                             f"{tuple(x_t.shape)} ({x_t.ndim}-D)")
        return self._forward_images(x_t, t, cond)

    def _forward_images(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        context = cond.context if self.config.cross_attention_dim is not None else None
        mask = cond.context_mask if context is not None else None
        if self.config.cross_attention_dim is not None and context is None:
            raise ValueError("this U-Net cross-attends to text (cross_attention_dim is set); cond.context is None")
        emb = self._embedding(t, cond, x.dtype)  # (B, E)
        h = self.conv_in(x)  # (B, C0, H, W)
        skips = [h]
        for level in self.down:
            h = level(h, emb, context, mask, skips)  # (B, Ci, H/2^i, W/2^i)
        h = self.mid(h, emb, context, mask)  # (B, Clast, H/f, W/f)
        for level in self.up:
            h = level(h, emb, context, mask, skips)  # (B, Ci, H/2^i, W/2^i)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, Cout, H, W)


# --- presets (configs only; build on torch.device("meta") to count parameters without allocating) -----------------


def sd15_unet_config() -> UNetConfig:
    """Stable Diffusion 1.5 (and 1.x): 859,520,964 parameters, CLIP ViT-L/14 context (768)."""
    return UNetConfig()


def sd21_unet_config() -> UNetConfig:
    """Stable Diffusion 2.x: 64-channel heads, OpenCLIP ViT-H/14 context (1024), linear projections."""
    return UNetConfig(num_heads=None, head_dim=64, cross_attention_dim=1024, use_linear_projection=True)


def sdxl_unet_config() -> UNetConfig:
    """SDXL base 1.0 (Podell et al. 2023): three levels, deep transformers, pooled-text + size/crop conditioning.

    ``cond.pooled`` is the 1280-wide pooled OpenCLIP bigG embedding; ``cond.vector`` is
    ``fourier_features(original_size + crop_top_left + target_size, 256)``, 6 × 256 = 1536 wide.
    """
    return UNetConfig(
        block_out_channels=[320, 640, 1280],
        attention_levels=[False, True, True],
        transformer_depth=[1, 2, 10],
        num_heads=None,
        head_dim=64,
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_embed_input_dim=1280 + 6 * 256,
        addition_time_embed_dim=256,
    )


def tiny_unet_config() -> UNetConfig:
    """A sub-million-parameter U-Net for tests and the CPU quick-start (8×8 or 16×16 latents).

    Set ``cross_attention_dim`` to the width of the text encoder in use.
    """
    return UNetConfig(
        block_out_channels=[32, 64],
        layers_per_block=1,
        attention_levels=[False, True],
        transformer_depth=[1, 1],
        num_heads=None,
        head_dim=32,
        cross_attention_dim=64,
        norm_num_groups=8,
    )


UNET_PRESETS: dict[str, Callable[[], UNetConfig]] = {
    "sd15-unet": sd15_unet_config,
    "sd21-unet": sd21_unet_config,
    "sdxl-unet": sdxl_unet_config,
    "tiny-unet": tiny_unet_config,
}


def _from_diffusers(state: dict[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    from models.convert import from_diffusers_unet_state_dict  # lazily: models.convert imports this module

    return from_diffusers_unet_state_dict(state, config)


def _from_ldm(state: dict[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    from models.convert import from_ldm_unet_state_dict

    return from_ldm_unet_state_dict(state, config)


register_architecture("unet", UNetConfig, UNet, converters={"diffusers": _from_diffusers, "ldm": _from_ldm})
for _name, _builder in UNET_PRESETS.items():
    register_preset(_name, _builder)
