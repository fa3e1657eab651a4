"""Published transformer checkpoints into our :class:`models.dit.DiT`: DiT and PixArt-α/Σ, original and diffusers.

Four layouts are read (and written, for round trips and export), each a different naming of the same function:

* the original DiT checkpoints of Peebles & Xie (2023) (facebookresearch/DiT, ``DiT-XL-2-256x256.pt``):
  ``x_embedder.proj``, ``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table``, ``blocks.N.attn.qkv`` (q, k, v
  fused), ``blocks.N.attn.proj``, ``blocks.N.mlp.fc{1,2}``, ``blocks.N.adaLN_modulation.1``, ``final_layer.*`` and a
  fixed ``pos_embed`` table;
* the original PixArt-α/Σ checkpoints (Chen et al. 2023, 2024; ``PixArt-XL-2-*.pth``, possibly under a
  ``state_dict`` key): the same names plus ``t_block.1`` (adaLN-single), ``y_embedder.y_proj.fc{1,2}`` (the caption
  MLP), ``blocks.N.cross_attn.{q_linear,kv_linear,proj}`` (k, v fused), per-block ``scale_shift_table`` and, for the
  multi-scale 1024 px models, the size and aspect-ratio embedders ``csize_embedder`` / ``ar_embedder``;
* diffusers' ``DiTTransformer2DModel`` (or the older ``Transformer2DModel`` with ``norm_type="ada_norm_zero"``),
  which keeps one copy of the timestep and label embedders inside every block (``transformer_blocks.N.norm1.emb``):
  the copies of a converted checkpoint are identical, and a file whose copies differ is refused;
* diffusers' ``PixArtTransformer2DModel`` (``adaln_single.*``, ``caption_projection.*``, ``attn1``/``attn2``).

The resolution and aspect-ratio embedders of PixArt's multi-scale models (two small MLPs over 256 sinusoid features
each, the resolution one applied to height and width with shared weights) are exactly one MLP over the
concatenated features with block-diagonal weights; that is our ``vector_embedder`` with ``vector_dim = 768`` and
``cond.vector = pixart_size_vector(resolution, aspect_ratio)``.

How it works: every layout is a list of *rules*, each relating a few of our tensors to a few of theirs (a rename, a
fused projection, identical copies, block-diagonal MLPs). Writing applies the rules forwards; reading checks the
file's names against the names the rules give for the config (built on the meta device: nothing is allocated),
reports missing and unexpected names and shape mismatches with the layout's name, then applies them backwards, so
a load is complete (``load_state_dict(strict=True)`` then succeeds) or fails saying why.

Two details of diffusers' DiT differ from the original that its weights were trained with: the timestep sinusoid
uses ``downscale_freq_shift=1`` (frequencies ``10000^(-i/127)`` instead of ``10000^(-i/128)``) and the LayerNorm
before the MLP uses ``norm_eps`` (1e-5) instead of 1e-6. Our DiT computes the original; loading a diffusers DiT gives
the original model's outputs (tests compare with diffusers' module set to the original's two values).

Registered on the ``"dit"`` architecture (:mod:`models.registry`) as the naming ``diffusers`` (Wan, DiT or PixArt,
chosen by the config) and ``original`` (DiT or PixArt), which :func:`training.weights.load_weights` tries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:  # models.dit imports this module at its bottom: import it lazily at run time
    from models.dit import DiTConfig

StateDict = Mapping[str, Tensor]

SIZE_FEATURES = 256  # sinusoid features per size number (PixArt's ``additional_condition_proj``)
PIXART_VECTOR_DIM = 3 * SIZE_FEATURES  # height, width, aspect ratio
POS_EMBED_ATOL = 1e-3  # a stored position table (fp16 included) must equal ours to this


# --------------------------------------------------------------------------------------------------------------
# Rules: a few of our tensors <-> a few of theirs
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Our tensors ``ours`` are theirs ``theirs`` through ``forward`` (ours → theirs) and ``backward``."""

    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    forward: Callable[[list[Tensor]], list[Tensor]]
    backward: Callable[[list[Tensor]], list[Tensor]]


def rename(ours: str, theirs: str) -> Rule:
    """One tensor under another name."""
    return Rule((ours,), (theirs,), lambda t: t, lambda t: t)


