"""The ``autoencoder`` stage: train the KL autoencoder of Latent Diffusion (Rombach et al. 2022, sec. 3 and app. G),
for images or, with a video architecture, for clips.

Architectures (``architecture``, any registered autoencoder of :mod:`models.registry` or one of its presets):

* ``autoencoder-kl`` — the image autoencoder (:class:`models.autoencoder.AutoencoderKL`); on clips it works frame by
  frame;
* ``autoencoder-kl-temporal`` — Stable Video Diffusion's autoencoder (Blattmann et al. 2023, "Stable Video
  Diffusion", Sec. 4 / App. D; :class:`models.video_autoencoder.TemporalDecoderAutoencoder`): the image encoder
  frame by frame and a decoder with temporal layers;
* ``autoencoder-causal-3d`` — a causal 3-D autoencoder (Wan 2.1 layout; :class:`~models.video_autoencoder.
  CausalAutoencoder3D`), ``1 + (T-1)/r`` latent frames for ``T`` frames.

``inflate_from`` starts a video architecture from an exported image autoencoder: the causal 3-D one by
:func:`models.video_autoencoder.inflate_autoencoder` (one-frame and static clips reconstruct exactly as the image
autoencoder does), the temporal-decoder one by :func:`inflate_temporal_decoder` (every clip decodes exactly as the
image autoencoder decodes its frames one by one, see there). ``train_encoder: false`` trains the decoder only, as
SVD fine-tunes its autoencoder: the encoder's weights (and so cached latents and an image diffusion model's latent
space) stay as they are, and no optimizer state is kept for them.

Loss per sample (an image, or a clip ``(C, T, H, W)``: images are the one-frame, T-less case of the same code),
summed over pixels (and frames) and averaged over the batch as in LDM: reconstruction (L1 or L2) plus
``kl_weight`` × KL(q(z|x) ‖ N(0, I)) summed over latent elements (LDM: 1e-6, so the latent stays close to the image
while its scale stays bounded). A perceptual (LPIPS) term, taken per frame, needs its pretrained weights, which
cannot be fetched here: it is loaded from a local file (:mod:`training.perceptual`), and asking for it without one
is a config error, not a silent no-op.

The export (``model.safetensors`` + ``model.json``) records the architecture in ``model.json`` (``"architecture"``)
so :func:`load_exported_autoencoder` (and :func:`training.builders.load_autoencoder`) rebuild the right class; an
export without the field (older runs) is an ``autoencoder-kl``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from models.blocks import fold_frames
from models.registry import Architecture, build_model, get_architecture, resolve
from training.config_io import ConfigError, _convert, architecture_config, from_dict, to_dict, with_overrides
from training.evaluation import psnr, save_grid, temporal_flicker
from training.perceptual import LPIPS
from training.stages.base import Stage
from training.trainer import TrainConfig
from training.weights import load_weights

IMAGE_AUTOENCODER = "autoencoder-kl"  # the architecture of an export whose model.json names none (older runs)
ENCODER_PREFIXES = ("encoder.", "quant_conv.")  # parameters of the encoder side (frozen by train_encoder: false)


@dataclass
class AutoencoderStageConfig:
    """Train (or load) the KL autoencoder, for images or clips."""

    # a registered autoencoder architecture (autoencoder-kl | autoencoder-kl-temporal | autoencoder-causal-3d) or a
    # preset of one (tiny-vae, sd-vae, tiny-causal-vae, tiny-svd-vae, ...)
    architecture: str = IMAGE_AUTOENCODER
    # its config fields over the architecture's defaults (or the preset's, or with inflate_from the config derived
    # from the image autoencoder): flat (model.block_out_channels: [...]) or, as the diffusion stage's model, one
    # section per architecture name (model.autoencoder-causal-3d.chunk_latent_frames: 0; the section `architecture`
    # names is used, every section is checked against its own config class); in Python also the typed config
    model: Any = field(default_factory=dict)
    weights: Optional[str] = None  # start from these weights (.safetensors, our names or diffusers'); null: random
    # an exported image autoencoder (model.safetensors, model.json beside) a video architecture starts from: the
    # causal 3-D one inflated (inflate_autoencoder), the temporal-decoder one with the image encoder and decoder
    # copied and its temporal layers silent (see inflate_temporal_decoder); exclusive with `weights`
    inflate_from: Optional[str] = None
    train_encoder: bool = True  # false: the decoder alone trains (SVD): encoder weights and latent space unchanged
    reconstruction: Literal["l1", "l2"] = "l1"  # pixel reconstruction loss (LDM: l1)
    kl_weight: float = 1e-6  # weight of the KL term (LDM: 1e-6)
    perceptual_weight: float = 0.0  # LPIPS weight (LDM: 1.0); needs lpips_weights (pretrained, not downloadable here)
    lpips_weights: Optional[str] = None  # LPIPS .safetensors (training/perceptual.py converts the published files)
    batch_size: Optional[int] = None  # per-rank batch size for this stage (null: data.batch_size)
    train: TrainConfig = field(default_factory=TrainConfig)  # steps, optimizer, EMA, checkpoints
    validation_images: int = 16  # validation images (or clips) reconstructed for PSNR and the grid (contact sheet)
    # at export set scaling_factor so the normalised latents have std 1 (LDM's scale-by-std); skipped when the
    # encoder is frozen (train_encoder: false): the latent space, scale included, stays the one it came with
    fit_scaling_factor: bool = True

    def __post_init__(self) -> None:
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight: {self.kl_weight} must be >= 0")
        if self.perceptual_weight < 0:
            raise ValueError(f"perceptual_weight: {self.perceptual_weight} must be >= 0")
        if self.perceptual_weight > 0 and not self.lpips_weights:
            raise ValueError(
                f"perceptual_weight: {self.perceptual_weight} needs lpips_weights (a local LPIPS weights file); "
                "pretrained LPIPS weights cannot be downloaded at run time. Set perceptual_weight=0 or give the file"
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size: {self.batch_size} must be >= 1 or null")
        if self.validation_images < 1:
            raise ValueError(f"validation_images: {self.validation_images} must be >= 1")
        if self.inflate_from and self.weights:
            raise ValueError(f"inflate_from: {self.inflate_from!r} and weights={self.weights!r}: give one (inflation "
                             "starts a video autoencoder from image weights; weights continue one of its architecture)")
        arch, base = _resolve_autoencoder(self.architecture, "architecture")
        self._arch = arch
        overrides = self._model_sections()
        if self.inflate_from:
            if arch.name == IMAGE_AUTOENCODER:
                raise ValueError(f"inflate_from: {self.inflate_from!r} inflates an image autoencoder into a video one, "
                                 f"but architecture is {self.architecture!r}; choose autoencoder-kl-temporal or "
                                 "autoencoder-causal-3d (or load image weights with `weights`)")
            if self.architecture.lower() != arch.name:
                raise ValueError(f"architecture: {self.architecture!r} is a preset, but with inflate_from the model "
                                 f"config comes from the image autoencoder; name the architecture ({arch.name})")
            if isinstance(overrides, arch.config_cls):
                raise ValueError("model: with inflate_from give the fields to change as a mapping (the rest comes "
                                 "from the image autoencoder), not a whole config")
            check_field_overrides(arch.config_cls, overrides, "model")
            self._overrides = dict(overrides)
            self._model_config = None  # known once the image autoencoder's config is read (model_config)
        else:
            self._overrides = {}
            self._model_config = with_overrides(base, overrides, "model")

    def _model_sections(self) -> Any:
        """The overrides of the active architecture from ``model`` (flat or per architecture name); every section
        checked against its own config class."""
        model = self.model
        if dataclasses.is_dataclass(model) and not isinstance(model, type):
            if not isinstance(model, self._arch.config_cls):
                raise ValueError(f"model: a {type(model).__name__}, but architecture {self.architecture!r} takes a "
                                 f"{self._arch.config_cls.__name__}")
            return model
        if not isinstance(model, Mapping):
            raise ValueError(f"model: got {model!r}; expected a mapping of {self._arch.config_cls.__name__} fields "
                             "(or of sections named by architecture)")
        named = [k for k in model if _is_registered(k)]
        if not named:
            return model
        if len(named) != len(model):
            other = next(k for k in model if k not in named)
            raise ValueError(f"model.{other}: mixes config fields with sections named by architecture "
                             f"({', '.join(named)}); give one or the other")
        active: Mapping[str, Any] = {}
        for name in named:
            section = model[name]
            if not isinstance(section, Mapping):
                raise ValueError(f"model.{name}: got {section!r}; expected a mapping of config fields")
            arch, base = _resolve_autoencoder(name, f"model.{name}")
            if self.inflate_from and arch.name != IMAGE_AUTOENCODER:
                check_field_overrides(arch.config_cls, section, f"model.{name}")
            else:
                with_overrides(base, section, f"model.{name}")
            if name.lower() == self.architecture.lower():
                active = section
        return active

    @property
    def architecture_name(self) -> str:
        """The registered architecture (``autoencoder-kl``, ...), also when ``architecture`` names a preset."""
        return self._arch.name

    @property
    def model_config(self) -> Any:
        """The autoencoder's typed config: the architecture's defaults or preset with the ``model`` fields, or (with
        ``inflate_from``) the config derived from the image autoencoder's ``model.json`` with them."""
        if self._model_config is not None:
            return self._model_config
        _, image_config = read_autoencoder_export(self.inflate_from, "inflate_from")
        if self._arch.name == "autoencoder-causal-3d":
            from models.video_autoencoder import causal_config_from_image

            derived = causal_config_from_image(image_config)
        else:
            derived = temporal_config_from_image(image_config)
        return with_overrides(derived, self._overrides, "model")

    def check_clip_lengths(self, frames: Sequence[int], key: str) -> None:
        """Refuse clip lengths a causal autoencoder would cut (it keeps ``1 + r·k`` frames of a clip). The
        ``inflate_from`` config is read when its file exists (else the stage's build reports it)."""
        if not frames or self._arch.name != "autoencoder-causal-3d":
            return
        if self.inflate_from and not Path(self.inflate_from).with_suffix(".json").exists():
            return
        r = self.model_config.temporal_factor
        bad = [t for t in frames if (t - 1) % r]
        if bad:
            raise ValueError(f"{key}: clips of {bad} frames; the causal autoencoder (temporal factor {r}) encodes "
                             f"1 + {r}·k frames (1, {1 + r}, {1 + 2 * r}, ...) and would drop the rest")


