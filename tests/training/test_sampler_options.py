"""Sampler options as checkpoints ship them (issue 14, point 6), each against diffusers' own schedulers / pipeline:
DDIM ``set_alpha_to_one`` / ``steps_offset`` / spacing, ``guidance_rescale`` through ``SamplingConfig``, Karras
sigmas for DPM-Solver++ and flow Euler, the ``sigmoid`` schedule, DPM-Solver's alphas_cumprod floor only where
diffusers puts it, and the flow-Euler default grid equal to SD3's ``FlowMatchEulerDiscreteScheduler``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from torch import Tensor, nn

from models.conditioning import Conditioning
from training.diffusion import (
    ClassifierFreeGuidance,
    DiscreteDiffusion,
    NoiseSchedule,
    RectifiedFlow,
    ddim_sample,
    ddpm_sample,
    dpm_solver_2m_sample,
    euler_flow_sample,
    flow_sigmas,
    karras_discrete_grid,
    make_betas,
    rescale_guidance,
)
from training.sampling import SamplingConfig, sample_latents

# diffusers' DPMSolverMultistepScheduler.set_timesteps trips a numpy-2 __array__ DeprecationWarning (not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
#: Stable Diffusion 1.x / 2.x ship this DDIM config (scheduler/scheduler_config.json)
SD_DDIM = dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def rand(shape, seed, dtype=torch.float64) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class ConvNet(nn.Module):
    """A small real denoiser (no conditioning)."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        scale = 1.0 + t.to(x.dtype).reshape(-1, 1, 1, 1) / 1000.0
        return torch.tanh(self.conv(x)) * scale


def run_diffusers(scheduler, net: nn.Module, noise: Tensor, **step_kwargs) -> Tensor:
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(net(x, t.expand(x.shape[0])), t, x, **step_kwargs).prev_sample
    return x


def process(schedule: str = "scaled_linear", prediction: str = "epsilon", zero_terminal_snr: bool = False,
            **betas) -> DiscreteDiffusion:
    return DiscreteDiffusion(NoiseSchedule.from_name(schedule, 1000, zero_terminal_snr=zero_terminal_snr, **betas),
                             prediction=prediction)


# ------------------------------------------------------------------------------------------------ schedules


def test_sigmoid_schedule_matches_diffusers():
    for start, end in ((1e-4, 2e-2), (8.5e-4, 1.2e-2)):
        ref = DDPMScheduler(beta_schedule="sigmoid", beta_start=start, beta_end=end)
        ours = make_betas("sigmoid", 1000, start, end)
        assert (ours - ref.betas.double()).abs().max() <= 1e-8  # diffusers: float32
        sched = NoiseSchedule.from_name("sigmoid", 1000, start, end)
        assert (sched.alphas_cumprod - ref.alphas_cumprod.double()).abs().max() <= 1e-6
    assert torch.equal(make_betas("sigmoid", 1000), make_betas("sigmoid", 1000, 1e-4, 2e-2))  # DDPM's default range


# ------------------------------------------------------------------------------------------------ DDIM


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_as_stable_diffusion_ships_it(prediction):
    """SD's DDIM config: leading spacing, steps_offset=1, set_alpha_to_one=False: the whole trajectory agrees."""
    proc = process(prediction=prediction)
    net = ConvNet().double()
    noise = rand((2, 4, 8, 8), 0)
    ref = DDIMScheduler(**SD_DDIM, prediction_type=prediction)
    ref.alphas_cumprod = proc.schedule.alphas_cumprod.clone()  # float64 on both sides
    ref.final_alpha_cumprod = ref.alphas_cumprod[0]
    ref.set_timesteps(10)
    expected = run_diffusers(ref, net, noise)
    got = ddim_sample(net, proc, noise, steps=10, spacing="leading", steps_offset=1, set_alpha_to_one=False)
    assert (got - expected).abs().max() <= 1e-9
    # the old behaviour (no offset, clean end) is another sampler: the options matter
    assert (ddim_sample(net, proc, noise, steps=10) - expected).abs().max() > 1e-3


