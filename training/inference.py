"""Inference without training objects: open a finished run (or any weights) and turn prompts into images.

:class:`Inference` holds what sampling needs and nothing a trainer does: the denoiser, the diffusion process, the
frozen text encoder, the autoencoder (None for a pixel-space model) and the sampling defaults. Its
:meth:`Inference.generate` is the one path from prompts to pixels, shared by validation during training, the
end-of-run report, ``loom sample`` and ``benchmarks/finetune_evidence.py``, so what the report measures is exactly
what a user gets. :func:`open_run` builds one from a run directory::

    pipe = open_run("runs/quickstart")                       # the exported EMA weights, on the GPU when there is one
    images = pipe.generate(["a handwritten digit four"])      # (1, 3, 32, 32) in [-1, 1]
    pipe = open_run("runs/quickstart", weights="latest", adapters=["adapter.safetensors:0.8"])

The latent shape of a request comes from the autoencoder (its channels and its spatial and temporal factors), so a
clip is asked for with ``num_frames`` and an image without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from models.conditioning import Conditioning, trim_together
from models.embeddings import SIZE_CONDITIONING, size_conditioning_vector
from training.sampling import SamplingConfig, sample_latents

WEIGHTS_CHOICES = ("export (the finished stage's EMA export) | latest (EMA of the last checkpoint) | a checkpoint "
                   "directory (its EMA) | a weights file")


@dataclass
class Inference:
    """A trained denoiser with the frozen parts and settings that turn prompts into images."""

    denoiser: nn.Module  # called denoiser(x_t, timesteps, cond)
    process: Any  # the diffusion process it was trained with (training.diffusion.build_process)
    text_encoder: Any  # .encode(prompts) -> Conditioning, as in training
    autoencoder: Optional[nn.Module]  # decodes latents to pixels; None: the denoiser works in pixel space
    sampling: SamplingConfig  # sampler, steps, guidance, seed, negative prompt
    image_size: tuple[int, int]  # default (height, width) in pixels
    micro_fourier_dim: Optional[int] = None  # SDXL size/crop micro-conditioning width; None: not used
    # image-size conditioning in cond.vector (models.embeddings.SIZE_CONDITIONING: none | sdxl | pixart); None:
    # sdxl where micro_fourier_dim is given, else none
    size_conditioning: Optional[str] = None

    def __post_init__(self) -> None:
        if self.size_conditioning is None:
            self.size_conditioning = "none" if self.micro_fourier_dim is None else "sdxl"
        if self.size_conditioning not in SIZE_CONDITIONING:
            raise ValueError(f"size_conditioning: {self.size_conditioning!r}; expected one of "
                             f"{', '.join(SIZE_CONDITIONING)}")
        if self.size_conditioning == "sdxl" and self.micro_fourier_dim is None:
            raise ValueError("size_conditioning='sdxl' needs micro_fourier_dim (the Fourier width per number)")

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device: torch.device | str) -> "Inference":
        """Move every module to ``device`` (in place) and return self."""
        self.denoiser.to(device)
        self.text_encoder.to(device)
        if self.autoencoder is not None:
            self.autoencoder.to(device)
        return self

    def latent_shape(self, height: Optional[int] = None, width: Optional[int] = None,
                     num_frames: Optional[int] = None) -> tuple[int, ...]:
        """One sample's latent shape for an image (``num_frames`` None: ``(C, h, w)``) or a clip (``(C, T', h, w)``)
        of ``height`` × ``width`` pixels (default :attr:`image_size`), as the autoencoder maps pixels to latents."""
        height = height or self.image_size[0]
        width = width or self.image_size[1]
        if self.autoencoder is not None:
            return tuple(self.autoencoder.latent_shape(height, width, num_frames))
        channels = int(self.denoiser.config.in_channels)
        return (channels, height, width) if num_frames is None else (channels, num_frames, height, width)

    def conditioning(self, prompts: Sequence[str], negative_prompt: str, height: int, width: int
                     ) -> tuple[Conditioning, Conditioning]:
        """(prompt, negative-prompt) conditioning for a batch, trimmed to their common token length, with the
        size conditioning of an uncropped ``height`` × ``width`` image (original = target = the drawn size, on both
        branches, as diffusers' SDXL and PixArt-α pipelines pass it) where the denoiser was trained with it."""
        device = self.device
        cond = self.text_encoder.encode(list(prompts)).to(device)
        null = self.text_encoder.encode([negative_prompt] * len(prompts)).to(device)
        cond, null = trim_together(cond, null)
        size = torch.tensor([[height, width]] * len(prompts), dtype=torch.int64)  # (B, 2)
        vector = size_conditioning_vector(str(self.size_conditioning), size, torch.zeros_like(size), size,
                                          self.micro_fourier_dim or 256)
        if vector is not None:
            cond.vector = null.vector = vector.to(device)  # (B, V)
        return cond, null

    @property
    def image_conditioned(self) -> bool:
        """Whether the denoiser is an image-to-video model (it concatenates ``cond.image_latents``)."""
        model = self.denoiser
        while not hasattr(model, "config") and hasattr(model, "base_model"):  # a peft wrapper
            model = model.base_model
        model = getattr(model, "model", model) if not hasattr(model, "config") else model
        return bool(getattr(getattr(model, "config", None), "concat_image_latents", False))

    @torch.no_grad()
    def first_frame_latents(self, first_frames: Tensor) -> Tensor:
        """Conditioning frames ``(B, C, H, W)`` pixels in [-1, 1] → ``(B, Cz, 1, h, w)`` normalised latents (the
        posterior mode of each frame encoded alone), what an image-to-video denoiser was trained with."""
        if first_frames.ndim != 4:
            raise ValueError(f"first frames: got shape {tuple(first_frames.shape)}; expected (B, C, H, W) pixels")
        clip = first_frames.to(self.device).unsqueeze(2)  # (B, C, 1, H, W)
        if self.autoencoder is None:
            return clip
        dtype = next(self.autoencoder.parameters()).dtype
        return self.autoencoder.scale_latents(self.autoencoder.encode(clip.to(dtype)).mode()).float()

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], guidance: Optional[float] = None, height: Optional[int] = None,
                 width: Optional[int] = None, num_frames: Optional[int] = None,
                 sampling: Optional[SamplingConfig] = None, first_frames: Optional[Tensor] = None) -> Tensor:
        """Images ``(B, C, H, W)`` (or clips ``(B, C, T, H, W)`` with ``num_frames``) in [-1, 1] for ``prompts``.

        ``guidance`` overrides the sampling config's scale; guidance 0 samples the unconditional model alone (the
        null conditioning on both branches). ``first_frames`` ``(B, C, H, W)`` in [-1, 1] (image-to-video models
        only): the clips start from these frames; without them an image-to-video model draws text-to-video (its
        null image conditioning). Guidance contrasts the prompt and the frame with neither.
        """
        cfg = sampling or self.sampling
        scale = cfg.guidance if guidance is None else guidance
        height = height or self.image_size[0]
        width = width or self.image_size[1]
        shape = self.latent_shape(height, width, num_frames)
        cond, null = self.conditioning(prompts, cfg.negative_prompt, height, width)
        if self.image_conditioned:
            if num_frames is None:
                raise ValueError("this image-to-video denoiser draws clips: give num_frames")
            if first_frames is not None:
                if len(first_frames) != len(prompts):
                    raise ValueError(f"{len(first_frames)} first frames for {len(prompts)} prompts: give one each")
                frame = self.first_frame_latents(first_frames)  # (B, Cz, 1, h, w)
            else:
                frame = torch.zeros((len(prompts), shape[0], 1, *shape[-2:]), device=self.device)
            cond.image_latents, null.image_latents = frame, torch.zeros_like(frame)
        elif first_frames is not None:
            raise ValueError("first frames (image-to-video) given, but this denoiser takes no image conditioning "
                             "(train it with model.<name>.concat_image_latents: true)")
        null_cond: Optional[Conditioning] = null
        if scale == 0.0:
            cond, null_cond, scale = null, None, 1.0
        latents = sample_latents(self.denoiser, self.process, cond, null_cond, (len(prompts), *shape), cfg,
                                 self.device, scale)
        if self.autoencoder is None:
            return latents.clamp(-1, 1)
        dtype = next(self.autoencoder.parameters()).dtype
        return self.autoencoder.pixels_from_latents(latents.to(dtype)).float().clamp(-1, 1)


