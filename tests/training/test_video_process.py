"""The diffusion process for clips: token-count shift, the EDM / SVD Euler sampler against diffusers, and
image-to-video sampling (the conditioning frame is never the sampler's business; SVD's per-frame guidance)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler
from torch import Tensor, nn

from models.conditioning import Conditioning, first_frame_conditioning, nulled
from training.diffusion import (
    SAMPLERS,
    ClassifierFreeGuidance,
    DiffusionConfig,
    DiscreteDiffusion,
    EDMDiffusion,
    NoiseSchedule,
    RectifiedFlow,
    build_process,
    ddim_sample,
    dpm_solver_2m_sample,
    euler_flow_sample,
    euler_karras_sample,
    frame_guidance_scale,
    karras_sigmas,
    sampler_for,
    shift_time,
    token_count,
    token_shift,
)
from training.sampling import SamplingConfig, sample_latents

#: diffusers' scheduler_config.json of stabilityai/stable-video-diffusion-img2vid(-xt), as
#: StableVideoDiffusionPipeline loads it.
SVD_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "trained_betas": None,
    "use_karras_sigmas": True,
}

# diffusers' EulerDiscreteScheduler.set_timesteps trips a numpy-2 __array__ DeprecationWarning (not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

VIDEO = (2, 4, 3, 8, 8)  # (B, C, T', h, w): 192 latent tokens


def rand(shape, seed, dtype=torch.float32) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def processes(base: int | None) -> list:
    return [
        DiscreteDiffusion(NoiseSchedule.from_name("scaled_linear", 1000), prediction="v_prediction",
                          token_shift_base=base),
        RectifiedFlow(shift=3.0, token_shift_base=base),
        EDMDiffusion(token_shift_base=base),
    ]


# ============================================================================ (a) token-count shift


def test_token_count_is_frames_times_height_times_width():
    assert token_count((5, 4, 16, 16)) == 256
    assert token_count((5, 4, 7, 16, 16)) == 7 * 256
    assert token_count((5, 7, 4, 16, 16), channel_dim=2) == 7 * 256  # (B, T, C, H, W)
    assert token_shift(4 * 1024, 1024) == 2.0
    with pytest.raises(ValueError, match="channel_dim"):
        token_count((5, 4), channel_dim=1)


def test_token_shift_is_off_by_default_and_image_runs_keep_their_process():
    cfg = DiffusionConfig()
    assert cfg.token_shift is False
    for kind in ("discrete", "flow", "edm"):
        proc = build_process(DiffusionConfig(kind=kind))
        assert proc.token_shift_base is None
        assert proc.for_shape(VIDEO) is proc  # no copy, no change: the exact same numbers
    on = build_process(DiffusionConfig(token_shift=True, token_shift_base=64))
    assert on.token_shift_base == 64
    with pytest.raises(ValueError, match="token_shift_base"):
        DiffusionConfig(token_shift_base=0)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_shifted_process_at_the_base_token_count_is_the_unshifted_one(index):
    shape = (2, 4, 2, 8, 8)  # 128 tokens
    plain, shifted = processes(None)[index], processes(128)[index].for_shape(shape)
    x0, noise = rand(shape, 0), rand(shape, 1)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = plain.training_loss_terms(x0, noise=noise, generator=g1)
    b = shifted.training_loss_terms(x0, noise=noise, generator=g2)
    for name in ("x_t", "timesteps", "target", "weight", "t"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_discrete_shift_matches_simple_diffusion_log_snr_formula():
    """Hoogeboom et al. 2023, section 3.1: log SNR_shift(t) = log SNR(t) + 2 log(base / size)."""
    base_side, base = 32, 32 * 32
    proc = DiscreteDiffusion(NoiseSchedule.from_name("scaled_linear", 1000), token_shift_base=base)
    plain = proc.schedule
    t = torch.tensor([0, 10, 250, 500, 999])
    for side in (16, 32, 64, 128):
        shifted = proc.schedule_for((1, 4, side, side))
        delta = shifted.snr(t).log() - plain.snr(t).log()
        torch.testing.assert_close(delta, torch.full_like(delta, 2 * math.log(base_side / side)), rtol=0, atol=1e-9)
    # a clip: T' frames of side x side tokens shift like T' side^2 image tokens: log(base / (T' h w))
    clip = proc.schedule_for((1, 4, 8, 16, 16))
    delta = clip.snr(t).log() - plain.snr(t).log()
    torch.testing.assert_close(delta, torch.full_like(delta, math.log(base / (8 * 256))), rtol=0, atol=1e-9)
    a = plain.alphas_cumprod[500].item()
    r = base / (8 * 256)
    assert clip.alphas_cumprod[500].item() == pytest.approx(r * a / (r * a + 1 - a), rel=1e-12)


def test_flow_shift_is_sd3_time_shift_by_sqrt_token_ratio_and_scales_snr():
    """SD3 section 5.3.2: t_m = a t_n / (1 + (a - 1) t_n), a = sqrt(m / n); on top of the configured shift."""
    flow = RectifiedFlow(shift=3.0, token_shift_base=1024)
    t = torch.tensor([0.1, 0.25, 0.5, 0.9], dtype=torch.float64)
    for tokens_shape in ((1, 16, 64, 64), (1, 16, 4, 32, 32), (1, 16, 16, 16)):
        n = token_count(tokens_shape)
        resolved = flow.for_shape(tokens_shape)
        assert resolved.shift == pytest.approx(3.0 * math.sqrt(n / 1024))
        expected = shift_time(shift_time(t, 3.0), math.sqrt(n / 1024))
        torch.testing.assert_close(shift_time(t, resolved.shift), expected)
        # SNR of the path x_t = (1 - t) x0 + t eps is ((1 - t) / t)^2: scaled by n0 / n
        snr = ((1 - expected) / expected) ** 2
        snr_unshifted = ((1 - shift_time(t, 3.0)) / shift_time(t, 3.0)) ** 2
        torch.testing.assert_close(snr / snr_unshifted, torch.full_like(snr, 1024 / n))


def test_edm_shift_scales_every_sigma_by_sqrt_token_ratio():
    edm = EDMDiffusion(token_shift_base=48)
    resolved = edm.for_shape((1, 4, 3, 8, 8))  # 192 tokens: a = 2
    assert (resolved.sigma_min, resolved.sigma_max) == pytest.approx((0.004, 1400.0))
    assert resolved.p_mean == pytest.approx(-1.2 + math.log(2.0))
    torch.testing.assert_close(resolved.sampling_sigmas(7), 2.0 * EDMDiffusion().sampling_sigmas(7))


def test_more_tokens_means_more_noise_everywhere():
    disc, flow, edm = processes(256)
    t = torch.arange(0, 999)
    previous = None
    for side in (8, 16, 32, 64):
        shape = (1, 4, 2, side, side)
        acp = disc.schedule_for(shape).alphas_cumprod[t]
        flow_t = shift_time(torch.linspace(0.01, 0.99, 50, dtype=torch.float64), flow.for_shape(shape).shift)
        sigmas = edm.for_shape(shape).sampling_sigmas(10)[:-1]
        if previous is not None:
            assert bool((acp < previous[0]).all())  # less signal at every step
            assert bool((flow_t > previous[1]).all())  # later (noisier) flow times
            assert bool((sigmas > previous[2]).all())  # larger sigmas
        previous = (acp, flow_t, sigmas)


def test_training_and_every_sampler_use_the_same_shifted_noise_levels():
    disc = processes(64)[0]
    x0, noise = rand(VIDEO, 0), rand(VIDEO, 1)
    t = torch.tensor([400, 900])
    terms = disc.training_loss_terms(x0, noise=noise, t=t)
    a = disc.schedule_for(VIDEO).alphas_cumprod[t].reshape(-1, 1, 1, 1, 1)
    torch.testing.assert_close(terms.x_t, (a.sqrt() * x0 + (1 - a).sqrt() * noise).float())
    torch.testing.assert_close(terms.target, (a.sqrt() * noise - (1 - a).sqrt() * x0).float())
    resolved = DiscreteDiffusion(disc.schedule_for(VIDEO), prediction="v_prediction")

    def denoise(x, tt):
        return 0.1 * x + 0.01 * tt.float().reshape(-1, 1, 1, 1, 1)

    for sampler in (ddim_sample, dpm_solver_2m_sample):
        ours = sampler(denoise, disc, noise, steps=6)
        assert torch.equal(ours, sampler(denoise, resolved, noise, steps=6)), sampler.__name__
        assert not torch.allclose(ours, sampler(denoise, processes(None)[0], noise, steps=6)), sampler.__name__
    # flow: training times and the sampling grid carry the same total shift
    flow = RectifiedFlow(shift=1.0, timestep_sampling="uniform", token_shift_base=48)  # a = 2 for VIDEO
    drawn = flow.training_loss_terms(x0, noise=noise, generator=torch.Generator().manual_seed(5)).t
    uniform = torch.rand((2,), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(drawn, shift_time(uniform, 2.0))
    seen = []
    euler_flow_sample(lambda x, tt: seen.append(float(tt[0])) or torch.zeros_like(x), flow, noise, steps=4,
                      flow_grid="linear")
    grid = shift_time(torch.linspace(1.0, 0.0, 5, dtype=torch.float64), 2.0)[:-1] * 1000.0
    assert seen == pytest.approx(grid.tolist(), rel=1e-6)
    seen.clear()  # SD3's grid (the default): N times from 1 to its shifted sigma_min, under the same total shift
    euler_flow_sample(lambda x, tt: seen.append(float(tt[0])) or torch.zeros_like(x), flow, noise, steps=4)
    smallest = float(shift_time(torch.tensor(1e-3, dtype=torch.float64), 2.0))
    sd3 = shift_time(torch.linspace(1.0, smallest, 4, dtype=torch.float64), 2.0) * 1000.0
    assert seen == pytest.approx(sd3.tolist(), rel=1e-5)


# ============================================================================ (b) EDM / SVD Euler sampler


class VideoNet(nn.Module):
    """A small deterministic denoiser F(c_in x; c_noise) on (B, C, T, H, W) clips."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        return torch.tanh(self.conv(x)) * (1.0 + 0.2 * t.to(x.dtype).reshape(-1, 1, 1, 1, 1)) + 0.05 * x


