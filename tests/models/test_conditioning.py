"""models.conditioning: field metadata, batch ops, trimming, null conditioning and CFG dropout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from condmaker import TinyCond, make_cond, null_of
from torch import Tensor

from models.conditioning import (
    DROPOUT_GROUPS,
    Conditioning,
    FieldSpec,
    batch_size_of,
    cat_conditioning,
    cond_field,
    drop_conditioning,
    dropout_mask,
    expand_batch,
    field_specs,
    first_frame_conditioning,
    group_fields,
    noise_augment,
    nulled,
    select,
    trim_together,
    where,
)


def text_cond(batch: int, length: int, valid: list[int], seed: int = 0) -> Conditioning:
    """A project Conditioning whose row i has ``valid[i]`` leading valid tokens, plus a micro-conditioning vector."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(length).expand(batch, length) < torch.tensor(valid).unsqueeze(1)
    return Conditioning(context=torch.randn(batch, length, 4, generator=g), context_mask=mask,
                        pooled=torch.randn(batch, 4, generator=g), vector=torch.randn(batch, 3, generator=g))


# --------------------------------------------------------------------------------------------- field metadata


def test_project_fields_declare_their_groups():
    specs = field_specs(Conditioning)
    assert {n for n, s in specs.items() if s.group == "text"} == {"context", "context_mask", "pooled"}
    assert specs["vector"].group is None  # kept in both branches
    assert specs["class_labels"] == FieldSpec("class", "given")
    assert DROPOUT_GROUPS == ("text",)  # today's behaviour: dropout nulls the text only
    assert group_fields(Conditioning(), DROPOUT_GROUPS) == ["context", "context_mask", "pooled"]
    with pytest.raises(ValueError, match=r"unknown conditioning groups \['audio'\]; Conditioning has groups"):
        group_fields(Conditioning(), ("audio",))
    with pytest.raises(TypeError, match="sequence of group names"):
        group_fields(Conditioning(), "text")
    with pytest.raises(ValueError, match="FieldSpec.null"):
        FieldSpec("image", null="noise")


def test_a_new_field_is_one_line_with_its_metadata():
    """An image-conditioning field (SVD-style first-frame latents) is added by declaring it; dropout then nulls it by
    its rule (zeros) when its group is asked for, and the ops carry it along."""

    @dataclass
    class VideoConditioning(Conditioning):
        first_frame: Optional[Tensor] = cond_field("image", null="zeros")  # (B, C, h, w) first-frame latents
        fps: Optional[Tensor] = cond_field(None)  # (B,) frames per second, kept in both branches

    c = text_cond(4, 6, [2, 3, 6, 1])
    c = VideoConditioning(**c.tensors(), first_frame=torch.randn(4, 2, 3, 3) + 5.0, fps=torch.full((4,), 8.0))
    null = Conditioning(context=torch.zeros(1, 6, 4), context_mask=torch.ones(1, 6, dtype=torch.bool),
                        pooled=torch.zeros(1, 4))
    both, mask = drop_conditioning(c, null, 1.0, groups=("text", "image"))
    assert mask.all() and torch.equal(both.first_frame, torch.zeros(4, 2, 3, 3))
    assert torch.equal(both.context, torch.zeros(4, 6, 4)) and torch.equal(both.fps, c.fps)
    only_image, _ = drop_conditioning(c, None, 1.0, groups=("image",))  # a zeros-rule group needs no null given
    assert torch.equal(only_image.context, c.context) and not only_image.first_frame.any()
    assert cat_conditioning(c, c).first_frame.shape == (8, 2, 3, 3) and select(c, 1).fps.shape == (1,)


# --------------------------------------------------------------------------------------------- batch ops


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
    c = Conditioning(context=torch.randn(2, 3, 4), pooled=torch.randn(2, 4))
    n = Conditioning(context=torch.zeros(1, 3, 4), pooled=torch.zeros(1, 4))
    both = cat_conditioning(expand_batch(n, 2), c)
    assert both.batch_size == 4 and both.context_mask is None and both.class_labels is None
    dropped, mask = drop_conditioning(c, n, p=1.0)
    assert mask.all() and torch.equal(dropped.context, torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="no tensor"):
        _ = Conditioning().batch_size


# --------------------------------------------------------------------------------------------- trimming


