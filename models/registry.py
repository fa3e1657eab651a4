"""The one registry of model architectures and named presets, and the one function that builds any of them.

Two tables, filled by the model modules themselves (this file knows none of them):

* *architectures*: a short name (``"dit"``, ``"unet"``, ``"autoencoder-kl"``) → :class:`Architecture`: its config
  dataclass, its ``nn.Module`` class (built as ``module_cls(config)``), the converters that rename published weights
  (diffusers, the original LDM files) into our naming, and — read from the module class's ``_no_split_modules`` —
  the class names of its repeated blocks (what FSDP2 shards one by one and activation checkpointing wraps);
* *presets*: a name (``"DiT-XL/2"``, ``"sd15-unet"``, ``"tiny-vae"``) → a zero-argument function returning a fresh
  config of a registered architecture.

A model module registers itself at its bottom, so adding a video U-Net or a DiT variant touches that one file::

    # at the bottom of models/my_video_unet.py
    from models.registry import register_architecture, register_preset

    register_architecture("video-unet", VideoUNetConfig, VideoUNet, converters={"diffusers": from_diffusers})
    register_preset("tiny-video-unet", lambda: VideoUNetConfig(...))

Every module of the ``models`` package that calls :func:`register_architecture` or :func:`register_preset` is found and
imported the first time a name is looked up (:func:`provider_modules`: nothing to list by hand). Names are matched
case-insensitively. :func:`resolve` turns a name (architecture or preset) into ``(architecture, fresh config)``;
:func:`build_model` builds a module from a name or a config (on ``device="meta"`` to allocate nothing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

ConfigBuilder = Callable[[], Any]
# (foreign state dict, our config) -> state dict in our naming; raises KeyError/ValueError when it does not apply
Converter = Callable[[Mapping[str, torch.Tensor], Any], dict[str, torch.Tensor]]

ROLES: tuple[str, ...] = ("denoiser", "autoencoder", "text_encoder")


@dataclass(frozen=True)
class Architecture:
    """One registered architecture: how to build it, how to read foreign weights into it, what its blocks are."""

    name: str  # registry name, e.g. "dit"
    config_cls: type  # its config dataclass
    module_cls: type  # nn.Module class, built as module_cls(config)
    converters: Mapping[str, Converter] = field(default_factory=dict)  # weight naming -> converter into ours
    role: str = "denoiser"  # what a pipeline uses it as: denoiser | autoencoder | text_encoder

    @property
    def block_names(self) -> tuple[str, ...]:
        """Class names of the repeated blocks (the module class's ``_no_split_modules``; empty when it names none)."""
        return tuple(getattr(self.module_cls, "_no_split_modules", None) or ())

    def default_config(self) -> Any:
        """A fresh config with the config class's defaults."""
        return self.config_cls()


_ARCHITECTURES: dict[str, Architecture] = {}  # lower-cased name -> architecture
_PRESETS: dict[str, tuple[str, ConfigBuilder]] = {}  # lower-cased name -> (display name, builder)
_providers_loaded = False


def register_architecture(
    name: str,
    config_cls: type,
    module_cls: type,
    converters: Optional[Mapping[str, Converter]] = None,
    *,
    role: str = "denoiser",
    overwrite: bool = False,
) -> Architecture:
    """Register ``module_cls`` (built as ``module_cls(config)``) with its config dataclass under ``name``.

    ``converters`` maps a weight naming (``"diffusers"``, ``"ldm"``) to a function ``(state_dict, config) -> state
    dict in our naming``, tried in order by :func:`training.weights.load_weights`. ``role`` says what a pipeline may
    use it as (``denoiser``, ``autoencoder``, ``text_encoder``). A name or config class already
    taken by another architecture raises unless ``overwrite`` (re-registering the same classes is a no-op, e.g. a
    module imported twice).
    """
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"register_architecture({name!r}): config class {config_cls!r} is not a dataclass")
    if not (isinstance(module_cls, type) and issubclass(module_cls, nn.Module)):
        raise TypeError(f"register_architecture({name!r}): {module_cls!r} is not an nn.Module class")
    if role not in ROLES:
        raise ValueError(f"register_architecture({name!r}): role={role!r}; choose one of {', '.join(ROLES)}")
    arch = Architecture(name, config_cls, module_cls, dict(converters or {}), role)
    key = name.lower()

    def same(a: type, b: type) -> bool:  # the same class, possibly from a module imported twice
        return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)

    taken = [k for k, a in _ARCHITECTURES.items() if k == key or same(a.config_cls, config_cls)]
    for k in taken:
        other = _ARCHITECTURES[k]
        if not overwrite and not (k == key and same(other.config_cls, config_cls)
                                  and same(other.module_cls, module_cls)):
            raise ValueError(
                f"architecture {name!r} ({config_cls.__name__}) clashes with the registered {other.name!r} "
                f"({other.config_cls.__name__} → {other.module_cls.__name__}); pass overwrite=True to replace it"
            )
        del _ARCHITECTURES[k]
    _ARCHITECTURES[key] = arch
    return arch


