"""Configuration dataclasses for the diffusion process.

Plain ``@dataclass`` objects whose fields use only int / float / bool / str /
Optional / Literal / tuple / list / nested dataclasses, so they round-trip
through YAML / JSON / CLI overrides.  ``__post_init__`` validates every field
and raises ``ValueError`` naming the field, the bad value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from training.config_io import check_field_types

from .schedules import ScheduleName

ProcessKind = Literal["discrete", "flow", "edm"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
LossWeighting = Literal["uniform", "min_snr"]
FlowTimestepSampling = Literal["uniform", "logit_normal"]


def _bad(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{name}: got {value!r}; expected {allowed}")


@dataclass
class DiffusionConfig:
    """Everything needed to build a :class:`~training.diffusion.process.DiffusionProcess`.

    ``kind="discrete"`` builds a DDPM-style :class:`DiscreteDiffusion` from
    ``schedule`` / ``num_timesteps`` / ``beta_start`` / ``beta_end`` /
    ``zero_terminal_snr`` / ``prediction`` / ``loss_weighting`` / ``min_snr_gamma``.
    ``kind="flow"`` builds a :class:`RectifiedFlow` from the ``flow_*`` /
    ``logit_*`` fields; a flow model always predicts the velocity, so the
    discrete-only fields (``schedule`` ... ``min_snr_gamma``) are ignored there,
    except that ``loss_weighting`` must stay ``"uniform"``.
    ``kind="edm"`` builds an :class:`EDMDiffusion` (continuous sigma with EDM preconditioning, as Stable Video
    Diffusion: set ``prediction="v_prediction"``) from ``prediction`` and the ``edm_*`` fields; its loss is
    EDM's weighting, so ``loss_weighting`` must stay ``"uniform"`` there too.
    ``offset_noise``, ``channel_dim`` and the token shift (``token_shift``, ``token_shift_base``) apply to all;
    the token shift is off by default (image runs keep their numbers).
    """

    kind: ProcessKind = "discrete"  # "discrete" (DDPM-style), "flow" (rectified flow) or "edm" (EDM / SVD sigma)
    # --- discrete (DDPM) process -------------------------------------------------
    schedule: ScheduleName = "scaled_linear"  # beta schedule (schedules.SCHEDULE_NAMES)
    num_timesteps: int = 1000  # training steps T of the discrete chain
    beta_start: Optional[float] = None  # first beta; None: the schedule default (schedules.DEFAULT_BETA_RANGE)
    beta_end: Optional[float] = None  # last beta; None: the schedule default
    zero_terminal_snr: bool = False  # rescale betas so the last step has SNR 0 (Lin et al. 2023)
    prediction: PredictionType = "epsilon"  # what the denoiser predicts: epsilon, v_prediction or sample (x0)
    loss_weighting: LossWeighting = "uniform"  # per-sample loss weight: uniform or min_snr (Hang et al. 2023)
    min_snr_gamma: float = 5.0  # gamma of min-SNR weighting
    # --- both ----------------------------------------------------------------------
    offset_noise: float = 0.0  # offset-noise strength (Guttenberg 2023); 0 disables it
    channel_dim: int = 1  # channel axis of the data: 1 for (B,C,H,W) / (B,C,T,H,W), 2 for (B,T,C,H,W)
    token_shift: bool = False  # SNR × token_shift_base / (T'·h·w latent tokens) (SD3 §5.3.2; simple diffusion)
    token_shift_base: int = 1024  # latent token count at which the shift is 1 (SD3's 256² px = 32×32 latents at f=8)
    # --- flow matching -------------------------------------------------------------
    flow_timestep_sampling: FlowTimestepSampling = "logit_normal"  # training-time density (SD3 section 3.1)
    logit_mean: float = 0.0  # mean of the logit-normal time density
    logit_std: float = 1.0  # std of the logit-normal time density
    flow_shift: float = 1.0  # time shift t -> s t / (1 + (s - 1) t) (SD3); 1 = none
    flow_timestep_scale: float = 1000.0  # the denoiser sees t * scale (diffusers SD3/Flux: 1000)
    # --- EDM (continuous sigma; Karras et al. 2022, Stable Video Diffusion) -----------
    edm_p_mean: float = -1.2  # mean of ln(sigma) at training (EDM Table 1)
    edm_p_std: float = 1.2  # std of ln(sigma) at training (EDM Table 1)
    edm_sigma_min: float = 0.002  # smallest sampling sigma (EDM; SVD)
    edm_sigma_max: float = 700.0  # largest sampling sigma (SVD's scheduler config; EDM's images: 80)
    edm_rho: float = 7.0  # Karras sigma spacing exponent (EDM eq. 5)

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.num_timesteps < 2:
            raise _bad("num_timesteps", self.num_timesteps, "an int >= 2")
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise _bad(name, value, "None or a float in (0, 1)")
        if self.beta_start is not None and self.beta_end is not None and self.beta_start > self.beta_end:
            raise _bad("beta_start", self.beta_start, f"a value <= beta_end ({self.beta_end})")
        if self.min_snr_gamma <= 0.0:
            raise _bad("min_snr_gamma", self.min_snr_gamma, "a float > 0")
        if self.offset_noise < 0.0:
            raise _bad("offset_noise", self.offset_noise, "a float >= 0 (0 disables offset noise)")
        if self.channel_dim < 1:
            raise _bad("channel_dim", self.channel_dim, "an int >= 1 (dim 0 is the batch)")
        if self.logit_std <= 0.0:
            raise _bad("logit_std", self.logit_std, "a float > 0")
        if self.flow_shift <= 0.0:
            raise _bad("flow_shift", self.flow_shift, "a float > 0 (1.0 = no shift)")
        if self.flow_timestep_scale <= 0.0:
            raise _bad("flow_timestep_scale", self.flow_timestep_scale, "a float > 0")
        if self.kind == "discrete" and self.zero_terminal_snr and self.prediction == "epsilon":
            # Lin et al. 2023, section 3.2: at zero SNR an epsilon model cannot recover x0.
            raise _bad(
                "prediction",
                self.prediction,
                "'v_prediction' or 'sample' when zero_terminal_snr=True (epsilon is undefined at SNR 0)",
            )
        if self.kind in ("flow", "edm") and self.loss_weighting != "uniform":
            raise _bad("loss_weighting", self.loss_weighting, f"'uniform' for kind={self.kind!r}")
        if self.token_shift_base < 1:
            raise _bad("token_shift_base", self.token_shift_base, "an int >= 1 (latent tokens T'·h·w at shift 1)")
        if self.edm_p_std <= 0.0:
            raise _bad("edm_p_std", self.edm_p_std, "a float > 0")
        if not 0.0 < self.edm_sigma_min < self.edm_sigma_max:
            raise _bad("edm_sigma_min", self.edm_sigma_min, f"a float in (0, edm_sigma_max={self.edm_sigma_max})")
        if self.edm_rho <= 0.0:
            raise _bad("edm_rho", self.edm_rho, "a float > 0")