# ------------------------------------------------------------------------------------------------ adapters


def apply_adapters(pipe: Inference, adapters: Sequence[str], merge: bool = True) -> Inference:
    """Attach LoRA ``adapters`` (``path[:scale]``, added up) to ``pipe`` in place: ours, diffusers/PEFT or kohya
    files (:mod:`training.finetune`, :mod:`training.lora_formats`). A foreign file's text-encoder layers
    (``text_encoder.`` / ``text_encoder_2.``, ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``) are merged into
    ``pipe.text_encoder``'s weights with the file's alpha / rank and the adapter's scale, whatever ``merge`` says;
    the denoiser part is attached with peft and merged into its weights when ``merge`` is True."""
    import dataclasses

    from training import lora_formats
    from training.finetune import AdapterSpec, attach_adapters, load_adapter, merge_adapters

    loaded = [(load_adapter(spec.path), spec.scale) for spec in map(AdapterSpec.parse, adapters)]
    denoiser_part = []
    for adapter, scale in loaded:  # every file is read, and a file's text keys all checked, before any merge
        if adapter.layers is not None:
            rest, text = lora_formats.split_text_encoder(adapter.layers)
            lora_formats.merge_text_encoder_layers(pipe.text_encoder, text, scale, f"LoRA adapter {adapter.path}")
            if not rest:
                continue  # a text-encoder-only file
            adapter = dataclasses.replace(adapter, layers=rest)
        denoiser_part.append((adapter, scale))
    if denoiser_part:
        pipe.denoiser = attach_adapters(pipe.denoiser, denoiser_part)
        if merge:
            merge_adapters(pipe.denoiser)
    return pipe