def linear(ours: str, theirs: str) -> list[Rule]:
    """A linear layer's weight and bias under another module name."""
    return [rename(f"{ours}.{p}", f"{theirs}.{p}") for p in ("weight", "bias")]


def fused(ours: Sequence[str], theirs: str) -> list[Rule]:
    """Several linear layers stored as one (DiT's ``qkv``, PixArt's ``kv_linear``): rows concatenated in order."""
    n = len(ours)
    return [Rule(tuple(f"{o}.{p}" for o in ours), (f"{theirs}.{p}",),
                 lambda t: [torch.cat(t, dim=0)], lambda t, n=n: list(t[0].chunk(n, dim=0)))
            for p in ("weight", "bias")]


def copies(ours: str, theirs: Sequence[str]) -> Rule:
    """One tensor stored several times (diffusers' DiT keeps its embedders in every block): the copies must agree."""
    theirs = tuple(theirs)

    def backward(t: list[Tensor]) -> list[Tensor]:
        for name, other in zip(theirs[1:], t[1:]):
            if not torch.equal(other, t[0]):
                raise ValueError(f"{name} differs from {theirs[0]}: these copies of one embedder must be equal "
                                 "(our DiT has one timestep/label embedder)")
        return [t[0]]

    return Rule((ours,), theirs, lambda t: [t[0]] * len(theirs), backward)


def block_diagonal_mlp(ours: str, parts: Sequence[tuple[str, int]]) -> list[Rule]:
    """One ``Linear → SiLU → Linear`` MLP of ours whose two weights are block-diagonal over ``parts``: each part is
    (their MLP's prefix, how many consecutive inputs it is applied to with shared weights), its layers named
    ``linear_1`` / ``linear_2`` below the prefix (or ``mlp.0`` / ``mlp.2``: give the prefix ending in ``mlp`` and
    the layer names are chosen by :func:`_layer_names`)."""
    rules = []
    for layer in (1, 2):
        names = [_layer_names(prefix)[layer - 1] for prefix, _ in parts]
        repeats = [count for _, count in parts]
        for p in ("weight", "bias"):
            theirs = tuple(f"{n}.{p}" for n in names)
            ours_name = f"{ours}.linear_{layer}.{p}"
            rules.append(Rule((ours_name,), theirs,
                              lambda t, r=repeats, n=ours_name: _unblocks(t[0], r, n),
                              lambda t, r=repeats: [_blocks(t, r)]))
    return rules


def _layer_names(prefix: str) -> tuple[str, str]:
    return (f"{prefix}.0", f"{prefix}.2") if prefix.endswith(".mlp") else (f"{prefix}.linear_1", f"{prefix}.linear_2")


def _blocks(tensors: list[Tensor], repeats: list[int]) -> Tensor:
    """Block-diagonal matrix (or concatenated bias) of ``tensors``, each repeated as often as ``repeats`` says."""
    expanded = [t for t, r in zip(tensors, repeats) for _ in range(r)]
    if expanded[0].ndim == 1:
        return torch.cat(expanded)
    return torch.block_diag(*expanded)


def _unblocks(tensor: Tensor, repeats: list[int], name: str) -> list[Tensor]:
    """Inverse of :func:`_blocks` for equal-sized blocks; refuses a matrix that is not block-diagonal that way."""
    count = sum(repeats)
    if tensor.shape[0] % count or (tensor.ndim == 2 and tensor.shape[1] % count):
        raise ValueError(f"{name} of shape {tuple(tensor.shape)} does not split into {count} equal blocks")
    rows = tensor.shape[0] // count
    if tensor.ndim == 1:
        pieces = list(tensor.split(rows))
    else:
        cols = tensor.shape[1] // count
        pieces = [tensor[i * rows:(i + 1) * rows, i * cols:(i + 1) * cols] for i in range(count)]
        if not tensor.is_meta and not torch.equal(torch.block_diag(*pieces), tensor):
            raise ValueError(f"{name} is not block-diagonal over {count} blocks: it has no PixArt size-embedder form")
    out, i = [], 0
    for r in repeats:
        for j in range(1, r):
            if not tensor.is_meta and not torch.equal(pieces[i + j], pieces[i]):
                raise ValueError(f"{name}: blocks {i} and {i + j} should be the same shared embedder and differ")
        out.append(pieces[i])
        i += r
    return out


