"""Beta schedules and NoiseSchedule: against diffusers where it has the schedule, else by definition."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as hf_rescale

from training.diffusion import NoiseSchedule, make_betas, rescale_zero_terminal_snr
from training.diffusion.schedules import COSINE_MAX_BETA, SCHEDULE_NAMES

# (our name, diffusers name, beta_start, beta_end)
DIFFUSERS_SCHEDULES = [
    ("linear", "linear", 1e-4, 2e-2),
    ("linear", "linear", 5e-4, 1e-2),
    ("scaled_linear", "scaled_linear", 8.5e-4, 1.2e-2),
    ("scaled_linear", "scaled_linear", 1e-4, 2e-2),
    ("cosine", "squaredcos_cap_v2", 1e-4, 2e-2),
]


@pytest.mark.parametrize("ours,theirs,start,end", DIFFUSERS_SCHEDULES)
@pytest.mark.parametrize("steps", [1000, 250])
def test_alphas_cumprod_match_diffusers(ours, theirs, start, end, steps):
    ref = DDPMScheduler(num_train_timesteps=steps, beta_schedule=theirs, beta_start=start, beta_end=end)
    sched = NoiseSchedule.from_name(ours, steps, beta_start=start, beta_end=end)
    assert sched.alphas_cumprod.dtype == torch.float64
    # ours is float64 throughout; diffusers accumulates its cumprod in float32
    err = (sched.alphas_cumprod - ref.alphas_cumprod.double()).abs().max().item()
    assert err <= 1e-6, err


def test_default_beta_ranges_are_the_published_ones():
    sd = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert (make_betas("scaled_linear") - sd.betas.double()).abs().max() <= 1e-8
    ddpm = DDPMScheduler(beta_schedule="linear")
    assert (make_betas("linear") - ddpm.betas.double()).abs().max() <= 1e-8


@pytest.mark.parametrize("ours,theirs,start,end", DIFFUSERS_SCHEDULES[::2])
def test_zero_terminal_snr_matches_diffusers(ours, theirs, start, end):
    betas = make_betas(ours, 1000, start, end)
    rescaled = rescale_zero_terminal_snr(betas)
    # same algorithm on the same float64 input: identical up to rounding
    assert (rescaled - hf_rescale(betas.clone())).abs().max() <= 1e-12
    # and the scheduler built by diffusers in float32
    ref = DDPMScheduler(beta_schedule=theirs, beta_start=start, beta_end=end, rescale_betas_zero_snr=True)
    sched = NoiseSchedule(rescaled)
    assert (sched.alphas_cumprod - ref.alphas_cumprod.double()).abs().max() <= 1e-6
    # defining properties (Lin et al. 2023, Algorithm 1)
    assert sched.alphas_cumprod[-1] == 0 and rescaled[-1] == 1.0 and sched.zero_terminal_snr
    original = torch.cumprod(1 - betas, 0)
    assert math.isclose(sched.alphas_cumprod[0].item(), original[0].item(), rel_tol=1e-12)
    assert bool((sched.alphas_cumprod[1:] < sched.alphas_cumprod[:-1]).all())


def test_cosine_is_capped_and_follows_alpha_bar():
    betas = make_betas("cosine", 1000)
    assert betas.max().item() == pytest.approx(COSINE_MAX_BETA)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    acp = torch.cumprod(1 - betas, 0)
    for t in (0, 10, 500, 900):  # before the cap kicks in, alphas_cumprod[t] = f((t+1)/T) / f(0)
        assert acp[t].item() == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-9)


def test_quadratic_has_constant_second_difference():
    betas = make_betas("quadratic", 100, 1e-4, 2e-2)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(2e-2)
    second = betas[2:] - 2 * betas[1:-1] + betas[:-2]
    assert torch.allclose(second, second[0].expand_as(second), atol=1e-15)
    assert second[0] > 0
    assert not torch.allclose(betas, make_betas("scaled_linear", 100, 1e-4, 2e-2))


def test_geometric_has_constant_ratio():
    betas = make_betas("geometric", 100, 1e-4, 2e-2)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(2e-2)
    ratio = betas[1:] / betas[:-1]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-12)
    assert ratio[0].item() == pytest.approx((2e-2 / 1e-4) ** (1 / 99))


def test_constant_schedule():
    betas = make_betas("constant", 50, beta_end=0.01)
    assert bool((betas == 0.01).all())
    acp = NoiseSchedule(betas).alphas_cumprod
    assert torch.allclose(acp, 0.99 ** torch.arange(1, 51, dtype=torch.float64))


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_every_schedule_is_a_valid_noising_chain(name):
    sched = NoiseSchedule.from_name(name, 200)
    assert sched.num_timesteps == 200
    assert bool(((sched.betas > 0) & (sched.betas < 1)).all())
    acp = sched.alphas_cumprod
    assert bool((acp[1:] < acp[:-1]).all()) and 0 < acp[-1] < acp[0] < 1


def test_alpha_sigma_snr_helpers():
    sched = NoiseSchedule.from_name("linear", 1000)
    t = torch.tensor([0, 10, 999])
    alpha, sigma, snr = sched.alpha(t), sched.sigma(t), sched.snr(t)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(snr, alpha**2 / sigma**2)
    assert bool((snr[1:] < snr[:-1]).all())
    assert sched.alpha(5).item() == pytest.approx(sched.alphas_cumprod[5].sqrt().item())
    assert sched.table("alphas_cumprod", "cpu", torch.float32).dtype == torch.float32


def test_invalid_schedule_arguments():
    with pytest.raises(ValueError, match="schedule"):
        make_betas("sigmoidal", 100)
    with pytest.raises(ValueError, match="num_timesteps"):
        make_betas("linear", 1)
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule(torch.tensor([0.1, 0.0]))
