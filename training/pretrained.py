"""``diffusion.pretrained=PATH``: a run (or ``loom sample``) starts from a published checkpoint as the files give it.

``PATH`` is one of

* a **diffusers pipeline folder** (``model_index.json`` with ``unet/`` or ``transformer/``, ``vae/``,
  ``text_encoder/`` (and ``text_encoder_2/`` for SDXL), ``tokenizer/``, ``scheduler/``): Stable Diffusion 1.x / 2.x
  / XL, DiT (``DiTPipeline``, class-conditional) and PixArt-α/Σ;
* an **original single file** (``.safetensors`` / ``.ckpt``) of Stable Diffusion 1.x, 2.x or XL
  (``model.diffusion_model.*``, ``first_stage_model.*``): the family is told by the text-encoder keys it holds
  (``cond_stage_model.transformer`` → 1.x, ``cond_stage_model.model`` → 2.x, ``conditioner.embedders`` or the U-Net's
  ``label_emb`` → XL) or else by the U-Net's text width (768 / 1024 / 2048); every size is read off the tensor shapes;
* an **original DiT / PixArt checkpoint** (``DiT-XL-2-256x256.pt``, ``PixArt-XL-2-*.pth``).

:func:`read_pretrained` turns it into a :class:`Pretrained` bundle: the denoiser's config and where its weights are,
the autoencoder's, the text encoder's config, the diffusion process settings (prediction type, beta schedule and
range, timestep count, zero-terminal SNR, flow vs DDPM and the flow shift, read from ``scheduler_config.json``), the
scaling and shift factor (the autoencoder's config), the sampler the pipeline ships (DDIM's spacing, offset and
``set_alpha_to_one``; DPM-Solver's Karras sigmas) and the default image size. :func:`apply_pretrained` fills a
:class:`~training.stages.diffusion.DiffusionStageConfig` from it when the config is built, so the diffusion stage
(fine-tuning), the ``lora`` and ``dpo`` stages, the report and ``loom sample`` all start from it, and the resolved
``config.yaml`` of a run spells out what the files said.

**What wins** (the override rule):

* What the files *describe* decides: the denoiser architecture (``denoiser`` and the ``model.<arch>`` section), the
  process fields the scheduler gives, the text encoder's identity (``format``, ``pretrained``, ``checkpoint``,
  ``layer``, ``hidden_ln_final``, ``mask_padding``, ``max_length``) and the image-size conditioning
  (``micro_conditioning``: ``sdxl`` for an SDXL U-Net, ``pixart`` for PixArt-α's multi-scale transformers, the
  ``-MS`` ``.pth`` files with ``csize_embedder`` / ``ar_embedder`` and diffusers folders whose transformer has
  ``use_additional_conditions``, true by default at ``sample_size`` 128). A YAML value that
  differs from its default *and* from the files' value is an error naming both. (A value equal to the default cannot
  be told from an unset one and is replaced by the files' value.) The run-time fields of the model section
  (:data:`RUNTIME_MODEL_FIELDS`: gradient checkpointing, attention backend, dropout) are the user's to set.
* What the files do *not* say is the YAML's: everything about training and data, the sampler (the shipped scheduler's
  settings only fill fields left at their defaults), and for single files the process (the family's published
  settings fill fields left at their defaults: an SD 2.x 768-v single file needs ``process.prediction:
  v_prediction``, which its keys cannot tell).
* Files the user names replace a part: ``diffusion.weights`` (the denoiser's weights, e.g. a fine-tuned export of
  the same architecture), ``diffusion.autoencoder_weights`` (another VAE: a diffusers ``vae/`` folder or file, an
  original single file or an export of ours), ``diffusion.text_encoder`` where the files hold no encoder (DiT /
  PixArt checkpoints) and, when set, over an SD 1.x / XL single file's own encoders. Those single files keep no
  tokenizer; their encoders (``cond_stage_model.transformer.*``; ``conditioner.embedders.0.transformer.*`` +
  ``conditioner.embedders.1.model.*``) are built from the file with the CLIP BPE vocabulary open_clip bundles
  (:mod:`models.hf_text_encoders`), so no setting is needed.

A denoiser trained with a learned variance (DiT, PixArt: ``out_channels = 2 × in_channels``) is loaded without the
variance half of its output layer: our samplers and loss use the prediction half only, as diffusers' ``DiTPipeline``
does with DDIM and DPM-Solver. A class-conditional denoiser (DiT on ImageNet) reads its prompts as class ids or
names (:class:`ClassLabelEncoder`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from models.autoencoder import AutoencoderConfig, AutoencoderKL
from models.conditioning import Conditioning
from models.text_encoder import TextEncoderConfig

#: fields of a denoiser config the user may set over a pretrained one (they change no weight and no function)
RUNTIME_MODEL_FIELDS: tuple[str, ...] = ("gradient_checkpointing", "attention_backend", "dropout")
#: text-encoder fields the files decide (the others, dtype / freeze / cache_dir, stay the YAML's)
TEXT_ENCODER_FIELDS: tuple[str, ...] = ("format", "pretrained", "checkpoint", "layer", "hidden_ln_final",
                                        "mask_padding", "max_length")
LDM_UNET = "model.diffusion_model."
LDM_VAE = "first_stage_model."
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# diffusers' beta_schedule -> ours
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine",
                  "sigmoid": "sigmoid"}
# Stable Diffusion's published process and shipped DDIM (scheduler/scheduler_config.json of SD 1.x / 2.x / XL)
SD_PROCESS: dict[str, Any] = dict(kind="discrete", schedule="scaled_linear", num_timesteps=1000, beta_start=0.00085,
                                  beta_end=0.012, prediction="epsilon")
SD_SAMPLING: dict[str, Any] = dict(sampler="ddim", spacing="leading", steps_offset=1, set_alpha_to_one=False)
# DiT (Peebles & Xie 2023) and PixArt-α: ADM's linear schedule, ε with a learned variance
DIT_PROCESS: dict[str, Any] = dict(kind="discrete", schedule="linear", num_timesteps=1000, beta_start=0.0001,
                                   beta_end=0.02, prediction="epsilon")
# per single-file family: published scaling factor, heads rule, image side in pixels
SD_FAMILIES: dict[str, dict[str, Any]] = {
    "sd15": dict(scaling_factor=0.18215, heads=dict(num_heads=8, head_dim=None), image=512, context=768),
    "sd2": dict(scaling_factor=0.18215, heads=dict(num_heads=None, head_dim=64), image=512, context=1024),
    "sdxl": dict(scaling_factor=0.13025, heads=dict(num_heads=None, head_dim=64), image=1024, context=2048),
}


class PretrainedError(ValueError):
    """``diffusion.pretrained`` names something that cannot be read as a checkpoint (the message names the file)."""


@dataclass(frozen=True)
class Pretrained:
    """What a checkpoint's files say: each part's config and weights, and the process settings."""

    path: str  # what diffusion.pretrained named
    layout: str  # "diffusers" (pipeline folder) | "single-file" (original SD) | "original" (DiT / PixArt .pt/.pth)
    family: str  # sd15 | sd2 | sdxl | dit | pixart | pixart-sigma (diffusers pipeline class when another)
    denoiser_config: Any  # our denoiser's typed config (UNetConfig / DiTConfig), learn_sigma dropped
    denoiser_source: str  # the file or diffusers model folder its weights are read from
    learned_sigma: bool = False  # the file's output layer also predicts a variance: that half is dropped on load
    autoencoder_config: Optional[AutoencoderConfig] = None  # None: the files hold no autoencoder
    autoencoder_source: Optional[str] = None  # the diffusers vae/ folder or the single file
    text_encoder: Optional[TextEncoderConfig] = None  # None: see text_encoder_note
    text_encoder_note: str = ""  # why the files give no text encoder this project can build
    # a diffusion.text_encoder the user sets replaces the files' one (an SD 1.x / XL single file's: older configs
    # named the matching diffusers folder there); False: a differing setting is an error (the override rule)
    text_encoder_replaceable: bool = False
    # the family's published text-encoder settings, filling a user-given encoder's fields left at their defaults
    text_encoder_defaults: Mapping[str, Any] = field(default_factory=dict)
    num_classes: Optional[int] = None  # class-conditional denoiser: prompts are class ids / names
    class_names: Mapping[str, int] = field(default_factory=dict)  # DiTPipeline's id2label, inverted (lower case)
    process: Mapping[str, Any] = field(default_factory=dict)  # DiffusionConfig fields the files decide
    process_defaults: Mapping[str, Any] = field(default_factory=dict)  # the family's, where the YAML says nothing
    sampling: Mapping[str, Any] = field(default_factory=dict)  # SamplingConfig fields of the shipped scheduler
    micro_conditioning: str = "none"  # the denoiser's image-size conditioning: none | sdxl | pixart (multi-scale)
    image_size: int = 512  # default image side in pixels

    @property
    def architecture(self) -> str:
        from models.registry import get_architecture

        return get_architecture(self.denoiser_config).name

    def describe(self) -> str:
        """One line for logs and ``loom sample``'s plan."""
        parts = [f"{self.architecture} ({self.layout} {self.family})"]
        parts.append("autoencoder" if self.autoencoder_config is not None else "no autoencoder")
        te = self.text_encoder
        parts.append(f"text encoder {te.format}" if te is not None else
                     ("class labels" if self.num_classes else "no text encoder"))
        proc = {**self.process_defaults, **self.process}
        parts.append(f"{proc.get('kind')} {proc.get('schedule', '')} {proc.get('prediction', '')}".strip())
        return f"{self.path}: " + ", ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# Reading: which layout, then each part
