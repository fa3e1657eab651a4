"""Export a finished run in the layouts other tools load: a diffusers pipeline folder or an original single file.

``loom export`` (:mod:`launch.commands.export`) calls :func:`export_diffusers`, :func:`export_single_file` and
:func:`export_lora`. Every tensor name comes from the converters the loaders already use (no name table lives
here): :mod:`models.convert` for the U-Net and the autoencoder (diffusers and LDM names),
:mod:`models.dit_checkpoints` for the DiT / PixArt transformers, :mod:`training.lora_formats` for LoRA adapters.
What this module adds is the *configs* (each written config is read back by the project's own diffusers-config
reader and must give the run's architecture again, so a written folder never describes another model) and the
OpenCLIP → transformers ``CLIPTextModel`` map of the text tower.

**diffusers folder** (``format=diffusers``), as ``StableDiffusionPipeline.from_pretrained(folder)`` reads it::

    model_index.json            StableDiffusionPipeline (a U-Net run) · PixArtAlphaPipeline · DiTPipeline
    unet/ or transformer/       config.json + diffusion_pytorch_model.safetensors
    vae/                        AutoencoderKL config.json + diffusion_pytorch_model.safetensors
    text_encoder/ tokenizer/    transformers CLIPTextModel(WithProjection) + CLIPTokenizer (or the run's HF encoder)
    scheduler/                  scheduler_config.json equal to the run's process and sampler
    latentloom_export.json      where it came from, the pipeline call that reproduces `loom sample`, caveats

The OpenCLIP text tower (Cherti et al. 2023) is the same network as transformers' CLIP text model (Radford et al.
2021): its fused ``in_proj`` is split into ``q_proj`` / ``k_proj`` / ``v_proj`` rows, ``ln_1``/``ln_2``/``c_fc``/
``c_proj`` are renamed, ``text_projection`` (``x @ P``) becomes a bias-free Linear (``P.T``), as diffusers' SD 2
conversion does it. A run reading the *penultimate* block after the final LayerNorm (SD 2.x) exports the tower with
its last block removed, as SD 2's ``text_encoder/`` ships, so the pipeline's ``last_hidden_state`` is our context.
The tokenizer is open_clip's bundled BPE vocabulary written as ``vocab.json`` + ``merges.txt``, padding with ``!``
(id 0), as open_clip pads.

**Single file** (``format=single-file``): one ``.safetensors`` in the original CompVis/Stability layout,
``model.diffusion_model.*`` (U-Net), ``first_stage_model.*`` (autoencoder, attention as 1×1 convolutions) and
``cond_stage_model.model.*`` (the OpenCLIP tower in open_clip's names, SD 2.x's layout; a transformers CLIP
encoder goes under ``cond_stage_model.transformer.``, SD 1.x's). diffusers' ``UNet2DConditionModel`` /
``AutoencoderKL.from_single_file(file, config=<diffusers folder>, subfolder=...)`` and our loaders read it.

**A DiT without a diffusers class.** diffusers has ``DiTTransformer2DModel`` (class-conditional adaLN-Zero) and
``PixArtTransformer2DModel`` (T5 text through a caption MLP, adaLN-single). Our text DiT with a pooled-text
embedding (``pooled_dim``, the quickstart's) or other options has none: the export stops naming what differs,
unless ``custom_transformer=true``, which writes the documented layout :data:`CUSTOM_TRANSFORMER_CLASS`:
``transformer/config.json`` = ``{"_class_name": "LatentLoomDiT", "latentloom_config": <DiTConfig>}`` and the
weights in our own names (``training.weights.load_weights(DiT(config), folder / "transformer")`` loads them);
every other part is in its diffusers form, and ``model_index.json`` names the pipeline ``LatentLoomPipeline``,
which diffusers does not have (load the parts one by one).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, get_args

import torch
from torch import Tensor, nn

from training.errors import LoomError

ExportFormat = Literal["diffusers", "single-file"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS_NAME = "model.safetensors"
NOTES_NAME = "latentloom_export.json"
CUSTOM_TRANSFORMER_CLASS = "LatentLoomDiT"
CUSTOM_PIPELINE_CLASS = "LatentLoomPipeline"
DIFFUSERS_VERSION = "0.42.1"  # the version whose classes the tests load these folders with
LDM_TEXT_PREFIX = "cond_stage_model.model."  # an OpenCLIP tower in an SD 2.x single file
LDM_HF_TEXT_PREFIX = "cond_stage_model.transformer."  # a transformers CLIP encoder in an SD 1.x single file
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# our beta schedule -> diffusers' beta_schedule name (others are written as trained_betas)
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2",
                  "sigmoid": "sigmoid"}
CLIP_BOS, CLIP_EOS, CLIP_PAD = "<|startoftext|>", "<|endoftext|>", "!"


class ExportError(LoomError, ValueError):
    """A run (or a part of it) that cannot be written in the asked layout; the message names the model and key."""


# --------------------------------------------------------------------------------------------------- files


def _save_safetensors(state: Mapping[str, Tensor], path: Path, dtype: Optional[torch.dtype] = None) -> Path:
    from safetensors.torch import save_file

    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    return path


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _bare(model: nn.Module) -> nn.Module:
    """The denoiser under a peft wrapper (adapters merged into it before export)."""
    from training.finetune import base_module

    return base_module(model)


# --------------------------------------------------------------------------------------------------- configs


def unet_diffusers_config(cfg: Any, sample_size: int) -> dict[str, Any]:
    """Our :class:`~models.unet.UNetConfig` → diffusers' ``UNet2DConditionModel`` ``config.json`` (read back by
    :func:`models.convert.config_from_diffusers_unet` to check it: :class:`ExportError` where it cannot say it)."""
    from models.convert import config_from_diffusers_unet

    levels = len(cfg.block_out_channels)
    if cfg.cross_attention_dim is None:
        raise ExportError("diffusion.model.unet.cross_attention_dim=null: a U-Net without text cross-attention has "
                          "no UNet2DConditionModel / StableDiffusionPipeline form")
    if cfg.transformer_depth_mid is not None and cfg.transformer_depth_mid != cfg.transformer_depth[-1]:
        raise ExportError(f"diffusion.model.unet.transformer_depth_mid={cfg.transformer_depth_mid}: diffusers' "
                          f"U-Net gives the mid block the last level's depth ({cfg.transformer_depth[-1]})")
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)]
    text_time = cfg.addition_embed_type == "text_time"
    out: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION, "sample_size": sample_size,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "down_block_types": down,
        "up_block_types": up, "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block, "attention_head_dim": [cfg.heads_at(i)[0] for i in range(levels)],
        "transformer_layers_per_block": list(cfg.transformer_depth), "cross_attention_dim": cfg.cross_attention_dim,
        "use_linear_projection": cfg.use_linear_projection, "norm_num_groups": cfg.norm_num_groups,
        "norm_eps": cfg.norm_eps, "flip_sin_to_cos": cfg.flip_sin_to_cos,
        "freq_shift": int(cfg.freq_shift) if float(cfg.freq_shift).is_integer() else cfg.freq_shift,
        "resnet_time_scale_shift": "scale_shift" if cfg.resnet_scale_shift else "default",
        "time_embedding_dim": cfg.time_embed_dim, "num_class_embeds": cfg.num_classes,
        "addition_embed_type": "text_time" if text_time else None,
        "addition_time_embed_dim": cfg.addition_time_embed_dim if text_time else None,
        "projection_class_embeddings_input_dim": cfg.addition_embed_input_dim if text_time else None,
        "dropout": cfg.dropout, "act_fn": "silu", "mid_block_type": "UNetMidBlock2DCrossAttn",
        "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1,
        "upcast_attention": False, "class_embed_type": None,
    }
    back = config_from_diffusers_unet(out)
    same = dataclasses.replace(back, gradient_checkpointing=cfg.gradient_checkpointing,
                               attention_backend=cfg.attention_backend, num_heads=cfg.num_heads,
                               head_dim=cfg.head_dim, transformer_depth_mid=cfg.transformer_depth_mid)
    heads_agree = all(back.heads_at(i) == cfg.heads_at(i) for i in range(levels))
    if same != cfg or not heads_agree:
        raise ExportError(f"diffusion.model.unet: the written UNet2DConditionModel config reads back as another "
                          f"U-Net ({back} vs {cfg})")
    return out


def vae_diffusers_config(cfg: Any, sample_size: int) -> dict[str, Any]:
    """Our :class:`~models.autoencoder.AutoencoderConfig` → diffusers' ``AutoencoderKL`` ``config.json``."""
    from models.convert import config_from_diffusers_vae

    if cfg.norm_eps != 1e-6:
        raise ExportError(f"autoencoder.model.norm_eps={cfg.norm_eps}: diffusers' AutoencoderKL fixes it at 1e-6")
    n = len(cfg.block_out_channels)
    out: dict[str, Any] = {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "sample_size": sample_size,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "latent_channels": cfg.latent_channels,
        "block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block,
        "norm_num_groups": cfg.norm_num_groups, "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n, "act_fn": "silu", "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor or None, "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_post_quant_conv, "mid_block_add_attention": cfg.mid_block_attention,
        "force_upcast": False, "latents_mean": None, "latents_std": None,
    }
    back = config_from_diffusers_vae(out)
    if dataclasses.replace(back, gradient_checkpointing=cfg.gradient_checkpointing,
                           attention_backend=cfg.attention_backend, norm_eps=cfg.norm_eps) != cfg:
        raise ExportError(f"autoencoder.model: the written AutoencoderKL config reads back as another autoencoder "
                          f"({back} vs {cfg})")
    return out


