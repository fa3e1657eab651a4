"""Samplers: timestep grids, single steps and trajectories against diffusers; clipping; determinism; oracles."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from torch import Tensor, nn

from training.diffusion import (
    SAMPLERS,
    DiscreteDiffusion,
    EDMDiffusion,
    NoiseSchedule,
    RectifiedFlow,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    discrete_timesteps,
    dpm_solver_2m_sample,
    dpm_solver_timesteps,
    euler_flow_sample,
    euler_flow_step,
    euler_karras_sample,
)

# diffusers' DPMSolverMultistepScheduler.set_timesteps trips a numpy-2 __array__ DeprecationWarning (not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

PREDICTIONS = ["epsilon", "v_prediction", "sample"]
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def sd_process(prediction="epsilon", zero_terminal_snr=False) -> DiscreteDiffusion:
    sched = NoiseSchedule.from_name("scaled_linear", 1000, zero_terminal_snr=zero_terminal_snr)
    return DiscreteDiffusion(sched, prediction=prediction)


def with_our_table(scheduler, process: DiscreteDiffusion):
    """Run diffusers on our float64 alphas_cumprod: with float64 inputs both sides then compute in float64,
    so a step can be compared at 1e-6 (in fact ~1e-12) and any difference is a difference in the algorithm."""
    scheduler.alphas_cumprod = process.schedule.alphas_cumprod.clone()
    return scheduler


def rand(shape, seed, dtype=torch.float64) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class ConvNet(nn.Module):
    """A small real denoiser (no conditioning) for trajectory comparisons."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        scale = 1.0 + t.to(x.dtype).reshape(-1, 1, 1, 1) / 1000.0
        return torch.tanh(self.conv(x)) * scale


# --------------------------------------------------------------------------------------------- registry


def test_registry_holds_every_sampler_with_its_process_and_one_calling_convention():
    assert {name: (spec.fn, spec.process) for name, spec in SAMPLERS.items()} == {
        "ddpm": (ddpm_sample, DiscreteDiffusion),
        "ddim": (ddim_sample, DiscreteDiffusion),
        "dpm_solver_2m": (dpm_solver_2m_sample, DiscreteDiffusion),
        "euler": (euler_flow_sample, RectifiedFlow),
        "euler_karras": (euler_karras_sample, EDMDiffusion),
    }
    assert SAMPLERS["ddim"].settings == ("eta", "clip_x0", "spacing", "steps_offset", "set_alpha_to_one")
    for name, spec in SAMPLERS.items():
        params = inspect.signature(spec.fn).parameters
        assert list(params)[:3] == ["denoise", "process", "noise"], name
        keyword_only = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
        assert keyword_only[:3] == ["steps", "generator", "callback"], name
        assert not {"cond", "null_cond", "guidance", "guidance_rescale"} & set(params), name  # guidance is a guider
        assert set(spec.settings) <= set(keyword_only), name


# --------------------------------------------------------------------------------------------- timestep grids


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 3, 10, 50, 333])
def test_discrete_timesteps_match_diffusers(spacing, steps):
    for cls in (DDPMScheduler, DDIMScheduler):
        ref = cls(timestep_spacing=spacing)
        ref.set_timesteps(steps)
        assert discrete_timesteps(1000, steps, spacing) == ref.timesteps.tolist()
    ref = DDIMScheduler(timestep_spacing="leading", steps_offset=1)
    ref.set_timesteps(steps)
    assert discrete_timesteps(1000, steps, "leading", steps_offset=1) == ref.timesteps.tolist()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 20, 25])
def test_dpm_solver_timesteps_match_diffusers(spacing, steps):
    ref = DPMSolverMultistepScheduler(timestep_spacing=spacing)
    ref.set_timesteps(steps)
    assert dpm_solver_timesteps(1000, steps, spacing) == ref.timesteps.tolist()


