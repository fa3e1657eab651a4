"""Sampling settings and guided sampling in latent space.

:class:`SamplingConfig` is what a user sets (sampler, steps, guidance, seed, negative prompt); :func:`sample_latents`
draws latents with the named sampler from :data:`training.diffusion.SAMPLERS` through a
:class:`~training.diffusion.guidance.ClassifierFreeGuidance` guider. From prompts to pixels (text encoding, latent
shape, decoding) is :meth:`training.inference.Inference.generate`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from models.conditioning import Conditioning
from training.diffusion import SAMPLERS, ClassifierFreeGuidance, frame_guidance_scale, sampler_for


@dataclass
class SamplingConfig:
    """How images are drawn from a trained denoiser."""

    sampler: str = "ddim"  # SAMPLERS: ddim | ddpm | dpm_solver_2m (discrete) · euler (flow) · euler_karras (edm)
    steps: int = 50  # sampler steps
    guidance: float = 3.0  # classifier-free guidance scale (1: no guidance; 0: unconditional)
    eta: float = 0.0  # DDIM stochasticity (0: deterministic DDIM)
    negative_prompt: str = ""  # the unconditional branch's prompt ('' = the training null conditioning)
    seed: int = 0  # noise seed (fixed: the same seed gives the same images)
    clip_x0: Optional[float] = None  # clamp predicted x0 to [-v, v] (pixel-space models); null: off
    guidance_min: Optional[float] = None  # clips: per-frame scale, guidance_min → guidance linearly (SVD); null: off
    guidance_rescale: float = 0.0  # rescale phi in [0, 1] (Lin et al. 2023; diffusers' guidance_rescale); 0: off
    spacing: Optional[str] = None  # ddim/ddpm/dpm_solver_2m timesteps: leading|trailing|linspace (null: sampler's)
    steps_offset: int = 0  # added to "leading" timesteps (diffusers' steps_offset; SD 1.x/2.x ship 1)
    set_alpha_to_one: bool = True  # ddim: last step to alphas_cumprod 1 (false: alphas_cumprod[0], SD's shipped DDIM)
    karras_sigmas: bool = False  # dpm_solver_2m / euler: Karras et al. 2022 noise levels (diffusers' use_karras_sigmas)
    flow_grid: str = "sd3"  # euler (flow): sd3 (FlowMatchEulerDiscreteScheduler, fixed shift) | linear (Flux reference)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            hint = difflib.get_close_matches(self.sampler, list(SAMPLERS), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"sampler: got {self.sampler!r}; allowed: {', '.join(map(repr, SAMPLERS))}{extra}")
        if self.steps < 1:
            raise ValueError(f"steps: {self.steps} must be >= 1")
        if self.guidance < 0:
            raise ValueError(f"guidance: {self.guidance} must be >= 0")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta: {self.eta} must be in [0, 1]")
        if self.guidance_min is not None and self.guidance_min < 0:
            raise ValueError(f"guidance_min: {self.guidance_min} must be >= 0 (or null: one scale for every frame)")
        self._check_sampler_options()

    def _check_sampler_options(self) -> None:
        """The schedule options are valid, and each one set away from its default is read by the chosen sampler
        (an option the sampler ignores would change nothing: a config error, not a silent no-op)."""
        from training.diffusion.samplers import FLOW_GRIDS, TIMESTEP_SPACINGS

        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale: {self.guidance_rescale} must be in [0, 1] (0: off)")
        if self.spacing is not None and self.spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"spacing: got {self.spacing!r}; allowed: {', '.join(TIMESTEP_SPACINGS)} or null")
        if self.steps_offset < 0:
            raise ValueError(f"steps_offset: {self.steps_offset} must be >= 0")
        if self.flow_grid not in FLOW_GRIDS:
            raise ValueError(f"flow_grid: got {self.flow_grid!r}; allowed: {', '.join(FLOW_GRIDS)}")
        defaults = {"spacing": None, "steps_offset": 0, "set_alpha_to_one": True, "karras_sigmas": False,
                    "flow_grid": "sd3"}
        settings = SAMPLERS[self.sampler].settings
        for name, default in defaults.items():
            if getattr(self, name) != default and name not in settings:
                readers = [n for n, spec in SAMPLERS.items() if name in spec.settings]
                raise ValueError(f"{name}: {getattr(self, name)!r} is not read by the {self.sampler!r} sampler; "
                                 f"samplers that read it: {', '.join(readers) or 'none'}")


def check_sampler(process: Any, sampler: str) -> None:
    """Raise a ValueError naming the fitting samplers unless ``sampler`` integrates ``process``."""
    sampler_for(sampler, process)


def sample_latents(
    denoiser: nn.Module,
    process: Any,
    cond: Conditioning,
    null_cond: Optional[Conditioning],
    shape: Sequence[int],
    cfg: SamplingConfig,
    device: torch.device,
    guidance: Optional[float] = None,
) -> Tensor:
    """Latents ``shape`` drawn by the configured sampler with classifier-free guidance (all channels).

    The sampler is looked up by name in :data:`training.diffusion.SAMPLERS` and given the settings it declares
    (``eta``, ``clip_x0``, ...) from ``cfg``; the guider :class:`ClassifierFreeGuidance` builds its ``denoise(x, t)``
    (``guidance`` overrides ``cfg.guidance``; ``null_cond`` None: no guidance;
    ``cfg.guidance_rescale``: its rescale). For clips ``(B, C, T, h, w)`` with
    ``cfg.guidance_min`` set, the scale is per frame, rising linearly from ``guidance_min`` (first frame) to the scale
    (last frame), as Stable Video Diffusion samples (:func:`training.diffusion.frame_guidance_scale`); images keep
    the one scale. Only the sample is drawn from the seed: conditioning (an image-to-video frame's
    ``cond.image_latents``, noise-augmented by :func:`models.conditioning.first_frame_conditioning`) reaches the
    denoiser as given, at every step.
    """
    spec = sampler_for(cfg.sampler, process)
    missing = [name for name in spec.settings if not hasattr(cfg, name)]
    if missing:
        raise ValueError(f"sampler {cfg.sampler!r} needs the settings {missing}, which SamplingConfig does not have")
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    noise = torch.randn(tuple(shape), generator=g).to(device)
    scale = cfg.guidance if guidance is None else guidance
    if cfg.guidance_min is not None and len(shape) == 5:
        scale = frame_guidance_scale(cfg.guidance_min, scale, int(shape[2]))  # (T,) SVD's per-frame scales
    denoise = ClassifierFreeGuidance(denoiser, cond, null_cond, scale, rescale=cfg.guidance_rescale)
    settings = {name: getattr(cfg, name) for name in spec.settings}
    return spec.fn(denoise, process, noise, steps=cfg.steps, generator=g, **settings)
