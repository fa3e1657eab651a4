"""Forward diffusion processes behind one training interface.

A trainer only needs::

    terms = process.training_loss_terms(x0, generator=g)
    out = denoiser(terms.x_t, terms.timesteps, cond)
    loss = process.loss(out, terms)

and never has to know whether ``process`` is a DDPM-style
:class:`DiscreteDiffusion` or a :class:`RectifiedFlow`.

References
----------
* Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (forward process, epsilon target).
* Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"
  (v-prediction, section 4 / appendix D).
* Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy" (min-SNR-gamma).
* Guttenberg 2023, "Diffusion with Offset Noise" (crosslabs.org blog post).
* Liu et al. 2022, "Flow Straight and Fast: Learning to Generate and Transfer Data with
  Rectified Flow"; Lipman et al. 2022, "Flow Matching for Generative Modeling".
* Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
  Synthesis" (SD3: logit-normal timestep sampling, section 3.1; resolution-dependent
  timestep shift, section 5.3.2).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, get_args

import torch
from torch import Tensor

from .process_config import DiffusionConfig, FlowTimestepSampling, LossWeighting, PredictionType
from .schedules import NoiseSchedule

PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)
LOSS_WEIGHTINGS: tuple[str, ...] = get_args(LossWeighting)
FLOW_TIMESTEP_SAMPLINGS: tuple[str, ...] = get_args(FlowTimestepSampling)


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: got {value!r}; expected one of {list(allowed)}")


def append_dims(coef: Tensor, ndim: int) -> Tensor:
    """View a per-sample ``(B,)`` tensor as ``(B, 1, ..., 1)`` with ``ndim`` dims."""
    return coef.reshape(coef.shape + (1,) * (ndim - coef.ndim))


def rand_device(generator: Optional[torch.Generator], device: torch.device) -> torch.device:
    """Device on which to draw random numbers so that ``generator`` can be used.

    A ``torch.Generator`` only draws on its own device, so numbers are drawn
    there and moved afterwards: results then depend only on the generator's
    seed, not on where the tensors live.
    """
    return generator.device if generator is not None else device


def randn(
    shape: tuple[int, ...] | torch.Size,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal samples, drawn with ``generator`` on its device, returned on ``device``."""
    device = torch.device(device)
    draw = dtype if dtype in (torch.float32, torch.float64) else torch.float32  # no coarse half-precision draws
    out = torch.randn(tuple(shape), generator=generator, device=rand_device(generator, device), dtype=draw)
    return out.to(device=device, dtype=dtype)


@dataclass
class LossTerms:
    """Everything a trainer needs for one diffusion training step.

    Attributes:
        x_t: noisy input to the denoiser, shaped like ``x0``.
        timesteps: ``(B,)`` timesteps exactly as they must be fed to the denoiser.
        target: regression target for the denoiser output, shaped like ``x0``.
        weight: ``(B,)`` float32 per-sample loss weight.
        noise: the noise used to build ``x_t`` (offset noise included).
        t: ``(B,)`` process time: integer step index (discrete) or ``t in [0, 1]`` (flow).
    """

    x_t: Tensor
    timesteps: Tensor
    target: Tensor
    weight: Tensor
    noise: Tensor
    t: Tensor