def test_ddim_shipped_config_through_sampling_config_with_eta_against_stock_diffusers():
    """float32 stock diffusers (its own tables) vs ours through SamplingConfig, with eta > 0 on a shared noise."""
    proc = process()
    ref = DDIMScheduler(**SD_DDIM)
    ref.set_timesteps(8)
    x = rand((2, 4, 8, 8), 1, torch.float32)
    out, z = rand((2, 4, 8, 8), 2, torch.float32), rand((2, 4, 8, 8), 3, torch.float32)
    last = int(ref.timesteps[-1])
    expected = ref.step(out, last, x, eta=0.5, variance_noise=z).prev_sample
    from training.diffusion import ddim_step

    got, _ = ddim_step(proc, out, x, last, 0, eta=0.5, noise=z)  # the sampler's final step with set_alpha_to_one=False
    assert (got - expected).abs().max() <= 1e-5
    cfg = SamplingConfig(sampler="ddim", steps=8, spacing="leading", steps_offset=1, set_alpha_to_one=False)
    net = ConvNet()
    latents = sample_latents(lambda x, t, c: net(x, t), proc, Conditioning(pooled=torch.zeros(2, 1)), None,
                             (2, 4, 8, 8), cfg, torch.device("cpu"))
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(cfg.seed))
    assert ref.timesteps.tolist() == [876, 751, 626, 501, 376, 251, 126, 1]
    assert (latents - run_diffusers(ref, net, noise)).abs().max() <= 1e-4  # float32 on both sides


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_spacing_and_offset_reach_ddpm_like_diffusers(spacing):
    proc = process()
    ref = DDPMScheduler(**SD, timestep_spacing=spacing, steps_offset=1, clip_sample=False)
    ref.alphas_cumprod = proc.schedule.alphas_cumprod.clone()
    ref.set_timesteps(6)
    seen: list[int] = []
    net = ConvNet().double()

    def denoise(x, t):
        seen.append(int(t[0]))
        return net(x, t)

    noise = rand((1, 4, 8, 8), 4)
    ddpm_sample(denoise, proc, noise, steps=6, spacing=spacing, steps_offset=1, generator=torch.Generator())
    assert seen == ref.timesteps.tolist()


# ------------------------------------------------------------------------------------------------ guidance rescale


def test_guidance_rescale_equals_diffusers_rescale_noise_cfg():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    cond_out, uncond = rand((3, 4, 8, 8), 5), rand((3, 4, 8, 8), 6)
    guided = uncond + 7.5 * (cond_out - uncond)
    for phi in (0.0, 0.3, 0.7, 1.0):
        assert (rescale_guidance(guided, cond_out, phi) - rescale_noise_cfg(guided, cond_out, phi)).abs().max() <= 1e-12
    with pytest.raises(ValueError, match="rescale"):
        ClassifierFreeGuidance(lambda x, t, c: x, None, None, 2.0, rescale=1.5)

    # SamplingConfig.guidance_rescale reaches the guider: sample_latents against diffusers' DDIM loop with CFG and
    # rescale_noise_cfg as its pipelines write it (the pipeline itself: the slow test below)
    net = ConvNet()

    def denoiser(x, t, c: Conditioning):
        return net(x, t) * c.pooled.reshape(-1, 1, 1, 1) + 0.1 * c.pooled.reshape(-1, 1, 1, 1)

    cond, null = Conditioning(pooled=torch.tensor([[0.5], [1.5]])), Conditioning(pooled=torch.zeros(2, 1))
    cfg = SamplingConfig(sampler="ddim", steps=5, guidance=6.0, guidance_rescale=0.7, spacing="leading",
                         steps_offset=1, set_alpha_to_one=False, seed=5)
    got = sample_latents(denoiser, process(), cond, null, (2, 4, 8, 8), cfg, torch.device("cpu"))
    ref = DDIMScheduler(**SD_DDIM)
    ref.set_timesteps(5)
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for t in ref.timesteps:
            tv = t.expand(2)
            c_out, u_out = denoiser(x, tv, cond), denoiser(x, tv, null)
            guided = rescale_noise_cfg(u_out + 6.0 * (c_out - u_out), c_out, 0.7)
            x = ref.step(guided, t, x).prev_sample
    assert (got - x).abs().max() <= 1e-4 * max(1.0, x.abs().max().item())  # float32 on both sides


