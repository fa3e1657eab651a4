"""Video autoencoders: Stable Video Diffusion's temporal decoder and a causal 3-D KL autoencoder (Wan layout).

Two classes, both with the interface the stages use on :class:`models.autoencoder.AutoencoderKL`
(``encode`` → :class:`~models.autoencoder.DiagonalGaussian`, ``decode``, ``latents_from_pixels`` /
``pixels_from_latents`` / ``scale_latents``, ``latent_channels``, ``spatial_factor``, ``temporal_factor``,
``latent_shape(height, width, num_frames)``):

* :class:`TemporalDecoderAutoencoder` — the autoencoder of Stable Video Diffusion (Blattmann et al. 2023, "Stable
  Video Diffusion", Sec. 4 / App. D): the image encoder of Latent Diffusion applied frame by frame, and a decoder
  whose every ResBlock is followed by a temporal ResBlock (3×1×1 convolutions over time) merged with a learned mix
  factor, plus a final 3×1×1 temporal convolution — the VideoLDM recipe (Blattmann et al. 2023, "Align your
  Latents", Sec. 3.1.1). Temporal factor 1: a clip of T frames has T latent frames. Weights: diffusers'
  ``AutoencoderKLTemporalDecoder`` naming.

* :class:`CausalAutoencoder3D` — a causal 3-D KL autoencoder with 4× temporal and 8× spatial compression, as in
  Wan 2.1 (Wan team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models", Sec. 3.1), CogVideoX and
  HunyuanVideo. Every convolution is a 3-D convolution padded only towards the past, so frame t never sees frame
  t+1; the temporal down-sampling leaves the first frame alone, so a clip of ``T = 1 + 4k`` frames has ``1 + k``
  latent frames, the first of which is the encoding of the first frame by itself (an image is a one-frame video).
  Weights: diffusers' ``AutoencoderKLWan`` naming (Wan 2.1: RMS normalisation over channels; the decoder's
  up-sampling halves the channels). With ``norm="group"`` and ``upsample_halves_channels=False`` it has exactly the
  topology of our image :class:`~models.autoencoder.AutoencoderKL`, which :func:`inflate_autoencoder` turns into a
  video autoencoder whose one-frame clips reconstruct exactly as the image autoencoder does.

Bounded memory for long clips (:class:`CausalAutoencoder3D`):

* *temporal chunking* (``chunk_latent_frames``): the clip goes through the network a few latent frames at a time;
  every causal convolution keeps the last frames of its input in a :class:`CausalCache` and prepends them to the
  next chunk, so a chunked pass equals the whole-clip pass (to float rounding) while holding only one chunk's
  activations. ``chunk_latent_frames=1`` is diffusers' schedule (1 frame, then 4 at a time; one latent frame at a
  time on decoding). The result is written into a preallocated output, so peak memory is the output plus one
  chunk's working set, flat in the clip length.
* *spatial tiling* (``tile_latent_size``, ``tile_latent_overlap``): the frame is cut into overlapping tiles whose
  outputs are blended with linear ramps over the overlap (a weighted average, so any overlap is covered). Not
  exact (the mid-block attention and, with ``norm="group"``, GroupNorm see one tile only), but close (see
  tests/models/test_video_autoencoder.py for the measured gap).

Gradient checkpointing (``gradient_checkpointing``) wraps every ResBlock and mid-block attention in the whole-clip
pass (``chunk_latent_frames=0``, the training configuration); chunked passes are for inference and never
checkpoint (a recomputation would see the cache already advanced).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import BACKENDS, Attention
from models.autoencoder import (
    AutoencoderConfig,
    AutoencoderKL,
    DiagonalGaussian,
    Encoder,
    LatentAutoencoder,
    latent_shape_for,
)
from models.blocks import Downsample, ResBlock, Upsample, fold_frames, group_norm, unfold_frames
from models.registry import register_architecture, register_preset
from models.utils import checkpointed

StateDict = Mapping[str, Tensor]


def _check_positive(owner: str, config: object, names: Sequence[str]) -> None:
    for name in names:
        if getattr(config, name) < 1:
            raise ValueError(f"{owner}.{name}={getattr(config, name)}; it must be >= 1")


# =================================================================================================================
# (a) Stable Video Diffusion: per-frame encoder, temporal decoder
# =================================================================================================================


@dataclass
class TemporalAutoencoderConfig:
    """Architecture and latent normalisation of :class:`TemporalDecoderAutoencoder` (SVD's autoencoder)."""

    in_channels: int = 3  # image channels fed to the encoder
    out_channels: int = 3  # image channels produced by the decoder
    latent_channels: int = 4  # channels of the latent z
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])  # width per level
    layers_per_block: int = 2  # ResBlocks per encoder level (decoder: one more per level; its mid-block has 2)
    norm_num_groups: int = 32  # GroupNorm groups everywhere (diffusers' temporal decoder fixes 32)
    norm_eps: float = 1e-6  # GroupNorm epsilon of the spatial layers
    temporal_norm_eps: float = 1e-5  # GroupNorm epsilon of the temporal ResBlocks
    merge_factor: float = 0.0  # initial mix logit m: output = (1 - sigmoid(m)) * spatial + sigmoid(m) * temporal
    # a 1×1 conv on z before the decoder, per frame: SVD has none; an image autoencoder with one (ours, SD's)
    # keeps it when the autoencoder stage starts this model from it (inflate_from), so decoding starts exact
    use_post_quant_conv: bool = False
    scaling_factor: float = 0.18215  # latents seen by the denoiser are (z - shift_factor) * scaling_factor
    shift_factor: float = 0.0  # see scaling_factor
    gradient_checkpointing: bool = False  # recompute ResBlock/attention activations in backward
    attention_backend: str = "sdpa"  # backend of the mid-block attentions: sdpa | xformers | math

    def __post_init__(self) -> None:
        _check_positive("TemporalAutoencoderConfig", self,
                        ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"))
        if not self.block_out_channels or any(c < 1 or c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"TemporalAutoencoderConfig.block_out_channels={self.block_out_channels}: give at least "
                             f"one width, each a positive multiple of norm_num_groups={self.norm_num_groups}")
        if not self.scaling_factor > 0:
            raise ValueError(f"TemporalAutoencoderConfig.scaling_factor={self.scaling_factor}; it must be > 0")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"TemporalAutoencoderConfig.attention_backend={self.attention_backend!r}; "
                             f"choose one of {list(BACKENDS)}")

    def encoder_config(self) -> AutoencoderConfig:
        """The image-autoencoder config whose encoder (and quant_conv) this autoencoder uses frame by frame."""
        return AutoencoderConfig(
            in_channels=self.in_channels, out_channels=self.out_channels, latent_channels=self.latent_channels,
            block_out_channels=list(self.block_out_channels), layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups, norm_eps=self.norm_eps, use_quant_conv=True,
            use_post_quant_conv=False, scaling_factor=self.scaling_factor, shift_factor=self.shift_factor,
            gradient_checkpointing=self.gradient_checkpointing, attention_backend=self.attention_backend,
        )

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along height and width: 2 ** (levels - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame: 1 (frames are encoded one by one)."""
        return 1


class TemporalResBlock(nn.Module):
    """Pre-activation residual block over time only: GN → SiLU → conv(3×1×1) twice, plus the input.

    The GroupNorm statistics are taken over (channels of a group, T, H, W) of the whole clip (as SVD does)."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = group_norm(channels, groups, eps)
        self.conv1 = nn.Conv3d(channels, channels, kernel_size=(3, 1, 1), padding=(1, 0, 0))
        self.norm2 = group_norm(channels, groups, eps)
        self.conv2 = nn.Conv3d(channels, channels, kernel_size=(3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C, T, H, W)
        return x + self.conv2(F.silu(self.norm2(h)))  # (B, C, T, H, W)


class SpatioTemporalResBlock(nn.Module):
    """A spatial :class:`~models.blocks.ResBlock` on every frame, then a :class:`TemporalResBlock`, merged as
    ``(1 - α) · spatial + α · temporal`` with α = sigmoid(``mix_factor``) learned (VideoLDM's merge)."""

    def __init__(self, in_channels: int, out_channels: int, config: TemporalAutoencoderConfig):
        super().__init__()
        self.spatial = ResBlock(in_channels, out_channels, None, config.norm_num_groups, config.norm_eps)
        self.temporal = TemporalResBlock(out_channels, config.norm_num_groups, config.temporal_norm_eps)
        self.mix_factor = nn.Parameter(torch.tensor([float(config.merge_factor)]))

    def forward(self, x: Tensor) -> Tensor:
        spatial = unfold_frames(self.spatial(fold_frames(x)), x.shape[2])  # (B, Cout, T, H, W)
        temporal = self.temporal(spatial)  # (B, Cout, T, H, W)
        keep = 1.0 - torch.sigmoid(self.mix_factor).to(x.dtype)  # weight of the spatial path
        return keep * spatial + (1.0 - keep) * temporal


class TemporalMidBlock(nn.Module):
    """SpatioTemporalResBlock → per-frame single-head self-attention → SpatioTemporalResBlock."""

    def __init__(self, channels: int, config: TemporalAutoencoderConfig):
        super().__init__()
        self.res = nn.ModuleList([SpatioTemporalResBlock(channels, channels, config) for _ in range(2)])
        self.attn_norm = group_norm(channels, config.norm_num_groups, config.norm_eps)
        self.attn = Attention(channels, heads=1, head_dim=channels, qkv_bias=True, backend=config.attention_backend)
        self.gradient_checkpointing = config.gradient_checkpointing

    def _attend(self, x: Tensor) -> Tensor:
        frames = fold_frames(x)  # (B*T, C, H, W)
        bt, c, h, w = frames.shape
        tokens = self.attn_norm(frames).reshape(bt, c, h * w).transpose(1, 2)  # (B*T, HW, C)
        out = self.attn(tokens).transpose(1, 2).reshape(bt, c, h, w)  # (B*T, C, H, W)
        return x + unfold_frames(out, x.shape[2])  # (B, C, T, H, W)

    def forward(self, x: Tensor) -> Tensor:
        x = checkpointed(self.res[0], x, enabled=self.gradient_checkpointing)  # (B, C, T, H, W)
        x = checkpointed(self._attend, x, enabled=self.gradient_checkpointing)
        return checkpointed(self.res[1], x, enabled=self.gradient_checkpointing)


class TemporalDecoderLevel(nn.Module):
    """``layers_per_block + 1`` SpatioTemporalResBlocks, then (except at the last level) a ×2 spatial upsampling."""

    def __init__(self, in_channels: int, out_channels: int, config: TemporalAutoencoderConfig, upsample: bool):
        super().__init__()
        self.res = nn.ModuleList([
            SpatioTemporalResBlock(in_channels if j == 0 else out_channels, out_channels, config)
            for j in range(config.layers_per_block + 1)
        ])
        self.upsample = Upsample(out_channels) if upsample else None
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, x: Tensor) -> Tensor:
        for block in self.res:
            x = checkpointed(block, x, enabled=self.gradient_checkpointing)  # (B, Cout, T, H, W)
        if self.upsample is None:
            return x
        return unfold_frames(self.upsample(fold_frames(x)), x.shape[2])  # (B, Cout, T, 2H, 2W)


class TemporalDecoder(nn.Module):
    """Latents ``(B, Cz, T, h, w)`` → pixels ``(B, Cout, T, h·f, w·f)``, mixing frames in every ResBlock."""

    def __init__(self, config: TemporalAutoencoderConfig):
        super().__init__()
        widths = list(reversed(config.block_out_channels))
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], kernel_size=3, padding=1)
        self.mid = TemporalMidBlock(widths[0], config)
        self.up = nn.ModuleList([
            TemporalDecoderLevel(widths[max(i - 1, 0)], widths[i], config, upsample=i < len(widths) - 1)
            for i in range(len(widths))
        ])
        self.norm_out = group_norm(widths[-1], config.norm_num_groups, config.norm_eps)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, kernel_size=3, padding=1)
        self.time_conv_out = nn.Conv3d(config.out_channels, config.out_channels, kernel_size=(3, 1, 1),
                                       padding=(1, 0, 0))

    def forward(self, z: Tensor) -> Tensor:
        t = z.shape[2]
        h = unfold_frames(self.conv_in(fold_frames(z)), t)  # (B, Clast, T, h, w)
        h = self.mid(h)
        for level in self.up:
            h = level(h)  # (B, Ci, T, h·2^i, w·2^i)
        frames = self.conv_out(F.silu(self.norm_out(fold_frames(h))))  # (B*T, Cout, H, W)
        return self.time_conv_out(unfold_frames(frames, t))  # (B, Cout, T, H, W)


