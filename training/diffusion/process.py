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
* Hoogeboom et al. 2023, "simple diffusion: End-to-end diffusion for high resolution images"
  (shifted noise schedule, section 3.1); Chen 2023, "On the importance of noise scheduling
  for diffusion models" (the same shift as input scaling).
* Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
  (EDM: continuous sigma, preconditioning of Table 1, Karras sigmas eq. 5).
* Blattmann et al. 2023, "Stable Video Diffusion" (EDM preconditioning with v-prediction,
  c_noise = 0.25 ln sigma, sigma_max = 700 at sampling).

Token-count shift
-----------------
More latent tokens (frames x height x width) carry more redundant signal, so a given noise
level destroys less of the content: the schedule must put more noise on large samples. With
``n`` latent tokens of a sample and a base count ``n0`` every process here can scale its SNR
by ``n0 / n`` at every noise level (:meth:`DiffusionProcess.for_shape`)::

    SNR'(t) = SNR(t) * n0 / n            (log SNR shifted by log(n0 / n))

For square images this is Hoogeboom et al.'s ``log SNR + 2 log(base / size)``; for rectified flow
(SNR = ((1 - t) / t)^2) it is exactly SD3's time shift ``t' = a t / (1 + (a - 1) t)`` with
``a = sqrt(n / n0)`` (section 5.3.2), applied on top of ``flow_shift``; for the DDPM chain it is
``alphas_cumprod' = r a / (r a + 1 - a)`` with ``r = n0 / n`` (:meth:`NoiseSchedule.shift_snr`);
for EDM it is ``sigma' = sqrt(n / n0) sigma``. A clip's tokens are ``T' h w`` (every axis but
batch and channel), an image's ``h w``. At ``n = n0`` nothing changes.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional, Sequence, get_args

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


def token_count(shape: Sequence[int], channel_dim: int = 1) -> int:
    """Latent tokens of one sample of a batch ``shape``: the product of every axis but batch (0) and channel.

    ``(B, C, h, w)`` has ``h w`` tokens, a clip ``(B, C, T', h, w)`` (or ``(B, T', C, h, w)`` with
    ``channel_dim=2``) ``T' h w``. Latent positions, not patches: a patch size only rescales both counts of the
    token shift alike.
    """
    shape = tuple(int(d) for d in shape)
    if not 1 <= channel_dim < len(shape) or len(shape) < 3:
        raise ValueError(f"shape {shape}: expected (B, C, ...) with channel_dim={channel_dim} and >= 1 token axis")
    return math.prod(d for i, d in enumerate(shape) if i not in (0, channel_dim))


def token_shift(num_tokens: int, base_tokens: int) -> float:
    """The token-count shift ``a = sqrt(n / n0)``: noise scales (sigma, flow time odds) are multiplied by ``a``,
    the SNR by ``1 / a^2 = n0 / n`` (SD3 section 5.3.2; Hoogeboom et al. 2023 section 3.1)."""
    if num_tokens <= 0 or base_tokens <= 0:
        raise ValueError(f"token counts must be > 0, got {num_tokens} and {base_tokens}")
    return math.sqrt(num_tokens / base_tokens)


