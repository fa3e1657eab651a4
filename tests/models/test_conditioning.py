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
    group_fields,
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
    with pytest.raises(ValueError, match=r"unknown conditioning groups \['image'\]; Conditioning has groups"):
        group_fields(Conditioning(), ("image",))
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
