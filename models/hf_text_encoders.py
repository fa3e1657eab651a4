"""Hugging Face text encoders (through ``transformers``) turned into a :class:`Conditioning`, as the published
diffusion models use them.

Formats (``TextEncoderConfig.format``; ``pretrained`` is a local folder or a Hub id):

* ``hf-clip``: a ``CLIPTextModel`` or ``CLIPTextModelWithProjection`` folder with its CLIP tokenizer: the
  ``text_encoder/`` + ``tokenizer/`` of a Stable Diffusion 1.5 / 2.x pipeline folder (give the pipeline folder or
  the model folder). SD 1.5 and SD 2.x read the last hidden states after the final LayerNorm (diffusers' SD 2
  folder already has the last block removed): ``layer="last"``, ``hidden_ln_final=True``.
* ``hf-sdxl``: SDXL's two encoders as one conditioning (Podell et al. 2023): ``text_encoder/`` (CLIP ViT-L) and
  ``text_encoder_2/`` (OpenCLIP ViT-bigG, with projection) of an SDXL pipeline folder, each with its own tokenizer
  (bigG's pads with ``!``). ``context`` is the concatenation of both penultimate hidden states without the final
  LayerNorm (768 + 1280 = 2048 wide; ``layer="penultimate"``, ``hidden_ln_final=False``) and ``pooled`` bigG's
  projected end-of-text embedding (1280), which SDXL's U-Net adds through ``text_time``: what diffusers'
  ``StableDiffusionXLPipeline.encode_prompt`` computes.
* ``hf-t5``: a ``T5EncoderModel`` (or ``UMT5EncoderModel``) folder with its tokenizer: PixArt-α/Σ's T5-XXL
  (120 / 300 tokens) or Wan's umT5 (512). The encoder sees the padding mask; ``context`` is its last hidden state
  (``layer="last"``); there is no pooled output.

Token handling follows each model's training (``TextEncoderConfig.mask_padding``, default per format): Stable
Diffusion attends to all 77 positions, padding included, so its ``context_mask`` is all True (nothing is masked,
and :meth:`Conditioning.trim_context` then trims nothing, in training and in ``generate()`` alike); PixArt and Wan
mask the padding (``context_mask`` True through the end-of-text token). Prompts are padded to ``max_length``
(default: the tokenizer's length, 77 for CLIP) and truncated to it.

Weights are loaded strictly: a folder whose weights miss a parameter of its config is refused, naming the folder
and the missing names (``transformers`` would otherwise initialise them at random).

``pretrained`` may also be an **original Stable Diffusion single file** (``.safetensors`` / ``.ckpt``), whose encoders
are built from the file itself (:func:`single_file_encoders`): ``hf-clip`` reads SD 1.x's CLIP ViT-L under
``cond_stage_model.transformer.`` (transformers' ``CLIPTextModel`` names), ``hf-sdxl`` SDXL's CLIP-L under
``conditioner.embedders.0.transformer.`` and its OpenCLIP bigG under ``conditioner.embedders.1.model.`` (open_clip's
names, converted to ``CLIPTextModelWithProjection``). Sizes come from the tensor shapes (64-channel heads, as every
published CLIP text model has; OpenAI's CLIP-L uses QuickGELU, OpenCLIP's bigG GELU). A single file keeps no
tokenizer: the CLIP BPE vocabulary is open_clip's bundled one (the same 49,408 tokens), written as a transformers
``CLIPTokenizer`` by :func:`training.export_formats.write_clip_tokenizer`; CLIP-L pads with its end-of-text token and
bigG with ``!`` as SD 1.x's and SDXL's ``tokenizer`` / ``tokenizer_2`` do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from models.conditioning import Conditioning
from models.openclip_towers import DTYPES

# format -> the (model subfolder, tokenizer subfolder) pairs of a diffusers pipeline folder, in order
PIPELINE_PARTS: dict[str, tuple[tuple[str, str], ...]] = {
    "hf-clip": (("text_encoder", "tokenizer"),),
    "hf-sdxl": (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
    "hf-t5": (("text_encoder", "tokenizer"),),
}
MAX_TOKENIZER_LENGTH = 100_000  # a tokenizer reporting more has no real limit (transformers' "very large" default)
# format -> where each encoder sits in an original SD single file, and its layout ("hf": transformers names, "openclip")
SINGLE_FILE_PARTS: dict[str, tuple[tuple[str, str], ...]] = {
    "hf-clip": (("cond_stage_model.transformer.", "hf"),),
    "hf-sdxl": (("conditioner.embedders.0.transformer.", "hf"), ("conditioner.embedders.1.model.", "openclip")),
}
CLIP_HEAD_DIM = 64  # channels per attention head of every published CLIP text model (L, H, bigG)


def _load_error() -> type:
    from models.text_encoder import TextEncoderLoadError

    return TextEncoderLoadError


def locate(pretrained: str, fmt: str) -> list[tuple[str, str, str, str]]:
    """``(model location, model subfolder, tokenizer location, tokenizer subfolder)`` per encoder of ``fmt``:
    ``pretrained`` is a model folder (``config.json`` there; its tokenizer files beside it, or in a sibling
    ``tokenizer*`` folder of a pipeline), a diffusers pipeline folder (the subfolders of :data:`PIPELINE_PARTS`), or
    a Hub id of a pipeline."""
    error = _load_error()
    parts = PIPELINE_PARTS[fmt]
    path = Path(pretrained)
    if not path.exists():
        if path.is_absolute() or pretrained.startswith((".", "~")) or pretrained.count("/") != 1:
            raise error(f"text-encoder folder {pretrained!r} does not exist")
        return [(pretrained, model, pretrained, tok) for model, tok in parts]  # a Hub id: a pipeline's layout
    if (path / "config.json").is_file():
        if len(parts) > 1:
            raise error(f"text-encoder format {fmt!r} needs a pipeline folder holding "
                        f"{' and '.join(m for m, _ in parts)}; {str(path)!r} is one model folder")
        has_tokenizer = any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json",
                                                                 "vocab.json", "spiece.model"))
        sibling = path.parent / path.name.replace("text_encoder", "tokenizer")
        tokenizer = path if has_tokenizer or not sibling.is_dir() else sibling
        return [(str(path), "", str(tokenizer), "")]
    missing = [m for m, _ in parts if not (path / m / "config.json").is_file()]
    if missing:
        raise error(f"text-encoder folder {str(path)!r}: no config.json there, nor in {', '.join(missing)}/ "
                    f"(format {fmt!r} reads a transformers model folder or a diffusers pipeline folder)")
    return [(str(path), model, str(path), tok) for model, tok in parts]


def _model_class(location: str, subfolder: str) -> type:
    """The transformers class a folder's ``config.json`` asks for (CLIP with or without projection, T5, umT5)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(location, subfolder=subfolder)
    architectures = list(getattr(config, "architectures", None) or [])
    if config.model_type == "clip_text_model":
        return (transformers.CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in architectures
                else transformers.CLIPTextModel)
    if config.model_type == "t5":
        return transformers.T5EncoderModel
    if config.model_type == "umt5":
        return transformers.UMT5EncoderModel
    raise _load_error()(f"text-encoder folder {location}/{subfolder}: model_type {config.model_type!r} is not a CLIP "
                        "text model, T5 or umT5 encoder")


