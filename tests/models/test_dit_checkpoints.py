"""Published transformer checkpoints into our DiT: diffusers' DiTTransformer2DModel and PixArtTransformer2DModel
(built at reduced sizes with random weights, loaded through ``training.weights.load_weights``, outputs compared),
and the original DiT / PixArt layouts, derived here from diffusers' tensors by the renaming of diffusers' own
conversion scripts, loaded and written back."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from models.conditioning import Conditioning
from models.dit import DiT, DiTConfig
from models.dit_checkpoints import (
    config_from_diffusers_transformer,
    config_from_original_state_dict,
    from_diffusers_dit_state_dict,
    from_original_state_dict,
    pixart_size_vector,
    to_diffusers_dit_state_dict,
    to_original_state_dict,
)
from training.weights import load_weights

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every weight off its initial value (zero-initialised paths then carry signal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def diffusers_dit(depth: int = 2) -> torch.nn.Module:
    """A tiny DiTTransformer2DModel with learned sigma (8 output channels for 4 in) and 10 classes. Its per-block
    copies of the timestep/label embedder are tied to block 0's, as in every converted DiT checkpoint."""
    model = perturbed(diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=depth,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10))
    state = model.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            if ".norm1.emb." in k and not k.startswith("transformer_blocks.0."):
                v.copy_(state[re.sub(r"^transformer_blocks\.\d+\.", "transformer_blocks.0.", k)])
    return model


def as_original_dit(ref: torch.nn.Module) -> torch.nn.Module:
    """Set diffusers' DiT to the two values of the original DiT code that diffusers changed: timestep frequencies
    ``10000^(-i/half)`` (diffusers: ``downscale_freq_shift=1``) and the pre-MLP LayerNorm's eps 1e-6 (diffusers:
    ``norm_eps`` 1e-5). The published weights were trained with the original; our DiT computes it."""
    for block in ref.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm3.eps = 1e-6
    return ref


def diffusers_pixart(size_conditions: bool = False) -> torch.nn.Module:
    """A tiny PixArtTransformer2DModel: width 24 (2 heads of 12, divisible by 3 for the size embedders), text
    width 20, learned sigma, position interpolation 2."""
    return perturbed(diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=24, sample_size=8, patch_size=2, caption_channels=20, interpolation_scale=2,
        use_additional_conditions=size_conditions), seed=1)


def saved(ref: torch.nn.Module, folder) -> tuple[DiT, str]:
    """Save ``ref`` as a diffusers model folder and load it into a DiT built from its config.json."""
    ref.save_pretrained(folder, safe_serialization=True)
    config = config_from_diffusers_transformer(json.loads((folder / "config.json").read_text()))
    ours = DiT(config).eval()
    return ours, load_weights(ours, folder)


def text_batch(batch: int = 2, length: int = 6, dim: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 3:] = False  # a short prompt: padded positions are masked out
    return torch.randn(batch, length, dim, generator=g), mask


# ---- diffusers DiT -------------------------------------------------------------------------------------------


def test_diffusers_dit_loads_and_matches_the_original_dit_function(tmp_path):
    ref = diffusers_dit()
    ours, naming = saved(ref, tmp_path / "transformer")
    assert naming == "diffusers"
    assert ours.config.learn_sigma and ours.config.model_out_channels == 8 and ours.config.num_classes == 10
    g = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0]), torch.tensor([3, 10])  # 10: null
    with torch.no_grad():
        got = ours(x, t, Conditioning(class_labels=y))
        stock = ref(x, t, y).sample
        expected = as_original_dit(ref)(x, t, y).sample
    assert got.shape == expected.shape == (2, 8, 8, 8)
    assert (got - expected).abs().max() <= 1e-5
    assert (stock - expected).abs().max() > 1e-3  # diffusers' own timestep frequencies do differ
    eps, sigma = DiT.split_learned_sigma(got)
    assert eps.shape == sigma.shape == x.shape


def test_diffusers_dit_round_trip_and_refusals():
    ref = diffusers_dit()
    config = config_from_diffusers_transformer(dict(ref.config))
    state = ref.state_dict()
    ours = from_diffusers_dit_state_dict(state, config)
    back = to_diffusers_dit_state_dict(ours, config)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    untied = dict(state)
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight"
    untied[key] = state[key] + 1
    with pytest.raises(ValueError, match=re.escape(key)):
        from_diffusers_dit_state_dict(untied, config)
    with pytest.raises(ValueError, match="Missing 1: \\['proj_out_2.bias'\\]"):
        from_diffusers_dit_state_dict({k: v for k, v in state.items() if k != "proj_out_2.bias"}, config)
    with pytest.raises(ValueError, match="neither DiT-shaped"):
        from_diffusers_dit_state_dict(state, DiTConfig(num_classes=None))
    with pytest.raises(ValueError, match="activation_fn"):
        config_from_diffusers_transformer({**dict(ref.config), "activation_fn": "geglu"})