def _is_registered(name: Any) -> bool:
    try:
        resolve(str(name))
    except KeyError:
        return False
    return True


def _resolve_autoencoder(name: str, key: str) -> tuple[Architecture, Any]:
    return architecture_config(name, "autoencoder", {}, key)


def check_field_overrides(cls: type, overrides: Mapping[str, Any], key: str) -> None:
    """Each key of ``overrides`` a field of dataclass ``cls`` and each value of its type (the combination is checked
    once the config they apply to is known)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    for name, value in overrides.items():
        if name not in fields:
            import difflib

            close = difflib.get_close_matches(str(name), sorted(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{key}.{name}: unknown key{hint} ({cls.__name__} accepts: {', '.join(sorted(fields))})")
        try:
            _convert(value, hints[name], f"{key}.{name}")
        except ConfigError as e:
            raise ValueError(str(e)) from None


# ------------------------------------------------------------------------------------------ exports


def export_module(module: nn.Module, config: object, out_dir: Path, name: str = "model",
                  architecture: Optional[str] = None) -> Path:
    """``<out_dir>/<name>.safetensors`` + ``<name>.json`` (its config), the format every stage loads; with
    ``architecture`` the json (and the safetensors metadata) also names the registered architecture."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.safetensors"
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    described = to_dict(config) if architecture is None else {"architecture": architecture, **to_dict(config)}
    save_file(state, str(path), metadata={"format": "pt", "config": json.dumps(described)})
    (out_dir / f"{name}.json").write_text(json.dumps(described, indent=1))
    return path