class DiffusionProcess(ABC):
    """Common interface of the forward processes.

    Args:
        offset_noise: strength of Guttenberg's offset noise; 0 disables it.
        channel_dim: the channel axis of data tensors (1 for ``(B, C, H, W)`` and
            ``(B, C, T, H, W)``, 2 for ``(B, T, C, H, W)``).
        token_shift_base: the token count ``n0`` of the token-count shift (module docstring); None: no shift,
            every sample size uses the process as configured.
    """

    def __init__(self, offset_noise: float = 0.0, channel_dim: int = 1, token_shift_base: Optional[int] = None) -> None:
        if offset_noise < 0:
            raise ValueError(f"offset_noise: got {offset_noise!r}; expected a float >= 0")
        if channel_dim < 1:
            raise ValueError(f"channel_dim: got {channel_dim!r}; expected an int >= 1 (dim 0 is the batch)")
        if token_shift_base is not None and token_shift_base < 1:
            raise ValueError(f"token_shift_base: got {token_shift_base!r}; expected None or an int >= 1")
        self.offset_noise = float(offset_noise)
        self.channel_dim = int(channel_dim)
        self.token_shift_base = None if token_shift_base is None else int(token_shift_base)

    # ------------------------------------------------------------------ token-count shift
    def shift_for(self, shape: Sequence[int]) -> float:
        """The token shift ``a = sqrt(n / n0)`` for samples of batch ``shape`` (1.0 when the shift is off)."""
        if self.token_shift_base is None:
            return 1.0
        return token_shift(token_count(shape, self.channel_dim), self.token_shift_base)

    def for_shape(self, shape: Sequence[int]) -> "DiffusionProcess":
        """This process as it applies to samples of batch ``shape``: ``self`` without a token shift, otherwise a
        copy with the shift for ``shape`` built in (and no further shift). Training (:meth:`training_loss_terms`)
        and every sampler go through it, so both see the same noise levels for the same shape."""
        if self.token_shift_base is None:
            return self
        alpha = self.shift_for(shape)
        resolved = copy.copy(self)
        resolved.token_shift_base = None
        resolved._apply_shift(alpha)
        return resolved

    @abstractmethod
    def _apply_shift(self, alpha: float) -> None:
        """Build the shift ``alpha`` (noise scales times ``alpha``, SNR over ``alpha^2``) into this (copied) process."""

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
        The noise is drawn before the timesteps, both from ``generator``. With a token shift the terms come
        from :meth:`for_shape` ``(x0.shape)`` (a given ``t`` is used as is).
        """
        if noise is None:
            noise = self.sample_noise(x0, generator)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} does not match x0 shape {tuple(x0.shape)}")
        proc = self.for_shape(x0.shape)  # self unless a token shift is configured
        if t is None:
            t = proc.sample_timesteps(x0.shape[0], generator, x0.device)
        t = t.to(x0.device)
        return LossTerms(
            x_t=proc.add_noise(x0, noise, t),
            timesteps=proc.model_timesteps(t),
            target=proc.target(x0, noise, t),
            weight=proc.loss_weight(t),
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


class VariancePreserving:
    """Conversions of a model output for a process whose model input is ``x_t = alpha x0 + sigma eps`` with
    ``alpha^2 + sigma^2 = 1`` (DDPM's; EDM's ``c_in x_sigma`` is one too, with alpha = c_in and sigma = sigma c_in,
    which is how EDM's ``D = c_skip x_sigma + c_out F`` reads in these terms). ``_coefs(t, like)`` gives
    ``(alpha, sigma)`` shaped to broadcast over ``like``."""

    prediction: str
    _coefs: Any

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


class DiscreteDiffusion(VariancePreserving, DiffusionProcess):
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

    With ``token_shift_base`` the schedule of a sample shape is :meth:`NoiseSchedule.shift_snr` by ``n0 / n``
    (module docstring); the methods that see a data tensor (``add_noise``, ``target``, ``to_x0``, ``to_eps`` ...)
    apply it from that tensor's shape, and :meth:`for_shape` gives the process with the shifted table (the samplers
    and the loss weights use it). The denoiser still sees the step index.
    """

    def __init__(
        self,
        schedule: Optional[NoiseSchedule] = None,
        prediction: str = "epsilon",
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        offset_noise: float = 0.0,
        channel_dim: int = 1,
        token_shift_base: Optional[int] = None,
    ) -> None:
        super().__init__(offset_noise=offset_noise, channel_dim=channel_dim, token_shift_base=token_shift_base)
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

    def _apply_shift(self, alpha: float) -> None:
        self.schedule = self.schedule.shift_snr(1.0 / (alpha * alpha))

    def schedule_for(self, shape: Sequence[int]) -> NoiseSchedule:
        """The noise schedule of samples of batch ``shape`` (the token-shifted one when a shift is configured)."""
        if self.token_shift_base is None:
            return self.schedule
        cache = self.__dict__.setdefault("_shifted", {})
        n = token_count(shape, self.channel_dim)
        if n not in cache:
            alpha = token_shift(n, self.token_shift_base)
            cache[n] = self.schedule.shift_snr(1.0 / (alpha * alpha))
        return cache[n]

    def _coefs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha_t, sigma_t)`` as ``(B, 1, ..., 1)`` tensors in ``like``'s dtype."""
        a = self.schedule_for(like.shape).alphas_cumprod_at(t, like.device)
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

    With ``token_shift_base`` the shift of a sample shape is ``shift * sqrt(n / n0)`` (SD3 section 5.3.2 with
    latent tokens ``n = T' h w`` for ``m``); :meth:`for_shape` builds it in, for training times and sampling grids.
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
        token_shift_base: Optional[int] = None,
    ) -> None:
        super().__init__(offset_noise=offset_noise, channel_dim=channel_dim, token_shift_base=token_shift_base)
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

    def _apply_shift(self, alpha: float) -> None:
        self.shift = self.shift * alpha  # shift_time composes multiplicatively: SNR over shift^2 * alpha^2

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


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """The ``steps`` decreasing float64 noise levels of Karras et al. 2022, eq. 5 (no final 0)::

        sigma_i = (sigma_max^(1/rho) + i / (steps - 1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho

    ``steps = 1`` gives ``[sigma_max]``. The grid of diffusers' ``use_karras_sigmas=True`` (which takes
    ``sigma_min`` / ``sigma_max`` from the scheduler config when set, as SVD's does).
    """
    if steps < 1:
        raise ValueError(f"steps: got {steps!r}; expected an int >= 1")
    if not 0.0 < sigma_min < sigma_max:
        raise ValueError(f"sigma range: got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}; expected 0 < min < max")
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


