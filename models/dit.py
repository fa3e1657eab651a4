"""Diffusion Transformer for image and video latents.

The backbone is DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"): patchify the latent,
add fixed sin-cos position embeddings, run transformer blocks whose LayerNorms are modulated by the conditioning
embedding (adaLN-Zero), then a modulated final layer and unpatchify. Text conditioning follows PixArt-α (Chen et
al. 2023): a cross-attention layer between self-attention and the MLP of every block, optionally a caption
projection MLP, and optionally "adaLN-single" (one modulation MLP shared by every block plus a learned per-block
table).

Video uses the same code path. A ``(B, C, T, H, W)`` latent is patchified frame by frame into ``T·(H/p)·(W/p)``
tokens ordered (frame, row, column); every token attends to every other (full spatio-temporal attention). The
position embedding is separable: the 2-D spatial sin-cos embedding of the token's (row, column), plus, when
``T > 1``, a 1-D sin-cos embedding of its frame index over the whole width (as in Latte, Ma et al. 2024). With
``T == 1`` no temporal term is added, so a one-frame clip and an image give the same tokens. The layout is read from
the tensor alone: an image model (``video=False``) takes ``(B, C, H, W)`` images or ``(B, C, T, H, W)`` clips, a
video model (``video=True``) only clips; nothing else is accepted (in particular not frames folded into the batch).
The position table is cached per (grid, device, dtype), as it depends on nothing else.

Calling convention (see :mod:`models.conditioning`): ``model(x_t, timesteps, cond) -> out``, ``out`` shaped like
``x_t`` (with ``learn_sigma`` it has twice the channels: see :meth:`DiT.split_learned_sigma`).

Presets: the paper's S/B/L/XL × patch 2/4/8 class-conditional models (Peebles & Xie 2023, Table 1; ImageNet 256 px →
32×32×4 latents, 1000 classes, learned sigma), text-conditioned variants ``DiT-XL/2-text`` etc. (PixArt-α style:
cross-attention, caption MLP, adaLN-single; ``context_dim`` 1024 = the OpenCLIP ViT-H/14 text width, override it,
e.g. 4096 for T5-XXL), and tiny ones for tests; the architecture is registered as ``"dit"`` (:mod:`models.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
from torch import Tensor, nn

from models.attention import BACKENDS, Attention, FeedForward
from models.blocks import fold_frames
from models.conditioning import Conditioning
from models.embeddings import TimestepMLP, broadcast_timesteps, timestep_embedding
from models.registry import register_architecture, register_preset
from models.utils import checkpointed

POS_CACHE_SIZE = 16  # position tables kept per model (one per grid shape, device and dtype: buckets × devices)


@dataclass
class DiTConfig:
    """Architecture of a :class:`DiT`. Defaults are the class-conditional DiT-XL/2 of Peebles & Xie (2023)."""

    sample_size: int = 32
    """Nominal latent side (256 px → 32), for example inputs and FLOPs; any size divisible by the patch works."""
    patch_size: int = 2
    """Side of a square patch, in latent pixels (the p of DiT-XL/p)."""
    in_channels: int = 4
    """Latent channels of ``x_t``."""
    out_channels: Optional[int] = None
    """Predicted channels; None means ``in_channels``. Doubled when ``learn_sigma``."""
    learn_sigma: bool = False
    """Also predict the variance interpolation (Nichol & Dhariwal 2021), as DiT does: output has 2×out_channels."""
    hidden_size: int = 1152
    """Token width D."""
    depth: int = 28
    """Number of transformer blocks."""
    num_heads: int = 16
    """Attention heads; ``hidden_size`` must be divisible by it."""
    mlp_ratio: float = 4.0
    """MLP inner width as a multiple of ``hidden_size``."""
    qk_norm: bool = False
    """RMS-normalise queries and keys per head (stabilises large models)."""
    attention_backend: Literal["sdpa", "xformers", "math"] = "sdpa"
    """Attention implementation, see :mod:`models.attention`."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in backward (saves memory, costs one extra forward)."""
    frequency_embedding_size: int = 256
    """Width of the sinusoidal timestep features fed to the timestep MLP."""
    num_classes: Optional[int] = None
    """Number of classes for a class-conditional model (label ``num_classes`` = null class); None: unconditional."""
    context_dim: Optional[int] = None
    """Width of ``cond.context`` for cross-attention (PixArt-α); None: no cross-attention."""
    caption_projection: bool = False
    """Map ``cond.context`` to ``hidden_size`` with a 2-layer GELU MLP before cross-attention (PixArt-α)."""
    pooled_dim: Optional[int] = None
    """Width of ``cond.pooled``, added to the timestep embedding through an MLP; None: not used."""
    vector_dim: Optional[int] = None
    """Width of ``cond.vector`` (e.g. micro-conditioning features), added like ``pooled``; None: not used."""
    adaln_single: bool = False
    """PixArt-α adaLN-single: one modulation MLP shared by all blocks plus a learned (6, D) table per block."""
    pos_embed_base_size: Optional[int] = None
    """Patches each axis's positions are rescaled to span (PixArt multi-resolution); None: raw indices (DiT)."""
    pos_embed_interpolation: float = 1.0
    """Divide spatial positions by this (PixArt's ``pe_interpolation``, e.g. 2 for its 1024 px model)."""
    video: bool = False
    """A video model: ``x_t`` must be a ``(B, C, T, H, W)`` clip (a 4-D input is refused); False: an image model,
    taking ``(B, C, H, W)`` images (or ``(B, C, T, H, W)`` clips, a one-frame clip being an image)."""

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"DiTConfig.{name}={value!r}: must be a positive number")

        for name in ("sample_size", "patch_size", "in_channels", "out_channels", "hidden_size", "depth",
                     "num_heads", "mlp_ratio", "frequency_embedding_size", "num_classes", "context_dim",
                     "pooled_dim", "vector_dim", "pos_embed_base_size", "pos_embed_interpolation"):
            positive(name)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"DiTConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.hidden_size % 4:
            raise ValueError(
                f"DiTConfig.hidden_size={self.hidden_size}: must be a multiple of 4 (2-D sin-cos position embedding)"
            )
        if self.sample_size % self.patch_size:
            raise ValueError(
                f"DiTConfig.sample_size={self.sample_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.attention_backend not in BACKENDS:
            raise ValueError(
                f"DiTConfig.attention_backend={self.attention_backend!r}: choose one of {list(BACKENDS)}"
            )
        if self.caption_projection and self.context_dim is None:
            raise ValueError("DiTConfig.caption_projection=True needs context_dim (the width of cond.context)")

    @property
    def model_out_channels(self) -> int:
        """Channels the network actually outputs (doubled under ``learn_sigma``)."""
        base = self.out_channels if self.out_channels is not None else self.in_channels
        return 2 * base if self.learn_sigma else base


# --------------------------------------------------------------------------------------------------------------
# Position embeddings
# --------------------------------------------------------------------------------------------------------------


def sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """Fixed 1-D sinusoidal embedding (Vaswani et al. 2017) in the MAE/DiT layout ``[sin(p·ω), cos(p·ω)]``.

    ``positions`` ``(N,)`` (may be fractional) → ``(N, dim)`` float32, ``ω_k = 10000^(-k / (dim/2))``.
    """
    half = dim // 2
    omega = 1.0 / 10000.0 ** (torch.arange(half, dtype=torch.float32, device=positions.device) / half)  # (dim/2,)
    angles = positions.float()[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (N, dim)


def sincos_2d(
    grid_h: int,
    grid_w: int,
    dim: int,
    base_size: Optional[int] = None,
    interpolation: float = 1.0,
    device: Optional[torch.device] = None,
) -> Tensor:
    """2-D sin-cos position embedding of a ``grid_h × grid_w`` patch grid, raster order → ``(grid_h·grid_w, dim)``.

    The first ``dim/2`` features embed the column, the last ``dim/2`` the row (the layout of the DiT/MAE
    reference, so DiT checkpoints line up). Position of index ``i`` along an axis of ``n`` patches is
    ``i · (base_size / n if base_size else 1) / interpolation`` (PixArt's rescaling when ``base_size`` is set).
    """
    scale_h = (base_size / grid_h if base_size else 1.0) / interpolation
    scale_w = (base_size / grid_w if base_size else 1.0) / interpolation
    rows = torch.arange(grid_h, dtype=torch.float32, device=device) * scale_h  # (h,)
    cols = torch.arange(grid_w, dtype=torch.float32, device=device) * scale_w  # (w,)
    emb_cols = sincos_1d(cols, dim // 2)[None, :, :].expand(grid_h, grid_w, dim // 2)  # (h, w, D/2)
    emb_rows = sincos_1d(rows, dim // 2)[:, None, :].expand(grid_h, grid_w, dim // 2)  # (h, w, D/2)
    return torch.cat([emb_cols, emb_rows], dim=-1).reshape(grid_h * grid_w, dim)  # (h*w, D)


def spatiotemporal_sincos(
    frames: int,
    grid_h: int,
    grid_w: int,
    dim: int,
    base_size: Optional[int] = None,
    interpolation: float = 1.0,
    device: Optional[torch.device] = None,
) -> Tensor:
    """Separable position embedding for ``frames × grid_h × grid_w`` tokens → ``(frames·grid_h·grid_w, dim)``.

    Spatial 2-D sin-cos (:func:`sincos_2d`) plus, for ``frames > 1``, a 1-D sin-cos embedding of the frame index
    broadcast over the frame's tokens.
    """
    spatial = sincos_2d(grid_h, grid_w, dim, base_size, interpolation, device)  # (h*w, D)
    if frames == 1:
        return spatial
    temporal = sincos_1d(torch.arange(frames, dtype=torch.float32, device=device), dim)  # (T, D)
    return (temporal[:, None, :] + spatial[None, :, :]).reshape(frames * grid_h * grid_w, dim)  # (T*h*w, D)


# --------------------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------------------


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x · (1 + scale) + shift``; ``shift, scale`` ``(B, D)`` per sample, ``x`` ``(B, N, D)`` tokens."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
    """One DiT block with adaLN-Zero (Peebles & Xie 2023, Fig. 3) and optional PixArt-α cross-attention.

    ``x += gate₁ · SelfAttn(adaLN₁(x))``; ``x += CrossAttn(x, context)`` (PixArt-α, no norm, no gate);
    ``x += gate₂ · MLP(adaLN₂(x))``. The six modulation vectors come from the block's own ``SiLU → Linear`` of the
    conditioning embedding, or, under adaLN-single, from a shared projection plus this block's learned table.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float,
        context_dim: Optional[int] = None,
        qk_norm: bool = False,
        backend: str = "sdpa",
        adaln_single: bool = False,
    ):
        super().__init__()
        self.dim, self.adaln_single = dim, adaln_single
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads=heads, qkv_bias=True, qk_norm=qk_norm, backend=backend)
        self.cross_attn = (
            Attention(dim, context_dim=context_dim, heads=heads, qkv_bias=True, qk_norm=qk_norm, backend=backend)
            if context_dim is not None
            else None
        )
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, int(dim * mlp_ratio), activation="gelu_tanh")
        if adaln_single:
            self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(
        self, x: Tensor, c: Tensor, context: Optional[Tensor] = None, context_mask: Optional[Tensor] = None
    ) -> Tensor:
        """x ``(B, N, D)``; c ``(B, D)`` conditioning embedding, or ``(B, 6, D)`` shared modulation under adaLN-single;
        context ``(B, L, Dc)``; context_mask ``(B, L)`` bool."""
        if self.adaln_single:
            mod = self.scale_shift_table[None] + c  # (B, 6, D)
        else:
            mod = self.adaLN_modulation(c).view(c.shape[0], 6, self.dim)  # (B, 6, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(dim=1)  # 6 × (B, D)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))  # (B, N, D)
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, context=context, mask=context_mask)  # (B, N, D)
        x = x + gate2[:, None] * self.ff(modulate(self.norm2(x), shift2, scale2))  # (B, N, D)
        return x


class FinalLayer(nn.Module):
    """Modulated LayerNorm then a linear map from tokens to patches (DiT's final layer; PixArt's T2IFinalLayer
    under adaLN-single, where the (2, D) shift/scale table is added to the conditioning embedding)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, adaln_single: bool = False):
        super().__init__()
        self.dim, self.adaln_single = dim, adaln_single
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        if adaln_single:
            self.scale_shift_table = nn.Parameter(torch.zeros(2, dim))
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x ``(B, N, D)``, c ``(B, D)`` → ``(B, N, p·p·C_out)``."""
        if self.adaln_single:
            mod = self.scale_shift_table[None] + c[:, None, :]  # (B, 2, D)
        else:
            mod = self.adaLN_modulation(c).view(c.shape[0], 2, self.dim)  # (B, 2, D)
        shift, scale = mod.unbind(dim=1)  # 2 × (B, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*C_out)


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Diffusion Transformer (Peebles & Xie 2023) with optional PixArt-α text cross-attention; images and video.

    ``forward(x_t, timesteps, cond)``: ``x_t`` is ``(B, C, H, W)`` (image models only) or ``(B, C, T, H, W)``
    with ``H, W`` divisible by ``patch_size`` (any size and aspect ratio: position embeddings are computed for the
    actual grid, and cached). Per-sample inputs (timesteps, context, labels) have one row per image or clip.

    With ``learn_sigma`` the output has ``2 × out_channels`` channels: the first half is the prediction the
    diffusion process uses (ε, v or x₀ as trained), the second half the learned variance interpolation of Nichol &
    Dhariwal (2021); a process without learned variances uses only the first half (:meth:`split_learned_sigma`).
    """

    _no_split_modules = ("DiTBlock",)  # its repeated blocks: FSDP2 units, activation-checkpointing units

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = config.gradient_checkpointing
        dim, p = config.hidden_size, config.patch_size
        self.out_channels = config.model_out_channels

        self.x_embedder = nn.Conv2d(config.in_channels, dim, kernel_size=p, stride=p)
        self.t_embedder = TimestepMLP(config.frequency_embedding_size, dim)
        # Row ``num_classes`` is the null class used for classifier-free guidance (Ho & Salimans 2022).
        self.y_embedder = nn.Embedding(config.num_classes + 1, dim) if config.num_classes else None
        self.pooled_embedder = TimestepMLP(config.pooled_dim, dim) if config.pooled_dim else None
        self.vector_embedder = TimestepMLP(config.vector_dim, dim) if config.vector_dim else None
        self.context_embedder = (
            nn.Sequential(nn.Linear(config.context_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
            if config.caption_projection
            else None
        )
        # adaLN-single (PixArt-α): the one shared modulation MLP.
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)) if config.adaln_single else None

        cross_dim = None
        if config.context_dim is not None:
            cross_dim = dim if config.caption_projection else config.context_dim
        self.blocks = nn.ModuleList(
            DiTBlock(dim, config.num_heads, config.mlp_ratio, cross_dim, config.qk_norm, config.attention_backend,
                     config.adaln_single)
            for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(dim, p, self.out_channels, config.adaln_single)
        self.initialize_weights()
        # (frames, grid_h, grid_w, device, dtype) -> (T*h*w, D) position table; not state (recomputed on demand)
        self._pos_cache: dict[tuple, Tensor] = {}

    # ---- initialisation ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier-uniform linears with zero biases, xavier patch embedding, N(0, 0.02)
        label table and timestep MLP, and zeros for every adaLN modulation and the final linear (adaLN-Zero),
        so the freshly built model outputs exactly zero. PixArt-α extras: N(0, 0.02) caption MLP and shared
        ``t_block``, tables ``randn / √D``, zero cross-attention output projections."""
        dim = self.config.hidden_size

        def basic(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for mlp in (self.t_embedder, self.pooled_embedder, self.vector_embedder):
            if mlp is not None:
                nn.init.normal_(mlp.linear_1.weight, std=0.02)
                nn.init.normal_(mlp.linear_2.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        if self.context_embedder is not None:
            nn.init.normal_(self.context_embedder[0].weight, std=0.02)
            nn.init.normal_(self.context_embedder[2].weight, std=0.02)
        if self.t_block is not None:
            nn.init.normal_(self.t_block[1].weight, std=0.02)
        for block in self.blocks:
            if self.config.adaln_single:
                block.scale_shift_table.normal_(0.0, dim**-0.5)
            else:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.to_out.weight)
                nn.init.zeros_(block.cross_attn.to_out.bias)
        if self.config.adaln_single:
            self.final_layer.scale_shift_table.normal_(0.0, dim**-0.5)
        else:
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Turn per-block activation checkpointing on or off."""
        self.gradient_checkpointing = enabled

    # ---- helpers ----------------------------------------------------------------------------------------------

    def _as_clips(self, x_t: Tensor) -> Tensor:
        """Check ``x_t``'s layout and bring it to ``(B, C, T, H, W)`` (an image becomes a one-frame clip)."""
        p, shape = self.config.patch_size, tuple(x_t.shape)
        accepted = "(B, C, T, H, W) clips" if self.config.video else "(B, C, H, W) images or (B, C, T, H, W) clips"
        if x_t.ndim != 5 and (x_t.ndim != 4 or self.config.video):
            kind = "video" if self.config.video else "image"
            raise ValueError(f"this {kind} DiT takes {accepted}; got x_t of shape {shape} ({x_t.ndim}-D)")
        if x_t.shape[1] != self.config.in_channels:
            raise ValueError(f"DiT expects {self.config.in_channels} input channels, got x_t {shape}")
        if x_t.shape[-2] % p or x_t.shape[-1] % p:
            raise ValueError(f"DiT latent height and width must be divisible by patch_size={p}, got x_t {shape}")
        return x_t if x_t.ndim == 5 else x_t[:, :, None]  # (B, C, T, H, W)

    def position_table(self, frames: int, grid_h: int, grid_w: int, device: torch.device, dtype: torch.dtype
                       ) -> Tensor:
        """The ``(T·h·w, D)`` sin-cos position table of a token grid (:func:`spatiotemporal_sincos`), cached per
        (grid, device, dtype): it depends on nothing else, so it is built once instead of every forward."""
        key = (frames, grid_h, grid_w, torch.device(device), dtype)
        table = self._pos_cache.get(key)
        if table is None:
            cfg = self.config
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable later under autograd too
                table = spatiotemporal_sincos(frames, grid_h, grid_w, cfg.hidden_size, cfg.pos_embed_base_size,
                                              cfg.pos_embed_interpolation, device=device).to(dtype)  # (N, D)
            if len(self._pos_cache) >= POS_CACHE_SIZE:
                self._pos_cache.pop(next(iter(self._pos_cache)))  # the oldest
            self._pos_cache[key] = table
        return table

    def embed_conditioning(self, timesteps: Tensor, cond: Conditioning, batch: int) -> Tensor:
        """The vector that drives adaLN: timestep MLP (+ class embedding, + pooled / vector MLPs) → ``(B, D)``."""
        dtype = self.t_embedder.linear_1.weight.dtype
        freqs = timestep_embedding(timesteps, self.config.frequency_embedding_size).to(dtype)  # (B, F)
        emb = self.t_embedder(freqs)  # (B, D)
        if self.y_embedder is not None:
            if cond.class_labels is None:
                raise ValueError(
                    "this DiT is class-conditional: pass cond.class_labels (use label num_classes="
                    f"{self.config.num_classes} for the null class)"
                )
            emb = emb + self.y_embedder(cond.class_labels.to(torch.long))  # (B, D)
        if self.pooled_embedder is not None:
            if cond.pooled is None:
                raise ValueError(f"this DiT has pooled_dim={self.config.pooled_dim}: pass cond.pooled")
            emb = emb + self.pooled_embedder(cond.pooled.to(dtype))  # (B, D)
        if self.vector_embedder is not None:
            if cond.vector is None:
                raise ValueError(f"this DiT has vector_dim={self.config.vector_dim}: pass cond.vector")
            emb = emb + self.vector_embedder(cond.vector.to(dtype))  # (B, D)
        if emb.shape[0] != batch:
            raise ValueError(f"conditioning has batch {emb.shape[0]} but x_t holds {batch} samples/clips")
        return emb

    def unpatchify(self, tokens: Tensor, frames: int, grid_h: int, grid_w: int) -> Tensor:
        """``(B, T·h·w, p·p·C)`` → ``(B, C, T, h·p, w·p)``; each token's features are laid out (row, col, channel)."""
        b, p, c = tokens.shape[0], self.config.patch_size, self.out_channels
        x = tokens.view(b, frames, grid_h, grid_w, p, p, c)  # (B, T, h, w, p, p, C)
        x = x.permute(0, 6, 1, 2, 4, 3, 5)  # (B, C, T, h, p, w, p)
        return x.reshape(b, c, frames, grid_h * p, grid_w * p)  # (B, C, T, H, W)

    @staticmethod
    def split_learned_sigma(output: Tensor) -> tuple[Tensor, Tensor]:
        """Split a ``learn_sigma`` output into (prediction, variance interpolation) along channels."""
        return output.chunk(2, dim=1)

    # ---- forward ----------------------------------------------------------------------------------------------

    def forward(
        self, x_t: Tensor, timesteps: Union[Tensor, float, int], cond: Optional[Conditioning] = None
    ) -> Tensor:
        """``x_t`` ``(B, C, H, W)`` (image models) or ``(B, C, T, H, W)``; ``timesteps`` ``(B,)`` or a scalar →
        same layout as ``x_t`` with ``model_out_channels`` channels."""
        cond = cond if cond is not None else Conditioning()
        cfg, dim, p = self.config, self.config.hidden_size, self.config.patch_size
        x = self._as_clips(x_t)  # (B, C, T, H, W)
        b, c, frames, h, w = x.shape
        gh, gw = h // p, w // p
        timesteps = broadcast_timesteps(timesteps, b, x.device)  # (B,)

        tokens = self.x_embedder(fold_frames(x))  # (B*T, D, h, w)
        tokens = tokens.flatten(2).transpose(1, 2).reshape(b, frames * gh * gw, dim)  # (B, N, D), N = T*h*w
        tokens = tokens + self.position_table(frames, gh, gw, tokens.device, tokens.dtype)[None]  # (B, N, D)

        emb = self.embed_conditioning(timesteps, cond, b)  # (B, D)
        mod = self.t_block(emb).view(b, 6, dim) if self.t_block is not None else emb  # (B, 6, D) or (B, D)

        context, context_mask = None, None
        if cfg.context_dim is not None:
            if cond.context is None:
                raise ValueError(f"this DiT cross-attends to text (context_dim={cfg.context_dim}): pass cond.context")
            context = cond.context.to(tokens.dtype)  # (B, L, Dc)
            if self.context_embedder is not None:
                context = self.context_embedder(context)  # (B, L, D)
            context_mask = cond.context_mask  # (B, L) or None

        for block in self.blocks:
            tokens = checkpointed(block, tokens, mod, context, context_mask,
                                  enabled=self.gradient_checkpointing)  # (B, N, D)
        out = self.final_layer(tokens, emb)  # (B, N, p*p*C_out)
        out = self.unpatchify(out, frames, gh, gw)  # (B, C_out, T, H, W)
        return out if x_t.ndim == 5 else out[:, :, 0]  # like x_t: (B, C_out, T, H, W) or (B, C_out, H, W)


# --------------------------------------------------------------------------------------------------------------
# Registration and presets
# --------------------------------------------------------------------------------------------------------------

register_architecture("dit", DiTConfig, DiT)

# Peebles & Xie (2023), Table 1: name -> (depth, hidden size, heads).
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
DIT_PATCHES: tuple[int, ...] = (2, 4, 8)
TEXT_CONTEXT_DIM = 1024  # OpenCLIP ViT-H/14 text width (Stable Diffusion 2.x); override for other encoders


def dit_class_conditional(size: str, patch: int) -> DiTConfig:
    """The paper's ImageNet 256×256 model: 32×32×4 latents, 1000 classes (+ null), learned sigma."""
    depth, hidden, heads = DIT_SIZES[size]
    return DiTConfig(sample_size=32, patch_size=patch, in_channels=4, learn_sigma=True, hidden_size=hidden,
                     depth=depth, num_heads=heads, num_classes=1000)


def dit_text_conditional(size: str, patch: int, context_dim: int = TEXT_CONTEXT_DIM) -> DiTConfig:
    """PixArt-α-style text-to-image DiT: cross-attention to ``context_dim``-wide text states through a caption
    MLP, adaLN-single; predicts ``in_channels`` channels (no learned sigma)."""
    depth, hidden, heads = DIT_SIZES[size]
    return DiTConfig(sample_size=32, patch_size=patch, in_channels=4, hidden_size=hidden, depth=depth,
                     num_heads=heads, context_dim=context_dim, caption_projection=True, adaln_single=True)


for _size in DIT_SIZES:
    for _patch in DIT_PATCHES:
        register_preset(f"DiT-{_size}/{_patch}", lambda s=_size, p=_patch: dit_class_conditional(s, p))
        register_preset(f"DiT-{_size}/{_patch}-text", lambda s=_size, p=_patch: dit_text_conditional(s, p))


@register_preset("dit-tiny")
def _dit_tiny() -> DiTConfig:
    """Class-conditional toy DiT for tests (10 classes, learned sigma)."""
    return DiTConfig(sample_size=8, patch_size=2, in_channels=4, learn_sigma=True, hidden_size=32, depth=2,
                     num_heads=2, num_classes=10)


@register_preset("dit-tiny-text")
def _dit_tiny_text() -> DiTConfig:
    """Text-conditional toy DiT matching ``models/configs/openclip-tiny-text.json`` (width 64, embed 32)."""
    return DiTConfig(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                     context_dim=64, pooled_dim=32, caption_projection=True, adaln_single=True)