def read_autoencoder_export(weights: str | Path, key: str = "autoencoder weights") -> tuple[Architecture, Any]:
    """``(architecture, typed config)`` of an exported autoencoder (``model.safetensors`` with ``model.json``
    beside it); a json without ``"architecture"`` is an ``autoencoder-kl`` (exports before video autoencoders)."""
    weights = Path(weights)
    config_file = weights.with_suffix(".json")
    if not config_file.exists():
        if not weights.exists():
            raise FileNotFoundError(f"{key}={str(weights)!r}: does not exist (an exported autoencoder, e.g. "
                                    "runs/quickstart/autoencoder/export/model.safetensors)")
        raise FileNotFoundError(f"{key} {weights}: its config {config_file.name} is missing beside it")
    raw = json.loads(config_file.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file}: expected a mapping of config fields, got {type(raw).__name__}")
    name = raw.pop("architecture", IMAGE_AUTOENCODER)
    arch, _ = _resolve_autoencoder(str(name), f"{config_file}: architecture")
    return arch, from_dict(arch.config_cls, raw, str(config_file))


def load_exported_autoencoder(weights: str | Path, key: str = "autoencoder weights") -> nn.Module:
    """The exported autoencoder at ``weights``, rebuilt as its recorded architecture (see
    :func:`read_autoencoder_export`), weights loaded (train mode, gradients on: callers freeze it)."""
    _, config = read_autoencoder_export(weights, key)
    model = build_model(config)
    load_weights(model, weights)
    return model