def tiny_sd_pipeline(scheduler):
    """A StableDiffusionPipeline from tiny random components (the prompt is given as embeddings)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                attention_head_dim=2, norm_num_groups=4).eval()
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    text = CLIPTextModel(CLIPTextConfig(hidden_size=12, intermediate_size=16, num_attention_heads=2,
                                        num_hidden_layers=1, vocab_size=50, max_position_embeddings=8))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow  # builds a StableDiffusionPipeline (tiny, but ~20 s of imports and set-up on 2 cores)
def test_guidance_rescale_and_shipped_ddim_through_sample_latents_match_stable_diffusion_pipeline():
    """``loom sample``'s path (SamplingConfig → sample_latents → ClassifierFreeGuidance) against
    ``StableDiffusionPipeline(guidance_scale, guidance_rescale)`` with SD's shipped DDIM config."""
    pipe = tiny_sd_pipeline(DDIMScheduler(**SD_DDIM))
    cfg = SamplingConfig(sampler="ddim", steps=6, guidance=5.0, guidance_rescale=0.7, spacing="leading",
                         steps_offset=1, set_alpha_to_one=False, seed=3)
    text = rand((2, 8, 12), 7, torch.float32)
    null = rand((1, 8, 12), 8, torch.float32)

    def denoiser(x, t, c: Conditioning):
        return pipe.unet(x, t, encoder_hidden_states=c.context).sample

    proc = process()
    with torch.no_grad():
        ours = sample_latents(denoiser, proc, Conditioning(context=text), Conditioning(context=null), (2, 4, 8, 8),
                              cfg, torch.device("cpu"))
        noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(cfg.seed))
        ref = pipe(prompt_embeds=text, negative_prompt_embeds=null.expand(2, -1, -1), latents=noise,
                   num_inference_steps=6, guidance_scale=5.0, guidance_rescale=0.7, output_type="latent").images
        plain = pipe(prompt_embeds=text, negative_prompt_embeds=null.expand(2, -1, -1), latents=noise,
                     num_inference_steps=6, guidance_scale=5.0, output_type="latent").images
    assert (ours - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    assert (ref - plain).abs().max() > 1e-3  # the rescale did something


# ------------------------------------------------------------------------------------------------ DPM-Solver++


@pytest.mark.parametrize("schedule,prediction", [("scaled_linear", "epsilon"), ("scaled_linear", "v_prediction"),
                                                 ("cosine", "epsilon")])
def test_dpm_solver_karras_sigmas_match_diffusers(schedule, prediction):
    proc = process(schedule, prediction)
    kw = SD if schedule == "scaled_linear" else {"beta_schedule": "squaredcos_cap_v2"}
    ref = DPMSolverMultistepScheduler(**kw, prediction_type=prediction, algorithm_type="dpmsolver++", solver_order=2,
                                      use_karras_sigmas=True)
    ref.alphas_cumprod = proc.schedule.alphas_cumprod.clone()  # float64 tables on both sides
    steps = 9
    ref.set_timesteps(steps)
    ts, sigmas = karras_discrete_grid(proc, steps)
    assert ts == ref.timesteps.tolist()
    assert ((sigmas - ref.sigmas[:-1].double()).abs() / sigmas).max() <= 1e-6  # diffusers rounds to float32
    ref.sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])  # then compare the solvers in float64
    net = ConvNet().double()
    noise = rand((2, 4, 8, 8), 9)
    expected = run_diffusers(ref, net, noise)
    got = dpm_solver_2m_sample(net, proc, noise, steps=steps, karras_sigmas=True)
    assert (got - expected).abs().max() <= 1e-6 * max(1.0, expected.abs().max().item())
    assert (dpm_solver_2m_sample(net, proc, noise, steps=steps) - expected).abs().max() > 1e-3


