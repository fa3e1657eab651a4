"""Classifier-free guidance as a guider object building ``denoise(x, t)``, with a tiny real denoiser.

(Conditioning batch ops and dropout are tested in tests/models/test_conditioning.py.)"""

from __future__ import annotations

import pytest
import torch
from condmaker import TinyCond, make_cond, null_of
from torch import Tensor, nn

from training.diffusion import (
    ClassifierFreeGuidance,
    DiffusionConfig,
    build_process,
    ddim_sample,
    euler_flow_sample,
    frame_guidance_scale,
)


def cfg(net, x, t, cond, null, scale, rescale=0.0):
    """The guided output of one call of the guider."""
    return ClassifierFreeGuidance(net, cond, null, scale, rescale)(x, t)


class TinyDenoiser(nn.Module):
    """A small real network: channel mixing, FiLM from masked-mean text tokens and pooled text, timestep bias.

    Works on (B, C, ...) of any rank. Records the batch size of every call.
    """

    def __init__(self, channels: int = 4, dim: int = 8) -> None:
        super().__init__()
        self.mix = nn.Linear(channels, channels)
        self.film = nn.Linear(dim, 2 * channels)
        self.pool = nn.Linear(dim, channels)
        self.calls: list[int] = []

    def forward(self, x: Tensor, t: Tensor, cond: TinyCond) -> Tensor:
        self.calls.append(x.shape[0])
        m = cond.mask.to(x.dtype).unsqueeze(-1)
        text = (cond.context * m).sum(1) / m.sum(1).clamp(min=1)
        scale, shift = self.film(text).chunk(2, dim=-1)
        if cond.pooled is not None:
            shift = shift + self.pool(cond.pooled)
        view = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
        h = self.mix(x.movedim(1, -1)).movedim(-1, 1)
        temb = torch.sin(t.to(x.dtype) / 100).reshape((-1,) + (1,) * (x.ndim - 1))
        return torch.tanh(h) * (1 + scale.reshape(view)) + shift.reshape(view) + temb


@pytest.fixture
def net() -> TinyDenoiser:
    torch.manual_seed(0)
    return TinyDenoiser()


# --------------------------------------------------------------------------------------------- guidance


def test_guidance_one_is_the_conditional_output_in_one_forward(net):
    x, t, cond = torch.randn(3, 4, 6, 6), torch.tensor([10, 500, 999]), make_cond(3, 1)
    expected = net(x, t, cond)
    net.calls.clear()
    assert torch.equal(cfg(net, x, t, cond, null_of(3), 1.0), expected)
    assert torch.equal(cfg(net, x, t, cond, None, 7.5), expected)
    assert net.calls == [3, 3]  # single forwards on the conditional batch only


@pytest.mark.parametrize("shape", [(3, 4, 6, 6), (3, 4, 2, 6, 6)], ids=["image", "video"])
def test_batched_cfg_equals_two_separate_forwards(net, shape):
    x, t = torch.randn(shape), torch.tensor([10, 500, 999])
    cond, null = make_cond(3, 1), null_of(3)
    uncond_out, cond_out = net(x, t, null), net(x, t, cond)
    net.calls.clear()
    guided = cfg(net, x, t, cond, null, 5.0)
    assert net.calls == [6]  # one batched forward
    assert torch.allclose(guided, uncond_out + 5.0 * (cond_out - uncond_out), atol=1e-5)
    # guidance acts on every channel, not only the first ones
    changed = (guided - cond_out).abs().flatten(2).amax(-1)  # (B, C)
    assert bool((changed > 1e-3).all())
    # guidance 0 gives the unconditional output
    assert torch.allclose(cfg(net, x, t, cond, null, 0.0), uncond_out, atol=1e-6)


def test_single_null_is_broadcast_and_negative_prompt_is_just_another_null(net):
    x, t, cond = torch.randn(3, 4, 6, 6), torch.tensor([1, 2, 3]), make_cond(3, 1)
    assert torch.allclose(
        cfg(net, x, t, cond, null_of(1), 4.0), cfg(net, x, t, cond, null_of(3), 4.0), atol=1e-6
    )
    negative = make_cond(3, 9)
    expected = net(x, t, negative) + 4.0 * (net(x, t, cond) - net(x, t, negative))
    got = cfg(net, x, t, cond, negative, 4.0)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, cfg(net, x, t, cond, null_of(3), 4.0), atol=1e-3)


def test_guidance_rescale_restores_conditional_std(net):
    x, t, cond, null = torch.randn(2, 4, 6, 6), torch.tensor([5, 5]), make_cond(2, 1), null_of(2)
    cond_std = net(x, t, cond).flatten(1).std(1)
    full = cfg(net, x, t, cond, null, 7.0, rescale=1.0)
    assert torch.allclose(full.flatten(1).std(1), cond_std, rtol=1e-4)
    plain = cfg(net, x, t, cond, null, 7.0)
    half = cfg(net, x, t, cond, null, 7.0, rescale=0.5)
    assert torch.allclose(half, 0.5 * full + 0.5 * plain, atol=1e-5)


