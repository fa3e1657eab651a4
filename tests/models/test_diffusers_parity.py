"""Our U-Net and autoencoder compute what diffusers' UNet2DConditionModel and AutoencoderKL compute.

Each test builds the diffusers model from a tiny random config, perturbs every weight (so no zero-initialised or
unit-norm layer hides a mapping error), carries the weights over with :mod:`models.convert` under ``strict=True``,
and compares outputs in fp32 eval mode: max |diff| ≤ 1e-5. The original-LDM name maps are checked against
diffusers' own LDM converters, and the full-size name maps on the meta device.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

from models.autoencoder import AutoencoderKL, sd_vae_config  # noqa: E402
from models.conditioning import Conditioning  # noqa: E402
from models.convert import (  # noqa: E402
    config_from_diffusers_unet,
    config_from_diffusers_vae,
    from_diffusers_unet_state_dict,
    from_diffusers_vae_state_dict,
    from_ldm_unet_state_dict,
    from_ldm_vae_state_dict,
    to_diffusers_unet_state_dict,
    to_diffusers_vae_state_dict,
    to_ldm_unet_state_dict,
    to_ldm_vae_state_dict,
)
from models.embeddings import fourier_features  # noqa: E402
from models.unet import UNet, UNetConfig, sd15_unet_config, sd21_unet_config, sdxl_unet_config  # noqa: E402

TOL = 1e-5
CTX = 24

UNET_BASE = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    norm_num_groups=8,
    cross_attention_dim=CTX,
    attention_head_dim=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
XL_EXTRA = dict(
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8
)

UNET_CASES = {
    "sd15-like": dict(),
    "linear-proj-tuple-heads-deep": dict(use_linear_projection=True, attention_head_dim=(2, 4),
                                         transformer_layers_per_block=(1, 2)),
    "attention-low-only-scale-shift": dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                           up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                           resnet_time_scale_shift="scale_shift", layers_per_block=1),
    "three-levels-all-attention": dict(block_out_channels=(32, 32, 64), layers_per_block=1,
                                       down_block_types=("CrossAttnDownBlock2D",) * 3,
                                       up_block_types=("CrossAttnUpBlock2D",) * 3, attention_head_dim=(1, 2, 4)),
    "sdxl-text-time": dict(XL_EXTRA, use_linear_projection=True, attention_head_dim=(2, 4),
                           transformer_layers_per_block=(1, 3),
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
    "class-conditional": dict(num_class_embeds=7, time_embedding_dim=48, freq_shift=1, flip_sin_to_cos=False),
}  # fmt: skip


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def diffusers_unet(overrides: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**{**UNET_BASE, **overrides}).eval()
    perturb(model, seed + 100)
    return model


def inputs(config: UNetConfig, size=(16, 16), seed: int = 0):
    """The same random batch in diffusers' calling convention and in ours."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, *size, generator=g)
    t = torch.tensor([17, 803])
    ctx = torch.randn(2, 7, CTX, generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 3:] = False
    theirs = dict(encoder_hidden_states=ctx, encoder_attention_mask=mask)
    ours = Conditioning(context=ctx, context_mask=mask)
    if config.addition_embed_type == "text_time":
        pooled = torch.randn(2, 16, generator=g)
        time_ids = torch.tensor([[64.0, 48, 0, 8, 64, 64], [32, 32, 4, 0, 32, 48]])
        theirs["added_cond_kwargs"] = dict(text_embeds=pooled, time_ids=time_ids)
        ours.pooled, ours.vector = pooled, fourier_features(time_ids, config.addition_time_embed_dim)
    if config.num_classes is not None:
        theirs["class_labels"] = ours.class_labels = torch.tensor([2, 5])
    return x, t, theirs, ours


def ours_from(reference, seed: int = 1) -> tuple[UNet, UNetConfig]:
    cfg = config_from_diffusers_unet(dict(reference.config))
    torch.manual_seed(seed)
    model = UNet(cfg).eval()
    model.load_state_dict(from_diffusers_unet_state_dict(reference.state_dict(), cfg), strict=True)
    return model, cfg


@pytest.mark.parametrize("case", list(UNET_CASES))
def test_unet_matches_diffusers(case):
    reference = diffusers_unet(UNET_CASES[case])
    model, cfg = ours_from(reference)
    size = (13, 10) if case == "sd15-like" else (16, 16)  # odd sides exercise the skip-sized upsampling
    x, t, theirs, ours = inputs(cfg, size)
    with torch.no_grad():
        expected = reference(x, t, **theirs).sample
        got = model(x, t, ours)
    diff = (got - expected).abs().max().item()
    assert expected.abs().max() > 0.1  # a live network, not an all-zero output
    assert diff <= TOL, f"{case}: max abs diff {diff:.3g}"