def load_model(location: str, subfolder: str) -> nn.Module:
    """The transformers encoder of a folder, loaded strictly (every parameter from the file)."""
    where = f"{location}/{subfolder}" if subfolder else location
    cls = _model_class(location, subfolder)
    try:
        model, info = cls.from_pretrained(location, subfolder=subfolder, output_loading_info=True)
    except OSError as err:
        raise _load_error()(f"text-encoder folder {where}: {err}") from err
    missing = sorted(info.get("missing_keys", ()))
    mismatched = [str(m) for m in info.get("mismatched_keys", ())]
    if missing or mismatched:
        shapes = f"; mismatched: {mismatched[:4]}" if mismatched else ""
        raise _load_error()(f"text-encoder folder {where}: its weights file lacks {len(missing)} parameter(s) of "
                            f"{cls.__name__}: {missing[:6]}{shapes}")
    return model.eval()


def load_tokenizer(location: str, subfolder: str) -> Any:
    import transformers

    where = f"{location}/{subfolder}" if subfolder else location
    try:
        return transformers.AutoTokenizer.from_pretrained(location, subfolder=subfolder)
    except (OSError, ValueError) as err:
        raise _load_error()(f"text-encoder tokenizer {where}: {err}") from err


def _single_file_tokenizer(context_length: int, pad: str) -> Any:
    """open_clip's bundled CLIP BPE as a transformers ``CLIPTokenizer`` padding with ``pad``."""
    import tempfile

    import transformers

    from training.export_formats import write_clip_tokenizer  # the one writer of that vocabulary as CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_clip_tokenizer(Path(folder), context_length)
        return transformers.CLIPTokenizer.from_pretrained(folder, pad_token=pad)