class EDMDiffusion(VariancePreserving, DiffusionProcess):
    """Continuous-sigma diffusion with EDM preconditioning (Karras et al. 2022), as Stable Video Diffusion trains.

    The data are noised as ``x_sigma = x0 + sigma eps`` for a continuous ``sigma > 0`` (the process time ``t`` is
    sigma itself), and the network ``F`` is preconditioned as in EDM Table 1 with ``sigma_data = 1`` (SVD's
    ``VScalingWithEDMcNoise``, diffusers' ``EulerDiscreteScheduler``)::

        D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)
        c_in = 1 / sqrt(sigma^2 + 1),  c_noise = ln(sigma) / 4
        v_prediction:  c_skip = 1 / (sigma^2 + 1),  c_out = -sigma / sqrt(sigma^2 + 1)
        epsilon:       c_skip = 1,                  c_out = -sigma
        sample:        c_skip = 0,                  c_out = 1

    The denoiser's input ``x_t`` (:attr:`LossTerms.x_t`, and the ``x_t`` every method here takes) is the scaled
    ``c_in x_sigma = alpha x0 + s eps`` with ``alpha = 1 / sqrt(sigma^2 + 1)`` and ``s = sigma alpha``: a
    variance-preserving sample of SNR ``1 / sigma^2``, so ``v = alpha eps - s x0`` is Salimans & Ho's velocity.
    The denoiser sees ``c_noise``. The loss is the plain MSE of ``F`` against its target, which is EDM's loss with
    its weight ``lambda(sigma) = 1 / c_out^2`` (section 5). Training sigmas are log-normal,
    ``ln sigma ~ N(p_mean, p_std^2)`` (EDM Table 1); sampling uses :func:`karras_sigmas` over
    ``[sigma_min, sigma_max]`` (SVD: 0.002 and 700, far beyond the ~14.6 a 1000-step DDPM grid reaches).

    With ``token_shift_base`` every sigma (training and sampling) is multiplied by ``sqrt(n / n0)``
    (module docstring).
    """

    def __init__(
        self,
        prediction: str = "v_prediction",
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 700.0,
        rho: float = 7.0,
        offset_noise: float = 0.0,
        channel_dim: int = 1,
        token_shift_base: Optional[int] = None,
    ) -> None:
        super().__init__(offset_noise=offset_noise, channel_dim=channel_dim, token_shift_base=token_shift_base)
        _check_choice("prediction", prediction, PREDICTION_TYPES)
        if p_std <= 0:
            raise ValueError(f"p_std: got {p_std!r}; expected a float > 0")
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"sigma_min, sigma_max: got {sigma_min!r}, {sigma_max!r}; expected 0 < min < max")
        if rho <= 0:
            raise ValueError(f"rho: got {rho!r}; expected a float > 0")
        self.prediction = prediction
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.rho = float(rho)

    def _apply_shift(self, alpha: float) -> None:
        self.p_mean = self.p_mean + math.log(alpha)
        self.sigma_min = self.sigma_min * alpha
        self.sigma_max = self.sigma_max * alpha

    def sample_timesteps(
        self, batch_size: int, generator: Optional[torch.Generator] = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Float32 log-normal sigmas ``exp(p_mean + p_std n)``, ``n ~ N(0, 1)`` (EDM Table 1, training)."""
        device = torch.device(device)
        n = torch.randn((batch_size,), generator=generator, device=rand_device(generator, device))
        return torch.exp(self.p_mean + self.p_std * n).to(device)

    def model_timesteps(self, t: Tensor) -> Tensor:
        """``c_noise = ln(sigma) / 4`` (EDM Table 1; SVD / diffusers' ``timestep_type="continuous"``)."""
        return 0.25 * t.double().log().float()

    def c_in(self, sigma: Tensor | float) -> Tensor | float:
        """Input scale ``1 / sqrt(sigma^2 + 1)`` (``sigma_data = 1``)."""
        return 1.0 / (sigma * sigma + 1.0) ** 0.5

    def _coefs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha, s) = (1, sigma) / sqrt(sigma^2 + 1)`` as ``(B, 1, ..., 1)`` tensors in ``like``'s dtype."""
        alpha, s = self.alpha_sigma(t, like.device)
        return append_dims(alpha, like.ndim).to(like.dtype), append_dims(s, like.ndim).to(like.dtype)

    def alpha_sigma(self, t: Tensor, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """Float64 ``(alpha, s)`` of the variance-preserving view for sigmas ``t``."""
        sigma = t.to(device=t.device if device is None else device, dtype=torch.float64)
        alpha = 1.0 / (sigma * sigma + 1.0).sqrt()
        return alpha, sigma * alpha

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The denoiser's input ``c_in (x0 + sigma eps)``."""
        alpha, s = self._coefs(t, x0)
        return alpha * x0 + s * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``F``'s target ``(x0 - c_skip x_sigma) / c_out``: eps, ``v = alpha eps - s x0``, or x0."""
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "v_prediction":
            alpha, s = self._coefs(t, x0)
            return alpha * noise - s * x0
        return x0

    def snr(self, t: Tensor) -> Tensor:
        """``1 / sigma^2`` in float64."""
        return 1.0 / t.to(torch.float64).square()

    def loss_weight(self, t: Tensor) -> Tensor:
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)

    def sampling_sigmas(self, steps: int) -> Tensor:
        """``steps + 1`` decreasing float64 sigmas: :func:`karras_sigmas` over ``[sigma_min, sigma_max]``, then 0."""
        return torch.cat([karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho),
                          torch.zeros(1, dtype=torch.float64)])


def build_process(cfg: DiffusionConfig) -> DiffusionProcess:
    """Build the process described by a validated :class:`DiffusionConfig`."""
    shift_base = cfg.token_shift_base if cfg.token_shift else None
    if cfg.kind == "edm":
        return EDMDiffusion(
            prediction=cfg.prediction,
            p_mean=cfg.edm_p_mean,
            p_std=cfg.edm_p_std,
            sigma_min=cfg.edm_sigma_min,
            sigma_max=cfg.edm_sigma_max,
            rho=cfg.edm_rho,
            offset_noise=cfg.offset_noise,
            channel_dim=cfg.channel_dim,
            token_shift_base=shift_base,
        )
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
            token_shift_base=shift_base,
        )
    return RectifiedFlow(
        timestep_sampling=cfg.flow_timestep_sampling,
        logit_mean=cfg.logit_mean,
        logit_std=cfg.logit_std,
        shift=cfg.flow_shift,
        timestep_scale=cfg.flow_timestep_scale,
        offset_noise=cfg.offset_noise,
        channel_dim=cfg.channel_dim,
        token_shift_base=shift_base,
    )
