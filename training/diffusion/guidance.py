"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance").

``out = uncond + g * (cond - uncond)`` on every output channel, from a single
batched forward pass over ``[uncond; cond]``.  A negative prompt is nothing
more than a different ``null_cond``.  With ``guidance == 1`` or no
``null_cond`` the model is called once on the conditional batch only.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .cond_ops import batch_size_of, cat_conditioning, expand_batch

#: ``denoiser(x_t, timesteps, cond) -> tensor shaped like x_t``
Denoiser = Callable[[Tensor, Tensor, Any], Tensor]


def rescale_guidance(guided: Tensor, cond_out: Tensor, rescale: float) -> Tensor:
    """Guidance rescale of Lin et al. 2023 ("Common Diffusion Noise Schedules and
    Sample Steps are Flawed", section 3.4, eq. 15-16).

    Rescales the guided output to the per-sample standard deviation of the
    conditional output, then blends: ``rescale * rescaled + (1 - rescale) * guided``.
    """
    if rescale == 0.0:
        return guided
    dims = tuple(range(1, guided.ndim))
    std_cond = cond_out.float().std(dim=dims, keepdim=True)
    std_guided = guided.float().std(dim=dims, keepdim=True).clamp(min=1e-12)
    rescaled = guided.float() * (std_cond / std_guided)
    return (rescale * rescaled + (1.0 - rescale) * guided.float()).to(guided.dtype)


def cfg_denoise(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    cond: Any,
    null_cond: Optional[Any] = None,
    guidance: float = 1.0,
    guidance_rescale: float = 0.0,
) -> Tensor:
    """Denoiser output with classifier-free guidance.

    Args:
        denoiser: ``denoiser(x_t, timesteps, cond)``.
        x: ``(B, ...)`` noisy input.
        timesteps: ``(B,)`` timesteps as fed to the model (a 0-d tensor is broadcast).
        cond: conditioning for the batch (any dataclass of batch-first tensors, see
            :mod:`~training.diffusion.cond_ops`).
        null_cond: unconditional / negative conditioning; same batch as ``cond``, or 1 (broadcast).
        guidance: the scale ``g``; 1 disables guidance, 0 gives the unconditional output.
        guidance_rescale: ``phi`` of :func:`rescale_guidance` (0 disables it).
    """
    batch = x.shape[0]
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(batch)
    if null_cond is None or guidance == 1.0:
        return denoiser(x, timesteps, cond)
    cond_batch = batch_size_of(cond)
    null_batch = batch_size_of(null_cond)
    if null_batch is not None and cond_batch is not None and null_batch != cond_batch:
        null_cond = expand_batch(null_cond, cond_batch)  # e.g. one shared null embedding
    both = cat_conditioning(null_cond, cond)
    out = denoiser(torch.cat([x, x]), torch.cat([timesteps, timesteps]), both)
    uncond, cond_out = out.chunk(2, dim=0)
    guided = uncond + guidance * (cond_out - uncond)
    return rescale_guidance(guided, cond_out, guidance_rescale)