# ----------------------------------------------------------------------------------------------------------------


def read_pretrained(path: Union[str, Path]) -> Pretrained:
    """The :class:`Pretrained` bundle of a diffusers pipeline folder, an original SD single file or an original
    DiT / PixArt checkpoint; :class:`PretrainedError` (or ``FileNotFoundError``) naming the file when it is none."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"diffusion.pretrained={str(path)!r}: does not exist (a diffusers pipeline folder, "
                                "a .safetensors/.ckpt single file or a DiT/PixArt .pt/.pth)")
    stamp = (p / "model_index.json").stat().st_mtime_ns if (p / "model_index.json").exists() else p.stat().st_mtime_ns
    return _read_cached(str(p.resolve()), stamp, str(path))


@functools.lru_cache(maxsize=8)
def _read_cached(resolved: str, stamp: int, named: str) -> Pretrained:
    p = Path(resolved)
    if p.is_dir():
        return _read_folder(p, named)
    if p.suffix not in SINGLE_FILE_SUFFIXES:
        raise PretrainedError(f"diffusion.pretrained={named!r}: {p.name} is neither a diffusers pipeline folder nor "
                              f"a checkpoint file ({', '.join(SINGLE_FILE_SUFFIXES)})")
    shapes = _tensor_shapes(p)
    if any(k.startswith(LDM_UNET) for k in shapes):
        return _read_sd_single_file(p, named, shapes)
    if "x_embedder.proj.weight" in shapes:
        return _read_original_transformer(p, named, shapes)
    raise PretrainedError(
        f"diffusion.pretrained={named!r}: {p.name} has neither an original Stable Diffusion layout "
        f"({LDM_UNET}*) nor an original DiT/PixArt one (x_embedder.proj.weight); its keys start "
        f"{sorted(shapes)[:4]} (a diffusers model file? give the pipeline folder)")


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape (a safetensors header only; a torch file is loaded)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise PretrainedError(f"diffusion.pretrained: {path} is not a readable safetensors file ({e})") from e
    from training.weights import read_state_dict

    return {k: tuple(v.shape) for k, v in read_state_dict(path).items() if isinstance(v, Tensor)}


def _json(path: Path, named: str) -> dict[str, Any]:
    if not path.is_file():
        raise PretrainedError(f"diffusion.pretrained={named!r}: {path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PretrainedError(f"diffusion.pretrained={named!r}: {path} is not valid JSON ({e})") from e


def _listed(index: Mapping[str, Any], name: str) -> bool:
    """Whether ``model_index.json`` lists the part ``name`` (``[library, class]``, not ``[null, null]``)."""
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


def _read_folder(root: Path, named: str) -> Pretrained:
    from models.convert import config_from_diffusers_unet, config_from_diffusers_vae
    from models.dit_checkpoints import config_from_diffusers_transformer
    from models.hf_text_encoders import published_text_encoder_config

    index = _json(root / "model_index.json", named)
    pipeline = str(index.get("_class_name", ""))

    def part(name: str) -> Optional[Path]:
        if not _listed(index, name):
            return None
        file = {"scheduler": "scheduler_config.json"}.get(name, "tokenizer_config.json" if name.startswith(
            "tokenizer") else "config.json")
        config = root / name / file
        if not config.is_file():
            raise PretrainedError(f"diffusion.pretrained={named!r}: model_index.json lists {name!r} but {config} is "
                                  "missing")
        return config

    unet, transformer = part("unet"), part("transformer")
    if unet is None and transformer is None:
        raise PretrainedError(f"diffusion.pretrained={named!r}: {root / 'model_index.json'} lists no 'unet' nor "
                              "'transformer' (the denoiser)")
    denoiser_file = unet if unet is not None else transformer
    raw = _json(denoiser_file, named)
    try:
        config = (config_from_diffusers_unet(raw) if unet is not None else config_from_diffusers_transformer(raw))
    except (KeyError, ValueError) as e:
        raise PretrainedError(f"diffusion.pretrained={named!r}: {denoiser_file}: {e}") from None
    learned = bool(getattr(config, "learn_sigma", False))
    if learned:
        config = dataclasses.replace(config, learn_sigma=False)

    ae_config, ae_source, factor = None, None, 8
    vae = part("vae")
    if vae is not None:
        try:
            ae_config = config_from_diffusers_vae(_json(vae, named))
        except (KeyError, ValueError) as e:
            raise PretrainedError(f"diffusion.pretrained={named!r}: {vae}: {e}") from None
        ae_source, factor = str(vae.parent), 2 ** (len(ae_config.block_out_channels) - 1)

    text, note, num_classes, names = None, "", None, {}
    te = part("text_encoder")
    if te is not None:
        te_raw = _json(te, named)
        if part("tokenizer") is None:
            raise PretrainedError(f"diffusion.pretrained={named!r}: {root / 'model_index.json'} lists text_encoder but "
                                  "no tokenizer")
        kind = str(te_raw.get("model_type", ""))
        if _listed(index, "text_encoder_2"):
            part("text_encoder_2"), part("tokenizer_2")
            family = "sdxl"
        elif kind in ("t5", "umt5"):
            family = "pixart-sigma" if "Sigma" in pipeline else "pixart-alpha"
        elif kind.startswith("clip"):
            family = "sd15"
        else:
            raise PretrainedError(f"diffusion.pretrained={named!r}: {te} has model_type {kind!r}; text encoders read "
                                  "here: CLIP (SD 1.x/2.x), CLIP + OpenCLIP-bigG (SDXL), T5 (PixArt)")
        text = published_text_encoder_config(family, str(root))
    elif getattr(config, "num_classes", None):
        num_classes = int(config.num_classes)
        names = _class_names(index.get("id2label"))
    else:
        note = f"{root / 'model_index.json'} lists no text_encoder"

    sched = part("scheduler")
    process, sampling = process_from_scheduler(_json(sched, named), str(sched)) if sched is not None else ({}, {})
    family_name = {"StableDiffusionPipeline": "sd15" if getattr(config, "cross_attention_dim", 0) != 1024 else "sd2",
                   "StableDiffusionXLPipeline": "sdxl", "DiTPipeline": "dit", "PixArtAlphaPipeline": "pixart",
                   "PixArtSigmaPipeline": "pixart-sigma"}.get(pipeline, pipeline or "diffusers")
    side = int(raw.get("sample_size") or getattr(config, "sample_size", 64) or 64) * factor
    return Pretrained(
        path=named, layout="diffusers", family=family_name, denoiser_config=config,
        denoiser_source=str(denoiser_file.parent), learned_sigma=learned, autoencoder_config=ae_config,
        autoencoder_source=ae_source, text_encoder=text, text_encoder_note=note, num_classes=num_classes,
        class_names=names, process=process, sampling=sampling,
        micro_conditioning=_size_conditioning(config), image_size=side)


def _size_conditioning(config: Any) -> str:
    """The image-size conditioning a denoiser config was built for: ``sdxl`` for a U-Net with SDXL's ``text_time``
    addition embedding, ``pixart`` for a PixArt DiT with the size embedders (its ``vector_dim``: diffusers'
    ``use_additional_conditions``, true by default at ``sample_size`` 128; the original ``csize_embedder``), else
    ``none``."""
    if getattr(config, "addition_embed_type", "none") == "text_time":
        return "sdxl"
    if getattr(config, "adaln_single", False) and getattr(config, "vector_dim", None):
        return "pixart"
    return "none"


def _class_names(id2label: Any) -> dict[str, int]:
    """DiTPipeline's ``id2label`` (id → "name, synonym, ...") as lower-case name → id."""
    names: dict[str, int] = {}
    for key, value in (id2label or {}).items():
        for name in str(value).split(","):
            names.setdefault(name.strip().lower(), int(key))
    return names


