"""Sequence parallelism for long clips: one clip's tokens split over ``P`` ranks, attention heads exchanged around
self-attention (DeepSpeed-Ulysses, Jacobs et al. 2023, "DeepSpeed Ulysses: System Optimizations for Enabling
Training of Extreme Long Sequence Transformer Models").

Each rank of a sequence-parallel group holds ``n = N/P`` of a clip's ``N`` tokens. Everything in a DiT block except
self-attention acts token by token (adaLN, the MLP, cross-attention to the full text, the q/k/v projections), so it
runs on the shard as it is. Around self-attention an all-to-all scatters the heads and gathers the sequence: each
rank then holds all ``N`` tokens of ``H/P`` heads, runs the ordinary attention on them, and a second all-to-all
brings the output back to ``n`` tokens of all ``H`` heads. Activation memory per rank falls as ``1/P`` (the
attention's included); communication per block is four all-to-alls of ``B·n·D`` elements (q, k, v, out).

How it enters a model without ``torch.distributed`` in :mod:`models` (see :mod:`models.attention`):

* ``DiT.sequence_shard`` = :class:`UlyssesSequenceParallel`: after the patch embedding and the sin-cos position table
  ``scatter`` keeps this rank's tokens (and slices the 3-D RoPE tables alike); after the final layer ``gather``
  joins every rank's outputs, so unpatchify, the loss and everything after see the whole clip on every rank;
* every self-attention module's ``attention_hook`` = the same object: :meth:`UlyssesSequenceParallel.__call__` does
  the two all-to-alls around the module's own attention backend (RoPE is applied before, per token, on the shard).

A length ``N`` not divisible by ``P`` is padded to the next multiple: the padded keys are masked out of attention and
the padded outputs dropped by ``gather``, so the result equals the unpadded model's (a key mask keeps SDPA off its
flash kernel on a GPU: prefer clip shapes whose token count divides by ``P``). The heads must divide by ``P``
(:func:`check_model_config` refuses otherwise). Only the full spatio-temporal layout is supported: a factorised
(Latte) model's temporal blocks need all frames of a position and its spatial blocks all positions of a frame, which
a token split cuts through; it is refused with an error. U-Nets (convolutions need their neighbours) are refused too.

Gradients. The loss is computed from the gathered output, identically on every rank of a group (same batch: the
loader is built for the data-parallel position; same noise and timesteps: the trainer seeds by the data-parallel
rank). The backward of ``gather`` hands each rank the gradient of its own tokens, so a replicated parameter receives on
each rank the part of its gradient that flows through that rank's tokens; the sum over the group is the whole
gradient. ``gather``'s backward multiplies by ``grad_scale`` (default ``P``): the data-parallel engines (DDP, ZeRO,
FSDP2) all *average* gradients over the whole world of ``P·D`` ranks, and ``(1/(P·D)) · Σ P·part = (1/D) Σ_dp whole``
is then exactly the data-parallel mean of the whole gradients — with no change to the engines or their groups.

Groups: consecutive ranks form a sequence-parallel group (``[0..P-1]``, ``[P..2P-1]``, ...: on one node where
possible, the all-to-all being the bandwidth-hungry collective); data-parallel rank = ``rank // P``.
The exchange uses ``dist.all_to_all_single`` (NCCL; gloo on the CPU supports it in the torch this project pins,
checked by the tests).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import set_attention_hook


@dataclasses.dataclass
class ParallelConfig:
    """How the ranks of a run share the work beyond data parallelism (applies to the denoiser stages)."""

    sequence_parallel: int = 1  # ranks that split one clip's tokens (DeepSpeed-Ulysses); 1: off

    def __post_init__(self) -> None:
        if isinstance(self.sequence_parallel, bool) or not isinstance(self.sequence_parallel, int) \
                or self.sequence_parallel < 1:
            raise ValueError(f"parallel.sequence_parallel: {self.sequence_parallel!r} must be an integer >= 1 "
                             "(ranks per clip; 1 turns sequence parallelism off)")


# --------------------------------------------------------------------------------------------------- positions


def data_parallel_position(rank: int, world_size: int, sequence_parallel: int) -> tuple[int, int]:
    """``(data-parallel rank, data-parallel world size)`` of global ``rank`` when ``sequence_parallel``
    consecutive ranks share each sample: what the data loader is built for (the ranks of a group read the same
    batches)."""
    if world_size % sequence_parallel:
        raise ValueError(f"parallel.sequence_parallel={sequence_parallel} does not divide the {world_size} launched "
                         "processes; launch a multiple of it (sequence-parallel groups are consecutive ranks)")
    return rank // sequence_parallel, world_size // sequence_parallel


def check_model_config(config: Any, size: int, key: str = "parallel.sequence_parallel") -> None:
    """Raise ``ValueError`` (naming ``key``) unless a model of ``config`` can run with ``size`` sequence-parallel
    ranks: a DiT with the full attention layout and a head count divisible by ``size``."""
    if size == 1:
        return
    from models.dit import DiTConfig

    if not isinstance(config, DiTConfig):
        raise ValueError(f"{key}={size}: sequence parallelism splits a DiT's tokens; the denoiser is a "
                         f"{type(config).__name__} (convolutional models need their neighbours: not supported)")
    if config.attention_layout != "full":
        raise ValueError(f"{key}={size}: the DiT has attention_layout={config.attention_layout!r}; only 'full' is "
                         "supported (a factorised model's temporal blocks need every frame of a position and its "
                         "spatial blocks every position of a frame, which a split of the token sequence cuts)")
    if config.num_heads % size:
        raise ValueError(f"{key}={size}: the DiT's num_heads={config.num_heads} is not divisible by it (Ulysses "
                         "gives each rank num_heads/sequence_parallel heads of every token)")


_GROUPS: dict[tuple[int, int], Any] = {}  # (world size, group size) -> this rank's group, made once per process


def sequence_parallel_group(size: int) -> Any:
    """This rank's group of ``size`` consecutive ranks (collective the first time: every rank creates every group,
    as ``dist.new_group`` requires). Needs an initialised default process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"parallel.sequence_parallel={size} needs a distributed launch (torchrun / accelerate "
                           "launch with that many processes per group); no process group is initialised")
    world, rank = dist.get_world_size(), dist.get_rank()
    data_parallel_position(rank, world, size)  # checks divisibility
    key = (world, size)
    if key not in _GROUPS:
        mine = None
        for start in range(0, world, size):
            group = dist.new_group(list(range(start, start + size)))
            if start <= rank < start + size:
                mine = group
        _GROUPS[key] = mine
    return _GROUPS[key]