# ---- diffusers PixArt ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size_conditions", [False, True])
def test_diffusers_pixart_parity(tmp_path, size_conditions):
    ref = diffusers_pixart(size_conditions)
    ours, naming = saved(ref, tmp_path / "transformer")
    cfg = ours.config
    assert naming == "diffusers" and cfg.adaln_single and cfg.context_dim == 20 and cfg.learn_sigma
    assert cfg.pos_embed_base_size == 4 and cfg.pos_embed_interpolation == 2.0
    assert cfg.vector_dim == (768 if size_conditions else None)
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 8, 12, generator=g), torch.tensor([20.0, 900.0])  # not the native 8×8: rescaled grid
    context, mask = text_batch()
    resolution, aspect = torch.tensor([[256.0, 384.0], [512.0, 512.0]]), torch.tensor([[256 / 384], [1.0]])
    added = {"resolution": resolution, "aspect_ratio": aspect} if size_conditions else None
    cond = Conditioning(context=context, context_mask=mask,
                        vector=pixart_size_vector(resolution, aspect) if size_conditions else None)
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=context, encoder_attention_mask=mask.long(), timestep=t,
                       added_cond_kwargs=added).sample
        got = ours(x, t, cond)
    assert got.shape == expected.shape == (2, 8, 8, 12)
    assert (got - expected).abs().max() <= 1e-5
    back = to_diffusers_dit_state_dict(ours.state_dict(), cfg)
    assert set(back) == set(ref.state_dict()) and all(torch.equal(v, ref.state_dict()[k]) for k, v in back.items())


# ---- original layouts ----------------------------------------------------------------------------------------


def cat(state, *names):
    return torch.cat([state[n] for n in names], dim=0)


def original_dit_from_diffusers(ref) -> dict:
    """facebookresearch DiT names from a diffusers DiT (the inverse of scripts/convert_dit_to_diffusers.py)."""
    s, out = ref.state_dict(), {}
    emb = "transformer_blocks.0.norm1.emb."
    for p in ("weight", "bias"):
        out[f"x_embedder.proj.{p}"] = s[f"pos_embed.proj.{p}"]
        out[f"t_embedder.mlp.0.{p}"] = s[f"{emb}timestep_embedder.linear_1.{p}"]
        out[f"t_embedder.mlp.2.{p}"] = s[f"{emb}timestep_embedder.linear_2.{p}"]
        out[f"final_layer.adaLN_modulation.1.{p}"] = s[f"proj_out_1.{p}"]
        out[f"final_layer.linear.{p}"] = s[f"proj_out_2.{p}"]
        for i in range(len(ref.transformer_blocks)):
            d = f"transformer_blocks.{i}."
            out[f"blocks.{i}.attn.qkv.{p}"] = cat(s, *(f"{d}attn1.to_{n}.{p}" for n in "qkv"))
            out[f"blocks.{i}.attn.proj.{p}"] = s[f"{d}attn1.to_out.0.{p}"]
            out[f"blocks.{i}.mlp.fc1.{p}"] = s[f"{d}ff.net.0.proj.{p}"]
            out[f"blocks.{i}.mlp.fc2.{p}"] = s[f"{d}ff.net.2.{p}"]
            out[f"blocks.{i}.adaLN_modulation.1.{p}"] = s[f"{d}norm1.linear.{p}"]
    out["y_embedder.embedding_table.weight"] = s[f"{emb}class_embedder.embedding_table.weight"]
    out["pos_embed"] = ref.pos_embed.pos_embed.clone()  # diffusers' own (non-persistent) sin-cos table, (1, N, D)
    return out