class DiffusionProcess(ABC):
    """Common interface of the forward processes.

    Args:
        offset_noise: strength of Guttenberg's offset noise; 0 disables it.
        channel_dim: the channel axis of data tensors (1 for ``(B, C, H, W)`` and
            ``(B, C, T, H, W)``, 2 for ``(B, T, C, H, W)``).
    """

    def __init__(self, offset_noise: float = 0.0, channel_dim: int = 1) -> None:
        if offset_noise < 0:
            raise ValueError(f"offset_noise: got {offset_noise!r}; expected a float >= 0")
        if channel_dim < 1:
            raise ValueError(f"channel_dim: got {channel_dim!r}; expected an int >= 1 (dim 0 is the batch)")
        self.offset_noise = float(offset_noise)
        self.channel_dim = int(channel_dim)

    # ------------------------------------------------------------------ noise / time
    def sample_noise(self, x0: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Gaussian noise shaped like ``x0``, plus offset noise if enabled.

        Offset noise (Guttenberg 2023) adds ``offset_noise * n`` with
        ``n ~ N(0, 1)`` drawn once per (sample, channel) and broadcast over every
        other axis (space, and time for video), so the model also learns to
        change the per-channel mean of an image.
        """
        noise = randn(x0.shape, generator, x0.device, x0.dtype)
        if self.offset_noise > 0:
            if not 1 <= self.channel_dim < x0.ndim:
                raise ValueError(f"channel_dim: got {self.channel_dim}; out of range for a {x0.ndim}-D tensor")
            shape = [1] * x0.ndim
            shape[0] = x0.shape[0]
            shape[self.channel_dim] = x0.shape[self.channel_dim]
            noise = noise + self.offset_noise * randn(tuple(shape), generator, x0.device, x0.dtype)
        return noise

    @abstractmethod
    def sample_timesteps(
        self, batch_size: int, generator: Optional[torch.Generator] = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Draw ``(B,)`` training times (process time, see :attr:`LossTerms.t`)."""

    @abstractmethod
    def model_timesteps(self, t: Tensor) -> Tensor:
        """Convert process time ``t`` to the timestep values fed to the denoiser."""

    # ------------------------------------------------------------------ forward process
    @abstractmethod
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Sample ``x_t`` from ``q(x_t | x_0)`` with the given noise."""

    @abstractmethod
    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Regression target of the denoiser at time ``t``."""

    @abstractmethod
    def loss_weight(self, t: Tensor) -> Tensor:
        """``(B,)`` float32 per-sample loss weight at time ``t``."""

    # ------------------------------------------------------------------ conversions
    @abstractmethod
    def to_x0(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Clean-data estimate implied by a model output."""

    @abstractmethod
    def to_eps(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Noise estimate implied by a model output."""

    # ------------------------------------------------------------------ training
    def training_loss_terms(
        self,
        x0: Tensor,
        noise: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        t: Optional[Tensor] = None,
    ) -> LossTerms:
        """Noise a clean batch and return what the loss needs.

        ``noise`` defaults to :meth:`sample_noise` (offset noise included; a
        given ``noise`` is used as is) and ``t`` to :meth:`sample_timesteps`.
        The noise is drawn before the timesteps, both from ``generator``.
        """
        if noise is None:
            noise = self.sample_noise(x0, generator)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} does not match x0 shape {tuple(x0.shape)}")
        if t is None:
            t = self.sample_timesteps(x0.shape[0], generator, x0.device)
        t = t.to(x0.device)
        return LossTerms(
            x_t=self.add_noise(x0, noise, t),
            timesteps=self.model_timesteps(t),
            target=self.target(x0, noise, t),
            weight=self.loss_weight(t),
            noise=noise,
            t=t,
        )

    def loss(self, model_output: Tensor, terms: LossTerms, reduction: str = "mean") -> Tensor:
        """Weighted MSE: per-sample mean over all non-batch dims, times ``terms.weight``.

        Computed in float32.  ``reduction="mean"`` returns the batch mean (a
        scalar), ``"none"`` the ``(B,)`` weighted per-sample losses.
        """
        _check_choice("reduction", reduction, ("mean", "none"))
        if model_output.shape != terms.target.shape:
            raise ValueError(
                f"model output shape {tuple(model_output.shape)} does not match target shape "
                f"{tuple(terms.target.shape)}"
            )
        err = (model_output.float() - terms.target.float()).square()
        per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
        weighted = per_sample * terms.weight.to(per_sample)
        return weighted.mean() if reduction == "mean" else weighted


class DiscreteDiffusion(DiffusionProcess):
    """DDPM-style variance-preserving process on integer steps ``0 .. T-1``.

    ``x_t = alpha_t x0 + sigma_t eps`` with ``alpha_t = sqrt(alphas_cumprod[t])``
    and ``sigma_t = sqrt(1 - alphas_cumprod[t])`` (Ho et al. 2020, eq. 4).

    Prediction types:

    * ``"epsilon"``: the model predicts ``eps`` (Ho et al. 2020).
    * ``"v_prediction"``: ``v = alpha_t eps - sigma_t x0`` (Salimans & Ho 2022).
    * ``"sample"``: the model predicts ``x0``.

    Loss weighting ``"min_snr"`` (Hang et al. 2023) weights the squared error
    so that, measured in x0 space, each step counts ``min(SNR, gamma)``: the
    per-sample weight is ``min(SNR, gamma) / SNR`` for epsilon targets,
    ``min(SNR, gamma) / (SNR + 1)`` for v targets and ``min(SNR, gamma)`` for x0
    targets.  The epsilon form is evaluated as ``min(1, gamma / SNR)`` so that
    a zero-SNR step gets weight 1 instead of 0/0.

    Coefficients are computed in float64 and cast to the data dtype.
    """

    def __init__(
        self,
        schedule: Optional[NoiseSchedule] = None,
        prediction: str = "epsilon",
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        offset_noise: float = 0.0,
        channel_dim: int = 1,
    ) -> None:
        super().__init__(offset_noise=offset_noise, channel_dim=channel_dim)
        _check_choice("prediction", prediction, PREDICTION_TYPES)
        _check_choice("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma: got {min_snr_gamma!r}; expected a float > 0")
        self.schedule = schedule if schedule is not None else NoiseSchedule.from_name("scaled_linear", 1000)
        self.prediction = prediction
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def _coefs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha_t, sigma_t)`` as ``(B, 1, ..., 1)`` tensors in ``like``'s dtype."""
        a = self.schedule.alphas_cumprod_at(t, like.device)
        alpha = append_dims(a.sqrt(), like.ndim).to(like.dtype)
        sigma = append_dims((1.0 - a).sqrt(), like.ndim).to(like.dtype)
        return alpha, sigma

    def sample_timesteps(
        self, batch_size: int, generator: Optional[torch.Generator] = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Uniform integer steps in ``[0, T)`` (Ho et al. 2020, Algorithm 1)."""
        device = torch.device(device)
        t = torch.randint(
            0, self.num_timesteps, (batch_size,), generator=generator, device=rand_device(generator, device)
        )
        return t.to(device)

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The denoiser sees the integer step index itself (as ``long``)."""
        return t.long()

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = self._coefs(t, x0)
        return alpha * x0 + sigma * noise

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``v = alpha_t eps - sigma_t x0`` (Salimans & Ho 2022, section 4)."""
        alpha, sigma = self._coefs(t, x0)
        return alpha * noise - sigma * x0

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "v_prediction":
            return self.velocity(x0, noise, t)
        return x0

    def snr(self, t: Tensor) -> Tensor:
        """``alpha_t^2 / sigma_t^2`` in float64."""
        return self.schedule.snr(t)

    def loss_weight(self, t: Tensor) -> Tensor:
        if self.loss_weighting == "uniform":
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        snr = self.schedule.snr(t)
        gamma = self.min_snr_gamma
        if self.prediction == "epsilon":
            weight = (gamma / snr).clamp(max=1.0)  # == min(snr, gamma) / snr, and 1 at snr == 0
        elif self.prediction == "v_prediction":
            weight = snr.clamp(max=gamma) / (snr + 1.0)
        else:
            weight = snr.clamp(max=gamma)
        return weight.float()

    # ------------------------------------------------------------------ conversions
    def to_x0(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = self._coefs(t, x_t)
        if self.prediction == "epsilon":
            return (x_t - sigma * model_output) / alpha
        if self.prediction == "v_prediction":
            return alpha * x_t - sigma * model_output
        return model_output

    def to_eps(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = self._coefs(t, x_t)
        if self.prediction == "epsilon":
            return model_output
        if self.prediction == "v_prediction":
            return alpha * model_output + sigma * x_t
        return (x_t - alpha * model_output) / sigma

    def to_v(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Velocity implied by a model output."""
        if self.prediction == "v_prediction":
            return model_output
        alpha, sigma = self._coefs(t, x_t)
        return alpha * self.to_eps(model_output, x_t, t) - sigma * self.to_x0(model_output, x_t, t)

    def eps_from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Noise consistent with ``x_t`` and a (possibly clipped) ``x0``: ``(x_t - alpha_t x0) / sigma_t``."""
        alpha, sigma = self._coefs(t, x_t)
        return (x_t - alpha * x0) / sigma


def shift_time(t: Tensor | float, shift: float) -> Tensor | float:
    """Resolution-dependent timestep shift of SD3 (Esser et al. 2024, section 5.3.2).

    ``t' = shift * t / (1 + (shift - 1) * t)`` maps ``[0, 1]`` onto itself and,
    for ``shift > 1``, moves time towards the noisy end.
    """
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_shift(num_pixels: int, base_num_pixels: int = 256 * 256) -> float:
    """SD3's shift for a resolution: ``sqrt(m / n)`` for ``m`` pixels (or latent tokens) vs a base ``n``."""
    if num_pixels <= 0 or base_num_pixels <= 0:
        raise ValueError(f"pixel counts must be > 0, got {num_pixels} and {base_num_pixels}")
    return math.sqrt(num_pixels / base_num_pixels)


class RectifiedFlow(DiffusionProcess):
    """Rectified flow / flow matching with the straight (optimal-transport) path.

    ``x_t = (1 - t) x0 + t eps`` for ``t in [0, 1]`` (t = 1 is pure noise) and the
    model regresses the constant velocity ``dx_t/dt = eps - x0`` (Liu et al. 2022;
    Lipman et al. 2022; Esser et al. 2024 eq. 2 with the "rectified flow" path).

    Training times are drawn ``uniform`` on ``[0, 1]`` or ``logit_normal``
    (``t = sigmoid(n)``, ``n ~ N(logit_mean, logit_std^2)``; SD3 section 3.1), then
    shifted with :func:`shift_time`.  The denoiser sees ``t * timestep_scale``
    (diffusers' SD3 / Flux convention is a scale of 1000).
    """

    def __init__(
        self,
        timestep_sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
        timestep_scale: float = 1000.0,
        offset_noise: float = 0.0,
        channel_dim: int = 1,
    ) -> None:
        super().__init__(offset_noise=offset_noise, channel_dim=channel_dim)
        _check_choice("timestep_sampling", timestep_sampling, FLOW_TIMESTEP_SAMPLINGS)
        if logit_std <= 0:
            raise ValueError(f"logit_std: got {logit_std!r}; expected a float > 0")
        if shift <= 0:
            raise ValueError(f"shift: got {shift!r}; expected a float > 0")
        if timestep_scale <= 0:
            raise ValueError(f"timestep_scale: got {timestep_scale!r}; expected a float > 0")
        self.timestep_sampling = timestep_sampling
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)
        self.shift = float(shift)
        self.timestep_scale = float(timestep_scale)

    def sample_timesteps(
        self, batch_size: int, generator: Optional[torch.Generator] = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Float32 times in ``[0, 1]``, uniform or logit-normal, then shifted."""
        device = torch.device(device)
        if self.timestep_sampling == "uniform":
            t = torch.rand((batch_size,), generator=generator, device=rand_device(generator, device))
        else:
            n = torch.randn((batch_size,), generator=generator, device=rand_device(generator, device))
            t = torch.sigmoid(self.logit_mean + self.logit_std * n)
        return shift_time(t, self.shift).to(device)

    def model_timesteps(self, t: Tensor) -> Tensor:
        return t.float() * self.timestep_scale

    def _t(self, t: Tensor, like: Tensor) -> Tensor:
        return append_dims(t.to(device=like.device, dtype=like.dtype), like.ndim)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        tt = self._t(t, x0)
        return (1.0 - tt) * x0 + tt * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise - x0

    def loss_weight(self, t: Tensor) -> Tensor:
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)

    def to_x0(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return x_t - self._t(t, x_t) * model_output

    def to_eps(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return x_t + (1.0 - self._t(t, x_t)) * model_output

    def sampling_sigmas(self, steps: int, shift: Optional[float] = None) -> Tensor:
        """``steps + 1`` decreasing float64 times from 1 to 0 for sampling.

        ``linspace(1, 0, steps + 1)`` passed through :func:`shift_time` with
        ``shift`` (default: the training shift), as in the SD3 / Flux reference
        samplers.
        """
        if steps < 1:
            raise ValueError(f"steps: got {steps!r}; expected an int >= 1")
        base = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        return shift_time(base, self.shift if shift is None else float(shift))


def build_process(cfg: DiffusionConfig) -> DiffusionProcess:
    """Build the process described by a validated :class:`DiffusionConfig`."""
    if cfg.kind == "discrete":
        schedule = NoiseSchedule.from_name(
            cfg.schedule,
            cfg.num_timesteps,
            beta_start=cfg.beta_start,
            beta_end=cfg.beta_end,
            zero_terminal_snr=cfg.zero_terminal_snr,
        )
        return DiscreteDiffusion(
            schedule,
            prediction=cfg.prediction,
            loss_weighting=cfg.loss_weighting,
            min_snr_gamma=cfg.min_snr_gamma,
            offset_noise=cfg.offset_noise,
            channel_dim=cfg.channel_dim,
        )
    return RectifiedFlow(
        timestep_sampling=cfg.flow_timestep_sampling,
        logit_mean=cfg.logit_mean,
        logit_std=cfg.logit_std,
        shift=cfg.flow_shift,
        timestep_scale=cfg.flow_timestep_scale,
        offset_noise=cfg.offset_noise,
        channel_dim=cfg.channel_dim,
    )
