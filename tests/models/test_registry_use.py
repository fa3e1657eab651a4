"""The model registry where the pipeline uses it: the diffusion stage's ``denoiser`` + ``model`` config, and
weight loading with the converters each architecture registers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from models.autoencoder import AutoencoderKL, tiny_vae_config
from models.convert import to_diffusers_unet_state_dict, to_diffusers_vae_state_dict, to_ldm_unet_state_dict
from models.dit import DiT, DiTConfig
from models.registry import get_preset
from models.unet import UNet, UNetConfig, tiny_unet_config
from training.config_io import ConfigError, from_dict, load_config
from training.run_config import RunConfig
from training.stages.diffusion import DiffusionStageConfig, build_denoiser
from training.weights import load_weights

# ---- the diffusion stage's denoiser config ------------------------------------------------------------------------


def test_denoiser_is_an_architecture_or_a_preset_with_its_section():
    cfg = DiffusionStageConfig()
    assert cfg.model_config == DiTConfig() and cfg.architecture == "dit"
    cfg = from_dict(DiffusionStageConfig,
                    {"denoiser": "tiny-unet", "model": {"tiny-unet": {"cross_attention_dim": 32}}})
    assert cfg.model_config == UNetConfig(**{**vars(tiny_unet_config()), "cross_attention_dim": 32})
    assert cfg.architecture == "unet"
    assert isinstance(build_denoiser(cfg), UNet)
    # Python callers may give the typed config as the section
    dit = DiTConfig(sample_size=8, hidden_size=32, depth=1, num_heads=2)
    cfg = DiffusionStageConfig(denoiser="dit", model={"dit": dit})
    assert cfg.model_config is dit and isinstance(build_denoiser(cfg), DiT)
    assert get_preset("dit-tiny-text") == DiffusionStageConfig(denoiser="DiT-tiny-text").model_config


def test_presets_switch_denoiser_over_an_inherited_section():
    """quickstart-unet inherits quickstart's DiT section and switches to the U-Net: both sections stay valid and
    the one the denoiser names is used."""
    dit = load_config(RunConfig, ["quickstart"]).diffusion
    unet = load_config(RunConfig, ["quickstart-unet"]).diffusion
    assert dit.architecture == "dit" and dit.model_config.hidden_size == 128 and dit.model_config.context_dim == 64
    assert unet.architecture == "unet" and set(unet.model) == {"dit", "unet"}
    assert unet.model_config.block_out_channels == [32, 64] and unet.model_config.cross_attention_dim == 64
    over = load_config(RunConfig, ["quickstart"], ["diffusion.model.dit.depth=2"]).diffusion
    assert over.model_config.depth == 2 and over.model_config.hidden_size == 128


@pytest.mark.parametrize("data,message", [
    ({"dit": {"depth": 3}}, r"^diffusion\.dit: unknown key .*denoiser.*model"),  # the old layout
    ({"unet": {}}, r"^diffusion\.unet: unknown key"),
    ({"model": {"dit": {"dpeth": 3}}}, r"model\.dit\.dpeth: unknown key; did you mean 'depth'\?"),
    ({"model": {"dit": {"depth": "deep"}}}, r"model\.dit\.depth: got 'deep' \(str\); expected int"),
    ({"model": {"dit": {"hidden_size": 30, "num_heads": 4}}}, r"model\.dit: DiTConfig\.hidden_size=30"),
    ({"model": {"unet": {"head_dim": 3}}, "denoiser": "dit"}, r"model\.unet: "),  # an unused section is checked too
    ({"model": {"vit": {}}}, r"model\.vit: unknown model 'vit'"),
    ({"model": {"dit": 4}}, r"^diffusion\.model\.dit: got 4 \(int\); expected dict"),
    ({"denoiser": "dti"}, r"^diffusion\.denoiser: unknown model 'dti': neither an architecture \(.*dit.*\)"),
    ({"denoiser": "tiny-vae"}, r"denoiser: 'tiny-vae' is registered as an architecture of role 'autoencoder'"),
    ({"denoiser": "DiT-S/2"}, r"diffusion\.model: DiT-S/2\.learn_sigma=true .* set model\.DiT-S/2\.learn_sigma=false"),
])
def test_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(RunConfig, {"diffusion": data})


# ---- weights through the registered converters --------------------------------------------------------------------


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_weights_takes_the_namings_from_the_registry(tmp_path):
    unet = _perturbed(UNet(tiny_unet_config()))
    ae = _perturbed(AutoencoderKL(tiny_vae_config()))
    dit = _perturbed(DiT(DiTConfig(sample_size=8, hidden_size=32, depth=1, num_heads=2)))
    files = {
        "unet-ours": ({k: v.contiguous() for k, v in unet.state_dict().items()}, UNet(tiny_unet_config()), "ours"),
        "unet-diffusers": (to_diffusers_unet_state_dict(unet.state_dict()), UNet(tiny_unet_config()), "diffusers"),
        "unet-ldm": (to_ldm_unet_state_dict(unet.state_dict(), unet.config, prefix="model.diffusion_model."),
                     UNet(tiny_unet_config()), "ldm"),
        "vae-diffusers": (to_diffusers_vae_state_dict(ae.state_dict()), AutoencoderKL(tiny_vae_config()),
                          "diffusers"),
        "dit-ours": (dit.state_dict(), DiT(dit.config), "ours"),
    }
    for name, (state, fresh, naming) in files.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        assert load_weights(fresh, path) == naming, name
        assert _same(fresh, {"unet": unet, "vae": ae, "dit": dit}[name.split("-")[0]]), name
    # a DiT's foreign namings are Wan's (diffusers, original): a U-Net file is refused, naming the module's class
    # and why each converter did not apply
    with pytest.raises(ValueError, match=r"known namings for this DiT .*diffusers: .*not Wan-shaped.*wan: "):
        load_weights(DiT(dit.config), tmp_path / "unet-diffusers.safetensors")
    with pytest.raises(ValueError, match=r"for this UNet .*diffusers: .*ldm: "):
        load_weights(UNet(tiny_unet_config()), tmp_path / "dit-ours.safetensors")


def test_provider_modules_are_found_without_a_list():
    """A model module that registers itself is found by reading the package (no list to edit when adding one)."""
    from models.registry import provider_modules

    found = provider_modules()
    assert {"models.dit", "models.unet", "models.autoencoder"} <= set(found)
    assert "models.attention" not in found and "models.registry" not in found
