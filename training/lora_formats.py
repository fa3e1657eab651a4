"""LoRA files in the layouts other tools read and write: diffusers/PEFT and kohya (ComfyUI, A1111).

Our own adapter files (:mod:`training.finetune`) name tensors after our modules and keep their config in our own
metadata. Two other layouts travel between tools, and both are read into ``loom sample --lora`` and written by
:func:`training.finetune.save_adapter` (``format=``) and ``loom lora``:

* **diffusers / PEFT** (``pipe.load_lora_weights``, ``UNet2DConditionModel.load_lora_adapter``): one tensor pair
  per adapted layer, ``<prefix>.<diffusers module path>.lora_A.weight`` (``A``: r × in) and ``.lora_B.weight``
  (``B``: out × r), prefix ``unet`` (a U-Net), ``transformer`` (a DiT / PixArt transformer) or ``text_encoder`` /
  ``text_encoder_2``. The scale comes from the safetensors header entry ``lora_adapter_metadata``: JSON of the peft
  ``LoraConfig`` fields with the prefix (``unet.r``, ``unet.lora_alpha``, ``unet.alpha_pattern``,
  ``unet.use_rslora``...), as diffusers' ``save_lora_weights(..., unet_lora_adapter_metadata=...)`` writes it.
  Without it diffusers takes alpha = rank (scale 1); ``<module>.alpha`` tensors, which some trainers write, are
  read as that module's alpha.
* **kohya** (sd-scripts ``networks/lora.py``; ComfyUI, A1111): ``lora_unet_<module path with _ for .>`` (or
  ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` for text encoders), each with ``.lora_down.weight`` (A),
  ``.lora_up.weight`` (B) and a scalar ``.alpha`` (scale ``alpha / r``; no alpha: scale 1). The module path is
  diffusers' (kohya's SD 1.x/2.x naming, which diffusers and ComfyUI map for every U-Net) or, on read, the original
  LDM/SGM one (``input_blocks_4_1_...``, kohya's SDXL naming).

A layer's update is ``ΔW = scale · B A`` in every layout; a layer may have its own rank and alpha. Names are mapped
through the same tables as the weight converters: :func:`models.convert.diffusers_name` and
:func:`models.convert.ldm_unet_name` for the U-Net, :func:`models.dit_checkpoints.diffusers_rules` for the DiT and
PixArt transformers. Every tensor of a file must land on a layer: a key that matches none (another architecture's,
a LoCon/LoHa variant's) is an error naming it, never skipped.

**Text-encoder layers** (``text_encoder.`` / ``text_encoder_2.``, kohya ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``;
published SD 1.5 and SDXL LoRAs often carry them) are named after transformers' CLIP text model
(``text_model.encoder.layers.<i>.self_attn.q_proj`` ...; kohya writes the same path with ``_``). ``text_encoder`` /
``lora_te_`` / ``lora_te1_`` address the first encoder (SD 1.x/2.x's CLIP, SDXL's CLIP-L), ``text_encoder_2`` /
``lora_te2_`` the second (SDXL's OpenCLIP bigG), as diffusers' ``load_lora_weights`` and ComfyUI map them.
:func:`merge_text_encoder_layers` folds them into the run's text encoder at load time (``W ← W + user scale ·
scale · B A``, the file's alpha / rank): a Hugging Face encoder (:mod:`models.hf_text_encoders`) by its own module
names, our OpenCLIP tower through the name map of the CLIP text model (``q_proj`` / ``k_proj`` / ``v_proj`` are the
three row blocks of ``attn.in_proj_weight``, ``out_proj`` ← ``attn.out_proj``, ``mlp.fc1`` / ``fc2`` ←
``mlp.c_fc`` / ``c_proj``, ``text_projection`` ← the transposed ``text_projection``). The denoiser part of the file
is attached as before (:func:`resolve`). Every text-encoder key must land on a layer too.
"""

from __future__ import annotations

import collections
import json
import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, get_args

import torch
from torch import Tensor, nn

LoraFileFormat = Literal["ours", "diffusers", "kohya"]
LORA_FILE_FORMATS: tuple[str, ...] = get_args(LoraFileFormat)
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header entry (loaders.lora_base)
DENOISER_PREFIXES = {"unet": "unet", "dit": "transformer"}  # diffusers' component of each denoiser family
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")
KOHYA_UNET = "lora_unet_"
KOHYA_TEXT_ENCODER = ("lora_te_", "lora_te1_", "lora_te2_")
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
CLIP_TEXT_MODEL = "text_model."  # transformers' CLIP text-model level (gone from transformers 5's CLIPTextModel)
ADAPTABLE = (nn.Linear, nn.Conv2d, nn.Conv3d)


