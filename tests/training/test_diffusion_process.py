"""Forward processes: noising, targets, conversions, loss weights, offset noise, flow matching, config."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from training.diffusion import (
    DiffusionConfig,
    DiscreteDiffusion,
    LossTerms,
    NoiseSchedule,
    RectifiedFlow,
    build_process,
    resolution_shift,
    shift_time,
)

PREDICTIONS = ["epsilon", "v_prediction", "sample"]


def sd_process(prediction="epsilon", **kw) -> DiscreteDiffusion:
    return DiscreteDiffusion(NoiseSchedule.from_name("scaled_linear", 1000), prediction=prediction, **kw)


def sd_scheduler(prediction="epsilon") -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction)


# --------------------------------------------------------------------------------------------- discrete process


def shared_table_scheduler(prediction="epsilon") -> DDPMScheduler:
    """diffusers' scheduler running on our float64 alphas_cumprod, so float64 inputs compare exactly."""
    ref = sd_scheduler(prediction)
    ref.alphas_cumprod = NoiseSchedule.from_name("scaled_linear", 1000).alphas_cumprod.clone()
    return ref


def random_batch(seed, shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


T_SAMPLE = torch.tensor([0, 1, 250, 500, 998, 999])


def test_add_noise_and_velocity_match_diffusers_float64():
    x0, noise = random_batch(1, (6, 4, 8, 8), torch.float64)
    ref, proc = shared_table_scheduler(), sd_process()
    assert (proc.add_noise(x0, noise, T_SAMPLE) - ref.add_noise(x0, noise, T_SAMPLE)).abs().max() <= 1e-6
    assert (proc.velocity(x0, noise, T_SAMPLE) - ref.get_velocity(x0, noise, T_SAMPLE)).abs().max() <= 1e-6


def test_add_noise_and_velocity_match_stock_diffusers_float32():
    x0, noise = random_batch(1, (6, 4, 8, 8))
    ref, proc = sd_scheduler(), sd_process()
    # Ours takes sqrt(1 - alphas_cumprod) in float64 before casting; stock diffusers does it in float32, where
    # 1 - 0.99915 (t = 0) keeps only ~4 significant digits: its coefficient is off by ~4e-7, times |noise| <= ~4.5.
    # Hence 5e-6 against stock diffusers, and 1e-6 against the exact (float64) result.
    assert (proc.add_noise(x0, noise, T_SAMPLE) - ref.add_noise(x0, noise, T_SAMPLE)).abs().max() <= 5e-6
    assert (proc.velocity(x0, noise, T_SAMPLE) - ref.get_velocity(x0, noise, T_SAMPLE)).abs().max() <= 5e-6
    exact = proc.add_noise(x0.double(), noise.double(), T_SAMPLE)
    assert (proc.add_noise(x0, noise, T_SAMPLE).double() - exact).abs().max() <= 1e-6


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_targets_match_diffusers_conventions(prediction):
    x0, noise = random_batch(2, (4, 4, 2, 8, 8), torch.float64)  # video latents (B, C, T, H, W)
    t = torch.tensor([3, 100, 700, 999])
    ref = shared_table_scheduler(prediction)
    expected = {"epsilon": noise, "v_prediction": ref.get_velocity(x0, noise, t), "sample": x0}[prediction]
    target = sd_process(prediction).target(x0, noise, t)
    assert target.shape == x0.shape
    assert (target - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_conversions_invert_the_target(prediction):
    proc = sd_process(prediction)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 17, 400, 800, 999])
    x_t = proc.add_noise(x0, noise, t)
    out = proc.target(x0, noise, t)  # a perfect model output
    assert torch.allclose(proc.to_x0(out, x_t, t), x0, atol=1e-9)
    assert torch.allclose(proc.to_eps(out, x_t, t), noise, atol=1e-9)
    assert torch.allclose(proc.to_v(out, x_t, t), proc.velocity(x0, noise, t), atol=1e-9)
    assert torch.allclose(proc.eps_from_x0(x0, x_t, t), noise, atol=1e-9)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_min_snr_weights_by_hand(prediction):
    gamma = 5.0
    proc = sd_process(prediction, loss_weighting="min_snr", min_snr_gamma=gamma)
    t = torch.arange(0, 1000, 37)
    acp = NoiseSchedule.from_name("scaled_linear", 1000).alphas_cumprod[t]
    snr = [a / (1 - a) for a in acp.tolist()]
    if prediction == "epsilon":
        expected = [min(s, gamma) / s for s in snr]
    elif prediction == "v_prediction":
        expected = [min(s, gamma) / (s + 1) for s in snr]
    else:
        expected = [min(s, gamma) for s in snr]
    weight = proc.loss_weight(t)
    assert weight.dtype == torch.float32 and weight.shape == t.shape
    assert torch.allclose(weight.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6)
    # the clamp is active at low noise and inactive at high noise
    assert snr[0] > gamma and snr[-1] < gamma