def dit_diffusers_config(cfg: Any) -> dict[str, Any]:
    """Our DiT/PixArt-shaped :class:`~models.dit.DiTConfig` → diffusers' ``DiTTransformer2DModel`` or
    ``PixArtTransformer2DModel`` ``config.json``; :class:`ExportError` naming what differs for any other DiT."""
    from models.dit_checkpoints import _family, config_from_diffusers_transformer

    try:
        family = _family(cfg)
    except ValueError:
        raise ExportError(f"diffusion.model.dit: {no_diffusers_transformer_reason(cfg)}; set custom_transformer="
                          f"true to write it in the documented '{CUSTOM_TRANSFORMER_CLASS}' layout (README, "
                          "'Checkpoints and formats')") from None
    if cfg.mlp_ratio != 4.0 or cfg.mlp_hidden_size not in (None, 4 * cfg.hidden_size) \
            or cfg.frequency_embedding_size != 256:
        raise ExportError(f"diffusion.model.dit: mlp_ratio={cfg.mlp_ratio}, mlp_hidden_size={cfg.mlp_hidden_size}, "
                          f"frequency_embedding_size={cfg.frequency_embedding_size}: diffusers' transformers fix "
                          "them at 4.0 / 4·hidden / 256")
    out_channels = 2 * cfg.in_channels if cfg.learn_sigma else (cfg.out_channels or cfg.in_channels)
    out: dict[str, Any] = {
        "_diffusers_version": DIFFUSERS_VERSION, "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads, "in_channels": cfg.in_channels,
        "out_channels": out_channels, "num_layers": cfg.depth, "sample_size": cfg.sample_size,
        "patch_size": cfg.patch_size, "dropout": 0.0, "attention_bias": True, "activation_fn": "gelu-approximate",
        "norm_elementwise_affine": False, "upcast_attention": False,
    }
    if family == "dit":
        out.update(_class_name="DiTTransformer2DModel", norm_type="ada_norm_zero", num_embeds_ada_norm=cfg.num_classes,
                   norm_eps=1e-5)
    else:
        if cfg.pos_embed_base_size != cfg.sample_size // cfg.patch_size:
            raise ExportError(f"diffusion.model.dit.pos_embed_base_size={cfg.pos_embed_base_size}: diffusers' PixArt "
                              f"transformer fixes it at sample_size / patch_size = {cfg.sample_size // cfg.patch_size}")
        out.update(_class_name="PixArtTransformer2DModel", norm_type="ada_norm_single", norm_eps=1e-6,
                   caption_channels=cfg.context_dim, cross_attention_dim=cfg.hidden_size,
                   interpolation_scale=cfg.pos_embed_interpolation,
                   use_additional_conditions=cfg.vector_dim is not None)
    back = config_from_diffusers_transformer(out)
    keep = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.name in ("attention_backend", "gradient_checkpointing", "mlp_hidden_size", "out_channels")}
    if family == "dit":
        keep.update(pos_embed_base_size=cfg.pos_embed_base_size, pos_embed_interpolation=cfg.pos_embed_interpolation)
    if dataclasses.replace(back, **keep) != cfg:
        raise ExportError(f"diffusion.model.dit: the written {out['_class_name']} config reads back as another "
                          f"transformer ({back} vs {cfg})")
    return out