def process_from_scheduler(raw: Mapping[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A diffusers ``scheduler_config.json`` → (``DiffusionConfig`` fields, ``SamplingConfig`` fields)."""
    cls = str(raw.get("_class_name", ""))
    if cls.startswith("FlowMatch"):
        if raw.get("use_dynamic_shifting"):
            raise PretrainedError(f"{where}: use_dynamic_shifting=true (Flux's resolution-dependent shift) is not "
                                  "supported; a fixed shift is (SD3)")
        return dict(kind="flow", flow_shift=float(raw.get("shift", 1.0))), dict(sampler="euler")
    if raw.get("trained_betas") is not None:
        raise PretrainedError(f"{where}: trained_betas (a stored beta table) is not supported; a beta_schedule is")
    schedule = raw.get("beta_schedule", "linear")
    if schedule not in BETA_SCHEDULES:
        raise PretrainedError(f"{where}: beta_schedule={schedule!r}; supported: {', '.join(BETA_SCHEDULES)}")
    prediction = raw.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise PretrainedError(f"{where}: prediction_type={prediction!r}; supported: epsilon, v_prediction, sample")
    ours = BETA_SCHEDULES[schedule]
    process: dict[str, Any] = dict(kind="discrete", schedule=ours, num_timesteps=int(raw.get("num_train_timesteps",
                                                                                             1000)),
                                   prediction=prediction, zero_terminal_snr=bool(raw.get("rescale_betas_zero_snr")))
    if ours != "cosine":
        process.update(beta_start=float(raw.get("beta_start", 0.0001)), beta_end=float(raw.get("beta_end", 0.02)))
    sampler = {"DDPMScheduler": "ddpm", "DPMSolverMultistepScheduler": "dpm_solver_2m"}.get(cls, "ddim")
    spacing = raw.get("timestep_spacing", "linspace" if sampler == "dpm_solver_2m" else "leading")
    sampling: dict[str, Any] = dict(sampler=sampler, spacing=spacing, steps_offset=int(raw.get("steps_offset", 0)))
    if sampler == "ddim":  # DDIM's own config, and PNDM's (SD 1.x ships PNDM; same table)
        sampling["set_alpha_to_one"] = bool(raw.get("set_alpha_to_one", cls not in ("PNDMScheduler",)))
    if sampler == "dpm_solver_2m":
        sampling["karras_sigmas"] = bool(raw.get("use_karras_sigmas", False))
    return process, sampling


# ---- original Stable Diffusion single files ---------------------------------------------------------------------


def _sd_family(shapes: Mapping[str, tuple[int, ...]], named: str) -> str:
    if any(k.startswith("conditioner.embedders.") for k in shapes) or f"{LDM_UNET}label_emb.0.0.weight" in shapes:
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        return "sd15"
    widths = {s[1] for k, s in shapes.items() if k.startswith(LDM_UNET) and k.endswith("attn2.to_k.weight")}
    for family, spec in SD_FAMILIES.items():
        if widths == {spec["context"]}:
            return family
    raise PretrainedError(f"diffusion.pretrained={named!r}: cannot tell Stable Diffusion 1.x, 2.x or XL apart: no "
                          f"text-encoder keys and a U-Net text width {sorted(widths)} of none of them (768/1024/2048)")


def unet_config_from_ldm(shapes: Mapping[str, tuple[int, ...]], family: str) -> Any:
    """Our :class:`~models.unet.UNetConfig` read off an original SD U-Net's tensor shapes (``model.diffusion_model.*``).

    Widths, levels, ResBlocks per level, attention levels and depths, text width, linear projections, the time
    embedding and SDXL's ``text_time`` embedding come from the shapes; the head layout, which shapes do not show, from
    the family (SD 1.x: 8 heads, SD 2.x / XL: 64 channels per head)."""
    from models.unet import UNetConfig

    s = {k[len(LDM_UNET):]: v for k, v in shapes.items() if k.startswith(LDM_UNET)}
    widths, res_per_level, attn, depth, count = [], [], [], [], 0
    k = 1
    while f"input_blocks.{k}.0.op.weight" in s or f"input_blocks.{k}.0.in_layers.2.weight" in s:
        if f"input_blocks.{k}.0.op.weight" in s:  # a downsampler closes the level
            res_per_level.append(count)
            count = 0
        else:
            if count == 0:
                widths.append(s[f"input_blocks.{k}.0.in_layers.2.weight"][0])
                blocks = {int(m.group(1)) for n in s if (m := re.match(rf"input_blocks\.{k}\.1\.transformer_blocks\."
                                                                       r"(\d+)\.", n))}
                attn.append(bool(blocks))
                depth.append(max(blocks) + 1 if blocks else 1)
            count += 1
        k += 1
    res_per_level.append(count)
    if not widths or len(set(res_per_level)) != 1:
        raise PretrainedError(f"original SD U-Net: cannot read its levels (ResBlocks per level {res_per_level})")
    mid = {int(m.group(1)) for n in s if (m := re.match(r"middle_block\.1\.transformer_blocks\.(\d+)\.", n))}
    to_k = [v for n, v in s.items() if n.endswith("attn2.to_k.weight")]
    proj_in = next(v for n, v in s.items() if n.endswith(".proj_in.weight"))
    time_dim = s["time_embed.0.weight"][0]
    kwargs: dict[str, Any] = dict(
        in_channels=s["input_blocks.0.0.weight"][1], out_channels=s["out.2.weight"][0], block_out_channels=widths,
        layers_per_block=res_per_level[0], attention_levels=attn, transformer_depth=depth,
        transformer_depth_mid=None if not mid or max(mid) + 1 == depth[-1] else max(mid) + 1,
        cross_attention_dim=to_k[0][1] if to_k else None, use_linear_projection=len(proj_in) == 2,
        time_embed_dim=None if time_dim == 4 * widths[0] else time_dim,
    )
    heads = SD_FAMILIES[family]["heads"]
    kwargs.update(num_heads=None if heads["num_heads"] is None else [heads["num_heads"]] * len(widths),
                  head_dim=heads["head_dim"])
    if "label_emb.0.0.weight" in s:  # SDXL: pooled text + 6 Fourier-featured size numbers
        kwargs.update(addition_embed_type="text_time", addition_embed_input_dim=s["label_emb.0.0.weight"][1],
                      addition_time_embed_dim=256)
    elif "label_emb.weight" in s:
        kwargs["num_classes"] = s["label_emb.weight"][0]
    return UNetConfig(**kwargs)


def vae_config_from_ldm(shapes: Mapping[str, tuple[int, ...]], scaling_factor: float) -> AutoencoderConfig:
    """Our :class:`AutoencoderConfig` read off an original SD autoencoder's shapes (``first_stage_model.*``)."""
    s = {k[len(LDM_VAE):]: v for k, v in shapes.items() if k.startswith(LDM_VAE)}
    if "encoder.conv_in.weight" not in s:
        raise PretrainedError("original SD single file: no first_stage_model.encoder.conv_in.weight (no autoencoder)")
    widths, i = [], 0
    while f"encoder.down.{i}.block.0.conv2.weight" in s:
        widths.append(s[f"encoder.down.{i}.block.0.conv2.weight"][0])
        i += 1
    layers = len({n.split(".")[4] for n in s if n.startswith("encoder.down.0.block.")})
    return AutoencoderConfig(
        in_channels=s["encoder.conv_in.weight"][1], out_channels=s["decoder.conv_out.weight"][0],
        latent_channels=s["encoder.conv_out.weight"][0] // 2, block_out_channels=widths, layers_per_block=layers,
        mid_block_attention="encoder.mid.attn_1.q.weight" in s, use_quant_conv="quant_conv.weight" in s,
        use_post_quant_conv="post_quant_conv.weight" in s, scaling_factor=scaling_factor)


def _read_sd_single_file(path: Path, named: str, shapes: Mapping[str, tuple[int, ...]]) -> Pretrained:
    family = _sd_family(shapes, named)
    spec = SD_FAMILIES[family]
    try:
        unet = unet_config_from_ldm(shapes, family)
        vae = vae_config_from_ldm(shapes, spec["scaling_factor"])
    except (KeyError, StopIteration, PretrainedError) as e:
        raise PretrainedError(f"diffusion.pretrained={named!r}: {path.name} is not a complete original SD file "
                              f"({e})") from None
    from models.hf_text_encoders import PUBLISHED, SINGLE_FILE_PARTS

    text, note = None, ""
    if family == "sd2":  # its OpenCLIP ViT-H tower, read by TextEncoder from the file (SD 2.x's settings)
        text = TextEncoderConfig(checkpoint=str(path), layer="penultimate", hidden_ln_final=True, mask_padding=False)
    else:  # SD 1.x's CLIP-L / SDXL's CLIP-L + bigG, built from the file with the CLIP BPE (models.hf_text_encoders)
        fmt = PUBLISHED[family]["format"]
        wanted = [prefix for prefix, _ in SINGLE_FILE_PARTS[fmt]]
        if all(any(k.startswith(prefix) for k in shapes) for prefix in wanted):
            text = TextEncoderConfig(pretrained=str(path), **PUBLISHED[family])
        else:
            note = (f"{path.name} holds no {'CLIP' if family == 'sd15' else 'CLIP-L + OpenCLIP-bigG'} text encoder "
                    f"({' and '.join(p + '*' for p in wanted)}): set diffusion.text_encoder, e.g. format={fmt} "
                    "pretrained=<the matching diffusers pipeline folder>")

    return Pretrained(
        path=named, layout="single-file", family=family, denoiser_config=unet, denoiser_source=str(path),
        autoencoder_config=vae, autoencoder_source=str(path), text_encoder=text, text_encoder_note=note,
        text_encoder_replaceable=family != "sd2",
        text_encoder_defaults={k: v for k, v in PUBLISHED[family].items() if k != "format"},
        process_defaults=SD_PROCESS, sampling=SD_SAMPLING, micro_conditioning="sdxl" if family == "sdxl" else "none",
        image_size=spec["image"])


# ---- original DiT / PixArt ------------------------------------------------------------------------------------


def _read_original_transformer(path: Path, named: str, shapes: Mapping[str, tuple[int, ...]]) -> Pretrained:
    from models.dit_checkpoints import config_from_original_state_dict

    meta = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    width = shapes["x_embedder.proj.weight"][0]
    from models.dit import DIT_SIZES

    heads = {} if width in {size[1] for size in DIT_SIZES.values()} else {"num_heads": max(width // 64, 1)}
    try:  # published sizes name their heads; any other width: 64-channel heads, as every published DiT/PixArt has
        config = config_from_original_state_dict(meta, **heads)
    except (KeyError, ValueError) as e:
        raise PretrainedError(f"diffusion.pretrained={named!r}: {path.name}: {e}") from None
    learned = bool(config.learn_sigma)
    config = dataclasses.replace(config, learn_sigma=False)
    pixart = config.context_dim is not None
    note = (f"{path.name} holds no text encoder: set diffusion.text_encoder (format=hf-t5 pretrained=<a T5 folder> "
            "max_length=120)") if pixart else ""
    return Pretrained(
        path=named, layout="original", family="pixart" if pixart else "dit", denoiser_config=config,
        denoiser_source=str(path), learned_sigma=learned, text_encoder_note=note,
        num_classes=None if pixart else config.num_classes, process_defaults=DIT_PROCESS,
        text_encoder_defaults=dict(layer="last", max_length=120) if pixart else {},
        sampling=dict(sampler="ddim"), image_size=config.sample_size * 8, micro_conditioning=_size_conditioning(config))


# ----------------------------------------------------------------------------------------------------------------
# Loading the parts
# ----------------------------------------------------------------------------------------------------------------


def load_pretrained_denoiser(model: nn.Module, pretrained: Union[str, Path]) -> str:
    """Load the checkpoint's denoiser weights into ``model`` (built from the bundle's config) strictly; a learned
    variance half of the output layer is dropped. Returns the naming the file matched."""
    from training.weights import load_weights

    bundle = read_pretrained(pretrained)
    if not bundle.learned_sigma:
        return load_weights(model, bundle.denoiser_source)
    from models.registry import get_architecture
    from training.weights import read_state_dict

    full = dataclasses.replace(model.config, learn_sigma=True)
    state = read_state_dict(bundle.denoiser_source, "denoiser")
    errors = []
    for naming, convert in get_architecture(full).converters.items():
        try:
            ours = convert(state, full)
        except (KeyError, ValueError, RuntimeError) as e:
            errors.append(f"{naming}: {e}")
            continue
        model.load_state_dict(drop_learned_sigma(ours, full), strict=True)
        return naming
    raise PretrainedError(f"diffusion.pretrained={bundle.path!r}: {bundle.denoiser_source} matches none of the "
                          f"transformer layouts ({'; '.join(errors)})")


def drop_learned_sigma(state: Mapping[str, Tensor], config: Any) -> dict[str, Tensor]:
    """A learned-variance DiT state dict (ours) → the same DiT without the variance: the output layer keeps the rows
    of the first ``out_channels`` of each patch pixel (its features are laid out (frame, row, col, channel))."""
    out = dict(state)
    channels = 2 * (config.out_channels or config.in_channels)
    for name in ("final_layer.linear.weight", "final_layer.linear.bias"):
        w = state[name]
        rows = w.reshape(-1, channels, *w.shape[1:])  # (p_t·p·p, 2C, ...)
        out[name] = rows[:, : channels // 2].reshape(-1, *w.shape[1:]).contiguous()
    return out


def load_autoencoder_any(weights: Union[str, Path]) -> AutoencoderKL:
    """A frozen autoencoder from a diffusers VAE folder (``config.json`` + ``diffusion_pytorch_model.safetensors``,
    or a pipeline folder with ``vae/``), a diffusers VAE weights file with its ``config.json`` beside, an original
    SD single file (config read off its shapes, the family's scaling factor) or an export of ours (``model.json``
    beside: :func:`training.builders.load_autoencoder`)."""
    from models.convert import config_from_diffusers_vae
    from training.weights import load_weights

    path = Path(weights)
    if not path.exists():
        raise FileNotFoundError(f"autoencoder weights {path} do not exist")
    config: Optional[AutoencoderConfig] = None
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"autoencoder folder {path}: no config.json there (nor in vae/)")
        config, path = config_from_diffusers_vae(json.loads((folder / "config.json").read_text())), folder
    elif path.with_suffix(".json").is_file():
        from training.builders import load_autoencoder

        return load_autoencoder(path)
    elif (path.parent / "config.json").is_file():  # a diffusers vae/ weights file
        config = config_from_diffusers_vae(json.loads((path.parent / "config.json").read_text()))
    else:
        bundle = read_pretrained(path)
        if bundle.autoencoder_config is None:
            raise PretrainedError(f"autoencoder weights {path}: the file holds no autoencoder")
        config = bundle.autoencoder_config
    model = AutoencoderKL(config)
    load_weights(model, path)
    return model.eval().requires_grad_(False)


def autoencoder_weights_file(path: Path) -> Path:
    """The one file that identifies an autoencoder (a folder's weights file; a file itself), for cache signatures."""
    if not path.is_dir():
        return path
    from training.weights import DIFFUSERS_WEIGHTS, model_folder

    return model_folder(path, "autoencoder") / DIFFUSERS_WEIGHTS


class ClassLabelEncoder(nn.Module):
    """Prompts → class labels for a class-conditional denoiser (DiT on ImageNet), in the text encoder's place.

    A prompt is a class id (``"207"``), a class name of the pipeline's ``id2label`` (``"golden retriever"``), or
    ``""``: the null class ``num_classes``, the unconditional branch of classifier-free guidance (DiT's CFG)."""

    frozen = True

    def __init__(self, num_classes: int, names: Optional[Mapping[str, int]] = None):
        super().__init__()
        self.num_classes = int(num_classes)
        self.names = dict(names or {})
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # follows .to(device)

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def label(self, prompt: str) -> int:
        text = prompt.strip().lower()
        if not text:
            return self.num_classes
        if text.isdigit() and int(text) < self.num_classes:
            return int(text)
        if text in self.names:
            return self.names[text]
        raise ValueError(f"prompt {prompt!r}: a class-conditional model takes a class id in [0, {self.num_classes}) "
                         f"{'or a class name of its id2label ' if self.names else ''}or '' (unconditional)")

    def encode(self, prompts: Union[str, Sequence[str]]) -> Conditioning:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        labels = torch.tensor([self.label(p) for p in prompts], dtype=torch.long, device=self.device)  # (B,)
        return Conditioning(class_labels=labels)

    def null_conditioning(self, batch_size: int) -> Conditioning:
        return Conditioning(class_labels=torch.full((batch_size,), self.num_classes, dtype=torch.long,
                                                    device=self.device))


def class_label_encoder(stage_cfg: Any) -> Optional[ClassLabelEncoder]:
    """The :class:`ClassLabelEncoder` of a stage started from a checkpoint whose denoiser is class-conditional
    without text (None otherwise: other runs keep their text encoder)."""
    if not getattr(stage_cfg, "pretrained", None):
        return None
    config = stage_cfg.model_config
    num_classes = getattr(config, "num_classes", None)
    text = getattr(config, "context_dim", None) or getattr(config, "cross_attention_dim", None)
    if not num_classes or text:
        return None
    return ClassLabelEncoder(num_classes, read_pretrained(stage_cfg.pretrained).class_names)


# ----------------------------------------------------------------------------------------------------------------
# Filling a stage config (the override rule of the module docstring)
# ----------------------------------------------------------------------------------------------------------------


def _default(cls: type, name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _decide(key: str, yaml_value: Any, default: Any, file_value: Any, source: str) -> Any:
    """The files' value, unless the YAML set another one away from the default: then an error naming both."""
    if yaml_value != default and yaml_value != file_value:
        raise PretrainedError(f"diffusion.{key}={yaml_value!r} contradicts diffusion.pretrained={source!r}, whose "
                              f"files say {file_value!r}: remove the setting (the files decide it)")
    return file_value


def apply_pretrained(cfg: Any) -> None:
    """Fill the :class:`~training.stages.diffusion.DiffusionStageConfig` ``cfg`` (in place, from its
    ``__post_init__``) with what ``cfg.pretrained`` says, by the module docstring's rule."""
    from models.registry import get_architecture
    from training.config_io import to_dict
    from training.diffusion import DiffusionConfig
    from training.sampling import SamplingConfig
    from training.stages.diffusion import DiffusionStageConfig

    p = read_pretrained(cfg.pretrained)
    src = p.path
    arch = get_architecture(p.denoiser_config).name
    # the denoiser: architecture and config from the files; run-time fields from the YAML
    if cfg.denoiser.lower() not in (_default(DiffusionStageConfig, "denoiser"), arch):
        _decide("denoiser", cfg.denoiser, "", arch, src)
    file_fields = to_dict(p.denoiser_config)
    section = next((v for k, v in cfg.model.items() if k.lower() == arch), {}) or {}
    if dataclasses.is_dataclass(section):
        section = {k: v for k, v in to_dict(section).items() if v != file_fields.get(k)}
    runtime = {}
    for key, value in dict(section).items():
        if key in RUNTIME_MODEL_FIELDS:
            runtime[key] = value
        elif key not in file_fields or value != file_fields[key]:
            raise PretrainedError(f"diffusion.model.{arch}.{key}={value!r} contradicts diffusion.pretrained="
                                  f"{src!r}, whose files say {file_fields.get(key, '(no such field)')!r}: remove the "
                                  f"setting (only {', '.join(RUNTIME_MODEL_FIELDS)} may be set over a checkpoint)")
    cfg.denoiser = arch
    cfg.model = {**{k: v for k, v in cfg.model.items() if k.lower() != arch}, arch: {**file_fields, **runtime}}
    # the process: decided where the scheduler says, defaulted where a single file's family does
    process_default = DiffusionConfig()
    changes = {}
    for name, value in p.process.items():
        changes[name] = _decide(f"process.{name}", getattr(cfg.process, name), getattr(process_default, name),
                                value, src)
    for name, value in p.process_defaults.items():
        if getattr(cfg.process, name) == getattr(process_default, name):
            changes[name] = value
    cfg.process = dataclasses.replace(cfg.process, **changes)
    # the text encoder
    te_default = TextEncoderConfig()
    if p.text_encoder is not None and not (p.text_encoder_replaceable and cfg.text_encoder != te_default):
        te = {n: _decide(f"text_encoder.{n}", getattr(cfg.text_encoder, n), getattr(te_default, n),
                         getattr(p.text_encoder, n), src) for n in TEXT_ENCODER_FIELDS}
        cfg.text_encoder = dataclasses.replace(cfg.text_encoder, **te)
    elif not p.num_classes and cfg.text_encoder == te_default:
        raise PretrainedError(f"diffusion.pretrained={src!r}: {p.text_encoder_note}")
    elif p.text_encoder_defaults:
        fill = {n: v for n, v in p.text_encoder_defaults.items()
                if getattr(cfg.text_encoder, n) == getattr(te_default, n)}
        cfg.text_encoder = dataclasses.replace(cfg.text_encoder, **fill)
    # the autoencoder
    if p.autoencoder_source is not None:
        if cfg.latents == "pixels":
            _decide("latents", "pixels", "", "cache or encode (the checkpoint is a latent model)", src)
        if cfg.autoencoder_weights == _default(DiffusionStageConfig, "autoencoder_weights"):
            cfg.autoencoder_weights = p.autoencoder_source
    elif cfg.latents != "pixels" and cfg.autoencoder_weights == _default(DiffusionStageConfig, "autoencoder_weights"):
        raise PretrainedError(f"diffusion.pretrained={src!r} holds no autoencoder: set diffusion.autoencoder_weights "
                              "(a diffusers VAE folder such as sd-vae-ft-ema's, or an original SD single file)")
    asked = cfg.micro_conditioning
    if isinstance(asked, bool):  # an older config's true / false (sdxl / none), compared in its own terms
        _decide("micro_conditioning", asked, False, {"sdxl": True, "none": False}.get(p.micro_conditioning,
                                                                                        p.micro_conditioning), src)
    else:
        _decide("micro_conditioning", asked, "none", p.micro_conditioning, src)
    cfg.micro_conditioning = p.micro_conditioning
    cfg.sampling = sampling_with(cfg.sampling, p.sampling, SamplingConfig)


def sampling_with(current: Any, shipped: Mapping[str, Any], cls: type) -> Any:
    """``current`` with the shipped scheduler's settings in the fields left at their defaults (only those the chosen
    sampler reads)."""
    from training.diffusion import SAMPLERS

    default = cls()
    sampler = current.sampler if current.sampler != default.sampler else shipped.get("sampler", current.sampler)
    reads = set(SAMPLERS[sampler].settings) if sampler in SAMPLERS else set()
    changes = {"sampler": sampler}
    for name, value in shipped.items():
        if name != "sampler" and name in reads and getattr(current, name) == getattr(default, name):
            changes[name] = value
    return dataclasses.replace(current, **changes)


# ----------------------------------------------------------------------------------------------------------------
# Inference straight from a checkpoint (``loom sample pretrained=PATH``)
# ----------------------------------------------------------------------------------------------------------------


def open_pretrained(pretrained: Union[str, Path], device: Optional[Union[str, torch.device]] = None,
                    sampling: Any = None, diffusion: Optional[Mapping[str, Any]] = None,
                    adapters: Sequence[str] = (), merge_adapters: bool = True) -> Any:
    """An :class:`~training.inference.Inference` built from a checkpoint alone; ``diffusion``: more stage-config
    fields (e.g. ``{"text_encoder": {...}}`` to replace the checkpoint's text encoder), checked by the same rule.
    ``adapters``: LoRA files (``path[:scale]``; ours, diffusers or kohya, text-encoder layers included) as in
    :func:`training.inference.apply_adapters`."""
    from models.text_encoder import TextEncoder
    from training.builders import pick_device
    from training.config_io import from_dict, to_dict
    from training.diffusion import build_process
    from training.inference import Inference
    from training.stages.diffusion import DiffusionStageConfig, build_denoiser, sdxl_fourier_dim

    fields: dict[str, Any] = {"latents": "encode", **dict(diffusion or {}), "pretrained": str(pretrained)}
    if sampling is not None:
        fields["sampling"] = to_dict(sampling)
    st = from_dict(DiffusionStageConfig, fields, "diffusion")
    bundle = read_pretrained(pretrained)
    text = class_label_encoder(st) or TextEncoder(st.text_encoder)
    auto = load_autoencoder_any(st.autoencoder_weights) if st.latents != "pixels" else None
    pipe = Inference(build_denoiser(st).eval(), build_process(st.process), text, auto, st.sampling,
                     (bundle.image_size, bundle.image_size), sdxl_fourier_dim(st),
                     size_conditioning=st.micro_conditioning)
    if adapters:
        from training.inference import apply_adapters

        apply_adapters(pipe, adapters, merge_adapters)
        pipe.denoiser.eval()
    return pipe.to(pick_device(None if device is None else str(device)))