def original_pixart_from_diffusers(ref) -> dict:
    """PixArt-α/Σ names from a diffusers PixArt (the inverse of scripts/convert_pixart_alpha_to_diffusers.py)."""
    s, out = ref.state_dict(), {}
    simple = {"pos_embed.proj": "x_embedder.proj", "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
              "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2", "adaln_single.linear": "t_block.1",
              "caption_projection.linear_1": "y_embedder.y_proj.fc1",
              "caption_projection.linear_2": "y_embedder.y_proj.fc2", "proj_out": "final_layer.linear",
              "adaln_single.emb.resolution_embedder.linear_1": "csize_embedder.mlp.0",
              "adaln_single.emb.resolution_embedder.linear_2": "csize_embedder.mlp.2",
              "adaln_single.emb.aspect_ratio_embedder.linear_1": "ar_embedder.mlp.0",
              "adaln_single.emb.aspect_ratio_embedder.linear_2": "ar_embedder.mlp.2"}
    for theirs, orig in simple.items():
        for p in ("weight", "bias"):
            if f"{theirs}.{p}" in s:
                out[f"{orig}.{p}"] = s[f"{theirs}.{p}"]
    out["final_layer.scale_shift_table"] = s["scale_shift_table"]
    for i in range(len(ref.transformer_blocks)):
        d, b = f"transformer_blocks.{i}.", f"blocks.{i}."
        out[f"{b}scale_shift_table"] = s[f"{d}scale_shift_table"]
        for p in ("weight", "bias"):
            out[f"{b}attn.qkv.{p}"] = cat(s, *(f"{d}attn1.to_{n}.{p}" for n in "qkv"))
            out[f"{b}attn.proj.{p}"] = s[f"{d}attn1.to_out.0.{p}"]
            out[f"{b}cross_attn.q_linear.{p}"] = s[f"{d}attn2.to_q.{p}"]
            out[f"{b}cross_attn.kv_linear.{p}"] = cat(s, f"{d}attn2.to_k.{p}", f"{d}attn2.to_v.{p}")
            out[f"{b}cross_attn.proj.{p}"] = s[f"{d}attn2.to_out.0.{p}"]
            out[f"{b}mlp.fc1.{p}"] = s[f"{d}ff.net.0.proj.{p}"]
            out[f"{b}mlp.fc2.{p}"] = s[f"{d}ff.net.2.{p}"]
    out["y_embedder.y_embedding"] = torch.randn(6, 20)  # the learned null caption (training-time dropout only)
    return out


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_original_dit_checkpoint_loads(tmp_path):
    ref = diffusers_dit()
    original = original_dit_from_diffusers(ref)
    torch.save(original, tmp_path / "DiT-tiny-2-16x16.pt")
    config = config_from_original_state_dict(original, num_heads=2)
    assert config == config_from_diffusers_transformer(dict(ref.config))
    ours = DiT(config).eval()
    assert load_weights(ours, tmp_path / "DiT-tiny-2-16x16.pt") == "original"
    via_diffusers = DiT(config)
    via_diffusers.load_state_dict(from_diffusers_dit_state_dict(ref.state_dict(), config))
    assert same_weights(ours, via_diffusers)
    back = to_original_state_dict(ours.state_dict(), config)
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original if k != "pos_embed")
    assert (back["pos_embed"] - original["pos_embed"]).abs().max() < 1e-6  # ours vs diffusers' table
    with pytest.raises(ValueError, match="pos_embed"):  # the checkpoint's grid is not this config's
        from_original_state_dict({**original, "pos_embed": original["pos_embed"] * 0.5}, config)


@pytest.mark.parametrize("size_conditions", [False, True])
def test_original_pixart_checkpoint_loads(tmp_path, size_conditions):
    ref = diffusers_pixart(size_conditions)
    original = original_pixart_from_diffusers(ref)
    if not size_conditions:  # the 256/512 px models store their table; the multi-scale ones do not
        original["pos_embed"] = ref.pos_embed.pos_embed.clone()
    torch.save({"state_dict": original}, tmp_path / "PixArt-tiny.pth")
    config = config_from_original_state_dict(original, num_heads=2, sample_size=8, pos_embed_interpolation=2.0)
    assert config == config_from_diffusers_transformer(dict(ref.config))
    ours = DiT(config).eval()
    assert load_weights(ours, tmp_path / "PixArt-tiny.pth") == "original"
    via_diffusers = DiT(config)
    via_diffusers.load_state_dict(from_diffusers_dit_state_dict(ref.state_dict(), config))
    assert same_weights(ours, via_diffusers)
    back = to_original_state_dict(ours.state_dict(), config, pos_embed=False)
    assert set(back) == set(original) - {"y_embedder.y_embedding", "pos_embed"}
    assert all(torch.equal(v, original[k]) for k, v in back.items())
    if not size_conditions:  # a wrong position interpolation is caught by the stored table
        with pytest.raises(ValueError, match="pos_embed_interpolation=1.0"):
            from_original_state_dict(original, config_from_original_state_dict(original, num_heads=2))