# --------------------------------------------------------------------------------------------- collectives


def _exchange(x: Tensor, scatter_dim: int, gather_dim: int, group: Any, size: int) -> Tensor:
    """Split ``x`` into ``size`` chunks along ``scatter_dim``, send chunk ``j`` to rank ``j`` of ``group``, and
    concatenate the chunks received along ``gather_dim`` in rank order."""
    send = x.unflatten(scatter_dim, (size, -1)).movedim(scatter_dim, 0).contiguous()  # (P, ..., S/P, ...)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i]: rank i's chunk for this rank
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)  # (..., P·G, ...)


class _AllToAll(torch.autograd.Function):
    """All-to-all with autograd: the backward is the inverse exchange (gather dim scattered, scatter dim
    gathered)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any, size: int, scatter_dim: int, gather_dim: int) -> Tensor:
        ctx.group, ctx.size, ctx.dims = group, size, (scatter_dim, gather_dim)
        return _exchange(x, scatter_dim, gather_dim, group, size)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None, None, None]:
        scatter_dim, gather_dim = ctx.dims
        return _exchange(grad, gather_dim, scatter_dim, ctx.group, ctx.size), None, None, None, None


def all_to_all(x: Tensor, group: Any, size: int, scatter_dim: int, gather_dim: int) -> Tensor:
    """Differentiable all-to-all over ``group`` (``size`` ranks): ``x`` split along ``scatter_dim`` (chunk ``j`` to
    rank ``j``), the received chunks concatenated along ``gather_dim`` in rank order."""
    return _AllToAll.apply(x, group, size, scatter_dim, gather_dim)


class _GatherTokens(torch.autograd.Function):
    """All-gather along the token dim (1) with autograd: the backward keeps this rank's slice of the (replicated)
    gradient, times ``scale``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any, size: int, rank: int, scale: float) -> Tensor:
        ctx.group, ctx.rank, ctx.n, ctx.scale = group, rank, x.shape[1], scale
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)  # (B, P·n, F)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None, None, None]:
        mine = grad.narrow(1, ctx.rank * ctx.n, ctx.n)  # (B, n, F)
        return (mine * ctx.scale if ctx.scale != 1.0 else mine.contiguous()), None, None, None, None


