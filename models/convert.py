"""Load published Stable Diffusion weights: state-dict name maps from diffusers and from the original LDM code.

Two layouts are understood, each in both directions:

* diffusers (``UNet2DConditionModel`` / ``AutoencoderKL`` ``diffusion_pytorch_model.safetensors``):
  :func:`from_diffusers_unet_state_dict`, :func:`from_diffusers_vae_state_dict` (and ``to_diffusers_*``), plus
  :func:`config_from_diffusers_unet` / :func:`config_from_diffusers_vae` for a published ``config.json``.
* the original CompVis / Stability "LDM" single-file checkpoints (``model.diffusion_model.*``,
  ``first_stage_model.*``): :func:`from_ldm_unet_state_dict`, :func:`from_ldm_vae_state_dict` (and ``to_ldm_*``).

How it works: the target model is built from its config on the ``meta`` device (nothing is allocated), and each of
its parameter names is translated into the foreign name; the inverse of that table renames the foreign state dict.
Every expected weight must be present and every foreign weight must be used, otherwise a ``ValueError`` lists the
offenders, so a loaded model is always complete (``load_state_dict(..., strict=True)`` then succeeds). The only
value change is a reshape between 1×1 convolutions and linear layers (the same map stored two ways).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from models.autoencoder import AutoencoderConfig, AutoencoderKL
from models.unet import UNet, UNetConfig

StateDict = Mapping[str, Tensor]

# ----------------------------------------------------------------------------------------------------------------
# diffusers names. Rules rewrite our names into diffusers' ones, whole dotted segments at a time, in order.
# ----------------------------------------------------------------------------------------------------------------

# inside a spatial transformer: the same in diffusers and in the original LDM naming
_TRANSFORMER_RULES: tuple[tuple[str, str], ...] = (
    (r"blocks\.(\d+)\.", r"transformer_blocks.\1."),
    (r"self_attn\.", "attn1."),
    (r"cross_attn\.", "attn2."),
    (r"to_out\.", "to_out.0."),
    (r"ff\.proj_in\.", "ff.net.0.proj."),
    (r"ff\.proj_out\.", "ff.net.2."),
)

_DIFFUSERS_RULES: tuple[tuple[str, str], ...] = (
    (r"time_embed\.", "time_embedding."),
    (r"class_embed\.", "class_embedding."),
    (r"add_embed\.", "add_embedding."),
    (r"norm_out\.", "conv_norm_out."),
    (r"mid\.attn_norm\.", "mid_block.attentions.0.group_norm."),  # autoencoder mid-block attention
    (r"mid\.attn\.", "mid_block.attentions.0."),
    (r"mid\.res\.(\d+)\.", r"mid_block.resnets.\1."),
    (r"down\.(\d+)\.", r"down_blocks.\1."),
    (r"up\.(\d+)\.", r"up_blocks.\1."),
    (r"res\.(\d+)\.", r"resnets.\1."),
    (r"attn\.(\d+)\.", r"attentions.\1."),
    (r"downsample\.", "downsamplers.0."),
    (r"upsample\.", "upsamplers.0."),
    (r"emb_proj\.", "time_emb_proj."),
    (r"skip\.", "conv_shortcut."),
) + _TRANSFORMER_RULES


def _whole_segments(rules: tuple[tuple[str, str], ...]) -> tuple[tuple[re.Pattern, str], ...]:
    """Compile rules so that each pattern matches only from the start of a dotted segment."""
    return tuple((re.compile(r"(?:(?<=\.)|^)" + pattern), repl) for pattern, repl in rules)


def _rewrite(name: str, rules: tuple[tuple[re.Pattern, str], ...]) -> str:
    for pattern, repl in rules:
        name = pattern.sub(repl, name, count=1)
    return name


_DIFFUSERS_COMPILED = _whole_segments(_DIFFUSERS_RULES)

# diffusers < 0.14 saved the autoencoder's attention under other names; accept them on load.
_DIFFUSERS_LEGACY_VAE = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def diffusers_name(name: str) -> str:
    """Our parameter name → diffusers' name (U-Net and autoencoder alike)."""
    return _rewrite(name, _DIFFUSERS_COMPILED)


# ----------------------------------------------------------------------------------------------------------------
# Original LDM names: positional (input_blocks.k.m), so they are derived from the config.
# ----------------------------------------------------------------------------------------------------------------