def test_timestep_argument_checks():
    with pytest.raises(ValueError, match="spacing"):
        discrete_timesteps(1000, 10, "uniform")
    with pytest.raises(ValueError, match="steps: got 0"):
        discrete_timesteps(1000, 0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        ddim_sample(lambda x, t: x, sd_process(), torch.zeros(1, 1), timesteps=[10, 20])
    with pytest.raises(TypeError, match="RectifiedFlow"):
        euler_flow_sample(lambda x, t: x, sd_process(), torch.zeros(1, 1))


# --------------------------------------------------------------------------------------------- single steps


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_ddim_step_matches_diffusers(prediction, spacing, clip):
    proc = sd_process(prediction)
    ref = with_our_table(
        DDIMScheduler(**SD, prediction_type=prediction, timestep_spacing=spacing, clip_sample=clip is not None),
        proc,
    )
    ref.set_timesteps(10)
    ts = discrete_timesteps(1000, 10, spacing)
    x, out, z = rand((2, 4, 8, 8), 0), 2 * rand((2, 4, 8, 8), 1), rand((2, 4, 8, 8), 2)
    for i, t in enumerate(ts):  # diffusers' DDIM steps to t - T // steps: the next grid point for these spacings
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        for eta in (0.0, 0.7):
            expected = ref.step(
                out, t, x, eta=eta, variance_noise=z if eta > 0 else None, use_clipped_model_output=True
            ).prev_sample
            got, x0 = ddim_step(proc, out, x, t, t_prev, eta=eta, noise=z, clip_x0=clip)
            assert (got - expected).abs().max() <= 1e-6, (t, eta)
            if clip is not None:
                assert x0.abs().max() <= clip


def test_ddim_step_float32_against_stock_diffusers():
    proc = sd_process("epsilon")
    ref = DDIMScheduler(**SD, clip_sample=False, timestep_spacing="trailing")
    ref.set_timesteps(10)
    ts = discrete_timesteps(1000, 10, "trailing")
    x, out, z = (rand((2, 4, 8, 8), seed, torch.float32) for seed in (0, 1, 2))
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        expected = ref.step(out, t, x, eta=0.5, variance_noise=z).prev_sample
        got, _ = ddim_step(proc, out, x, t, t_prev, eta=0.5, noise=z)
        # Stock diffusers holds alphas_cumprod and every coefficient in float32 (ours: float64, cast at the end).
        # At late steps x0 = (x - sigma eps) / alpha reaches |x0| ~ 15, so float32 rounding alone is ~2e-6.
        assert (got - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item()), t


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddpm_step_matches_diffusers(prediction, spacing):
    proc = sd_process(prediction)
    ref = with_our_table(
        DDPMScheduler(**SD, prediction_type=prediction, timestep_spacing=spacing, clip_sample=True), proc
    )
    ref.set_timesteps(10)
    ts = ref.timesteps.tolist()
    x, out = rand((2, 4, 8, 8), 3), rand((2, 4, 8, 8), 4)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        expected = ref.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        got, _ = ddpm_step(proc, out, x, t, t_prev, generator=torch.Generator().manual_seed(i), clip_x0=1.0)
        # (diffusers adds sqrt(1e-20) * noise on a final step that lands on t = -1; ours adds nothing)
        assert (got - expected).abs().max() <= 1e-6, t


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sigmas_and_euler_step_match_diffusers(shift):
    flow = RectifiedFlow(shift=shift)
    steps = 6
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1].tolist())  # diffusers shifts the given grid
    sigmas = flow.sampling_sigmas(steps)
    assert (sigmas - ref.sigmas.double()).abs().max() <= 1e-6
    assert (flow.model_timesteps(sigmas[:-1].float()) - ref.timesteps).abs().max() <= 1e-3  # 1000 x sigma
    x, v = rand((2, 4, 8, 8), 5, torch.float32), rand((2, 4, 8, 8), 6, torch.float32)
    for i, t in enumerate(ref.timesteps):
        expected = ref.step(v, t, x).prev_sample
        got = euler_flow_step(v, x, float(sigmas[i]), float(sigmas[i + 1]))
        assert (got - expected).abs().max() <= 1e-6


# --------------------------------------------------------------------------------------------- trajectories


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_dpm_solver_2m_trajectory_matches_diffusers(prediction, spacing):
    torch.manual_seed(0)
    net = ConvNet().double()
    proc = sd_process(prediction)
    steps = 8
    ref = DPMSolverMultistepScheduler(
        **SD, prediction_type=prediction, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing=spacing
    )
    ref.set_timesteps(steps)
    ts = ref.timesteps.tolist()
    assert ts == dpm_solver_timesteps(1000, steps, spacing)
    acp = proc.schedule.alphas_cumprod
    ref.sigmas = torch.cat([((1 - acp[ts]) / acp[ts]).sqrt(), torch.zeros(1, dtype=torch.float64)])  # float64 grid
    noise = rand((2, 4, 8, 8), 7)
    x = noise.clone()
    with torch.no_grad():
        for t in ref.timesteps:
            x = ref.step(net(x, t.expand(2)), t, x).prev_sample
    got = dpm_solver_2m_sample(net, proc, noise, steps=steps, spacing=spacing)
    # diffusers rounds the sample to float32 inside every step; the rest is float64 on both sides,
    # so the trajectories agree to float32 precision relative to the sample's magnitude.
    assert (got - x).abs().max() <= 1e-6 * max(1.0, x.abs().max().item())


def test_euler_flow_trajectory_matches_diffusers():
    torch.manual_seed(0)
    net = ConvNet()
    flow = RectifiedFlow(shift=3.0)
    steps = 5
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1].tolist())
    noise = rand((2, 4, 8, 8), 8, torch.float32)
    x = noise.clone()
    with torch.no_grad():
        for t in ref.timesteps:
            x = ref.step(net(x, t.expand(2)), t, x).prev_sample
    got = euler_flow_sample(net, flow, noise, steps=steps, flow_grid="linear")  # the grid given to diffusers
    assert (got - x).abs().max() <= 1e-5  # 5 steps of float32 rounding on each side


