"""The one conditioning contract every denoiser consumes, and everything done to it on the way.

Every denoiser in :mod:`models` is called ``denoiser(x_t, timesteps, cond)`` and returns a tensor shaped like
``x_t``. ``cond`` is a :class:`Conditioning`; a model reads the fields its config asks for and ignores the rest,
so the same batch drives a U-Net or a DiT, an image model or a video model. Conditioning is routed by *field name*,
never by tensor rank.

This module owns, in one place:

* the fields, each declared with :func:`cond_field` and its :class:`FieldSpec`: the *dropout group* it belongs to
  (fields of one group are replaced together by classifier-free-guidance dropout) and its *null value rule*;
* the batch operations (:func:`cat_conditioning`, :func:`select`, :func:`where`, :func:`expand_batch`,
  :func:`batch_size_of`, :func:`map_batched`), which work on any dataclass of batch-first tensors (also a bare tensor,
  tuples, lists and dicts), so a guider or a test may use its own conditioning type;
* trimming of padded text tokens (:meth:`Conditioning.trim_context`, :func:`trim_together`);
* conditioning dropout for CFG training (:func:`dropout_mask`, :func:`drop_conditioning`) and the null conditioning
  of a batch (:func:`nulled`).

Adding a field (fps, frame count, motion score, first-frame latents, an image embedding) is one line here: the field
with its metadata, e.g. ``first_frame: Optional[Tensor] = cond_field("image", null="zeros")``. Batch ops, dropout and
guidance pick it up by its metadata; nothing else changes. This module imports nothing distributed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence, get_args

import torch
from torch import Tensor

NullRule = Literal["given", "zeros"]
NULL_RULES: tuple[str, ...] = get_args(NullRule)

#: The groups conditioning dropout replaces unless told otherwise: the text (Ho & Salimans 2022 drop the prompt).
DROPOUT_GROUPS: tuple[str, ...] = ("text",)

_SPEC_KEY = "conditioning"  # where a FieldSpec lives in a dataclass field's metadata


@dataclass(frozen=True)
class FieldSpec:
    """How one conditioning field takes part in dropout and guidance."""

    group: Optional[str] = None  # dropout group: fields of one group are nulled together; None: never nulled
    null: NullRule = "given"  # a nulled field's value: 'given' (from the null conditioning passed in) | 'zeros'

    def __post_init__(self) -> None:
        if self.null not in NULL_RULES:
            raise ValueError(f"FieldSpec.null: got {self.null!r}; expected one of {list(NULL_RULES)}")
        if self.group is not None and not self.group:
            raise ValueError("FieldSpec.group: an empty name; use None for a field that is never nulled")


def cond_field(group: Optional[str] = None, null: NullRule = "given", default: Any = None) -> Any:
    """A conditioning dataclass field (default ``default``) with its :class:`FieldSpec` in the metadata."""
    return dataclasses.field(default=default, metadata={_SPEC_KEY: FieldSpec(group, null)})


@dataclass
class Conditioning:
    """What a denoiser may be conditioned on. Every tensor field has the batch on its first axis.

    Attributes:
        context: per-token text states ``(B, L, D)`` for cross-attention. Group ``text``.
        context_mask: ``(B, L)`` bool, True where a token may be attended to; None means all tokens are valid.
            Group ``text``.
        pooled: pooled text embedding ``(B, Dp)`` (SDXL adds it to the timestep embedding). Group ``text``.
        vector: an extra conditioning vector ``(B, Dv)``, e.g. SDXL original-size / crop / target-size
            micro-conditioning already turned into Fourier features (:func:`models.embeddings.fourier_features`).
            No group: kept in the unconditional branch, as SDXL does.
        class_labels: ``(B,)`` int64 class ids for class-conditional models (ImageNet-style benchmarks). Group
            ``class``; its null (the model's null class id) comes from the null conditioning given; not dropped by
            default (:data:`DROPOUT_GROUPS`).
        image_latents: image-to-video conditioning (Stable Video Diffusion, Blattmann et al. 2023): the
            noise-augmented latent of the conditioning frame, ``(B, C, h, w)`` or broadcast over the frames
            ``(B, C, T, h, w)`` (:func:`first_frame_conditioning`); a model concatenates it to ``x_t``'s channels.
            Group ``image``, nulled to zeros.
        image_embeds: ``(B, N, D)`` image tokens of the conditioning frame from a vision tower
            (:class:`models.image_encoder.ImageEncoder`; SVD: the pooled CLIP embedding, ``N = 1``), used as
            cross-attention context where the model's config says so. Group ``image``, nulled to zeros.
        aug_strength: ``(B,)`` noise-augmentation level of ``image_latents`` (:func:`noise_augment`), which SVD feeds
            to the network with fps and motion bucket. No group: kept in the unconditional branch, as SVD does.
        fps: ``(B,)`` frame rate of the clip (float), an SVD micro-conditioning number (Fourier features added to the
            timestep embedding, :class:`models.video_unet.VideoUNet`). No group: kept in both branches.
        motion_bucket: ``(B,)`` SVD's motion bucket id (a motion score, 0–255; 127 in SVD's sampling), also added
            to the timestep embedding as Fourier features. No group: kept in both branches.

    A clip's frame count is not a field: models read it from ``x_t``'s shape ``(B, C, T, H, W)``. Per-sample video
    signals (fps, frame count, motion score as SVD uses them) are tensor fields of no group, kept in both branches.
    An image-conditioning field (first-frame latents, an image embedding) goes in group ``image`` with
    ``null="zeros"`` (SVD / InstructPix2Pix drop the image by zeroing it).
    """

    context: Optional[Tensor] = cond_field("text")
    context_mask: Optional[Tensor] = cond_field("text")
    pooled: Optional[Tensor] = cond_field("text")
    vector: Optional[Tensor] = cond_field(None)
    class_labels: Optional[Tensor] = cond_field("class")
    image_latents: Optional[Tensor] = cond_field("image", null="zeros")
    image_embeds: Optional[Tensor] = cond_field("image", null="zeros")
    aug_strength: Optional[Tensor] = cond_field(None)
    fps: Optional[Tensor] = cond_field(None)
    motion_bucket: Optional[Tensor] = cond_field(None)

    def tensors(self) -> dict[str, Tensor]:
        """The fields that are tensors, by name."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }

    @property
    def batch_size(self) -> int:
        size = batch_size_of(self)
        if size is None:
            raise ValueError("Conditioning holds no tensor, so it has no batch size")
        return size

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Conditioning":
        """Move every tensor; floating tensors also take ``dtype`` (masks and labels keep theirs)."""
        moved = {}
        for name, t in self.tensors().items():
            moved[name] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
        return dataclasses.replace(self, **moved)

    def trim_context(self) -> "Conditioning":
        """Drop trailing token positions that no sample may attend to (exact: masked keys add nothing).

        CLIP pads every prompt to 77 tokens; a batch of short captions needs only the first few, which makes
        cross-attention several times cheaper. Without a mask nothing is trimmed.
        """
        if self.context is None or self.context_mask is None:
            return self
        valid = self.context_mask.any(dim=0).nonzero()
        length = int(valid.max()) + 1 if valid.numel() else 1
        if length == self.context.shape[1]:
            return self
        return _cut_context(self, length)