def no_diffusers_transformer_reason(cfg: Any) -> str:
    """Why our DiT config has no diffusers transformer class (the options that differ from DiT's and PixArt's)."""
    reasons = []
    for name, plain in (("pooled_dim", None), ("video", False), ("rope", False), ("qk_norm", False),
                        ("cross_attn_norm", False), ("concat_image_latents", False), ("patch_size_t", 1),
                        ("attention_layout", "full"), ("sincos_pos_embed", True)):
        if getattr(cfg, name) != plain:
            reasons.append(f"{name}={getattr(cfg, name)!r}")
    if cfg.context_dim is not None and not (cfg.adaln_single and cfg.caption_projection):
        reasons.append(f"text (context_dim={cfg.context_dim}) without PixArt's adaln_single + caption_projection")
    if cfg.context_dim is not None and cfg.num_classes is not None:
        reasons.append("both text and class labels")
    return ("no diffusers transformer class computes this DiT (diffusers has DiTTransformer2DModel: class labels, "
            "adaLN-Zero, no text; and PixArtTransformer2DModel: T5 text through a caption MLP, adaLN-single); it "
            f"differs by {', '.join(reasons) or 'its conditioning'}")


def scheduler_config(process: Any, sampling: Any) -> dict[str, Any]:
    """The diffusers scheduler ``scheduler_config.json`` that samples as the run's process (``diffusion.process``)
    and sampler (``diffusion.sampling``) do: ``ddim`` → DDIMScheduler, ``ddpm`` → DDPMScheduler,
    ``dpm_solver_2m`` → DPMSolverMultistepScheduler (DPM-Solver++ 2M), ``euler`` (flow) →
    FlowMatchEulerDiscreteScheduler. :class:`ExportError` naming the key for what a scheduler cannot express."""
    from training.diffusion.samplers import FLOW_TRAIN_TIMESTEPS
    from training.diffusion.schedules import DEFAULT_BETA_RANGE, make_betas

    if process.token_shift:
        raise ExportError("diffusion.process.token_shift=true: the schedule then depends on the latent size, which no "
                          "diffusers scheduler config can say")
    base = {"_diffusers_version": DIFFUSERS_VERSION}
    if process.kind == "flow":
        if sampling.sampler != "euler" or sampling.flow_grid != "sd3":
            raise ExportError(f"diffusion.sampling.sampler={sampling.sampler!r}, flow_grid={sampling.flow_grid!r}: "
                              "FlowMatchEulerDiscreteScheduler samples the 'sd3' grid with euler")
        if process.flow_timestep_scale != FLOW_TRAIN_TIMESTEPS:
            raise ExportError(f"diffusion.process.flow_timestep_scale={process.flow_timestep_scale}: diffusers' flow "
                              f"schedulers give the model t · {FLOW_TRAIN_TIMESTEPS}")
        return {**base, "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": FLOW_TRAIN_TIMESTEPS,
                "shift": process.flow_shift, "use_dynamic_shifting": False,
                "use_karras_sigmas": sampling.karras_sigmas, "invert_sigmas": False, "shift_terminal": None}
    if process.kind != "discrete":
        raise ExportError(f"diffusion.process.kind={process.kind!r}: only the discrete (DDPM-family) and flow "
                          "processes have a diffusers scheduler this export writes")
    start, end = DEFAULT_BETA_RANGE[process.schedule]
    start = process.beta_start if process.beta_start is not None else start
    end = process.beta_end if process.beta_end is not None else end
    betas: dict[str, Any] = {"num_train_timesteps": process.num_timesteps, "prediction_type": process.prediction,
                             "rescale_betas_zero_snr": process.zero_terminal_snr, "trained_betas": None}
    if process.schedule in BETA_SCHEDULES:
        betas.update(beta_schedule=BETA_SCHEDULES[process.schedule], beta_start=start, beta_end=end)
    else:
        betas.update(beta_schedule="linear", beta_start=start, beta_end=end,
                     trained_betas=make_betas(process.schedule, process.num_timesteps, process.beta_start,
                                              process.beta_end).tolist())
    clip = {"clip_sample": sampling.clip_x0 is not None, "clip_sample_range": sampling.clip_x0 or 1.0,
            "thresholding": False}
    if sampling.sampler == "ddim":
        return {**base, **betas, **clip, "_class_name": "DDIMScheduler", "set_alpha_to_one": sampling.set_alpha_to_one,
                "steps_offset": sampling.steps_offset, "timestep_spacing": sampling.spacing or "leading"}
    if sampling.sampler == "ddpm":
        return {**base, **betas, **clip, "_class_name": "DDPMScheduler", "variance_type": "fixed_small",
                "steps_offset": sampling.steps_offset, "timestep_spacing": sampling.spacing or "leading"}
    if sampling.sampler == "dpm_solver_2m":
        return {**base, **betas, "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++",
                "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True, "thresholding": False,
                "use_karras_sigmas": sampling.karras_sigmas, "steps_offset": sampling.steps_offset,
                "timestep_spacing": sampling.spacing or "linspace", "final_sigmas_type": "zero"}
    raise ExportError(f"diffusion.sampling.sampler={sampling.sampler!r}: no diffusers scheduler is written for it "
                      "(ddim, ddpm, dpm_solver_2m, euler)")


