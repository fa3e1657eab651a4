"""UNet: shapes, conditioning routes, video folding, save/load, checkpointing, config checks, full-size presets."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.attention import set_attention_backend
from models.blocks import ResBlock
from models.conditioning import Conditioning
from models.embeddings import fourier_features
from models.unet import (
    UNET_PRESETS,
    UNet,
    UNetConfig,
    sd15_unet_config,
    sd21_unet_config,
    sdxl_unet_config,
    tiny_unet_config,
)
from models.utils import count_parameters

CTX = 16


def tiny(**overrides) -> UNetConfig:
    base = dict(
        block_out_channels=[16, 32],
        layers_per_block=1,
        attention_levels=[True, True],
        transformer_depth=[1, 1],
        num_heads=[2, 4],
        cross_attention_dim=CTX,
        norm_num_groups=8,
    )
    base.update(overrides)
    return UNetConfig(**base)


def build(config: UNetConfig, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(config).eval()


def text(batch: int = 2, tokens: int = 5, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(context=torch.randn(batch, tokens, CTX, generator=g))


@pytest.mark.parametrize("size", [(16, 16), (13, 9)])
def test_output_shape_matches_input_including_odd_sizes(size):
    model = build(tiny(block_out_channels=[16, 32, 32], attention_levels=[False, True, True],
                       transformer_depth=[1, 2, 1], num_heads=[2, 4, 4]))  # fmt: skip
    x = torch.randn(2, 4, *size)
    with torch.no_grad():
        out = model(x, torch.tensor([1, 999]), text())
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_scalar_and_python_timesteps_broadcast():
    model, x, cond = build(tiny()), torch.randn(2, 4, 8, 8), text()
    with torch.no_grad():
        a = model(x, torch.tensor([250, 250]), cond)
        torch.testing.assert_close(model(x, torch.tensor(250), cond), a)
        torch.testing.assert_close(model(x, 250, cond), a)
        assert not torch.allclose(model(x, 10, cond), a)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, torch.tensor([1, 2, 3]), cond)


def test_context_and_mask_are_used():
    model, x, t = build(tiny()), torch.randn(2, 4, 8, 8), torch.tensor([5, 5])
    cond = text(tokens=6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 4:] = False
    changed = cond.context.clone()
    changed[:, 4:] += 10.0  # only masked-out tokens differ
    with torch.no_grad():
        masked = model(x, t, Conditioning(context=cond.context, context_mask=mask))
        masked_changed = model(x, t, Conditioning(context=changed, context_mask=mask))
        unmasked = model(x, t, cond)
        unmasked_changed = model(x, t, Conditioning(context=changed))
    torch.testing.assert_close(masked, masked_changed, rtol=0, atol=1e-6)
    assert not torch.allclose(unmasked, unmasked_changed, atol=1e-4)
    assert not torch.allclose(masked, unmasked, atol=1e-4)
    with pytest.raises(ValueError, match="context"):
        model(x, t, Conditioning())


def test_unconditional_u_net_needs_no_context():
    model = build(tiny(cross_attention_dim=None))
    assert not any("cross_attn" in k for k in model.state_dict())
    with torch.no_grad():
        assert model(torch.randn(1, 4, 8, 8), 3, Conditioning()).shape == (1, 4, 8, 8)


def test_class_labels_enter_the_embedding():
    model, x = build(tiny(num_classes=10)), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        a = model(x, 7, dataclasses.replace(text(), class_labels=torch.tensor([1, 2])))
        b = model(x, 7, dataclasses.replace(text(), class_labels=torch.tensor([1, 3])))
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="class_labels"):
        model(x, 7, text())


def test_text_time_embedding_reads_pooled_and_vector():
    model = build(tiny(addition_embed_type="text_time", addition_embed_input_dim=8 + 6 * 4, addition_time_embed_dim=4))
    x = torch.randn(2, 4, 8, 8)
    pooled, sizes = torch.randn(2, 8), torch.tensor([[64.0, 64, 0, 0, 64, 64], [64, 64, 0, 0, 64, 64]])
    base = dataclasses.replace(text(), pooled=pooled, vector=fourier_features(sizes, 4))
    other_sizes = sizes.clone()
    other_sizes[1, 2] = 8.0  # a different crop for the second sample
    with torch.no_grad():
        a = model(x, 3, base)
        b = model(x, 3, dataclasses.replace(base, vector=fourier_features(other_sizes, 4)))
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="pooled"):
        model(x, 3, text())
    with pytest.raises(ValueError, match="width"):
        model(x, 3, dataclasses.replace(base, vector=fourier_features(sizes[:, :5], 4)))


def test_video_is_denoised_frame_by_frame():
    model = build(tiny())
    video = torch.randn(2, 4, 3, 8, 8)  # (B, C, T, H, W)
    t, cond = torch.tensor([10, 600]), text()
    with torch.no_grad():
        out = model(video, t, cond)
        assert out.shape == video.shape
        for f in range(3):
            torch.testing.assert_close(out[:, :, f], model(video[:, :, f], t, cond), rtol=0, atol=1e-5)
    for bad in (torch.randn(4, 8, 8), torch.randn(1, 2, 4, 3, 8, 8)):
        with pytest.raises(ValueError, match=r"U-Net takes \(B, C, H, W\) images or \(B, C, T, H, W\) clips; got "
                                             rf"x_t of shape \({', '.join(map(str, bad.shape))}\)"):
            model(bad, 3, cond)


def test_attention_backends_agree():
    model, x, cond = build(tiny()), torch.randn(2, 4, 8, 8), text()
    cond.context_mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    with torch.no_grad():
        a = model(x, 3, cond)
        set_attention_backend(model, "math")
        b = model(x, 3, cond)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_num_heads_and_head_dim_build_the_same_network():
    """The two ways to size heads (LDM's num_heads vs num_head_channels) are interchangeable."""
    by_count = tiny(block_out_channels=[16, 32], num_heads=[2, 4], head_dim=None)
    by_width = tiny(block_out_channels=[16, 32], num_heads=None, head_dim=8)
    assert [by_count.heads_at(i) for i in range(2)] == [by_width.heads_at(i) for i in range(2)] == [(2, 8), (4, 8)]
    a, b = build(by_count, seed=4), build(by_width, seed=4)
    x, cond = torch.randn(1, 4, 8, 8), text(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(a(x, 1, cond), b(x, 1, cond), rtol=0, atol=0)
    assert a.down[0].attn[0].blocks[0].self_attn.heads == 2
    assert a.down[1].attn[0].blocks[0].self_attn.heads == 4


def test_deterministic_given_seed():
    x, cond = torch.randn(2, 4, 8, 8), text()
    a, b, c = build(tiny(), seed=1), build(tiny(), seed=1), build(tiny(), seed=2)
    with torch.no_grad():
        torch.testing.assert_close(a(x, 5, cond), b(x, 5, cond), rtol=0, atol=0)
        assert not torch.allclose(a(x, 5, cond), c(x, 5, cond))


def test_safetensors_round_trip(tmp_path):
    cfg = tiny(use_linear_projection=True, resnet_scale_shift=True)
    model = build(cfg, seed=7)
    path = tmp_path / "unet.safetensors"
    save_file(model.state_dict(), str(path))
    fresh = build(cfg, seed=8)
    x, cond = torch.randn(2, 4, 8, 8), text()
    with torch.no_grad():
        before = fresh(x, 9, cond)
        fresh.load_state_dict(load_file(str(path)), strict=True)
        after, expected = fresh(x, 9, cond), model(x, 9, cond)
    assert not torch.allclose(before, expected)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_gradient_checkpointing_same_loss_and_gradients():
    x, cond, t = torch.randn(2, 4, 8, 8), text(), torch.tensor([3, 700])
    cond.context_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])

    def loss_and_grads(checkpointing: bool):
        model = build(tiny(), seed=3).train()
        model.gradient_checkpointing = checkpointing
        calls = []
        for module in model.modules():
            if isinstance(module, ResBlock):
                module.register_forward_pre_hook(lambda *_: calls.append(1))
        loss = model(x, t, cond).pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    loss_a, grads_a, calls_a = loss_and_grads(False)
    loss_b, grads_b, calls_b = loss_and_grads(True)
    assert calls_b > calls_a  # blocks were recomputed in backward
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-7)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpointing_switch_reaches_every_block():
    model = UNet(tiny(gradient_checkpointing=True))
    assert model.gradient_checkpointing
    flags = [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    assert len(flags) > 4 and all(flags)
    model.gradient_checkpointing = False
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(attention_levels=[True]), "attention_levels"),
        (dict(transformer_depth=[1, 0]), "transformer_depth"),
        (dict(num_heads=[2, 4], head_dim=8), "num_heads"),
        (dict(num_heads=None, head_dim=None), "num_heads"),
        (dict(num_heads=[3, 4]), "split into heads"),
        (dict(block_out_channels=[16, 20]), "block_out_channels"),
        (dict(addition_embed_type="text_time"), "addition_embed_input_dim"),
        (dict(addition_embed_type="text"), "addition_embed_type"),
        (dict(attention_backend="flash"), "attention_backend"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny(**overrides)


@pytest.mark.parametrize(
    "make,expected",
    [(sd15_unet_config, 859_520_964), (sd21_unet_config, 865_910_724), (sdxl_unet_config, 2_567_463_684)],
)
def test_full_size_parameter_counts_on_meta(make, expected):
    with torch.device("meta"):
        model = UNet(make())
    assert all(p.is_meta for p in model.parameters())
    assert count_parameters(model) == expected


def test_sdxl_preset_heads_and_depths():
    cfg = sdxl_unet_config()
    assert [cfg.heads_at(i) for i in range(3)] == [(5, 64), (10, 64), (20, 64)]
    with torch.device("meta"):
        model = UNet(cfg)
    assert len(model.down[2].attn[0].blocks) == 10 and len(model.mid.attn.blocks) == 10
    assert len(model.down[0].attn) == 0 and model.add_embed.linear_1.in_features == 2816


def test_presets_are_valid_configs():
    for name, make in UNET_PRESETS.items():
        cfg = make()
        assert dataclasses.replace(cfg) == cfg, name
    model = build(tiny_unet_config())
    with torch.no_grad():
        out = model(torch.randn(1, 4, 8, 8), 1, Conditioning(context=torch.randn(1, 3, 64)))
    assert out.shape == (1, 4, 8, 8)


def test_presets_are_registered_in_the_model_registry():
    from models.registry import build_model, get_preset, list_presets

    assert {"sd15-unet", "sd21-unet", "sdxl-unet", "tiny-unet"} <= set(list_presets())
    assert get_preset("SD21-unet") == sd21_unet_config()
    model = build_model("sd15-unet", device="meta")
    assert isinstance(model, UNet) and count_parameters(model) == 859_520_964
