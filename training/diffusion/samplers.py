"""Samplers for the discrete (DDPM) process and for rectified flow.

All samplers share one calling convention (the shape of k-diffusion's samplers)::

    x0 = sampler(denoise, process, noise, *, steps=..., generator=None, callback=None, **own_settings)

``denoise(x, t)`` returns the model output in the process's parameterisation for the batch ``x`` at the ``(B,)``
timesteps ``t`` exactly as the denoiser takes them; a guider builds it (:mod:`.guidance`, e.g.
``ClassifierFreeGuidance(denoiser, cond, null_cond, scale)``), or plainly ``lambda x, t: denoiser(x, t, cond)``.
Samplers know nothing of conditioning or guidance. ``noise`` is the starting point (pure noise at the first
timestep), and the optional ``callback(i, t, x, x0)`` receives the step index, the timestep, the new sample after
the step and the current clean-data estimate.

Every sampler is registered in :data:`SAMPLERS` by name (:func:`register_sampler`) with the process class it
integrates and the settings it reads from a sampling config, so ``training.sampling.sample_latents`` dispatches by
name. A new sampler is a function here (or anywhere) with the decorator; guidance does not change.

Every sampler integrates ``process.for_shape(noise.shape)``: with a token-count shift configured
(:mod:`.process`) the noise levels for the sample's frames x height x width are those training used.

Single steps are public too (``ddpm_step``, ``ddim_step``, ``euler_flow_step``)
so that they can be tested and reused in isolation; unlike the samplers, which
run under ``torch.no_grad()``, they are differentiable.

x0 clipping (``clip_x0=r``) clamps the clean-data estimate to ``[-r, r]`` and
then re-derives the noise estimate from the clamped x0 before the update, so
that the pair (x0, eps) stays consistent with ``x_t``; updating with a clamped
x0 but the raw eps (as diffusers' DDIM does unless ``use_clipped_model_output``)
combines two incompatible estimates.  Clipping is only meaningful when data
live in a bounded range (pixels in [-1, 1]); latents usually should not be clipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence, get_args

import numpy as np
import torch
from torch import Tensor

from .process import DiscreteDiffusion, EDMDiffusion, RectifiedFlow, randn

TimestepSpacing = Literal["leading", "trailing", "linspace"]
TIMESTEP_SPACINGS: tuple[str, ...] = get_args(TimestepSpacing)

#: ``callback(step_index, timestep, x_after_step, x0_estimate)``
Callback = Callable[[int, Any, Tensor, Tensor], None]

#: ``denoise(x, t) -> model output``: the model prediction (in the process's parameterisation) for the batch ``x``
#: at the ``(B,)`` timesteps ``t`` as the denoiser takes them; built by a guider (:mod:`.guidance`).
DenoiseFn = Callable[[Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: the function, the process it integrates, and the settings it takes from a config."""

    name: str  # the registry key (``SamplingConfig.sampler``)
    fn: Callable[..., Tensor]  # fn(denoise, process, noise, *, steps, generator, callback, **settings)
    process: type  # the DiffusionProcess subclass it needs
    settings: tuple[str, ...] = ()  # its own keyword settings a sampling config supplies (e.g. "eta")

    @property
    def process_kind(self) -> str:
        return PROCESS_KINDS.get(self.process, self.process.__name__)


#: Every sampler by name, in registration order.
SAMPLERS: dict[str, SamplerSpec] = {}

#: How errors name a process class.
PROCESS_KINDS: dict[type, str] = {DiscreteDiffusion: "discrete", RectifiedFlow: "flow", EDMDiffusion: "edm"}


def register_sampler(name: str, process: type, settings: Sequence[str] = ()) -> Callable[[Callable], Callable]:
    """Decorator adding a sampler to :data:`SAMPLERS` under ``name`` (a name may be registered once)."""

    def add(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} is already registered ({SAMPLERS[name].fn.__qualname__})")
        SAMPLERS[name] = SamplerSpec(name, fn, process, tuple(settings))
        return fn

    return add