def test_samplers_use_batched_guidance(net):
    cond, null = make_cond(2, 1), null_of(2)
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    proc = build_process(DiffusionConfig(prediction="v_prediction"))
    net.calls.clear()
    guided = ddim_sample(ClassifierFreeGuidance(net, cond, null, 3.0), proc, noise, steps=4)
    assert net.calls == [4, 4, 4, 4]
    unguided = ddim_sample(ClassifierFreeGuidance(net, cond, null, 1.0), proc, noise, steps=4)
    assert torch.isfinite(guided).all() and not torch.allclose(guided, unguided)
    flow = build_process(DiffusionConfig(kind="flow"))
    net.calls.clear()
    out = euler_flow_sample(ClassifierFreeGuidance(net, cond, null, 3.0), flow, noise, steps=3)
    assert net.calls == [4, 4, 4] and out.shape == noise.shape


# --------------------------------------------------------------------------------------------- per-frame scale


def test_per_frame_scale_guides_each_frame_with_its_own_scale(net):
    x, t = torch.randn(2, 4, 3, 5, 5), torch.tensor([100, 800])
    cond, null = make_cond(2, 1), null_of(2)
    scales = frame_guidance_scale(1.0, 3.0, 3)
    assert torch.allclose(scales, torch.tensor([1.0, 2.0, 3.0]))
    uncond_out, cond_out = net(x, t, null), net(x, t, cond)
    net.calls.clear()
    guided = cfg(net, x, t, cond, null, scales)
    assert net.calls == [4]  # still one batched forward
    for f, w in enumerate(scales.tolist()):
        expected = uncond_out[:, :, f] + w * (cond_out[:, :, f] - uncond_out[:, :, f])
        assert torch.allclose(guided[:, :, f], expected, atol=1e-5), f
    # a constant per-frame scale is the float scale; all ones is the single conditional forward
    assert torch.allclose(cfg(net, x, t, cond, null, torch.full((3,), 4.0)), cfg(net, x, t, cond, null, 4.0), atol=1e-6)
    net.calls.clear()
    assert torch.equal(cfg(net, x, t, cond, null, [1.0, 1.0, 1.0]), cond_out) and net.calls == [2]
    with pytest.raises(ValueError, match=r"3 per-frame scales need samples shaped \(B, C, 3, H, W\)"):
        cfg(net, torch.randn(2, 4, 5, 5), t, cond, null, scales)
    with pytest.raises(ValueError, match="expected a float or"):
        ClassifierFreeGuidance(net, cond, null, torch.ones(2, 3))


def test_plain_denoise_without_a_guider_is_a_lambda(net):
    cond = make_cond(2, 1)
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    proc = build_process(DiffusionConfig(prediction="v_prediction"))
    plain = ddim_sample(lambda x, t: net(x, t, cond), proc, noise, steps=3)
    assert torch.equal(plain, ddim_sample(ClassifierFreeGuidance(net, cond), proc, noise, steps=3))


def test_sample_latents_dispatches_by_registry_name(net):
    """training.sampling picks the sampler by name and hands it the guider; a newly registered sampler is reached
    without any change to guidance or to sample_latents."""
    from models.conditioning import Conditioning
    from training.diffusion import SAMPLERS, DiscreteDiffusion, ddim_sample, register_sampler, sampler_for
    from training.sampling import SamplingConfig, sample_latents

    class TextNet(nn.Module):
        def forward(self, x, t, c: Conditioning):
            return torch.tanh(x) * c.pooled.reshape(-1, 1, 1, 1) + t.float().reshape(-1, 1, 1, 1) / 1000

    cond = Conditioning(pooled=torch.tensor([[0.5], [1.5]]))
    null = Conditioning(pooled=torch.zeros(1, 1))
    proc = build_process(DiffusionConfig())
    cfg_ = SamplingConfig(sampler="ddim", steps=3, guidance=2.0, eta=0.5, seed=4)
    got = sample_latents(TextNet(), proc, cond, null, (2, 1, 4, 4), cfg_, torch.device("cpu"))
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(2, 1, 4, 4, generator=g)
    expected = ddim_sample(ClassifierFreeGuidance(TextNet(), cond, null, 2.0), proc, noise, steps=3, eta=0.5,
                           generator=g)
    assert torch.equal(got, expected)
    seen = {}

    @register_sampler("test_only_identity", DiscreteDiffusion)
    def identity_sample(denoise, process, noise, *, steps, generator=None, callback=None):
        seen["out"] = denoise(noise, torch.zeros(noise.shape[0], dtype=torch.long))
        return noise

    try:
        with pytest.raises(ValueError, match="already registered"):
            register_sampler("test_only_identity", DiscreteDiffusion)(identity_sample)
        out = sample_latents(TextNet(), proc, cond, null, (2, 1, 4, 4),
                             SamplingConfig(sampler="test_only_identity", steps=2, seed=1), torch.device("cpu"))
        assert out.shape == (2, 1, 4, 4) and seen["out"].shape == (2, 1, 4, 4)
    finally:
        del SAMPLERS["test_only_identity"]
    flow = build_process(DiffusionConfig(kind="flow"))
    with pytest.raises(ValueError, match="sampler: 'ddim' is for the discrete process; a flow process samples with "
                                         "'euler'"):
        sampler_for("ddim", flow)
    with pytest.raises(ValueError, match="sampler: 'euler' is for the flow process"):
        sampler_for("euler", proc)
    with pytest.raises(ValueError, match="did you mean 'ddim'"):
        SamplingConfig(sampler="dim")