def _clip_config(state: dict[str, Tensor], where: str, act: str, projection: bool) -> Any:
    """A ``CLIPTextConfig`` read off a CLIP text model's tensor shapes (transformers names, ``text_model.`` level)."""
    import transformers

    try:
        vocab, width = state["text_model.embeddings.token_embedding.weight"].shape
        positions = state["text_model.embeddings.position_embedding.weight"].shape[0]
        inner = state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise _load_error()(f"{where}: no CLIP text model there (missing {e.args[0]})") from None
    layers = len({k.split(".")[3] for k in state if k.startswith("text_model.encoder.layers.")})
    extra = {"projection_dim": int(state["text_projection.weight"].shape[0])} if projection else {}
    return transformers.CLIPTextConfig(
        vocab_size=int(vocab), hidden_size=int(width), intermediate_size=int(inner), num_hidden_layers=layers,
        num_attention_heads=max(int(width) // CLIP_HEAD_DIM, 1), max_position_embeddings=int(positions),
        hidden_act=act, layer_norm_eps=1e-5, bos_token_id=int(vocab) - 2, eos_token_id=int(vocab) - 1,
        pad_token_id=1, **extra)


def single_file_encoders(path: Path, fmt: str) -> tuple[list[nn.Module], list[Any]]:
    """The encoders and tokenizers of format ``fmt`` built from an original SD single file (module docstring)."""
    import transformers

    from models.text_encoder import TEXT_KEYS
    from training.weights import read_state_dict

    if fmt not in SINGLE_FILE_PARTS:
        raise _load_error()(f"text encoder {str(path)!r}: format {fmt!r} is not read from a single file "
                            f"(formats {', '.join(SINGLE_FILE_PARTS)} are; give a folder)")
    prefixes = tuple(prefix for prefix, _ in SINGLE_FILE_PARTS[fmt])
    if path.suffix == ".safetensors":  # only the text tensors of a multi-GB file
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)}
    else:
        state = {k: v for k, v in read_state_dict(path, "text encoder").items() if k.startswith(prefixes)}
    encoders, tokenizers = [], []
    for prefix, layout in SINGLE_FILE_PARTS[fmt]:
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        where = f"text encoder {path}: {prefix}*"
        if not part:
            raise _load_error()(f"{where}: the file has no such tensors (format {fmt!r} reads "
                                f"{' and '.join(p + '*' for p, _ in SINGLE_FILE_PARTS[fmt])})")
        if layout == "openclip":  # SDXL's bigG in open_clip's names
            from training.export_formats import openclip_to_hf_clip_state_dict

            tower = {k: v for k, v in part.items() if k.split(".", 1)[0] in TEXT_KEYS}
            blocks = len({k.split(".")[2] for k in tower if k.startswith("transformer.resblocks.")})
            part = openclip_to_hf_clip_state_dict(tower, blocks, projection=True)
            cls, act = transformers.CLIPTextModelWithProjection, "gelu"
        else:  # OpenAI's CLIP-L in transformers' names (``text_model.`` level or not)
            part = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in part.items()
                    if not k.endswith("position_ids")}
            cls, act = transformers.CLIPTextModel, "quick_gelu"
        model = cls(_clip_config(part, where, act, cls is not transformers.CLIPTextModel)).eval()
        own = set(model.state_dict())
        if not any(k.startswith("text_model.") for k in own):  # transformers 5's flattened CLIPTextModel
            part = {k.removeprefix("text_model."): v for k, v in part.items()}
        missing, unexpected = sorted(own - set(part)), sorted(set(part) - own)
        if missing or unexpected:
            raise _load_error()(f"{where}: does not fit {cls.__name__} (missing {missing[:4]}, unexpected "
                                f"{unexpected[:4]})")
        model.load_state_dict(part, strict=True)
        encoders.append(model)
        pad = "!" if layout == "openclip" else "<|endoftext|>"
        tokenizers.append(_single_file_tokenizer(int(model.config.max_position_embeddings), pad))
    return encoders, tokenizers