# ------------------------------------------------------------------------------------------ inflation


def temporal_config_from_image(config: Any, **overrides: Any) -> Any:
    """The :class:`~models.video_autoencoder.TemporalAutoencoderConfig` with the image autoencoder's topology,
    normalisation and latent scaling (and its ``post_quant_conv`` if it has one); ``overrides`` set other fields."""
    from models.video_autoencoder import TemporalAutoencoderConfig

    fields = dict(in_channels=config.in_channels, out_channels=config.out_channels,
                  latent_channels=config.latent_channels, block_out_channels=list(config.block_out_channels),
                  layers_per_block=config.layers_per_block, norm_num_groups=config.norm_num_groups,
                  norm_eps=config.norm_eps, use_post_quant_conv=config.use_post_quant_conv,
                  scaling_factor=config.scaling_factor, shift_factor=config.shift_factor,
                  attention_backend=config.attention_backend)
    fields.update(overrides)
    return TemporalAutoencoderConfig(**fields)


_SPATIAL_IN_TEMPORAL = re.compile(r"^decoder\.(mid\.res\.\d+|up\.\d+\.res\.\d+)\.")


def inflate_temporal_decoder(image: nn.Module, config: Optional[Any] = None) -> nn.Module:
    """A :class:`~models.video_autoencoder.TemporalDecoderAutoencoder` started from an image
    :class:`~models.autoencoder.AutoencoderKL` (default config: :func:`temporal_config_from_image`).

    The encoder and ``quant_conv`` are copied (an identity ``quant_conv`` when the image model has none), so the
    latents are the image autoencoder's, bit for bit; every decoder ResBlock becomes the spatial half of its
    spatio-temporal block. The temporal layers start *silent*: the second 3×1×1 convolution of every temporal
    ResBlock is zero (so the temporal branch returns its input and VideoLDM's mix ``(1-α)·spatial + α·temporal``
    equals the spatial output for any α), and the final 3×1×1 ``time_conv_out`` is the identity on the current frame.
    With the default initialisation instead (random temporal convolutions, α = sigmoid(0) = ½) every frame would
    be mixed with its neighbours at step 0. A mid-block attention the image model lacks gets a zero output
    projection (the residual passes through). So at step 0 every clip decodes exactly as the image autoencoder
    decodes each frame on its own (to float rounding), and training moves the zeroed convolutions first (their
    input is not zero, so their gradient is not)."""
    from models.video_autoencoder import TemporalDecoderAutoencoder

    config = config if config is not None else temporal_config_from_image(image.config)
    model = TemporalDecoderAutoencoder(config)
    state = model.state_dict()
    image_state = image.state_dict()
    filled = set()
    for name, value in image_state.items():
        target = _SPATIAL_IN_TEMPORAL.sub(lambda m: f"decoder.{m.group(1)}.spatial.", name)
        if target not in state:
            raise ValueError(f"inflate_temporal_decoder: the image weight {name!r} has no place in the temporal "
                             "decoder autoencoder; the configs do not match (build it with temporal_config_from_image)")
        if state[target].shape != value.shape:
            raise ValueError(f"inflate_temporal_decoder: weight {name!r} has shape {tuple(value.shape)}, the video "
                             f"model's {target!r} {tuple(state[target].shape)}")
        state[target] = value.detach().clone()
        filled.add(target)
    for name, value in state.items():
        if name in filled:
            continue
        if ".temporal.conv2." in name or (name.endswith("attn.to_out.weight") or name.endswith("attn.to_out.bias")):
            state[name] = torch.zeros_like(value)  # silent temporal branch; absent attention passes through
        elif name == "decoder.time_conv_out.weight":
            kernel = torch.zeros_like(value)
            kernel[:, :, 1, 0, 0] = torch.eye(value.shape[0], dtype=value.dtype)  # the current frame's tap
            state[name] = kernel
        elif name == "decoder.time_conv_out.bias":
            state[name] = torch.zeros_like(value)
        elif name == "quant_conv.weight":  # the image model had none: identity
            state[name] = torch.eye(value.shape[0], dtype=value.dtype).view_as(value)
        elif name == "quant_conv.bias":
            state[name] = torch.zeros_like(value)
        elif ".temporal." in name or name.endswith("mix_factor") or ".attn." in name or ".attn_norm." in name:
            continue  # the temporal branch's first conv and norms, the unused attention's inputs: as initialised
        else:
            raise ValueError(f"inflate_temporal_decoder: the video weight {name!r} has no image counterpart; the "
                             "configs do not match")
    model.load_state_dict(state, strict=True)
    p = next(image.parameters())
    return model.to(device=p.device, dtype=p.dtype)