def test_trim_context_and_trim_together_are_exact_cuts():
    c = text_cond(3, 10, [2, 4, 3])
    t = c.trim_context()
    assert t.context.shape == (3, 4, 4) and torch.equal(t.context, c.context[:, :4]) and t.vector is c.vector
    null = text_cond(1, 10, [6], seed=1)
    a, b = trim_together(c, null)
    assert a.context.shape[1] == b.context.shape[1] == 6 and torch.equal(b.context_mask, null.context_mask[:, :6])
    assert torch.equal(a.pooled, c.pooled)
    bare = Conditioning(context=torch.randn(2, 5, 4))  # no mask: nothing to trim
    assert trim_together(bare, Conditioning(context=torch.randn(1, 5, 4)))[0].context.shape[1] == 5
    assert trim_together(Conditioning(vector=torch.ones(2, 3)))[0].context is None


# --------------------------------------------------------------------------------------------- null and dropout


def test_nulled_replaces_the_text_and_keeps_micro_conditioning():
    c, null = text_cond(3, 4, [4, 4, 4]), text_cond(1, 4, [1], seed=7)
    n = nulled(c, null)
    assert torch.equal(n.context, null.context.expand(3, -1, -1)) and torch.equal(n.pooled[2], null.pooled[0])
    assert torch.equal(n.context_mask, null.context_mask.expand(3, -1))
    assert n.vector is c.vector  # micro-conditioning stays in the unconditional branch
    assert torch.equal(nulled(c, null, groups=None).context, null.context.expand(3, -1, -1))


def test_dropout_stream_is_one_uniform_per_sample_whatever_p():
    for p in (0.0, 0.1, 0.5, 1.0):
        mask = dropout_mask(7, p, torch.Generator().manual_seed(11))
        assert torch.equal(mask, torch.rand(7, generator=torch.Generator().manual_seed(11)) < p)
    c, null = text_cond(7, 4, [1, 2, 3, 4, 1, 2, 3]), text_cond(1, 4, [1], seed=2)
    g = torch.Generator().manual_seed(11)
    _, m = drop_conditioning(c, null, 0.4, g)
    after = torch.rand(1, generator=g)
    ref = torch.Generator().manual_seed(11)
    ref_mask = torch.rand(7, generator=ref) < 0.4
    assert torch.equal(m, ref_mask) and torch.equal(after, torch.rand(1, generator=ref))  # exactly 7 draws


def test_dropout_rate_and_exact_replacement():
    n = 20000
    cond = TinyCond(context=torch.randn(n, 2, 3), mask=torch.ones(n, 2, dtype=torch.bool), pooled=torch.randn(n, 3))
    null = TinyCond(context=torch.full((1, 2, 3), -7.0), mask=torch.tensor([[True, False]]), pooled=torch.zeros(1, 3))
    new, dropped = drop_conditioning(cond, null, p=0.1, generator=torch.Generator().manual_seed(0),
                                     groups=("text", "style"))
    assert dropped.dtype == torch.bool and dropped.shape == (n,)
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    assert bool((new.context[dropped] == -7.0).all())
    assert bool((new.mask[dropped] == torch.tensor([True, False])).all())
    assert bool((new.pooled[dropped] == 0).all())
    assert torch.equal(new.context[~dropped], cond.context[~dropped])
    assert torch.equal(new.mask[~dropped], cond.mask[~dropped])
    assert torch.equal(new.pooled[~dropped], cond.pooled[~dropped])
    assert new.num_frames == cond.num_frames


def test_dropout_is_reproducible_and_respects_groups():
    cond, null = make_cond(64, 1), null_of(64)
    a, mask_a = drop_conditioning(cond, null, 0.5, torch.Generator().manual_seed(3), groups=None)
    b, mask_b = drop_conditioning(cond, null, 0.5, torch.Generator().manual_seed(3), groups=None)
    assert torch.equal(mask_a, mask_b) and torch.equal(a.context, b.context)
    only_text, mask = drop_conditioning(cond, null, 0.5, torch.Generator().manual_seed(3), groups=("text",))
    assert torch.equal(mask, mask_a)
    assert torch.equal(only_text.pooled, cond.pooled)  # untouched group
    assert torch.equal(only_text.context, a.context)
    none, m0 = drop_conditioning(cond, null, 0.0, groups=None)
    assert not m0.any() and torch.equal(none.context, cond.context)
    all_, m1 = drop_conditioning(cond, null, 1.0, groups=None)
    assert m1.all() and torch.equal(all_.context, null.context)
    with pytest.raises(ValueError, match="p: got 1.5"):
        drop_conditioning(cond, null, 1.5)
    with pytest.raises(ValueError, match="unknown conditioning groups"):
        drop_conditioning(cond, null, 0.5, groups=("image",))