def test_min_snr_at_zero_terminal_snr_is_finite():
    sched = NoiseSchedule.from_name("scaled_linear", 1000, zero_terminal_snr=True)
    t = torch.tensor([0, 500, 999])
    for prediction, last in (("epsilon", 1.0), ("v_prediction", 0.0), ("sample", 0.0)):
        w = DiscreteDiffusion(sched, prediction=prediction, loss_weighting="min_snr").loss_weight(t)
        assert torch.isfinite(w).all()
        assert w[-1].item() == pytest.approx(last)


def test_uniform_weights_are_one():
    assert bool((sd_process().loss_weight(torch.tensor([0, 999])) == 1).all())


def test_sample_timesteps_is_uniform_integer_and_reproducible():
    proc = sd_process()
    t1 = proc.sample_timesteps(20000, torch.Generator().manual_seed(0))
    t2 = proc.sample_timesteps(20000, torch.Generator().manual_seed(0))
    assert t1.dtype == torch.long and torch.equal(t1, t2)
    assert 0 <= t1.min() and t1.max() <= 999
    assert abs(t1.double().mean().item() - 499.5) < 10  # std of the mean ~ 2
    assert not torch.equal(t1, proc.sample_timesteps(20000, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize(
    "shape,channel_dim",
    [((4, 3, 8, 8), 1), ((4, 3, 5, 8, 8), 1), ((4, 5, 3, 8, 8), 2)],
    ids=["image", "video-BCTHW", "video-BTCHW"],
)
def test_offset_noise_is_per_sample_and_channel(shape, channel_dim):
    proc = sd_process(offset_noise=0.5, channel_dim=channel_dim)
    x0 = torch.zeros(shape)
    noise = proc.sample_noise(x0, torch.Generator().manual_seed(7))
    base = torch.randn(shape, generator=torch.Generator().manual_seed(7))  # the same first draw
    offset = noise - base
    # constant over every axis except batch and channel ...
    reduce_dims = tuple(d for d in range(len(shape)) if d not in (0, channel_dim))
    spread = offset.amax(dim=reduce_dims) - offset.amin(dim=reduce_dims)
    assert spread.max() < 1e-5
    # ... and different across samples and channels
    per = offset.amax(dim=reduce_dims)  # (B, C)
    assert per.shape == (shape[0], shape[channel_dim])
    assert per.std(dim=0).min() > 0 and per.std(dim=1).min() > 0
    # without offset noise the noise is plain N(0, 1)
    plain = sd_process(channel_dim=channel_dim).sample_noise(x0, torch.Generator().manual_seed(7))
    assert torch.equal(plain, base)


def test_offset_noise_statistics():
    proc = sd_process(offset_noise=0.1)
    noise = proc.sample_noise(torch.zeros(4000, 4, 4, 4), torch.Generator().manual_seed(0))
    channel_means = noise.mean(dim=(2, 3))  # ~ N(0, 0.1^2 + 1/16)
    assert channel_means.var().item() == pytest.approx(0.01 + 1 / 16, rel=0.05)


@pytest.mark.parametrize("kind", ["discrete", "flow"])
def test_training_loss_terms_and_loss(kind):
    weighting = "min_snr" if kind == "discrete" else "uniform"
    cfg = DiffusionConfig(kind=kind, prediction="v_prediction", loss_weighting=weighting)
    proc = build_process(cfg)
    x0 = torch.randn(8, 4, 8, 8)
    terms = proc.training_loss_terms(x0, generator=torch.Generator().manual_seed(0))
    assert isinstance(terms, LossTerms)
    assert terms.x_t.shape == terms.target.shape == terms.noise.shape == x0.shape
    assert terms.timesteps.shape == terms.weight.shape == (8,)
    assert torch.equal(terms.x_t, proc.add_noise(x0, terms.noise, terms.t))
    assert torch.equal(terms.target, proc.target(x0, terms.noise, terms.t))
    # reproducible with the same generator
    again = proc.training_loss_terms(x0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.x_t, terms.x_t) and torch.equal(again.timesteps, terms.timesteps)
    # loss: per-sample mean over non-batch dims, weighted, batch mean
    out = terms.target + 0.1 * torch.randn_like(x0)
    per = ((out - terms.target) ** 2).flatten(1).mean(1)
    assert torch.allclose(proc.loss(out, terms, reduction="none"), per * terms.weight)
    assert torch.allclose(proc.loss(out, terms), (per * terms.weight).mean())
    assert proc.loss(terms.target, terms).item() == 0.0
    with pytest.raises(ValueError, match="shape"):
        proc.loss(out[:, :2], terms)


def test_training_loss_terms_with_given_noise_and_t():
    proc = sd_process(offset_noise=1.0)
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    terms = proc.training_loss_terms(x0, noise=noise, t=torch.tensor([5, 900]))
    assert torch.equal(terms.noise, noise)  # given noise is used as is
    assert terms.timesteps.tolist() == [5, 900] and terms.timesteps.dtype == torch.long


# --------------------------------------------------------------------------------------------- rectified flow


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_shift_matches_diffusers_training_sigmas(shift):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    t = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    assert (shift_time(t, shift) - ref.sigmas.double()).abs().max() <= 1e-6
    assert (shift_time(t, shift) * 1000 - ref.timesteps.double()).abs().max() <= 1e-3  # 1000 x the sigma error


def test_flow_add_noise_and_target_match_diffusers():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow = RectifiedFlow(shift=3.0)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    idx = [0, 500, 999]
    t = ref.sigmas[idx]
    expected = ref.scale_noise(x0, ref.timesteps[idx], noise)
    assert (flow.add_noise(x0, noise, t) - expected).abs().max() <= 1e-6
    assert torch.equal(flow.target(x0, noise, t), noise - x0)
    assert torch.allclose(flow.model_timesteps(t), ref.timesteps[idx])
    # a perfect velocity maps back to x0 and the noise
    x_t = flow.add_noise(x0, noise, t)
    v = flow.target(x0, noise, t)
    assert torch.allclose(flow.to_x0(v, x_t, t), x0, atol=1e-5)
    assert torch.allclose(flow.to_eps(v, x_t, t), noise, atol=1e-5)


def test_flow_timestep_sampling():
    n = 20000
    uni = RectifiedFlow(timestep_sampling="uniform").sample_timesteps(n, torch.Generator().manual_seed(0))
    assert 0 <= uni.min() and uni.max() <= 1 and abs(uni.mean().item() - 0.5) < 0.01
    ln = RectifiedFlow(logit_mean=0.5, logit_std=1.0).sample_timesteps(n, torch.Generator().manual_seed(0))
    logits = torch.log(ln / (1 - ln))
    assert logits.mean().item() == pytest.approx(0.5, abs=0.03)
    assert logits.std().item() == pytest.approx(1.0, abs=0.03)
    # the shift pushes the median of t to shift(median)
    shifted = RectifiedFlow(logit_mean=0.0, shift=3.0).sample_timesteps(n, torch.Generator().manual_seed(0))
    assert shifted.median().item() == pytest.approx(0.75, abs=0.01)  # 3 * 0.5 / (1 + 2 * 0.5)


def test_flow_training_terms_feed_scaled_timesteps():
    flow = RectifiedFlow(timestep_scale=1000.0)
    terms = flow.training_loss_terms(torch.randn(4, 4, 2, 4, 4), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(terms.timesteps, terms.t * 1000)
    assert bool((terms.weight == 1).all())


def test_shift_helpers():
    assert shift_time(0.5, 3.0) == pytest.approx(0.75)
    assert shift_time(0.0, 3.0) == 0.0 and shift_time(1.0, 3.0) == 1.0
    assert resolution_shift(1024 * 1024, 512 * 512) == pytest.approx(2.0)
    sig = RectifiedFlow(shift=3.0).sampling_sigmas(4)
    expected = [shift_time(1 - k / 4, 3.0) for k in range(5)]
    assert sig.tolist() == pytest.approx(expected)


# --------------------------------------------------------------------------------------------- config


def test_config_builds_each_process():
    proc = build_process(DiffusionConfig(schedule="cosine", num_timesteps=500, prediction="v_prediction"))
    assert isinstance(proc, DiscreteDiffusion) and proc.num_timesteps == 500 and proc.prediction == "v_prediction"
    zsnr = build_process(DiffusionConfig(zero_terminal_snr=True, prediction="v_prediction"))
    assert zsnr.schedule.zero_terminal_snr
    flow = build_process(DiffusionConfig(kind="flow", flow_shift=3.0, flow_timestep_sampling="uniform"))
    assert isinstance(flow, RectifiedFlow) and flow.shift == 3.0 and flow.timestep_sampling == "uniform"
    assert DiffusionConfig(min_snr_gamma=5).min_snr_gamma == 5.0  # ints coerced to float


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"kind": "score"}, r"kind: got 'score'; allowed: 'discrete', 'flow'"),
        ({"schedule": "cosin"}, r"schedule: got 'cosin'; allowed: .* \(did you mean 'cosine'\?\)"),
        ({"prediction": "eps"}, r"prediction: got 'eps'; allowed: 'epsilon', 'v_prediction', 'sample'"),
        ({"num_timesteps": 1}, r"num_timesteps: got 1; expected an int >= 2"),
        ({"num_timesteps": 10.5}, r"num_timesteps: got 10.5 \(float\); expected int"),
        ({"offset_noise": -0.1}, r"offset_noise: got -0.1; expected"),
        ({"min_snr_gamma": 0.0}, r"min_snr_gamma: got 0.0; expected a float > 0"),
        ({"beta_start": 1.5}, r"beta_start: got 1.5; expected"),
        ({"beta_start": 0.02, "beta_end": 0.01}, r"beta_start: got 0.02; expected a value <= beta_end"),
        ({"zero_terminal_snr": True}, r"prediction: got 'epsilon'; expected 'v_prediction' or 'sample'"),
        ({"zero_terminal_snr": 1}, r"zero_terminal_snr: got 1 \(int\); expected bool"),
        ({"channel_dim": 0}, r"channel_dim: got 0; expected an int >= 1"),
        ({"logit_std": 0.0}, r"logit_std: got 0.0; expected a float > 0"),
        ({"flow_shift": -1.0}, r"flow_shift: got -1.0; expected"),
        ({"kind": "flow", "loss_weighting": "min_snr"}, r"loss_weighting: got 'min_snr'; expected 'uniform'"),
    ],
)
def test_config_validation_names_field_value_and_allowed(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DiffusionConfig(**kwargs)


def test_process_constructors_validate():
    with pytest.raises(ValueError, match="prediction: got 'x0'"):
        DiscreteDiffusion(prediction="x0")
    with pytest.raises(ValueError, match="timestep_sampling: got 'mode'"):
        RectifiedFlow(timestep_sampling="mode")


def test_config_loads_through_project_loader():
    loader = pytest.importorskip("training.config_io")
    cfg = loader.from_dict(DiffusionConfig, {"kind": "flow", "flow_shift": 3, "logit_std": 1})
    assert cfg.flow_shift == 3.0
    with pytest.raises(ValueError, match=r"min_snr_gamma"):
        loader.from_dict(DiffusionConfig, {"min_snr_gamma": -1.0})


def test_min_snr_default_gamma_matches_paper():
    assert DiffusionConfig().min_snr_gamma == 5.0  # Hang et al. 2023 recommend gamma = 5
    assert math.isclose(sd_process(loss_weighting="min_snr").min_snr_gamma, 5.0)
