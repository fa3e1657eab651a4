"""Frozen OpenCLIP text encoder (Radford et al. 2021; Cherti et al. 2023) turned into a :class:`Conditioning`.

Only open_clip's text tower is kept (token embedding, positional embedding, causal transformer, ``ln_final``,
``text_projection``); the image tower is never built. Weights come from one of:

(a) an open_clip model name and pretrained tag (``ViT-H-14`` / ``laion2b_s32b_b79k``, Stable Diffusion 2.x's
    encoder), downloaded by open_clip; where the machine cannot download, :class:`TextEncoderLoadError` says so;
(b) a local checkpoint (``.safetensors``, or an open_clip ``.pt``/``.bin`` read with ``weights_only=True``): a
    full CLIP checkpoint, a ``CustomTextCLIP`` one (``text.`` prefix), or one written by
    :meth:`TextEncoder.save_checkpoint`, or an original Stable Diffusion 2.x single file (its
    ``cond_stage_model.model.*`` text tower); only the text weights are read;
(c) random initialisation from a model config: an open_clip model name, a JSON file in open_clip's model-config
    format (``{"embed_dim", "text_cfg", ["quick_gelu"]}``), or a config bundled in ``models/configs/`` such as
    ``openclip-tiny-text`` (for tests; it uses open_clip's bundled BPE vocabulary, which needs no download).

Hugging Face text encoders (SD 1.5 / 2.x / SDXL ``text_encoder/`` folders, T5 for PixArt and Wan) are built by the
same ``TextEncoder(config)`` with ``config.format`` ``hf-clip`` / ``hf-sdxl`` / ``hf-t5``
(:mod:`models.hf_text_encoders`). ``config.mask_padding`` says whether the padding is masked, per model.

What :meth:`TextEncoder.encode` returns, checked against the Stability AI references:

* ``context``: per-token states of the last block (``layer="last"``) or of the block before it
  (``layer="penultimate"``, Stable Diffusion 2.x). Stable Diffusion 2.x's ``FrozenOpenCLIPEmbedder`` stops the
  transformer early and applies ``ln_final`` to the penultimate states too; that is ``hidden_ln_final=True``
  (default). SDXL's ``FrozenOpenCLIPEmbedder2(legacy=False)`` returns the penultimate states *without*
  ``ln_final``; that is ``hidden_ln_final=False``.
* ``pooled``: always from the *last* block: ``ln_final``, the state at the end-of-text token (open_clip's
  ``argmax`` pooling), then ``text_projection``: open_clip's ``encode_text`` without normalisation, which is also
  SDXL's pooled embedding.
* ``context_mask``: True for the start token, the caption and the end-of-text token; False for the padding after
  it. (CLIP's causal mask means padding never changes the earlier states; the mask is for the denoiser's
  cross-attention. Stable Diffusion itself attends to the padding; ``mask_padding=False`` makes the mask all True.)
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import open_clip
import torch
from torch import Tensor, nn

from models.conditioning import Conditioning
from models.openclip_towers import DTYPES, OpenClipTower, TowerLoadError, resolve_openclip_config

logger = logging.getLogger(__name__)

# format -> whether its padding is masked by default (see TextEncoderConfig.mask_padding)
FORMATS: dict[str, bool] = {"openclip": True, "hf-clip": False, "hf-sdxl": False, "hf-t5": True}
# Where an original Stable Diffusion 2.x single file keeps its OpenCLIP text tower (open_clip's own names below it).
SD2_TEXT_PREFIX = "cond_stage_model.model."

# Top-level names of the text tower's weights in an open_clip CLIP state dict.
TEXT_KEYS: tuple[str, ...] = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


class TextEncoderLoadError(TowerLoadError):
    """Text-encoder weights could not be obtained (no network, missing file, incompatible checkpoint)."""


@dataclass
class TextEncoderConfig:
    """Which OpenCLIP text tower to build and what to read out of it."""

    model: str = "ViT-H-14"
    """open_clip model name, a JSON model-config path, or the stem of a config in ``models/configs/``."""
    pretrained: Optional[str] = None
    """open_clip pretrained tag to download (e.g. ``laion2b_s32b_b79k``); exclusive with ``checkpoint``."""
    checkpoint: Optional[str] = None
    """Local weights file (``.safetensors``, ``.pt``, ``.bin``); exclusive with ``pretrained``."""
    layer: Literal["last", "penultimate"] = "penultimate"
    """Which block's per-token states form ``context`` (Stable Diffusion 2.x: penultimate)."""
    hidden_ln_final: bool = True
    """Apply ``ln_final`` to ``context`` (SD 2.x: True, also for penultimate; SDXL's OpenCLIP-G: False)."""
    freeze: bool = True
    """Freeze the weights (requires_grad False) and keep the module in eval mode."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Parameter dtype after loading."""
    cache_dir: Optional[str] = None
    """Where open_clip caches downloads (None: its default)."""
    format: Literal["openclip", "hf-clip", "hf-sdxl", "hf-t5"] = "openclip"
    """Which files and implementation: ``openclip`` (this module: ``model`` / ``pretrained`` tag / ``checkpoint``);
    ``hf-clip`` (a transformers CLIP text model: SD 1.5 / 2.x ``text_encoder/``), ``hf-sdxl`` (SDXL's two encoders
    as one conditioning) or ``hf-t5`` (a T5 / umT5 encoder: PixArt, Wan), read from ``pretrained`` = a folder or
    Hub id (:mod:`models.hf_text_encoders`; needs the ``hf`` extra)."""
    mask_padding: Optional[bool] = None
    """Whether the denoiser's cross-attention masks the padding after the end-of-text token (``context_mask``);
    False attends to every position, as Stable Diffusion 1.x/2.x/XL were trained. None: the format's default (mask
    for ``openclip`` and ``hf-t5``, attend to all for ``hf-clip`` and ``hf-sdxl``)."""
    max_length: Optional[int] = None
    """Tokens per prompt for the Hugging Face formats (padded and truncated to it); None: the tokenizer's
    (CLIP 77). PixArt-α 120, PixArt-Σ 300, Wan 512."""

    def __post_init__(self) -> None:
        if self.pretrained is not None and self.checkpoint is not None:
            raise ValueError(
                f"TextEncoderConfig: pretrained={self.pretrained!r} and checkpoint={self.checkpoint!r} are both set; "
                "give one source of weights"
            )
        if self.layer not in ("last", "penultimate"):
            raise ValueError(f"TextEncoderConfig.layer={self.layer!r}: choose 'last' or 'penultimate'")
        if self.dtype not in DTYPES:
            raise ValueError(f"TextEncoderConfig.dtype={self.dtype!r}: choose one of {list(DTYPES)}")
        if not self.model:
            raise ValueError("TextEncoderConfig.model is empty: give an open_clip model name or a JSON config path")
        if self.format not in FORMATS:
            raise ValueError(f"TextEncoderConfig.format={self.format!r}: choose one of {list(FORMATS)}")
        if self.max_length is not None and self.max_length <= 0:
            raise ValueError(f"TextEncoderConfig.max_length={self.max_length!r}: must be a positive number")
        if self.format != "openclip":
            if self.pretrained is None or self.checkpoint is not None:
                raise ValueError(
                    f"TextEncoderConfig.format={self.format!r} reads its weights and tokenizer from pretrained= (a "
                    "transformers model folder, a diffusers pipeline folder or a Hub id), not from checkpoint="
                )
            if self.format == "hf-t5" and self.layer != "last":
                raise ValueError("TextEncoderConfig.format='hf-t5' reads the encoder's last hidden states (what "
                                 f"PixArt and Wan use): set layer='last' (got {self.layer!r})")

    @property
    def masks_padding(self) -> bool:
        """``mask_padding``, or the format's default when it is None."""
        return FORMATS[self.format] if self.mask_padding is None else bool(self.mask_padding)


