"""The KL-regularised convolutional autoencoder of Latent Diffusion (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", Sec. 3.1 and App. G).

Pixels in [-1, 1] ``(B, 3, H, W)`` are encoded into a diagonal Gaussian over latents ``(B, C, H/f, W/f)``
(f = 2 ** (levels - 1): 8 for Stable Diffusion, C = 4; SD3/Flux-style autoencoders use C = 16 and drop the 1×1
``quant_conv``/``post_quant_conv``). The diffusion model sees *normalised* latents ``(z - shift) * scale``; the
two numbers are properties of a trained autoencoder and live in :class:`AutoencoderConfig`
(:meth:`AutoencoderKL.latents_from_pixels` / :meth:`AutoencoderKL.pixels_from_latents`).

Video: every method accepts ``(B, C, T, H, W)`` as well. Frames are folded into the batch and go through the very
same image code one by one (there is no temporal mixing in this autoencoder), then unfolded again, so a clip's
latents are ``(B, C_latent, T, H/f, W/f)`` and equal the per-frame latents: the spatial factor is f, the temporal
factor 1. Callers take the latent shape of a request from :meth:`AutoencoderKL.latent_shape` (and, for a
pixel-space model without an autoencoder, from :func:`latent_shape_for` with factors 1), never from a square guess.

Registered as the architecture ``"autoencoder-kl"`` (:mod:`models.registry`) with the diffusers and LDM weight
namings of :mod:`models.convert`; its repeated blocks (``_no_split_modules``) are the ResBlocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import BACKENDS, Attention
from models.blocks import Downsample, ResBlock, Upsample, fold_frames, group_norm, unfold_frames
from models.registry import register_architecture, register_preset
from models.utils import checkpointed

# The posterior's log-variance is clamped to this range (as in the LDM code) so exp() stays finite.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass
class AutoencoderConfig:
    """Architecture and latent normalisation of :class:`AutoencoderKL`."""

    in_channels: int = 3  # image channels fed to the encoder
    out_channels: int = 3  # image channels produced by the decoder
    latent_channels: int = 4  # channels of the latent z (4: SD 1.x/2.x/XL, 16: SD3/Flux)
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])  # width per level
    layers_per_block: int = 2  # ResBlocks per encoder level (the decoder has one more per level)
    norm_num_groups: int = 32  # GroupNorm groups everywhere
    norm_eps: float = 1e-6  # GroupNorm epsilon everywhere
    mid_block_attention: bool = True  # self-attention between the two mid-block ResBlocks
    use_quant_conv: bool = True  # 1×1 conv on the posterior moments (SD 1.x/2.x/XL have it, SD3/Flux do not)
    use_post_quant_conv: bool = True  # 1×1 conv on z before the decoder
    scaling_factor: float = 0.18215  # latents seen by the denoiser are (z - shift_factor) * scaling_factor
    shift_factor: float = 0.0  # see scaling_factor (0 for SD 1.x/2.x/XL)
    gradient_checkpointing: bool = False  # recompute ResBlock/attention activations in backward
    attention_backend: str = "sdpa"  # backend of the mid-block attention: sdpa | xformers | math

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"AutoencoderConfig.{name}={getattr(self, name)}; it must be >= 1")
        if not self.block_out_channels:
            raise ValueError("AutoencoderConfig.block_out_channels=[]; give at least one level width")
        for c in self.block_out_channels:
            if c < 1 or c % self.norm_num_groups:
                raise ValueError(
                    f"AutoencoderConfig.block_out_channels={self.block_out_channels}: every width must be a positive "
                    f"multiple of norm_num_groups={self.norm_num_groups}"
                )
        if not self.scaling_factor > 0:
            raise ValueError(f"AutoencoderConfig.scaling_factor={self.scaling_factor}; it must be > 0")
        if self.norm_eps <= 0:
            raise ValueError(f"AutoencoderConfig.norm_eps={self.norm_eps}; it must be > 0")
        if self.attention_backend not in BACKENDS:
            raise ValueError(
                f"AutoencoderConfig.attention_backend={self.attention_backend!r}; choose one of {list(BACKENDS)}"
            )

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side: 2 ** (number of levels - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along height and width (the same as :attr:`downsample_factor`)."""
        return self.downsample_factor

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame: 1, every frame is encoded on its own."""
        return 1


def latent_shape_for(
    channels: int,
    height: int,
    width: int,
    num_frames: Optional[int] = None,
    spatial_factor: int = 1,
    temporal_factor: int = 1,
) -> Union[tuple[int, int, int], tuple[int, int, int, int]]:
    """One sample's latent shape: ``(C, H/s, W/s)`` for an image (``num_frames`` None), ``(C, T/t, H/s, W/s)`` for a
    clip of ``num_frames`` frames. With the default factors it is the pixel-space shape (no autoencoder).

    Sizes that the factors do not divide are refused (the decoder could not give them back)."""
    for what, size, factor in (("height", height, spatial_factor), ("width", width, spatial_factor),
                               ("num_frames", num_frames, temporal_factor)):
        if size is None:
            continue
        if size < 1 or size % factor:
            raise ValueError(f"{what}={size}: must be a positive multiple of the autoencoder's "
                             f"{'temporal' if what == 'num_frames' else 'spatial'} factor {factor}")
    hw = (height // spatial_factor, width // spatial_factor)
    if num_frames is None:
        return (channels, *hw)
    return (channels, num_frames // temporal_factor, *hw)


class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, diag(exp(logvar))) (Kingma & Welling 2014).

    ``parameters`` ``(B, 2C, ...)`` holds the mean in its first C channels and the log-variance in the last C;
    the log-variance is clamped to [``LOGVAR_MIN``, ``LOGVAR_MAX``]. Works for images and videos alike.
    """

    def __init__(self, parameters: Tensor):
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)  # (B, C, ...) each
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None, noise: Optional[Tensor] = None) -> Tensor:
        """``mean + std * eps``; eps is ``noise`` if given, else standard normal drawn from ``generator``.

        The noise is drawn on the generator's device (CPU generators are allowed for CUDA tensors) and then
        moved, so a seeded CPU generator gives the same sample on every device.
        """
        if noise is None:
            device = generator.device if generator is not None else self.mean.device
            noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        elif noise.shape != self.mean.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from the posterior's {tuple(self.mean.shape)}")
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> Tensor:
        """The posterior mean (its mode)."""
        return self.mean

    def kl(self, other: Optional["DiagonalGaussian"] = None) -> Tensor:
        """KL(self ‖ other) per sample ``(B,)``, summed over every other axis; ``other=None`` means N(0, I)."""
        dims = tuple(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=dims,
        )