# ------------------------------------------------------------------------------------------------- Ulysses


class UlyssesSequenceParallel:
    """DeepSpeed-Ulysses for one sequence-parallel group: a :class:`models.attention.SequenceShard` (``scatter``,
    ``gather``) and an :data:`models.attention.AttentionHook` (``__call__``). See the module docstring.

    ``group``: the process group of the ``size`` ranks sharing a clip (None: the default group); ``rank``: this
    rank's index in it; ``grad_scale``: factor on the gradient ``gather`` returns (None: ``size``, right for engines
    that average gradients over every rank; 1: each rank keeps exactly its part of the gradient).

    The sequence length of the current forward is remembered between ``scatter`` and the attention calls (the
    padding mask needs it); activation checkpointing recomputes with the same shapes.
    """

    def __init__(self, group: Any, size: int, rank: int, grad_scale: Optional[float] = None):
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"UlyssesSequenceParallel: rank {rank} of a group of {size}")
        self.group, self.size, self.rank = group, size, rank
        self.grad_scale = float(size if grad_scale is None else grad_scale)
        self.tokens: Optional[int] = None  # N of the current forward
        self.padded: Optional[int] = None  # N rounded up to a multiple of size

    def __repr__(self) -> str:
        return f"UlyssesSequenceParallel(rank {self.rank} of {self.size}, grad_scale={self.grad_scale:g})"

    @property
    def local_tokens(self) -> int:
        """Tokens per rank in the current forward."""
        if self.padded is None:
            raise RuntimeError("UlyssesSequenceParallel: attention ran before scatter (the model did not split its "
                               "tokens; is the hook set on a model without a sequence_shard seam?)")
        return self.padded // self.size

    # ---- SequenceShard ------------------------------------------------------------------------------------

    def scatter(self, tokens: Tensor, rope: Optional[tuple[Tensor, Tensor]]
                ) -> tuple[Tensor, Optional[tuple[Tensor, Tensor]]]:
        """All ``(B, N, D)`` tokens → this rank's ``(B, n, D)``, ``n = ⌈N/P⌉`` (zero tokens pad the last rank's
        share); RoPE ``(cos, sin)`` ``(N, d/2)`` tables alike (padded with the identity rotation)."""
        n_tokens = tokens.shape[1]
        padded = -(-n_tokens // self.size) * self.size
        self.tokens, self.padded = n_tokens, padded
        local, start = padded // self.size, self.rank * (padded // self.size)
        if padded != n_tokens:
            tokens = F.pad(tokens, (0, 0, 0, padded - n_tokens))  # (B, N_pad, D)
        tokens = tokens[:, start:start + local]  # (B, n, D)
        if rope is not None:
            cos, sin = rope  # (N, d/2) each
            if padded != n_tokens:
                cos = F.pad(cos, (0, 0, 0, padded - n_tokens), value=1.0)  # (N_pad, d/2)
                sin = F.pad(sin, (0, 0, 0, padded - n_tokens), value=0.0)
            rope = (cos[start:start + local], sin[start:start + local])  # (n, d/2) each
        return tokens, rope

    def gather(self, out: Tensor) -> Tensor:
        """This rank's ``(B, n, F)`` outputs → all ``(B, N, F)`` (padding dropped), on every rank of the group."""
        if out.shape[1] != self.local_tokens:
            raise RuntimeError(f"UlyssesSequenceParallel.gather: {out.shape[1]} tokens here, but scatter kept "
                               f"{self.local_tokens} per rank")
        full = _GatherTokens.apply(out, self.group, self.size, self.rank, self.grad_scale)  # (B, N_pad, F)
        return full[:, :self.tokens]  # (B, N, F)

    # ---- AttentionHook ------------------------------------------------------------------------------------

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                 attend: Callable[..., Tensor]) -> Tensor:
        """Self-attention of this rank's ``(B, H, n, d)`` q, k, v over all ``N`` tokens: heads scattered and the
        sequence gathered (→ ``(B, H/P, N_pad, d)``), ``attend`` with padded keys masked, then back → ``(B, H, n,
        d)``."""
        if mask is not None:
            raise ValueError("sequence parallelism: a key mask on self-attention is not supported (the DiT's "
                             "self-attention has none; cross-attention runs locally and is not hooked)")
        b, heads, n, _ = q.shape
        if n != self.local_tokens or k.shape[2] != n:
            raise RuntimeError(f"UlyssesSequenceParallel: attention over {n} queries / {k.shape[2]} keys per rank, "
                               f"but scatter kept {self.local_tokens}; the hook is on a module that does not see "
                               "the split tokens")
        if heads % self.size:
            raise ValueError(f"sequence parallelism: {heads} heads are not divisible by the group of {self.size}")
        q, k, v = (all_to_all(t, self.group, self.size, 1, 2) for t in (q, k, v))  # (B, H/P, N_pad, d) each
        key_mask = None
        if self.padded != self.tokens:
            key_mask = (torch.arange(self.padded, device=q.device) < self.tokens).expand(b, -1)  # (B, N_pad)
        out = attend(q, k, v, key_mask)  # (B, H/P, N_pad, d)
        return all_to_all(out, self.group, self.size, 2, 1)  # (B, H, n, d)


