"""Loading weights into our modules from safetensors files in our naming, diffusers' or the original layouts.

``path`` is a weights file, or a diffusers model folder (``diffusion_pytorch_model.safetensors``, possibly sharded
with its ``.index.json``), or a diffusers pipeline folder, whose model subfolder is chosen by the module's role
(``unet`` or ``transformer`` for a denoiser, ``vae`` for an autoencoder). Only safetensors (or
``torch.load(weights_only=True)`` for ``.pt``/``.bin``/``.ckpt``) are read: nothing loaded can run code. A file
that matches none of the known namings fails with the first missing and unexpected names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch import Tensor, nn

from training.errors import read_safetensors, torch_load_tensors

# a diffusers pipeline folder's model subfolders, by the role of the module that loads them
PIPELINE_SUBFOLDERS = {"denoiser": ("unet", "transformer"), "autoencoder": ("vae",), "text_encoder": ("text_encoder",)}
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def model_folder(path: Path, role: str | None = None) -> Path:
    """The diffusers model folder ``path`` is, or holds as the subfolder for ``role`` (a pipeline folder)."""
    if (path / DIFFUSERS_WEIGHTS).is_file() or (path / f"{DIFFUSERS_WEIGHTS}.index.json").is_file():
        return path
    for sub in PIPELINE_SUBFOLDERS.get(role or "", ()):
        if (path / sub).is_dir():
            return model_folder(path / sub)
    raise FileNotFoundError(
        f"weights folder {path}: no {DIFFUSERS_WEIGHTS} (or its sharded .index.json) there"
        + (f", nor a {' or '.join(PIPELINE_SUBFOLDERS[role])} subfolder" if role in PIPELINE_SUBFOLDERS else ""))


def read_state_dict(path: str | Path, role: str | None = None) -> dict[str, Tensor]:
    """The tensors of a weights file or diffusers folder (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        folder = model_folder(path, role)
        index = folder / f"{DIFFUSERS_WEIGHTS}.index.json"
        if not index.is_file():
            return read_safetensors(folder / DIFFUSERS_WEIGHTS)
        import json

        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(read_safetensors(folder / shard))
        return state
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    state = torch_load_tensors(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path}: expected a mapping of tensors, got {type(state).__name__}")
    return state


def _converters(module: nn.Module) -> list[tuple[str, Callable[[dict], dict]]]:
    """The foreign namings the module's registered architecture knows (:mod:`models.registry`), each as a
    function of the state dict; none for a module of no registered architecture."""
    from models.registry import find_architecture

    arch = find_architecture(module)
    if arch is None:
        return []
    config = getattr(module, "config", None)
    return [(naming, lambda sd, fn=fn: fn(sd, config)) for naming, fn in arch.converters.items()]


def load_weights(module: nn.Module, path: str | Path) -> str:
    """Load ``path`` into ``module`` strictly; returns the naming it matched: ``ours``, or one of the namings its
    registered architecture converts from (``diffusers``, ``ldm``, ...)."""
    from models.registry import find_architecture

    arch = find_architecture(module)
    state = read_state_dict(path, arch.role if arch is not None else None)
    own = set(module.state_dict())
    if set(state) == own:
        module.load_state_dict(state, strict=True)
        return "ours"
    errors = []
    for naming, convert in _converters(module):
        try:
            converted = convert(state)
        except (KeyError, ValueError, RuntimeError) as e:
            errors.append(f"{naming}: {e}")
            continue
        if set(converted) == own:
            module.load_state_dict(converted, strict=True)
            return naming
        errors.append(f"{naming}: names still differ after conversion")
    missing = sorted(own - set(state))[:3]
    unexpected = sorted(set(state) - own)[:3]
    raise ValueError(
        f"weights file {path}: its parameter names match none of the known namings for this "
        f"{type(module).__name__} (missing e.g. {missing}, unexpected e.g. {unexpected}; "
        f"{'; '.join(errors) or 'no converter'})"
    )