def test_dropout_on_the_project_type_matches_the_former_text_fields_rule():
    """Default dropout = the former stage constant TEXT_FIELDS: rows mixed by torch.where, other fields untouched."""
    c, null = trim_together(text_cond(6, 8, [2, 5, 3, 1, 4, 2]), text_cond(1, 8, [1], seed=3))
    new, m = drop_conditioning(c, null, 0.5, torch.Generator().manual_seed(9))
    assert m.any() and not m.all()
    for name in ("context", "context_mask", "pooled"):
        expected = torch.where(m.reshape((-1,) + (1,) * (getattr(c, name).ndim - 1)),
                               getattr(null, name).expand_as(getattr(c, name)), getattr(c, name))
        assert torch.equal(getattr(new, name), expected), name
    assert new.vector is c.vector  # micro-conditioning is no dropout group


# --------------------------------------------------------------------------------------------- image-to-video (SVD)


def i2v_cond(batch: int, frames: int = 3, seed: int = 0) -> Conditioning:
    """Text + SVD-style image conditioning: first-frame latents broadcast over ``frames``, one image token, the
    augmentation level and a micro-conditioning vector."""
    g = torch.Generator().manual_seed(seed)
    text = text_cond(batch, 4, [4] * batch, seed=seed)
    latents = torch.randn(batch, 2, 1, 3, 3, generator=g).expand(batch, 2, frames, 3, 3) + 3.0  # (B, C, T, h, w)
    embeds = torch.randn(batch, 1, 5, generator=g) + 3.0  # (B, N, D)
    return Conditioning(**text.tensors(), image_latents=latents, image_embeds=embeds,
                        aug_strength=torch.rand(batch, generator=g) * 0.1 + 0.01)


def text_null() -> Conditioning:
    """The text encoder's null: text fields only, batch 1, no image fields (they are None)."""
    return text_cond(1, 4, [1], seed=99)


def test_image_to_video_fields_declare_their_groups():
    specs = field_specs(Conditioning)
    assert specs["image_latents"] == specs["image_embeds"] == FieldSpec("image", "zeros")
    assert specs["aug_strength"] == FieldSpec(None, "given")  # no group: kept in the unconditional branch
    assert group_fields(Conditioning(), ("image",)) == ["image_latents", "image_embeds"]
    assert group_fields(Conditioning(), ("text", "image")) == [
        "context", "context_mask", "pooled", "image_latents", "image_embeds"]
    assert DROPOUT_GROUPS == ("text",)  # the image is dropped only when asked for


def test_image_fields_null_to_zeros_of_the_batch_field_whatever_the_null_holds():
    c, null = i2v_cond(3), text_null()
    assert null.image_latents is None and null.image_embeds is None
    both = nulled(c, null, groups=("text", "image"))
    assert torch.equal(both.context, null.context.expand(3, -1, -1)) and torch.equal(both.pooled[1], null.pooled[0])
    assert both.image_latents.shape == (3, 2, 3, 3, 3) and not both.image_latents.any()
    assert both.image_embeds.shape == (3, 1, 5) and not both.image_embeds.any()
    assert both.aug_strength is c.aug_strength and both.vector is c.vector  # kept, as SVD keeps its added time ids
    only_image = nulled(c, null, groups=("image",))
    assert only_image.context is c.context and only_image.pooled is c.pooled and not only_image.image_embeds.any()
    assert not nulled(c, None, groups=("image",)).image_latents.any()  # a zeros-rule group needs no null at all
    with_image = Conditioning(**null.tensors(), image_embeds=torch.full((1, 1, 5), 7.0))
    assert not nulled(c, with_image, groups=("image",)).image_embeds.any()  # zeros, not the null's values
    with pytest.raises(ValueError, match=r"field 'context' \(group 'text'\) takes its null value from the null"):
        nulled(c, None, groups=("text",))