# --------------------------------------------------------------------------------------------------------------
# The four layouts
# --------------------------------------------------------------------------------------------------------------


def _family(config: DiTConfig) -> str:
    """``"dit"`` (class-conditional adaLN-Zero) or ``"pixart"`` (text, adaLN-single); ValueError for any other."""
    common = (config.sincos_pos_embed and not config.rope and config.attention_layout == "full"
              and config.patch_size_t == 1 and not config.qk_norm and not config.video
              and not getattr(config, "concat_image_latents", False) and config.pooled_dim is None)
    if common and not config.adaln_single and config.num_classes and config.context_dim is None \
            and config.vector_dim is None:
        return "dit"
    if common and config.adaln_single and config.caption_projection and config.num_classes is None \
            and not config.cross_attn_norm and config.context_padding == "mask":
        return "pixart"
    raise ValueError(
        "this DiT config is neither DiT-shaped (class labels, adaLN-Zero, no text) nor PixArt-shaped (T5 text "
        "through a caption MLP, adaLN-single, no classes); build it with config_from_diffusers_transformer, "
        "config_from_original_state_dict or a DiT-*/2 preset"
    )


def _block_rules(i: int, ours: str, attn: str, fused_qkv: bool, out: str, ff_in: str, ff_out: str) -> list[Rule]:
    rules = fused([f"{ours}.attn.to_q", f"{ours}.attn.to_k", f"{ours}.attn.to_v"], f"{attn}.qkv") if fused_qkv else [
        r for n in ("to_q", "to_k", "to_v") for r in linear(f"{ours}.attn.{n}", f"{attn}.{n}")]
    return rules + linear(f"{ours}.attn.to_out", out) + linear(f"{ours}.ff.proj_in", ff_in) + linear(
        f"{ours}.ff.proj_out", ff_out)


def original_rules(config: DiTConfig) -> list[Rule]:
    """Our names ↔ the original DiT (facebookresearch) or PixArt-α/Σ checkpoint's."""
    family = _family(config)
    rules = linear("x_embedder", "x_embedder.proj") + linear("t_embedder.linear_1", "t_embedder.mlp.0") + linear(
        "t_embedder.linear_2", "t_embedder.mlp.2") + linear("final_layer.linear", "final_layer.linear")
    for i in range(config.depth):
        b = f"blocks.{i}"
        rules += _block_rules(i, b, f"{b}.attn", True, f"{b}.attn.proj", f"{b}.mlp.fc1", f"{b}.mlp.fc2")
        if family == "dit":
            rules += linear(f"{b}.adaLN_modulation.1", f"{b}.adaLN_modulation.1")
        else:
            rules.append(rename(f"{b}.scale_shift_table", f"{b}.scale_shift_table"))
            rules += linear(f"{b}.cross_attn.to_q", f"{b}.cross_attn.q_linear")
            rules += fused([f"{b}.cross_attn.to_k", f"{b}.cross_attn.to_v"], f"{b}.cross_attn.kv_linear")
            rules += linear(f"{b}.cross_attn.to_out", f"{b}.cross_attn.proj")
    if family == "dit":
        rules.append(rename("y_embedder.weight", "y_embedder.embedding_table.weight"))
        rules += linear("final_layer.adaLN_modulation.1", "final_layer.adaLN_modulation.1")
    else:
        rules += linear("t_block.1", "t_block.1") + linear("context_embedder.0", "y_embedder.y_proj.fc1") + linear(
            "context_embedder.2", "y_embedder.y_proj.fc2")
        rules.append(rename("final_layer.scale_shift_table", "final_layer.scale_shift_table"))
        if config.vector_dim is not None:
            rules += block_diagonal_mlp("vector_embedder", [("csize_embedder.mlp", 2), ("ar_embedder.mlp", 1)])
    return rules