def sampler_for(name: str, process: Any) -> SamplerSpec:
    """The registered sampler ``name``, checked against ``process``; errors name the samplers that would fit."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler: got {name!r}; expected one of {list(SAMPLERS)}")
    spec = SAMPLERS[name]
    if not isinstance(process, spec.process):
        kind = next((k for cls, k in PROCESS_KINDS.items() if isinstance(process, cls)), type(process).__name__)
        fits = ", ".join(repr(n) for n, s in SAMPLERS.items() if isinstance(process, s.process)) or "none"
        raise ValueError(f"sampler: {name!r} is for the {spec.process_kind} process; a {kind} process samples "
                         f"with {fits}")
    return spec


#: The alphas_cumprod DPM-Solver puts in place of a zero-terminal-SNR schedule's last entry (exactly 0), so that
#: log-SNR stays finite there: diffusers' ``DPMSolverMultistepScheduler`` does the same with
#: ``rescale_betas_zero_snr=True``, and only then and only there (every other entry, e.g. the tiny ones at the end
#: of the cosine schedule, is used as it is).
DPM_MIN_ALPHAS_CUMPROD = 2.0**-24

FlowGrid = Literal["sd3", "linear"]
FLOW_GRIDS: tuple[str, ...] = get_args(FlowGrid)
#: Training steps of diffusers' flow-matching schedulers (``num_train_timesteps``, SD3 and Flux ship 1000): the
#: SD3 grid's smallest time before shifting is ``1 / FLOW_TRAIN_TIMESTEPS``.
FLOW_TRAIN_TIMESTEPS = 1000
#: Karras et al. 2022's spacing exponent, as diffusers' ``use_karras_sigmas`` fixes it.
KARRAS_RHO = 7.0


# ----------------------------------------------------------------------------- timesteps
def _check_steps(steps: int, num_train_timesteps: int) -> None:
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps: got {steps!r}; expected an int in [1, {num_train_timesteps}]")


def discrete_timesteps(
    num_train_timesteps: int, steps: int, spacing: str = "leading", steps_offset: int = 0
) -> list[int]:
    """Descending inference timesteps for DDPM / DDIM sampling.

    Spacings follow Table 2 of Lin et al. 2023 ("Common Diffusion Noise Schedules
    and Sample Steps are Flawed"):

    * ``"leading"``: ``k * (T // steps) + steps_offset`` (DDIM's original choice;
      never reaches the last training step);
    * ``"trailing"``: ``round(T - k * T / steps) - 1`` (starts at ``T - 1``, the
      recommended choice, required for zero terminal SNR);
    * ``"linspace"``: ``round(linspace(0, T - 1, steps))``.

    These are the timesteps of diffusers' ``DDPMScheduler`` / ``DDIMScheduler``.
    """
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"spacing: got {spacing!r}; expected one of {list(TIMESTEP_SPACINGS)}")
    _check_steps(steps, num_train_timesteps)
    if spacing == "leading":
        ratio = num_train_timesteps // steps
        ts = [k * ratio + steps_offset for k in range(steps)][::-1]
    elif spacing == "trailing":
        ratio = num_train_timesteps / steps
        ts = [int(np.round(num_train_timesteps - k * ratio)) - 1 for k in range(steps)]
    else:
        ts = np.linspace(0, num_train_timesteps - 1, steps).round()[::-1].astype(np.int64).tolist()
    if ts[0] >= num_train_timesteps or ts[-1] < 0:
        raise ValueError(f"timesteps {ts} fall outside [0, {num_train_timesteps}) (steps_offset={steps_offset})")
    return [int(t) for t in ts]


def dpm_solver_timesteps(
    num_train_timesteps: int, steps: int, spacing: str = "linspace", steps_offset: int = 0
) -> list[int]:
    """Descending timesteps for a solver whose last step lands on sigma = 0.

    The grid has ``steps + 1`` points of which the clean end is dropped (the
    final update goes to x0 directly).  Same values as diffusers'
    ``DPMSolverMultistepScheduler`` for each spacing.
    """
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"spacing: got {spacing!r}; expected one of {list(TIMESTEP_SPACINGS)}")
    _check_steps(steps, num_train_timesteps)
    if spacing == "linspace":
        grid = np.linspace(0, num_train_timesteps - 1, steps + 1).round()[::-1][:-1]
        ts = grid.astype(np.int64).tolist()
    elif spacing == "leading":
        ratio = num_train_timesteps // (steps + 1)
        ts = [k * ratio + steps_offset for k in range(1, steps + 1)][::-1]
    else:
        return discrete_timesteps(num_train_timesteps, steps, "trailing")
    return [int(t) for t in ts]


def _resolve_timesteps(
    process: DiscreteDiffusion,
    steps: Optional[int],
    default_steps: int,
    spacing: Optional[str],
    steps_offset: int,
    timesteps: Optional[Sequence[int]],
    schedule_fn: Callable[[int, int, str, int], list[int]],
) -> list[int]:
    T = process.num_timesteps
    if timesteps is not None:
        ts = [int(t) for t in timesteps]
        if not ts or any(b >= a for a, b in zip(ts, ts[1:])) or ts[0] >= T or ts[-1] < 0:
            raise ValueError(f"timesteps must be strictly decreasing within [0, {T}), got {ts}")
        return ts
    if steps_offset < 0:
        raise ValueError(f"steps_offset: got {steps_offset!r}; expected an int >= 0")
    default_spacing = "linspace" if schedule_fn is dpm_solver_timesteps else "leading"
    return schedule_fn(T, default_steps if steps is None else steps, spacing or default_spacing, steps_offset)


def _require(process: Any, cls: type, sampler: str) -> None:
    if not isinstance(process, cls):
        raise TypeError(f"{sampler} needs a {cls.__name__}, got {type(process).__name__}")


def _acp(process: DiscreteDiffusion, t: int) -> float:
    """``alphas_cumprod[t]`` as a Python float (1.0 for t < 0: the clean end of the chain)."""
    if t < 0:
        return 1.0
    return float(process.schedule.alphas_cumprod[t])


def _tvec(x: Tensor, t: int) -> Tensor:
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


def _x0_and_eps(
    process: DiscreteDiffusion, model_output: Tensor, x: Tensor, t: int, clip_x0: Optional[float]
) -> tuple[Tensor, Tensor]:
    tv = _tvec(x, t)
    x0 = process.to_x0(model_output, x, tv)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = process.eps_from_x0(x0, x, tv)  # re-derived: consistent with the clipped x0
    else:
        eps = process.to_eps(model_output, x, tv)
    return x0, eps


# ----------------------------------------------------------------------------- DDPM
def ddpm_step(
    process: DiscreteDiffusion,
    model_output: Tensor,
    x: Tensor,
    t: int,
    t_prev: int,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    clip_x0: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """One ancestral step ``x_t -> x_{t_prev}`` of DDPM (Ho et al. 2020, eq. 6-7, Algorithm 2).

    Samples the posterior ``q(x_{t_prev} | x_t, x0_hat)`` with the "fixed small"
    variance ``(1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)`` (``a = alphas_cumprod``),
    which also covers strided steps (``t_prev < t - 1``).  ``t_prev = -1`` means the
    clean end (``a_prev = 1``, no noise).  Returns ``(x_prev, x0_hat)``.
    The posterior mean is written with x0 and x_t only, so a clipped x0 needs no
    eps re-derivation here.
    """
    a_t, a_prev = _acp(process, t), _acp(process, t_prev)
    x0, _ = _x0_and_eps(process, model_output, x, t, clip_x0)
    step_alpha = a_t / a_prev
    step_beta = 1.0 - step_alpha
    coef_x0 = math.sqrt(a_prev) * step_beta / (1.0 - a_t)
    coef_xt = math.sqrt(step_alpha) * (1.0 - a_prev) / (1.0 - a_t)
    x_prev = coef_x0 * x0 + coef_xt * x
    if t_prev >= 0:
        variance = (1.0 - a_prev) / (1.0 - a_t) * step_beta
        if noise is None:
            noise = randn(x.shape, generator, x.device, x.dtype)
        x_prev = x_prev + math.sqrt(variance) * noise
    return x_prev, x0


@register_sampler("ddpm", DiscreteDiffusion, settings=("clip_x0", "spacing", "steps_offset"))
@torch.no_grad()
def ddpm_sample(
    denoise: DenoiseFn,
    process: DiscreteDiffusion,
    noise: Tensor,
    *,
    steps: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callback] = None,
    spacing: Optional[str] = None,
    steps_offset: int = 0,
    timesteps: Optional[Sequence[int]] = None,
    clip_x0: Optional[float] = None,
) -> Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) with :func:`ddpm_step`.

    ``steps`` defaults to the full chain (``process.num_timesteps``); fewer steps
    use strided posteriors over :func:`discrete_timesteps` with ``spacing`` (None: ``"leading"``) and
    ``steps_offset`` as diffusers' ``DDPMScheduler`` (or the explicit decreasing ``timesteps``).  ``generator``
    drives the per-step noise.
    """
    _require(process, DiscreteDiffusion, "ddpm_sample")
    process = process.for_shape(noise.shape)  # the token-shifted schedule, if one is configured
    ts = _resolve_timesteps(process, steps, process.num_timesteps, spacing, steps_offset, timesteps, discrete_timesteps)
    x = noise
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        out = denoise(x, _tvec(x, t))
        x, x0 = ddpm_step(process, out, x, t, t_prev, generator=generator, clip_x0=clip_x0)
        if callback is not None:
            callback(i, t, x, x0)
    return x


# ----------------------------------------------------------------------------- DDIM
def ddim_step(
    process: DiscreteDiffusion,
    model_output: Tensor,
    x: Tensor,
    t: int,
    t_prev: int,
    eta: float = 0.0,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    clip_x0: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM step (Song et al. 2020, "Denoising Diffusion Implicit Models", eq. 12 and 16).

    ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z`` with
    ``s = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)``; ``eta = 0`` is
    the deterministic DDIM, ``eta = 1`` matches DDPM's variance.  ``t_prev = -1``
    is the clean end (``a_prev = 1``).  Returns ``(x_prev, x0_hat)``.
    """
    if eta < 0:
        raise ValueError(f"eta: got {eta!r}; expected a float >= 0")
    a_t, a_prev = _acp(process, t), _acp(process, t_prev)
    x0, eps = _x0_and_eps(process, model_output, x, t, clip_x0)
    std = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
    direction = math.sqrt(max(1.0 - a_prev - std * std, 0.0))
    x_prev = math.sqrt(a_prev) * x0 + direction * eps
    if std > 0:
        if noise is None:
            noise = randn(x.shape, generator, x.device, x.dtype)
        x_prev = x_prev + std * noise
    return x_prev, x0


@register_sampler("ddim", DiscreteDiffusion, settings=("eta", "clip_x0", "spacing", "steps_offset", "set_alpha_to_one"))
@torch.no_grad()
def ddim_sample(
    denoise: DenoiseFn,
    process: DiscreteDiffusion,
    noise: Tensor,
    *,
    steps: int = 50,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callback] = None,
    eta: float = 0.0,
    spacing: Optional[str] = None,
    steps_offset: int = 0,
    timesteps: Optional[Sequence[int]] = None,
    clip_x0: Optional[float] = None,
    set_alpha_to_one: bool = True,
) -> Tensor:
    """DDIM sampling (Song et al. 2020, "Denoising Diffusion Implicit Models") over :func:`discrete_timesteps`,
    with :func:`ddim_step` (``eta`` its stochasticity; ``generator`` drives the noise when ``eta > 0``).

    The grid is :func:`discrete_timesteps` with ``spacing`` (None: ``"leading"``) and ``steps_offset``, the
    settings of diffusers' ``DDIMScheduler`` (Stable Diffusion 1.x / 2.x ship ``"leading"`` with
    ``steps_offset=1``). Each step goes to the next timestep of the grid, and the last one to the clean end
    (``alphas_cumprod = 1``), or with ``set_alpha_to_one=False`` to ``alphas_cumprod[0]``, as diffusers'
    ``set_alpha_to_one=False`` (SD's shipped DDIM config) does.  Use ``spacing="trailing"`` with a
    zero-terminal-SNR schedule (Lin et al. 2023, section 3.3).  (diffusers' ``DDIMScheduler`` always steps to
    ``t - T // steps``: the next grid point for "leading" and "trailing", so those match it step for step, but
    not for "linspace", where its target is off the grid and the next model call is made at another noise level
    than the sample's; here "linspace" steps along its own grid.)
    """
    _require(process, DiscreteDiffusion, "ddim_sample")
    process = process.for_shape(noise.shape)  # the token-shifted schedule, if one is configured
    ts = _resolve_timesteps(process, steps, 50, spacing, steps_offset, timesteps, discrete_timesteps)
    final = -1 if set_alpha_to_one else 0  # t = 0: alphas_cumprod[0], diffusers' final_alpha_cumprod
    x = noise
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else final
        out = denoise(x, _tvec(x, t))
        x, x0 = ddim_step(process, out, x, t, t_prev, eta=eta, generator=generator, clip_x0=clip_x0)
        if callback is not None:
            callback(i, t, x, x0)
    return x


# ----------------------------------------------------------------------------- DPM-Solver++(2M)
def dpm_alphas_cumprod(process: DiscreteDiffusion) -> Tensor:
    """The float64 ``alphas_cumprod`` DPM-Solver works with: the schedule's own, except that a last entry of exactly
    0 (a zero-terminal-SNR schedule) becomes :data:`DPM_MIN_ALPHAS_CUMPROD`, as diffusers'
    ``DPMSolverMultistepScheduler(rescale_betas_zero_snr=True)`` sets it. Nothing else is floored."""
    acp = process.schedule.alphas_cumprod.clone()
    if float(acp[-1]) == 0.0:
        acp[-1] = DPM_MIN_ALPHAS_CUMPROD
    return acp


def sigma_to_timestep(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of the VP noise levels ``sigma = sqrt((1 - a) / a)``, interpolated linearly in
    ``log sigma`` between the two neighbouring training steps (clamped to the table's range), as diffusers'
    schedulers place Karras sigmas on their timestep axis."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    above = (log_sigma[None, :] - log_sigmas[:, None]) >= 0  # (T, n): training step at or below each sigma
    low = np.cumsum(above, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
    return (1.0 - w) * low + w * (low + 1)


def karras_discrete_grid(process: DiscreteDiffusion, steps: int, rho: float = KARRAS_RHO) -> tuple[list[int], Tensor]:
    """Karras et al. 2022 (eq. 5) noise levels for a discrete VP schedule, as diffusers' ``use_karras_sigmas=True``.

    ``steps`` sigmas from the schedule's largest ``sqrt((1 - a) / a)`` down to its smallest, spaced with exponent
    ``rho``; the denoiser is called at each one's interpolated training timestep (:func:`sigma_to_timestep`),
    rounded, or for the cosine schedule truncated (diffusers leaves ``squaredcos_cap_v2`` timesteps fractional
    and casts them to int64). Returns ``(timesteps, sigmas)``, the sigmas float64 and without the final 0.
    """
    from .process import karras_sigmas

    acp = dpm_alphas_cumprod(process).numpy()
    train_sigmas = np.sqrt((1.0 - acp) / acp)
    sigmas = karras_sigmas(steps, float(train_sigmas[0]), float(train_sigmas[-1]), rho)
    t = sigma_to_timestep(sigmas.numpy(), np.log(train_sigmas))
    if getattr(process.schedule, "name", None) != "cosine":
        t = t.round()
    return [int(v) for v in t.astype(np.int64)], sigmas


def _vp_x0(prediction: str, out: Tensor, x: Tensor, alpha: float, sigma: float) -> Tensor:
    """Clean-data estimate from a model output at the VP point ``x = alpha x0 + sigma eps``."""
    if prediction == "epsilon":
        return (x - sigma * out) / alpha
    if prediction == "v_prediction":
        return alpha * x - sigma * out
    return out


@register_sampler("dpm_solver_2m", DiscreteDiffusion, settings=("clip_x0", "spacing", "steps_offset", "karras_sigmas"))
@torch.no_grad()
def dpm_solver_2m_sample(
    denoise: DenoiseFn,
    process: DiscreteDiffusion,
    noise: Tensor,
    *,
    steps: int = 20,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callback] = None,
    spacing: Optional[str] = None,
    steps_offset: int = 0,
    timesteps: Optional[Sequence[int]] = None,
    clip_x0: Optional[float] = None,
    karras_sigmas: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling
    of Diffusion Probabilistic Models", Algorithm 2), the multistep second-order
    solver of the diffusion ODE in data-prediction form.

    With ``lambda = log(alpha / sigma)``, ``h = lambda_next - lambda_cur`` and the
    data estimates ``D_i`` of the current and previous step::

        x_next = (sigma_next / sigma_cur) x - alpha_next (exp(-h) - 1) D
        D = D_i                                             (first step)
        D = (1 + 1 / (2 r)) D_i - 1 / (2 r) D_{i-1},  r = h_prev / h   (later steps)

    The last step goes to sigma = 0 and returns the data estimate (first order,
    as the solver does at the final step).  The grid is :func:`dpm_solver_timesteps` with ``spacing`` (None:
    ``"linspace"``) and ``steps_offset``, or with ``karras_sigmas`` the Karras sigmas of
    :func:`karras_discrete_grid` (the solver then runs on those exact noise levels and the denoiser sees their
    rounded timesteps), both as diffusers' ``DPMSolverMultistepScheduler`` (``algorithm_type="dpmsolver++"``,
    ``solver_order=2``, ``final_sigmas_type="zero"``).  ``generator`` is unused (the solver is
    deterministic) and accepted for a uniform signature.  Only a zero last ``alphas_cumprod`` (zero terminal SNR)
    is raised, to :data:`DPM_MIN_ALPHAS_CUMPROD` (:func:`dpm_alphas_cumprod`), so that log-SNR stays finite.
    """
    del generator
    _require(process, DiscreteDiffusion, "dpm_solver_2m_sample")
    process = process.for_shape(noise.shape)  # the token-shifted schedule, if one is configured
    acp = dpm_alphas_cumprod(process)
    if karras_sigmas:
        if timesteps is not None:
            raise ValueError("timesteps: cannot be given with karras_sigmas=True (the Karras grid sets them)")
        _check_steps(steps, process.num_timesteps)
        ts, grid = karras_discrete_grid(process, steps)
        alphas = (1.0 / (grid * grid + 1.0)).sqrt()  # VP point of sigma_karras: alpha = 1 / sqrt(s^2 + 1)
        points = [(float(a), float(a * s)) for a, s in zip(alphas, grid)]
    else:
        ts = _resolve_timesteps(process, steps, 20, spacing, steps_offset, timesteps, dpm_solver_timesteps)
        points = [(math.sqrt(float(acp[t])), math.sqrt(1.0 - float(acp[t]))) for t in ts]

    x = noise
    prev_x0: Optional[Tensor] = None
    prev_h = 0.0
    for i, t in enumerate(ts):
        out = denoise(x, _tvec(x, t))
        alpha_cur, sigma_cur = points[i]
        x0 = _vp_x0(process.prediction, out, x, alpha_cur, sigma_cur)  # at the solver's own (alpha, sigma)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        if i + 1 == len(ts):
            x = x0  # sigma_next = 0, alpha_next = 1: the update returns the data estimate
        else:
            alpha_next, sigma_next = points[i + 1]
            h = math.log(alpha_next / sigma_next) - math.log(alpha_cur / sigma_cur)
            if prev_x0 is None:
                d = x0
            else:
                half_inv_r = 0.5 * h / prev_h
                d = (1.0 + half_inv_r) * x0 - half_inv_r * prev_x0
            x = (sigma_next / sigma_cur) * x - (alpha_next * math.expm1(-h)) * d
            prev_h = h
        prev_x0 = x0
        if callback is not None:
            callback(i, t, x, x0)
    return x


# ----------------------------------------------------------------------------- flow: Euler
def euler_flow_step(model_output: Tensor, x: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """One explicit Euler step of the flow ODE ``dx/dt = v``: ``x + (t_next - t) v``."""
    return x + (sigma_next - sigma) * model_output


def flow_sigmas(
    steps: int,
    shift: float = 1.0,
    grid: str = "sd3",
    karras_sigmas: bool = False,
    num_train_timesteps: int = FLOW_TRAIN_TIMESTEPS,
) -> Tensor:
    """``steps + 1`` decreasing float64 flow times (sigmas) ending at 0, for Euler sampling of rectified flow.

    * ``grid="sd3"``: the grid of diffusers' ``FlowMatchEulerDiscreteScheduler`` with a fixed ``shift`` (no dynamic
      shifting), as Stable Diffusion 3 ships it, and of SD3's reference sampler: its trained times span
      ``[s(1 / N), 1]`` (``s`` the time shift :func:`~.process.shift_time`, ``N = num_train_timesteps``); ``steps``
      times are spaced linearly between those two ends and shifted once more, then 0 is appended. (The shift is
      applied twice to the smallest time: that is what the scheduler computes.)
    * ``grid="linear"``: ``s(linspace(1, 0, steps + 1))``, linear before the shift and reaching 0 as its own last
      point (:meth:`RectifiedFlow.sampling_sigmas`), the grid of Flux's reference sampler with a fixed shift.

    ``karras_sigmas`` re-spaces the ``steps`` nonzero times with Karras et al. 2022 (eq. 5, ``rho = 7``) between
    their largest and smallest value, as ``use_karras_sigmas=True`` does in that scheduler.
    """
    from .process import karras_sigmas as karras
    from .process import shift_time

    if steps < 1:
        raise ValueError(f"steps: got {steps!r}; expected an int >= 1")
    if grid not in FLOW_GRIDS:
        raise ValueError(f"flow_grid: got {grid!r}; expected one of {list(FLOW_GRIDS)}")
    if not shift > 0:
        raise ValueError(f"shift: got {shift!r}; expected a float > 0")
    if grid == "sd3":
        smallest = float(shift_time(1.0 / num_train_timesteps, shift))  # the scheduler's sigma_min
        base = torch.from_numpy(np.linspace(1.0, smallest, steps))  # linspace of timesteps / N
        times = shift_time(base, shift)
    else:
        times = shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)[:-1]
    if karras_sigmas:
        if steps < 2:
            raise ValueError("karras_sigmas: needs steps >= 2 (a range of noise levels to space)")
        times = karras(steps, float(times[-1]), float(times[0]), KARRAS_RHO)
    return torch.cat([times.to(torch.float64), torch.zeros(1, dtype=torch.float64)])


@register_sampler("euler", RectifiedFlow, settings=("clip_x0", "karras_sigmas", "flow_grid"))
@torch.no_grad()
def euler_flow_sample(
    denoise: DenoiseFn,
    process: RectifiedFlow,
    noise: Tensor,
    *,
    steps: int = 28,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callback] = None,
    sigmas: Optional[Sequence[float] | Tensor] = None,
    shift: Optional[float] = None,
    clip_x0: Optional[float] = None,
    karras_sigmas: bool = False,
    flow_grid: str = "sd3",
) -> Tensor:
    """Euler integration of the rectified-flow ODE from t = 1 (noise) to t = 0.

    The probability-flow ODE of rectified flow is ``dx/dt = v(x, t)`` (Liu et al.
    2022); SD3 (Esser et al. 2024) samples it with Euler steps on a shifted grid.
    ``sigmas`` (decreasing, ending at 0) defaults to :func:`flow_sigmas` ``(steps, shift, flow_grid,
    karras_sigmas)``: with the default ``flow_grid="sd3"`` the grid of diffusers' ``FlowMatchEulerDiscreteScheduler``
    at a fixed shift (SD3's shipped scheduler; its first time is 1, its last nonzero one about ``shift² / 1000``),
    with ``"linear"`` the Flux-reference grid ``shift(linspace(1, 0, steps + 1))``. ``shift`` defaults to the
    process's (its training shift, token shift for the sample's shape included); an explicit ``shift`` is the whole
    shift.  With ``clip_x0`` the
    velocity is re-derived from the clamped x0, ``v = (x - x0) / t``.
    ``denoise`` is called with the denoiser's timesteps, ``process.model_timesteps(t)``
    (``1000 t`` by default, as diffusers passes ``sigma * num_train_timesteps``).
    ``generator`` is unused (deterministic sampler).
    """
    del generator
    _require(process, RectifiedFlow, "euler_flow_sample")
    process = process.for_shape(noise.shape)  # the token-shifted time shift, if one is configured
    if sigmas is None:
        grid = flow_sigmas(steps, process.shift if shift is None else float(shift), flow_grid, karras_sigmas).tolist()
    else:
        grid = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
        if len(grid) < 2 or any(b >= a for a, b in zip(grid, grid[1:])):
            raise ValueError(f"sigmas must be strictly decreasing with >= 2 entries, got {grid}")
    x = noise
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:])):
        t_vec = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)
        out = denoise(x, process.model_timesteps(t_vec))
        x0 = process.to_x0(out, x, t_vec)
        if clip_x0 is not None and sigma > 0:
            x0 = x0.clamp(-clip_x0, clip_x0)
            out = (x - x0) / sigma
        x = euler_flow_step(out, x, sigma, sigma_next)
        if callback is not None:
            callback(i, sigma, x, x0)
    return x