def build_autoencoder(cfg: AutoencoderStageConfig) -> nn.Module:
    """The autoencoder ``cfg`` describes, built through the model registry: random (``weights`` loaded if set), or
    inflated from the image autoencoder ``inflate_from``."""
    if not cfg.inflate_from:
        model = build_model(cfg.model_config)
        if cfg.weights:
            load_weights(model, cfg.weights)
        return model
    arch, _ = read_autoencoder_export(cfg.inflate_from, "inflate_from")
    if arch.name != IMAGE_AUTOENCODER:
        raise ValueError(f"inflate_from: {cfg.inflate_from!r} is an {arch.name} export; inflation starts from an "
                         f"image autoencoder ({IMAGE_AUTOENCODER}); continue a video autoencoder with `weights`")
    image = load_exported_autoencoder(cfg.inflate_from, "inflate_from")
    config = cfg.model_config
    if cfg.architecture_name == "autoencoder-causal-3d":
        from models.video_autoencoder import inflate_autoencoder

        return inflate_autoencoder(image, **{k: getattr(config, k) for k in cfg._overrides})
    return inflate_temporal_decoder(image, config)


def encoder_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The encoder side's parameters (``encoder.*``, ``quant_conv.*``) of any of the project's autoencoders."""
    return [(n, p) for n, p in model.named_parameters() if n.startswith(ENCODER_PREFIXES)]


def frames_of(x: Tensor) -> Tensor:
    """Images ``(B, C, H, W)`` as they are; clips ``(B, C, T, H, W)`` as frames ``(B*T, C, H, W)``."""
    return fold_frames(x) if x.ndim == 5 else x


def matched_target(x: Tensor, recon: Tensor) -> Tensor:
    """The frames of ``x`` that ``recon`` reconstructs: a causal autoencoder keeps ``1 + r·k`` frames of a clip
    (its trailing frames are dropped, as in Wan); everything else reconstructs all of them."""
    return x[:, :, : recon.shape[2]] if x.ndim == 5 and recon.shape[2] != x.shape[2] else x


class AutoencoderStage(Stage):
    name = "autoencoder"

    def __init__(self, cfg: AutoencoderStageConfig, val_pixels: Optional[Tensor] = None):
        self.cfg = cfg
        self.model = build_autoencoder(cfg)
        if not cfg.train_encoder:
            for _, p in encoder_parameters(self.model):
                p.requires_grad_(False)  # not given to the optimizer (Stage.parameters_to_optimize), nor to the EMA
        self.val_pixels = val_pixels
        self.lpips = LPIPS.from_file(cfg.lpips_weights) if cfg.perceptual_weight > 0 else None

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"lpips": self.lpips} if self.lpips is not None else {}

    def trainable(self) -> nn.Module:
        return self.model

    def loss(self, model: nn.Module, batch) -> tuple[Tensor, dict[str, float]]:
        x = batch.pixels  # (B, C, H, W) images or (B, C, T, H, W) clips, in [-1, 1]
        recon, posterior = model(x)  # (B, C, [T,] H, W); through the module's forward (DDP hooks)
        x = matched_target(x, recon)
        err = recon.float() - x.float()
        diff = err.abs() if self.cfg.reconstruction == "l1" else err**2
        rec = diff.flatten(1).sum(1)  # (B,) summed over the sample's pixels (and frames)
        logs = {}
        if self.lpips is not None:
            # LDM adds the per-image LPIPS distance to every pixel's error before summing, i.e. weight × C·H·W per
            # image; a clip's frames each add theirs: the mean over frames × C·T·H·W
            dtype = next(self.lpips.parameters()).dtype
            p = self.lpips(frames_of(recon).to(dtype), frames_of(x).to(dtype)).float().view(len(x), -1).mean(1)
            rec = rec + self.cfg.perceptual_weight * p * x[0].numel()
            logs["lpips"] = float(p.detach().mean())
        rec = rec.mean()
        kl = posterior.kl().mean()  # (B,) summed over latent elements → mean
        loss = rec + self.cfg.kl_weight * kl
        return loss, {"reconstruction": float(rec.detach()) / x[0].numel(), "kl": float(kl.detach()), **logs}

    @torch.no_grad()
    def validate(self, model: nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        """PSNR of the first ``validation_images`` validation samples and a picture: for images a grid (originals
        above reconstructions), for clips a contact sheet (one clip per row, its frames left to right, each clip's
        reconstruction under it) and the temporal flicker (:func:`training.evaluation.temporal_flicker`)."""
        if self.val_pixels is None:
            return {}
        device = next(model.parameters()).device
        x = self.val_pixels[: self.cfg.validation_images].to(device)
        mode = model.encode(x).mode()
        recon = model.decode(mode).clamp(-1, 1)
        x = matched_target(x, recon)
        path = out_dir / f"reconstruction_{step:08d}.png"
        if x.ndim == 5:  # rows: clip 0, its reconstruction, clip 1, ...
            pictures = torch.stack([x, recon], dim=1).flatten(0, 1)  # (2B, C, T, H, W)
            save_grid(pictures, path, scale=2)
        else:
            pictures = torch.cat([x, recon])  # (2B, C, H, W)
            save_grid(pictures, path, nrow=len(x), scale=2)
        self.keep_media("validation/reconstruction", pictures)  # TensorBoard: the grid, or the clips playing
        metrics = {"psnr": psnr(recon, x), "latent_std": float(model.scale_latents(mode).std())}
        if x.ndim == 5 and x.shape[2] > 1:
            metrics["flicker"] = temporal_flicker(recon, x)
        return metrics

    def export(self, model: nn.Module, out_dir: Path) -> Optional[Path]:
        config = model.config
        if self.cfg.fit_scaling_factor and self.cfg.train_encoder and self.val_pixels is not None:
            config = fitted_scaling(model, self.val_pixels)
            model.config = config
        return export_module(model, config, out_dir, architecture=get_architecture(config).name)


@torch.no_grad()
def fitted_scaling(model: nn.Module, pixels: Tensor, chunk: int = 32) -> Any:
    """``model.config`` with ``scaling_factor`` set so the normalised latents of ``pixels`` (images or clips) have
    std 1 (LDM's scale-by-std: ``1 / std(z - shift)``; with per-channel ``latents_mean``/``latents_std`` the scalar
    factor over them)."""
    config = model.config
    device = next(model.parameters()).device
    z = torch.cat([model.encode(part.to(device)).mode().float().cpu() for part in pixels.split(chunk)])
    if getattr(config, "latents_mean", None) is None:
        scaling = float(1.0 / (z - config.shift_factor).std())
    else:
        scaling = float(config.scaling_factor / model.scale_latents(z.to(device)).std())
    return dataclasses.replace(config, scaling_factor=scaling)


def validation_pixels(batches: Sequence[Any], limit: int = 256) -> Optional[Tensor]:
    """Up to ``limit`` validation samples as one tensor: those of the first batch's shape (clip buckets may give
    batches of other frame counts or sizes, which cannot be stacked with them); None without batches."""
    if not batches:
        return None
    shape = batches[0].pixels.shape[1:]
    kept = [b.pixels for b in batches if b.pixels.shape[1:] == shape]
    return torch.cat(kept)[:limit]