# ------------------------------------------------------------------------------------------------ weights


def denoiser_weights(run_dir: str | Path, weights: str = "export", stage: str = "diffusion") -> tuple[Path, bool]:
    """``(file, is_checkpoint_ema)`` for ``weights``: ``export``, ``latest`` or a path (see :data:`WEIGHTS_CHOICES`)."""
    from training.checkpoint import latest_checkpoint

    stage_dir = Path(run_dir) / stage
    if weights == "export":
        return stage_dir / "export" / "model.safetensors", False
    if weights == "latest":
        ckpt = latest_checkpoint(stage_dir)
        if ckpt is None:
            raise FileNotFoundError(f"weights=latest: no checkpoint under {stage_dir / 'checkpoints'}")
        return ckpt / "ema.safetensors", True
    if Path(weights).is_dir() and (Path(weights) / "ema.safetensors").exists():  # a checkpoint: its EMA weights
        return Path(weights) / "ema.safetensors", True
    return Path(weights), False


def load_denoiser_weights(model: nn.Module, path: Path, is_checkpoint_ema: bool) -> None:
    """Load our export, a diffusers / original-layout file, or a checkpoint's EMA file into ``model`` (strict)."""
    from training.weights import load_weights

    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if is_checkpoint_ema:
        from training.ema import ema_weights
        from training.errors import read_safetensors

        model.load_state_dict(ema_weights(read_safetensors(path, "checkpoint EMA file")), strict=True)
    else:
        load_weights(model, path)
