"""The ``diffusion`` stage: train a latent U-Net or DiT on text-conditioned latents, with conditioning dropout.

Per batch: latents (read from cached shards, or encoded by the frozen autoencoder, or the pixels themselves for a
pixel-space model) and the text conditioning (cached, or from the frozen text encoder) → with probability
``cond_dropout`` per sample the text conditioning is replaced by the null (empty-prompt) conditioning, exactly the
one sampling uses for the unconditional branch (Ho & Salimans 2022) → the diffusion process draws t and noise →
``denoiser(x_t, t, cond)`` → the process's weighted MSE. U-Net and DiT, image and video, share this code.

Fine-tuning reuses the same stage with other parts: :class:`~training.stages.lora.LoraAdapters` (the ``lora``
stage) and :class:`~training.stages.dpo.DpoObjective` (the ``dpo`` stage) — composed, not subclassed.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from models.autoencoder import DiagonalGaussian
from models.conditioning import Conditioning, drop_conditioning, trim_together
from models.dit_checkpoints import PIXART_VECTOR_DIM
from models.embeddings import SIZE_CONDITIONING, size_conditioning_vector
from models.registry import build_model, get_architecture
from models.text_encoder import TextEncoderConfig
from training.config_io import architecture_config
from training.diffusion import DiffusionConfig, build_process
from training.evaluation import save_clip_grid_animation, save_clip_mp4, save_grid
from training.inference import Inference
from training.sampling import SamplingConfig, check_sampler
from training.stages.autoencoder import export_module
from training.stages.base import Stage
from training.trainer import TrainConfig
from training.weights import load_weights

MICRO_FOURIER_DIM = 256  # SDXL: 256 Fourier features per micro-conditioning number


@dataclass
class DiffusionStageConfig:
    """Train the latent denoiser."""

    denoiser: str = "dit"  # what trains: a registered architecture (dit, unet) or model preset (dit-tiny-text, ...)
    # config fields over the named model's defaults, one section per denoiser name (model.dit.depth: 4; in Python
    # also the typed config itself); the section `denoiser` names is used, every section is checked against its
    # own config class (so a preset inheriting another's denoiser section may switch the denoiser)
    model: dict[str, dict[str, Any]] = field(default_factory=dict)
    weights: Optional[str] = None  # initial denoiser weights (.safetensors; ours, diffusers' or LDM names)
    # a published checkpoint the stage starts from: a diffusers pipeline folder, an original SD .safetensors/.ckpt
    # or a DiT/PixArt .pt/.pth; it fills the denoiser, text encoder, autoencoder and process settings from what its
    # files say; a contradicting setting is an error (training.pretrained: the rule); `weights` replaces its denoiser
    pretrained: Optional[str] = None
    # an exported image denoiser (model.safetensors, its model.json beside) the video denoiser is inflated from:
    # spatial weights copied, new temporal layers silent at start (VideoLDM / SVD); exclusive with `weights`
    inflate_from: Optional[str] = None
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # frozen OpenCLIP text tower
    process: DiffusionConfig = field(default_factory=DiffusionConfig)  # noise schedule, target, loss weighting
    cond_dropout: float = 0.1  # per-sample probability of the null text conditioning (for CFG)
    # image-to-video denoisers (model.<name>.concat_image_latents): the clip's first latent frame conditions it;
    # per-sample probability of the null (zero) image conditioning, drawn independently of the text's: the model
    # also learns text-to-video, and guidance can null both (Stable Video Diffusion, Blattmann et al. 2023)
    image_dropout: float = 0.5
    image_noise: float = 0.0  # std of Gaussian noise added to the conditioning frame's normalised latent (augmentation)
    latents: Literal["cache", "encode", "pixels"] = "cache"  # cached shards · frozen autoencoder · pixel space
    autoencoder_weights: str = "auto"  # frozen autoencoder (.safetensors + .json beside); auto: this run's export
    # image-size conditioning in cond.vector: none · sdxl (original size, crop, target size as Fourier features,
    # Podell et al. 2023) · pixart (original resolution and aspect ratio, PixArt-α's multi-scale models); the
    # booleans of older configs still read (true: sdxl, false: none)
    micro_conditioning: Union[Literal["none", "sdxl", "pixart"], bool] = "none"
    batch_size: Optional[int] = None  # per-rank batch size for this stage (null: data.batch_size)
    train: TrainConfig = field(default_factory=TrainConfig)  # steps, optimizer, EMA, checkpoints
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # validation and `loom sample` defaults
    validation_prompts: list[str] = field(default_factory=list)  # prompts drawn at each validation
    validation_loss_batches: int = 2  # validation batches for the fixed-noise validation loss
    validation_num_frames: Optional[int] = None  # validation prompts drawn as clips of this many frames; null: images
    validation_fps: float = 8.0  # frame rate of the validation clips (mp4, animated grid)

    def __post_init__(self) -> None:
        if not isinstance(self.micro_conditioning, bool) and self.micro_conditioning not in SIZE_CONDITIONING:
            raise ValueError(f"micro_conditioning: {self.micro_conditioning!r}; expected one of "
                             f"{', '.join(SIZE_CONDITIONING)} (or true / false: sdxl / none)")
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise ValueError(f"cond_dropout: {self.cond_dropout} must be in [0, 1]")
        if not 0.0 <= self.image_dropout <= 1.0:
            raise ValueError(f"image_dropout: {self.image_dropout} must be in [0, 1]")
        if not self.image_noise >= 0.0:
            raise ValueError(f"image_noise: {self.image_noise} must be >= 0")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size: {self.batch_size} must be >= 1 or null")
        if self.validation_num_frames is not None and self.validation_num_frames < 1:
            raise ValueError(f"validation_num_frames: {self.validation_num_frames} must be >= 1 or null")
        if self.inflate_from and self.weights:
            raise ValueError(f"inflate_from={self.inflate_from!r} and weights={self.weights!r}: give one (inflation "
                             "starts a video denoiser from image weights; weights continue a video denoiser)")
        if not self.validation_fps > 0:
            raise ValueError(f"validation_fps: {self.validation_fps} must be > 0")
        if self.pretrained:
            from training.pretrained import apply_pretrained

            apply_pretrained(self)  # fills denoiser, model, process, text_encoder, autoencoder_weights, sampling
        if isinstance(self.micro_conditioning, bool):  # an older config's true / false
            self.micro_conditioning = "sdxl" if self.micro_conditioning else "none"
        configs = {name.lower(): denoiser_config(name, overrides, f"model.{name}")
                   for name, overrides in self.model.items()}
        active = configs.get(self.denoiser.lower())
        self._model_config = active if active is not None else denoiser_config(self.denoiser, {}, "denoiser")
        if self.micro_conditioning == "pixart" and getattr(self._model_config, "vector_dim", None) != PIXART_VECTOR_DIM:
            raise ValueError(f"micro_conditioning: 'pixart' feeds a {PIXART_VECTOR_DIM}-wide cond.vector (height, "
                             f"width, aspect ratio); the denoiser {self.denoiser!r} has vector_dim="
                             f"{getattr(self._model_config, 'vector_dim', None)!r} (set model.{self.denoiser}."
                             f"vector_dim: {PIXART_VECTOR_DIM} on a DiT)")
        if getattr(self._model_config, "learn_sigma", False):
            raise ValueError(f"model: {self.denoiser}.learn_sigma=true predicts a variance the training loss does "
                             f"not use yet; set model.{self.denoiser}.learn_sigma=false")
        check_sampler(build_process(self.process), self.sampling.sampler)

    @property
    def model_config(self) -> Any:
        """The denoiser's typed config: the named architecture's defaults or preset, with its ``model`` section."""
        return self._model_config

    @property
    def architecture(self) -> str:
        """The registered architecture of the denoiser (``dit``, ``unet``), also when ``denoiser`` names a preset."""
        return get_architecture(self._model_config).name


def denoiser_config(name: str, overrides: Mapping[str, Any], key: str) -> Any:
    """The typed config of the denoiser architecture or preset ``name`` with ``overrides`` over its fields, checked
    like any config (unknown field, wrong type, failed check: a ``ValueError`` naming ``key`` and the field)."""
    return architecture_config(name, "denoiser", overrides, key)[1]


def build_denoiser(cfg: DiffusionStageConfig) -> nn.Module:
    """The denoiser ``cfg`` describes, built through the model registry, with ``cfg.weights`` loaded if set (else
    the ``cfg.pretrained`` checkpoint's), or inflated from the image denoiser ``cfg.inflate_from``."""
    if cfg.inflate_from:
        return inflate_denoiser(cfg.model_config, cfg.inflate_from)
    model = build_model(cfg.model_config)
    if cfg.weights and cfg.weights != cfg.pretrained:
        load_weights(model, cfg.weights)
    elif cfg.pretrained:
        from training.pretrained import load_pretrained_denoiser

        load_pretrained_denoiser(model, cfg.pretrained)
    return model


def inflate_denoiser(video_config: Any, image_weights: str | Path) -> nn.Module:
    """The video denoiser ``video_config`` inflated from an image denoiser: the video architecture's
    ``inflate(image, config)`` (:meth:`models.dit.DiT.inflate`, :meth:`models.video_unet.VideoUNet.inflate`) copies
    the image weights and starts the temporal layers silent, so the video model first computes the image model
    frame by frame. ``image_weights``: an export of ours (``model.safetensors`` with its config ``model.json``
    beside, as every stage writes) or a diffusers model or pipeline folder (``config.json``; ``unet/`` or
    ``transformer/`` of a pipeline), e.g. Stable Diffusion's U-Net for Stable Video Diffusion's recipe."""
    arch = get_architecture(video_config)
    inflate = getattr(arch.module_cls, "inflate", None)
    image_arch = getattr(arch.module_cls, "image_architecture", None)
    if inflate is None or image_arch is None:
        raise ValueError(f"inflate_from: the {arch.name} architecture cannot be inflated from an image model "
                         "(inflatable: the video DiT, the video U-Net)")
    path = Path(image_weights)
    if not path.exists():
        raise FileNotFoundError(f"inflate_from={str(image_weights)!r}: does not exist (an exported image denoiser, "
                                "e.g. runs/quickstart/diffusion/export/model.safetensors, or a diffusers folder)")
    image_config, weights = image_denoiser_config(image_arch, path)
    image = build_model(image_config)
    load_weights(image, weights)
    return inflate(image, video_config)


def image_denoiser_config(image_arch: str, path: Path) -> tuple[Any, Path]:
    """``(config, weights path)`` of the image denoiser at ``path`` (see :func:`inflate_denoiser`)."""
    if path.is_dir():
        folder = next((path / sub for sub in ("unet", "transformer") if (path / sub / "config.json").exists()), path)
        config_file = folder / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"inflate_from={str(path)!r}: no config.json there (nor in unet/, transformer/)")
        raw = json.loads(config_file.read_text())
        if image_arch == "unet":
            from models.convert import config_from_diffusers_unet as read
        else:
            from models.dit_checkpoints import config_from_diffusers_transformer as read
        try:
            return read(raw), folder
        except (KeyError, ValueError) as e:
            raise ValueError(f"inflate_from={str(path)!r}: {config_file} does not describe a {image_arch} ({e})") \
                from None
    config_file = path.with_suffix(".json")
    if not config_file.exists():
        raise FileNotFoundError(f"inflate_from={str(path)!r}: its config {config_file.name} is missing beside it "
                                "(a stage export writes both)")
    return denoiser_config(image_arch, json.loads(config_file.read_text()), f"inflate_from ({config_file})"), path


