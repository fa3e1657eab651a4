"""Frozen OpenCLIP vision tower (Radford et al. 2021; Cherti et al. 2023) giving the ``image_embeds`` of
image-to-video conditioning.

Stable Video Diffusion (Blattmann et al. 2023) conditions its U-Net on the conditioning frame through two paths:
the noise-augmented frame latent concatenated to the input channels
(:func:`models.conditioning.first_frame_conditioning`) and the frame's OpenCLIP ViT-H/14 image embedding as the
cross-attention context (one token). This module is the second path: :meth:`ImageEncoder.encode` maps frames in
[-1, 1] to ``(B, N, D)`` tokens for :attr:`models.conditioning.Conditioning.image_embeds`.

Only open_clip's vision tower is kept (a ``VisionTransformer``: patch embedding, class token, transformer,
``ln_post``, ``proj``); the text tower is never built. Weights come from one of:

(a) an open_clip model name and pretrained tag (``ViT-H-14`` / ``laion2b_s32b_b79k``, SVD's image encoder),
    downloaded by open_clip; where the machine cannot download, :class:`ImageEncoderLoadError` says so;
(b) a local checkpoint (``.safetensors``, or an open_clip ``.pt``/``.bin`` read with ``weights_only=True``): a full
    open_clip CLIP state dict (``visual.*`` keys, optionally ``module.``-prefixed or under ``state_dict``, as
    open_clip's training writes them), a bare vision-tower state dict, or one written by
    :meth:`ImageEncoder.save_checkpoint`; only the vision weights are read;
(c) random initialisation from a model config: an open_clip model name, a JSON file in open_clip's model-config
    format (``{"embed_dim", "vision_cfg", ["quick_gelu"], ["preprocess_cfg"]}``), or a config bundled in
    ``models/configs/`` such as ``openclip-tiny-vision`` (for tests).

Preprocessing (:meth:`ImageEncoder.preprocess`) follows SVD's ``FrozenOpenCLIPImageEmbedder``: resize the [-1, 1]
frame to the tower's input size (bicubic with ``align_corners=True`` after a Gaussian anti-aliasing blur,
``resize="antialias"``; diffusers' SVD pipeline does the same), map to [0, 1], then normalise with the CLIP mean and
std. What :meth:`ImageEncoder.encode` returns:

* ``output="pooled"`` (SVD): the pooled, projected embedding, i.e. open_clip's ``encode_image`` without
  normalisation, as one token: ``(B, 1, embed_dim)``;
* ``output="tokens"``: the patch tokens after ``ln_post`` (open_clip's ``output_tokens``), unprojected:
  ``(B, grid_h * grid_w, width)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor, nn

from models.openclip_towers import DTYPES, OpenClipTower, TowerLoadError, read_weights_file, resolve_openclip_config

logger = logging.getLogger(__name__)

VISION_PREFIX = "visual."  # the vision tower's key prefix in an open_clip CLIP / CustomTextCLIP state dict
OUTPUTS: tuple[str, ...] = ("pooled", "tokens")
RESIZES: tuple[str, ...] = ("antialias", "bicubic", "none")


class ImageEncoderLoadError(TowerLoadError):
    """Image-encoder weights could not be obtained (no network, missing file, incompatible checkpoint)."""


@dataclass
class ImageEncoderConfig:
    """Which OpenCLIP vision tower to build, how frames are prepared for it and what to read out of it."""

    model: str = "ViT-H-14"
    """open_clip model name, a JSON model-config path, or the stem of a config in ``models/configs/``."""
    pretrained: Optional[str] = None
    """open_clip pretrained tag to download (SVD: ``laion2b_s32b_b79k``); exclusive with ``checkpoint``."""
    checkpoint: Optional[str] = None
    """Local weights file (``.safetensors``, ``.pt``, ``.bin``); exclusive with ``pretrained``."""
    output: Literal["pooled", "tokens"] = "pooled"
    """``pooled``: the projected embedding as one token (SVD); ``tokens``: the ``ln_post`` patch tokens."""
    resize: Literal["antialias", "bicubic", "none"] = "antialias"
    """To the tower's size: ``antialias`` (SVD: Gaussian blur, bicubic, align_corners), ``bicubic`` (torch's
    anti-aliased bicubic), ``none`` (frames must already have the tower's size)."""
    mean: Optional[tuple[float, float, float]] = None
    """Per-channel normalisation mean in [0, 1] pixels (None: the pretrained tag's / model config's, else CLIP's)."""
    std: Optional[tuple[float, float, float]] = None
    """Per-channel normalisation std (None: as ``mean``)."""
    freeze: bool = True
    """Freeze the weights (requires_grad False) and keep the module in eval mode."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Parameter dtype after loading."""
    cache_dir: Optional[str] = None
    """Where open_clip caches downloads (None: its default)."""

    def __post_init__(self) -> None:
        if self.pretrained is not None and self.checkpoint is not None:
            raise ValueError(
                f"ImageEncoderConfig: pretrained={self.pretrained!r} and checkpoint={self.checkpoint!r} are both "
                "set; give one source of weights"
            )
        if self.output not in OUTPUTS:
            raise ValueError(f"ImageEncoderConfig.output={self.output!r}: choose one of {list(OUTPUTS)}")
        if self.resize not in RESIZES:
            raise ValueError(f"ImageEncoderConfig.resize={self.resize!r}: choose one of {list(RESIZES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"ImageEncoderConfig.dtype={self.dtype!r}: choose one of {list(DTYPES)}")
        if not self.model:
            raise ValueError("ImageEncoderConfig.model is empty: give an open_clip model name or a JSON config path")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in value)
                if len(value) != 3 or (name == "std" and min(value) <= 0):
                    raise ValueError(f"ImageEncoderConfig.{name}={value!r}: expected three numbers (std > 0)")
                setattr(self, name, value)


# --------------------------------------------------------------------------------------------------------------
# Configs and weights
# --------------------------------------------------------------------------------------------------------------


def resolve_vision_config(model: str) -> tuple[dict[str, Any], bool]:
    """open_clip-format model config for ``model`` and whether it is an open_clip built-in name."""
    config, builtin = resolve_openclip_config(model, "image-encoder")
    if "vision_cfg" not in config or "embed_dim" not in config:
        raise ValueError(f"image-encoder model config {model!r} has no 'vision_cfg' and 'embed_dim' (keys: "
                         f"{sorted(config)})")
    return config, builtin


def build_vision_tower(model_config: dict[str, Any]) -> nn.Module:
    """open_clip's ``VisionTransformer`` for an open_clip model config (vision part only, random init)."""
    vision_cfg = dict(model_config["vision_cfg"])
    if vision_cfg.get("timm_model_name"):
        raise ValueError(
            f"timm vision towers ({vision_cfg['timm_model_name']!r}) are not supported; use an open_clip ViT "
            "(e.g. ViT-H-14, SVD's image encoder)"
        )
    if isinstance(vision_cfg.get("layers"), (list, tuple)):
        raise ValueError("ResNet vision towers (vision_cfg.layers is a list) are not supported; use an open_clip ViT")
    if vision_cfg.get("attentional_pool"):
        raise ValueError("vision towers with attentional pooling (CoCa) are not supported")
    # open_clip's own vision-tower builder: the same module open_clip.create_model would put in a CLIP.
    from open_clip.model import _build_vision_tower

    return _build_vision_tower(
        model_config["embed_dim"], vision_cfg, quick_gelu=bool(model_config.get("quick_gelu", False))
    )


def load_weights_file(path: Union[str, Path]) -> dict[str, Tensor]:
    """Read a weights file: safetensors, or a torch pickle with ``weights_only=True`` (no code is run)."""
    return read_weights_file(path, "image-encoder", ImageEncoderLoadError)


def extract_vision_weights(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The vision tower's weights, keyed as in open_clip's ``VisionTransformer``, from a CLIP / CustomTextCLIP /
    :meth:`ImageEncoder.save_checkpoint` state dict (``visual.*``) or a bare vision-tower state dict."""
    if any(k.startswith(VISION_PREFIX) for k in state):
        return {k[len(VISION_PREFIX):]: v for k, v in state.items() if k.startswith(VISION_PREFIX)}
    return dict(state)


def _resolve_normalisation(config: ImageEncoderConfig, model_config: dict[str, Any]) -> tuple[tuple, tuple]:
    """(mean, std): the config's, else the pretrained tag's, else the model config's ``preprocess_cfg``, else CLIP's."""
    sources: list[dict[str, Any]] = []
    if config.pretrained is not None:
        sources.append(open_clip.get_pretrained_cfg(config.model, config.pretrained) or {})
    sources.append(model_config.get("preprocess_cfg") or {})
    found_mean, found_std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    for source in reversed(sources):  # the earliest source wins
        found_mean = tuple(source.get("mean") or found_mean)
        found_std = tuple(source.get("std") or found_std)
    mean = config.mean if config.mean is not None else found_mean
    std = config.std if config.std is not None else found_std
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# --------------------------------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------------------------------


def _gaussian_kernel1d(size: int, sigma: float) -> Tensor:
    """Normalised 1-D Gaussian taps on ``size`` points centred on the middle one (float64)."""
    x = torch.arange(size, dtype=torch.float64) - size // 2
    if size % 2 == 0:
        x = x + 0.5
    taps = torch.exp(-x.pow(2) / (2.0 * sigma**2))
    return taps / taps.sum()


def antialias_resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize ``(B, C, H, W)`` to ``size`` as SVD does (kornia's ``resize(..., antialias=True)``).

    A separable Gaussian blur with ``sigma = max((factor - 1) / 2, 0.001)`` per axis (``factor`` = input / output
    size) and an odd kernel of ``max(4 sigma, 3)`` taps, with reflect padding, then bicubic interpolation with
    ``align_corners=True``. Upsampling blurs by nothing (sigma 0.001).
    """
    height, width = images.shape[-2:]
    if (height, width) == tuple(size):
        return images
    x = images
    for axis, (old, new) in enumerate(((height, size[0]), (width, size[1]))):
        sigma = max((old / new - 1.0) / 2.0, 0.001)
        taps = int(max(2.0 * 2 * sigma, 3))
        taps += 1 - taps % 2  # odd
        kernel = _gaussian_kernel1d(taps, sigma).to(device=x.device, dtype=x.dtype)  # (k,)
        channels = x.shape[1]
        if axis == 0:  # along H
            weight = kernel.reshape(1, 1, taps, 1).expand(channels, 1, taps, 1)
            pad = (0, 0, (taps - 1) // 2, taps - 1 - (taps - 1) // 2)
        else:  # along W
            weight = kernel.reshape(1, 1, 1, taps).expand(channels, 1, 1, taps)
            pad = ((taps - 1) // 2, taps - 1 - (taps - 1) // 2, 0, 0)
        x = F.conv2d(F.pad(x, pad, mode="reflect"), weight, groups=channels)  # (B, C, H, W)
    return F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=True)  # (B, C, h, w)


# --------------------------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------------------------


class ImageEncoder(OpenClipTower):
    """OpenCLIP vision tower; ``encode(images in [-1, 1]) -> (B, N, D)`` image tokens (frozen by default)."""

    config_cls = ImageEncoderConfig
    load_error = ImageEncoderLoadError
    what, tower_name, tower_attr = "image-encoder", "vision tower", "visual"

    def __init__(self, config: ImageEncoderConfig):
        super().__init__()
        self.config = config
        model_config, builtin = resolve_vision_config(config.model)
        model_config = self.pretrained_model_config(model_config, builtin)
        self.visual = self.build_tower(build_vision_tower, model_config, extract_vision_weights)
        self.visual.output_tokens = config.output == "tokens"  # open_clip then returns (pooled, tokens)

        self.image_size: tuple[int, int] = tuple(int(s) for s in self.visual.image_size)  # (H, W) the tower takes
        mean, std = _resolve_normalisation(config, model_config)
        self.register_buffer("pixel_mean", torch.tensor(mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).reshape(1, 3, 1, 1), persistent=False)
        self.freeze_as_configured()

    # ---- state ------------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def embed_dim(self) -> int:
        """``D`` of :meth:`encode`: the projection's width (``pooled``) or the transformer's (``tokens``)."""
        if self.config.output == "tokens" or self.visual.proj is None:
            return int(self.visual.transformer.width)
        return int(self.visual.proj.shape[1])

    @property
    def num_tokens(self) -> int:
        """``N`` of :meth:`encode`: 1 (``pooled``) or the number of patches (``tokens``)."""
        if self.config.output == "pooled":
            return 1
        grid_h, grid_w = self.visual.grid_size
        return int(grid_h * grid_w)

    # ---- encoding ---------------------------------------------------------------------------------------------

    def preprocess(self, images: Tensor) -> Tensor:
        """Frames ``(B, 3, H, W)`` in [-1, 1] → the tower's normalised input ``(B, 3, h, w)`` (float32)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: got shape {tuple(images.shape)}; expected RGB frames (B, 3, H, W) in [-1, 1]")
        x = images.to(device=self.device, dtype=torch.float32)
        if tuple(x.shape[-2:]) != self.image_size:
            if self.config.resize == "antialias":
                x = antialias_resize(x, self.image_size)  # (B, 3, h, w)
            elif self.config.resize == "bicubic":
                x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
            else:
                raise ValueError(
                    f"images are {tuple(x.shape[-2:])} but the vision tower takes {self.image_size} and "
                    "ImageEncoderConfig.resize='none'"
                )
        x = (x + 1.0) / 2.0  # [0, 1]
        return (x - self.pixel_mean.float()) / self.pixel_std.float()  # (B, 3, h, w)

    def encode(self, images: Tensor) -> Tensor:
        """Frames ``(B, 3, H, W)`` in [-1, 1] → image tokens ``(B, N, D)`` (see :attr:`num_tokens`,
        :attr:`embed_dim`) on this module's device and dtype."""
        x = self.preprocess(images).to(self.dtype)  # (B, 3, h, w)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.visual(x)
            if self.config.output == "tokens":
                return out[1]  # (B, grid_h * grid_w, width)
            return out[:, None, :]  # (B, 1, embed_dim)

    def forward(self, images: Tensor) -> Tensor:
        return self.encode(images)

    def null_embeds(self, batch_size: int) -> Tensor:
        """Zeros ``(B, N, D)``: the image embedding of the unconditional branch (SVD drops the image by zeroing it,
        as :func:`models.conditioning.nulled` does for the ``image`` group)."""
        return torch.zeros(batch_size, self.num_tokens, self.embed_dim, device=self.device, dtype=self.dtype)

