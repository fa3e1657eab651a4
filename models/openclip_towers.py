"""What the OpenCLIP text encoder (:mod:`models.text_encoder`) and image encoder (:mod:`models.image_encoder`)
share: finding an open_clip model config, reading weights files without running code, downloading a pretrained
tag (or saying clearly why not), building a tower on the meta device and loading its weights strictly, the three
constructors, freezing, and saving.

A tower wrapper subclasses :class:`OpenClipTower`, names its config class, its load error, what it is called in
messages and the attribute that holds the open_clip tower, and supplies the function that builds that tower from an
open_clip model config and the one that picks its weights out of a CLIP state dict.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Union

import open_clip
import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # bundled open_clip-format model configs (tiny ones)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TowerLoadError(RuntimeError):
    """Tower weights could not be obtained (no network, missing file, incompatible checkpoint)."""


def resolve_openclip_config(model: str, what: str) -> tuple[dict[str, Any], bool]:
    """open_clip-format model config for ``model`` (a JSON path, a config in ``models/configs/`` or an open_clip
    model name) and whether it is an open_clip built-in name; ``what`` names the encoder in errors."""
    path = Path(model)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"{what} model config {model!r} does not exist")
        return json.loads(path.read_text()), False
    bundled = CONFIG_DIR / f"{model}.json"
    if bundled.is_file():
        return json.loads(bundled.read_text()), False
    config = open_clip.get_model_config(model)
    if config is None:
        local = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ValueError(
            f"unknown {what} model {model!r}: not a JSON file, not in models/configs ({local}) and not an "
            "open_clip model (open_clip.list_models())"
        )
    return config, True


def read_weights_file(path: Union[str, Path], what: str, error: type = TowerLoadError) -> dict[str, Tensor]:
    """Read a weights file: safetensors, or a torch pickle with ``weights_only=True`` (no code is run); open_clip's
    training checkpoints (``state_dict``) and DDP prefixes (``module.``) are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a TorchScript archive (OpenAI's original files) or arbitrary pickles
            raise error(
                f"could not read {str(path)!r} as a weights-only torch checkpoint ({type(err).__name__}: {err}); "
                "convert it to safetensors or an open_clip state dict"
            ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise error(f"{str(path)!r} does not hold a state dict (got {type(state).__name__})")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


class OpenClipTower(nn.Module):
    """Base of the frozen OpenCLIP tower wrappers (see the module docstring)."""

    config_cls: type  # the wrapper's config dataclass (model, pretrained, checkpoint, freeze, dtype, cache_dir)
    load_error: type = TowerLoadError  # raised when weights cannot be obtained
    what: str = "encoder"  # how messages name it ("text-encoder", "image-encoder")
    tower_name: str = "tower"  # how messages name the open_clip module ("text tower", "vision tower")
    tower_attr: str = "tower"  # the attribute holding the open_clip module (its state-dict prefix)
    _no_split_modules = ("ResidualAttentionBlock",)  # open_clip's transformer blocks (FSDP2 / checkpointing units)

    # ---- construction -----------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model: str, pretrained: str, **kwargs: Any) -> Any:
        """(a) open_clip model name + pretrained tag (downloads; fails clearly where it cannot)."""
        return cls(cls.config_cls(model=model, pretrained=pretrained, **kwargs))

    @classmethod
    def from_checkpoint(cls, checkpoint: Union[str, Path], model: str, **kwargs: Any) -> Any:
        """(b) local weights file for architecture ``model`` (open_clip name, JSON config or bundled stem)."""
        return cls(cls.config_cls(model=model, checkpoint=str(checkpoint), **kwargs))

    @classmethod
    def from_config(cls, model: str, **kwargs: Any) -> Any:
        """(c) random initialisation of architecture ``model``."""
        return cls(cls.config_cls(model=model, **kwargs))

    def pretrained_model_config(self, model_config: dict[str, Any], builtin: bool) -> dict[str, Any]:
        """``model_config`` as the pretrained tag needs it (OpenAI's weights were trained with QuickGELU); a
        pretrained tag on a local config is refused."""
        config = self.config
        if config.pretrained is None:
            return model_config
        if not builtin:
            raise ValueError(
                f"{type(config).__name__}.pretrained={config.pretrained!r} needs an open_clip model name, but "
                f"model={config.model!r} is a local config; use checkpoint= for local weights"
            )
        model_config = dict(model_config)
        if open_clip.get_pretrained_cfg(config.model, config.pretrained).get("quick_gelu"):
            model_config["quick_gelu"] = True
        return model_config

    def build_tower(self, build: Callable[[dict[str, Any]], nn.Module], model_config: dict[str, Any],
                    extract: Callable[[dict[str, Tensor]], dict[str, Tensor]]) -> nn.Module:
        """The open_clip tower: random initialisation, or built on the meta device and loaded from the configured
        checkpoint / pretrained tag (``extract`` picks its weights out of the file); in the configured dtype."""
        config = self.config
        weights = self._find_weights(extract)
        if weights is None:
            logger.info("%s %s: random initialisation (no pretrained tag or checkpoint)", self.what, config.model)
            tower = build(model_config)
        else:
            with torch.device("meta"):  # no random init of weights that are about to be replaced
                tower = build(model_config)
            self._load_tower_weights(tower, weights, source=config.pretrained or config.checkpoint or "")
            self.after_load(tower)
        return tower.to(DTYPES[config.dtype])

    def after_load(self, tower: nn.Module) -> None:
        """Called once the tower's weights are loaded into it (built on the meta device), before the dtype cast:
        rebuild what is not in the weights (non-persistent buffers)."""

    def _find_weights(self, extract: Callable[[dict[str, Tensor]], dict[str, Tensor]]
                      ) -> Optional[dict[str, Tensor]]:
        config = self.config
        if config.checkpoint is not None:
            return extract(read_weights_file(config.checkpoint, self.what, self.load_error))
        if config.pretrained is None:
            return None
        pcfg = open_clip.get_pretrained_cfg(config.model, config.pretrained)
        if not pcfg:
            tags = open_clip.list_pretrained_tags_by_model(config.model)
            raise ValueError(
                f"open_clip has no pretrained weights {config.pretrained!r} for {config.model!r}; known tags: {tags}"
            )
        try:
            path = open_clip.download_pretrained(pcfg, cache_dir=config.cache_dir)
        except Exception as err:
            raise self.load_error(
                f"could not download open_clip weights {config.model}/{config.pretrained} "
                f"({type(err).__name__}: {err}). This machine may have no network access: fetch the checkpoint "
                "elsewhere and set checkpoint=PATH (and keep model=) instead of pretrained= (HF_HUB_OFFLINE=1 makes "
                "this fail at once instead of after the download retries)"
            ) from err
        if not path:
            raise self.load_error(f"open_clip returned no file for {config.model}/{config.pretrained}")
        return extract(read_weights_file(path, self.what, self.load_error))

    def _load_tower_weights(self, tower: nn.Module, weights: dict[str, Tensor], source: str) -> None:
        expected = set(tower.state_dict().keys())
        missing = sorted(expected - weights.keys())
        unexpected = sorted(weights.keys() - expected)
        if missing or unexpected:
            raise self.load_error(
                f"{source!r} does not match {self.tower_name} {self.config.model!r}: missing {missing[:8]}"
                f"{'…' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{'…' if len(unexpected) > 8 else ''}"
            )
        try:
            tower.load_state_dict(weights, strict=True, assign=True)
        except RuntimeError as err:  # shape mismatches
            raise self.load_error(f"{source!r} does not fit {self.tower_name} {self.config.model!r}: {err}") from err

    def freeze_as_configured(self) -> None:
        """Freeze the weights and stay in eval mode when the config says so."""
        self.frozen = self.config.freeze
        if self.frozen:
            self.requires_grad_(False)
            self.eval()

    # ---- state ------------------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> Any:
        """A frozen encoder stays in eval mode whatever the trainer asks."""
        return super().train(mode and not getattr(self, "frozen", False))

    def save_checkpoint(self, path: Union[str, Path]) -> None:
        """Write the tower to ``path`` as safetensors (keys ``<tower_attr>.*``, open_clip's names; loadable with
        ``checkpoint=``)."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata={"model": self.config.model})