@dataclass
class LayerLora:
    """One adapted layer as a file holds it: ``ΔW = scale · up @ down`` (``down`` = A, ``up`` = B)."""

    down: Tensor  # A: (r, in) or (r, in, kh, kw)
    up: Tensor  # B: (out, r) or (out, r, 1, 1)
    scale: float  # alpha / r (alpha / sqrt(r) with rank-stabilised LoRA)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


# --------------------------------------------------------------------------------------------- detect, read


def detect_format(keys: list[str], header: Mapping[str, str], ours_key: str) -> str:
    """``"ours"``, ``"diffusers"`` or ``"kohya"`` from a file's tensor names and header; ValueError otherwise."""
    if ours_key in header:
        return "ours"
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) or k.startswith((KOHYA_UNET, *KOHYA_TEXT_ENCODER))
           for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "diffusers"
    raise ValueError(f"not a LoRA file this version reads (no '{ours_key}' metadata, no diffusers/PEFT lora_A / "
                     f"lora_B and no kohya lora_down / lora_up tensors; first keys: {keys[:3]})")


def _pattern_value(patterns: Mapping[str, Any], name: str) -> Any:
    """peft's lookup of a per-module ``rank_pattern`` / ``alpha_pattern`` entry (regex matched at a name boundary)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def read_diffusers(state: Mapping[str, Tensor], header: Mapping[str, str], what: str) -> dict[str, LayerLora]:
    """A diffusers/PEFT LoRA state dict → ``{prefixed module path: LayerLora}`` (``unet.down_blocks...to_q``)."""
    meta: dict[str, Any] = json.loads(header[DIFFUSERS_METADATA_KEY]) if DIFFUSERS_METADATA_KEY in header else {}
    pairs: dict[str, dict[str, Tensor]] = collections.defaultdict(dict)
    alphas: dict[str, float] = {}
    for key, tensor in state.items():
        if key.endswith(".lora_A.weight"):
            pairs[key[: -len(".lora_A.weight")]]["down"] = tensor
        elif key.endswith(".lora_B.weight"):
            pairs[key[: -len(".lora_B.weight")]]["up"] = tensor
        elif key.endswith(".alpha") and tensor.numel() == 1:
            alphas[key[: -len(".alpha")]] = float(tensor)
        else:
            raise ValueError(f"{what}: tensor {key!r} is not a LoRA A/B weight or alpha (LoRA biases, DoRA magnitudes "
                             "and other adapter types are not read)")
    out = {}
    for module, pair in pairs.items():
        if set(pair) != {"down", "up"}:
            raise ValueError(f"{what}: {module!r} has only its lora_{'A' if 'down' in pair else 'B'} weight")
        prefix, _, path = module.partition(".")
        config = {k[len(prefix) + 1:]: v for k, v in meta.items() if k.startswith(prefix + ".")}
        rank = int(pair["down"].shape[0])
        if module in alphas:
            alpha, rslora = alphas[module], False
        elif config:
            alpha = _pattern_value(config.get("alpha_pattern") or {}, path)
            alpha = float(config.get("lora_alpha", config.get("r", rank)) if alpha is None else alpha)
            rslora = bool(config.get("use_rslora", False))
        else:
            alpha, rslora = float(rank), False  # diffusers' convention without metadata: alpha = rank
        out[module] = LayerLora(pair["down"], pair["up"], alpha / (rank ** 0.5 if rslora else rank))
    return out


def read_kohya(state: Mapping[str, Tensor], what: str) -> dict[str, LayerLora]:
    """A kohya LoRA state dict → ``{kohya layer name: LayerLora}`` (``lora_unet_down_blocks_0_..._to_q``)."""
    parts: dict[str, dict[str, Tensor]] = collections.defaultdict(dict)
    for key, tensor in state.items():
        suffix = next((s for s in KOHYA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"{what}: tensor {key!r} is not a kohya LoRA weight ({', '.join(KOHYA_SUFFIXES)}); "
                             "LoCon/LoHa/LoKr and DoRA tensors are not read")
        parts[key[: -len(suffix)]][suffix] = tensor
    out = {}
    for name, p in parts.items():
        if ".lora_down.weight" not in p or ".lora_up.weight" not in p:
            raise ValueError(f"{what}: {name!r} lacks its lora_down or lora_up weight")
        rank = int(p[".lora_down.weight"].shape[0])
        alpha = float(p[".alpha"]) if ".alpha" in p else float(rank)
        out[name] = LayerLora(p[".lora_down.weight"], p[".lora_up.weight"], alpha / rank)
    return out


# --------------------------------------------------------------------------------------------- name tables


def denoiser_family(model: nn.Module) -> str:
    """``"unet"`` (our image U-Net) or ``"dit"`` (our DiT / PixArt transformer); ValueError for another denoiser."""
    from models.dit import DiT
    from models.unet import UNet

    if isinstance(model, UNet):
        return "unet"
    if isinstance(model, DiT):
        return "dit"
    raise ValueError(f"LoRA files in diffusers/kohya layout: no diffusers naming is known for a "
                     f"{type(model).__name__} denoiser (supported: the image U-Net, and the DiT / PixArt "
                     "transformers with a diffusers counterpart)")


def _dit_module_map(model: nn.Module) -> dict[str, str]:
    from models.dit_checkpoints import diffusers_rules

    out = {}
    for rule in diffusers_rules(model.config):
        if len(rule.ours) == 1 and len(rule.theirs) == 1 and rule.ours[0].endswith(".weight"):
            out[rule.ours[0][: -len(".weight")]] = rule.theirs[0][: -len(".weight")]
    return out


def diffusers_module_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Our module names → diffusers' module paths (no component prefix) for the denoiser ``model``."""
    family = denoiser_family(model)
    if family == "unet":
        from models.convert import diffusers_name

        return {n: diffusers_name(n + ".weight")[: -len(".weight")] for n in names}
    table = _dit_module_map(model)
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"LoRA: layers {missing[:3]} of this {type(model).__name__} have no counterpart in "
                         "diffusers' transformer (a fused or embedder layer); export them in our own format")
    return {n: table[n] for n in names}