# --------------------------------------------------------------------------------------------- clipping


def test_x0_clipping_keeps_x0_in_range_and_consistent():
    proc = sd_process("epsilon")

    def wild(x: Tensor, t: Tensor, cond=None) -> Tensor:  # an eps model that is badly wrong
        return -3.0 * x + 2.0

    seen: list[Tensor] = []
    noise = rand((2, 3, 8, 8), 9, torch.float32)
    out = ddim_sample(wild, proc, noise, steps=10, clip_x0=1.0, callback=lambda i, t, x, x0: seen.append(x0))
    assert len(seen) == 10 and all(x0.abs().max() <= 1.0 for x0 in seen)
    assert torch.isfinite(out).all() and out.abs().max() <= 1.0 + 1e-5  # the last step lands on x0 itself
    # the (x0, eps) pair used by a clipped step reproduces x_t exactly
    t = 700
    x_t = rand((2, 3, 8, 8), 10)
    eps = wild(x_t, torch.tensor([t, t])).double()
    _, x0 = ddim_step(proc, eps, x_t, t, 600, clip_x0=1.0)
    re_eps = proc.eps_from_x0(x0, x_t, torch.tensor([t, t]))
    a = proc.schedule.alphas_cumprod[t]
    assert torch.allclose(a.sqrt() * x0 + (1 - a).sqrt() * re_eps, x_t, atol=1e-10)
    # clipping x0 but keeping the raw eps would not: the step would no longer follow the model's own x_t
    assert not torch.allclose(a.sqrt() * x0 + (1 - a).sqrt() * eps, x_t, atol=1e-3)
    for sampler in (ddpm_sample, dpm_solver_2m_sample):
        out = sampler(wild, proc, noise, steps=10, clip_x0=1.0)
        assert torch.isfinite(out).all() and out.abs().max() <= 1.0 + 1e-5


# --------------------------------------------------------------------------------------------- determinism / oracles


def test_stochastic_samplers_are_deterministic_given_a_generator():
    torch.manual_seed(0)
    net = ConvNet()
    proc = sd_process("v_prediction")
    noise = rand((2, 4, 8, 8), 11, torch.float32)

    def run(sampler, seed, **kw):
        torch.manual_seed(1234 + seed)  # the global RNG must not matter
        return sampler(net, proc, noise, steps=6, generator=torch.Generator().manual_seed(seed), **kw)

    for sampler, kw in ((ddpm_sample, {}), (ddim_sample, {"eta": 1.0})):
        a, b, c = run(sampler, 0, **kw), run(sampler, 0, **kw), run(sampler, 1, **kw)
        assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.equal(run(dpm_solver_2m_sample, 0), run(dpm_solver_2m_sample, 1))  # deterministic solver


def point_mass_oracle(process, c: float):
    """The exact model output when the data distribution is the single point x0 = c."""

    def denoiser(x: Tensor, t: Tensor, cond=None) -> Tensor:
        x0 = torch.full_like(x, c)
        if isinstance(process, RectifiedFlow):
            s = (t.to(torch.float64) / process.timestep_scale).to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
            return (x - x0) / s  # v = eps - x0 with eps = (x - (1 - s) x0) / s
        eps = process.eps_from_x0(x0, x, t)
        return process.target(x0, eps, t)

    return denoiser


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", [ddpm_sample, ddim_sample, dpm_solver_2m_sample], ids=["ddpm", "ddim", "dpm2m"])
def test_oracle_denoiser_recovers_the_data_point(sampler, prediction):
    proc = sd_process(prediction)
    noise = rand((2, 4, 8, 8), 12, torch.float32)
    steps = []
    out = sampler(
        point_mass_oracle(proc, 0.6),
        proc,
        noise,
        steps=8,
        generator=torch.Generator().manual_seed(0),
        callback=lambda i, t, x, x0: steps.append(t),
    )
    assert len(steps) == 8
    assert (out - 0.6).abs().max() <= 1e-4


def test_oracle_on_zero_terminal_snr_with_trailing_spacing():
    proc = sd_process("v_prediction", zero_terminal_snr=True)
    noise = rand((2, 4, 8, 8), 13, torch.float32)
    oracle = point_mass_oracle(proc, -0.3)
    for sampler in (ddim_sample, ddpm_sample, dpm_solver_2m_sample):
        g = torch.Generator().manual_seed(0)
        out = sampler(oracle, proc, noise, steps=6, spacing="trailing", generator=g)
        assert torch.isfinite(out).all() and (out + 0.3).abs().max() <= 1e-4


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_oracle_flow_recovers_the_data_point(shift):
    flow = RectifiedFlow(shift=shift)
    noise = rand((2, 4, 3, 8, 8), 14, torch.float32)  # video
    out = euler_flow_sample(point_mass_oracle(flow, 0.25), flow, noise, steps=4)
    assert (out - 0.25).abs().max() <= 1e-5