class HFTextEncoder(nn.Module):
    """One or two transformers text encoders + tokenizers; ``encode(captions) -> Conditioning(context, context_mask,
    pooled)`` as described in the module docstring. Built by ``TextEncoder(config)`` for ``format`` other than
    ``openclip``."""

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.format = config.format
        if config.pretrained is None:
            raise ValueError(f"TextEncoderConfig.format={config.format!r} needs pretrained= (a transformers model "
                             "folder, a diffusers pipeline folder or a Hub id)")
        try:
            import transformers  # noqa: F401
        except ImportError as err:
            raise _load_error()(f"TextEncoderConfig.format={config.format!r} needs the transformers package: "
                                "pip install 'latentloom[hf]'") from err
        if Path(config.pretrained).is_file():  # an original SD single file (module docstring)
            encoders, self.tokenizers = single_file_encoders(Path(config.pretrained), config.format)
            self.encoders = nn.ModuleList(encoders)
        else:
            parts = locate(config.pretrained, config.format)
            self.encoders = nn.ModuleList(load_model(loc, sub) for loc, sub, _, _ in parts)
            self.tokenizers = [load_tokenizer(loc, sub) for _, _, loc, sub in parts]
        kinds = {type(e).__name__ for e in self.encoders}
        expected = {"hf-clip": ("CLIPTextModel", "CLIPTextModelWithProjection"),
                    "hf-sdxl": ("CLIPTextModel", "CLIPTextModelWithProjection"),
                    "hf-t5": ("T5EncoderModel", "UMT5EncoderModel")}[self.format]
        if not kinds <= set(expected):
            raise _load_error()(f"text-encoder {config.pretrained!r}: format {self.format!r} expects "
                                f"{' or '.join(expected)}, the folder holds {sorted(kinds)}")
        self.max_length = self._max_length()
        self.mask_padding = config.masks_padding
        self.to(DTYPES[config.dtype])
        self._null_cache: dict[tuple[torch.device, torch.dtype], Conditioning] = {}
        self.frozen = config.freeze
        if self.frozen:
            self.requires_grad_(False)
            self.eval()

    def _max_length(self) -> int:
        if self.config.max_length is not None:
            length = int(self.config.max_length)
        else:
            lengths = {int(t.model_max_length) for t in self.tokenizers}
            if max(lengths) > MAX_TOKENIZER_LENGTH:
                raise ValueError(f"text-encoder {self.config.pretrained!r}: its tokenizer sets no length; give "
                                 "max_length= (PixArt-α: 120, PixArt-Σ: 300, Wan: 512)")
            length = min(lengths)
        for encoder in self.encoders:
            limit = getattr(encoder.config, "max_position_embeddings", None)
            if limit is not None and length > limit:
                raise ValueError(f"TextEncoderConfig.max_length={length} exceeds the encoder's "
                                 f"{limit} positions ({self.config.pretrained!r})")
        return length

    # ---- state ------------------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> Any:
        """A frozen encoder stays in eval mode whatever the trainer asks."""
        return super().train(mode and not getattr(self, "frozen", False))

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        self._null_cache.clear()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def context_dim(self) -> int:
        """Width of ``context`` (the hidden widths, summed over SDXL's two encoders)."""
        return sum(int(e.config.hidden_size if hasattr(e.config, "hidden_size") else e.config.d_model)
                   for e in self.encoders)

    @property
    def pooled_dim(self) -> Optional[int]:
        """Width of ``pooled`` (the last encoder's projection or width); None for T5."""
        last = self.encoders[-1]
        if self.format == "hf-t5":
            return None
        return int(getattr(last.config, "projection_dim", None) if hasattr(last, "text_projection")
                   else last.config.hidden_size)

    # ---- encoding ---------------------------------------------------------------------------------------------

    def tokenize(self, captions: Union[str, list[str]]) -> list[dict[str, Tensor]]:
        """Per encoder: ``input_ids`` and ``attention_mask`` ``(B, max_length)``, padded and truncated."""
        if isinstance(captions, str):
            captions = [captions]
        if not all(isinstance(c, str) for c in captions):
            raise TypeError(f"captions must be strings, got {[type(c).__name__ for c in captions]}")
        return [dict(t(list(captions), padding="max_length", max_length=self.max_length, truncation=True,
                       return_tensors="pt")) for t in self.tokenizers]

    def token_mask(self, tokens: Tensor, tokenizer: Any) -> Tensor:
        """``(B, L)`` bool, True up to and including each row's first end-of-text token (all True when padding
        is attended to, ``mask_padding`` False)."""
        if not self.mask_padding:
            return torch.ones_like(tokens, dtype=torch.bool)
        is_eos = tokens == tokenizer.eos_token_id  # (B, L)
        last = torch.full_like(tokens[:, 0], tokens.shape[1] - 1)  # truncated without an end token: all valid
        eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), last)  # (B,)
        return torch.arange(tokens.shape[1], device=tokens.device)[None, :] <= eos[:, None]  # (B, L)

    def _clip_states(self, encoder: nn.Module, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(context (B, L, W), pooled)`` of one CLIP text model, as the config's layer and LayerNorm say."""
        out = encoder(input_ids=ids, output_hidden_states=True)
        if self.config.layer == "last":
            context = out.last_hidden_state if self.config.hidden_ln_final else out.hidden_states[-1]
        else:
            context = out.hidden_states[-2]
            if self.config.hidden_ln_final:
                context = getattr(encoder, "text_model", encoder).final_layer_norm(context)  # transformers 4 / 5
        pooled = out.text_embeds if hasattr(out, "text_embeds") and out.text_embeds is not None else out.pooler_output
        return context, pooled  # (B, L, W), (B, P)

    def encode(self, captions: Union[str, list[str]]) -> Conditioning:
        """Captions → ``Conditioning(context, context_mask, pooled)`` on this module's device and dtype."""
        batches = self.tokenize(captions)
        device = self.device
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self.format == "hf-t5":
                ids, attn = batches[0]["input_ids"].to(device), batches[0]["attention_mask"].to(device)
                context = self.encoders[0](input_ids=ids, attention_mask=attn).last_hidden_state  # (B, L, W)
                return Conditioning(context=context, context_mask=self.token_mask(ids, self.tokenizers[0]))
            contexts, pooled = [], None
            for encoder, batch in zip(self.encoders, batches):
                context, pooled = self._clip_states(encoder, batch["input_ids"].to(device))
                contexts.append(context)
        mask = self.token_mask(batches[0]["input_ids"].to(device), self.tokenizers[0])  # (B, L)
        return Conditioning(context=torch.cat(contexts, dim=-1), context_mask=mask, pooled=pooled)

    def forward(self, captions: Union[str, list[str]]) -> Conditioning:
        return self.encode(captions)

    def null_conditioning(self, batch_size: int) -> Conditioning:
        """``encode([""])`` repeated ``batch_size`` times (cached per device and dtype while frozen)."""
        from models.text_encoder import cached_null_conditioning

        return cached_null_conditioning(self, batch_size)


# Settings of the published models: format, layer, final LayerNorm, whether the padding is masked, tokens.
PUBLISHED: dict[str, dict[str, Any]] = {
    "sd15": dict(format="hf-clip", layer="last", hidden_ln_final=True),
    "sd2": dict(format="hf-clip", layer="last", hidden_ln_final=True),  # diffusers' folder: 23 blocks, last = SD's
    "sdxl": dict(format="hf-sdxl", layer="penultimate", hidden_ln_final=False),
    "pixart-alpha": dict(format="hf-t5", layer="last", max_length=120),
    "pixart-sigma": dict(format="hf-t5", layer="last", max_length=300),
    "wan": dict(format="hf-t5", layer="last", max_length=512),
}


def published_text_encoder_config(model: str, pretrained: str, **overrides: Any) -> Any:
    """The :class:`~models.text_encoder.TextEncoderConfig` a published model's text encoder needs (``model``: a key
    of :data:`PUBLISHED`), reading its files from ``pretrained``."""
    from models.text_encoder import TextEncoderConfig

    if model not in PUBLISHED:
        raise ValueError(f"unknown published text encoder {model!r}; known: {', '.join(PUBLISHED)}")
    return TextEncoderConfig(pretrained=pretrained, **{**PUBLISHED[model], **overrides})