_LDM_RESBLOCK = {"norm1": "in_layers.0", "conv1": "in_layers.2", "emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "skip": "skip_connection"}  # fmt: skip
_LDM_TRANSFORMER = _whole_segments(_TRANSFORMER_RULES)
_LDM_VAE_ATTN = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."


def _ldm_unet_prefixes(config: UNetConfig) -> dict[str, str]:
    """Our module prefix → the LDM prefix, for every ResBlock, transformer, resampler and stem of the U-Net."""
    levels = len(config.block_out_channels)
    table = {"conv_in.": "input_blocks.0.0.", "time_embed.linear_1.": "time_embed.0.",
             "time_embed.linear_2.": "time_embed.2.", "class_embed.": "label_emb.",
             "add_embed.linear_1.": "label_emb.0.0.", "add_embed.linear_2.": "label_emb.0.2.",
             "mid.res.0.": "middle_block.0.", "mid.attn.": "middle_block.1.", "mid.res.1.": "middle_block.2.",
             "norm_out.": "out.0.", "conv_out.": "out.2."}  # fmt: skip
    k = 1
    for i in range(levels):
        for j in range(config.layers_per_block):
            table[f"down.{i}.res.{j}."] = f"input_blocks.{k}.0."
            table[f"down.{i}.attn.{j}."] = f"input_blocks.{k}.1."
            k += 1
        if i < levels - 1:
            table[f"down.{i}.downsample.conv."] = f"input_blocks.{k}.0.op."
            k += 1
    k = 0
    for u in range(levels):
        attn = config.attention_levels[levels - 1 - u]
        for j in range(config.layers_per_block + 1):
            table[f"up.{u}.res.{j}."] = f"output_blocks.{k}.0."
            table[f"up.{u}.attn.{j}."] = f"output_blocks.{k}.1."
            if j == config.layers_per_block and u < levels - 1:
                table[f"up.{u}.upsample.conv."] = f"output_blocks.{k}.{2 if attn else 1}.conv."
            k += 1
    return table


def _ldm_vae_prefixes(config: AutoencoderConfig) -> dict[str, str]:
    levels = len(config.block_out_channels)
    table = {}
    for part in ("encoder", "decoder"):
        table[f"{part}.mid.res.0."] = f"{part}.mid.block_1."
        table[f"{part}.mid.res.1."] = f"{part}.mid.block_2."
        table[f"{part}.mid.attn_norm."] = f"{part}.mid.attn_1.norm."
        table[f"{part}.mid.attn."] = f"{part}.mid.attn_1."
    for i in range(levels):
        for j in range(config.layers_per_block):
            table[f"encoder.down.{i}.res.{j}."] = f"encoder.down.{i}.block.{j}."
    for u in range(levels):  # LDM stores the decoder's levels highest resolution first
        for j in range(config.layers_per_block + 1):
            table[f"decoder.up.{u}.res.{j}."] = f"decoder.up.{levels - 1 - u}.block.{j}."
        table[f"decoder.up.{u}.upsample."] = f"decoder.up.{levels - 1 - u}.upsample."
    return table


def _swap_prefix(name: str, table: Mapping[str, str]) -> tuple[str, str]:
    """Longest matching prefix of ``name`` in ``table`` → (translated prefix, remainder); unmatched → ("", name)."""
    best = max((p for p in table if name.startswith(p)), key=len, default="")
    return (table[best], name[len(best):]) if best else ("", name)


def ldm_unet_name(name: str, config: UNetConfig, _table: dict[str, str] | None = None) -> str:
    """Our U-Net parameter name → the original LDM (CompVis/Stability) name."""
    head, rest = _swap_prefix(name, _table if _table is not None else _ldm_unet_prefixes(config))
    if ".res." in name and head:  # inside a ResBlock
        first, _, tail = rest.partition(".")
        rest = f"{_LDM_RESBLOCK.get(first, first)}.{tail}"
    elif ".attn." in name:  # inside a spatial transformer (mid.attn. included)
        rest = _rewrite(rest, _LDM_TRANSFORMER)
    return head + rest


def ldm_vae_name(name: str, config: AutoencoderConfig, _table: dict[str, str] | None = None) -> str:
    """Our autoencoder parameter name → the original LDM name."""
    head, rest = _swap_prefix(name, _table if _table is not None else _ldm_vae_prefixes(config))
    if not head:
        return name  # conv_in, norm_out, conv_out, quant convs and downsamplers share their names
    if head.endswith("attn_1."):
        first, _, tail = rest.partition(".")
        return f"{head}{_LDM_VAE_ATTN.get(first, first)}.{tail}"
    return head + rest.replace("skip.", "nin_shortcut.")


# ----------------------------------------------------------------------------------------------------------------
# The loader shared by every direction.
# ----------------------------------------------------------------------------------------------------------------


def _meta_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = build()
    return {k: v.shape for k, v in model.state_dict().items()}


def _drop_trailing_ones(shape: torch.Size) -> tuple[int, ...]:
    return tuple(d for i, d in enumerate(shape) if not (i >= 2 and d == 1))


def _fit(value: Tensor, shape: torch.Size, name: str) -> Tensor:
    """Reshape between 1×1 conv ``(o, i, 1, 1)`` / conv1d ``(o, i, 1)`` and linear ``(o, i)`` weights."""
    if value.shape == shape:
        return value
    if _drop_trailing_ones(value.shape) == _drop_trailing_ones(shape):
        return value.reshape(shape)
    raise ValueError(f"weight {name!r} has shape {tuple(value.shape)}, the model expects {tuple(shape)}")


def _rename(
    state_dict: StateDict, shapes: Mapping[str, torch.Size], foreign_name: Callable[[str], str], what: str
) -> dict[str, Tensor]:
    """Foreign state dict → ours, given our expected ``shapes`` and the our→foreign name translation."""
    inverse = {foreign_name(ours): ours for ours in shapes}
    if len(inverse) != len(shapes):
        raise AssertionError(f"{what}: the name translation is not one-to-one")
    missing = sorted(f for f in inverse if f not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in inverse)
    if missing or unexpected:
        raise ValueError(
            f"{what}: the checkpoint does not match the config. Missing {len(missing)}: {missing[:8]}; "
            f"unexpected {len(unexpected)}: {unexpected[:8]}. Check the config (levels, layers_per_block, "
            "attention_levels, quant convs, linear projections) against the checkpoint's."
        )
    return {inverse[k]: _fit(v, shapes[inverse[k]], k) for k, v in state_dict.items()}


def _export(state_dict: StateDict, foreign_name: Callable[[str], str]) -> dict[str, Tensor]:
    return {foreign_name(k): v for k, v in state_dict.items()}


def _strip_prefix(state_dict: StateDict, prefix: str) -> dict[str, Tensor]:
    """Keep the keys under ``prefix`` (removed) when any key has it; otherwise take the dict as already bare."""
    if any(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def from_diffusers_unet_state_dict(state_dict: StateDict, config: UNetConfig) -> dict[str, Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict → ours (load with ``strict=True``)."""
    return _rename(state_dict, _meta_shapes(lambda: UNet(config)), diffusers_name, "diffusers U-Net")


def to_diffusers_unet_state_dict(state_dict: StateDict) -> dict[str, Tensor]:
    """Our U-Net state dict → diffusers' names (shapes already agree when the configs do)."""
    return _export(state_dict, diffusers_name)


def current_vae_attention_names(state_dict: StateDict) -> dict[str, Tensor]:
    """A diffusers autoencoder state dict with the mid-block attention's pre-0.14 names (``query``, ``key``,
    ``value``, ``proj_attn``) renamed to the current ones; other keys unchanged."""
    renamed = {}
    for k, v in state_dict.items():
        if ".mid_block.attentions.0." in k:
            head, _, last = k.rpartition(".attentions.0.")
            for old, new in _DIFFUSERS_LEGACY_VAE.items():
                if last.startswith(old):
                    last = new + last[len(old):]
            k = f"{head}.attentions.0.{last}"
        renamed[k] = v
    return renamed


def from_diffusers_vae_state_dict(state_dict: StateDict, config: AutoencoderConfig) -> dict[str, Tensor]:
    """A diffusers ``AutoencoderKL`` state dict (current or pre-0.14 attention names) → ours."""
    return _rename(current_vae_attention_names(state_dict), _meta_shapes(lambda: AutoencoderKL(config)),
                   diffusers_name, "diffusers autoencoder")


def to_diffusers_vae_state_dict(state_dict: StateDict) -> dict[str, Tensor]:
    """Our autoencoder state dict → diffusers' names."""
    return _export(state_dict, diffusers_name)


def from_ldm_unet_state_dict(
    state_dict: StateDict, config: UNetConfig, prefix: str = LDM_UNET_PREFIX
) -> dict[str, Tensor]:
    """An original SD checkpoint (whole, or its ``model.diffusion_model.`` part) → our U-Net state dict.

    Only the non-EMA weights under ``prefix`` are taken; 1×1 conv / linear projections are reshaped to ``config``.
    """
    table = _ldm_unet_prefixes(config)
    return _rename(
        _strip_prefix(state_dict, prefix),
        _meta_shapes(lambda: UNet(config)),
        lambda n: ldm_unet_name(n, config, table),
        "LDM U-Net",
    )


def to_ldm_unet_state_dict(state_dict: StateDict, config: UNetConfig, prefix: str = "") -> dict[str, Tensor]:
    """Our U-Net state dict → original LDM names (optionally under ``prefix``, e.g. ``model.diffusion_model.``)."""
    table = _ldm_unet_prefixes(config)
    return {prefix + k: v for k, v in _export(state_dict, lambda n: ldm_unet_name(n, config, table)).items()}


def from_ldm_vae_state_dict(
    state_dict: StateDict, config: AutoencoderConfig, prefix: str = LDM_VAE_PREFIX
) -> dict[str, Tensor]:
    """An original SD checkpoint (whole, or its ``first_stage_model.`` part, or a standalone VAE .ckpt) → ours.

    The LDM attention stores q/k/v/proj_out as 1×1 convolutions; they are reshaped to linear weights. Extra
    training-only entries of a standalone VAE checkpoint (``loss.*``: LPIPS and discriminator; ``model_ema.*``)
    are ignored, so the non-EMA weights are loaded.
    """
    bare = {
        k: v
        for k, v in _strip_prefix(state_dict, prefix).items()
        if not k.startswith(("loss.", "model_ema."))
    }
    table = _ldm_vae_prefixes(config)
    return _rename(
        bare, _meta_shapes(lambda: AutoencoderKL(config)), lambda n: ldm_vae_name(n, config, table), "LDM autoencoder"
    )


def to_ldm_vae_state_dict(
    state_dict: StateDict, config: AutoencoderConfig, prefix: str = "", conv_attention: bool = True
) -> dict[str, Tensor]:
    """Our autoencoder state dict → original LDM names; ``conv_attention`` stores q/k/v/proj_out as 1×1 convs."""
    table = _ldm_vae_prefixes(config)
    out = {}
    for k, v in state_dict.items():
        name = ldm_vae_name(k, config, table)
        if conv_attention and ".attn_1." in name and name.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]
        out[prefix + name] = v
    return out


# ----------------------------------------------------------------------------------------------------------------
# diffusers config.json → our configs
# ----------------------------------------------------------------------------------------------------------------

# diffusers options we do not implement: each must be absent or hold the value shown.
_UNET_FIXED: dict[str, Any] = {
    "center_input_sample": False, "only_cross_attention": False, "dual_cross_attention": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "downsample_padding": 1, "mid_block_scale_factor": 1,
    "act_fn": "silu", "encoder_hid_dim": None, "encoder_hid_dim_type": None, "class_embed_type": None,
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}  # fmt: skip
# Keys that carry no architecture (or only numerics irrelevant in fp32 and for a different attention kernel).
_UNET_IGNORED = {"sample_size", "upcast_attention", "addition_embed_type_num_heads"}
_UNET_USED = {
    "in_channels", "out_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "up_block_types",
    "block_out_channels", "layers_per_block", "dropout", "norm_num_groups", "norm_eps", "cross_attention_dim",
    "transformer_layers_per_block", "attention_head_dim", "num_attention_heads", "use_linear_projection",
    "addition_embed_type", "addition_time_embed_dim", "num_class_embeds", "resnet_time_scale_shift",
    "time_embedding_dim", "projection_class_embeddings_input_dim",
}  # fmt: skip


def _per_level(value: Any, levels: int, key: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"diffusers config {key}={value} has {len(value)} entries for {levels} levels")
        return list(value)
    return [value] * levels


def _uniform(value: Any, key: str) -> Any:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"diffusers config {key}={value}: only one value for all levels is supported")
        return value[0]
    return value


def _check_keys(config: Mapping[str, Any], fixed: Mapping[str, Any], used: set, ignored: set, what: str) -> None:
    for key, value in config.items():
        if key.startswith("_") or key in ignored or key in used:
            continue
        if key not in fixed:
            raise ValueError(f"{what} config key {key!r}={value!r} is unknown to this converter")
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(v != fixed[key] and not (v is None and fixed[key] is False) for v in values):
            raise ValueError(f"{what} config {key}={value!r} is not supported; only {fixed[key]!r} is")


def config_from_diffusers_unet(config: Mapping[str, Any], **overrides: Any) -> UNetConfig:
    """A diffusers ``UNet2DConditionModel`` ``config.json`` (as a dict) → :class:`UNetConfig`.

    diffusers' ``attention_head_dim`` is a head *count* (see :mod:`models.unet`), so it becomes ``num_heads``;
    a real ``num_attention_heads`` wins when present. Unsupported options raise ``ValueError``.
    """
    _check_keys(config, _UNET_FIXED, _UNET_USED, _UNET_IGNORED, "diffusers U-Net")
    down = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up = list(config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if any(t not in kinds for t in down):
        raise ValueError(f"diffusers down_block_types={down}: only CrossAttnDownBlock2D and DownBlock2D are supported")
    attention_levels = [kinds[t] for t in down]
    mirrored = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)]
    if up != mirrored:
        raise ValueError(f"diffusers up_block_types={up} must mirror down_block_types={down} (expected {mirrored})")
    levels = len(down)
    widths = list(config.get("block_out_channels", [320, 640, 1280, 1280]))
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    add_type = config.get("addition_embed_type") or "none"
    if add_type not in ("none", "text_time"):
        raise ValueError(f"diffusers addition_embed_type={add_type!r} is not supported (only None or 'text_time')")
    time_shift = config.get("resnet_time_scale_shift", "default")
    if time_shift not in ("default", "scale_shift"):
        raise ValueError(f"diffusers resnet_time_scale_shift={time_shift!r}: only 'default' or 'scale_shift'")
    cross = config.get("cross_attention_dim", 1280)
    kwargs: dict[str, Any] = dict(
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        block_out_channels=widths,
        layers_per_block=_uniform(config.get("layers_per_block", 2), "layers_per_block"),
        attention_levels=attention_levels,
        transformer_depth=[int(d) for d in _per_level(config.get("transformer_layers_per_block", 1), levels,
                                                      "transformer_layers_per_block")],  # fmt: skip
        num_heads=[int(h) for h in _per_level(heads, levels, "attention_head_dim")],
        head_dim=None,
        cross_attention_dim=None if cross is None else int(_uniform(cross, "cross_attention_dim")),
        use_linear_projection=bool(config.get("use_linear_projection", False)),
        norm_num_groups=config.get("norm_num_groups", 32),
        norm_eps=float(config.get("norm_eps", 1e-5)),
        time_embed_dim=config.get("time_embedding_dim"),
        flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
        freq_shift=float(config.get("freq_shift", 0)),
        resnet_scale_shift=time_shift == "scale_shift",
        num_classes=config.get("num_class_embeds"),
        addition_embed_type=add_type,
        addition_embed_input_dim=config.get("projection_class_embeddings_input_dim") if add_type != "none" else None,
        addition_time_embed_dim=config.get("addition_time_embed_dim") if add_type != "none" else None,
        dropout=float(config.get("dropout", 0.0)),
    )
    kwargs.update(overrides)
    return UNetConfig(**kwargs)