# -------------------------------------------------------------------------------------------- attach/detach


def _dits(model: nn.Module) -> list[nn.Module]:
    from models.dit import DiT

    return [m for m in model.modules() if isinstance(m, DiT)]


def attach_sequence_parallel(model: nn.Module, size: int, group: Any = None, rank: Optional[int] = None,
                             grad_scale: Optional[float] = None) -> UlyssesSequenceParallel:
    """Split every DiT inside ``model`` (also under LoRA wrappers) over a sequence-parallel group of ``size`` ranks:
    its ``sequence_shard`` seam and its self-attention hooks get one :class:`UlyssesSequenceParallel`.

    ``group``/``rank``: the group and this rank's index in it (default: :func:`sequence_parallel_group` and
    ``global rank % size``). Raises ``ValueError`` when ``model`` holds no DiT or one that cannot be split
    (:func:`check_model_config`). Attach after taking any copy of the model (evaluation copies must not join
    collectives) and before wrapping it in DDP / ZeRO / FSDP.
    """
    dits = _dits(model)
    if not dits:
        raise ValueError(f"parallel.sequence_parallel={size}: the trained model ({type(model).__name__}) contains "
                         "no DiT; sequence parallelism splits a DiT's tokens")
    for dit in dits:
        check_model_config(dit.config, size)
    if group is None:
        group = sequence_parallel_group(size)
    if rank is None:
        rank = dist.get_rank(group)
    shard = UlyssesSequenceParallel(group, size, rank, grad_scale)
    for dit in dits:
        dit.sequence_shard = shard
        set_attention_hook(dit, shard)
    return shard


def detach_sequence_parallel(model: nn.Module) -> None:
    """Undo :func:`attach_sequence_parallel`: every DiT inside ``model`` sees all tokens again."""
    for dit in _dits(model):
        dit.sequence_shard = None
        set_attention_hook(dit, None)