def foreign_table(model: nn.Module) -> dict[str, str]:
    """Every foreign name of every adaptable layer of ``model`` → our module name: ``unet.<path>`` /
    ``transformer.<path>`` (diffusers), ``lora_unet_<path_with_underscores>`` (kohya, diffusers' and, for the
    U-Net, the original LDM/SGM paths). A name two layers would share is left out (reading it is then an error)."""
    family = denoiser_family(model)
    names = [n for n, m in model.named_modules() if isinstance(m, ADAPTABLE)]
    if family == "dit":
        known = _dit_module_map(model)
        names = [n for n in names if n in known]
    paths = diffusers_module_names(model, names)
    table: dict[str, str] = {}
    clashes: set[str] = set()

    def put(key: str, name: str) -> None:
        if table.get(key, name) != name:
            clashes.add(key)
        table[key] = name

    for name in names:
        put(f"{DENOISER_PREFIXES[family]}.{paths[name]}", name)
        put(KOHYA_UNET + paths[name].replace(".", "_"), name)
    if family == "unet":
        from models.convert import LDM_UNET_PREFIX, ldm_unet_name

        for name in names:
            ldm = ldm_unet_name(name + ".weight", model.config).removeprefix(LDM_UNET_PREFIX)
            put(KOHYA_UNET + ldm[: -len(".weight")].replace(".", "_"), name)
    for key in clashes:
        del table[key]
    return table


def resolve(layers: Mapping[str, LayerLora], model: nn.Module, what: str) -> dict[str, LayerLora]:
    """Foreign layer names → our module names of ``model``, shapes fitted to our layers (a 1×1 convolution's
    ``(r, in, 1, 1)`` as a Linear's ``(r, in)`` and back). Names that match no layer are errors naming the key, and
    so are text-encoder layers: they are split off first (:func:`split_text_encoder`) and merged into the text
    encoder (:func:`merge_text_encoder_layers`), as ``open_run`` / ``loom sample --lora`` do."""
    text = [k for k in layers if is_text_encoder_key(k)]
    if text:
        raise ValueError(f"{what}: {len(text)} text-encoder layers (e.g. {text[0]!r}) given to the denoiser: load "
                         "the file with open_run / open_pretrained / loom sample --lora, which merge them into the "
                         "text encoder")
    table = foreign_table(model)
    modules = dict(model.named_modules())
    out = {}
    for key, layer in layers.items():
        name = table.get(key)
        if name is None:
            family = denoiser_family(model)
            raise ValueError(f"{what}: LoRA key {key!r} matches no layer of this {type(model).__name__} (expected "
                             f"'{DENOISER_PREFIXES[family]}.<diffusers module path>' or '{KOHYA_UNET}<path>' names "
                             "of its attention, feed-forward, projection or convolution layers)")
        if name in out:
            raise ValueError(f"{what}: two entries adapt the same layer {name!r} (one is {key!r})")
        weight = modules[name].weight
        down, up = layer.down, layer.up
        if weight.ndim == 2:
            down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
        elif down.ndim == 2:
            down = down.reshape(*down.shape, *([1] * (weight.ndim - 2)))
            up = up.reshape(*up.shape, *([1] * (weight.ndim - 2)))
        if down.shape[1:] != (weight.shape[1], *weight.shape[2:]) and weight.ndim == 2:
            raise ValueError(f"{what}: {key!r} has lora_A of shape {tuple(layer.down.shape)}; layer {name!r} takes "
                             f"{weight.shape[1]} inputs")
        if up.shape[0] != weight.shape[0]:
            raise ValueError(f"{what}: {key!r} has lora_B of shape {tuple(layer.up.shape)}; layer {name!r} has "
                             f"{weight.shape[0]} outputs")
        out[name] = LayerLora(down.float(), up.float(), layer.scale)
    return out


