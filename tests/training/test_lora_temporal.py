"""LoRA ``targets: [temporal]``: the layers each video denoiser declares as acting across frames (the video U-Net's
temporal ResBlocks / temporal transformer blocks / frame embeddings, a factorised DiT's odd blocks), alone or in a
union with the suffix groups; clear errors where a model has none; and what a temporal-only adapter can and cannot
change (what runs before the first temporal layer, one-frame clips where the temporal layers are skipped or reduce
to their value path)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from models.conditioning import Conditioning
from models.registry import build_model, get_preset
from training.finetune import (
    ADAPTABLE,
    LoraAdapterConfig,
    add_lora,
    base_state_dict,
    lora_target_names,
    weights_fingerprint,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Independent of the models' declarations: the names VideoLDM's new layers have in our video U-Net (the temporal
# ResBlock ``temporal``, ``temporal_blocks`` and ``frame_embed``), and a factorised DiT's odd block indices.
UNET_TEMPORAL = re.compile(r"(^|\.)(temporal|temporal_blocks\.\d+|frame_embed)\.")
DIT_TEMPORAL = re.compile(r"^blocks\.(1|3)\.")


def adaptable(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, ADAPTABLE)]


def randomize_adapters(model: nn.Module, keep: str = "") -> None:
    """Non-zero B for every adapter (an adapter starts at ΔW = 0); with ``keep``, only the adapters whose name
    matches that pattern get a non-zero B."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 if re.search(keep, n) else torch.zeros(p.shape))


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (zero-initialised gates and outputs would hide what a layer does)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def latte() -> nn.Module:
    return perturbed(build_model("latte-tiny"))


def latte_cond(b: int = 2) -> Conditioning:
    g = torch.Generator().manual_seed(5)
    return Conditioning(context=torch.randn(b, 3, 64, generator=g))


def video_unet(**overrides) -> nn.Module:
    return perturbed(build_model(get_preset("svd-unet-tiny", **overrides)))


def unet_cond(b: int = 2) -> Conditioning:
    g = torch.Generator().manual_seed(6)
    return Conditioning(image_embeds=torch.randn(b, 1, 32, generator=g),
                        image_latents=torch.randn(b, 4, 8, 8, generator=g), fps=torch.full((b,), 7.0),
                        motion_bucket=torch.full((b,), 127.0), aug_strength=torch.full((b,), 0.02))