# --------------------------------------------------------------------------------------------------- text


def openclip_to_hf_clip_state_dict(tower_state: Mapping[str, Tensor], num_layers: int,
                                   projection: bool) -> dict[str, Tensor]:
    """open_clip ``TextTransformer`` tensors → transformers ``CLIPTextModel`` names (``text_model.`` prefix, the
    published layout), keeping the first ``num_layers`` blocks; with ``projection`` the ``text_projection`` too
    (``CLIPTextModelWithProjection``). Every tensor of the tower must be mapped or deliberately dropped."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()

    def put(theirs: str, ours: str, value: Optional[Tensor] = None) -> None:
        out[theirs] = tower_state[ours] if value is None else value
        used.add(ours)

    put("text_model.embeddings.token_embedding.weight", "token_embedding.weight")
    put("text_model.embeddings.position_embedding.weight", "positional_embedding")
    put("text_model.final_layer_norm.weight", "ln_final.weight")
    put("text_model.final_layer_norm.bias", "ln_final.bias")
    blocks = sorted({int(k.split(".")[2]) for k in tower_state if k.startswith("transformer.resblocks.")})
    for i in blocks:
        o, t = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        if i >= num_layers:
            used.update(k for k in tower_state if k.startswith(o))  # the dropped last block (SD 2.x)
            continue
        for p in ("weight", "bias"):
            q, k, v = tower_state[f"{o}attn.in_proj_{p}"].chunk(3, dim=0)
            put(f"{t}self_attn.q_proj.{p}", f"{o}attn.in_proj_{p}", q)
            put(f"{t}self_attn.k_proj.{p}", f"{o}attn.in_proj_{p}", k)
            put(f"{t}self_attn.v_proj.{p}", f"{o}attn.in_proj_{p}", v)
            for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                put(f"{t}{theirs}.{p}", f"{o}{ours}.{p}")
    proj = tower_state.get("text_projection")
    if proj is not None:
        if projection:
            put("text_projection.weight", "text_projection", proj.t())
        used.add("text_projection")
    left = sorted(set(tower_state) - used)
    if left:
        raise ExportError(f"text encoder: open_clip tensors {left[:4]} have no transformers CLIPTextModel "
                          "counterpart (layer scale, attention norms and other open_clip options are not exported)")
    return out


def openclip_hf_config(encoder: Any, num_layers: int, projection: bool) -> dict[str, Any]:
    """transformers ``CLIPTextConfig`` (``config.json``) of our OpenCLIP text tower with ``num_layers`` blocks."""
    text = encoder.text
    block = text.transformer.resblocks[0]
    act = type(block.mlp.gelu).__name__ if hasattr(block.mlp, "gelu") else "GELU"
    if act not in ("GELU", "QuickGELU") or (act == "GELU" and block.mlp.gelu.approximate != "none"):
        raise ExportError(f"text encoder {encoder.config.model!r}: its MLP activation {act} has no CLIPTextModel "
                          "hidden_act")
    eps = {m.eps for m in text.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise ExportError(f"text encoder {encoder.config.model!r}: LayerNorms with several epsilons {sorted(eps)}")
    if getattr(text, "attn_mask", None) is None:
        raise ExportError(f"text encoder {encoder.config.model!r}: a tower without the causal mask is no CLIP text "
                          "model")
    vocab = int(text.token_embedding.weight.shape[0])
    return {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model", "vocab_size": vocab, "hidden_size": int(text.width),
        "intermediate_size": int(block.mlp.c_fc.out_features), "projection_dim": encoder.pooled_dim,
        "num_hidden_layers": num_layers, "num_attention_heads": int(text.heads),
        "max_position_embeddings": int(text.context_length), "hidden_act": "gelu" if act == "GELU" else "quick_gelu",
        "layer_norm_eps": eps.pop(), "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
        "pad_token_id": 1, "bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "torch_dtype": "float32",
    }


def write_clip_tokenizer(folder: Path, context_length: int) -> None:
    """open_clip's bundled BPE vocabulary as a transformers ``CLIPTokenizer`` folder (``vocab.json``,
    ``merges.txt``, configs): the same ids for the same text, ``!`` (id 0) as padding like open_clip's."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]  # open_clip's SimpleTokenizer takes these merges
    alphabet = list(bytes_to_unicode().values())
    words = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges] + [CLIP_BOS, CLIP_EOS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "unk_token": CLIP_EOS, "pad_token": CLIP_PAD}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {**special, "tokenizer_class": "CLIPTokenizer",
                                                    "model_max_length": context_length, "do_lower_case": True,
                                                    "errors": "replace", "add_prefix_space": False,
                                                    "clean_up_tokenization_spaces": True})