def test_load_weights_names_the_file_and_the_layouts_it_tried(tmp_path):
    original = original_pixart_from_diffusers(diffusers_pixart())
    save_file({k: v.contiguous() for k, v in original.items()}, tmp_path / "pixart.safetensors")
    dit = DiT(config_from_diffusers_transformer(dict(diffusers_dit().config)))
    with pytest.raises(ValueError, match="pixart.safetensors") as err:
        load_weights(dit, tmp_path / "pixart.safetensors")
    assert "original: original DiT checkpoint: the checkpoint does not match" in str(err.value)
    with pytest.raises(ValueError, match="stores no pos_embed"):
        config_from_original_state_dict(original, num_heads=2)


# ---- the published sizes, on the meta device -----------------------------------------------------------------

PUBLISHED = {  # the transformer config.json of facebook/DiT-XL-2-256, PixArt-XL-2-1024-MS and PixArt-Sigma-XL-2-1024-MS
    "dit-xl-2-256": {"_class_name": "Transformer2DModel", "activation_fn": "gelu-approximate", "attention_bias": True,
                     "attention_head_dim": 72, "cross_attention_dim": None, "dropout": 0.0, "in_channels": 4,
                     "norm_elementwise_affine": False, "norm_num_groups": 32, "norm_type": "ada_norm_zero",
                     "num_attention_heads": 16, "num_embeds_ada_norm": 1000, "num_layers": 28,
                     "num_vector_embeds": None, "only_cross_attention": False, "out_channels": 8, "patch_size": 2,
                     "sample_size": 32, "upcast_attention": False, "use_linear_projection": False},
    "pixart-xl-2-1024-ms": {"_class_name": "Transformer2DModel", "activation_fn": "gelu-approximate",
                            "attention_bias": True, "attention_head_dim": 72, "attention_type": "default",
                            "caption_channels": 4096, "cross_attention_dim": 1152, "double_self_attention": False,
                            "dropout": 0.0, "in_channels": 4, "norm_elementwise_affine": False, "norm_eps": 1e-06,
                            "norm_num_groups": 32, "norm_type": "ada_norm_single", "num_attention_heads": 16,
                            "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": None,
                            "only_cross_attention": False, "out_channels": 8, "patch_size": 2, "sample_size": 128,
                            "upcast_attention": False, "use_linear_projection": False},
    "pixart-sigma-xl-2-1024-ms": {"_class_name": "PixArtTransformer2DModel", "activation_fn": "gelu-approximate",
                                  "attention_bias": True, "attention_head_dim": 72, "attention_type": "default",
                                  "caption_channels": 4096, "cross_attention_dim": 1152, "dropout": 0.0,
                                  "in_channels": 4, "interpolation_scale": 2, "norm_elementwise_affine": False,
                                  "norm_eps": 1e-06, "norm_num_groups": 32, "norm_type": "ada_norm_single",
                                  "num_attention_heads": 16, "num_embeds_ada_norm": 1000, "num_layers": 28,
                                  "out_channels": 8, "patch_size": 2, "sample_size": 128, "upcast_attention": False,
                                  "use_additional_conditions": False},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_give_diffusers_names_and_shapes(name):
    published = PUBLISHED[name]
    config = config_from_diffusers_transformer(published)
    cls = diffusers.DiTTransformer2DModel if published["norm_type"] == "ada_norm_zero" else \
        diffusers.PixArtTransformer2DModel
    keys = set(cls.extract_init_dict(published)[0])  # the arguments this class takes
    with torch.device("meta"):
        ours = DiT(config)
        ref = cls(**{k: v for k, v in published.items() if k in keys})
    theirs = {k: v.shape for k, v in ref.state_dict().items()}
    exported = {k: v.shape for k, v in to_diffusers_dit_state_dict(ours.state_dict(), config).items()}
    assert exported == theirs
    if name == "dit-xl-2-256":
        from models.registry import get_preset

        assert config == get_preset("DiT-XL/2")  # the paper's model is our preset
        original = to_original_state_dict(ours.state_dict(), config)
        assert len(original) == 292 and original["pos_embed"].shape == (1, 256, 1152)
        assert original["blocks.27.attn.qkv.weight"].shape == (3456, 1152)
        assert original["y_embedder.embedding_table.weight"].shape == (1001, 1152)
    else:
        assert config.context_dim == 4096 and config.pos_embed_base_size == 64
        assert config.pos_embed_interpolation == 2.0
        assert config.vector_dim == (768 if name == "pixart-xl-2-1024-ms" else None)
