"""Discrete-time noise schedules for DDPM-style diffusion.

Every schedule here produces ``num_timesteps`` betas (the per-step noise
variances of the forward Markov chain) computed in float64.  The cumulative
product ``alphas_cumprod[t] = prod_{s<=t} (1 - beta_s)`` fixes the marginal
``q(x_t | x_0) = N(sqrt(alphas_cumprod[t]) x_0, (1 - alphas_cumprod[t]) I)``
(Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eq. 4).

Schedules:

* ``linear``        Ho et al. 2020: betas linearly spaced from beta_start to beta_end.
* ``scaled_linear`` Rombach et al. 2022 (Stable Diffusion): sqrt(beta) linearly spaced,
                    then squared.  (Ho et al.'s reference code calls this "quad".)
* ``cosine``        Nichol & Dhariwal 2021, "Improved DDPM", eq. 17:
                    alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2), s = 0.008, betas clipped
                    at 0.999.  Equivalent to diffusers' ``squaredcos_cap_v2``.
* ``quadratic``     betas quadratic in the step index: beta_start + (beta_end - beta_start) * u^2,
                    u = i / (T - 1).
* ``geometric``     log-spaced betas: constant ratio beta_{i+1} / beta_i.
* ``constant``      every beta equal to beta_end (Ho et al.'s reference "const" schedule).
* ``sigmoid``       betas following a sigmoid over [-6, 6]: beta_start + (beta_end - beta_start) * sigmoid(u),
                    u = -6 + 12 i / (T - 1) (GeoDiff, Xu et al. 2022; diffusers' ``beta_schedule="sigmoid"``).

:func:`rescale_zero_terminal_snr` implements Algorithm 1 of Lin et al. 2023,
"Common Diffusion Noise Schedules and Sample Steps are Flawed".
"""

from __future__ import annotations

import math
from typing import Literal, Optional, get_args

import torch
from torch import Tensor

ScheduleName = Literal["linear", "scaled_linear", "cosine", "quadratic", "geometric", "constant", "sigmoid"]
SCHEDULE_NAMES: tuple[str, ...] = get_args(ScheduleName)

#: Default (beta_start, beta_end) per schedule when the caller gives none.
#: ``scaled_linear`` uses the Stable Diffusion range; the others the DDPM range.
DEFAULT_BETA_RANGE: dict[str, tuple[float, float]] = {
    "linear": (1e-4, 2e-2),
    "scaled_linear": (8.5e-4, 1.2e-2),
    "cosine": (0.0, 0.0),  # unused: the cosine schedule is defined by alpha_bar
    "quadratic": (1e-4, 2e-2),
    "geometric": (1e-4, 2e-2),
    "constant": (2e-2, 2e-2),
    "sigmoid": (1e-4, 2e-2),
}

#: Beta cap of the cosine schedule (Nichol & Dhariwal 2021, section 3.2).
COSINE_MAX_BETA = 0.999
#: Offset ``s`` of the cosine schedule (Nichol & Dhariwal 2021, eq. 17).
COSINE_OFFSET = 0.008


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Linearly spaced betas (Ho et al. 2020, section 4)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Betas whose square roots are linearly spaced (Stable Diffusion, Rombach et al. 2022)."""
    root = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=torch.float64)
    return root * root


def cosine_betas(num_timesteps: int, offset: float = COSINE_OFFSET, max_beta: float = COSINE_MAX_BETA) -> Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021 ("Improved DDPM", eq. 17).

    ``beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta)`` with
    ``alpha_bar(u) = cos^2((u + s) / (1 + s) * pi / 2)``.
    """
    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((u + offset) / (1.0 + offset) * (math.pi / 2.0)) ** 2
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