def test_a_ddpm_grid_cannot_express_svd_sigmas():
    acp = NoiseSchedule.from_name("scaled_linear", 1000).alphas_cumprod
    assert ((1 - acp[-1]) / acp[-1]).sqrt() < 15.0 < 700.0  # hence the continuous-sigma EDMDiffusion


def test_euler_karras_is_registered_for_the_edm_process_only():
    assert SAMPLERS["euler_karras"].process is EDMDiffusion and SAMPLERS["euler_karras"].process_kind == "edm"
    assert sampler_for("euler_karras", EDMDiffusion()).fn is euler_karras_sample
    with pytest.raises(ValueError, match="euler_karras"):
        sampler_for("ddim", EDMDiffusion())
    with pytest.raises(ValueError, match="edm process"):
        sampler_for("euler_karras", DiscreteDiffusion())


@pytest.mark.parametrize("steps", [1, 5, 25])
def test_karras_sigmas_and_continuous_timesteps_match_diffusers_svd_config(steps):
    sched = EulerDiscreteScheduler.from_config(SVD_SCHEDULER)
    sched.set_timesteps(steps)
    ours = EDMDiffusion(prediction="v_prediction").sampling_sigmas(steps)
    theirs = sched.sigmas.double()
    assert ours[-1] == 0 and theirs[-1] == 0
    torch.testing.assert_close(ours[:-1], theirs[:-1], rtol=1e-7, atol=0)  # theirs are float32 values
    c_noise = EDMDiffusion().model_timesteps(ours[:-1])
    torch.testing.assert_close(c_noise, sched.timesteps.float(), rtol=0, atol=1e-6)
    start = []  # our sampler's starting point for unit noise: sqrt(sigma_0^2 + 1), diffusers' init_noise_sigma
    euler_karras_sample(lambda x, t: start.append(x) or torch.zeros_like(x), EDMDiffusion(), torch.ones(1, 1, 1, 1),
                        steps=steps)
    start_scale = start[0].item() * math.sqrt(ours[0].item() ** 2 + 1)  # undo c_in: x itself
    assert start_scale == pytest.approx(float(sched.init_noise_sigma), rel=2e-7)
    assert float(sched.init_noise_sigma) != pytest.approx(700.0, rel=2e-7)  # not sigma_max: "leading" adds the 1
    torch.testing.assert_close(karras_sigmas(steps, 0.002, 700.0), ours[:-1])


