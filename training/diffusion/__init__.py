"""Diffusion processes, samplers and classifier-free guidance for latentloom.

Small, separate pieces (in the spirit of k-diffusion / EDM / generative-models):

* :mod:`.schedules`  beta schedules and :class:`NoiseSchedule`;
* :mod:`.process`    :class:`DiscreteDiffusion` (DDPM) and :class:`RectifiedFlow` behind one
  training interface (:meth:`DiffusionProcess.training_loss_terms` / :meth:`DiffusionProcess.loss`);
* :mod:`.config`     :class:`DiffusionConfig` (validated) and :func:`build_process`;
* :mod:`.samplers`   DDPM, DDIM, DPM-Solver++(2M) and flow Euler samplers;
* :mod:`.guidance`   batched classifier-free guidance;
* :mod:`.dropout`    conditioning dropout for CFG training;
* :mod:`.cond_ops`   batch operations on any dataclass-of-tensors conditioning.
"""

from .cond_ops import batch_size_of, cat_conditioning, expand_batch, map_batched, select, where
from .dropout import drop_conditioning, dropout_mask
from .guidance import Denoiser, cfg_denoise, rescale_guidance
from .process import (
    DiffusionProcess,
    DiscreteDiffusion,
    LossTerms,
    RectifiedFlow,
    build_process,
    resolution_shift,
    shift_time,
)
from .process_config import DiffusionConfig
from .samplers import (
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    discrete_timesteps,
    dpm_solver_2m_sample,
    dpm_solver_timesteps,
    euler_flow_sample,
    euler_flow_step,
)
from .schedules import SCHEDULE_NAMES, NoiseSchedule, make_betas, rescale_zero_terminal_snr

__all__ = [
    "SCHEDULE_NAMES",
    "Denoiser",
    "DiffusionConfig",
    "DiffusionProcess",
    "DiscreteDiffusion",
    "LossTerms",
    "NoiseSchedule",
    "RectifiedFlow",
    "batch_size_of",
    "build_process",
    "cat_conditioning",
    "cfg_denoise",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "discrete_timesteps",
    "dpm_solver_2m_sample",
    "dpm_solver_timesteps",
    "drop_conditioning",
    "dropout_mask",
    "euler_flow_sample",
    "euler_flow_step",
    "expand_batch",
    "make_betas",
    "map_batched",
    "rescale_guidance",
    "rescale_zero_terminal_snr",
    "resolution_shift",
    "select",
    "shift_time",
    "where",
]