def micro_fourier_dim(model_config: Any) -> int:
    """The denoiser's Fourier width per micro-conditioning number: the U-Net's ``addition_time_embed_dim``, a
    sixth of the DiT's ``vector_dim``; SDXL's 256 where the config does not say."""
    width = getattr(model_config, "addition_time_embed_dim", None)
    if width is None and getattr(model_config, "vector_dim", None):
        width = model_config.vector_dim // 6
    return int(width or MICRO_FOURIER_DIM)


def sdxl_fourier_dim(cfg: DiffusionStageConfig) -> Optional[int]:
    """:func:`micro_fourier_dim` of the stage's denoiser where it takes SDXL's micro-conditioning, else None (what
    :class:`~training.inference.Inference` takes)."""
    return micro_fourier_dim(cfg.model_config) if cfg.micro_conditioning == "sdxl" else None


class StagePart:
    """What a stage takes besides its config and frozen encoders: an *objective* (the loss and its validation
    metrics, e.g. :class:`DenoisingObjective` or :class:`training.stages.dpo.DpoObjective`) or *adapters*
    (:class:`training.stages.lora.LoraAdapters`). Parts work for any denoiser, image or video, U-Net or DiT."""

    def bind(self, stage: "DiffusionStage") -> None:
        """Called once by the stage, after it built the denoiser and before adapters wrap it."""
        self.stage = stage

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Extra frozen modules the part uses (e.g. DPO's reference copy)."""
        return {}

    def export_metadata(self) -> dict[str, Any]:
        """Extra fields for an exported adapter's metadata."""
        return {}


class DenoisingObjective(StagePart):
    """The diffusion loss with classifier-free-guidance dropout (Ho & Salimans 2022): per sample, with probability
    ``cond_dropout`` the dropout groups of the conditioning (the text) are replaced by the null conditioning; the
    process draws t and noise; the loss is its weighted MSE. Validation: the same loss at fixed noise and t."""

    autocast_eval = False  # an evaluation copy holds the trained weights whole: no autocast needed

    def __init__(self, cond_dropout: float):
        self.cond_dropout = cond_dropout

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        stage = self.stage
        x0 = stage.latents_of(batch)  # (B, C, h, w) or (B, C, T, h, w)
        cond, null = trim_together(stage.conditioning_of(batch, trim=False), stage.null_conditioning(1))
        cond, dropped = drop_conditioning(cond, null, self.cond_dropout)  # the text group (Ho & Salimans)
        logs = {"dropped_fraction": dropped.float().mean()}  # on the device: read at the log line
        if stage.image_conditioned:  # image-to-video: the first frame, nulled on its own draw
            cond.image_latents = stage.first_frame_latents(x0, noise=stage.cfg.image_noise)
            # an image (a one-frame clip of joint image+video training) is never its own conditioning: the answer
            # would be in the input; it trains the text-to-image path of the one model
            p_image = 1.0 if x0.shape[2] == 1 else stage.cfg.image_dropout
            cond, image_dropped = drop_conditioning(cond, None, p_image, groups=("image",))
            logs["image_dropped_fraction"] = image_dropped.float().mean()
        terms = stage.process.training_loss_terms(x0)
        out = model(terms.x_t, terms.timesteps, cond)  # shaped like x0
        loss = stage.process.loss(out, terms)
        return loss, logs

    @torch.no_grad()
    def validation_loss(self, model: nn.Module) -> Optional[float]:
        """Loss on the validation batches at fixed noise and timesteps (comparable across steps and runs)."""
        stage = self.stage
        if not stage.val_batches:
            return None
        g = torch.Generator().manual_seed(1234)
        total, n = 0.0, 0
        for batch in stage.val_batches[: stage.cfg.validation_loss_batches]:
            batch = batch.to(stage.device)
            x0 = stage.latents_of(batch, generator=g)
            noise = torch.randn(x0.shape, generator=g).to(x0.device)
            t = stage.process.for_shape(x0.shape).sample_timesteps(x0.shape[0], g, torch.device("cpu")).to(x0.device)
            terms = stage.process.training_loss_terms(x0, noise=noise, t=t)
            cond = stage.conditioning_of(batch)
            if stage.image_conditioned:
                cond.image_latents = stage.first_frame_latents(x0)
            out = model(terms.x_t, terms.timesteps, cond)
            total += float(stage.process.loss(out, terms)) * len(batch)
            n += len(batch)
        return total / n

    def validation_metrics(self, model: nn.Module) -> dict[str, float]:
        val = self.validation_loss(model)
        return {} if val is None else {"loss": val}


class DiffusionStage(Stage):
    """A denoiser trained on (cached or encoded) latents with frozen text encoder and autoencoder.

    The same class is the ``diffusion``, ``lora`` and ``dpo`` stage: what differs are the parts it takes — the
    ``objective`` (default :class:`DenoisingObjective`; Diffusion-DPO's :class:`~training.stages.dpo.DpoObjective`)
    and optional ``adapters`` (:class:`~training.stages.lora.LoraAdapters`: LoRA on the frozen base, exported as
    an adapter file).
    """

    name = "diffusion"

    def __init__(
        self,
        cfg: DiffusionStageConfig,
        text_encoder: nn.Module,
        autoencoder: Optional[nn.Module],
        image_size: tuple[int, int],
        val_batches: Optional[list[Any]] = None,
        *,
        name: str = "diffusion",
        objective: Optional[StagePart] = None,
        adapters: Optional[StagePart] = None,
    ):
        """``image_size``: the ``(height, width)`` in pixels of the samples drawn at validation."""
        self.name = name
        self.cfg = cfg
        self.model = build_denoiser(cfg)
        self.text_encoder = text_encoder
        self.autoencoder = autoencoder
        self.process = build_process(cfg.process)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.val_batches = val_batches or []
        self.device = torch.device("cpu")
        self.compute_dtype = torch.float32
        self.objective = objective if objective is not None else DenoisingObjective(cfg.cond_dropout)
        self.adapters = adapters
        self.objective.bind(self)  # e.g. a frozen reference copy of the base, before adapters wrap it
        if adapters is not None:
            adapters.bind(self)
            self.model = adapters.attach(self.model)

    def trainable(self) -> nn.Module:
        return self.model

    def frozen_modules(self) -> dict[str, nn.Module]:
        frozen = {"text_encoder": self.text_encoder}
        if self.autoencoder is not None:
            frozen["autoencoder"] = self.autoencoder
        return {**frozen, **self.objective.frozen_modules()}

    def setup(self, device: torch.device, dtype: torch.dtype) -> None:
        super().setup(device, dtype)
        self.device = device
        self.compute_dtype = dtype
        if self.adapters is not None:
            self.adapters.setup(self.model, dtype)

    def autocast(self, device: torch.device) -> Any:
        """Autocast to the compute dtype for modules held in it outside Accelerate's own autocast (a cast LoRA base
        in evaluation copies, DPO's frozen reference); a no-op in fp32."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.compute_dtype)

    # ------------------------------------------------------------------------------------------- batch → inputs

    @torch.no_grad()
    def latents_of(self, batch: Any, generator: Optional[torch.Generator] = None) -> Tensor:
        """The clean latents ``x0`` of a batch, normalised for the denoiser."""
        if self.cfg.latents == "pixels":
            return batch.pixels
        if self.cfg.latents == "cache":
            if batch.latents is None:
                raise ValueError("diffusion.latents=cache but the batch has no latents: point the stage at the "
                                 "cache stage's shards (they hold KEY.latent.npy)")
            return self.cached_latents(batch.latents, generator)
        ae = self.autoencoder
        dtype = next(ae.parameters()).dtype
        return ae.latents_from_pixels(batch.pixels.to(dtype), generator=generator).float()

    def cached_latents(self, moments: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """A latent drawn from cached posterior moments (mean ‖ log-variance), normalised for the denoiser."""
        return self.autoencoder_scale(DiagonalGaussian(moments.float()).sample(generator))  # (B, C, h, w)

    @property
    def image_conditioned(self) -> bool:
        """Whether the denoiser takes the first frame's latent (``cond.image_latents``): an image-to-video model."""
        return bool(getattr(self.cfg.model_config, "concat_image_latents", False))

    def first_frame_latents(self, x0: Tensor, noise: float = 0.0) -> Tensor:
        """The image-to-video conditioning of clean clip latents ``x0`` ``(B, C, T, h, w)``: the first latent frame
        ``(B, C, 1, h, w)`` (the first pixel frame, alone, under a per-frame or causal autoencoder), plus Gaussian
        noise of std ``noise`` (augmentation). The denoiser repeats it over the frames."""
        if x0.ndim != 5:
            raise ValueError("an image-to-video denoiser trains on clips (B, C, T, h, w); got latents "
                             f"{tuple(x0.shape)} (set data.buckets.frames / data.video for a video run)")
        first = x0[:, :, :1]  # (B, C, 1, h, w)
        return first + noise * torch.randn_like(first) if noise > 0 else first

    def autoencoder_scale(self, z: Tensor) -> Tensor:
        if self.autoencoder is None:
            raise ValueError("cached latents need the autoencoder's scaling_factor: autoencoder_weights is missing")
        return self.autoencoder.scale_latents(z)

    @torch.no_grad()
    def conditioning_of(self, batch: Any, trim: bool = True) -> Conditioning:
        if self.cfg.latents == "cache" and "context" in batch.extras:
            ex = batch.extras
            cond = Conditioning(context=ex["context"].float(), context_mask=ex["context_mask"].bool(),
                                pooled=ex["pooled"].float() if "pooled" in ex else None)
        else:
            cond = self.text_encoder.encode(list(batch.captions)).to(self.device, torch.float32)
        vector = size_conditioning_vector(self.cfg.micro_conditioning, batch.original_size, batch.crop_top_left,
                                          batch.target_size, micro_fourier_dim(self.cfg.model_config))
        if vector is not None:
            cond.vector = vector.to(self.device)  # (B, V)
        return cond.trim_context() if trim else cond

    def null_conditioning(self, batch_size: int) -> Conditioning:
        return self.text_encoder.null_conditioning(batch_size).to(self.device, torch.float32)

    # --------------------------------------------------------------------------------------------------- loss

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        return self.objective.loss(model, batch)

    # ------------------------------------------------------------------------------------------ validation

    def inference(self, model: nn.Module) -> Inference:
        """``model`` (an evaluation copy) with this stage's frozen parts and sampling settings, for drawing samples."""
        return Inference(model, self.process, self.text_encoder,
                         self.autoencoder if self.cfg.latents != "pixels" else None, self.cfg.sampling,
                         self.image_size, sdxl_fourier_dim(self.cfg), size_conditioning=self.cfg.micro_conditioning)

    def validate(self, model: nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        autocast = self.adapters is not None or self.objective.autocast_eval
        with self.autocast(self.device) if autocast else contextlib.nullcontext():
            metrics = self.objective.validation_metrics(model)
            if self.cfg.validation_prompts:
                self.save_samples(model, step, out_dir)
        return metrics

    def save_samples(self, model: nn.Module, step: int, out_dir: Path) -> None:
        """The validation prompts drawn at fixed seed: a PNG grid of images, or for clips
        (``validation_num_frames``) a PNG contact sheet, an H.264 mp4 per prompt and one animated grid."""
        cfg = self.cfg
        samples = self.inference(model).generate(list(cfg.validation_prompts), num_frames=cfg.validation_num_frames)
        sheet = save_grid(samples, out_dir / f"samples_{step:08d}.png", nrow=len(samples), scale=2)
        self.keep_media("validation/samples", samples, fps=cfg.validation_fps)  # TensorBoard: a grid or clips
        if samples.ndim == 5:  # (B, C, T, H, W)
            for i, clip in enumerate(samples):
                save_clip_mp4(clip, sheet.with_name(f"{sheet.stem}-p{i}.mp4"), fps=cfg.validation_fps)
            save_clip_grid_animation(samples, sheet.with_suffix(".gif"), fps=cfg.validation_fps, scale=2)

    def export(self, model: nn.Module, out_dir: Path) -> Optional[Path]:
        if self.adapters is not None:
            return self.adapters.export(model, out_dir, {"stage": self.name, "base_weights": str(self.cfg.weights),
                                                         **self.objective.export_metadata()})
        return export_module(model, self.cfg.model_config, out_dir)