def export_text_encoder(encoder: Any, folder: Path, projection: bool, dtype: Optional[torch.dtype]) -> dict[str, Any]:
    """Write ``text_encoder/`` and ``tokenizer/`` under ``folder``; returns what the notes say about it.

    OpenCLIP: converted (above). A Hugging Face CLIP encoder (``hf-clip``) or T5 (``hf-t5``): written by
    transformers' ``save_pretrained`` (a penultimate-layer CLIP with its last layer removed)."""
    cfg = encoder.config
    if cfg.format == "hf-sdxl":
        raise ExportError("diffusion.text_encoder.format='hf-sdxl': SDXL's two encoders go with an SDXL U-Net, "
                          "which this export does not write")
    if cfg.format in ("hf-clip", "hf-t5"):
        import copy

        model = encoder.encoders[0]
        if cfg.format == "hf-clip":
            _check_clip_layer(cfg)
            if cfg.layer == "penultimate":
                model = copy.deepcopy(model)
                layers = getattr(model, "text_model", model).encoder.layers
                del layers[-1]
                model.config.num_hidden_layers = len(layers)
        if dtype is not None:
            model = copy.deepcopy(model).to(dtype)
        model.save_pretrained(folder / "text_encoder")
        encoder.tokenizers[0].save_pretrained(folder / "tokenizer")
        return {"text_encoder": type(model).__name__, "tokenizer": type(encoder.tokenizers[0]).__name__,
                "source": cfg.pretrained}
    _check_clip_layer(cfg)
    blocks = len(encoder.text.transformer.resblocks)
    kept = blocks - 1 if cfg.layer == "penultimate" and not projection else blocks
    config = openclip_hf_config(encoder, kept, projection)
    state = openclip_to_hf_clip_state_dict(encoder.text.state_dict(), kept, projection)
    _write_json(folder / "text_encoder" / "config.json", config)
    _save_safetensors(state, folder / "text_encoder" / TEXT_WEIGHTS_NAME, dtype)
    write_clip_tokenizer(folder / "tokenizer", int(encoder.text.context_length))
    direct = cfg.layer == "last" or kept < blocks  # the pipeline's last_hidden_state is our context
    return {"text_encoder": config["architectures"][0], "tokenizer": "CLIPTokenizer",
            "layers_kept": f"{kept} of {blocks}",
            "context": "last_hidden_state" if direct else "final_layer_norm(hidden_states[-2])"}


def _check_clip_layer(cfg: Any) -> None:
    if not cfg.hidden_ln_final:
        raise ExportError("diffusion.text_encoder.hidden_ln_final=false: diffusers' CLIP pipelines read the states "
                          "after the final LayerNorm")


# --------------------------------------------------------------------------------------------------- the run