def test_dropout_drops_text_and_image_together_or_independently():
    n = 4000
    c = i2v_cond(n, seed=1)
    null = text_null()
    seed = 5
    together, m = drop_conditioning(c, null, 0.5, torch.Generator().manual_seed(seed), groups=("text", "image"))
    text_only, m_text = drop_conditioning(c, null, 0.5, torch.Generator().manual_seed(seed), groups=("text",))
    image_only, m_image = drop_conditioning(c, null, 0.5, torch.Generator().manual_seed(seed), groups=("image",))
    assert torch.equal(m, m_text) and torch.equal(m, m_image)  # one uniform per sample, whatever the groups
    assert abs(m.float().mean().item() - 0.5) < 0.03
    # together: a dropped row has the null text AND zero image; a kept row is untouched
    assert bool((together.context[m] == null.context).all()) and not together.image_latents[m].any()
    assert not together.image_embeds[m].any()
    for name in ("context", "context_mask", "pooled", "image_latents", "image_embeds"):
        assert torch.equal(getattr(together, name)[~m], getattr(c, name)[~m]), name
    assert together.aug_strength is c.aug_strength and together.vector is c.vector
    # text only: the image is never touched; image only: the text is never touched
    assert torch.equal(text_only.context, together.context) and text_only.image_latents is c.image_latents
    assert text_only.image_embeds is c.image_embeds
    assert image_only.context is c.context and image_only.pooled is c.pooled
    assert torch.equal(image_only.image_latents, together.image_latents)
    assert torch.equal(image_only.image_embeds, together.image_embeds)
    # independent rates (two draws): all four combinations occur, each row exactly as its two masks say
    step, m_t = drop_conditioning(c, null, 0.3, torch.Generator().manual_seed(1), groups=("text",))
    step, m_i = drop_conditioning(step, None, 0.4, torch.Generator().manual_seed(2), groups=("image",))
    text_dropped = (step.context == null.context).flatten(1).all(dim=1)
    image_dropped = ~step.image_embeds.flatten(1).any(dim=1)
    assert torch.equal(text_dropped, m_t) and torch.equal(image_dropped, m_i)
    assert torch.equal(~step.image_latents.flatten(1).any(dim=1), m_i)
    for a in (False, True):
        for b in (False, True):
            share = ((m_t == a) & (m_i == b)).float().mean().item()
            assert abs(share - (0.3 if a else 0.7) * (0.4 if b else 0.6)) < 0.03, (a, b, share)


def test_text_only_conditionings_behave_bit_identically():
    """With the image fields left None, nothing changes: the same mask stream, the same rows (the former
    torch.where rule), and asking for the image group as well is a no-op."""
    c, null = trim_together(text_cond(6, 8, [2, 5, 3, 1, 4, 2]), text_cond(1, 8, [1], seed=3))
    assert set(c.tensors()) == {"context", "context_mask", "pooled", "vector"}
    new, m = drop_conditioning(c, null, 0.5, torch.Generator().manual_seed(9))
    both, m2 = drop_conditioning(c, null, 0.5, torch.Generator().manual_seed(9), groups=("text", "image"))
    assert torch.equal(m, m2) and m.any() and not m.all()
    for name in ("context", "context_mask", "pooled"):
        expected = torch.where(m.reshape((-1,) + (1,) * (getattr(c, name).ndim - 1)),
                               getattr(null, name).expand_as(getattr(c, name)), getattr(c, name))
        assert torch.equal(getattr(new, name), expected) and torch.equal(getattr(both, name), expected), name
    for out in (new, both, nulled(c, null, ("text", "image"))):
        assert out.image_latents is None and out.image_embeds is None and out.aug_strength is None
        assert out.vector is c.vector
    assert cat_conditioning(c, c).image_latents is None and select(c, 1).image_embeds is None


def test_noise_augment_adds_gaussian_noise_of_the_given_std():
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(noise_augment(x, 0.0, torch.Generator().manual_seed(0)), x)
    out = noise_augment(x, 0.02, torch.Generator().manual_seed(0))
    eps = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x + 0.02 * eps, rtol=0, atol=1e-7)
    per_sample = noise_augment(x, torch.tensor([0.0, 0.1, 0.5, 1.0]), torch.Generator().manual_seed(0))
    assert torch.equal(per_sample[0], x[0])
    torch.testing.assert_close(per_sample[2], x[2] + 0.5 * eps[2], rtol=0, atol=1e-6)
    big = noise_augment(torch.zeros(2, 3, 64, 64), torch.tensor([0.1, 1.0]), torch.Generator().manual_seed(1))
    assert abs(big[0].std().item() - 0.1) < 0.005 and abs(big[1].std().item() - 1.0) < 0.05
    half = noise_augment(x.bfloat16(), 0.1, torch.Generator().manual_seed(0))
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"expected a float or one per sample \(4,\)"):
        noise_augment(x, torch.ones(3))
    with pytest.raises(ValueError, match="must be >= 0"):
        noise_augment(x, -0.1)