# --------------------------------------------------------------------------------------------- text encoders


def is_text_encoder_key(key: str) -> bool:
    """Whether a foreign layer name addresses a text encoder (diffusers' or kohya's prefixes)."""
    return key.startswith(TEXT_ENCODER_PREFIXES + KOHYA_TEXT_ENCODER)


def split_text_encoder(layers: Mapping[str, LayerLora]) -> tuple[dict[str, LayerLora], dict[str, LayerLora]]:
    """``(denoiser layers, text-encoder layers)`` of a foreign file's layers."""
    text = {k: v for k, v in layers.items() if is_text_encoder_key(k)}
    return {k: v for k, v in layers.items() if k not in text}, text


@dataclass
class TextTarget:
    """Where one CLIP-named text-encoder layer lives in our encoder: rows of a parameter, maybe transposed."""

    param: nn.Parameter  # the weight the update is added to
    rows: Optional[slice] = None  # a block of its rows (q / k / v inside a fused in_proj_weight); None: all
    transpose: bool = False  # the parameter holds W^T (open_clip's text_projection is x @ P)

    def view(self) -> Tensor:
        w = self.param.data if self.rows is None else self.param.data[self.rows]
        return w.t() if self.transpose else w  # (out, in) like a Linear weight


def _openclip_targets(tower: nn.Module) -> dict[str, TextTarget]:
    """transformers CLIP text-model names → our OpenCLIP tower's weights (see the module docstring)."""
    out: dict[str, TextTarget] = {}
    for i, block in enumerate(tower.transformer.resblocks):
        base = f"text_model.encoder.layers.{i}."
        attn = block.attn
        if isinstance(attn, nn.MultiheadAttention) and attn.in_proj_weight is not None:
            width = attn.embed_dim
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{base}self_attn.{name}"] = TextTarget(attn.in_proj_weight, slice(j * width, (j + 1) * width))
            out[f"{base}self_attn.out_proj"] = TextTarget(attn.out_proj.weight)
        for ours, theirs in (("c_fc", "fc1"), ("c_proj", "fc2")):
            layer = getattr(getattr(block, "mlp", None), ours, None)
            if isinstance(layer, nn.Linear):
                out[f"{base}mlp.{theirs}"] = TextTarget(layer.weight)
    proj = getattr(tower, "text_projection", None)
    if isinstance(proj, nn.Linear):
        out["text_projection"] = TextTarget(proj.weight)
    elif isinstance(proj, nn.Parameter):
        out["text_projection"] = TextTarget(proj, transpose=True)
    return out


def _hf_targets(encoder: nn.Module) -> dict[str, TextTarget]:
    """A transformers encoder's Linear layers by module name. A CLIP text model answers to both spellings of its
    names: ``text_model.encoder.layers...`` (published LoRA files; transformers 4, ``CLIPTextModelWithProjection``)
    and ``encoder.layers...`` (transformers 5's flattened ``CLIPTextModel``), as diffusers' loader accepts both."""
    out: dict[str, TextTarget] = {}
    clip = getattr(getattr(encoder, "config", None), "model_type", "") == "clip_text_model"
    for name, module in encoder.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        out[name] = TextTarget(module.weight)
        if clip and name.startswith(CLIP_TEXT_MODEL):
            out.setdefault(name[len(CLIP_TEXT_MODEL):], out[name])
        elif clip and name.startswith("encoder."):
            out.setdefault(CLIP_TEXT_MODEL + name, out[name])
    return out