# --------------------------------------------------------------------------------------------------------------
# Configs, weights, tokenizers
# --------------------------------------------------------------------------------------------------------------


def resolve_model_config(model: str) -> tuple[dict[str, Any], bool]:
    """open_clip-format model config for ``model`` and whether it is an open_clip built-in name."""
    return resolve_openclip_config(model, "text-encoder")


def build_text_tower(model_config: dict[str, Any]) -> nn.Module:
    """open_clip's ``TextTransformer`` for an open_clip model config (text part only, random init)."""
    text_cfg = dict(model_config.get("text_cfg", {}))
    if text_cfg.get("hf_model_name"):
        raise ValueError(
            f"text towers from Hugging Face ({text_cfg['hf_model_name']!r}) are not supported; use an open_clip "
            "CLIP text transformer (e.g. ViT-H-14, ViT-bigG-14)"
        )
    if text_cfg.get("embed_cls"):
        raise ValueError("text towers with an appended CLS token (CoCa) are not supported")
    # open_clip's own text-tower builder: the same module open_clip.create_model would put in a CLIP.
    from open_clip.model import _build_text_tower

    return _build_text_tower(
        model_config["embed_dim"], text_cfg, quick_gelu=bool(model_config.get("quick_gelu", False))
    )


def extract_text_weights(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The text tower's weights, keyed as in open_clip's ``TextTransformer``, from a CLIP / CustomTextCLIP /
    :meth:`TextEncoder.save_checkpoint` state dict, or the text tower inside an original Stable Diffusion 2.x
    single file (under ``cond_stage_model.model.``)."""
    if any(k.startswith(SD2_TEXT_PREFIX) for k in state):
        state = {k[len(SD2_TEXT_PREFIX):]: v for k, v in state.items() if k.startswith(SD2_TEXT_PREFIX)}
    if any(k.startswith("text.") for k in state):
        return {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
    return {k: v for k, v in state.items() if k.split(".", 1)[0] in TEXT_KEYS}


@functools.lru_cache(maxsize=8)
def _tokenizer_for(model: str, builtin: bool, context_length: int) -> Any:
    if builtin:
        return open_clip.get_tokenizer(model, context_length=context_length)
    return open_clip.SimpleTokenizer(context_length=context_length)


# --------------------------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------------------------



def cached_null_conditioning(encoder: Any, batch_size: int) -> Conditioning:
    """``encoder.encode([""])`` repeated ``batch_size`` times, cached in ``encoder._null_cache`` per (device, dtype)
    while ``encoder.frozen`` (every text encoder's ``null_conditioning``: OpenCLIP's and the Hugging Face ones)."""
    key = (encoder.device, encoder.dtype)
    null = encoder._null_cache.get(key) if encoder.frozen else None
    if null is None:
        with torch.no_grad():
            null = encoder.encode([""])
        if encoder.frozen:
            encoder._null_cache[key] = null
    return Conditioning(**{name: t.repeat(batch_size, *([1] * (t.ndim - 1))) for name, t in null.tensors().items()})


class TextEncoder(OpenClipTower):
    """OpenCLIP text tower + tokenizer; ``encode(captions) -> Conditioning(context, context_mask, pooled)``.

    ``TextEncoder(config)`` with a Hugging Face ``config.format`` builds the
    :class:`models.hf_text_encoders.HFTextEncoder` instead (same ``encode`` / ``null_conditioning`` contract), so
    every caller builds any text encoder the same way.
    """

    def __new__(cls, config: Optional[TextEncoderConfig] = None, *args: Any, **kwargs: Any) -> Any:
        if cls is TextEncoder and config is not None and getattr(config, "format", "openclip") != "openclip":
            from models.hf_text_encoders import HFTextEncoder

            return HFTextEncoder(config)  # not a TextEncoder: Python then skips TextEncoder.__init__
        return super().__new__(cls)

    config_cls = TextEncoderConfig
    load_error = TextEncoderLoadError
    what, tower_name, tower_attr = "text-encoder", "text tower", "text"

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        model_config, builtin = resolve_model_config(config.model)
        text_cfg = model_config.get("text_cfg", {})
        if not builtin and text_cfg.get("hf_tokenizer_name"):
            raise ValueError(
                f"text-encoder config {config.model!r} names a Hugging Face tokenizer; only open_clip's bundled "
                "BPE tokenizer is supported for local configs"
            )
        model_config = self.pretrained_model_config(model_config, builtin)
        self.text = self.build_tower(build_text_tower, model_config, extract_text_weights)

        self.context_length = int(self.text.context_length)
        self.tokenizer = _tokenizer_for(config.model, builtin, self.context_length)
        self.eot_token_id: Optional[int] = getattr(self.tokenizer, "eot_token_id", None)
        self.pool_type = str(getattr(self.text, "pool_type", text_cfg.get("pool_type", "argmax")))
        self._null_cache: dict[tuple[torch.device, torch.dtype], Conditioning] = {}
        self.freeze_as_configured()

    def after_load(self, tower: nn.Module) -> None:
        if getattr(tower, "attn_mask", None) is not None:  # non-persistent buffer: rebuild it off meta
            tower.attn_mask = tower.build_causal_mask()

    # ---- state ------------------------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        self._null_cache.clear()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def device(self) -> torch.device:
        return self.text.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text.token_embedding.weight.dtype

    @property
    def context_dim(self) -> int:
        """Width of ``context`` (the transformer width)."""
        return int(self.text.width)

    @property
    def pooled_dim(self) -> int:
        """Width of ``pooled`` (the projection's output, or the width when there is none)."""
        proj = self.text.text_projection
        if proj is None:
            return self.context_dim
        return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])

    # ---- encoding ---------------------------------------------------------------------------------------------

    def tokenize(self, captions: Union[str, list[str]]) -> Tensor:
        """Token ids ``(B, context_length)`` int64 (start token, BPE tokens, end-of-text, zero padding)."""
        if isinstance(captions, str):
            captions = [captions]
        if not all(isinstance(c, str) for c in captions):
            raise TypeError(f"captions must be strings, got {[type(c).__name__ for c in captions]}")
        return self.tokenizer(list(captions))

    def token_mask(self, tokens: Tensor) -> Tensor:
        """``(B, L)`` bool, True up to and including each row's end-of-text token (all True when the config does
        not mask the padding)."""
        if not self.config.masks_padding:
            return torch.ones_like(tokens, dtype=torch.bool)
        if self.eot_token_id is not None:
            is_eot = tokens == self.eot_token_id  # (B, L)
            eot = torch.where(is_eot.any(dim=1), is_eot.int().argmax(dim=1), tokens.argmax(dim=1))  # (B,)
        else:  # CLIP's convention: the end-of-text id is the largest id
            eot = tokens.argmax(dim=1)  # (B,)
        positions = torch.arange(tokens.shape[1], device=tokens.device)  # (L,)
        return positions[None, :] <= eot[:, None]  # (B, L)

    def _pool(self, x: Tensor, tokens: Tensor) -> Tensor:
        """open_clip's text pooling of ``x`` ``(B, L, W)`` → ``(B, W)``."""
        rows = torch.arange(x.shape[0], device=x.device)
        if self.pool_type == "first":
            return x[:, 0]
        if self.pool_type == "last":
            return x[:, -1]
        if self.pool_type == "eos":
            return x[rows, (tokens == self.text.eos_id).int().argmax(dim=-1)]
        if self.pool_type == "argmax":
            return x[rows, tokens.argmax(dim=-1)]
        raise ValueError(f"unsupported open_clip pool_type {self.pool_type!r}")

    def encode_tokens(self, tokens: Tensor) -> Conditioning:
        """Token ids ``(B, L)`` → ``Conditioning(context (B, L, W), context_mask (B, L), pooled (B, P))``."""
        text = self.text
        tokens = tokens.to(self.device)
        length = tokens.shape[1]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            x = text.token_embedding(tokens)  # (B, L, W)
            x = x + text.positional_embedding[:length].to(x.dtype)  # (B, L, W)
            attn_mask = getattr(text, "attn_mask", None)
            if attn_mask is not None:
                attn_mask = attn_mask[:length, :length].to(x.dtype)  # (L, L) additive causal mask
            batch_first = getattr(text.transformer, "batch_first", True)
            if not batch_first:
                x = x.transpose(0, 1)  # (L, B, W): older open_clip blocks are sequence-first
            blocks = text.transformer.resblocks
            hidden_at = len(blocks) - 1 if self.config.layer == "penultimate" else len(blocks)
            hidden = x
            for i, block in enumerate(blocks):
                if i == hidden_at:
                    hidden = x  # input of the last block = output of the penultimate one
                x = block(x, attn_mask=attn_mask)  # (B, L, W)
            if hidden_at == len(blocks):
                hidden = x
            if not batch_first:
                x, hidden = x.transpose(0, 1), hidden.transpose(0, 1)  # (B, L, W)
            final = text.ln_final(x)  # (B, L, W)
            context = text.ln_final(hidden) if self.config.hidden_ln_final else hidden  # (B, L, W)
            pooled = self._pool(final, tokens)  # (B, W)
            proj = text.text_projection
            if isinstance(proj, nn.Linear):
                pooled = proj(pooled)  # (B, P)
            elif proj is not None:
                pooled = pooled @ proj  # (B, P)
        return Conditioning(context=context, context_mask=self.token_mask(tokens), pooled=pooled)

    def encode(self, captions: Union[str, list[str]]) -> Conditioning:
        """Captions → ``Conditioning(context, context_mask, pooled)`` on this module's device and dtype."""
        return self.encode_tokens(self.tokenize(captions))

    def forward(self, captions: Union[str, list[str]]) -> Conditioning:
        return self.encode(captions)

    def null_conditioning(self, batch_size: int) -> Conditioning:
        """The empty-prompt encoding ``encode([""])`` repeated ``batch_size`` times (the classifier-free-guidance
        unconditional input). Cached per device and dtype while the encoder is frozen."""
        return cached_null_conditioning(self, batch_size)