@pytest.mark.parametrize("steps", [5, 25])
def test_euler_karras_trajectory_matches_diffusers_euler_discrete_as_svd_configures_it(steps):
    """The same denoiser stepped by diffusers' EulerDiscreteScheduler (the SVD pipeline's loop: init_noise_sigma,
    scale_model_input, model(x_in, t), step) and by euler_karras_sample: the same inputs and the same trajectory.

    diffusers keeps sigmas and the sample in float32 (an ulp at |x| ~ 700 is 6e-5), so a step is compared in the
    unit-variance scale x / sqrt(sigma^2 + 1) (the model's input); the final clean sample in absolute terms."""
    net = VideoNet()
    noise = rand(VIDEO, 7)
    sched = EulerDiscreteScheduler.from_config(SVD_SCHEDULER)
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    ref_inputs, ref_xs, ref_x0 = [], [], []
    with torch.no_grad():
        for t in sched.timesteps:
            x_in = sched.scale_model_input(x, t)
            ref_inputs.append((x_in, t.expand(VIDEO[0])))
            out = sched.step(net(x_in, t.expand(VIDEO[0])), t, x)
            x = out.prev_sample
            ref_xs.append(x)
            ref_x0.append(out.pred_original_sample)
    inputs, xs, x0s = [], [], []

    def denoise(x_in, c_noise):
        inputs.append((x_in, c_noise))
        return net(x_in, c_noise)

    final = euler_karras_sample(denoise, EDMDiffusion(prediction="v_prediction"), noise, steps=steps,
                                callback=lambda i, s, x, x0: (xs.append(x), x0s.append(x0)))
    sigmas = sched.sigmas.double().tolist()
    worst = 0.0
    for i in range(steps):
        torch.testing.assert_close(inputs[i][0], ref_inputs[i][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(inputs[i][1], ref_inputs[i][1].float(), rtol=0, atol=1e-6)
        scale = math.sqrt(sigmas[i + 1] ** 2 + 1.0)
        err = float((xs[i] - ref_xs[i]).abs().max()) / scale
        worst = max(worst, err)
        torch.testing.assert_close(x0s[i], ref_x0[i], rtol=0, atol=1e-5)
    assert worst <= 1e-5
    torch.testing.assert_close(final, ref_xs[-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon", "sample"])
def test_edm_preconditioning_is_karras_table_1_with_unit_sigma_data(prediction):
    edm = EDMDiffusion(prediction=prediction)
    x0, noise = rand(VIDEO, 0, torch.float64), rand(VIDEO, 1, torch.float64)
    sigma = torch.tensor([0.05, 30.0], dtype=torch.float64)
    terms = edm.training_loss_terms(x0, noise=noise, t=sigma)
    s = sigma.reshape(-1, 1, 1, 1, 1)
    x_sigma = x0 + s * noise
    c_in = 1 / (s * s + 1).sqrt()
    c_skip, c_out = {"v_prediction": (1 / (s * s + 1), -s / (s * s + 1).sqrt()), "epsilon": (1.0, -s),
                     "sample": (0.0, 1.0)}[prediction]
    torch.testing.assert_close(terms.x_t, c_in * x_sigma)
    torch.testing.assert_close(terms.timesteps, (0.25 * sigma.log()).float())
    torch.testing.assert_close(terms.target, (x0 - c_skip * x_sigma) / c_out)  # F's target
    torch.testing.assert_close(edm.to_x0(terms.target, terms.x_t, sigma), x0)  # D = c_skip x + c_out F
    torch.testing.assert_close(edm.to_eps(terms.target, terms.x_t, sigma), noise)
    assert torch.equal(terms.weight, torch.ones(2))


def test_edm_training_sigmas_are_log_normal():
    edm = EDMDiffusion(p_mean=0.7, p_std=1.6)
    sigma = edm.sample_timesteps(20000, torch.Generator().manual_seed(0))
    assert sigma.log().mean().item() == pytest.approx(0.7, abs=0.05)
    assert sigma.log().std().item() == pytest.approx(1.6, abs=0.05)


def test_euler_karras_with_the_oracle_denoiser_lands_on_the_data():
    """Data = one clip x*: the exact v-prediction network gives D = x* at every sigma, so Euler's x - x* shrinks by
    sigma_next / sigma each step and ends at x* (the preconditioning, input scaling and c_noise all have to agree)."""
    target = rand((1, 4, 3, 8, 8), 3, torch.float64)

    def oracle(x_in, c_noise):
        sigma = torch.exp(4.0 * c_noise.double()).reshape(-1, 1, 1, 1, 1)
        x_sigma = x_in * (sigma * sigma + 1).sqrt()
        eps = (x_sigma - target) / sigma
        return (eps - sigma * target) / (sigma * sigma + 1).sqrt()  # v = alpha eps - s x0

    for base in (None, 16):
        out = euler_karras_sample(oracle, EDMDiffusion(token_shift_base=base), rand((1, 4, 3, 8, 8), 4,
                                  torch.float64), steps=6)
        torch.testing.assert_close(out, target, rtol=0, atol=1e-6)


def test_edm_config_builds_svd_process():
    proc = build_process(DiffusionConfig(kind="edm", prediction="v_prediction"))
    assert isinstance(proc, EDMDiffusion) and proc.prediction == "v_prediction"
    assert (proc.sigma_min, proc.sigma_max, proc.rho) == (0.002, 700.0, 7.0)
    with pytest.raises(ValueError, match="loss_weighting"):
        DiffusionConfig(kind="edm", loss_weighting="min_snr")
    with pytest.raises(ValueError, match="edm_sigma_min"):
        DiffusionConfig(kind="edm", edm_sigma_min=800.0)


# ============================================================================ (c) image-to-video sampling


class RecordingVideoDenoiser(nn.Module):
    """Records the image latents of every call; its output depends on x, t, the text and the image latents."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        self.seen.append(cond.image_latents.clone())
        text = cond.pooled.reshape(-1, 1, 1, 1, 1)
        image = cond.image_latents if cond.image_latents.ndim == 5 else cond.image_latents.unsqueeze(2)
        return 0.1 * x + 0.05 * text + 0.02 * image.mean(dim=1, keepdim=True)


class OneFrameAE(nn.Module):
    """A stand-in autoencoder: encode((B, C, T, H, W)) -> posterior whose mode is a fixed projection."""

    def encode(self, pixels: Tensor):
        latents = pixels[:, :, :, ::2, ::2].repeat(1, 4 // pixels.shape[1] + 1, 1, 1, 1)[:, :4]

        class Posterior:
            def mode(self):
                return latents

        return Posterior()


def i2v_conditioning(batch: int, frames: int) -> tuple[Conditioning, Conditioning]:
    pixels = rand((batch, 3, 16, 16), 11).clamp(-1, 1)
    image = first_frame_conditioning(OneFrameAE(), pixels, frames, 0.02, generator=torch.Generator().manual_seed(2))
    cond = Conditioning(pooled=torch.ones(batch, 1), image_latents=image, aug_strength=torch.full((batch,), 0.02))
    null = nulled(cond, Conditioning(pooled=torch.zeros(1, 1)), groups=("text", "image"))  # SVD zeros the image
    return cond, null


@pytest.mark.parametrize("kind,sampler", [("edm", "euler_karras"), ("discrete", "ddim"), ("flow", "euler")])
def test_sampler_path_never_noises_the_conditioning_frame(kind, sampler):
    cond, null = i2v_conditioning(2, 3)
    given = cond.image_latents.clone()
    process = build_process(DiffusionConfig(kind=kind, prediction="v_prediction" if kind != "flow" else "epsilon",
                                            token_shift=True, token_shift_base=64))
    samples = []
    for seed in (0, 1):
        model = RecordingVideoDenoiser()
        cfg = SamplingConfig(sampler=sampler, steps=4, guidance=2.0, guidance_min=1.0, seed=seed)
        samples.append(sample_latents(model, process, cond, null, (2, 4, 3, 8, 8), cfg, torch.device("cpu")))
        assert len(model.seen) == 4
        for seen in model.seen:  # [uncond; cond] at every step
            assert torch.equal(seen[2:], given)  # the conditioning branch: exactly the augmented frame
            assert torch.equal(seen[:2], torch.zeros_like(given))  # the unconditional branch: nulled
    assert not torch.allclose(samples[0], samples[1])  # the seed moves the sample, never the conditioning frame
    assert torch.equal(cond.image_latents, given)


def test_first_frame_conditioning_noise_comes_from_its_own_generator():
    a, _ = i2v_conditioning(2, 3)
    b, _ = i2v_conditioning(2, 3)
    assert torch.equal(a.image_latents, b.image_latents)
    clean = first_frame_conditioning(OneFrameAE(), rand((2, 3, 16, 16), 11).clamp(-1, 1), 3, 0.0)
    assert not torch.equal(a.image_latents, clean)  # augmented (std 0.02), not by the sampler


def test_guidance_min_gives_svd_linearly_increasing_guidance_over_frames():
    cond, null = i2v_conditioning(2, 5)
    process = EDMDiffusion(prediction="v_prediction")
    cfg = SamplingConfig(sampler="euler_karras", steps=3, guidance=3.0, guidance_min=1.0, seed=4)
    model = RecordingVideoDenoiser()
    got = sample_latents(model, process, cond, null, (2, 4, 5, 8, 8), cfg, torch.device("cpu"))
    noise = torch.randn((2, 4, 5, 8, 8), generator=torch.Generator().manual_seed(4))
    guider = ClassifierFreeGuidance(model, cond, null, frame_guidance_scale(1.0, 3.0, 5))
    torch.testing.assert_close(guider.scale, torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0]))
    assert torch.equal(got, euler_karras_sample(guider, process, noise, steps=3))
    flat = sample_latents(model, process, cond, null, (2, 4, 5, 8, 8),
                          SamplingConfig(sampler="euler_karras", steps=3, guidance=3.0, seed=4), torch.device("cpu"))
    assert not torch.allclose(got, flat)
    # the guidance override sets the last frame's scale
    override = sample_latents(model, process, cond, null, (2, 4, 5, 8, 8), cfg, torch.device("cpu"), guidance=2.0)
    guider2 = ClassifierFreeGuidance(model, cond, null, frame_guidance_scale(1.0, 2.0, 5))
    assert torch.equal(override, euler_karras_sample(guider2, process, noise, steps=3))
    with pytest.raises(ValueError, match="guidance_min"):
        SamplingConfig(guidance_min=-1.0)


def test_guidance_min_leaves_images_on_one_scale():
    proc = DiscreteDiffusion()

    def model(x, t, cond):
        return 0.1 * x + 0.05 * cond.pooled.reshape(-1, 1, 1, 1)

    cond, null = Conditioning(pooled=torch.ones(2, 1)), Conditioning(pooled=torch.zeros(1, 1))
    a = sample_latents(model, proc, cond, null, (2, 4, 8, 8), SamplingConfig(steps=3, guidance_min=1.0),
                       torch.device("cpu"))
    b = sample_latents(model, proc, cond, null, (2, 4, 8, 8), SamplingConfig(steps=3), torch.device("cpu"))
    assert torch.equal(a, b)