class MidBlock(nn.Module):
    """ResBlock → single-head self-attention over all positions → ResBlock, at the lowest resolution.

    The attention (a non-local block, Wang et al. 2018) normalises with GroupNorm, attends with one head whose
    width is the channel count (as SD), and adds its input back.
    """

    def __init__(self, channels: int, config: AutoencoderConfig):
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.res = nn.ModuleList([ResBlock(channels, channels, None, groups, eps) for _ in range(2)])
        self.attn_norm = group_norm(channels, groups, eps) if config.mid_block_attention else None
        self.attn = (
            Attention(channels, heads=1, head_dim=channels, qkv_bias=True, backend=config.attention_backend)
            if config.mid_block_attention
            else None
        )
        self.gradient_checkpointing = config.gradient_checkpointing

    def _attend(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.attn_norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        out = self.attn(tokens).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + out

    def forward(self, x: Tensor) -> Tensor:
        x = checkpointed(self.res[0], x, enabled=self.gradient_checkpointing)  # (B, C, H, W)
        if self.attn is not None:
            x = checkpointed(self._attend, x, enabled=self.gradient_checkpointing)  # (B, C, H, W)
        return checkpointed(self.res[1], x, enabled=self.gradient_checkpointing)  # (B, C, H, W)


class EncoderLevel(nn.Module):
    """``layers_per_block`` ResBlocks at one resolution, then (except at the last level) a stride-2 conv."""

    def __init__(self, in_channels: int, out_channels: int, config: AutoencoderConfig, downsample: bool):
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.res = nn.ModuleList(
            [
                ResBlock(in_channels if j == 0 else out_channels, out_channels, None, groups, eps)
                for j in range(config.layers_per_block)
            ]
        )
        self.downsample = Downsample(out_channels, padding="asymmetric") if downsample else None
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, x: Tensor) -> Tensor:
        for block in self.res:
            x = checkpointed(block, x, enabled=self.gradient_checkpointing)  # (B, Cout, H, W)
        return self.downsample(x) if self.downsample is not None else x  # (B, Cout, H/2, W/2)


class DecoderLevel(nn.Module):
    """``layers_per_block + 1`` ResBlocks at one resolution, then (except at the last level) a ×2 upsampling."""

    def __init__(self, in_channels: int, out_channels: int, config: AutoencoderConfig, upsample: bool):
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.res = nn.ModuleList(
            [
                ResBlock(in_channels if j == 0 else out_channels, out_channels, None, groups, eps)
                for j in range(config.layers_per_block + 1)
            ]
        )
        self.upsample = Upsample(out_channels) if upsample else None
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, x: Tensor) -> Tensor:
        for block in self.res:
            x = checkpointed(block, x, enabled=self.gradient_checkpointing)  # (B, Cout, H, W)
        return self.upsample(x) if self.upsample is not None else x  # (B, Cout, 2H, 2W)