class TemporalDecoderAutoencoder(LatentAutoencoder, nn.Module):
    """Stable Video Diffusion's autoencoder: per-frame KL encoder, temporal decoder (see the module docstring).

    Clips are ``(B, C, T, H, W)``; an image ``(B, C, H, W)`` is a one-frame clip (its decoding is 4-D again).
    """

    _no_split_modules = ("ResBlock", "SpatioTemporalResBlock")

    def __init__(self, config: Optional[TemporalAutoencoderConfig] = None):
        super().__init__()
        self.config = config if config is not None else TemporalAutoencoderConfig()
        cz = self.config.latent_channels
        self.encoder = Encoder(self.config.encoder_config())
        self.quant_conv = nn.Conv2d(2 * cz, 2 * cz, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(cz, cz, kernel_size=1) if self.config.use_post_quant_conv else None
        self.decoder = TemporalDecoder(self.config)

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether every ResBlock and mid-block attention recompute their activations in backward."""
        return self.decoder.mid.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing") and module is not self:
                module.gradient_checkpointing = bool(enabled)

    def latent_shape(self, height: int, width: int, num_frames: Optional[int] = None) -> tuple[int, ...]:
        """``(C, h, w)`` for an image, ``(C, T, h, w)`` for a clip of ``num_frames`` frames."""
        return latent_shape_for(self.latent_channels, height, width, num_frames, self.spatial_factor, 1)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Pixels ``(B, C, H, W)`` or ``(B, C, T, H, W)`` → posterior over ``(B, Cz, [T,] H/f, W/f)``."""
        if x.ndim not in (4, 5):
            raise ValueError(f"encode takes (B, C, H, W) images or (B, C, T, H, W) clips; got shape {tuple(x.shape)}")
        frames = fold_frames(x) if x.ndim == 5 else x  # (B*T, C, H, W)
        moments = self.quant_conv(self.encoder(frames))  # (B*T, 2Cz, h, w)
        return DiagonalGaussian(unfold_frames(moments, x.shape[2]) if x.ndim == 5 else moments)

    def decode(self, z: Tensor) -> Tensor:
        """Raw latents ``(B, Cz, T, h, w)`` → pixels ``(B, Cout, T, H, W)``; ``(B, Cz, h, w)`` → one frame, 4-D."""
        if z.ndim == 4:
            return self.decode(z[:, :, None])[:, :, 0]  # (B, Cout, H, W)
        if z.ndim != 5:
            raise ValueError(f"decode takes (B, C, h, w) or (B, C, T, h, w) latents; got shape {tuple(z.shape)}")
        if self.post_quant_conv is not None:
            z = unfold_frames(self.post_quant_conv(fold_frames(z)), z.shape[2])  # (B, Cz, T, h, w)
        return self.decoder(z)


# =================================================================================================================
# (b) causal 3-D autoencoder (Wan 2.1 layout)
# =================================================================================================================


class CausalCache(dict):
    """State carried between the temporal chunks of one causal pass: module → its last input frames.

    A fresh cache starts a clip; handing the same cache to the next chunk continues it."""


@dataclass
class CausalAutoencoderConfig:
    """Architecture, latent normalisation and memory controls of :class:`CausalAutoencoder3D`."""

    in_channels: int = 3  # pixel channels fed to the encoder
    out_channels: int = 3  # pixel channels produced by the decoder
    latent_channels: int = 16  # channels of the latent z
    block_out_channels: list[int] = field(default_factory=lambda: [96, 192, 384, 384])  # width per level
    layers_per_block: int = 2  # ResBlocks per encoder level (the decoder has one more per level)
    temporal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])  # per spatial downsampling
    norm: Literal["rms", "group"] = "rms"  # RMS over channels (Wan) or per-frame GroupNorm (inflated image AE)
    norm_num_groups: int = 32  # GroupNorm groups (norm="group" only)
    norm_eps: float = 1e-6  # GroupNorm epsilon (norm="group" only)
    upsample_halves_channels: bool = True  # the decoder's upsampling conv halves the width (Wan 2.1)
    mid_block_attention: bool = True  # per-frame self-attention between the two mid-block ResBlocks
    use_quant_conv: bool = True  # 1×1×1 conv on the posterior moments
    use_post_quant_conv: bool = True  # 1×1×1 conv on z before the decoder
    clamp_output: bool = True  # clamp decoded pixels to [-1, 1] (Wan does)
    scaling_factor: float = 1.0  # normalised latents are (z - shift) * scaling_factor / std (see latents_mean)
    shift_factor: float = 0.0  # scalar shift, used when latents_mean is None
    latents_mean: Optional[list[float]] = None  # per-channel latent mean (Wan), or None for shift_factor
    latents_std: Optional[list[float]] = None  # per-channel latent std (Wan), set together with latents_mean
    chunk_latent_frames: int = 1  # latent frames per causal chunk in encode/decode; 0: the whole clip at once
    tile_latent_size: int = 0  # spatial tile side in latent pixels; 0: no tiling
    tile_latent_overlap: int = 4  # overlap of neighbouring tiles in latent pixels (blended)
    gradient_checkpointing: bool = False  # recompute ResBlock/attention activations in backward (whole-clip pass)
    attention_backend: str = "sdpa"  # backend of the mid-block attentions: sdpa | xformers | math

    def __post_init__(self) -> None:
        owner = "CausalAutoencoderConfig"
        _check_positive(owner, self, ("in_channels", "out_channels", "latent_channels", "layers_per_block",
                                      "norm_num_groups"))
        if not self.block_out_channels or any(c < 1 for c in self.block_out_channels):
            raise ValueError(f"{owner}.block_out_channels={self.block_out_channels}; give positive widths")
        if self.norm not in ("rms", "group"):
            raise ValueError(f"{owner}.norm={self.norm!r}; choose 'rms' or 'group'")
        if self.norm == "group" and any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"{owner}.block_out_channels={self.block_out_channels}: with norm='group' every width "
                             f"must be a multiple of norm_num_groups={self.norm_num_groups}")
        if self.upsample_halves_channels and any(c % 2 for c in self.block_out_channels):
            raise ValueError(f"{owner}.block_out_channels={self.block_out_channels}: upsample_halves_channels needs "
                             "even widths")
        if len(self.temporal_downsample) != len(self.block_out_channels) - 1:
            raise ValueError(f"{owner}.temporal_downsample={self.temporal_downsample}: give one flag per spatial "
                             f"downsampling ({len(self.block_out_channels) - 1} for {len(self.block_out_channels)} "
                             "levels)")
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError(f"{owner}: set latents_mean and latents_std together (got "
                             f"latents_mean={self.latents_mean}, latents_std={self.latents_std})")
        if self.latents_mean is not None and not (
                len(self.latents_mean) == len(self.latents_std) == self.latent_channels):
            raise ValueError(f"{owner}: latents_mean/latents_std need latent_channels={self.latent_channels} values, "
                             f"got {len(self.latents_mean)} and {len(self.latents_std)}")
        if not self.scaling_factor > 0:
            raise ValueError(f"{owner}.scaling_factor={self.scaling_factor}; it must be > 0")
        if self.chunk_latent_frames < 0 or self.tile_latent_size < 0 or self.tile_latent_overlap < 0:
            raise ValueError(f"{owner}: chunk_latent_frames={self.chunk_latent_frames}, tile_latent_size="
                             f"{self.tile_latent_size}, tile_latent_overlap={self.tile_latent_overlap}; none may be "
                             "negative")
        if self.tile_latent_size and self.tile_latent_overlap >= self.tile_latent_size:
            raise ValueError(f"{owner}.tile_latent_overlap={self.tile_latent_overlap} must be smaller than "
                             f"tile_latent_size={self.tile_latent_size}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"{owner}.attention_backend={self.attention_backend!r}; choose one of {list(BACKENDS)}")

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along height and width: 2 ** (levels - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame after the first: 2 ** (number of temporal downsamplings)."""
        return 2 ** sum(bool(t) for t in self.temporal_downsample)


class ChannelRMSNorm(nn.Module):
    """RMS normalisation over channels at every position (Zhang & Sennrich 2019), as in Wan's autoencoder:
    ``x / ‖x‖₂ · √C · γ`` along dim 1. Position-wise, so it is causal and tiling-exact."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.scale = channels ** 0.5

    def forward(self, x: Tensor) -> Tensor:
        gamma = self.weight.view((1, -1) + (1,) * (x.ndim - 2))
        return F.normalize(x, dim=1) * self.scale * gamma


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame (a clip ``(B, C, T, H, W)`` is normalised frame by frame), so it stays
    causal and one frame normalises exactly as the image autoencoder's GroupNorm does."""

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 5:
            return unfold_frames(super().forward(fold_frames(x)), x.shape[2])
        return super().forward(x)


def _norm(channels: int, config: CausalAutoencoderConfig) -> nn.Module:
    if config.norm == "rms":
        return ChannelRMSNorm(channels)
    group_norm(channels, config.norm_num_groups, config.norm_eps)  # validates the grouping
    return FrameGroupNorm(config.norm_num_groups, channels, eps=config.norm_eps)


class CausalConv3d(nn.Conv3d):
    """3-D convolution padded only towards the past in time (zeros, or the cached frames of the previous chunk)
    and symmetrically in space. Kernel ``(kt, kh, kw)``, time stride 1.

    With a :class:`CausalCache`, the last ``kt - 1`` input frames are stored for the next chunk, so running a clip
    chunk by chunk gives the same result as running it whole."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int, int]):
        kt, kh, kw = kernel_size
        super().__init__(in_channels, out_channels, kernel_size, padding=(0, kh // 2, kw // 2))
        self.history = kt - 1

    def forward(self, x: Tensor, cache: Optional[CausalCache] = None) -> Tensor:
        if self.history == 0:
            return super().forward(x)
        past = cache.get(self) if cache is not None else None
        inp = x if past is None else torch.cat([past, x], dim=2)  # (B, C, P+T, H, W)
        if cache is not None:
            cache[self] = inp[:, :, -self.history:].clone()  # a copy: the chunk's tensor is freed
        missing = self.history - (inp.shape[2] - x.shape[2])
        if missing > 0:
            inp = F.pad(inp, (0, 0, 0, 0, missing, 0))  # (B, C, history+T, H, W)
        return super().forward(inp)  # (B, Cout, T, H', W')


class CausalResBlock(nn.Module):
    """The autoencoder ResBlock with causal 3×3×3 convolutions: ``skip(x) + conv2(SiLU(N(conv1(SiLU(N(x))))))``.
    Names follow :class:`~models.blocks.ResBlock` (norm1, conv1, norm2, conv2, skip)."""

    def __init__(self, in_channels: int, out_channels: int, config: CausalAutoencoderConfig):
        super().__init__()
        self.norm1 = _norm(in_channels, config)
        self.conv1 = CausalConv3d(in_channels, out_channels, (3, 3, 3))
        self.norm2 = _norm(out_channels, config)
        self.conv2 = CausalConv3d(out_channels, out_channels, (3, 3, 3))
        self.skip = CausalConv3d(in_channels, out_channels, (1, 1, 1)) if in_channels != out_channels else None

    def forward(self, x: Tensor, cache: Optional[CausalCache] = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)  # (B, Cout, T, H, W)
        h = self.conv2(F.silu(self.norm2(h)), cache)  # (B, Cout, T, H, W)
        return (self.skip(x) if self.skip is not None else x) + h


class CausalMidBlock(nn.Module):
    """CausalResBlock → per-frame single-head self-attention → CausalResBlock (names as the image MidBlock)."""

    def __init__(self, channels: int, config: CausalAutoencoderConfig):
        super().__init__()
        self.res = nn.ModuleList([CausalResBlock(channels, channels, config) for _ in range(2)])
        self.attn_norm = _norm(channels, config) if config.mid_block_attention else None
        self.attn = (Attention(channels, heads=1, head_dim=channels, qkv_bias=True, backend=config.attention_backend)
                     if config.mid_block_attention else None)
        self.gradient_checkpointing = config.gradient_checkpointing

    def _attend(self, x: Tensor) -> Tensor:
        frames = fold_frames(self.attn_norm(x))  # (B*T, C, H, W)
        bt, c, h, w = frames.shape
        out = self.attn(frames.reshape(bt, c, h * w).transpose(1, 2))  # (B*T, HW, C)
        return x + unfold_frames(out.transpose(1, 2).reshape(bt, c, h, w), x.shape[2])  # (B, C, T, H, W)

    def forward(self, x: Tensor, cache: Optional[CausalCache] = None) -> Tensor:
        ckpt = self.gradient_checkpointing and cache is None
        x = checkpointed(self.res[0], x, cache, enabled=ckpt)  # (B, C, T, H, W)
        if self.attn is not None:
            x = checkpointed(self._attend, x, enabled=ckpt)
        return checkpointed(self.res[1], x, cache, enabled=ckpt)


class CausalDownsample(Downsample):
    """Spatial ×½ (the image autoencoder's asymmetric stride-2 conv, per frame), then optionally temporal ×½: a
    3×1×1 stride-2 convolution over frames (0,1,2), (2,3,4), … with the first frame passed on untouched, so
    ``1 + 2m`` frames become ``1 + m`` and the first output frame depends on the first input frame only."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__(channels, padding="asymmetric")
        self.time_conv = nn.Conv3d(channels, channels, kernel_size=(3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: Tensor, cache: Optional[CausalCache] = None) -> Tensor:
        y = unfold_frames(super().forward(fold_frames(x)), x.shape[2])  # (B, C, T, H/2, W/2)
        if self.time_conv is None:
            return y
        past = cache.get(self) if cache is not None else None
        if cache is not None:
            cache[self] = y[:, :, -1:].clone()  # the next chunk's windows start at this frame
        if past is None:  # the clip's first chunk: its first frame is kept as it is
            head, inp = y[:, :, :1], y
        else:
            head, inp = None, torch.cat([past, y], dim=2)
        if inp.shape[2] >= 3:
            body = self.time_conv(inp)  # (B, C, (T'-1)//2, H/2, W/2)
            return body if head is None else torch.cat([head, body], dim=2)
        if head is None:
            raise ValueError(f"temporal downsampling got a chunk of {y.shape[2]} frames after the first; chunks "
                             "after the first must hold a multiple of the temporal factor")
        return head


class CausalUpsample(nn.Module):
    """Optionally temporal ×2 (first frame untouched; every later frame becomes two, from a causal 3×1×1
    convolution with 2C outputs whose halves are the two new frames; frame 0 is never in its history), then
    spatial ×2 (nearest neighbour and a 3×3 conv, per frame; ``out_channels`` may halve the width as in Wan 2.1)."""

    def __init__(self, channels: int, out_channels: int, temporal: bool):
        super().__init__()
        self.time_conv = CausalConv3d(channels, 2 * channels, (3, 1, 1)) if temporal else None
        self.conv = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor, cache: Optional[CausalCache] = None) -> Tensor:
        if self.time_conv is not None:
            first = cache is None or self not in cache
            if cache is not None:
                cache[self] = True  # the first frame has been seen
            head, rest = (x[:, :, :1], x[:, :, 1:]) if first else (None, x)
            parts = [] if head is None else [head]
            if rest.shape[2]:
                b, c, t, h, w = rest.shape
                pair = self.time_conv(rest, cache).reshape(b, 2, c, t, h, w)  # two new frames per frame
                parts.append(torch.stack([pair[:, 0], pair[:, 1]], dim=3).reshape(b, c, 2 * t, h, w))
            x = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]  # (B, C, 1 + 2(T-1) or 2T, H, W)
        frames = F.interpolate(fold_frames(x), scale_factor=2.0, mode="nearest")  # (B*T, C, 2H, 2W)
        return unfold_frames(self.conv(frames), x.shape[2])  # (B, Cout, T, 2H, 2W)


class CausalLevel(nn.Module):
    """ResBlocks at one resolution, then the level's down- or up-sampling (if any)."""

    def __init__(self, widths: Sequence[int], config: CausalAutoencoderConfig, resample: Optional[nn.Module],
                 name: str):
        super().__init__()
        self.res = nn.ModuleList([CausalResBlock(widths[j], widths[j + 1], config) for j in range(len(widths) - 1)])
        if name == "downsample":
            self.downsample = resample
        else:
            self.upsample = resample
        self._resample = name
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, x: Tensor, cache: Optional[CausalCache] = None) -> Tensor:
        ckpt = self.gradient_checkpointing and cache is None
        for block in self.res:
            x = checkpointed(block, x, cache, enabled=ckpt)  # (B, Cout, T, H, W)
        resample = getattr(self, self._resample)
        return x if resample is None else resample(x, cache)


class CausalEncoder3D(nn.Module):
    """Pixels ``(B, Cin, T, H, W)`` → moments ``(B, 2Cz, 1 + (T-1)/tf, H/f, W/f)`` (before quant_conv)."""

    def __init__(self, config: CausalAutoencoderConfig):
        super().__init__()
        widths = config.block_out_channels
        self.conv_in = CausalConv3d(config.in_channels, widths[0], (3, 3, 3))
        self.down = nn.ModuleList()
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            chain = [widths[max(i - 1, 0)]] + [width] * config.layers_per_block
            resample = None if last else CausalDownsample(width, bool(config.temporal_downsample[i]))
            self.down.append(CausalLevel(chain, config, resample, "downsample"))
        self.mid = CausalMidBlock(widths[-1], config)
        self.norm_out = _norm(widths[-1], config)
        self.conv_out = CausalConv3d(widths[-1], 2 * config.latent_channels, (3, 3, 3))

    def forward(self, x: Tensor, cache: Optional[CausalCache] = None) -> Tensor:
        h = self.conv_in(x, cache)  # (B, C0, T, H, W)
        for level in self.down:
            h = level(h, cache)  # (B, Ci, T_i, H/2^i, W/2^i)
        h = self.mid(h, cache)
        return self.conv_out(F.silu(self.norm_out(h)), cache)  # (B, 2Cz, T', h, w)


class CausalDecoder3D(nn.Module):
    """Latents ``(B, Cz, T', h, w)`` (after post_quant_conv) → pixels ``(B, Cout, 1 + tf·(T'-1), h·f, w·f)``."""

    def __init__(self, config: CausalAutoencoderConfig):
        super().__init__()
        widths = list(reversed(config.block_out_channels))
        temporal = list(reversed(config.temporal_downsample))
        self.conv_in = CausalConv3d(config.latent_channels, widths[0], (3, 3, 3))
        self.mid = CausalMidBlock(widths[0], config)
        self.up = nn.ModuleList()
        channels = widths[0]
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            chain = [channels] + [width] * (config.layers_per_block + 1)
            out = width // 2 if config.upsample_halves_channels else width
            resample = None if last else CausalUpsample(width, out, bool(temporal[i]))
            self.up.append(CausalLevel(chain, config, resample, "upsample"))
            channels = out
        self.norm_out = _norm(widths[-1], config)
        self.conv_out = CausalConv3d(widths[-1], config.out_channels, (3, 3, 3))

    def forward(self, z: Tensor, cache: Optional[CausalCache] = None) -> Tensor:
        h = self.mid(self.conv_in(z, cache), cache)  # (B, Clast, T', h, w)
        for level in self.up:
            h = level(h, cache)  # (B, Ci, T_i, h·2^i, w·2^i)
        return self.conv_out(F.silu(self.norm_out(h)), cache)  # (B, Cout, T, H, W)


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``length`` with at least ``overlap`` shared; the last tile
    is moved back so every tile is whole."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


def _ramp(size: int, ramp: int, left: bool, right: bool, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Blending weights along one tile side: linear ramps (k+1)/(ramp+1) where a neighbour overlaps, else 1."""
    w = torch.ones(size, device=device, dtype=dtype)
    ramp = min(ramp, size)
    if ramp:
        up = torch.arange(1, ramp + 1, device=device, dtype=dtype) / (ramp + 1)
        if left:
            w[:ramp] = torch.minimum(w[:ramp], up)
        if right:
            w[size - ramp:] = torch.minimum(w[size - ramp:], up.flip(0))
    return w


class CausalAutoencoder3D(LatentAutoencoder, nn.Module):
    """Causal 3-D KL autoencoder (see the module docstring): ``encode`` → :class:`DiagonalGaussian`, ``decode``.

    Clips are ``(B, C, T, H, W)`` with ``T = 1 + tf·k`` (trailing frames beyond that are dropped, as diffusers'
    Wan autoencoder does); an image ``(B, C, H, W)`` is a one-frame clip and gives 4-D latents / pixels.
    """

    _no_split_modules = ("CausalResBlock",)

    def __init__(self, config: Optional[CausalAutoencoderConfig] = None):
        super().__init__()
        self.config = config if config is not None else CausalAutoencoderConfig()
        cz = self.config.latent_channels
        self.encoder = CausalEncoder3D(self.config)
        self.decoder = CausalDecoder3D(self.config)
        self.quant_conv = CausalConv3d(2 * cz, 2 * cz, (1, 1, 1)) if self.config.use_quant_conv else None
        self.post_quant_conv = CausalConv3d(cz, cz, (1, 1, 1)) if self.config.use_post_quant_conv else None

    # --- interface ---------------------------------------------------------------------------------------------

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether every ResBlock and mid-block attention recompute their activations in backward (whole-clip
        passes only)."""
        return self.encoder.mid.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        for module in self.modules():
            if isinstance(module, (CausalMidBlock, CausalLevel)):
                module.gradient_checkpointing = bool(enabled)

    def latent_shape(self, height: int, width: int, num_frames: Optional[int] = None) -> tuple[int, ...]:
        """``(C, h, w)`` for an image, ``(C, 1 + (T-1)//tf, h, w)`` for a clip of ``num_frames`` = T frames."""
        c, h, w = latent_shape_for(self.latent_channels, height, width, None, self.spatial_factor)
        if num_frames is None:
            return (c, h, w)
        if num_frames < 1:
            raise ValueError(f"num_frames={num_frames}: must be >= 1")
        return (c, 1 + (num_frames - 1) // self.temporal_factor, h, w)

    def num_frames_decoded(self, latent_frames: int) -> int:
        """Pixel frames decoded from ``latent_frames`` latent frames: ``1 + tf·(T'-1)``."""
        return 1 + self.temporal_factor * (latent_frames - 1)

    # --- passes ------------------------------------------------------------------------------------------------

    def _latent_chunks(self, t_lat: int) -> Iterator[tuple[int, int]]:
        n = self.config.chunk_latent_frames or t_lat
        for start in range(0, t_lat, n):
            yield start, min(start + n, t_lat)

    def _pixel_range(self, start: int, stop: int) -> tuple[int, int]:
        """Pixel frames that encode to latent frames [start, stop)."""
        tf = self.temporal_factor
        return (0 if start == 0 else 1 + tf * (start - 1)), 1 + tf * (stop - 1)

    def _encode_untiled(self, x: Tensor) -> Tensor:
        t_lat = 1 + (x.shape[2] - 1) // self.temporal_factor
        f = self.spatial_factor
        out = None
        cache = None if not self.config.chunk_latent_frames else CausalCache()
        for start, stop in self._latent_chunks(t_lat):
            p0, p1 = self._pixel_range(start, stop)
            moments = self.encoder(x[:, :, p0:p1], cache)  # (B, 2Cz, stop-start, h, w)
            if self.quant_conv is not None:
                moments = self.quant_conv(moments)
            if out is None:
                if stop == t_lat:
                    return moments
                out = moments.new_empty(x.shape[0], moments.shape[1], t_lat, x.shape[3] // f, x.shape[4] // f)
            out[:, :, start:stop] = moments
        return out

    def _decode_untiled(self, z: Tensor) -> Tensor:
        t_lat = z.shape[2]
        f = self.spatial_factor
        out = None
        cache = None if not self.config.chunk_latent_frames else CausalCache()
        for start, stop in self._latent_chunks(t_lat):
            chunk = z[:, :, start:stop]
            if self.post_quant_conv is not None:
                chunk = self.post_quant_conv(chunk)
            pixels = self.decoder(chunk, cache)  # (B, Cout, frames of this chunk, H, W)
            if self.config.clamp_output:
                pixels = pixels.clamp(-1.0, 1.0)
            if out is None:
                if stop == t_lat:
                    return pixels
                out = pixels.new_empty(z.shape[0], pixels.shape[1], self.num_frames_decoded(t_lat),
                                       z.shape[3] * f, z.shape[4] * f)
            p0, p1 = self._pixel_range(start, stop)
            out[:, :, p0:p1] = pixels
        return out

    def _tiled(self, fn: Callable[[Tensor], Tensor], x: Tensor, tile_in: int, overlap_in: int, ratio: float) -> Tensor:
        """Run ``fn`` on overlapping spatial tiles of ``x`` and blend the outputs (side ratio ``ratio``)."""
        h, w = x.shape[-2:]
        rows, cols = _tile_starts(h, tile_in, overlap_in), _tile_starts(w, tile_in, overlap_in)
        ramp = int(round(overlap_in * ratio))
        out = weight = None
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                tile = fn(x[..., r:r + tile_in, c:c + tile_in])  # (B, C', T', th, tw)
                th, tw = tile.shape[-2:]
                if out is None:
                    out = tile.new_zeros(*tile.shape[:-2], int(h * ratio), int(w * ratio))
                    weight = tile.new_zeros(int(h * ratio), int(w * ratio))
                wy = _ramp(th, ramp, i > 0, i < len(rows) - 1, tile.device, tile.dtype)
                wx = _ramp(tw, ramp, j > 0, j < len(cols) - 1, tile.device, tile.dtype)
                wt = wy[:, None] * wx[None, :]  # (th, tw)
                r0, c0 = int(r * ratio), int(c * ratio)
                out[..., r0:r0 + th, c0:c0 + tw] += tile * wt
                weight[r0:r0 + th, c0:c0 + tw] += wt
        return out / weight

    def _encode_moments(self, x: Tensor) -> Tensor:
        f = self.spatial_factor
        size, overlap = self.config.tile_latent_size, self.config.tile_latent_overlap
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"encode: height×width {x.shape[-2]}×{x.shape[-1]} must be multiples of the spatial "
                             f"factor {f}")
        if size and max(x.shape[-2:]) > size * f:
            return self._tiled(self._encode_untiled, x, size * f, overlap * f, 1.0 / f)
        return self._encode_untiled(x)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Pixels ``(B, C, T, H, W)`` → posterior over ``(B, Cz, 1 + (T-1)//tf, H/f, W/f)``; an image
        ``(B, C, H, W)`` → posterior over ``(B, Cz, H/f, W/f)``. Chunked and tiled per the config."""
        if x.ndim == 4:
            return DiagonalGaussian(self._encode_moments(x[:, :, None])[:, :, 0])
        if x.ndim != 5:
            raise ValueError(f"encode takes (B, C, H, W) images or (B, C, T, H, W) clips; got shape {tuple(x.shape)}")
        return DiagonalGaussian(self._encode_moments(x))

    def decode(self, z: Tensor) -> Tensor:
        """Raw latents ``(B, Cz, T', h, w)`` → pixels ``(B, Cout, 1 + tf·(T'-1), h·f, w·f)``; image latents
        ``(B, Cz, h, w)`` → ``(B, Cout, H, W)``. Chunked and tiled per the config; clamped if ``clamp_output``."""
        if z.ndim == 4:
            return self.decode(z[:, :, None])[:, :, 0]
        if z.ndim != 5:
            raise ValueError(f"decode takes (B, C, h, w) or (B, C, T, h, w) latents; got shape {tuple(z.shape)}")
        size, overlap = self.config.tile_latent_size, self.config.tile_latent_overlap
        if size and max(z.shape[-2:]) > size:
            return self._tiled(self._decode_untiled, z, size, overlap, float(self.spatial_factor))
        return self._decode_untiled(z)


# =================================================================================================================
# (d) inflation of the image autoencoder
# =================================================================================================================


def causal_config_from_image(config: AutoencoderConfig, temporal_downsample: Optional[Sequence[bool]] = None,
                             **overrides) -> CausalAutoencoderConfig:
    """The causal 3-D config with the image autoencoder's topology (per-frame GroupNorm, width-keeping
    upsampling, no output clamp, the same latent scaling). ``temporal_downsample`` defaults to temporal ×2 at the
    last two downsamplings (×4 in time, Wan's choice) or at every one if there are fewer."""
    n_down = len(config.block_out_channels) - 1
    if temporal_downsample is None:
        temporal_downsample = [i >= n_down - 2 for i in range(n_down)]
    fields = dict(
        in_channels=config.in_channels, out_channels=config.out_channels, latent_channels=config.latent_channels,
        block_out_channels=list(config.block_out_channels), layers_per_block=config.layers_per_block,
        temporal_downsample=list(temporal_downsample), norm="group", norm_num_groups=config.norm_num_groups,
        norm_eps=config.norm_eps, upsample_halves_channels=False, mid_block_attention=config.mid_block_attention,
        use_quant_conv=config.use_quant_conv, use_post_quant_conv=config.use_post_quant_conv, clamp_output=False,
        scaling_factor=config.scaling_factor, shift_factor=config.shift_factor,
        attention_backend=config.attention_backend,
    )
    fields.update(overrides)
    return CausalAutoencoderConfig(**fields)


def inflate_state_dict(image_state: StateDict, config: CausalAutoencoderConfig) -> dict[str, Tensor]:
    """Our image :class:`AutoencoderKL` state dict → a :class:`CausalAutoencoder3D` state dict for ``config``.

    Every 2-D kernel ``(O, I, kh, kw)`` becomes a causal 3-D one with the 2-D kernel at the *last* (current-frame)
    tap and zeros at the past taps, so each frame is convolved exactly as the image model does; the temporal
    downsampling picks the newest frame of its window (identity at the last tap), and the temporal upsampling
    repeats each frame twice (identity at the last tap for both halves). At initialisation a one-frame clip
    therefore reconstructs exactly as the image autoencoder does, and so does every frame of a static clip.
    """
    with torch.device("meta"):
        target = {k: v.shape for k, v in CausalAutoencoder3D(config).state_dict().items()}
    out: dict[str, Tensor] = {}
    for name, shape in target.items():
        if ".time_conv." in name:
            continue
        if name not in image_state:
            raise ValueError(f"inflate_state_dict: the image autoencoder has no weight {name!r}; its config does not "
                             "match (build the video config with causal_config_from_image)")
        value = image_state[name]
        if len(shape) == 5 and value.ndim == 4:
            kernel = value.new_zeros(shape)
            kernel[:, :, -1] = value
            value = kernel
        if value.shape != shape:
            raise ValueError(f"inflate_state_dict: weight {name!r} has shape {tuple(value.shape)}, the video model "
                             f"expects {tuple(shape)}")
        out[name] = value.clone()
    unused = sorted(set(image_state) - set(out))
    if unused:
        raise ValueError(f"inflate_state_dict: image weights without a place in the video model: {unused[:8]}")
    like = next(iter(image_state.values()))
    for name, shape in target.items():
        if ".time_conv." not in name:
            continue
        value = torch.zeros(shape, dtype=like.dtype, device=like.device)
        if name.endswith("weight"):
            c_in = shape[1]
            eye = torch.eye(c_in, dtype=like.dtype, device=like.device)
            for half in range(shape[0] // c_in):  # 1 for downsampling, 2 for upsampling
                value[half * c_in:(half + 1) * c_in, :, -1, 0, 0] = eye
        out[name] = value
    return out


def inflate_autoencoder(image: AutoencoderKL, temporal_downsample: Optional[Sequence[bool]] = None,
                        **overrides) -> CausalAutoencoder3D:
    """A :class:`CausalAutoencoder3D` initialised from a trained image :class:`AutoencoderKL` (see
    :func:`inflate_state_dict`); ``overrides`` set other config fields (e.g. ``chunk_latent_frames``)."""
    config = causal_config_from_image(image.config, temporal_downsample, **overrides)
    model = CausalAutoencoder3D(config)
    model.load_state_dict(inflate_state_dict(image.state_dict(), config), strict=True)
    p = next(image.parameters())
    return model.to(device=p.device, dtype=p.dtype)


# =================================================================================================================
# weight converters (diffusers naming)
# =================================================================================================================

_SVD_EXTRA_RULES = (
    (r"spatial\.", "spatial_res_block."),
    (r"temporal\.", "temporal_res_block."),
    (r"mix_factor$", "time_mixer.mix_factor"),
)


def svd_diffusers_name(name: str) -> str:
    """Our :class:`TemporalDecoderAutoencoder` parameter name → diffusers' ``AutoencoderKLTemporalDecoder`` name."""
    from models.convert import _rewrite, _whole_segments, diffusers_name

    return _rewrite(diffusers_name(name), _whole_segments(_SVD_EXTRA_RULES))


def from_diffusers_svd_vae_state_dict(state: StateDict, config: TemporalAutoencoderConfig) -> dict[str, Tensor]:
    """A diffusers ``AutoencoderKLTemporalDecoder`` state dict → ours (load with ``strict=True``)."""
    from models.convert import _meta_shapes, _rename, current_vae_attention_names

    return _rename(current_vae_attention_names(state), _meta_shapes(lambda: TemporalDecoderAutoencoder(config)),
                   svd_diffusers_name, "diffusers SVD temporal-decoder autoencoder")


def to_diffusers_svd_vae_state_dict(state: StateDict) -> dict[str, Tensor]:
    """Our SVD autoencoder state dict → diffusers' names."""
    return {svd_diffusers_name(k): v for k, v in state.items()}


def wan_diffusers_name(name: str, config: CausalAutoencoderConfig) -> str:
    """Our :class:`CausalAutoencoder3D` parameter name → diffusers' ``AutoencoderKLWan`` name (Wan 2.1 layout).

    The encoder's levels are one flat list there (ResBlocks, then the level's resample); mid-block attention q/k/v
    are one ``to_qkv`` 1×1 conv (handled by the converter); norms are ``gamma``."""
    parts = name.split(".")
    if parts[0] == "encoder" and parts[1] == "down":
        level, rest = int(parts[2]), parts[3:]
        base = level * (config.layers_per_block + 1)
        index = base + int(rest[1]) if rest[0] == "res" else base + config.layers_per_block
        parts = ["encoder", "down_blocks", str(index)] + (rest[2:] if rest[0] == "res" else rest[1:])
    elif parts[0] == "decoder" and parts[1] == "up":
        rest = parts[3:]
        if rest[0] == "res":
            parts = ["decoder", "up_blocks", parts[2], "resnets"] + rest[1:]
        else:
            parts = ["decoder", "up_blocks", parts[2], "upsamplers", "0"] + rest[1:]
    elif parts[0] in ("encoder", "decoder") and parts[1] == "mid":
        rest = parts[2:]
        if rest[0] == "res":
            parts = [parts[0], "mid_block", "resnets"] + rest[1:]
        elif rest[0] == "attn_norm":
            parts = [parts[0], "mid_block", "attentions", "0", "norm"] + rest[1:]
        else:  # attn.to_q / to_k / to_v / to_out
            proj = {"to_out": "proj"}.get(rest[1], rest[1])
            parts = [parts[0], "mid_block", "attentions", "0", proj] + rest[2:]
    renamed = []
    for i, p in enumerate(parts):
        if p == "skip":
            p = "conv_shortcut"
        elif p == "conv" and i > 0 and parts[i - 1] in ("0",) and "upsamplers" in parts:
            p = "resample.1"
        elif p == "conv" and "down_blocks" in parts:
            p = "resample.1"
        renamed.append(p)
    out = ".".join(renamed)
    if config.norm == "rms" and out.endswith(".weight") and _is_norm_name(renamed[-2]):
        out = out[: -len("weight")] + "gamma"
    return out


def _is_norm_name(segment: str) -> bool:
    return segment in ("norm1", "norm2", "norm_out", "norm", "attn_norm")


def from_diffusers_wan_vae_state_dict(state: StateDict, config: CausalAutoencoderConfig) -> dict[str, Tensor]:
    """A diffusers ``AutoencoderKLWan`` (Wan 2.1, ``is_residual=False``) state dict → ours (``strict=True``).

    ``to_qkv`` is split into q, k, v (in that order along the output channels); norm ``gamma`` ``(C, 1, …)``
    becomes a ``(C,)`` weight; 1×1 convs become linear layers where ours are linear."""
    from models.convert import _fit

    if config.norm != "rms" or not config.upsample_halves_channels:
        raise ValueError("from_diffusers_wan_vae_state_dict: Wan 2.1 weights need norm='rms' and "
                         "upsample_halves_channels=True in the CausalAutoencoderConfig")
    split: dict[str, Tensor] = {}
    for k, v in state.items():
        if ".to_qkv." in k:
            for proj, part in zip(("to_q", "to_k", "to_v"), v.chunk(3, dim=0)):
                split[k.replace("to_qkv", proj)] = part
        else:
            split[k] = v
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CausalAutoencoder3D(config).state_dict().items()}
    inverse = {wan_diffusers_name(ours, config): ours for ours in shapes}
    if len(inverse) != len(shapes):
        raise AssertionError("wan_diffusers_name is not one-to-one")
    missing = sorted(f for f in inverse if f not in split)
    unexpected = sorted(k for k in split if k not in inverse)
    if missing or unexpected:
        raise ValueError(f"diffusers Wan autoencoder: the checkpoint does not match the config. Missing "
                         f"{len(missing)}: {missing[:8]}; unexpected {len(unexpected)}: {unexpected[:8]}. Check "
                         "block_out_channels, layers_per_block, temporal_downsample and latent_channels (Wan 2.2's "
                         "residual layout is not supported)")
    out = {}
    for k, v in split.items():
        ours = inverse[k]
        if _is_norm_name(ours.split(".")[-2]) and v.ndim > 1:
            v = v.reshape(-1)
        out[ours] = _fit(v, shapes[ours], k)
    return out


def to_diffusers_wan_vae_state_dict(state: StateDict, config: CausalAutoencoderConfig) -> dict[str, Tensor]:
    """Our causal autoencoder state dict (Wan 2.1 config) → diffusers' ``AutoencoderKLWan`` names and shapes."""
    with torch.device("meta"):
        reference = _wan_reference_shapes(config)
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        name = wan_diffusers_name(k, config)
        for proj in ("to_q", "to_k", "to_v"):
            if f".{proj}." in name:
                qkv = name.replace(proj, "to_qkv")
                out.setdefault(qkv, [None, None, None])[("to_q", "to_k", "to_v").index(proj)] = v
                break
        else:
            out[name] = v
    for k, v in list(out.items()):
        if isinstance(v, list):
            v = torch.cat(v, dim=0)
        out[k] = v.reshape(reference[k]) if k in reference else v
    return out


def _wan_reference_shapes(config: CausalAutoencoderConfig) -> dict[str, torch.Size]:
    """Shapes of the diffusers tensors that differ from ours only by trailing singleton dims."""
    shapes = {}
    model = CausalAutoencoder3D(config)
    for k, v in model.state_dict().items():
        name = wan_diffusers_name(k, config)
        if name.endswith(".gamma"):
            extra = (1, 1) if ".attentions." in name else (1, 1, 1)
            shapes[name] = torch.Size((v.shape[0],) + extra)
        elif ".to_q." in name or ".to_k." in name or ".to_v." in name:
            qkv = name.replace(".to_q.", ".to_qkv.").replace(".to_k.", ".to_qkv.").replace(".to_v.", ".to_qkv.")
            shapes[qkv] = torch.Size((3 * v.shape[0],) + tuple(v.shape[1:]) + ((1, 1) if v.ndim == 2 else ()))
        elif ".attentions.0.proj." in name and v.ndim == 2:
            shapes[name] = torch.Size(tuple(v.shape) + (1, 1))
    return shapes


# =================================================================================================================
# presets and registration
# =================================================================================================================

WAN21_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


def svd_vae_config() -> TemporalAutoencoderConfig:
    """Stable Video Diffusion's autoencoder (SD's encoder, temporal decoder; f=8, 4 latent channels)."""
    return TemporalAutoencoderConfig()


def tiny_svd_vae_config() -> TemporalAutoencoderConfig:
    """A small SVD-style autoencoder for tests (f=2, widths 32/64: diffusers' temporal decoder fixes 32 groups)."""
    return TemporalAutoencoderConfig(block_out_channels=[32, 64], layers_per_block=1)


def wan_vae_config() -> CausalAutoencoderConfig:
    """The Wan 2.1 video autoencoder (base width 96, 16 latent channels, 4× time, 8× space)."""
    return CausalAutoencoderConfig(latents_mean=list(WAN21_LATENTS_MEAN), latents_std=list(WAN21_LATENTS_STD))


def tiny_wan_vae_config() -> CausalAutoencoderConfig:
    """A small Wan-layout causal autoencoder for tests (8× space, 4× time, widths 8–32, 4 latent channels)."""
    return CausalAutoencoderConfig(latent_channels=4, block_out_channels=[8, 16, 32, 32], layers_per_block=1)


def tiny_causal_vae_config() -> CausalAutoencoderConfig:
    """The inflation target of ``tiny-vae`` (per-frame GroupNorm, f=4 in space, 4× in time) for the video
    quick-start: build it with :func:`inflate_autoencoder` from a trained ``tiny-vae``."""
    from models.autoencoder import tiny_vae_config

    return causal_config_from_image(tiny_vae_config())


VIDEO_AUTOENCODER_PRESETS: dict[str, Callable[[], object]] = {
    "svd-vae": svd_vae_config,
    "tiny-svd-vae": tiny_svd_vae_config,
    "wan-vae": wan_vae_config,
    "tiny-wan-vae": tiny_wan_vae_config,
    "tiny-causal-vae": tiny_causal_vae_config,
}


def _svd_from_diffusers(state: StateDict, config: TemporalAutoencoderConfig) -> dict[str, Tensor]:
    return from_diffusers_svd_vae_state_dict(state, config)


def _wan_from_diffusers(state: StateDict, config: CausalAutoencoderConfig) -> dict[str, Tensor]:
    return from_diffusers_wan_vae_state_dict(state, config)


register_architecture("autoencoder-kl-temporal", TemporalAutoencoderConfig, TemporalDecoderAutoencoder,
                      converters={"diffusers": _svd_from_diffusers}, role="autoencoder")
register_architecture("autoencoder-causal-3d", CausalAutoencoderConfig, CausalAutoencoder3D,
                      converters={"diffusers": _wan_from_diffusers}, role="autoencoder")
for _name, _builder in VIDEO_AUTOENCODER_PRESETS.items():
    register_preset(_name, _builder)