def clip(frames: int, b: int = 2, seed: int = 7) -> torch.Tensor:
    return torch.randn(b, 4, frames, 8, 8, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------- selection


def test_temporal_targets_on_the_video_unet():
    model = build_model("svd-unet-tiny")
    names = adaptable(model)
    temporal = lora_target_names(model, ["temporal"])
    assert temporal == [n for n in names if UNET_TEMPORAL.search(n)]  # every temporal Linear/Conv, nothing else
    kinds = {type(m) for n, m in model.named_modules() if n in temporal}
    assert nn.Conv3d in kinds and nn.Linear in kinds  # the temporal ResBlocks' (k, 1, 1) convolutions too
    assert any(".temporal.conv1" in n for n in temporal) and any(".frame_embed." in n for n in temporal)
    assert not any(".add_embed." in n or n.startswith("time_embed") for n in temporal)  # conditioning MLPs
    # attention alone includes the temporal blocks' attention too; the union is exactly both sets, in module order
    attention = lora_target_names(model, ["attention"])
    both = lora_target_names(model, ["attention", "temporal"])
    assert set(both) == set(attention) | set(temporal) and both == [n for n in names if n in set(both)]
    spatial = set(both) - set(temporal)  # the spatial transformers' attention
    assert spatial and not any(UNET_TEMPORAL.search(n) for n in spatial)
    assert lora_target_names(model, ["temporal", "attention"]) == both  # order of groups does not matter


def test_temporal_targets_on_the_factorised_dit():
    model = build_model("latte-tiny")
    temporal = lora_target_names(model, ["temporal"])
    assert temporal == [n for n in adaptable(model) if DIT_TEMPORAL.match(n)]
    assert {n.split(".")[1] for n in temporal} == {"1", "3"} and not any("cross_attn" in n for n in temporal)
    union = lora_target_names(model, ["attention", "temporal"])
    spatial_attention = [n for n in lora_target_names(model, ["attention"]) if not DIT_TEMPORAL.match(n)]
    assert sorted(union) == sorted(spatial_attention + temporal)
    assert any(n.startswith("blocks.0.cross_attn") for n in union)


def test_models_without_temporal_layers_are_refused_clearly():
    full = build_model(get_preset("latte-tiny", attention_layout="full"))  # a full-attention video DiT
    refusal = r"targets: temporal: this DiT \(attention_layout='full'.*no separate temporal layers"
    with pytest.raises(ValueError, match=refusal):
        lora_target_names(full, ["temporal"])
    with pytest.raises(ValueError, match="targets: temporal: .*no separate temporal layers"):
        lora_target_names(build_model("dit-tiny"), ["attention", "temporal"])
    from models.unet import UNet, UNetConfig

    image_unet = UNet(UNetConfig(block_out_channels=[16, 32], layers_per_block=1, attention_levels=[False, True],
                                 transformer_depth=[1, 1], num_heads=None, head_dim=16, cross_attention_dim=32,
                                 norm_num_groups=8))
    with pytest.raises(ValueError, match="targets: temporal: UNet has no temporal layers"):
        lora_target_names(image_unet, ["temporal"])
    assert lora_target_names(full, ["attention"])  # the other groups still work on it
    with pytest.raises(ValueError, match="targets: .*unknown; allowed: attention, feedforward, projection, temporal"):
        LoraAdapterConfig(targets=["temporal", "spatial"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="names a group twice"):
        LoraAdapterConfig(targets=["temporal", "temporal"])


# --------------------------------------------------------------------------------------------------- behaviour


def block_outputs(model: nn.Module, x: torch.Tensor, cond: Conditioning) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's output and each DiT block's output."""
    seen: list[torch.Tensor] = []
    blocks = [m for n, m in model.named_modules() if re.fullmatch(r"(.*\.)?blocks\.\d", n)]
    hooks = [b.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone())) for b in blocks]
    try:
        with torch.no_grad():
            out = model(x, torch.tensor([300, 700]), cond)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def test_a_temporal_adapter_on_the_dit_acts_only_from_the_first_temporal_block():
    base = latte()
    x, cond = clip(4), latte_cond()
    out0, blocks0 = block_outputs(base, x, cond)
    model = add_lora(latte(), LoraAdapterConfig(rank=4, targets=["temporal"]))
    randomize_adapters(model)
    out1, blocks1 = block_outputs(model, x, cond)
    assert len(blocks0) == len(blocks1) == 4
    assert torch.equal(blocks0[0], blocks1[0])  # the spatial block before any temporal one: untouched
    assert not torch.allclose(blocks0[1], blocks1[1]) and not torch.allclose(out0, out1)


def test_one_frame_clips_see_only_the_value_path_of_the_dits_temporal_attention():
    """On a one-frame clip a temporal block attends over a single token: its softmax weight is 1, so queries and
    keys cannot matter. Adapters on the temporal q/k only leave one-frame outputs exactly unchanged and change
    clips; adapters on the value path (to_v, to_out, feed-forward) change one-frame outputs too."""
    base = latte()
    cond = latte_cond()
    qk = add_lora(latte(), LoraAdapterConfig(rank=4, targets=["temporal"]))
    randomize_adapters(qk, keep=r"attn\.to_[qk]\.")
    with torch.no_grad():
        one, many = clip(1), clip(4)
        t = torch.tensor([300, 700])
        torch.testing.assert_close(qk(one, t, cond), base(one, t, cond), rtol=0, atol=1e-6)
        assert (qk(many, t, cond) - base(many, t, cond)).abs().max() > 1e-3
        value = add_lora(latte(), LoraAdapterConfig(rank=4, targets=["temporal"]))
        randomize_adapters(value, keep=r"(to_v|to_out|ff\.proj_out)\.")
        assert (value(one, t, cond) - base(one, t, cond)).abs().max() > 1e-3


def test_video_unet_one_frame_clips_skip_a_temporal_adapter():
    """With ``single_frame_is_image`` a one-frame clip skips every temporal layer: a temporal-only adapter cannot
    change it (a spatial one does), while it changes every multi-frame clip."""
    base = video_unet(single_frame_is_image=True)
    cond, t = unet_cond(), torch.tensor([300, 700])
    temporal = add_lora(video_unet(single_frame_is_image=True), LoraAdapterConfig(rank=4, targets=["temporal"]))
    randomize_adapters(temporal)
    attention = add_lora(video_unet(single_frame_is_image=True), LoraAdapterConfig(rank=4, targets=["attention"]))
    randomize_adapters(attention)
    with torch.no_grad():
        one, many = clip(1), clip(3)
        assert torch.equal(temporal(one, t, cond), base(one, t, cond))
        assert (temporal(many, t, cond) - base(many, t, cond)).abs().max() > 1e-3
        assert (attention(one, t, cond) - base(one, t, cond)).abs().max() > 1e-3


def test_training_a_temporal_adapter_changes_only_temporal_adapters():
    """A few optimizer steps on a clip-denoising loss: only adapters inside temporal blocks exist and move, the
    base weights keep their fingerprint, and the first (spatial) block still computes what the base computes."""
    torch.manual_seed(0)
    model = add_lora(latte(), LoraAdapterConfig(rank=4, targets=["temporal"]))
    fingerprint = weights_fingerprint(base_state_dict(model))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(r"\.blocks\.(1|3)\.", n) for n in trainable)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, cond, t = clip(4), latte_cond(), torch.tensor([300, 700])
    target = torch.flip(x, dims=[2])  # something only a frame-mixing layer can fit
    losses = []
    for _ in range(5):
        loss = (model(x, t, cond) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert any("lora_B" in n for n in moved)
    assert weights_fingerprint(base_state_dict(model)) == fingerprint
    _, trained = block_outputs(model.eval(), x, cond)
    _, original = block_outputs(latte(), x, cond)
    assert torch.equal(trained[0], original[0]) and not torch.allclose(trained[3], original[3])
