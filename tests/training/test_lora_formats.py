"""LoRA files that travel (issue 14, point 5): our adapters written in diffusers/PEFT and kohya layouts load in
diffusers' own loaders with the outputs of ``--lora``, and diffusers-made and kohya files load into ``--lora``
with the outputs of diffusers' loaders; every key must land on a layer."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from models.conditioning import Conditioning
from models.convert import config_from_diffusers_unet, from_diffusers_unet_state_dict
from models.unet import UNet
from training.finetune import (
    LoraAdapterConfig,
    add_lora,
    attach_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
)
from training.lora_formats import DIFFUSERS_METADATA_KEY

CTX = 24
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            norm_num_groups=8, cross_attention_dim=CTX, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TOL = 1e-5


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05, only_lora: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not only_lora or "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def pair(**overrides):
    """diffusers' UNet2DConditionModel (random weights) and our U-Net holding the same weights."""
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**{**UNET, **overrides}).eval()
    perturb(ref, 1)
    cfg = config_from_diffusers_unet(dict(ref.config))
    ours = UNet(cfg).eval()
    ours.load_state_dict(from_diffusers_unet_state_dict(ref.state_dict(), cfg), strict=True)
    return ref, ours


def batch():
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, CTX, generator=g)
    return x, torch.tensor([30, 700]), ctx


def theirs_out(ref, x, t, ctx):
    with torch.no_grad():
        return ref(x, t, encoder_hidden_states=ctx).sample


def ours_out(model, x, t, ctx):
    with torch.no_grad():
        return model(x, t, Conditioning(context=ctx))


def diffusers_load(ref, path, name="lora"):
    """What ``pipe.load_lora_weights(path)`` does for the U-Net of a Stable Diffusion pipeline (same class
    methods, kohya conversion included), without building the pipeline's other parts."""
    state, alphas, meta = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, ref, adapter_name=name, metadata=meta)
    return ref


def trained_adapter(ours, targets=("attention", "feedforward", "projection"), rank=4, alpha=8.0, rslora=False):
    cfg = LoraAdapterConfig(rank=rank, alpha=alpha, targets=list(targets), rslora=rslora)
    model = add_lora(ours, cfg)
    perturb(model, 5, scale=0.2, only_lora=True)  # B starts at 0: make the update real
    return model.eval(), cfg


# ------------------------------------------------------------------------------------------------ ours → them


@pytest.mark.parametrize("fmt,rslora", [("diffusers", False), ("kohya", True)])
def test_our_adapter_exported_loads_in_diffusers_with_our_outputs(tmp_path, fmt, rslora):
    ref, ours = pair()
    x, t, ctx = batch()
    base = ours_out(ours, x, t, ctx)
    model, cfg = trained_adapter(ours, rslora=rslora)
    path = save_adapter(model, tmp_path / f"a-{fmt}.safetensors", cfg, denoiser="unet", base_sha256=None, format=fmt)
    ours_lora = ours_out(model, x, t, ctx)
    assert (ours_lora - base).abs().max() > 1e-2  # the adapter changes the output
    keys = list(load_file(str(path)))
    if fmt == "diffusers":
        assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
        assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight" in keys
    else:
        assert all(k.startswith("lora_unet_") for k in keys)
        assert "lora_unet_down_blocks_0_attentions_0_proj_in.alpha" in keys
    diffusers_load(ref, path)
    n_adapted = sum(1 for n, _ in ref.named_parameters() if "lora_A" in n)
    assert n_adapted == len(keys) // (2 if fmt == "diffusers" else 3)  # every layer injected, none left out
    assert (theirs_out(ref, x, t, ctx) - ours_lora).abs().max() <= TOL

    # ... and our --lora reads the exported file back with the same outputs (at scale 0.6 as well)
    _, fresh = pair()
    adapted = attach_adapters(fresh, [(load_adapter(path), 0.6)])
    ref.set_adapters(["lora"], [0.6])
    assert (ours_out(adapted, x, t, ctx) - theirs_out(ref, x, t, ctx)).abs().max() <= TOL


# ------------------------------------------------------------------------------------------------ them → ours