def test_dpm_solver_floor_only_where_diffusers_applies_it():
    """Cosine schedule, epsilon: its last alphas_cumprod (~1e-9) are used as they are (the old floor at 2^-24
    changed the first step by 1.65%); zero terminal SNR: only the last entry is raised to 2^-24, as diffusers'
    ``rescale_betas_zero_snr=True``."""
    net = ConvNet().double()
    noise = rand((2, 4, 8, 8), 10)
    proc = process("cosine")
    assert float(proc.schedule.alphas_cumprod[-1]) < 2.0**-24  # the case the old floor changed
    ref = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", algorithm_type="dpmsolver++", solver_order=2)
    ref.alphas_cumprod = proc.schedule.alphas_cumprod.clone()
    ref.set_timesteps(8)
    acp = proc.schedule.alphas_cumprod[ref.timesteps]
    ref.sigmas = torch.cat([((1 - acp) / acp).sqrt(), torch.zeros(1, dtype=torch.float64)])
    expected = run_diffusers(ref, net, noise)
    got = dpm_solver_2m_sample(net, proc, noise, steps=8)
    assert (got - expected).abs().max() <= 1e-6 * max(1.0, expected.abs().max().item())

    zproc = process(prediction="v_prediction", zero_terminal_snr=True)
    ref = DPMSolverMultistepScheduler(**SD, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                      timestep_spacing="trailing")
    acp = zproc.schedule.alphas_cumprod.clone()
    assert float(acp[-1]) == 0.0 and float(ref.alphas_cumprod[-1]) == 2.0**-24
    acp[-1] = 2.0**-24
    ref.alphas_cumprod = acp
    ref.set_timesteps(8)
    a = acp[ref.timesteps]
    ref.sigmas = torch.cat([((1 - a) / a).sqrt(), torch.zeros(1, dtype=torch.float64)])
    expected = run_diffusers(ref, net, noise)
    got = dpm_solver_2m_sample(net, zproc, noise, steps=8, spacing="trailing")
    assert (got - expected).abs().max() <= 1e-6 * max(1.0, expected.abs().max().item())


# ------------------------------------------------------------------------------------------------ flow Euler


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("karras", [False, True])
def test_flow_default_grid_is_sd3_scheduler(shift, karras):
    steps = 7
    ref = FlowMatchEulerDiscreteScheduler(shift=shift, use_karras_sigmas=karras)
    ref.set_timesteps(steps)
    sigmas = flow_sigmas(steps, shift, karras_sigmas=karras)
    assert (sigmas - ref.sigmas.double()).abs().max() <= 1e-6
    flow = RectifiedFlow(shift=shift)
    assert (flow.model_timesteps(sigmas[:-1].float()) - ref.timesteps).abs().max() <= 1e-3
    net = ConvNet()
    noise = rand((2, 4, 8, 8), 11, torch.float32)
    expected = run_diffusers(ref, net, noise)
    got = euler_flow_sample(net, flow, noise, steps=steps, karras_sigmas=karras)  # the default grid: SD3's
    assert (got - expected).abs().max() <= 1e-5
    linear = euler_flow_sample(net, flow, noise, steps=steps, flow_grid="linear", karras_sigmas=karras)
    assert (linear - expected).abs().max() > 1e-4  # the Flux-reference grid is another grid


def test_flow_grid_through_sampling_config_and_its_checks():
    flow = RectifiedFlow(shift=3.0)
    net = ConvNet()
    cond = Conditioning(pooled=torch.zeros(2, 1))
    for grid in ("sd3", "linear"):
        cfg = SamplingConfig(sampler="euler", steps=4, flow_grid=grid, karras_sigmas=True, seed=2)
        got = sample_latents(lambda x, t, c: net(x, t), flow, cond, None, (2, 4, 8, 8), cfg, torch.device("cpu"))
        noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(2))
        assert torch.equal(got, euler_flow_sample(net, flow, noise, steps=4, flow_grid=grid, karras_sigmas=True))
    with pytest.raises(ValueError, match="flow_grid: got 'flux'"):
        SamplingConfig(sampler="euler", flow_grid="flux")
    with pytest.raises(ValueError, match="karras_sigmas: True is not read by the 'ddim' sampler; samplers that read "
                                         "it: dpm_solver_2m, euler"):
        SamplingConfig(sampler="ddim", karras_sigmas=True)
    with pytest.raises(ValueError, match="set_alpha_to_one: False is not read by the 'euler' sampler"):
        SamplingConfig(sampler="euler", set_alpha_to_one=False)
    with pytest.raises(ValueError, match="spacing: got 'uniform'"):
        SamplingConfig(spacing="uniform")
    with pytest.raises(ValueError, match="guidance_rescale"):
        SamplingConfig(guidance_rescale=-0.1)
    with pytest.raises(ValueError, match="steps_offset"):
        SamplingConfig(steps_offset=-1)
    np.testing.assert_array_equal(flow_sigmas(5, 3.0, "linear").numpy(), flow.sampling_sigmas(5).numpy())