def test_unet_parity_is_sensitive_to_a_wrong_weight():
    """The comparison above would notice a single mis-mapped tensor."""
    reference = diffusers_unet(UNET_CASES["sd15-like"])
    model, cfg = ours_from(reference)
    with torch.no_grad():
        model.up[1].attn[0].blocks[0].cross_attn.to_v.weight.mul_(1.01)
    x, t, theirs, ours = inputs(cfg)
    with torch.no_grad():
        assert (model(x, t, ours) - reference(x, t, **theirs).sample).abs().max() > TOL


def test_unet_state_dict_round_trips_to_diffusers_names():
    reference = diffusers_unet(UNET_CASES["sdxl-text-time"])
    model, _ = ours_from(reference)
    exported = to_diffusers_unet_state_dict(model.state_dict())
    expected = reference.state_dict()
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)


def test_config_translation_of_a_published_sd15_config():
    published = {  # stable-diffusion-v1-5 unet/config.json
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
        "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
        "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D", "DownBlock2D"], "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
        "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
        "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    }  # fmt: skip
    assert config_from_diffusers_unet(published) == sd15_unet_config()


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"only_cross_attention": True}, "only_cross_attention"),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
        ({"down_block_types": ("AttnDownBlock2D", "DownBlock2D")}, "down_block_types"),
        ({"up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")}, "mirror"),
        ({"addition_embed_type": "text"}, "addition_embed_type"),
        ({"made_up_option": 3}, "made_up_option"),
    ],
)
def test_unsupported_diffusers_options_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        config_from_diffusers_unet({**UNET_BASE, **bad})


def test_mismatched_config_is_reported_with_names():
    reference = diffusers_unet(UNET_CASES["sd15-like"])
    wrong = config_from_diffusers_unet(dict(reference.config), layers_per_block=1)
    with pytest.raises(ValueError, match="Missing .* unexpected"):
        from_diffusers_unet_state_dict(reference.state_dict(), wrong)


# --- autoencoder ---------------------------------------------------------------------------------------------------

VAE_BASE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)
VAE_CASES = {
    "sd-like": dict(),
    "16ch-no-quant": dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, layers_per_block=1,
                          scaling_factor=0.3611, shift_factor=0.1159),
}  # fmt: skip


def vae_pair(case: str):
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKL(**{**VAE_BASE, **VAE_CASES[case]}).eval()
    perturb(reference, 200)
    cfg = config_from_diffusers_vae(dict(reference.config))
    torch.manual_seed(1)
    model = AutoencoderKL(cfg).eval()
    model.load_state_dict(from_diffusers_vae_state_dict(reference.state_dict(), cfg), strict=True)
    return reference, model


@pytest.mark.parametrize("case", list(VAE_CASES))
def test_vae_encoder_decoder_and_sampling_match_diffusers(case):
    reference, model = vae_pair(case)
    assert model.config.scaling_factor == reference.config.scaling_factor
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 24, generator=g) * 2 - 1
    z = torch.randn(2, model.config.latent_channels, 4, 3, generator=g)
    with torch.no_grad():
        theirs, ours = reference.encode(x).latent_dist, model.encode(x)
        decoded_theirs, decoded_ours = reference.decode(z).sample, model.decode(z)
        sample_theirs = theirs.sample(generator=torch.Generator().manual_seed(5))
        sample_ours = ours.sample(generator=torch.Generator().manual_seed(5))
        full_theirs = reference(x, sample_posterior=True, generator=torch.Generator().manual_seed(6)).sample
        full_ours, _ = model(x, sample_posterior=True, generator=torch.Generator().manual_seed(6))
    pairs = {
        "mean": (ours.mean, theirs.mean),
        "logvar": (ours.logvar, theirs.logvar),
        "kl": (ours.kl(), theirs.kl()),
        "sample": (sample_ours, sample_theirs),
        "decode": (decoded_ours, decoded_theirs),
        "forward": (full_ours, full_theirs),
    }
    for name, (a, b) in pairs.items():
        tol = TOL * max(1.0, b.abs().max().item()) if name == "kl" else TOL  # KL is a sum over 48+ terms
        diff = (a - b).abs().max().item()
        assert diff <= tol, f"{case} {name}: max abs diff {diff:.3g}"
    assert decoded_theirs.abs().max() > 0.1 and ours.std.min() > 0