def diffusers_rules(config: DiTConfig) -> list[Rule]:
    """Our names ↔ diffusers' ``DiTTransformer2DModel`` or ``PixArtTransformer2DModel``."""
    family = _family(config)
    rules = linear("x_embedder", "pos_embed.proj")
    for i in range(config.depth):
        b, d = f"blocks.{i}", f"transformer_blocks.{i}"
        rules += _block_rules(i, b, f"{d}.attn1", False, f"{d}.attn1.to_out.0", f"{d}.ff.net.0.proj",
                              f"{d}.ff.net.2")
        if family == "dit":
            rules += linear(f"{b}.adaLN_modulation.1", f"{d}.norm1.linear")
        else:
            rules.append(rename(f"{b}.scale_shift_table", f"{d}.scale_shift_table"))
            for n in ("to_q", "to_k", "to_v"):
                rules += linear(f"{b}.cross_attn.{n}", f"{d}.attn2.{n}")
            rules += linear(f"{b}.cross_attn.to_out", f"{d}.attn2.to_out.0")
    if family == "dit":
        emb = [f"transformer_blocks.{i}.norm1.emb" for i in range(config.depth)]
        for layer in ("linear_1", "linear_2"):
            for p in ("weight", "bias"):
                rules.append(copies(f"t_embedder.{layer}.{p}", [f"{e}.timestep_embedder.{layer}.{p}" for e in emb]))
        rules.append(copies("y_embedder.weight", [f"{e}.class_embedder.embedding_table.weight" for e in emb]))
        rules += linear("final_layer.adaLN_modulation.1", "proj_out_1") + linear("final_layer.linear", "proj_out_2")
    else:
        rules += linear("t_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_1") + linear(
            "t_embedder.linear_2", "adaln_single.emb.timestep_embedder.linear_2") + linear(
            "t_block.1", "adaln_single.linear") + linear("context_embedder.0", "caption_projection.linear_1") + linear(
            "context_embedder.2", "caption_projection.linear_2") + linear("final_layer.linear", "proj_out")
        rules.append(rename("final_layer.scale_shift_table", "scale_shift_table"))
        if config.vector_dim is not None:
            rules += block_diagonal_mlp("vector_embedder", [("adaln_single.emb.resolution_embedder", 2),
                                                            ("adaln_single.emb.aspect_ratio_embedder", 1)])
    return rules


# --------------------------------------------------------------------------------------------------------------
# Applying the rules
# --------------------------------------------------------------------------------------------------------------


def _meta_state(config: DiTConfig) -> dict[str, Tensor]:
    from models.dit import DiT

    with torch.device("meta"):
        return dict(DiT(config).state_dict())