def test_first_frame_conditioning_encodes_the_noised_frame_and_broadcasts_it():
    from models.autoencoder import AutoencoderKL, tiny_vae_config

    torch.manual_seed(0)
    vae = AutoencoderKL(tiny_vae_config()).eval()
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        lat = first_frame_conditioning(vae, pixels, 5, 0.02, torch.Generator().manual_seed(3))
        noisy = noise_augment(pixels, 0.02, torch.Generator().manual_seed(3))
        expected = vae.encode(noisy).mode()  # SVD: the posterior mode of the noised frame, unscaled
        assert lat.shape == (2, vae.latent_channels, 5, 4, 4)
        for t in range(5):
            assert torch.equal(lat[:, :, t], expected)
        image = first_frame_conditioning(vae, pixels, None, 0.0)
        assert torch.equal(image, vae.encode(pixels).mode())  # (B, C, h, w); strength 0: the clean frame
        scaled = first_frame_conditioning(vae, pixels, 2, torch.tensor([0.0, 0.0]), scaled=True)
        assert torch.equal(scaled[:, :, 1], vae.scale_latents(image))
    c = Conditioning(image_latents=lat, aug_strength=torch.full((2,), 0.02))
    assert not nulled(c, None, ("image",)).image_latents.any()  # the broadcast view nulls like any field
    with pytest.raises(ValueError, match=r"expected one frame \(B, C, H, W\)"):
        first_frame_conditioning(vae, pixels[:, :, None], 5, 0.02)


def test_guidance_with_image_and_text_nulled_together():
    """ClassifierFreeGuidance's unconditional branch, built with nulled(groups=("text", "image")), carries the null
    text and zero image conditioning (aug_strength kept); SVD's per-frame scales apply frame by frame."""
    from training.diffusion.guidance import ClassifierFreeGuidance, frame_guidance_scale

    seen: list[Conditioning] = []

    def denoiser(x: Tensor, t: Tensor, c: Conditioning) -> Tensor:
        seen.append(c)
        text = (c.context.mean(dim=(1, 2)) + c.pooled.mean(dim=1)).reshape(-1, 1, 1, 1, 1)  # (B, 1, 1, 1, 1)
        image = c.image_latents.mean(dim=(1, 3, 4))[:, None, :, None, None]  # (B, 1, T, 1, 1)
        embed = c.image_embeds.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1)
        return x * (1 + text) + image + embed + c.aug_strength.reshape(-1, 1, 1, 1, 1)

    c, null = i2v_cond(2, frames=4, seed=2), text_null()
    uncond = nulled(c, null, groups=("text", "image"))
    x, t = torch.randn(2, 2, 4, 3, 3), torch.tensor([10, 10])
    guided = ClassifierFreeGuidance(denoiser, c, uncond, 3.0)(x, t)
    stacked = seen[-1]
    assert stacked.batch_size == 4  # one forward over [uncond; cond]
    assert torch.equal(stacked.context[:2], null.context.expand(2, -1, -1))
    assert not stacked.image_latents[:2].any() and not stacked.image_embeds[:2].any()
    assert torch.equal(stacked.image_latents[2:], c.image_latents)
    assert torch.equal(stacked.image_embeds[2:], c.image_embeds)
    assert torch.equal(stacked.aug_strength, torch.cat([c.aug_strength, c.aug_strength]))
    both_dropped = Conditioning(context=null.context.expand(2, -1, -1), context_mask=null.context_mask.expand(2, -1),
                                pooled=null.pooled.expand(2, -1), vector=c.vector,
                                image_latents=torch.zeros_like(c.image_latents), image_embeds=torch.zeros(2, 1, 5),
                                aug_strength=c.aug_strength)
    u_out, c_out = denoiser(x, t, both_dropped), denoiser(x, t, c)
    torch.testing.assert_close(guided, u_out + 3.0 * (c_out - u_out), rtol=0, atol=1e-5)
    scales = frame_guidance_scale(1.0, 3.0, 4)  # SVD's linearly increasing guidance
    per_frame = ClassifierFreeGuidance(denoiser, c, uncond, scales)(x, t)
    torch.testing.assert_close(per_frame, u_out + scales.reshape(1, 1, 4, 1, 1) * (c_out - u_out), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="image_latents is None on one side only"):
        ClassifierFreeGuidance(denoiser, c, null, 3.0)  # the text encoder's null alone: build it with nulled()