class Encoder(nn.Module):
    """Pixels ``(B, Cin, H, W)`` → posterior moments ``(B, 2*latent_channels, H/f, W/f)`` (before quant_conv)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths = config.block_out_channels
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], kernel_size=3, padding=1)
        self.down = nn.ModuleList(
            [
                EncoderLevel(widths[max(i - 1, 0)], widths[i], config, downsample=i < len(widths) - 1)
                for i in range(len(widths))
            ]
        )
        self.mid = MidBlock(widths[-1], config)
        self.norm_out = group_norm(widths[-1], config.norm_num_groups, config.norm_eps)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, C0, H, W)
        for level in self.down:
            h = level(h)  # (B, Ci, H/2^i, W/2^i)
        h = self.mid(h)  # (B, Clast, H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2*Cz, H/f, W/f)


class Decoder(nn.Module):
    """Latents ``(B, latent_channels, h, w)`` (after post_quant_conv) → pixels ``(B, Cout, h*f, w*f)``."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths = list(reversed(config.block_out_channels))
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], kernel_size=3, padding=1)
        self.mid = MidBlock(widths[0], config)
        self.up = nn.ModuleList(
            [
                DecoderLevel(widths[max(i - 1, 0)], widths[i], config, upsample=i < len(widths) - 1)
                for i in range(len(widths))
            ]
        )
        self.norm_out = group_norm(widths[-1], config.norm_num_groups, config.norm_eps)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # (B, Clast, h, w)
        for level in self.up:
            h = level(h)  # (B, Ci, h*2^i, w*2^i)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, Cout, h*f, w*f)