@dataclasses.dataclass
class RunParts:
    """A finished run opened for export: its config and the modules :func:`training.builders.open_run` builds."""

    cfg: Any  # the run's RunConfig
    pipe: Any  # training.inference.Inference on the CPU, adapters merged
    denoiser: nn.Module  # the bare denoiser
    family: str  # "unet" | "dit"


def open_for_export(run_dir: str | Path, weights: str = "export", adapters: tuple[str, ...] = ()) -> RunParts:
    """Open ``run_dir`` (its ``weights``, LoRA ``adapters`` merged in) and refuse what no export layout holds:
    pixel-space models, video models, denoisers other than the image U-Net and the DiT (naming the model)."""
    from models.dit import DiT
    from models.unet import UNet
    from training.builders import open_run, run_config_of

    cfg = run_config_of(run_dir)
    st = cfg.diffusion
    if st.latents == "pixels":
        raise ExportError(f"run {run_dir}: diffusion.latents='pixels': a pixel-space model has no autoencoder, and "
                          "the diffusers pipelines this export writes work in latent space")
    pipe = open_run(run_dir, weights=weights, device="cpu", adapters=list(adapters), merge_adapters=True, cfg=cfg)
    if adapters:  # open_run merged them into the base weights: keep a plain denoiser holding those
        from training.finetune import base_state_dict
        from training.stages.diffusion import build_denoiser

        plain = build_denoiser(dataclasses.replace(st, weights=None))
        plain.load_state_dict(base_state_dict(pipe.denoiser), strict=True)
        pipe.denoiser = plain.eval()
    denoiser = _bare(pipe.denoiser)
    from models.autoencoder import AutoencoderKL

    video = getattr(getattr(denoiser, "config", None), "video", False)
    if isinstance(denoiser, UNet) and not video:
        family = "unet"
    elif isinstance(denoiser, DiT) and not video:
        family = "dit"
    else:
        raise ExportError(
            f"run {run_dir}: the denoiser {type(denoiser).__name__} (diffusion.denoiser={st.denoiser!r}) is not "
            "exportable: video models (VideoUNet, video DiT) need pipelines (Stable Video Diffusion, Wan) whose "
            "image encoders / umT5 text encoders / video autoencoders a run does not hold; export image runs "
            "(U-Net or DiT)")
    if pipe.autoencoder is not None and not isinstance(pipe.autoencoder, AutoencoderKL):
        raise ExportError(f"run {run_dir}: the autoencoder {type(pipe.autoencoder).__name__} is a video "
                          "autoencoder; only the image AutoencoderKL is exported")
    if st.micro_conditioning == "sdxl" or getattr(denoiser.config, "addition_embed_type", "none") != "none":
        raise ExportError(f"run {run_dir}: diffusion.micro_conditioning / addition_embed_type='text_time' (an "
                          "SDXL-style U-Net) needs SDXL's two text encoders; not exported")
    return RunParts(cfg, pipe, denoiser, family)


def _notes(parts: RunParts, run_dir: Path, weights: str, layout: dict[str, Any], caveats: list[str]) -> dict:
    s = parts.pipe.sampling
    te = parts.cfg.diffusion.text_encoder
    if te.masks_padding:
        caveats.append("the run masks the text padding (diffusion.text_encoder.mask_padding); diffusers' Stable "
                       "Diffusion pipelines attend to all tokens, so their images differ from `loom sample`'s: "
                       "train with mask_padding=false for identical images")
    return {"source_run": str(run_dir), "weights": weights, "layout": layout,
            "call": {"num_inference_steps": s.steps, "guidance_scale": s.guidance, "eta": s.eta,
                     "guidance_rescale": s.guidance_rescale, "negative_prompt": s.negative_prompt,
                     "height": parts.pipe.image_size[0], "width": parts.pipe.image_size[1], "seed": s.seed},
            "text_encoder": {"layer": te.layer, "hidden_ln_final": te.hidden_ln_final,
                             "mask_padding": te.masks_padding},
            "caveats": caveats}


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:
            raise ExportError(f"out={str(out)!r} exists; give another out= or overwrite=true")
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()