def quadratic_betas(num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Betas growing quadratically with the step index, from beta_start to beta_end."""
    u = torch.linspace(0.0, 1.0, num_timesteps, dtype=torch.float64)
    return beta_start + (beta_end - beta_start) * u * u


def geometric_betas(num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Log-spaced (geometric) betas from beta_start to beta_end."""
    if beta_start <= 0.0:
        raise ValueError(f"geometric schedule needs beta_start > 0, got {beta_start}")
    log_b = torch.linspace(math.log(beta_start), math.log(beta_end), num_timesteps, dtype=torch.float64)
    return torch.exp(log_b)


def constant_betas(num_timesteps: int, beta: float) -> Tensor:
    """The same beta at every step."""
    return torch.full((num_timesteps,), float(beta), dtype=torch.float64)


def sigmoid_betas(num_timesteps: int, beta_start: float, beta_end: float, half_width: float = 6.0) -> Tensor:
    """Betas rising along a sigmoid: ``beta_start + (beta_end - beta_start) * sigmoid(u)`` with ``u`` linearly
    spaced over ``[-half_width, half_width]`` (GeoDiff, Xu et al. 2022, "GeoDiff: a Geometric Diffusion Model for
    Molecular Conformation Generation"; diffusers' ``DDPMScheduler`` ``sigmoid`` schedule, which spans [-6, 6])."""
    u = torch.linspace(-half_width, half_width, num_timesteps, dtype=torch.float64)
    return beta_start + (beta_end - beta_start) * torch.sigmoid(u)


def make_betas(
    name: str,
    num_timesteps: int = 1000,
    beta_start: Optional[float] = None,
    beta_end: Optional[float] = None,
) -> Tensor:
    """Return float64 betas of schedule ``name`` (one of :data:`SCHEDULE_NAMES`).

    ``beta_start`` / ``beta_end`` default to :data:`DEFAULT_BETA_RANGE`; they are
    ignored by ``cosine``, and ``constant`` uses ``beta_end``.
    """
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"schedule must be one of {SCHEDULE_NAMES}, got {name!r}")
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    default_start, default_end = DEFAULT_BETA_RANGE[name]
    start = default_start if beta_start is None else float(beta_start)
    end = default_end if beta_end is None else float(beta_end)
    if name == "linear":
        return linear_betas(num_timesteps, start, end)
    if name == "scaled_linear":
        return scaled_linear_betas(num_timesteps, start, end)
    if name == "cosine":
        return cosine_betas(num_timesteps)
    if name == "quadratic":
        return quadratic_betas(num_timesteps, start, end)
    if name == "geometric":
        return geometric_betas(num_timesteps, start, end)
    if name == "sigmoid":
        return sigmoid_betas(num_timesteps, start, end)
    return constant_betas(num_timesteps, end)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so that the last step has exactly zero SNR.

    Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", Algorithm 1: shift ``sqrt(alpha_bar)`` so its last value is 0, then
    scale it so its first value is unchanged, and convert back to betas.  The
    result has ``betas[-1] == 1`` and ``alphas_cumprod[-1] == 0``.  Computed in
    float64 whatever the input dtype; returned in float64.
    """
    betas = betas.to(torch.float64)
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alpha_bar = root * root
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


class NoiseSchedule:
    """Betas and cumulative alphas of a discrete diffusion process.

    The tables are computed and kept in float64 (``betas``, ``alphas``,
    ``alphas_cumprod``); :meth:`table` returns a cached copy in another dtype /
    device.  Helpers follow the variance-preserving notation of Kingma et al.
    2021 ("Variational Diffusion Models"): ``alpha_t = sqrt(alphas_cumprod)``,
    ``sigma_t = sqrt(1 - alphas_cumprod)`` and ``snr = alpha_t^2 / sigma_t^2``.
    """

    def __init__(self, betas: Tensor) -> None:
        betas = torch.as_tensor(betas).detach().to(device="cpu", dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D tensor with >= 2 entries, got shape {tuple(betas.shape)}")
        if bool((betas <= 0).any()) or bool((betas > 1).any()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.name: Optional[str] = None  # the schedule's name when built by name (samplers mirror diffusers by it)
        self._cache: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    @classmethod
    def from_name(
        cls,
        name: str = "scaled_linear",
        num_timesteps: int = 1000,
        beta_start: Optional[float] = None,
        beta_end: Optional[float] = None,
        zero_terminal_snr: bool = False,
    ) -> "NoiseSchedule":
        """Build a schedule by name, optionally rescaled to zero terminal SNR."""
        betas = make_betas(name, num_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        schedule = cls(betas)
        schedule.name = name
        return schedule

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor) -> "NoiseSchedule":
        """A schedule with exactly these (float64, strictly decreasing, in [0, 1)) cumulative alphas."""
        acp = torch.as_tensor(alphas_cumprod).detach().to(device="cpu", dtype=torch.float64)
        if acp.ndim != 1 or acp.numel() < 2 or bool((acp[1:] >= acp[:-1]).any()) or not 0.0 < float(acp[0]) < 1.0:
            raise ValueError("alphas_cumprod must be a strictly decreasing 1-D tensor in [0, 1) with >= 2 entries")
        betas = 1.0 - torch.cat([acp[:1], acp[1:] / acp[:-1]])
        schedule = cls(betas)
        schedule.alphas_cumprod = acp.clone()  # exact values, not re-accumulated from the betas
        return schedule

    def shift_snr(self, scale: float) -> "NoiseSchedule":
        """The schedule whose SNR is ``scale`` times this one's at every step: ``SNR'(t) = scale * SNR(t)``.

        With ``a = alphas_cumprod[t]`` and ``SNR = a / (1 - a)`` this is ``a' = scale * a / (scale * a + 1 - a)``.
        ``scale = base / size`` is the shifted schedule of Hoogeboom et al. 2023 ("simple diffusion", section 3.1:
        ``log SNR'(t) = log SNR(t) + 2 log(base_side / side)``) and of Chen 2023 ("On the importance of noise
        scheduling for diffusion models", input scaling ``b``: ``SNR' = b^2 SNR``). ``scale = 1`` returns ``self``;
        a zero-SNR last step stays at zero SNR.
        """
        if not scale > 0.0 or not math.isfinite(scale):
            raise ValueError(f"scale: got {scale!r}; expected a finite float > 0")
        if scale == 1.0:
            return self
        a = self.alphas_cumprod
        return NoiseSchedule.from_alphas_cumprod(scale * a / (scale * a + (1.0 - a)))

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.numel())

    @property
    def zero_terminal_snr(self) -> bool:
        """True when the last step carries no signal at all."""
        return bool(self.alphas_cumprod[-1] == 0)

    def table(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> Tensor:
        """Cached copy of ``betas`` / ``alphas`` / ``alphas_cumprod`` on a device and dtype."""
        device = torch.device(device)
        if device.type == "mps" and dtype == torch.float64:
            dtype = torch.float32  # MPS has no float64
        key = (name, device, dtype)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(device=device, dtype=dtype)
        return self._cache[key]

    def alphas_cumprod_at(self, t: Tensor | int, device: torch.device | str | None = None) -> Tensor:
        """``alphas_cumprod[t]`` in float64, on ``device`` (default: ``t``'s device)."""
        if not isinstance(t, Tensor):
            t = torch.tensor(t, dtype=torch.long)
        device = t.device if device is None else torch.device(device)
        return self.table("alphas_cumprod", device)[t.to(device=device, dtype=torch.long)]

    def alpha(self, t: Tensor | int, device: torch.device | str | None = None) -> Tensor:
        """Signal scale ``sqrt(alphas_cumprod[t])`` (float64)."""
        return self.alphas_cumprod_at(t, device).sqrt()

    def sigma(self, t: Tensor | int, device: torch.device | str | None = None) -> Tensor:
        """Noise scale ``sqrt(1 - alphas_cumprod[t])`` (float64)."""
        return (1.0 - self.alphas_cumprod_at(t, device)).sqrt()

    def snr(self, t: Tensor | int, device: torch.device | str | None = None) -> Tensor:
        """Signal-to-noise ratio ``alphas_cumprod / (1 - alphas_cumprod)`` (float64)."""
        a = self.alphas_cumprod_at(t, device)
        return a / (1.0 - a)

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(num_timesteps={self.num_timesteps}, "
            f"alphas_cumprod[0]={self.alphas_cumprod[0].item():.6g}, "
            f"alphas_cumprod[-1]={self.alphas_cumprod[-1].item():.6g})"
        )