# ----------------------------------------------------------------------------- EDM: Euler over Karras sigmas
def euler_edm_step(x: Tensor, x0: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """One Euler step of the probability-flow ODE ``dx/dsigma = (x - D(x; sigma)) / sigma`` (Karras et al. 2022,
    eq. 3 with ``sigma(t) = t``; Algorithm 1 without its Heun correction):
    ``x + (sigma_next - sigma) (x - x0) / sigma``."""
    return x + (sigma_next - sigma) * ((x - x0) / sigma)


@register_sampler("euler_karras", EDMDiffusion, settings=("clip_x0",))
@torch.no_grad()
def euler_karras_sample(
    denoise: DenoiseFn,
    process: EDMDiffusion,
    noise: Tensor,
    *,
    steps: int = 25,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callback] = None,
    sigmas: Optional[Sequence[float] | Tensor] = None,
    clip_x0: Optional[float] = None,
) -> Tensor:
    """Euler sampling of an :class:`EDMDiffusion` over Karras sigmas (Karras et al. 2022, eq. 5 and Algorithm 1,
    first order, no churn): Stable Video Diffusion's sampler.

    It is diffusers' ``EulerDiscreteScheduler`` as ``StableVideoDiffusionPipeline`` configures it
    (``prediction_type="v_prediction"``, ``use_karras_sigmas=True``, ``sigma_min=0.002``, ``sigma_max=700``,
    ``timestep_type="continuous"``, ``timestep_spacing="leading"``):

    * the grid is :meth:`EDMDiffusion.sampling_sigmas` ``(steps)`` (Karras sigmas, then 0), or the decreasing
      ``sigmas`` given (ending at 0);
    * ``noise`` is unit Gaussian and the start is ``noise * sqrt(sigma_0^2 + 1)``: the std of ``x0 + sigma_0 eps``
      for unit-variance data, and diffusers' ``init_noise_sigma`` for "leading" spacing;
    * at each sigma the denoiser gets ``c_in x = x / sqrt(sigma^2 + 1)`` at ``c_noise = ln(sigma) / 4``
      (:meth:`EDMDiffusion.model_timesteps`), its output gives ``x0 = D(x; sigma)`` (EDM preconditioning), and
      :func:`euler_edm_step` moves to the next sigma; the last step (to 0) returns ``x0``.

    Only the sample ``x`` is scaled: conditioning (``cond.image_latents`` of image-to-video) reaches the denoiser
    untouched through ``denoise``. ``clip_x0`` clamps ``x0`` before the step. ``generator`` is unused
    (deterministic sampler). ``callback(i, sigma, x, x0)``.
    """
    del generator
    _require(process, EDMDiffusion, "euler_karras_sample")
    process = process.for_shape(noise.shape)  # token-shifted sigmas, if a shift is configured
    if sigmas is None:
        grid = process.sampling_sigmas(steps).tolist()
    else:
        grid = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
        if len(grid) < 2 or grid[-1] < 0 or any(b >= a for a, b in zip(grid, grid[1:])):
            raise ValueError(f"sigmas must be strictly decreasing, >= 0, with >= 2 entries, got {grid}")
    x = noise * math.sqrt(grid[0] ** 2 + 1.0)
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:])):
        s_vec = torch.full((x.shape[0],), sigma, dtype=torch.float64, device=x.device)
        x_in = x * float(process.c_in(sigma))  # (B, C, ...) the denoiser's input
        out = denoise(x_in, process.model_timesteps(s_vec))
        x0 = process.to_x0(out, x_in, s_vec)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        x = euler_edm_step(x, x0, sigma, sigma_next)
        if callback is not None:
            callback(i, sigma, x, x0)
    return x