def _write(state: StateDict, rules: list[Rule]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for rule in rules:
        out.update(zip(rule.theirs, rule.forward([state[k] for k in rule.ours])))
    return out


def _read(state: StateDict, config: DiTConfig, rules: list[Rule], what: str,
          ignored: Callable[[str], bool] = lambda k: False) -> dict[str, Tensor]:
    """``state`` in a foreign layout → ours, after checking names and shapes against the config."""
    meta = _meta_state(config)
    covered = {k for r in rules for k in r.ours}
    if covered != set(meta):  # a rule table that misses one of our tensors is a bug here, not in the file
        raise AssertionError(f"{what}: rules cover {sorted(covered ^ set(meta))[:4]} wrongly")
    expected = _write(meta, rules)  # their names -> meta tensors of the right shapes
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected and not ignored(k))
    if missing or unexpected:
        raise ValueError(
            f"{what}: the checkpoint does not match the config. Missing {len(missing)}: {missing[:6]}; unexpected "
            f"{len(unexpected)}: {unexpected[:6]}. Check depth, classes, text width and size embedders against "
            "the checkpoint's (config_from_original_state_dict / config_from_diffusers_transformer read them)."
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{what}: {k!r} has shape {tuple(state[k].shape)}, the config expects {tuple(v.shape)}")
    out: dict[str, Tensor] = {}
    for rule in rules:
        out.update(zip(rule.ours, rule.backward([state[k] for k in rule.theirs])))
    return out


def _check_pos_embed(state: StateDict, config: DiTConfig, what: str) -> None:
    """A stored fixed position table (``pos_embed``, ``(1, N, D)``) must be the one our config computes."""
    table = state.get("pos_embed")
    if table is None:
        return
    from models.dit import sincos_2d

    n = table.shape[-2]
    side = int(round(n ** 0.5))
    if side * side != n or table.shape[-1] != config.hidden_size:
        raise ValueError(f"{what}: pos_embed of shape {tuple(table.shape)} is not a square grid of width "
                         f"{config.hidden_size}")
    ours = sincos_2d(side, side, config.hidden_size, config.pos_embed_base_size, config.pos_embed_interpolation)
    err = (table.reshape(n, -1).float() - ours).abs().max().item()
    if err > POS_EMBED_ATOL:
        raise ValueError(
            f"{what}: the checkpoint's pos_embed ({side}×{side} patches) differs from the table this config "
            f"computes by {err:.3g} (pos_embed_base_size={config.pos_embed_base_size}, pos_embed_interpolation="
            f"{config.pos_embed_interpolation}): set them as the checkpoint was trained (PixArt: base = "
            "sample_size / patch_size, interpolation = its pe_interpolation)"
        )


def from_original_state_dict(state_dict: StateDict, config: DiTConfig) -> dict[str, Tensor]:
    """An original DiT (``DiT-XL-2-256x256.pt``) or PixArt-α/Σ (``PixArt-XL-2-*.pth``) state dict → ours.

    The fixed ``pos_embed`` table is checked against the config's and dropped; PixArt's learned null caption
    (``y_embedder.y_embedding``, used only for caption dropout while training) is dropped.
    """
    what = f"original {_family(config)} checkpoint".replace("dit", "DiT").replace("pixart", "PixArt")
    _check_pos_embed(state_dict, config, what)
    return _read(state_dict, config, original_rules(config), what,
                 ignored=lambda k: k in ("pos_embed", "y_embedder.y_embedding"))


def to_original_state_dict(state_dict: StateDict, config: DiTConfig, pos_embed: bool = True) -> dict[str, Tensor]:
    """Our DiT/PixArt-shaped state dict → the original checkpoint's names (with the ``pos_embed`` table of a
    ``sample_size`` latent when ``pos_embed``, as the original code stores it)."""
    out = _write(state_dict, original_rules(config))
    if pos_embed:
        from models.dit import sincos_2d

        side = config.sample_size // config.patch_size
        out["pos_embed"] = sincos_2d(side, side, config.hidden_size, config.pos_embed_base_size,
                                     config.pos_embed_interpolation)[None]
    return out


def from_diffusers_dit_state_dict(state_dict: StateDict, config: DiTConfig) -> dict[str, Tensor]:
    """A diffusers ``DiTTransformer2DModel`` / ``PixArtTransformer2DModel`` state dict → ours."""
    family = _family(config)
    what = "diffusers DiTTransformer2DModel" if family == "dit" else "diffusers PixArtTransformer2DModel"
    _check_pos_embed(state_dict, config, what)  # stored only by models with pos_embed_max_size (not these)
    return _read(state_dict, config, diffusers_rules(config), what, ignored=lambda k: k == "pos_embed.pos_embed")


def to_diffusers_dit_state_dict(state_dict: StateDict, config: DiTConfig) -> dict[str, Tensor]:
    """Our DiT/PixArt-shaped state dict → diffusers' ``DiTTransformer2DModel`` / ``PixArtTransformer2DModel``."""
    return _write(state_dict, diffusers_rules(config))


def from_diffusers_state_dict(state_dict: StateDict, config: DiTConfig) -> dict[str, Tensor]:
    """Any diffusers transformer our DiT can be (Wan, DiT, PixArt; chosen by the config's shape) → ours: the
    ``diffusers`` converter of the ``dit`` architecture."""
    from models.dit import from_diffusers_wan_state_dict, is_wan_config

    if is_wan_config(config):
        return from_diffusers_wan_state_dict(state_dict, config)
    try:
        _family(config)
    except ValueError as err:
        raise ValueError(f"this DiT config is not Wan-shaped (models.dit.wan_config), and {err}") from None
    return from_diffusers_dit_state_dict(state_dict, config)


# --------------------------------------------------------------------------------------------------------------
# Configs: diffusers config.json and original state dicts → DiTConfig
# --------------------------------------------------------------------------------------------------------------

# diffusers options this DiT does not implement: each must be absent or hold the value shown.
_FIXED: dict[str, Any] = {
    "attention_bias": True, "activation_fn": "gelu-approximate", "norm_elementwise_affine": False,
    "num_vector_embeds": None, "only_cross_attention": False, "double_self_attention": False,
    "attention_type": "default", "pos_embed_max_size": None,
}  # fmt: skip
# Keys that carry nothing this converter needs (dropout, numerics of other kernels, the U-Net-style group norm).
_IGNORED = {"dropout", "norm_num_groups", "upcast_attention", "norm_eps", "use_linear_projection", "output_type",
            "num_embeds_ada_norm"}
_USED = {"num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers", "sample_size",
         "patch_size", "norm_type", "cross_attention_dim", "caption_channels", "interpolation_scale",
         "use_additional_conditions"}


def config_from_diffusers_transformer(config: Mapping[str, Any], **overrides: Any) -> DiTConfig:
    """A diffusers transformer ``config.json`` (as a dict) → :class:`DiTConfig`: ``DiTTransformer2DModel``,
    ``PixArtTransformer2DModel``, the older ``Transformer2DModel`` with ``norm_type`` ``ada_norm_zero`` (DiT) or
    ``ada_norm_single`` (PixArt), and ``WanTransformer3DModel`` (:func:`models.dit.config_from_diffusers_wan`).
    Unsupported options raise ``ValueError`` naming the key."""
    from models.convert import _check_keys
    from models.dit import DiTConfig, config_from_diffusers_wan

    cls = config.get("_class_name", "")
    if cls == "WanTransformer3DModel":
        return config_from_diffusers_wan(config, **overrides)
    norm = config.get("norm_type", {"DiTTransformer2DModel": "ada_norm_zero"}.get(cls, "ada_norm_single"))
    if cls not in ("", "DiTTransformer2DModel", "PixArtTransformer2DModel", "Transformer2DModel"):
        raise ValueError(f"diffusers transformer _class_name={cls!r}: only DiTTransformer2DModel, "
                         "PixArtTransformer2DModel, Transformer2DModel and WanTransformer3DModel load into our DiT")
    if norm not in ("ada_norm_zero", "ada_norm_single"):
        raise ValueError(f"diffusers transformer norm_type={norm!r}: only 'ada_norm_zero' (DiT) and "
                         "'ada_norm_single' (PixArt) are supported")
    what = f"diffusers {cls or 'transformer'}"
    _check_keys(config, _FIXED, _USED, _IGNORED, what)
    heads, head_dim = int(config.get("num_attention_heads", 16)), int(config.get("attention_head_dim", 72))
    in_channels = int(config.get("in_channels", 4))
    out_channels = config.get("out_channels")
    out_channels = in_channels if out_channels is None else int(out_channels)
    learn_sigma = out_channels == 2 * in_channels
    sample_size, patch = int(config.get("sample_size", 32)), int(config.get("patch_size", 2))
    kwargs: dict[str, Any] = dict(
        sample_size=sample_size, patch_size=patch, in_channels=in_channels, learn_sigma=learn_sigma,
        out_channels=None if learn_sigma or out_channels == in_channels else out_channels,
        hidden_size=heads * head_dim, depth=int(config.get("num_layers", 28)), num_heads=heads,
    )
    if norm == "ada_norm_zero":
        if config.get("cross_attention_dim") is not None or config.get("caption_channels") is not None:
            raise ValueError(f"{what}: a DiT (ada_norm_zero) with cross_attention_dim / caption_channels is not "
                             "supported")
        kwargs["num_classes"] = int(config.get("num_embeds_ada_norm") or 1000)
    else:
        caption = config.get("caption_channels")
        if caption is None:
            raise ValueError(f"{what}: a PixArt transformer without caption_channels (no caption MLP) is not "
                             "supported")
        cross = config.get("cross_attention_dim", heads * head_dim)
        if cross is not None and int(cross) != heads * head_dim:
            raise ValueError(f"{what}: cross_attention_dim={cross} must equal the width {heads * head_dim} (the "
                             "caption MLP maps the text to it)")
        additional = config.get("use_additional_conditions")
        additional = sample_size == 128 if additional is None else bool(additional)  # diffusers' own default
        interpolation = config.get("interpolation_scale")
        interpolation = max(sample_size // 64, 1) if interpolation is None else interpolation
        kwargs.update(context_dim=int(caption), caption_projection=True, adaln_single=True,
                      pos_embed_base_size=sample_size // patch, pos_embed_interpolation=float(interpolation),
                      vector_dim=PIXART_VECTOR_DIM if additional else None)
    kwargs.update(overrides)
    return DiTConfig(**kwargs)


def config_from_original_state_dict(state_dict: StateDict, **overrides: Any) -> DiTConfig:
    """A :class:`DiTConfig` read off an original DiT or PixArt checkpoint's tensor shapes.

    Shapes give the width, depth, patch, channels, classes, text width and size embedders; the head count comes
    from the published sizes (DiT-S/B/L/XL, PixArt-XL) unless ``num_heads`` is given. The latent side comes from
    ``pos_embed`` when stored; the multi-scale PixArt models store none: pass ``sample_size`` (128 for 1024 px).
    PixArt's position rescaling is diffusers' default (base = sample_size / patch, interpolation =
    max(sample_size / 64, 1)); override ``pos_embed_interpolation`` where the model used another.
    """
    from models.dit import DIT_SIZES, DiTConfig

    what = "original DiT/PixArt checkpoint"
    if "x_embedder.proj.weight" not in state_dict:
        raise ValueError(f"{what}: no 'x_embedder.proj.weight' (found e.g. {sorted(state_dict)[:4]}); not the "
                         "original DiT/PixArt layout")
    w = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_channels, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    out_channels = int(state_dict["final_layer.linear.weight"].shape[0]) // (patch * patch)
    heads = {size[1]: size[2] for size in DIT_SIZES.values()}.get(hidden)
    if heads is None and "num_heads" not in overrides:
        raise ValueError(f"{what}: width {hidden} is none of the published sizes; pass num_heads=")
    pixart = "t_block.1.weight" in state_dict
    sample_size = overrides.get("sample_size")
    if "pos_embed" in state_dict:
        sample_size = sample_size or int(round(state_dict["pos_embed"].shape[-2] ** 0.5)) * patch
    elif sample_size is None:
        raise ValueError(f"{what}: it stores no pos_embed, so the latent size is unknown: pass sample_size= "
                         "(e.g. 128 for PixArt's 1024 px models)")
    learn_sigma = out_channels == 2 * in_channels
    kwargs: dict[str, Any] = dict(
        sample_size=sample_size, patch_size=patch, in_channels=in_channels, learn_sigma=learn_sigma,
        out_channels=None if learn_sigma or out_channels == in_channels else out_channels,
        hidden_size=hidden, depth=depth, num_heads=heads or 1,
    )
    if pixart:
        kwargs.update(context_dim=int(state_dict["y_embedder.y_proj.fc1.weight"].shape[1]), caption_projection=True,
                      adaln_single=True, pos_embed_base_size=sample_size // patch,
                      pos_embed_interpolation=float(max(sample_size // 64, 1)),
                      vector_dim=PIXART_VECTOR_DIM if "csize_embedder.mlp.0.weight" in state_dict else None)
    else:
        kwargs["num_classes"] = int(state_dict["y_embedder.embedding_table.weight"].shape[0]) - 1
    kwargs.update(overrides)
    return DiTConfig(**kwargs)


def pixart_size_vector(resolution: Tensor, aspect_ratio: Tensor) -> Tensor:
    """``cond.vector`` of PixArt-α's multi-scale models: ``resolution`` ``(B, 2)`` (height, width in pixels) and
    ``aspect_ratio`` ``(B, 1)`` (height / width) as 256 sinusoid features each → ``(B, 768)``; what diffusers'
    ``PixArtAlphaPipeline`` passes as ``added_cond_kwargs``."""
    from models.embeddings import fourier_features

    values = torch.cat([resolution.reshape(-1, 2), aspect_ratio.reshape(-1, 1)], dim=1).float()  # (B, 3)
    return fourier_features(values, SIZE_FEATURES)  # (B, 768)


__all__ = [
    "config_from_diffusers_transformer", "config_from_original_state_dict", "from_diffusers_dit_state_dict",
    "from_diffusers_state_dict", "from_original_state_dict", "pixart_size_vector", "to_diffusers_dit_state_dict",
    "to_original_state_dict",
]