class LatentAutoencoder:
    """What every autoencoder of the project offers the stages, on top of its ``encode`` / ``decode`` and its
    config (``latent_channels``, ``spatial_factor``, ``temporal_factor``, ``scaling_factor``, ``shift_factor`` and,
    when the config has them, per-channel ``latents_mean`` / ``latents_std``: normalised latents are
    ``(z - mean) / std · scaling_factor``, else ``(z - shift_factor) · scaling_factor``). Subclasses give
    ``latent_shape``."""

    config: Any
    encode: Callable[..., "DiagonalGaussian"]
    decode: Callable[[Tensor], Tensor]

    @property
    def latent_channels(self) -> int:
        """Channels of the latent z."""
        return self.config.latent_channels

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along height and width."""
        return self.config.spatial_factor

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame (1: frame by frame)."""
        return self.config.temporal_factor

    def forward(self, x: Tensor, sample_posterior: bool = True, generator: Optional[torch.Generator] = None
                ) -> tuple[Tensor, "DiagonalGaussian"]:
        """Reconstruct ``x``; returns ``(reconstruction, posterior)`` (the posterior carries the KL term)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def _shift_scale(self, z: Tensor) -> tuple[Tensor | float, Tensor | float]:
        cfg = self.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is None:
            return cfg.shift_factor, cfg.scaling_factor
        view = (1, -1) + (1,) * (z.ndim - 2)
        mean_t = torch.tensor(mean, dtype=z.dtype, device=z.device).view(view)
        std_t = torch.tensor(std, dtype=z.dtype, device=z.device).view(view)
        return mean_t, cfg.scaling_factor / std_t

    def scale_latents(self, z: Tensor) -> Tensor:
        """Raw latents → the denoiser's normalised latents (see the class docstring)."""
        shift, scale = self._shift_scale(z)
        return (z - shift) * scale

    def unscale_latents(self, latents: Tensor) -> Tensor:
        """Inverse of :meth:`scale_latents`."""
        shift, scale = self._shift_scale(latents)
        return latents / scale + shift

    def latents_from_pixels(
        self, x: Tensor, sample: bool = True, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """Pixels in [-1, 1] → normalised latents for the diffusion model (a posterior sample, or its mean)."""
        posterior = self.encode(x)
        return self.scale_latents(posterior.sample(generator) if sample else posterior.mode())

    def pixels_from_latents(self, latents: Tensor) -> Tensor:
        """Normalised latents from the diffusion model → pixels (roughly in [-1, 1]; not clamped)."""
        return self.decode(self.unscale_latents(latents))


class AutoencoderKL(LatentAutoencoder, nn.Module):
    """KL autoencoder (Rombach et al. 2022): ``encode`` → :class:`DiagonalGaussian`, ``decode`` → pixels.

    Images are ``(B, C, H, W)`` in [-1, 1]; videos ``(B, C, T, H, W)`` are folded into the batch and handled
    frame by frame through the same code (see the module docstring).
    """

    _no_split_modules = ("ResBlock",)  # its repeated blocks: FSDP2 units, activation-checkpointing units

    def __init__(self, config: Optional[AutoencoderConfig] = None):
        super().__init__()
        self.config = config if config is not None else AutoencoderConfig()
        cz = self.config.latent_channels
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quant_conv = nn.Conv2d(2 * cz, 2 * cz, kernel_size=1) if self.config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(cz, cz, kernel_size=1) if self.config.use_post_quant_conv else None

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether every ResBlock and the mid-block attention recompute their activations in backward."""
        return self.encoder.mid.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        for module in self.modules():
            if isinstance(module, (MidBlock, EncoderLevel, DecoderLevel)):
                module.gradient_checkpointing = bool(enabled)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def latent_shape(self, height: int, width: int, num_frames: Optional[int] = None) -> tuple[int, ...]:
        """One sample's latent shape for ``height`` × ``width`` pixels: ``(C, h, w)`` for an image (``num_frames``
        None), ``(C, T', h, w)`` for a clip of ``num_frames`` frames (see :func:`latent_shape_for`)."""
        return latent_shape_for(self.latent_channels, height, width, num_frames, self.spatial_factor,
                                self.temporal_factor)

    def _encode_images(self, x: Tensor) -> Tensor:
        moments = self.encoder(x)  # (B, 2*Cz, h, w)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def _decode_images(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)  # (B, Cz, h, w)
        return self.decoder(z)  # (B, Cout, H, W)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Pixels ``(B, C, H, W)`` or ``(B, C, T, H, W)`` → posterior over ``(B, Cz, [T,] H/f, W/f)``."""
        if x.ndim == 5:
            moments = unfold_frames(self._encode_images(fold_frames(x)), x.shape[2])  # (B, 2*Cz, T, h, w)
        elif x.ndim == 4:
            moments = self._encode_images(x)  # (B, 2*Cz, h, w)
        else:
            raise ValueError(f"encode takes (B, C, H, W) images or (B, C, T, H, W) clips of pixels; got shape "
                             f"{tuple(x.shape)} ({x.ndim}-D)")
        return DiagonalGaussian(moments)

    def decode(self, z: Tensor) -> Tensor:
        """Raw (un-normalised) latents ``(B, Cz, h, w)`` or ``(B, Cz, T, h, w)`` → pixels."""
        if z.ndim == 5:
            return unfold_frames(self._decode_images(fold_frames(z)), z.shape[2])  # (B, Cout, T, H, W)
        if z.ndim == 4:
            return self._decode_images(z)  # (B, Cout, H, W)
        raise ValueError(f"decode takes (B, C, h, w) image or (B, C, T, h, w) clip latents; got shape "
                         f"{tuple(z.shape)} ({z.ndim}-D)")


# --- presets (configs only; build with AutoencoderKL(cfg), on torch.device("meta") to allocate nothing) ------------


def sd_vae_config() -> AutoencoderConfig:
    """Stable Diffusion 1.x/2.x autoencoder (f=8, 4 latent channels, 83,653,863 parameters)."""
    return AutoencoderConfig()


def sdxl_vae_config() -> AutoencoderConfig:
    """SDXL autoencoder: SD's architecture, retrained, with its own scaling factor (Podell et al. 2023)."""
    return AutoencoderConfig(scaling_factor=0.13025)


def sd3_vae_config() -> AutoencoderConfig:
    """SD3-style autoencoder: 16 latent channels, no quant convs, latent shift (Esser et al. 2024)."""
    return AutoencoderConfig(
        latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609
    )


def flux_vae_config() -> AutoencoderConfig:
    """FLUX.1-style autoencoder: the SD3 layout with FLUX's latent scale and shift."""
    return AutoencoderConfig(
        latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159
    )


def tiny_vae_config() -> AutoencoderConfig:
    """A few-hundred-kilobyte f=4 autoencoder for tests and the CPU quick-start (32×32 pixels → 8×8 latents)."""
    return AutoencoderConfig(block_out_channels=[32, 64, 64], layers_per_block=1, norm_num_groups=8)


AUTOENCODER_PRESETS: dict[str, Callable[[], AutoencoderConfig]] = {
    "sd-vae": sd_vae_config,
    "sdxl-vae": sdxl_vae_config,
    "sd3-vae": sd3_vae_config,
    "flux-vae": flux_vae_config,
    "tiny-vae": tiny_vae_config,
}


def _from_diffusers(state: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    from models.convert import from_diffusers_vae_state_dict  # lazily: models.convert imports this module

    return from_diffusers_vae_state_dict(state, config)


def _from_ldm(state: dict[str, Tensor], config: AutoencoderConfig) -> dict[str, Tensor]:
    from models.convert import from_ldm_vae_state_dict

    return from_ldm_vae_state_dict(state, config)


register_architecture("autoencoder-kl", AutoencoderConfig, AutoencoderKL,
                      converters={"diffusers": _from_diffusers, "ldm": _from_ldm}, role="autoencoder")
for _name, _builder in AUTOENCODER_PRESETS.items():
    register_preset(_name, _builder)
