"""One attention path for every model: the function, the projection module and the feed-forward.

Self- and cross-attention in the U-Net, the DiT and the autoencoder's mid-block all go through
:func:`attention`. The backend is chosen by config: ``"sdpa"`` (PyTorch scaled-dot-product attention, the
default), ``"xformers"`` (memory-efficient attention, CUDA only) or ``"math"`` (explicit softmax, the reference
used by tests). Asking for a backend that cannot run raises :class:`AttentionBackendError`; nothing falls back
silently.

Projection names (``to_q``, ``to_k``, ``to_v``, ``to_out``) are the LoRA targets, see :data:`LORA_TARGETS`.

Hooks for parallelism without ``torch.distributed`` in the models: an :class:`Attention` module may carry an
:data:`AttentionHook` (``module.attention_hook``, set with :func:`set_attention_hook`) that :func:`attention` hands the
rotated ``q, k, v`` and the plain attention to, e.g. to exchange heads for sequence shards before and after it
(DeepSpeed-Ulysses, :mod:`training.sequence_parallel`). A model whose tokens can be split over ranks exposes a
:class:`SequenceShard` seam (``DiT.sequence_shard``): ``scatter`` its tokens after the patch embedding, ``gather``
them before unpatchify. Both default to None: nothing changes unless the trainer sets them.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import Callable, Literal, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.embeddings import apply_rope

AttentionBackend = Literal["sdpa", "xformers", "math"]
BACKENDS: tuple[str, ...] = ("sdpa", "xformers", "math")

# Module-name suffixes that LoRA adapts: the attention projections, and optionally the feed-forward layers.
LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out")
LORA_FEEDFORWARD_TARGETS: tuple[str, ...] = ("ff.proj_in", "ff.proj_out")
# Optional "projection" targets: the U-Net spatial transformer's proj_in/proj_out (1×1 conv or Linear) and the DiT's
# patch embedding, caption projection and output projection. A target matches a module whose dotted name ends with
# it; a module already matched by the feed-forward targets (``ff.proj_in``) is not a projection.
LORA_PROJECTION_TARGETS: tuple[str, ...] = (
    "proj_in", "proj_out", "x_embedder", "context_embedder.0", "context_embedder.2", "final_layer.linear",
)


# ``hook(q, k, v, mask, attend) -> out``: q ``(B, H, Lq, d)``, k, v ``(B, H, Lk, d)`` (already rotated by RoPE), the key
# mask ``(B, Lk)`` or None, and ``attend(q, k, v, mask)`` the plain attention of the module's backend; returns what
# ``attend`` would, ``(B, H, Lq, d)``. It may call ``attend`` on other tensors (e.g. all tokens of a subset of heads).
AttentionHook = Callable[[Tensor, Tensor, Tensor, Optional[Tensor], Callable[..., Tensor]], Tensor]


class SequenceShard(Protocol):
    """What a model calls where its token sequence may be split over ranks (sequence parallelism).

    ``scatter(tokens, rope)``: all ``(B, N, D)`` tokens (the same on every rank) and their RoPE ``(cos, sin)``
    ``(N, d/2)`` tables (or None) → this rank's share of both. ``gather(out)``: this rank's ``(B, n, F)`` outputs →
    every token's ``(B, N, F)``, in order, on every rank. Implemented in :mod:`training.sequence_parallel`.
    """

    def scatter(self, tokens: Tensor, rope: Optional[tuple[Tensor, Tensor]]
                ) -> tuple[Tensor, Optional[tuple[Tensor, Tensor]]]: ...

    def gather(self, out: Tensor) -> Tensor: ...


class AttentionBackendError(RuntimeError):
    """The configured attention backend cannot run here."""


def check_backend(backend: str, device: Optional[torch.device] = None) -> None:
    """Raise :class:`AttentionBackendError` unless ``backend`` can run on ``device`` (None: only check install)."""
    if backend not in BACKENDS:
        raise AttentionBackendError(f"attention backend {backend!r} is unknown; choose one of {list(BACKENDS)}")
    if backend == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise AttentionBackendError(
                "attention backend 'xformers' was asked for but xformers is not installed "
                "(pip install 'latentloom[xformers]' on a CUDA machine), or set attention_backend=sdpa"
            )
        if device is not None and torch.device(device).type != "cuda":
            raise AttentionBackendError(
                f"attention backend 'xformers' runs only on CUDA, but the tensors are on {device}; "
                "set attention_backend=sdpa"
            )


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor] = None,
    backend: str = "sdpa",
    rope: Optional[tuple[Tensor, Tensor]] = None,
    hook: Optional[AttentionHook] = None,
) -> Tensor:
    """Scaled dot-product attention (Vaswani et al. 2017), softmax(q kᵀ / √d) v.

    Args:
        q: ``(B, H, Lq, d)``.
        k, v: ``(B, H, Lk, d)``.
        mask: optional key mask ``(B, Lk)`` bool, True where a key may be attended to. Every query row must keep
            at least one key (CLIP prompts always keep their start token).
        backend: ``"sdpa"``, ``"xformers"`` or ``"math"``.
        rope: optional rotary position embedding (Su et al. 2021) ``(cos, sin)``, each broadcastable to
            ``(B, H, L, d/2)`` (:func:`models.embeddings.rope_3d`): q and k are rotated pairwise before the
            product, for every backend. Self-attention only (queries and keys share positions, ``Lq == Lk``).
        hook: optional :data:`AttentionHook`, given the rotated q, k, v, the mask and this function without hook
            and rope; its result is returned (see the module docstring).
    Returns:
        ``(B, H, Lq, d)``.
    """
    if rope is not None:
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"rope needs queries and keys at the same positions; got Lq={q.shape[2]}, "
                             f"Lk={k.shape[2]} (rotary embedding is for self-attention)")
        q, k = apply_rope(q, rope), apply_rope(k, rope)  # (B, H, L, d) each
    if hook is not None:
        return hook(q, k, v, mask, functools.partial(attention, backend=backend))  # (B, H, Lq, d)
    if backend == "sdpa":
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, Lk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    if backend == "math":
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), v)  # (B, H, Lq, d)
    if backend == "xformers":
        check_backend(backend, q.device)
        import xformers.ops as xops

        bias = None
        if mask is not None:  # additive bias (B, H, Lq, Lk); xformers wants the last dim padded to 8
            lk = k.shape[2]
            padded = (lk + 7) // 8 * 8
            bias = q.new_zeros(q.shape[0], q.shape[1], q.shape[2], padded)
            bias[..., :lk] = bias[..., :lk].masked_fill(~mask[:, None, None, :], float("-inf"))
            bias = bias[..., :lk]
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
        )  # (B, Lq, H, d)
        return out.transpose(1, 2)
    check_backend(backend)
    raise AssertionError("unreachable")


class Attention(nn.Module):
    """Multi-head self- or cross-attention with separate q, k, v projections.

    Self-attention when ``context_dim`` is None (keys from ``x``), cross-attention otherwise (keys from
    ``context``). Optional RMS q/k normalisation (used by large DiTs for stability): per head over ``head_dim``
    features, or with ``qk_norm_across_heads`` over all ``heads·head_dim`` features before the heads are split
    (Wan 2.1's ``rms_norm_across_heads``). ``attention_hook`` (None unless set, see :func:`set_attention_hook`) is
    passed to :func:`attention`.
    """

    attention_hook: Optional[AttentionHook] = None  # set per module by set_attention_hook (parallelism from training/)

    def __init__(
        self,
        dim: int,
        context_dim: Optional[int] = None,
        heads: int = 8,
        head_dim: Optional[int] = None,
        qkv_bias: bool = False,
        out_bias: bool = True,
        qk_norm: bool = False,
        backend: str = "sdpa",
        qk_norm_across_heads: bool = False,
    ):
        super().__init__()
        head_dim = head_dim if head_dim is not None else dim // heads
        if head_dim * heads == 0:
            raise ValueError(f"attention needs heads >= 1 and head_dim >= 1, got heads={heads}, head_dim={head_dim}")
        check_backend(backend)
        inner = heads * head_dim
        self.heads, self.head_dim, self.backend = heads, head_dim, backend
        self.is_cross = context_dim is not None
        kv_dim = context_dim if context_dim is not None else dim
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim, bias=out_bias)
        self.qk_norm_across_heads = qk_norm and qk_norm_across_heads
        norm_dim = inner if self.qk_norm_across_heads else head_dim
        self.q_norm = nn.RMSNorm(norm_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(norm_dim, eps=1e-6) if qk_norm else nn.Identity()

    def _heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, d)

    def forward(
        self,
        x: Tensor,
        context: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        rope: Optional[tuple[Tensor, Tensor]] = None,
    ) -> Tensor:
        """x ``(B, N, D)``; context ``(B, L, Dc)`` for cross-attention; mask ``(B, L)`` bool over keys; rope
        ``(cos, sin)`` rotary tables over the N tokens (self-attention only, see :func:`attention`)."""
        if self.is_cross and context is None:
            raise ValueError("cross-attention needs a context (per-token text states); got None")
        if self.is_cross and rope is not None:
            raise ValueError("rotary position embedding applies to self-attention; this is cross-attention")
        src = context if self.is_cross else x
        if self.qk_norm_across_heads:
            q = self._heads(self.q_norm(self.to_q(x)))  # (B, H, N, d)
            k = self._heads(self.k_norm(self.to_k(src)))  # (B, H, L, d)
        else:
            q = self.q_norm(self._heads(self.to_q(x)))  # (B, H, N, d)
            k = self.k_norm(self._heads(self.to_k(src)))  # (B, H, L, d)
        v = self._heads(self.to_v(src))  # (B, H, L, d)
        out = attention(q, k, v, mask=mask if self.is_cross else None, backend=self.backend,
                        rope=rope, hook=self.attention_hook)  # (B, H, N, d)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.heads * self.head_dim)  # (B, N, H*d)
        return self.to_out(out)  # (B, N, D)


class FeedForward(nn.Module):
    """Transformer feed-forward: ``"geglu"`` (Shazeer 2020, Stable Diffusion) or ``"gelu"``/``"gelu_tanh"``
    (the ViT/DiT MLP)."""

    def __init__(self, dim: int, inner_dim: Optional[int] = None, activation: str = "geglu", bias: bool = True):
        super().__init__()
        if activation not in ("geglu", "gelu", "gelu_tanh"):
            raise ValueError(f"feed-forward activation {activation!r}; choose geglu, gelu or gelu_tanh")
        inner_dim = inner_dim if inner_dim is not None else 4 * dim
        self.activation = activation
        self.proj_in = nn.Linear(dim, inner_dim * (2 if activation == "geglu" else 1), bias=bias)
        self.proj_out = nn.Linear(inner_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj_in(x)  # (B, N, inner) or (B, N, 2*inner)
        if self.activation == "geglu":
            h, gate = h.chunk(2, dim=-1)
            h = h * F.gelu(gate)
        else:
            h = F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.proj_out(h)  # (B, N, D)


def set_attention_backend(model: nn.Module, backend: str) -> None:
    """Switch every :class:`Attention` inside ``model`` to ``backend`` (checked first)."""
    check_backend(backend)
    for module in model.modules():
        if isinstance(module, Attention):
            module.backend = backend


def set_attention_hook(model: nn.Module, hook: Optional[AttentionHook], cross: bool = False) -> int:
    """Give every self-attention :class:`Attention` inside ``model`` (and, with ``cross``, every cross-attention)
    the attention ``hook``; None removes it. Returns how many modules it was set on."""
    count = 0
    for module in model.modules():
        if isinstance(module, Attention) and (cross or not module.is_cross):
            module.attention_hook = hook
            count += 1
    return count