def register_preset(name: str, builder: Optional[ConfigBuilder] = None, *, overwrite: bool = False) -> Any:
    """Register ``builder`` (zero-argument, returns a new config of a registered architecture) under ``name``.

    Usable as a call, ``register_preset("sd-vae", lambda: AutoencoderConfig(...))``, or as a decorator,
    ``@register_preset("sd-vae")``. Registering a taken name raises unless ``overwrite`` (or it is the same
    builder again, e.g. a module imported twice). A preset may not shadow an architecture name.
    """
    if builder is None:
        def decorator(fn: ConfigBuilder) -> ConfigBuilder:
            register_preset(name, fn, overwrite=overwrite)
            return fn

        return decorator
    key = name.lower()
    if key in _ARCHITECTURES:
        raise ValueError(f"model preset {name!r}: the name is taken by an architecture")
    if key in _PRESETS and not overwrite and _PRESETS[key][1] is not builder:
        existing = _PRESETS[key][1]
        same_source = getattr(existing, "__qualname__", None) == getattr(builder, "__qualname__", None) and (
            getattr(existing, "__module__", None) == getattr(builder, "__module__", None)
        )
        if not same_source:
            raise ValueError(f"model preset {name!r} is already registered; pass overwrite=True to replace it")
    _PRESETS[key] = (name, builder)
    return builder


def provider_modules() -> list[str]:
    """The modules of the ``models`` package whose source registers an architecture or a preset (read as text, so
    nothing is imported to find them), sorted by name."""
    import pkgutil
    from pathlib import Path

    package = Path(__file__).resolve().parent
    found = []
    for info in pkgutil.iter_modules([str(package)]):
        source = package / f"{info.name}.py"
        if info.name != "registry" and source.is_file():
            text = source.read_text(encoding="utf-8")
            if "register_architecture(" in text or "register_preset(" in text:
                found.append(f"{__name__.rsplit('.', 1)[0]}.{info.name}")
    return sorted(found)


def _load_providers() -> None:
    """Import every provider module once, so that its module-level registrations have run."""
    global _providers_loaded
    if _providers_loaded:
        return
    _providers_loaded = True  # set first: a provider importing this module must not recurse
    try:
        for module in provider_modules():
            importlib.import_module(module)
    except Exception:
        _providers_loaded = False
        raise


# ------------------------------------------------------------------------------------------------ look-ups


def list_architectures(role: Optional[str] = None) -> list[str]:
    """Every registered architecture name (of ``role`` only, when given), sorted."""
    _load_providers()
    return sorted(a.name for a in _ARCHITECTURES.values() if role is None or a.role == role)


def list_presets() -> list[str]:
    """Every registered preset name, sorted."""
    _load_providers()
    return sorted(display for display, _ in _PRESETS.values())


def get_architecture(name_or_config: Union[str, Any]) -> Architecture:
    """The architecture registered under a name (case-insensitive), of a config dataclass, of a module, or of
    their classes; a ``KeyError`` listing the registered names when there is none."""
    _load_providers()
    if isinstance(name_or_config, str):
        arch = _ARCHITECTURES.get(name_or_config.lower())
        if arch is None:
            raise KeyError(f"unknown architecture {name_or_config!r}; registered: {', '.join(list_architectures())}")
        return arch
    cls = name_or_config if isinstance(name_or_config, type) else type(name_or_config)
    for arch in _ARCHITECTURES.values():
        if cls is arch.config_cls or cls is arch.module_cls:
            return arch
    raise KeyError(f"no architecture is registered for {cls.__name__}; registered: {', '.join(list_architectures())}")


def find_architecture(obj: Any) -> Optional[Architecture]:
    """Like :func:`get_architecture` for a config or module (or their classes), but None when none is registered."""
    try:
        return get_architecture(obj)
    except KeyError:
        return None


def get_preset(name: str, **overrides: Any) -> Any:
    """A fresh config for preset ``name`` (case-insensitive), with ``overrides`` applied (validated again)."""
    _load_providers()
    key = name.lower()
    if key not in _PRESETS:
        raise KeyError(f"unknown model preset {name!r}; registered presets: {', '.join(list_presets())}")
    config = _PRESETS[key][1]()
    return dataclasses.replace(config, **overrides) if overrides else config


def resolve(name: str) -> tuple[Architecture, Any]:
    """``(architecture, fresh config)`` for an architecture name (its config's defaults) or a preset name."""
    _load_providers()
    key = name.lower()
    if key in _ARCHITECTURES:
        arch = _ARCHITECTURES[key]
        return arch, arch.default_config()
    if key in _PRESETS:
        config = _PRESETS[key][1]()
        return get_architecture(config), config
    raise KeyError(
        f"unknown model {name!r}: neither an architecture ({', '.join(list_architectures())}) nor a preset "
        f"({', '.join(list_presets())})"
    )


def build_model(
    name_or_config: Union[str, Any],
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    **overrides: Any,
) -> nn.Module:
    """Build the model for an architecture or preset name, or a config dataclass.

    ``device="meta"`` builds without allocating (parameter counts, FLOPs). ``overrides`` replace config fields,
    e.g. ``build_model("DiT-XL/2-text", context_dim=4096)``.
    """
    if isinstance(name_or_config, str):
        arch, config = resolve(name_or_config)
    else:
        arch, config = get_architecture(name_or_config), name_or_config
    if overrides:
        config = dataclasses.replace(config, **overrides)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = arch.module_cls(config)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model