_VAE_FIXED: dict[str, Any] = {"act_fn": "silu", "latents_mean": None, "latents_std": None}
_VAE_IGNORED = {"sample_size", "force_upcast"}
_VAE_USED = {
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
    "latent_channels", "norm_num_groups", "scaling_factor", "shift_factor", "use_quant_conv", "use_post_quant_conv",
    "mid_block_add_attention",
}  # fmt: skip


def config_from_diffusers_vae(config: Mapping[str, Any], **overrides: Any) -> AutoencoderConfig:
    """A diffusers ``AutoencoderKL`` ``config.json`` (as a dict) → :class:`AutoencoderConfig`."""
    _check_keys(config, _VAE_FIXED, _VAE_USED, _VAE_IGNORED, "diffusers autoencoder")
    widths = list(config.get("block_out_channels", [64]))
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(config.get(key, [kind]))
        if types != [kind] * len(widths):
            raise ValueError(f"diffusers {key}={types}: expected {len(widths)} × {kind!r}")
    kwargs: dict[str, Any] = dict(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        latent_channels=config.get("latent_channels", 4),
        block_out_channels=widths,
        layers_per_block=config.get("layers_per_block", 1),
        norm_num_groups=config.get("norm_num_groups", 32),
        mid_block_attention=bool(config.get("mid_block_add_attention", True)),
        use_quant_conv=bool(config.get("use_quant_conv", True)),
        use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
        scaling_factor=float(config.get("scaling_factor", 0.18215)),
        shift_factor=float(config.get("shift_factor") or 0.0),
    )
    kwargs.update(overrides)
    return AutoencoderConfig(**kwargs)