def export_diffusers(run_dir: str | Path, out: str | Path, weights: str = "export", dtype: str = "float32",
                     custom_transformer: bool = False, adapters: tuple[str, ...] = (),
                     overwrite: bool = False) -> Path:
    """Write the run as a diffusers pipeline folder ``out`` (layout in the module docstring); returns it."""
    run_dir, out = Path(run_dir), Path(out)
    parts = open_for_export(run_dir, weights, adapters)
    torch_dtype = DTYPES[dtype]
    cfg, pipe, denoiser = parts.cfg, parts.pipe, parts.denoiser
    ae = pipe.autoencoder
    pixel_size = pipe.image_size[0]
    caveats: list[str] = []
    # configs first: nothing is written for a run that cannot be exported
    sched = scheduler_config(cfg.diffusion.process, pipe.sampling)
    vae_cfg = vae_diffusers_config(ae.config, pixel_size)
    te_cfg = cfg.diffusion.text_encoder
    index: dict[str, Any] = {"_diffusers_version": DIFFUSERS_VERSION, "vae": ["diffusers", "AutoencoderKL"],
                             "scheduler": ["diffusers", sched["_class_name"]]}
    if parts.family == "unet":
        den_name, den_cfg = "unet", unet_diffusers_config(denoiser.config, pixel_size // ae.spatial_factor)
        if denoiser.config.num_classes is not None:
            raise ExportError("diffusion.model.unet.num_classes: StableDiffusionPipeline passes no class labels")
        if ae.config.shift_factor:
            raise ExportError(f"autoencoder.model.shift_factor={ae.config.shift_factor}: StableDiffusionPipeline "
                              "decodes latents / scaling_factor without a shift")
        from models.convert import to_diffusers_unet_state_dict

        den_state = to_diffusers_unet_state_dict(denoiser.state_dict())
        if sched["_class_name"] in ("DDIMScheduler", "DDPMScheduler") and (sched["steps_offset"] != 1
                                                                         or sched["clip_sample"]):
            caveats.append(f"StableDiffusionPipeline rewrites a {sched['_class_name']} config to steps_offset=1 and "
                           "clip_sample=false (with a FutureWarning); this run samples with steps_offset="
                           f"{sched['steps_offset']}, clip_sample={sched['clip_sample']}, so the pipeline's images "
                           "differ from `loom sample`'s (set diffusion.sampling.steps_offset=1 to match)")
        index.update(_class_name="StableDiffusionPipeline", unet=["diffusers", "UNet2DConditionModel"],
                     safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None],
                     requires_safety_checker=False)
        projection = False
    else:
        den_name = "transformer"
        try:
            den_cfg = dit_diffusers_config(denoiser.config)
        except ExportError:
            if not custom_transformer:
                raise
            den_cfg = None
        if den_cfg is None:
            from training.config_io import to_dict

            den_cfg = {"_class_name": CUSTOM_TRANSFORMER_CLASS, "latentloom_config": to_dict(denoiser.config),
                       "latentloom_module": "models.dit.DiT"}
            den_state = dict(denoiser.state_dict())
            index.update(_class_name=CUSTOM_PIPELINE_CLASS, transformer=["latentloom", CUSTOM_TRANSFORMER_CLASS])
            caveats.append(f"the transformer has no diffusers class: {no_diffusers_transformer_reason(denoiser.config)}"
                           f"; transformer/ holds our DiT ({CUSTOM_TRANSFORMER_CLASS} layout), load it with "
                           "training.weights.load_weights(models.dit.DiT(DiTConfig(**latentloom_config)), "
                           "'<folder>/transformer'); the other parts load with their diffusers / transformers classes")
            projection = denoiser.config.pooled_dim is not None
        else:
            from models.dit_checkpoints import to_diffusers_dit_state_dict

            den_state = to_diffusers_dit_state_dict(denoiser.state_dict(), denoiser.config)
            index["transformer"] = ["diffusers", den_cfg["_class_name"]]
            projection = False
            if den_cfg["_class_name"] == "DiTTransformer2DModel":
                index.update(_class_name="DiTPipeline")
                caveats.append("diffusers' DiTTransformer2DModel uses timestep frequency shift 1 and LayerNorm eps "
                               "1e-5 where our DiT (the original's) uses 0 and 1e-6: its outputs differ slightly, "
                               "as for every DiT checkpoint diffusers converts")
            else:
                if te_cfg.format != "hf-t5":
                    raise ExportError(f"diffusion.text_encoder.format={te_cfg.format!r}: PixArtAlphaPipeline "
                                      "encodes prompts with T5 (format 'hf-t5'); this PixArt transformer was trained "
                                      "on another encoder")
                index.update(_class_name="PixArtAlphaPipeline")
    if index["_class_name"] != "DiTPipeline":
        te_cls = ("transformers", "CLIPTextModelWithProjection" if projection else "CLIPTextModel")
        if te_cfg.format == "hf-t5":
            te_cls = ("transformers", type(pipe.text_encoder.encoders[0]).__name__)
        index.update(text_encoder=list(te_cls), tokenizer=["transformers", "CLIPTokenizer" if te_cfg.format
                                                           != "hf-t5" else "T5Tokenizer"])
    _prepare_out(out, overwrite)
    layout: dict[str, Any] = {}
    try:
        if "text_encoder" in index:
            layout["text_encoder"] = export_text_encoder(pipe.text_encoder, out, projection, torch_dtype)
            if te_cfg.format in ("hf-clip", "hf-t5"):
                index["tokenizer"] = ["transformers", layout["text_encoder"]["tokenizer"]]
                index["text_encoder"] = ["transformers", layout["text_encoder"]["text_encoder"]]
        _write_json(out / den_name / "config.json", den_cfg)
        _save_safetensors(den_state, out / den_name / WEIGHTS_NAME, torch_dtype)
        from models.convert import to_diffusers_vae_state_dict

        _write_json(out / "vae" / "config.json", vae_cfg)
        _save_safetensors(to_diffusers_vae_state_dict(ae.state_dict()), out / "vae" / WEIGHTS_NAME, torch_dtype)
        _write_json(out / "scheduler" / "scheduler_config.json", sched)
        _write_json(out / "model_index.json", index)
        layout.update(pipeline=index["_class_name"], denoiser=den_cfg["_class_name"], scheduler=sched["_class_name"])
        _write_json(out / NOTES_NAME, _notes(parts, run_dir, weights, layout, caveats))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no half-written folder
        raise
    return out