def test_vae_legacy_attention_names_and_export():
    reference, model = vae_pair("sd-like")
    legacy = {}
    for k, v in reference.state_dict().items():
        for new, old in (("to_q.", "query."), ("to_k.", "key."), ("to_v.", "value."), ("to_out.0.", "proj_attn.")):
            if ".attentions.0." in k and new in k:
                k = k.replace(new, old)
        legacy[k] = v
    assert any("proj_attn" in k for k in legacy)
    loaded = from_diffusers_vae_state_dict(legacy, model.config)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    exported = to_diffusers_vae_state_dict(model.state_dict())
    assert exported.keys() == reference.state_dict().keys()


# --- original LDM checkpoints, checked against diffusers' LDM converters --------------------------------------------


@pytest.mark.parametrize("case", ["sd15-like", "sdxl-text-time", "three-levels-all-attention"])
def test_ldm_unet_names_agree_with_diffusers_converter(case):
    reference = diffusers_unet(UNET_CASES[case])
    model, cfg = ours_from(reference)
    perturb(model, 300)  # now differs from `reference`
    ldm = to_ldm_unet_state_dict(model.state_dict(), cfg, prefix="model.diffusion_model.")
    ldm["model_ema.decay"] = torch.tensor(0.999)  # other parts of a full checkpoint are ignored
    ldm["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1)
    reference.load_state_dict(convert_ldm_unet_checkpoint(ldm, dict(reference.config)), strict=True)
    back = from_ldm_unet_state_dict(ldm, cfg)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    x, t, theirs, ours = inputs(cfg)
    with torch.no_grad():
        assert (model(x, t, ours) - reference(x, t, **theirs).sample).abs().max() <= TOL


def test_ldm_vae_names_agree_with_diffusers_converter():
    reference, model = vae_pair("sd-like")
    perturb(model, 400)
    ldm = to_ldm_vae_state_dict(model.state_dict(), model.config, prefix="first_stage_model.")
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # stored as a 1×1 conv, as LDM does
    reference.load_state_dict(convert_ldm_vae_checkpoint(ldm, dict(reference.config)), strict=True)
    back = from_ldm_vae_state_dict(ldm, model.config)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    standalone = to_ldm_vae_state_dict(model.state_dict(), model.config)  # a vae-*.ckpt: bare names + extras
    standalone |= {"loss.logvar": torch.zeros(()), "model_ema.decay": torch.tensor(0.999)}
    back = from_ldm_vae_state_dict(standalone, model.config)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="unexpected"):
        from_ldm_vae_state_dict({**standalone, "encoder.extra.weight": torch.zeros(1)}, model.config)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        diff = (model(x, sample_posterior=False)[0] - reference(x, sample_posterior=False).sample).abs().max()
    assert diff <= TOL


# --- full size, on the meta device ---------------------------------------------------------------------------------

FULL_UNETS = {
    "sd15": (sd15_unet_config, dict(cross_attention_dim=768)),
    "sd21": (sd21_unet_config, dict(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                                    use_linear_projection=True)),
    "sdxl": (sdxl_unet_config, dict(block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20],
                                    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                                    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                                    transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
                                    use_linear_projection=True, addition_embed_type="text_time",
                                    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(FULL_UNETS))
def test_full_size_unet_names_and_counts_match_diffusers_on_meta(name):
    make, diffusers_kwargs = FULL_UNETS[name]
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**diffusers_kwargs)
        translated = config_from_diffusers_unet(dict(reference.config))
        model = UNet(make())
        model.load_state_dict(from_diffusers_unet_state_dict(reference.state_dict(), make()), strict=True, assign=True)
        twin = UNet(translated)
    n = sum(p.numel() for p in reference.parameters())
    assert sum(p.numel() for p in model.parameters()) == n == sum(p.numel() for p in twin.parameters())


def test_full_size_vae_names_and_count_match_diffusers_on_meta():
    with torch.device("meta"):
        reference = diffusers.AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512], layers_per_block=2, sample_size=512,
        )  # fmt: skip
        model = AutoencoderKL(sd_vae_config())
        model.load_state_dict(from_diffusers_vae_state_dict(reference.state_dict(), sd_vae_config()), strict=True,
                              assign=True)  # fmt: skip
    assert config_from_diffusers_vae(dict(reference.config)) == sd_vae_config()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters()) == 83_653_863