def text_encoder_targets(text_encoder: nn.Module) -> list[dict[str, TextTarget]]:
    """Per encoder (SDXL: two), its layers by transformers module name. A Hugging Face encoder
    (``HFTextEncoder``: CLIP, T5) by its own Linear names; our OpenCLIP tower by the CLIP text-model names."""
    encoders = getattr(text_encoder, "encoders", None)
    if encoders is not None:
        return [_hf_targets(enc) for enc in encoders]
    tower = getattr(text_encoder, "text", None)
    if tower is not None and hasattr(tower, "transformer"):
        return [_openclip_targets(tower)]
    return []


def text_encoder_table(text_encoder: nn.Module) -> dict[str, TextTarget]:
    """Every foreign name of every text-encoder layer → its target: ``text_encoder.<path>`` and
    ``lora_te_`` / ``lora_te1_<path_with_underscores>`` for the first encoder, ``text_encoder_2.<path>`` and
    ``lora_te2_<path>`` for the second."""
    table: dict[str, TextTarget] = {}
    for i, targets in enumerate(text_encoder_targets(text_encoder)):
        diffusers_prefix = TEXT_ENCODER_PREFIXES[i] if i < len(TEXT_ENCODER_PREFIXES) else None
        kohya = ("lora_te_", "lora_te1_") if i == 0 else ("lora_te2_",) if i == 1 else ()
        for path, target in targets.items():
            if diffusers_prefix is not None:
                table[diffusers_prefix + path] = target
            for prefix in kohya:
                table[prefix + path.replace(".", "_")] = target
    return table


def merge_text_encoder_layers(text_encoder: Optional[nn.Module], layers: Mapping[str, LayerLora], scale: float,
                              what: str) -> int:
    """Fold a file's text-encoder layers into ``text_encoder`` in place: ``W ← W + scale · s · B A`` per layer
    (``s``: the file's alpha / rank; ``scale``: the user's). Every key is checked before any weight changes: one
    that matches no layer, or whose shapes do not fit it, is an error naming it. Returns the number merged."""
    if not layers:
        return 0
    first = next(iter(layers))
    table = text_encoder_table(text_encoder) if text_encoder is not None else {}
    if not table:
        kind = type(text_encoder).__name__ if text_encoder is not None else "no text encoder"
        raise ValueError(f"{what}: {len(layers)} text-encoder layers (e.g. {first!r}), but this pipeline has "
                         f"{kind}, which has no CLIP/T5 layers to merge them into")
    plan = []
    seen: dict[tuple[int, Any], str] = {}
    for key, layer in layers.items():
        target = table.get(key)
        if target is None:
            second = key.startswith(("text_encoder_2.", "lora_te2_"))
            has_second = any(k.startswith("text_encoder_2.") for k in table)
            which = ("a second text encoder (SDXL's OpenCLIP bigG), which this pipeline lacks" if second and
                     not has_second else f"the {type(text_encoder).__name__} text encoder")
            raise ValueError(f"{what}: LoRA key {key!r} matches no layer of {which} (expected "
                             "'text_encoder.<transformers module path>' or 'lora_te_<path>' names of its attention "
                             "and MLP layers)")
        where = (id(target.param), None if target.rows is None else target.rows.start)
        if where in seen:  # e.g. a file holding both spellings of a CLIP name (text_model. or not)
            raise ValueError(f"{what}: {key!r} and {seen[where]!r} adapt the same text-encoder layer")
        seen[where] = key
        down = layer.down.reshape(layer.down.shape[0], -1).float()  # (r, in)
        up = layer.up.reshape(layer.up.shape[0], -1).float()  # (out, r)
        weight = target.view()
        if (up.shape[0], down.shape[1]) != tuple(weight.shape):
            raise ValueError(f"{what}: {key!r} makes an update of shape {(up.shape[0], down.shape[1])}; the text "
                             f"encoder's layer has {tuple(weight.shape)}")
        plan.append((target, up, down, layer.scale))
    with torch.no_grad():
        for target, up, down, s in plan:
            weight = target.view()
            delta = (scale * s) * (up.to(weight.device) @ down.to(weight.device))  # (out, in)
            weight.add_(delta.to(weight.dtype))
    cache = getattr(text_encoder, "_null_cache", None)
    if isinstance(cache, dict):
        cache.clear()  # the empty prompt's encoding changed
    return len(plan)