def diffusers_made_lora(ref, tmp_path):
    """A LoRA made by diffusers/peft (``unet.add_adapter``, random B, one layer at another rank and alpha), saved
    with ``save_lora_weights`` and its adapter metadata, as diffusers' training scripts do."""
    config = LoraConfig(r=4, lora_alpha=6, init_lora_weights="gaussian",
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj"],
                        rank_pattern={"^down_blocks.0.attentions.0.proj_in": 2},
                        alpha_pattern={"^down_blocks.0.attentions.0.proj_in": 5})
    ref.add_adapter(config, adapter_name="made")
    perturb(ref, 9, scale=0.2, only_lora=True)
    state = get_peft_model_state_dict(ref, adapter_name="made")
    diffusers.StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=state,
                                                        unet_lora_adapter_metadata=config.to_dict(),
                                                        weight_name="made.safetensors")
    return tmp_path / "made.safetensors", state, config


def test_diffusers_made_lora_loads_into_ours_like_diffusers_load_lora_weights(tmp_path):
    ref, ours = pair()
    x, t, ctx = batch()
    path, _, _ = diffusers_made_lora(ref, tmp_path)
    expected = theirs_out(ref, x, t, ctx)
    fresh_ref, _ = pair()
    assert (theirs_out(diffusers_load(fresh_ref, path), x, t, ctx) - expected).abs().max() <= TOL  # their loader
    adapted = attach_adapters(ours, [(load_adapter(path), 1.0)])
    assert (ours_out(adapted, x, t, ctx) - expected).abs().max() <= TOL
    merge_adapters(adapted)  # --lora merges by default
    assert (ours_out(adapted, x, t, ctx) - expected).abs().max() <= TOL


def test_kohya_file_loads_into_ours_and_in_diffusers_alike(tmp_path):
    ref, ours = pair()
    x, t, ctx = batch()
    _, state, config = diffusers_made_lora(ref, tmp_path)
    expected = theirs_out(ref, x, t, ctx)
    # kohya's key scheme (sd-scripts networks/lora.py): "lora_unet_" + the module path with "_" for ".",
    # lora_down = A, lora_up = B, and a scalar alpha per layer (scale alpha / rank)
    kohya = {}
    for key, tensor in state.items():
        module, _, which = key.rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if which.startswith('A') else 'up'}.weight"] = tensor.contiguous()
        proj = module == "down_blocks.0.attentions.0.proj_in"
        kohya[f"{name}.alpha"] = torch.tensor(5.0 if proj else float(config.lora_alpha))
    path = tmp_path / "kohya.safetensors"
    save_file(kohya, str(path))
    fresh_ref, _ = pair()
    assert (theirs_out(diffusers_load(fresh_ref, path), x, t, ctx) - expected).abs().max() <= TOL
    adapted = attach_adapters(ours, [(load_adapter(path), 1.0)])
    assert (ours_out(adapted, x, t, ctx) - expected).abs().max() <= TOL


def test_kohya_sdxl_style_ldm_names_load_into_ours(tmp_path):
    """kohya names SDXL layers after the original LDM/SGM U-Net (input_blocks_…); diffusers remaps them by the
    U-Net config, and so do we."""
    ref, ours = pair()
    x, t, ctx = batch()
    model, cfg = trained_adapter(ours, targets=("attention",))
    expected = ours_out(model, x, t, ctx)
    src = load_file(str(save_adapter(model, tmp_path / "k.safetensors", cfg, denoiser="unet", base_sha256=None,
                                     format="kohya")))
    from models.convert import LDM_UNET_PREFIX, diffusers_name, ldm_unet_name

    _, bare = pair()
    names = {diffusers_name(n + ".weight")[:-7].replace(".", "_"): n for n, _ in bare.named_modules()}
    ldm = {}
    for key, tensor in src.items():
        stem, dot, suffix = key.partition(".")
        ours_name = names[stem[len("lora_unet_"):]]
        ldm_name = ldm_unet_name(ours_name + ".weight", bare.config).removeprefix(LDM_UNET_PREFIX)[:-7]
        ldm_name = ldm_name.replace(".", "_")
        ldm[f"lora_unet_{ldm_name}{dot}{suffix}"] = tensor
    assert any("input_blocks" in k for k in ldm)
    path = tmp_path / "sgm.safetensors"
    save_file(ldm, str(path))
    adapted = attach_adapters(bare, [(load_adapter(path), 1.0)])
    assert (ours_out(adapted, x, t, ctx) - expected).abs().max() <= TOL