def export_single_file(run_dir: str | Path, out: str | Path, weights: str = "export", dtype: str = "float32",
                       adapters: tuple[str, ...] = (), overwrite: bool = False) -> Path:
    """Write the run as one original-layout ``.safetensors`` (U-Net runs; layout in the module docstring)."""
    from models.convert import LDM_UNET_PREFIX, LDM_VAE_PREFIX, to_ldm_unet_state_dict, to_ldm_vae_state_dict

    run_dir, out = Path(run_dir), Path(out)
    if out.suffix != ".safetensors":
        raise ExportError(f"out={str(out)!r}: a single file is written as .safetensors")
    parts = open_for_export(run_dir, weights, adapters)
    if parts.family != "unet":
        raise ExportError(f"run {run_dir}: the single-file (LDM/SGM) layout holds a U-Net; this run's denoiser is a "
                          f"{type(parts.denoiser).__name__}: export it with format=diffusers")
    unet_diffusers_config(parts.denoiser.config, 8)  # refuses what the LDM key layout cannot hold either
    vae_diffusers_config(parts.pipe.autoencoder.config, 8)
    state = to_ldm_unet_state_dict(parts.denoiser.state_dict(), parts.denoiser.config, prefix=LDM_UNET_PREFIX)
    ae = parts.pipe.autoencoder
    state.update(to_ldm_vae_state_dict(ae.state_dict(), ae.config, prefix=LDM_VAE_PREFIX))
    te = parts.pipe.text_encoder
    if te.config.format == "openclip":
        state.update({LDM_TEXT_PREFIX + k: v for k, v in te.text.state_dict().items()})
    elif te.config.format == "hf-clip":
        hf = te.encoders[0]
        inner = getattr(hf, "text_model", None)
        prefix = LDM_HF_TEXT_PREFIX + "text_model."
        state.update({prefix + k: v for k, v in (inner or hf).state_dict().items()})
    else:
        raise ExportError(f"diffusion.text_encoder.format={te.config.format!r}: the single file holds one CLIP text "
                          "encoder (OpenCLIP or hf-clip)")
    _prepare_out(out, overwrite)
    _save_safetensors(state, out, DTYPES[dtype])
    return out


# --------------------------------------------------------------------------------------------------- LoRA


def adapter_run_dir(adapter: Path) -> Optional[Path]:
    """The run a stage-written adapter belongs to (``<run>/<stage>/export/adapter.safetensors``), if it is one."""
    run = adapter.resolve().parent.parent.parent
    return run if (run / "config.yaml").is_file() else None


def export_lora(adapter: str | Path, fmt: str, out: str | Path, run_dir: Optional[str | Path] = None,
                overwrite: bool = False) -> Path:
    """Our LoRA adapter file → the diffusers/PEFT or kohya layout (:mod:`training.lora_formats`), named after the
    denoiser of ``run_dir`` (default: the run the adapter was written in); returns ``out``."""
    from training import lora_formats
    from training.builders import run_config_of
    from training.finetune import load_adapter
    from training.stages.diffusion import build_denoiser

    adapter, out = Path(adapter), Path(out)
    if fmt not in ("diffusers", "kohya"):
        raise ExportError(f"format={fmt!r}: a LoRA adapter is exported as 'diffusers' or 'kohya'")
    loaded = load_adapter(adapter)
    if loaded.layers is not None:
        raise ExportError(f"lora={str(adapter)!r} is already a {loaded.meta.get('format')} LoRA file; export converts "
                          "adapters written by the lora / dpo stages")
    run = Path(run_dir) if run_dir is not None else adapter_run_dir(adapter)
    if run is None:
        raise ExportError(f"lora={str(adapter)!r}: not inside a run (<run>/<stage>/export/); give run_dir= the run "
                          "whose denoiser it adapts")
    cfg = run_config_of(run)
    model = build_denoiser(dataclasses.replace(cfg.diffusion, weights=None, inflate_from=None))  # for its names
    layers = lora_formats.layers_from_ours(loaded.state, loaded.config.scaling)
    modules = {n for n, _ in model.named_modules()}
    missing = [n for n in layers if n not in modules]
    if missing:
        raise ExportError(f"lora={str(adapter)!r} adapts {missing[:3]}, which the {type(model).__name__} of run "
                          f"{run} does not have")
    try:
        state, header = lora_formats.write(layers, model, fmt, {"latentloom_source": json.dumps(
            dict(loaded.meta, file_format=fmt))})
    except ValueError as e:
        raise ExportError(f"lora={str(adapter)!r}: {e}") from None
    _prepare_out(out, overwrite)
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=header)
    return out


__all__ = [
    "CUSTOM_TRANSFORMER_CLASS", "EXPORT_FORMATS", "ExportError", "dit_diffusers_config", "export_diffusers",
    "export_lora", "export_single_file", "export_text_encoder", "open_for_export", "openclip_hf_config",
    "openclip_to_hf_clip_state_dict", "scheduler_config", "unet_diffusers_config", "vae_diffusers_config",
    "write_clip_tokenizer",
]
