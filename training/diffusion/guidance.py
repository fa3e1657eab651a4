"""Guiders: objects that turn a conditional denoiser into the ``denoise(x, t)`` function a sampler integrates.

A sampler (:mod:`.samplers`) only ever calls ``denoise(x, t) -> model output``; how that output is made from a
``denoiser(x_t, timesteps, cond)`` is the guider's business. Without guidance it is ``lambda x, t: denoiser(x, t,
cond)``; with classifier-free guidance it is :class:`ClassifierFreeGuidance`. A new guider (e.g. an
image-conditioning guider with separate text and image scales, InstructPix2Pix-style) is a new callable here built
on :func:`stacked_forward`; it never touches a sampler, and a new sampler never touches this module.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from models.conditioning import batch_size_of, cat_conditioning, expand_batch

#: ``denoiser(x_t, timesteps, cond) -> tensor shaped like x_t``
Denoiser = Callable[[Tensor, Tensor, Any], Tensor]


def rescale_guidance(guided: Tensor, cond_out: Tensor, rescale: float) -> Tensor:
    """Guidance rescale of Lin et al. 2023 ("Common Diffusion Noise Schedules and
    Sample Steps are Flawed", section 3.4, eq. 15-16).

    Rescales the guided output to the per-sample standard deviation of the
    conditional output, then blends: ``rescale * rescaled + (1 - rescale) * guided`` (diffusers'
    ``rescale_noise_cfg``, the ``guidance_rescale`` of its Stable Diffusion pipelines; a sampling config sets it as
    ``SamplingConfig.guidance_rescale``).
    """
    if rescale == 0.0:
        return guided
    dims = tuple(range(1, guided.ndim))
    wide = torch.promote_types(guided.dtype, torch.float32)  # half precision computes in float32, float64 stays
    std_cond = cond_out.to(wide).std(dim=dims, keepdim=True)
    std_guided = guided.to(wide).std(dim=dims, keepdim=True).clamp(min=1e-12)
    rescaled = guided.to(wide) * (std_cond / std_guided)
    return (rescale * rescaled + (1.0 - rescale) * guided.to(wide)).to(guided.dtype)


def stacked_forward(denoiser: Denoiser, x: Tensor, t: Tensor, stacked_cond: Any, k: int) -> tuple[Tensor, ...]:
    """One forward of ``k`` branches: ``x`` and ``t`` repeated ``k`` times on the batch against ``stacked_cond``
    (``k`` conditionings concatenated on the batch, branch-major), split back into the ``k`` outputs."""
    out = denoiser(torch.cat([x] * k), torch.cat([t] * k), stacked_cond)  # (k·B, C, ...)
    return out.chunk(k, dim=0)


def frame_guidance_scale(min_scale: float, max_scale: float, num_frames: int) -> Tensor:
    """Per-frame scales rising linearly from ``min_scale`` (first frame) to ``max_scale`` (last), as Stable Video
    Diffusion guides image-to-video sampling (Blattmann et al. 2023); pass it as ``ClassifierFreeGuidance.scale``."""
    if num_frames < 1:
        raise ValueError(f"num_frames: got {num_frames!r}; expected an int >= 1")
    return torch.linspace(min_scale, max_scale, num_frames)


class ClassifierFreeGuidance:
    """Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance") as ``denoise(x, t)``.

    ``out = uncond + scale * (cond - uncond)`` on every output channel, from a single batched forward pass over
    ``[uncond; cond]``. A negative prompt is nothing more than a different ``null_cond``. With ``scale == 1`` (every
    entry) or no ``null_cond`` the denoiser is called once, on the conditional batch only.

    Args:
        denoiser: ``denoiser(x_t, timesteps, cond)``.
        cond: conditioning of the batch (a :class:`models.conditioning.Conditioning` or any dataclass of batch-first
            tensors).
        null_cond: unconditional / negative conditioning; the same batch as ``cond``, or 1 (broadcast). It is the
            whole unconditional branch: fields that stay in both branches (micro-conditioning) must be set in it too
            (:func:`models.conditioning.nulled` builds it from ``cond``).
        scale: the guidance scale ``w``: a float (1 disables guidance, 0 gives the unconditional output) or a
            ``(T,)`` tensor of per-frame scales broadcast over the frame axis of ``(B, C, T, H, W)`` samples
            (:func:`frame_guidance_scale`).
        rescale: ``phi`` of :func:`rescale_guidance` (Lin et al. 2023); 0 disables it.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        cond: Any,
        null_cond: Optional[Any] = None,
        scale: float | Tensor | Sequence[float] = 1.0,
        rescale: float = 0.0,
    ) -> None:
        if not isinstance(scale, (int, float)):
            scale = torch.as_tensor(scale, dtype=torch.float32)
            if scale.ndim > 1:
                raise ValueError(f"scale: got a tensor of shape {tuple(scale.shape)}; expected a float or (T,)")
            if scale.ndim == 0:
                scale = float(scale)
        self.denoiser = denoiser
        self.cond = cond
        self.scale = scale
        if not 0.0 <= float(rescale) <= 1.0:
            raise ValueError(f"rescale: got {rescale!r}; expected a float in [0, 1] (0: off; Lin et al. 2023 use 0.7)")
        self.rescale = float(rescale)
        unit = bool((scale == 1.0).all()) if isinstance(scale, Tensor) else scale == 1.0
        self.single = null_cond is None or unit  # one forward on the conditional batch
        self.stacked: Any = None  # [null_cond; cond], concatenated once for every step
        if not self.single:
            cond_batch, null_batch = batch_size_of(cond), batch_size_of(null_cond)
            if null_batch is not None and cond_batch is not None and null_batch != cond_batch:
                null_cond = expand_batch(null_cond, cond_batch)  # e.g. one shared null embedding
            self.stacked = cat_conditioning(null_cond, cond)

    def scale_for(self, x: Tensor) -> float | Tensor:
        """The scale as it multiplies an output shaped like ``x``: a float, or ``(1, 1, T, 1, 1)`` per frame."""
        if not isinstance(self.scale, Tensor):
            return self.scale
        frames = self.scale.shape[0]
        if x.ndim != 5 or x.shape[2] != frames:
            raise ValueError(
                f"scale: {frames} per-frame scales need samples shaped (B, C, {frames}, H, W); got {tuple(x.shape)}"
            )
        return self.scale.to(device=x.device, dtype=x.dtype).reshape(1, 1, frames, 1, 1)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """Guided model output for ``x`` ``(B, ...)`` at timesteps ``t`` ``(B,)`` (a 0-d ``t`` is broadcast)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if self.single:
            return self.denoiser(x, t, self.cond)
        uncond, cond_out = stacked_forward(self.denoiser, x, t, self.stacked, 2)  # (B, C, ...) each
        guided = uncond + self.scale_for(x) * (cond_out - uncond)
        return rescale_guidance(guided, cond_out, self.rescale)