# ------------------------------------------------------------------------------------------------ refusals


def test_a_key_that_matches_nothing_is_an_error_naming_it(tmp_path):
    ref, ours = pair()
    path, state, _ = diffusers_made_lora(ref, tmp_path)
    meta = {DIFFUSERS_METADATA_KEY: json.dumps({"unet.r": 4, "unet.lora_alpha": 6})}
    bad = dict(state, **{"down_blocks.9.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32),
                         "down_blocks.9.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 4)})
    save_file({f"unet.{k}": v.contiguous() for k, v in bad.items()}, str(tmp_path / "bad.safetensors"), meta)
    with pytest.raises(ValueError, match=r"bad\.safetensors: LoRA key 'unet\.down_blocks\.9\.attentions\.0\.proj_in' "
                                         "matches no layer"):
        attach_adapters(ours, [(load_adapter(tmp_path / "bad.safetensors"), 1.0)])
    te = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 8),
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(8, 4)}
    save_file(te, str(tmp_path / "te.safetensors"))
    with pytest.raises(ValueError, match="text-encoder layers .*lora_te_text_model_encoder_layers_0_self_attn_q_proj"):
        attach_adapters(pair()[1], [(load_adapter(tmp_path / "te.safetensors"), 1.0)])
    save_file({"lora_unet_conv_in.hada_w1_a": torch.zeros(2, 2)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(ValueError, match="hada_w1_a"):
        load_adapter(tmp_path / "loha.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="plain.safetensors: not a LoRA file"):
        load_adapter(tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="format: got 'comfy'"):
        save_adapter(trained_adapter(pair()[1])[0], tmp_path / "x.safetensors", LoraAdapterConfig(), denoiser="unet",
                     base_sha256=None, format="comfy")


# ------------------------------------------------------------------------------------------------ DiT


def test_pixart_adapter_in_diffusers_layout_has_diffusers_transformer_names(tmp_path):
    """PixArt: ``transformer.`` keys with diffusers' module paths. diffusers' PixArtTransformer2DModel has no LoRA
    loader, so the file is injected with peft exactly as ``load_lora_adapter`` would (the metadata's LoraConfig)."""
    from peft import inject_adapter_in_model

    from models.dit import DiT
    from models.dit_checkpoints import config_from_diffusers_transformer, from_diffusers_dit_state_dict

    torch.manual_seed(0)
    ref = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                             out_channels=8, num_layers=2, cross_attention_dim=24, sample_size=8,
                                             patch_size=2, caption_channels=20, interpolation_scale=2).eval()
    perturb(ref, 2)
    base_state = {k: v.clone() for k, v in ref.state_dict().items()}
    cfg = config_from_diffusers_transformer(dict(ref.config))
    ours = DiT(cfg).eval()
    ours.load_state_dict(from_diffusers_dit_state_dict(ref.state_dict(), cfg), strict=True)
    model, acfg = trained_adapter(ours, targets=("attention", "feedforward"))
    path = save_adapter(model, tmp_path / "p.safetensors", acfg, denoiser="dit", base_sha256=None, format="diffusers")
    state = load_file(str(path))
    assert "transformer.transformer_blocks.1.attn2.to_out.0.lora_B.weight" in state
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()[DIFFUSERS_METADATA_KEY])
    config = LoraConfig(**{k[len("transformer."):]: v for k, v in meta.items()})
    inject_adapter_in_model(config, ref, adapter_name="default")
    result = set_peft_model_state_dict(ref, {k[len("transformer."):]: v for k, v in state.items()})
    assert not [k for k in result.unexpected_keys if "lora" in k]
    g = torch.Generator().manual_seed(4)
    x, t, context = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([20.0, 900.0]), torch.randn(2, 6, 20,
                                                                                                   generator=g)
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=context, timestep=t, added_cond_kwargs=None).sample
        got = model(x, t, Conditioning(context=context))
    assert (got - expected).abs().max() <= TOL
    fresh = DiT(cfg).eval()
    fresh.load_state_dict(from_diffusers_dit_state_dict(base_state, cfg), strict=True)
    adapted = attach_adapters(fresh, [(load_adapter(path), 1.0)])
    with torch.no_grad():
        assert (adapted(x, t, Conditioning(context=context)) - expected).abs().max() <= TOL
