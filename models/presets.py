"""A small registry of named model configurations and the one function that builds any of them.

Two tables: *presets* (name → zero-argument function returning a fresh config dataclass) and *model types*
(config class → ``nn.Module`` class taking that config). :func:`build_model` resolves a name or a config through
both. Any module can add entries without this file knowing it::

    # at the bottom of models/unet.py
    from models.presets import register_model_type, register_preset

    register_model_type(UNetConfig, UNet)
    register_preset("sd15-unet", lambda: UNetConfig(...))

and list itself in :data:`PROVIDER_MODULES` (already done for ``models.unet`` and ``models.autoencoder``), which are
imported lazily the first time a preset is looked up. Names are matched case-insensitively.

This module holds the DiT presets: the paper's S/B/L/XL × patch 2/4/8 class-conditional models (Peebles & Xie
2023, Table 1; ImageNet 256 px → 32×32×4 latents, 1000 classes, learned sigma), text-conditioned variants
``DiT-XL/2-text`` etc. (PixArt-α style: cross-attention, caption MLP, adaLN-single; ``context_dim`` 1024 = the
OpenCLIP ViT-H/14 text width, override it, e.g. 4096 for T5-XXL), and tiny ones for tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from models.dit import DiT, DiTConfig

ConfigBuilder = Callable[[], Any]

# Modules imported (if they exist) before a lookup so that their module-level registrations have run.
PROVIDER_MODULES: tuple[str, ...] = ("models.unet", "models.autoencoder")

_PRESETS: dict[str, tuple[str, ConfigBuilder]] = {}  # lower-cased name -> (display name, builder)
_MODEL_TYPES: dict[type, Callable[[Any], nn.Module]] = {}
_providers_loaded = False


def register_model_type(config_cls: type, model_cls: Callable[[Any], nn.Module]) -> None:
    """Declare that configs of type ``config_cls`` are built by ``model_cls(config)``."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"register_model_type: {config_cls!r} is not a dataclass")
    _MODEL_TYPES[config_cls] = model_cls


def register_preset(
    name: str, builder: Optional[ConfigBuilder] = None, *, overwrite: bool = False
) -> Any:
    """Register ``builder`` (zero-argument, returns a new config dataclass) under ``name``.

    Usable as a call, ``register_preset("sd-vae", lambda: AutoencoderConfig(...))``, or as a decorator,
    ``@register_preset("sd-vae")``. Registering a taken name raises unless ``overwrite`` (or it is the same
    builder again, e.g. a module imported twice).
    """
    if builder is None:
        def decorator(fn: ConfigBuilder) -> ConfigBuilder:
            register_preset(name, fn, overwrite=overwrite)
            return fn

        return decorator
    key = name.lower()
    if key in _PRESETS and not overwrite and _PRESETS[key][1] is not builder:
        existing = _PRESETS[key][1]
        same_source = getattr(existing, "__qualname__", None) == getattr(builder, "__qualname__", None) and (
            getattr(existing, "__module__", None) == getattr(builder, "__module__", None)
        )
        if not same_source:
            raise ValueError(f"model preset {name!r} is already registered; pass overwrite=True to replace it")
    _PRESETS[key] = (name, builder)
    return builder


def _load_providers() -> None:
    global _providers_loaded
    if _providers_loaded:
        return
    for module in PROVIDER_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # the module exists but one of its imports is missing: a real error
                raise
    _providers_loaded = True


def list_presets() -> list[str]:
    """Every registered preset name, sorted."""
    _load_providers()
    return sorted(display for display, _ in _PRESETS.values())


def get_preset(name: str, **overrides: Any) -> Any:
    """A fresh config for preset ``name`` (case-insensitive), with ``overrides`` applied (validated again)."""
    _load_providers()
    key = name.lower()
    if key not in _PRESETS:
        raise KeyError(f"unknown model preset {name!r}; registered presets: {', '.join(list_presets())}")
    config = _PRESETS[key][1]()
    return dataclasses.replace(config, **overrides) if overrides else config


def build_model(
    name_or_config: Union[str, Any],
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    **overrides: Any,
) -> nn.Module:
    """Build the model for a preset name or a config dataclass.

    ``device="meta"`` builds without allocating (parameter counts, FLOPs). ``overrides`` replace config fields,
    e.g. ``build_model("DiT-XL/2-text", context_dim=4096)``.
    """
    if isinstance(name_or_config, str):
        config = get_preset(name_or_config, **overrides)
    else:
        config = dataclasses.replace(name_or_config, **overrides) if overrides else name_or_config
    _load_providers()
    model_cls = _MODEL_TYPES.get(type(config))
    if model_cls is None:
        known = ", ".join(sorted(cls.__name__ for cls in _MODEL_TYPES))
        raise TypeError(f"no model type is registered for {type(config).__name__}; known config types: {known}")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = model_cls(config)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model


# --------------------------------------------------------------------------------------------------------------
# DiT presets
# --------------------------------------------------------------------------------------------------------------

register_model_type(DiTConfig, DiT)

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