def _cut_context(cond: Conditioning, length: int) -> Conditioning:
    mask = cond.context_mask[:, :length] if cond.context_mask is not None else None
    return dataclasses.replace(cond, context=cond.context[:, :length], context_mask=mask)


def trim_together(*conds: Conditioning) -> tuple[Conditioning, ...]:
    """Cut every conditioning's context to the longest valid length among them (exact; see ``trim_context``).

    Used for a batch and its null conditioning, which must share one token length to be concatenated (CFG's one
    batched forward) or mixed row by row (dropout). Conditionings without a context are returned unchanged.
    """
    lengths = [c.trim_context().context.shape[1] for c in conds if c.context is not None]
    if not lengths:
        return tuple(conds)
    length = max(lengths)
    return tuple(c if c.context is None else _cut_context(c, length) for c in conds)


# ------------------------------------------------------------------------------------------- field metadata


def field_specs(cond: Any) -> dict[str, FieldSpec]:
    """Each init field of the dataclass ``cond`` (or its type) with its :class:`FieldSpec` (none declared: no group)."""
    if not dataclasses.is_dataclass(cond):
        raise TypeError(f"field_specs needs a conditioning dataclass, got {type(cond).__name__}")
    return {f.name: f.metadata.get(_SPEC_KEY, FieldSpec()) for f in dataclasses.fields(cond) if f.init}


