"""An image DiT inflated into a factorised video DiT computes the image DiT frame by frame at initialisation, its
temporal blocks then learn, frames are told apart by the temporal blocks' RoPE, and image-to-video input channels
start silent."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.conditioning import Conditioning
from models.dit import DiT, DiTConfig

IMAGE = DiTConfig(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, context_dim=16,
                  pooled_dim=8)


def _trained_like(config: DiTConfig, seed: int = 0) -> DiT:
    """A DiT whose zero-initialised layers (adaLN-Zero gates, final layer) are perturbed, as after training."""
    torch.manual_seed(seed)
    model = DiT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _cond(b: int, frames_latent: torch.Tensor | None = None) -> Conditioning:
    g = torch.Generator().manual_seed(3)
    return Conditioning(context=torch.randn(b, 5, 16, generator=g), pooled=torch.randn(b, 8, generator=g),
                        image_latents=frames_latent)


def _per_frame(image: DiT, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    return torch.stack([image(x[:, :, i], t, cond) for i in range(x.shape[2])], dim=2)


@pytest.mark.parametrize("concat", [False, True])
def test_inflated_dit_is_the_image_dit_per_frame(concat):
    image = _trained_like(IMAGE)
    video = DiT.from_image_dit(image, concat_image_latents=concat)
    assert video.config.depth == 4 and video.config.attention_layout == "factorised"
    assert video.config.frame_position == "temporal_rope" and video.config.video
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 5, 8, 8, generator=g), torch.tensor([30.0, 700.0])
    cond = _cond(2, torch.randn(2, 4, 8, 8, generator=g) if concat else None)
    out = video(x, t, cond)
    torch.testing.assert_close(out, _per_frame(image, x, t, cond), rtol=0, atol=2e-6)
    # image blocks sit at the even positions, the new temporal blocks at the odd ones
    for i, block in enumerate(image.blocks):
        for name, value in block.state_dict().items():
            torch.testing.assert_close(video.blocks[2 * i].state_dict()[name], value, rtol=0, atol=0)
    assert video.blocks[1].cross_attn is None and video.blocks[0].cross_attn is not None


def test_inflated_temporal_blocks_learn_and_then_mix_frames():
    image = _trained_like(IMAGE)
    video = DiT.from_image_dit(image)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 3, 8, 8, generator=g), torch.tensor([100.0, 500.0])
    cond = _cond(2)
    video(x, t, cond).square().mean().backward()
    temporal = [n for n, p in video.named_parameters() if n.startswith(("blocks.1.", "blocks.3."))
                and p.grad is not None and p.grad.abs().sum() > 0]
    assert any("adaLN_modulation" in n for n in temporal)  # the zero gates get a gradient from the first step
    with torch.no_grad():  # after an update of the temporal blocks the frames influence each other
        for name, p in video.named_parameters():
            if name.startswith(("blocks.1.", "blocks.3.")):
                p.add_(0.05 * torch.randn_like(p))
        y = x.clone()
        y[:, :, 2] += 1.0  # change the last frame only
        diff = (video(y, t, cond) - video(x, t, cond))[:, :, 0].abs().max()
    assert diff > 1e-4  # the first frame's output now depends on another frame


def test_temporal_rope_tells_frames_apart():
    """With temporal RoPE (and no frame table) the model is not invariant to reordering frames."""
    image = _trained_like(IMAGE)
    video = DiT.from_image_dit(image)
    with torch.no_grad():
        for name, p in video.named_parameters():
            if name.startswith(("blocks.1.", "blocks.3.")):
                p.add_(0.1 * torch.randn_like(p))
        g = torch.Generator().manual_seed(4)
        x, t = torch.randn(1, 4, 3, 8, 8, generator=g), torch.tensor([200.0])
        cond = _cond(1)
        out = video(x, t, cond)
        flipped = video(x.flip(2), t, cond).flip(2)
    assert (out - flipped).abs().max() > 1e-4
    # the contrast: with the frame RoPE switched off the same weights are equivariant to reversing the frames
    video._rope_cache.clear()
    video.frame_rope_tables = lambda frames, device: (torch.ones(frames, 8), torch.zeros(frames, 8))
    with torch.no_grad():
        torch.testing.assert_close(video(x.flip(2), t, cond).flip(2), video(x, t, cond), rtol=0, atol=1e-5)


def test_inflation_config_checks():
    image = _trained_like(IMAGE)
    wrong = DiT.inflated_config(IMAGE, hidden_size=64, num_heads=2)
    with pytest.raises(ValueError, match="hidden_size=64"):
        DiT.from_image_dit(image, config=wrong)
    ok = dataclasses.replace(DiT.inflated_config(IMAGE), gradient_checkpointing=True)
    assert DiT.from_image_dit(image, config=ok).config.gradient_checkpointing
    with pytest.raises(ValueError, match="must be an image DiT"):
        DiT.from_image_dit(DiT(DiT.inflated_config(IMAGE)))
    with pytest.raises(ValueError, match="temporal_rope"):
        DiTConfig(**{**dataclasses.asdict(IMAGE), "video": True, "frame_position": "temporal_rope"})


def test_image_latents_shape_errors():
    video = DiT(DiT.inflated_config(IMAGE, concat_image_latents=True))
    x, t = torch.randn(1, 4, 3, 8, 8), torch.tensor([10.0])
    with pytest.raises(ValueError, match="image_latents"):
        video(x, t, _cond(1))
    with pytest.raises(ValueError, match=r"cond.image_latents has shape \(1, 4, 2, 8, 8\)"):
        video(x, t, _cond(1, torch.randn(1, 4, 2, 8, 8)))
    assert video(x, t, _cond(1, torch.randn(1, 4, 1, 8, 8))).shape == x.shape


def test_full_attention_inflation_is_exact_on_still_clips_and_moves_otherwise():
    image = _trained_like(IMAGE)
    video = DiT.from_image_dit(image, layout="full", concat_image_latents=True)
    assert video.config.depth == IMAGE.depth and video.config.attention_layout == "full"
    assert video.config.frame_position == "embedding" and video.config.frame_embedding
    g = torch.Generator().manual_seed(5)
    still = torch.randn(2, 4, 1, 8, 8, generator=g)
    t = torch.tensor([20.0, 600.0])
    cond = _cond(2, torch.randn(2, 4, 8, 8, generator=g))
    out = video(still.expand(2, 4, 4, 8, 8).contiguous(), t, cond)
    ref = image(still[:, :, 0], t, cond)
    torch.testing.assert_close(out, ref[:, :, None].expand_as(out), rtol=0, atol=2e-6)
    moving = torch.randn(2, 4, 4, 8, 8, generator=g)  # frames differ: tokens see the other frames
    assert (video(moving, t, cond) - _per_frame(image, moving, t, cond)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="frame_embedding=true"):
        DiTConfig(**{**dataclasses.asdict(IMAGE), "video": True, "frame_position": "embedding"})
