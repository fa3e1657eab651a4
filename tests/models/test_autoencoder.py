"""AutoencoderKL: shapes, video folding, posterior maths, latent scaling, save/load, checkpointing, presets."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.autoencoder import (
    AUTOENCODER_PRESETS,
    LOGVAR_MAX,
    LOGVAR_MIN,
    AutoencoderConfig,
    AutoencoderKL,
    DiagonalGaussian,
    flux_vae_config,
    latent_shape_for,
    sd3_vae_config,
    sd_vae_config,
    sdxl_vae_config,
)
from models.blocks import ResBlock
from models.utils import count_parameters


def tiny(**overrides) -> AutoencoderConfig:
    base = dict(block_out_channels=[16, 32, 32], layers_per_block=1, norm_num_groups=8)
    base.update(overrides)
    return AutoencoderConfig(**base)


def build(config: AutoencoderConfig, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(config).eval()


@pytest.mark.parametrize("levels,latent_channels", [(3, 4), (4, 16)])
def test_shapes_follow_levels_and_latent_channels(levels, latent_channels):
    cfg = tiny(block_out_channels=[16] * levels, latent_channels=latent_channels)
    model = build(cfg)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        posterior = model.encode(x)
        f = cfg.downsample_factor
        assert f == 2 ** (levels - 1)
        assert posterior.mean.shape == (2, latent_channels, 32 // f, 32 // f)
        assert posterior.sample().shape == posterior.mean.shape
        recon, post = model(x)
    assert recon.shape == x.shape
    assert post.parameters.shape == (2, 2 * latent_channels, 32 // f, 32 // f)


def test_without_quant_convs_and_mid_attention():
    model = build(tiny(use_quant_conv=False, use_post_quant_conv=False, mid_block_attention=False))
    assert model.quant_conv is None and model.post_quant_conv is None
    assert not any("attn" in k or "quant" in k for k in model.state_dict())
    with torch.no_grad():
        assert model(torch.randn(1, 3, 16, 16))[0].shape == (1, 3, 16, 16)


def test_video_is_encoded_and_decoded_frame_by_frame():
    model = build(tiny())
    video = torch.randn(2, 3, 3, 16, 16)  # (B, C, T, H, W)
    with torch.no_grad():
        posterior = model.encode(video)
        assert posterior.mean.shape == (2, 4, 3, 4, 4)
        for t in range(3):
            torch.testing.assert_close(posterior.mean[:, :, t], model.encode(video[:, :, t]).mean, rtol=0, atol=1e-6)
        z = posterior.mode()
        decoded = model.decode(z)
        assert decoded.shape == video.shape
        torch.testing.assert_close(decoded[:, :, 1], model.decode(z[:, :, 1]), rtol=0, atol=1e-6)
        assert posterior.kl().shape == (2,)


def test_bad_ranks_are_refused():
    model = build(tiny())
    with pytest.raises(ValueError, match=r"encode takes \(B, C, H, W\) images or \(B, C, T, H, W\) clips of pixels; "
                                         r"got shape \(3, 16, 16\)"):
        model.encode(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match=r"decode takes .* got shape \(4, 4, 4\)"):
        model.decode(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match=r"got shape \(1, 1, 3, 2, 16, 16\)"):
        model.encode(torch.randn(1, 1, 3, 2, 16, 16))


@pytest.mark.parametrize("levels,latent_channels", [(3, 4), (2, 16)])
def test_latent_shape_is_what_encode_gives(levels, latent_channels):
    model = build(tiny(block_out_channels=[16] * levels, latent_channels=latent_channels))
    f = 2 ** (levels - 1)
    assert (model.latent_channels, model.spatial_factor, model.temporal_factor) == (latent_channels, f, 1)
    assert (model.config.spatial_factor, model.config.temporal_factor) == (f, 1)
    with torch.no_grad():
        image = model.encode(torch.randn(1, 3, 16, 24)).mean  # (1, C, h, w)
        clip = model.encode(torch.randn(1, 3, 2, 16, 24)).mean  # (1, C, T, h, w)
    assert model.latent_shape(16, 24) == tuple(image.shape[1:]) == (latent_channels, 16 // f, 24 // f)
    assert model.latent_shape(16, 24, num_frames=2) == tuple(clip.shape[1:]) == (latent_channels, 2, 16 // f, 24 // f)
    with pytest.raises(ValueError, match=f"height=17: must be a positive multiple of the autoencoder's spatial "
                                         f"factor {f}"):
        model.latent_shape(17, 24)
    # the pixel-space equivalent: factors 1
    assert latent_shape_for(3, 16, 24) == (3, 16, 24) and latent_shape_for(3, 16, 24, 5) == (3, 5, 16, 24)


def test_posterior_clamps_logvar_and_matches_torch_distributions():
    params = torch.randn(3, 8, 4, 4)
    params[:, 4:, 0, 0] = 100.0
    params[:, 4:, 0, 1] = -100.0
    post = DiagonalGaussian(params)
    assert post.logvar.max() == LOGVAR_MAX and post.logvar.min() == LOGVAR_MIN
    torch.testing.assert_close(post.std, torch.exp(0.5 * post.logvar))

    mild = DiagonalGaussian(torch.randn(3, 8, 4, 4) * 0.5)
    q = torch.distributions.Normal(mild.mean, mild.std)
    p = torch.distributions.Normal(torch.zeros_like(mild.mean), torch.ones_like(mild.std))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    torch.testing.assert_close(mild.kl(), expected, rtol=1e-5, atol=1e-5)
    other = DiagonalGaussian(torch.randn(3, 8, 4, 4) * 0.5)
    q2 = torch.distributions.Normal(other.mean, other.std)
    torch.testing.assert_close(mild.kl(other), torch.distributions.kl_divergence(q, q2).sum(dim=(1, 2, 3)))
    standard = DiagonalGaussian(torch.zeros(2, 8, 4, 4))
    torch.testing.assert_close(standard.kl(), torch.zeros(2))


def test_posterior_sampling_is_seeded_and_accepts_explicit_noise():
    post = DiagonalGaussian(torch.randn(2, 8, 4, 4))
    a = post.sample(torch.Generator().manual_seed(3))
    b = post.sample(torch.Generator().manual_seed(3))
    c = post.sample(torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    noise = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(post.sample(noise=noise), post.mean + post.std * noise)
    assert torch.equal(post.mode(), post.mean)
    with pytest.raises(ValueError, match="noise shape"):
        post.sample(noise=torch.randn(2, 4, 2, 2))


def test_latent_scaling_uses_the_config_and_inverts():
    model = build(tiny(scaling_factor=0.5, shift_factor=0.25))
    z = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(model.scale_latents(z), (z - 0.25) * 0.5)
    torch.testing.assert_close(model.unscale_latents(model.scale_latents(z)), z)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = model.latents_from_pixels(x, sample=False)
        torch.testing.assert_close(latents, (model.encode(x).mean - 0.25) * 0.5)
        torch.testing.assert_close(model.pixels_from_latents(latents), model.decode(model.encode(x).mean))
        sampled = model.latents_from_pixels(x, generator=torch.Generator().manual_seed(0))
        assert not torch.allclose(sampled, latents)


def test_deterministic_given_seed_and_eval_mode():
    x = torch.randn(2, 3, 16, 16)
    a, b = build(tiny(), seed=1), build(tiny(), seed=1)
    with torch.no_grad():
        torch.testing.assert_close(a(x, sample_posterior=False)[0], b(x, sample_posterior=False)[0], rtol=0, atol=0)
        torch.testing.assert_close(a(x, sample_posterior=False)[0], a(x, sample_posterior=False)[0], rtol=0, atol=0)
    c = build(tiny(), seed=2)
    with torch.no_grad():
        assert not torch.allclose(a(x, sample_posterior=False)[0], c(x, sample_posterior=False)[0])


def test_safetensors_round_trip(tmp_path):
    cfg = tiny()
    model = build(cfg, seed=5)
    path = tmp_path / "vae.safetensors"
    save_file(model.state_dict(), str(path))
    fresh = build(cfg, seed=6)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        before = fresh(x, sample_posterior=False)[0]
        fresh.load_state_dict(load_file(str(path)), strict=True)
        after = fresh(x, sample_posterior=False)[0]
        expected = model(x, sample_posterior=False)[0]
    assert not torch.allclose(before, expected)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_gradient_checkpointing_same_loss_and_gradients():
    x = torch.randn(2, 3, 16, 16)

    def loss_and_grads(checkpointing: bool):
        model = build(tiny(), seed=3).train()
        model.gradient_checkpointing = checkpointing
        calls = []
        for module in model.modules():
            if isinstance(module, ResBlock):
                module.register_forward_pre_hook(lambda *_: calls.append(1))
        recon, post = model(x, generator=torch.Generator().manual_seed(0))
        loss = (recon - x).pow(2).mean() + 1e-3 * post.kl().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    loss_a, grads_a, calls_a = loss_and_grads(False)
    loss_b, grads_b, calls_b = loss_and_grads(True)
    assert calls_b > calls_a  # the ResBlocks really ran again in backward
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-7)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpointing_switch_from_config():
    model = AutoencoderKL(tiny(gradient_checkpointing=True))
    assert model.gradient_checkpointing
    model.gradient_checkpointing = False
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(block_out_channels=[]), "block_out_channels"),
        (dict(block_out_channels=[16, 20]), "block_out_channels"),
        (dict(latent_channels=0), "latent_channels"),
        (dict(scaling_factor=0.0), "scaling_factor"),
        (dict(attention_backend="flash"), "attention_backend"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny(**overrides)


@pytest.mark.parametrize(
    "make,expected",
    [(sd_vae_config, 83_653_863), (sdxl_vae_config, 83_653_863), (sd3_vae_config, 83_819_683),
     (flux_vae_config, 83_819_683)],  # fmt: skip
)
def test_full_size_parameter_counts_on_meta(make, expected):
    with torch.device("meta"):
        model = AutoencoderKL(make())
    assert all(p.is_meta for p in model.parameters())
    assert count_parameters(model) == expected


def test_presets_carry_their_latent_statistics():
    assert sd_vae_config().scaling_factor == 0.18215 and sd_vae_config().shift_factor == 0.0
    assert sdxl_vae_config().scaling_factor == 0.13025
    assert flux_vae_config().shift_factor != 0.0 and not flux_vae_config().use_quant_conv
    assert sd_vae_config().downsample_factor == 8
    for name, make in AUTOENCODER_PRESETS.items():
        cfg = make()
        assert dataclasses.replace(cfg) == cfg, name  # plain, re-validatable dataclasses


def test_presets_are_registered_in_the_model_registry():
    from models.registry import build_model, get_preset, list_presets

    assert {"sd-vae", "sdxl-vae", "sd3-vae", "flux-vae", "tiny-vae"} <= set(list_presets())
    assert get_preset("flux-vae") == flux_vae_config()
    model = build_model("tiny-vae")
    assert isinstance(model, AutoencoderKL) and model.config.downsample_factor == 4