def group_fields(cond: Any, groups: Sequence[str]) -> list[str]:
    """The names of ``cond``'s fields in ``groups``, in field order; an unknown group is an error."""
    if isinstance(groups, str):
        raise TypeError(f"groups: got the string {groups!r}; pass a sequence of group names, e.g. ({groups!r},)")
    specs = field_specs(cond)
    known = sorted({s.group for s in specs.values() if s.group is not None})
    unknown = [g for g in groups if g not in known]
    if unknown:
        name = cond.__name__ if isinstance(cond, type) else type(cond).__name__
        raise ValueError(f"unknown conditioning groups {unknown}; {name} has groups {known}")
    return [name for name, s in specs.items() if s.group in groups]


# ------------------------------------------------------------------------------------------- batch ops


def _is_batched(value: Any) -> bool:
    return isinstance(value, Tensor) and value.ndim >= 1


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b.to(a.device)))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects whose == is not a plain bool
        return a is b


def _combine(fn: Callable[[Tensor, Tensor], Tensor], a: Any, b: Any, path: str) -> Any:
    """Apply ``fn`` to matching batched tensors of ``a`` and ``b``; check the rest is equal."""
    if a is None or b is None:
        if a is None and b is None:
            return None
        raise ValueError(f"conditioning field {path or '<root>'} is None on one side only")
    if _is_batched(a) or _is_batched(b):
        if not (_is_batched(a) and _is_batched(b)):
            raise ValueError(f"conditioning field {path or '<root>'} is a batched tensor on one side only")
        return fn(a, b)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        if type(a) is not type(b):
            raise ValueError(f"conditioning field {path or '<root>'}: type {type(a).__name__} vs {type(b).__name__}")
        changes = {
            f.name: _combine(fn, getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}" if path else f.name)
            for f in dataclasses.fields(a)
            if f.init
        }
        return dataclasses.replace(a, **changes)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        if len(a) != len(b):
            raise ValueError(f"conditioning field {path or '<root>'}: lengths {len(a)} vs {len(b)}")
        items = [_combine(fn, x, y, f"{path}[{i}]") for i, x, y in zip(range(len(a)), a, b)]
        return type(a)(items)
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            raise ValueError(f"conditioning field {path or '<root>'}: keys {sorted(a)} vs {sorted(b)}")
        return {k: _combine(fn, a[k], b[k], f"{path}[{k!r}]") for k in a}
    if not _same(a, b):
        raise ValueError(f"conditioning field {path or '<root>'} differs and is not batched: {a!r} vs {b!r}")
    return a


def map_batched(fn: Callable[[Tensor], Tensor], cond: Any) -> Any:
    """Apply ``fn`` to every batched tensor in ``cond``; everything else (None, ints, 0-d tensors) is kept."""
    if _is_batched(cond):
        return fn(cond)
    if dataclasses.is_dataclass(cond) and not isinstance(cond, type):
        changes = {f.name: map_batched(fn, getattr(cond, f.name)) for f in dataclasses.fields(cond) if f.init}
        return dataclasses.replace(cond, **changes)
    if isinstance(cond, (tuple, list)):
        return type(cond)([map_batched(fn, v) for v in cond])
    if isinstance(cond, dict):
        return {k: map_batched(fn, v) for k, v in cond.items()}
    return cond


def batched_tensors(cond: Any) -> list[Tensor]:
    """All batched tensors in ``cond``, in field order."""
    found: list[Tensor] = []

    def visit(t: Tensor) -> Tensor:
        found.append(t)
        return t

    map_batched(visit, cond)
    return found


