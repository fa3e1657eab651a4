"""Conditioning batch ops, classifier-free guidance and conditioning dropout, with a tiny real denoiser."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch import Tensor, nn

from training.diffusion import (
    DiffusionConfig,
    build_process,
    cat_conditioning,
    cfg_denoise,
    ddim_sample,
    drop_conditioning,
    euler_flow_sample,
    expand_batch,
    select,
    where,
)
from training.diffusion.cond_ops import batch_size_of


@dataclass
class TinyCond:
    context: Tensor  # (B, L, D) text tokens
    mask: Tensor  # (B, L) bool, True = valid token
    pooled: Optional[Tensor] = None  # (B, D)
    num_frames: int = 1  # not a tensor: shared by the batch


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


def make_cond(batch: int, seed: int, length: int = 5, dim: int = 8, pooled: bool = True) -> TinyCond:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, length, generator=g) > 0.3
    mask[:, 0] = True
    return TinyCond(
        context=torch.randn(batch, length, dim, generator=g),
        mask=mask,
        pooled=torch.randn(batch, dim, generator=g) if pooled else None,
        num_frames=3,
    )


def null_of(batch: int, length: int = 5, dim: int = 8, pooled: bool = True) -> TinyCond:
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, 0] = True
    return TinyCond(
        context=torch.zeros(batch, length, dim),
        mask=mask,
        pooled=torch.zeros(batch, dim) if pooled else None,
        num_frames=3,
    )


@pytest.fixture
def net() -> TinyDenoiser:
    torch.manual_seed(0)
    return TinyDenoiser()


# --------------------------------------------------------------------------------------------- cond ops


def test_cat_select_where_field_by_field():
    a, b = make_cond(2, 1), make_cond(3, 2, pooled=True)
    both = cat_conditioning(a, b)
    assert both.context.shape == (5, 5, 8) and both.mask.dtype == torch.bool and both.num_frames == 3
    assert torch.equal(both.context[:2], a.context) and torch.equal(both.pooled[2:], b.pooled)
    back = select(both, slice(2, None))
    assert torch.equal(back.context, b.context) and torch.equal(back.mask, b.mask)
    picked = select(both, torch.tensor([True, False, False, False, True]))
    assert torch.equal(picked.context, torch.stack([a.context[0], b.context[2]]))
    assert select(both, 4).context.shape[0] == 1
    mask = torch.tensor([True, False, True])
    null = null_of(3)
    mixed = where(mask, null, b)
    assert torch.equal(mixed.context[0], null.context[0]) and torch.equal(mixed.context[1], b.context[1])
    assert torch.equal(mixed.mask[1], b.mask[1]) and mixed.num_frames == 3
    assert batch_size_of(mixed) == 3


def test_none_fields_stay_none_and_mismatches_are_errors():
    a, b = make_cond(2, 1, pooled=False), make_cond(2, 2, pooled=False)
    assert cat_conditioning(a, b).pooled is None
    with pytest.raises(ValueError, match="pooled"):
        cat_conditioning(a, make_cond(2, 3, pooled=True))
    other = make_cond(2, 2, pooled=False)
    other.num_frames = 4
    with pytest.raises(ValueError, match="num_frames"):
        cat_conditioning(a, other)


def test_expand_batch_broadcasts_a_single_null():
    null = expand_batch(null_of(1), 4)
    assert null.context.shape == (4, 5, 8) and null.mask.shape == (4, 5)
    with pytest.raises(ValueError, match="broadcast"):
        expand_batch(make_cond(2, 0), 4)


def test_ops_work_on_the_project_conditioning_type():
    conditioning = pytest.importorskip("models.conditioning")
    c = conditioning.Conditioning(context=torch.randn(2, 3, 4), pooled=torch.randn(2, 4), num_frames=5)
    n = conditioning.Conditioning(context=torch.zeros(1, 3, 4), pooled=torch.zeros(1, 4), num_frames=5)
    both = cat_conditioning(expand_batch(n, 2), c)
    assert both.batch_size == 4 and both.context_mask is None and both.num_frames == 5
    dropped, mask = drop_conditioning(c, n, p=1.0)
    assert mask.all() and torch.equal(dropped.context, torch.zeros(2, 3, 4))


# --------------------------------------------------------------------------------------------- guidance


def test_guidance_one_is_the_conditional_output_in_one_forward(net):
    x, t, cond = torch.randn(3, 4, 6, 6), torch.tensor([10, 500, 999]), make_cond(3, 1)
    expected = net(x, t, cond)
    net.calls.clear()
    assert torch.equal(cfg_denoise(net, x, t, cond, null_of(3), guidance=1.0), expected)
    assert torch.equal(cfg_denoise(net, x, t, cond, None, guidance=7.5), expected)
    assert net.calls == [3, 3]  # single forwards on the conditional batch only


@pytest.mark.parametrize("shape", [(3, 4, 6, 6), (3, 4, 2, 6, 6)], ids=["image", "video"])
def test_batched_cfg_equals_two_separate_forwards(net, shape):
    x, t = torch.randn(shape), torch.tensor([10, 500, 999])
    cond, null = make_cond(3, 1), null_of(3)
    uncond_out, cond_out = net(x, t, null), net(x, t, cond)
    net.calls.clear()
    guided = cfg_denoise(net, x, t, cond, null, guidance=5.0)
    assert net.calls == [6]  # one batched forward
    assert torch.allclose(guided, uncond_out + 5.0 * (cond_out - uncond_out), atol=1e-5)
    # guidance acts on every channel, not only the first ones
    changed = (guided - cond_out).abs().flatten(2).amax(-1)  # (B, C)
    assert bool((changed > 1e-3).all())
    # guidance 0 gives the unconditional output
    assert torch.allclose(cfg_denoise(net, x, t, cond, null, guidance=0.0), uncond_out, atol=1e-6)


def test_single_null_is_broadcast_and_negative_prompt_is_just_another_null(net):
    x, t, cond = torch.randn(3, 4, 6, 6), torch.tensor([1, 2, 3]), make_cond(3, 1)
    assert torch.allclose(
        cfg_denoise(net, x, t, cond, null_of(1), 4.0), cfg_denoise(net, x, t, cond, null_of(3), 4.0), atol=1e-6
    )
    negative = make_cond(3, 9)
    expected = net(x, t, negative) + 4.0 * (net(x, t, cond) - net(x, t, negative))
    got = cfg_denoise(net, x, t, cond, negative, 4.0)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, cfg_denoise(net, x, t, cond, null_of(3), 4.0), atol=1e-3)


def test_guidance_rescale_restores_conditional_std(net):
    x, t, cond, null = torch.randn(2, 4, 6, 6), torch.tensor([5, 5]), make_cond(2, 1), null_of(2)
    cond_std = net(x, t, cond).flatten(1).std(1)
    full = cfg_denoise(net, x, t, cond, null, 7.0, guidance_rescale=1.0)
    assert torch.allclose(full.flatten(1).std(1), cond_std, rtol=1e-4)
    plain = cfg_denoise(net, x, t, cond, null, 7.0)
    half = cfg_denoise(net, x, t, cond, null, 7.0, guidance_rescale=0.5)
    assert torch.allclose(half, 0.5 * full + 0.5 * plain, atol=1e-5)


def test_samplers_use_batched_guidance(net):
    cond, null = make_cond(2, 1), null_of(2)
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    proc = build_process(DiffusionConfig(prediction="v_prediction"))
    net.calls.clear()
    guided = ddim_sample(net, proc, noise, cond, null, guidance=3.0, steps=4)
    assert net.calls == [4, 4, 4, 4]
    unguided = ddim_sample(net, proc, noise, cond, null, guidance=1.0, steps=4)
    assert torch.isfinite(guided).all() and not torch.allclose(guided, unguided)
    flow = build_process(DiffusionConfig(kind="flow"))
    net.calls.clear()
    out = euler_flow_sample(net, flow, noise, cond, null, guidance=3.0, steps=3)
    assert net.calls == [4, 4, 4] and out.shape == noise.shape


# --------------------------------------------------------------------------------------------- dropout


def test_dropout_rate_and_exact_replacement():
    n = 20000
    cond = TinyCond(context=torch.randn(n, 2, 3), mask=torch.ones(n, 2, dtype=torch.bool), pooled=torch.randn(n, 3))
    null = TinyCond(context=torch.full((1, 2, 3), -7.0), mask=torch.tensor([[True, False]]), pooled=torch.zeros(1, 3))
    new, dropped = drop_conditioning(cond, null, p=0.1, generator=torch.Generator().manual_seed(0))
    assert dropped.dtype == torch.bool and dropped.shape == (n,)
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    assert bool((new.context[dropped] == -7.0).all())
    assert bool((new.mask[dropped] == torch.tensor([True, False])).all())
    assert bool((new.pooled[dropped] == 0).all())
    assert torch.equal(new.context[~dropped], cond.context[~dropped])
    assert torch.equal(new.mask[~dropped], cond.mask[~dropped])
    assert torch.equal(new.pooled[~dropped], cond.pooled[~dropped])
    assert new.num_frames == cond.num_frames


def test_dropout_is_reproducible_and_respects_fields():
    cond, null = make_cond(64, 1), null_of(64)
    a, mask_a = drop_conditioning(cond, null, 0.5, torch.Generator().manual_seed(3))
    b, mask_b = drop_conditioning(cond, null, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(mask_a, mask_b) and torch.equal(a.context, b.context)
    only_text, mask = drop_conditioning(cond, null, 0.5, torch.Generator().manual_seed(3), fields=("context", "mask"))
    assert torch.equal(mask, mask_a)
    assert torch.equal(only_text.pooled, cond.pooled)  # untouched field
    assert torch.equal(only_text.context, a.context)
    none, m0 = drop_conditioning(cond, null, 0.0)
    assert not m0.any() and torch.equal(none.context, cond.context)
    all_, m1 = drop_conditioning(cond, null, 1.0)
    assert m1.all() and torch.equal(all_.context, null.context)
    with pytest.raises(ValueError, match="p: got 1.5"):
        drop_conditioning(cond, null, 1.5)
    with pytest.raises(ValueError, match="unknown conditioning fields"):
        drop_conditioning(cond, null, 0.5, fields=("text",))