# --------------------------------------------------------------------------------------------- peft, write


def peft_patterns(layers: Mapping[str, LayerLora]) -> tuple[int, float, dict[str, int], dict[str, float]]:
    """``(r, lora_alpha, rank_pattern, alpha_pattern)`` of a peft ``LoraConfig`` giving every layer its own rank
    and scale (patterns hold the layers that differ from the most common rank / alpha, anchored exact names)."""
    alphas = {n: layer.scale * layer.rank for n, layer in layers.items()}
    r = collections.Counter(layer.rank for layer in layers.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    rank_pattern = {"^" + re.escape(n): layer.rank for n, layer in layers.items() if layer.rank != r}
    alpha_pattern = {"^" + re.escape(n): a for n, a in alphas.items() if a != alpha}
    return r, alpha, rank_pattern, alpha_pattern


def to_diffusers(layers: Mapping[str, LayerLora], model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Our layers → a diffusers/PEFT state dict and header (alpha in ``lora_adapter_metadata``), for
    ``pipe.load_lora_weights`` / ``load_lora_adapter``."""
    prefix = DENOISER_PREFIXES[denoiser_family(model)]
    paths = diffusers_module_names(model, list(layers))
    state = {}
    for name, layer in layers.items():
        state[f"{prefix}.{paths[name]}.lora_A.weight"] = layer.down.contiguous()
        state[f"{prefix}.{paths[name]}.lora_B.weight"] = layer.up.contiguous()
    r, alpha, rank_pattern, alpha_pattern = peft_patterns({paths[n]: v for n, v in layers.items()})
    config = {"r": r, "lora_alpha": alpha, "target_modules": sorted(paths.values()), "rank_pattern": rank_pattern,
              "alpha_pattern": alpha_pattern, "lora_dropout": 0.0, "bias": "none", "use_rslora": False}
    return state, {DIFFUSERS_METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in config.items()}, sort_keys=True)}


def to_kohya(layers: Mapping[str, LayerLora], model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Our layers → a kohya state dict (``lora_unet_*.lora_down/lora_up/alpha``, diffusers module paths) and the
    ``ss_*`` header entries kohya's tools show."""
    if denoiser_family(model) != "unet":
        raise ValueError("LoRA: the kohya layout is written for U-Net denoisers only (kohya's transformer layouts "
                         "differ per model); export a DiT adapter in the diffusers layout")
    paths = diffusers_module_names(model, list(layers))
    state = {}
    for name, layer in layers.items():
        key = KOHYA_UNET + paths[name].replace(".", "_")
        state[f"{key}.lora_down.weight"] = layer.down.contiguous()
        state[f"{key}.lora_up.weight"] = layer.up.contiguous()
        state[f"{key}.alpha"] = torch.tensor(layer.scale * layer.rank, dtype=torch.float32)
    r, alpha, _, _ = peft_patterns(layers)
    return state, {"ss_network_module": "networks.lora", "ss_network_dim": str(r), "ss_network_alpha": str(alpha)}


def layers_from_ours(state: Mapping[str, Tensor], scale: float) -> dict[str, LayerLora]:
    """Our adapter tensors (``<module>.lora_A.weight`` / ``.lora_B.weight``) → layers with one scale."""
    out = {}
    for key, tensor in state.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            out[module] = LayerLora(tensor, state[f"{module}.lora_B.weight"], scale)
    return out


def write(layers: Mapping[str, LayerLora], model: nn.Module, fmt: str,
          extra_header: Optional[dict[str, str]] = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict and header of ``layers`` in the foreign layout ``fmt`` (``diffusers`` or ``kohya``)."""
    if fmt == "diffusers":
        state, header = to_diffusers(layers, model)
    elif fmt == "kohya":
        state, header = to_kohya(layers, model)
    else:
        raise ValueError(f"format: got {fmt!r}; expected one of {list(LORA_FILE_FORMATS)}")
    return state, {"format": "pt", **header, **(extra_header or {})}


__all__ = [
    "DIFFUSERS_METADATA_KEY", "LORA_FILE_FORMATS", "LayerLora", "denoiser_family", "detect_format",
    "diffusers_module_names", "foreign_table", "is_text_encoder_key", "layers_from_ours", "merge_text_encoder_layers",
    "peft_patterns", "read_diffusers", "read_kohya", "resolve", "split_text_encoder", "text_encoder_table",
    "text_encoder_targets", "to_diffusers", "to_kohya", "write",
]