def batch_size_of(cond: Any) -> Optional[int]:
    """The common batch size of ``cond``'s tensors (``None`` if it holds none)."""
    sizes = {t.shape[0] for t in batched_tensors(cond)}
    if not sizes:
        return None
    if len(sizes) > 1:
        raise ValueError(f"conditioning tensors disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def expand_batch(cond: Any, batch_size: int) -> Any:
    """Broadcast batch-1 tensors to ``batch_size`` (e.g. a single null embedding); others must match."""

    def expand(t: Tensor) -> Tensor:
        if t.shape[0] == batch_size:
            return t
        if t.shape[0] == 1:
            return t.expand(batch_size, *t.shape[1:])
        raise ValueError(f"cannot broadcast a conditioning tensor of batch {t.shape[0]} to batch {batch_size}")

    return map_batched(expand, cond)


def cat_conditioning(a: Any, b: Any) -> Any:
    """Concatenate two conditioning objects along the batch dimension, field by field."""
    return _combine(lambda x, y: torch.cat([x, y.to(x.device)], dim=0), a, b, "")


def select(cond: Any, index: Tensor | slice | int | Sequence[int]) -> Any:
    """Index every batched tensor along the batch: a bool mask, index tensor/list or slice.

    An ``int`` index keeps the batch dimension (``select(c, 3)`` has batch 1).
    """
    if isinstance(index, int):
        index = slice(index, index + 1 if index != -1 else None)
    if isinstance(index, (list, tuple)):
        index = torch.as_tensor(index, dtype=torch.long)

    def take(t: Tensor) -> Tensor:
        return t[index.to(t.device) if isinstance(index, Tensor) else index]

    return map_batched(take, cond)


def where(mask: Tensor, a: Any, b: Any, fields: Optional[Sequence[str]] = None) -> Any:
    """Per-sample choice: rows of ``a`` where ``mask`` is True, rows of ``b`` elsewhere.

    ``mask`` is a ``(B,)`` bool tensor; batch-1 tensors broadcast. If ``fields`` names top-level dataclass fields,
    only those are mixed and every other field is taken from ``b`` unchanged.
    """
    if mask.ndim != 1:
        raise ValueError(f"mask must be 1-D (batch,), got shape {tuple(mask.shape)}")
    mask = mask.bool()

    def pick(x: Tensor, y: Tensor) -> Tensor:
        m = mask.to(y.device).reshape((-1,) + (1,) * (y.ndim - 1))
        return torch.where(m, x.to(y.device), y)

    if fields is None:
        return _combine(pick, a, b, "")
    if not (dataclasses.is_dataclass(b) and not isinstance(b, type)):
        raise ValueError("fields= is only supported for dataclass conditioning")
    names = {f.name for f in dataclasses.fields(b)}
    unknown = [f for f in fields if f not in names]
    if unknown:
        raise ValueError(f"unknown conditioning fields {unknown}; {type(b).__name__} has {sorted(names)}")
    changes = {name: _combine(pick, getattr(a, name), getattr(b, name), name) for name in fields}
    return dataclasses.replace(b, **changes)


# ------------------------------------------------------------------------------------------- null and dropout


def nulled(cond: Any, null: Any, groups: Optional[Sequence[str]] = DROPOUT_GROUPS) -> Any:
    """``cond`` with every field of ``groups`` replaced by its null value, the other fields kept.

    A field's null value follows its :class:`FieldSpec`: ``'given'`` takes the field of ``null`` (batch ``B`` or 1,
    broadcast; e.g. the text encoder's empty-prompt encoding), ``'zeros'`` zeros the batch's own field whatever
    ``null`` holds there (the text encoder's null leaves the image fields None; ``null`` may even be None when only
    zeros-rule groups are nulled). ``groups=None`` replaces the whole conditioning by ``null`` (any conditioning
    type, a bare tensor too). This is the unconditional branch of a batch for classifier-free guidance.
    """
    batch = batch_size_of(cond)
    if batch is None:
        raise ValueError("cond holds no batched tensor, cannot infer the batch size")
    if groups is None:
        return expand_batch(null, batch)
    specs = field_specs(cond)
    changes = {}
    for name in group_fields(cond, groups):
        value = getattr(cond, name)
        if specs[name].null == "zeros":
            changes[name] = map_batched(torch.zeros_like, value)  # from the batch's own field; null may lack it
        else:
            if not hasattr(null, name):
                raise ValueError(
                    f"nulled: field {name!r} (group {specs[name].group!r}) takes its null value from the null "
                    f"conditioning, but null is {type(null).__name__} without it"
                )
            changes[name] = expand_batch(getattr(null, name), batch)
    return dataclasses.replace(cond, **changes)


def dropout_mask(
    batch_size: int,
    p: float,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``(B,)`` bool mask, each entry True with probability ``p``.

    One uniform number per sample is drawn with ``generator`` on the generator's own device (on ``device`` without
    one) and compared with ``p``, whatever ``p``, so the random stream does not depend on the rate.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: got {p!r}; expected a probability in [0, 1]")
    device = torch.device(device)
    draw_device = generator.device if generator is not None else device
    u = torch.rand((batch_size,), generator=generator, device=draw_device)
    return (u < p).to(device)


def drop_conditioning(
    cond: Any,
    null: Any,
    p: float = 0.1,
    generator: Optional[torch.Generator] = None,
    groups: Optional[Sequence[str]] = DROPOUT_GROUPS,
) -> tuple[Any, Tensor]:
    """Replace each sample's conditioning of ``groups`` by its null value with probability ``p``.

    Classifier-free guidance training (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", Algorithm 1) trains
    one network as both the conditional and the unconditional model by nulling the conditioning of a random 10% of
    the samples.

    Args:
        cond: batch conditioning (a dataclass of batch-first tensors; with ``groups=None`` any conditioning).
        null: the null conditioning, batch ``B`` or 1 (broadcast); see :func:`nulled` for which fields it supplies.
        p: drop probability per sample.
        generator: ``torch.Generator`` for the draw (:func:`dropout_mask`).
        groups: the dropout groups nulled together (default :data:`DROPOUT_GROUPS`, the text); ``None``: the whole
            conditioning.

    Returns:
        ``(new_cond, dropped)``: dropped rows carry the null values exactly, the others are unchanged; ``dropped`` is
        the ``(B,)`` bool mask on ``cond``'s device.
    """
    batch = batch_size_of(cond)
    if batch is None:
        raise ValueError("cond holds no batched tensor, cannot infer the batch size")
    fields = None if groups is None else group_fields(cond, groups)
    mask = dropout_mask(batch, p, generator, batched_tensors(cond)[0].device)
    return where(mask, nulled(cond, null, groups), cond, fields=fields), mask


# ------------------------------------------------------------------------------------------- image-to-video


def noise_augment(
    x: Tensor, strength: float | Tensor, generator: Optional[torch.Generator] = None
) -> Tensor:
    """``x + strength * eps`` with ``eps ~ N(0, I)``: the noise augmentation of a conditioning frame.

    Stable Video Diffusion (Blattmann et al. 2023, "Stable Video Diffusion"; the ``cond_aug`` of Stability AI's
    sampling code, ``noise_aug_strength`` in diffusers) adds Gaussian noise of std
    ``aug_strength`` to the conditioning frame **in pixel space, before encoding it** (pixels in [-1, 1]), and feeds
    ``aug_strength`` to the network. :func:`first_frame_conditioning` therefore applies it to the pixels: the
    released SVD weights were trained on latents of noised pixels, and a given std means the same corruption for
    every autoencoder, whereas a std on latents depends on the autoencoder's latent scale. The function itself works
    on any tensor, latents included.

    Args:
        x: ``(B, ...)`` frames (pixels or latents).
        strength: the noise std, a float or one per sample ``(B,)``.
        generator: ``torch.Generator`` for the noise. The noise is drawn in float32 on the generator's device (on
            ``x``'s without one), so the result does not depend on ``x``'s device or dtype.

    Returns:
        a tensor like ``x`` (exactly ``x`` where the strength is 0).
    """
    strength_t = torch.as_tensor(strength, dtype=torch.float32)
    if strength_t.ndim > 1 or (strength_t.ndim == 1 and strength_t.shape[0] != x.shape[0]):
        raise ValueError(
            f"strength: got shape {tuple(strength_t.shape)}; expected a float or one per sample ({x.shape[0]},)"
        )
    if bool((strength_t < 0).any()):
        raise ValueError(f"strength: got {strength!r}; the noise std must be >= 0")
    draw_device = generator.device if generator is not None else x.device
    eps = torch.randn(x.shape, generator=generator, device=draw_device, dtype=torch.float32).to(x.device)
    std = strength_t.to(x.device).reshape((-1,) + (1,) * (x.ndim - 1)) if strength_t.ndim else strength_t.to(x.device)
    return (x.float() + std * eps).to(x.dtype)  # (B, ...)


def first_frame_conditioning(
    autoencoder: Any,
    first_frame_pixels: Tensor,
    num_frames: Optional[int],
    aug_strength: float | Tensor,
    generator: Optional[torch.Generator] = None,
    scaled: bool = False,
) -> Tensor:
    """The ``image_latents`` field of image-to-video conditioning, as Stable Video Diffusion builds it.

    The conditioning frame is noise-augmented in pixel space (:func:`noise_augment`, std ``aug_strength``), encoded
    as a one-frame clip (so a causal 3-D autoencoder encodes it on its own, as its first frame), and the posterior's
    mode is broadcast over the ``num_frames`` latent frames of ``x_t``, where the denoiser concatenates it to the
    input channels. SVD uses the *unscaled* mode (its conditioning embedder has scale factor 1, diffusers'
    pipeline takes ``latent_dist.mode()``): ``scaled=False``. ``scaled=True`` applies the autoencoder's
    ``scale_latents`` to put the conditioning in ``x_t``'s normalised latent space instead.

    Args:
        autoencoder: an autoencoder with ``encode(pixels) -> posterior`` (``posterior.mode()``) taking
            ``(B, C, T, H, W)`` clips, and ``scale_latents`` when ``scaled`` (:class:`models.autoencoder.AutoencoderKL`
            and the video autoencoders).
        first_frame_pixels: ``(B, C, H, W)`` pixels in [-1, 1].
        num_frames: the latent frame count ``T`` of ``x_t`` to broadcast over; ``None`` returns ``(B, Cz, h, w)``.
        aug_strength: the noise std, a float or ``(B,)`` (the same value goes in ``Conditioning.aug_strength``).
        generator: ``torch.Generator`` for the augmentation noise.
        scaled: return normalised latents (``scale_latents``) instead of SVD's raw posterior mode.

    Returns:
        ``(B, Cz, T, h, w)``, a broadcast view (every frame shares the storage of the one latent frame), or
        ``(B, Cz, h, w)`` when ``num_frames`` is None.
    """
    if first_frame_pixels.ndim != 4:
        raise ValueError(
            f"first_frame_pixels: got shape {tuple(first_frame_pixels.shape)}; expected one frame (B, C, H, W)"
        )
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames: got {num_frames!r}; expected an int >= 1 or None")
    noisy = noise_augment(first_frame_pixels, aug_strength, generator)  # (B, C, H, W)
    latents = autoencoder.encode(noisy.unsqueeze(2)).mode()  # (B, Cz, 1, h, w)
    if latents.ndim != 5 or latents.shape[2] != 1:
        raise ValueError(
            f"{type(autoencoder).__name__}.encode of a one-frame clip gave latents of shape {tuple(latents.shape)}; "
            "expected (B, Cz, 1, h, w)"
        )
    if scaled:
        latents = autoencoder.scale_latents(latents)
    if num_frames is None:
        return latents[:, :, 0]  # (B, Cz, h, w)
    batch, channels, _, height, width = latents.shape
    return latents.expand(batch, channels, num_frames, height, width)  # (B, Cz, T, h, w)


__all__ = [
    "DROPOUT_GROUPS",
    "NULL_RULES",
    "Conditioning",
    "FieldSpec",
    "batch_size_of",
    "batched_tensors",
    "cat_conditioning",
    "cond_field",
    "drop_conditioning",
    "dropout_mask",
    "expand_batch",
    "field_specs",
    "first_frame_conditioning",
    "group_fields",
    "map_batched",
    "noise_augment",
    "nulled",
    "select",
    "trim_together",
    "where",
]
