"""Diffusion processes, samplers and classifier-free guidance for latentloom.

Small, separate pieces (in the spirit of k-diffusion / EDM / generative-models):

* :mod:`.schedules`  beta schedules and :class:`NoiseSchedule`;
* :mod:`.process`    :class:`DiscreteDiffusion` (DDPM), :class:`RectifiedFlow` and :class:`EDMDiffusion`
  (continuous sigma, SVD) behind one training interface (:meth:`DiffusionProcess.training_loss_terms` /
  :meth:`DiffusionProcess.loss`), with an optional token-count shift (:meth:`DiffusionProcess.for_shape`);
* :mod:`.process_config` :class:`DiffusionConfig` (validated) and :func:`build_process`;
* :mod:`.samplers`   DDPM, DDIM, DPM-Solver++(2M), flow Euler and EDM Euler (Karras sigmas) samplers,
  functions of ``denoise(x, t)``,
  registered by name in :data:`SAMPLERS`;
* :mod:`.guidance`   guiders that build ``denoise(x, t)``: batched classifier-free guidance.

Conditioning (its fields, batch ops, trimming and CFG dropout) lives in :mod:`models.conditioning`.
"""

from .guidance import ClassifierFreeGuidance, Denoiser, frame_guidance_scale, rescale_guidance, stacked_forward
from .process import (
    DiffusionProcess,
    DiscreteDiffusion,
    EDMDiffusion,
    LossTerms,
    RectifiedFlow,
    build_process,
    karras_sigmas,
    resolution_shift,
    shift_time,
    token_count,
    token_shift,
)
from .process_config import DiffusionConfig
from .samplers import (
    SAMPLERS,
    DenoiseFn,
    SamplerSpec,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    discrete_timesteps,
    dpm_solver_2m_sample,
    dpm_solver_timesteps,
    euler_edm_step,
    euler_flow_sample,
    euler_flow_step,
    euler_karras_sample,
    flow_sigmas,
    karras_discrete_grid,
    register_sampler,
    sampler_for,
)
from .schedules import SCHEDULE_NAMES, NoiseSchedule, make_betas, rescale_zero_terminal_snr

__all__ = [
    "SAMPLERS",
    "SCHEDULE_NAMES",
    "ClassifierFreeGuidance",
    "DenoiseFn",
    "Denoiser",
    "DiffusionConfig",
    "DiffusionProcess",
    "DiscreteDiffusion",
    "EDMDiffusion",
    "LossTerms",
    "NoiseSchedule",
    "RectifiedFlow",
    "SamplerSpec",
    "build_process",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "discrete_timesteps",
    "dpm_solver_2m_sample",
    "dpm_solver_timesteps",
    "euler_edm_step",
    "euler_flow_sample",
    "euler_flow_step",
    "euler_karras_sample",
    "flow_sigmas",
    "karras_discrete_grid",
    "frame_guidance_scale",
    "karras_sigmas",
    "make_betas",
    "register_sampler",
    "rescale_guidance",
    "rescale_zero_terminal_snr",
    "resolution_shift",
    "sampler_for",
    "shift_time",
    "stacked_forward",
    "token_count",
    "token_shift",
]
