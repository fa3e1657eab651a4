"""Video DiT: 3-D RoPE, temporal patches, factorised (Latte) vs full attention, Wan 2.1 parity with diffusers,
parameter counts and FLOPs on the meta device, checkpointing and safetensors round trips."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.attention import Attention, attention
from models.conditioning import Conditioning
from models.dit import (
    DiT,
    DiTConfig,
    _latte_tiny,
    _wan_tiny,
    config_from_diffusers_wan,
    from_diffusers_wan_state_dict,
    from_wan_state_dict,
    patchify,
    to_diffusers_wan_state_dict,
    to_wan_state_dict,
    unpatchify,
    wan_config,
)
from models.embeddings import apply_rope, default_rope_axes, rope_3d
from models.flops import count_flops
from models.utils import count_parameters


def perturbed(model: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Move every weight off its initial value (zero-initialised paths then carry signal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def text(batch: int = 2, length: int = 5, dim: int = 64, seed: int = 1) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(context=torch.randn(batch, length, dim, generator=g))


# ---- RoPE ------------------------------------------------------------------------------------------------------


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    frames, gh, gw, axes = 5, 4, 6, (8, 6, 6)
    cos, sin = rope_3d(frames, gh, gw, axes)  # (N, d/2)
    assert cos.shape == sin.shape == (frames * gh * gw, sum(axes) // 2)
    q, k = torch.randn(sum(axes)), torch.randn(sum(axes))
    qr = apply_rope(q.expand(frames * gh * gw, -1), (cos, sin))  # the same vector placed at every position
    kr = apply_rope(k.expand(frames * gh * gw, -1), (cos, sin))
    scores = qr @ kr.T  # (N, N)

    def index(t, y, x):
        return (t * gh + y) * gw + x

    checked = 0
    g = torch.Generator().manual_seed(3)
    for _ in range(1000):
        a = [int(torch.randint(0, n, (1,), generator=g)) for n in (frames, gh, gw)]
        b = [int(torch.randint(0, n, (1,), generator=g)) for n in (frames, gh, gw)]
        shift = [int(torch.randint(-n + 1, n, (1,), generator=g)) for n in (frames, gh, gw)]
        a2, b2 = [u + s for u, s in zip(a, shift)], [u + s for u, s in zip(b, shift)]
        if all(0 <= u < n for u, n in zip(a2 + b2, (frames, gh, gw) * 2)):
            torch.testing.assert_close(scores[index(*a), index(*b)], scores[index(*a2), index(*b2)],
                                       atol=1e-5, rtol=1e-5)
            checked += 1
    assert checked > 50
    # and they do depend on it: the same pair at another offset scores differently
    assert not torch.allclose(scores[index(0, 0, 0), index(0, 0, 1)], scores[index(0, 0, 0), index(0, 0, 3)])
    # rotations keep norms; position (0, 0, 0) is the identity
    torch.testing.assert_close(qr.norm(dim=-1), q.norm().expand(frames * gh * gw))
    torch.testing.assert_close(qr[0], q)


def test_rope_axes_rotate_their_own_feature_groups():
    axes = default_rope_axes(128)
    assert axes == (44, 42, 42) and default_rope_axes(16) == (8, 4, 4)
    cos, sin = rope_3d(3, 3, 3, (4, 6, 8))
    x = torch.randn(12 + 6, dtype=torch.float64).float()
    rotated = apply_rope(x.expand(27, -1), (cos, sin)).view(3, 3, 3, 18)  # (T, h, w, d)
    groups = {0: slice(0, 4), 1: slice(4, 10), 2: slice(10, 18)}
    for axis in range(3):
        moved = [0, 0, 0]
        moved[axis] = 2
        delta = (rotated[tuple(moved)] - rotated[0, 0, 0]).abs()
        for other, sl in groups.items():
            assert (delta[sl].max() > 1e-3) == (other == axis)


def test_attention_applies_rope_to_queries_and_keys_for_every_backend():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 12, 8) for _ in range(3))
    rope = rope_3d(2, 2, 3, (2, 2, 4))
    expected = attention(apply_rope(q, rope), apply_rope(k, rope), v, backend="math")
    for backend in ("sdpa", "math"):
        torch.testing.assert_close(attention(q, k, v, backend=backend, rope=rope), expected)
    assert not torch.allclose(attention(q, k, v, backend="math"), expected)
    with pytest.raises(ValueError, match="same positions"):
        attention(q, k[:, :, :5], v[:, :, :5], rope=rope)
    cross = Attention(16, context_dim=8, heads=2)
    with pytest.raises(ValueError, match="self-attention"):
        cross(torch.randn(1, 12, 16), context=torch.randn(1, 3, 8), rope=rope)


def test_qk_norm_across_heads_normalises_all_heads_together():
    torch.manual_seed(0)
    per_head = Attention(32, heads=4, qk_norm=True)
    across = Attention(32, heads=4, qk_norm=True, qk_norm_across_heads=True)
    assert per_head.q_norm.weight.shape == (8,) and across.q_norm.weight.shape == (32,)
    across.load_state_dict({**per_head.state_dict(), "q_norm.weight": torch.ones(32), "k_norm.weight": torch.ones(32)})
    x = torch.randn(2, 5, 32)
    assert not torch.allclose(per_head(x), across(x))
    q = across.to_q(x)
    ref = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(across._heads(across.q_norm(q)), across._heads(ref))


# ---- temporal patches ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pt", "p"), [(1, 2), (2, 2), (4, 1), (2, 4)])
def test_temporal_patchify_round_trip_and_conv_equivalence(pt, p):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, 12)
    tokens = patchify(x, p, pt)
    assert tokens.shape == (2, (8 // pt) * (8 // p) * (12 // p), pt * p * p * 3)
    assert torch.equal(unpatchify(tokens, (8 // pt, 8 // p, 12 // p), p, pt), x)
    # the strided 3-D convolution is the linear map of those vectors (features ordered dt, dy, dx, channel)
    conv = torch.nn.Conv3d(3, 16, kernel_size=(pt, p, p), stride=(pt, p, p))
    weight = conv.weight.permute(0, 2, 3, 4, 1).reshape(16, -1)  # (D, pt*p*p*C)
    torch.testing.assert_close(conv(x).flatten(2).transpose(1, 2), tokens @ weight.T + conv.bias)
    with pytest.raises(ValueError, match="not divisible"):
        patchify(x[:, :, :7], p, 2 if pt == 1 else pt)


def test_temporal_patch_dit_shapes_and_frame_check():
    config = dataclasses.replace(_wan_tiny(), patch_size_t=2)
    model = perturbed(DiT(config))
    assert isinstance(model.x_embedder, torch.nn.Conv3d) and model.x_embedder.kernel_size == (2, 2, 2)
    assert model.final_layer.linear.out_features == 2 * 2 * 2 * 16
    x = torch.randn(2, 16, 6, 4, 8)
    assert model(x, torch.tensor([1, 500]), text()).shape == x.shape
    with pytest.raises(ValueError, match="divisible by patch_size_t=2"):
        model(x[:, :, :5], torch.tensor([1, 500]), text())


# ---- factorised (Latte) vs full attention ----------------------------------------------------------------------


def test_factorised_and_full_attention_shapes():
    latte = perturbed(DiT(_latte_tiny()))
    full = perturbed(DiT(dataclasses.replace(_latte_tiny(), attention_layout="full")))
    # same parameters except the temporal blocks' cross-attention, which Latte does not have
    assert [b.cross_attn is None for b in latte.blocks] == [False, True, False, True]
    assert all(b.cross_attn is not None for b in full.blocks)
    cond = text()
    for shape in [(2, 4, 1, 8, 8), (2, 4, 3, 6, 10), (2, 4, 5, 4, 4)]:
        x = torch.randn(*shape)
        assert latte(x, torch.tensor([2, 20]), cond).shape == shape
        assert full(x, torch.tensor([2, 20]), cond).shape == shape
    with pytest.raises(ValueError, match="choose one of"):
        DiTConfig(attention_layout="axial")


def test_factorised_spatial_blocks_stay_in_their_frame_and_temporal_blocks_mix():
    base = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_heads=2, context_dim=64,
                caption_projection=True, adaln_single=True, video=True, attention_layout="factorised",
                sincos_pos_embed=False, rope=True)
    spatial_only = perturbed(DiT(DiTConfig(depth=1, **base)))
    x, t, cond = torch.randn(2, 4, 3, 6, 8), torch.tensor([5, 50]), text()
    out = spatial_only(x, t, cond)
    for f in range(3):  # each frame is processed as a one-frame clip would be
        torch.testing.assert_close(out[:, :, f], spatial_only(x[:, :, f:f + 1], t, cond)[:, :, 0])
    both = perturbed(DiT(DiTConfig(depth=2, **base)))
    changed = x.clone()
    changed[:, :, 0] += 1.0
    assert not torch.allclose(both(x, t, cond)[:, :, 2], both(changed, t, cond)[:, :, 2])  # frame 2 sees frame 0


# ---- Wan 2.1 parity with diffusers -----------------------------------------------------------------------------


def diffusers_wan(patch=(1, 2, 2), cross_attn_norm=True, seed=0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(
        patch_size=patch, num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=256, ffn_dim=40, num_layers=2, cross_attn_norm=cross_attn_norm, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=64,
    ).eval()
    return perturbed(model, seed=seed)


@pytest.mark.parametrize(("patch", "cross_attn_norm"), [((1, 2, 2), True), ((2, 2, 2), True), ((1, 2, 2), False)])
def test_wan_parity_with_diffusers(patch, cross_attn_norm, one_thread):
    ref = diffusers_wan(patch, cross_attn_norm)
    config = config_from_diffusers_wan(dict(ref.config))
    assert config.rope and not config.sincos_pos_embed and config.patch_size_t == patch[0]
    ours = DiT(config).eval()
    ours.load_state_dict(from_diffusers_wan_state_dict(ref.state_dict(), config), strict=True)
    assert count_parameters(ours) == count_parameters(ref)
    g = torch.Generator().manual_seed(5)
    x, t, ctx = torch.randn(2, 4, 4, 6, 8, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 7, 16, generator=g)
    with torch.no_grad():
        expected = ref(x, t, ctx).sample
        got = ours(x, t, Conditioning(context=ctx))
    assert got.shape == expected.shape == x.shape
    assert (got - expected).abs().max() <= 1e-5
    # back to diffusers' names and shapes, exactly
    back = to_diffusers_wan_state_dict(ours.state_dict(), config)
    theirs = ref.state_dict()
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)


def test_wan_zero_padded_context_equals_masked_conditioning():
    """Wan attends to T5 states zero-padded to a fixed length; our conditioning carries a mask instead."""
    ref = diffusers_wan()
    config = config_from_diffusers_wan(dict(ref.config))
    assert config.context_padding == "zeros"
    ours = DiT(config).eval()
    ours.load_state_dict(from_diffusers_wan_state_dict(ref.state_dict(), config))
    g = torch.Generator().manual_seed(2)
    x, t, ctx = torch.randn(2, 4, 2, 4, 4, generator=g), torch.tensor([3.0, 999.0]), torch.randn(2, 6, 16, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 2:] = False
    padded = ctx * mask[..., None]
    with torch.no_grad():
        expected = ref(x, t, padded).sample
        got = ours(x, t, Conditioning(context=ctx, context_mask=mask))
    assert (got - expected).abs().max() <= 1e-5


def test_wan_original_checkpoint_naming():
    ref = diffusers_wan()
    config = config_from_diffusers_wan(dict(ref.config))
    ours = DiT(config)
    ours.load_state_dict(from_diffusers_wan_state_dict(ref.state_dict(), config))
    original = to_wan_state_dict(ours.state_dict(), config)
    # The original names, as diffusers' conversion script renames them (its table, applied in order).
    renames = [("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
               ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
               ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
               ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
               ("time_projection.1", "condition_embedder.time_proj"), ("head.modulation", "scale_shift_table"),
               ("head.head", "proj_out"), ("modulation", "scale_shift_table"), ("ffn.0", "ffn.net.0.proj"),
               ("ffn.2", "ffn.net.2"), ("norm2", "norm__placeholder"), ("norm3", "norm2"),
               ("norm__placeholder", "norm3"), ("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"),
               ("self_attn.v", "attn1.to_v"), ("self_attn.o", "attn1.to_out.0"), ("self_attn.norm_q", "attn1.norm_q"),
               ("self_attn.norm_k", "attn1.norm_k"), ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"),
               ("cross_attn.v", "attn2.to_v"), ("cross_attn.o", "attn2.to_out.0"),
               ("cross_attn.norm_q", "attn2.norm_q"), ("cross_attn.norm_k", "attn2.norm_k")]

    def to_diffusers(name):
        for old, new in renames:
            name = name.replace(old, new)
        return name

    theirs = ref.state_dict()
    assert {to_diffusers(k) for k in original} == set(theirs)
    assert all(torch.equal(v, theirs[to_diffusers(k)]) for k, v in original.items())
    prefixed = {"model.diffusion_model." + k: v for k, v in original.items()}
    for state in (original, prefixed):
        loaded = DiT(config)
        loaded.load_state_dict(from_wan_state_dict(state, config), strict=True)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ours.state_dict().values()))


def test_wan_converters_refuse_what_they_cannot_load():
    ref = diffusers_wan()
    config = config_from_diffusers_wan(dict(ref.config))
    state = ref.state_dict()
    with pytest.raises(ValueError, match="Missing 1"):
        from_diffusers_wan_state_dict({k: v for k, v in state.items() if k != "proj_out.bias"}, config)
    with pytest.raises(ValueError, match="not Wan-shaped"):
        from_diffusers_wan_state_dict(state, DiTConfig())
    with pytest.raises(ValueError, match="image_dim"):
        config_from_diffusers_wan({**dict(ref.config), "image_dim": 1280, "added_kv_proj_dim": 24})


def test_wan_loads_through_load_weights(tmp_path):
    from training.weights import load_weights

    ref = diffusers_wan()
    config = config_from_diffusers_wan(dict(ref.config))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "wan.safetensors")
    model = DiT(config)
    assert load_weights(model, tmp_path / "wan.safetensors") == "diffusers"
    save_file(to_wan_state_dict(model.state_dict(), config), tmp_path / "orig.safetensors")
    assert load_weights(DiT(config), tmp_path / "orig.safetensors") == "wan"


# ---- full-size configs on the meta device ----------------------------------------------------------------------

WAN_PUBLISHED = {  # diffusers configs of Wan-AI/Wan2.1-T2V-1.3B and -14B
    "wan2.1-t2v-1.3b": dict(num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "wan2.1-t2v-14b": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40),
}


@pytest.mark.parametrize("name", list(WAN_PUBLISHED))
def test_wan_parameter_counts_equal_diffusers(name):
    diffusers = pytest.importorskip("diffusers")
    from accelerate import init_empty_weights

    from models.registry import get_preset

    with init_empty_weights():
        ref = diffusers.WanTransformer3DModel(attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                                              freq_dim=256, cross_attn_norm=True, **WAN_PUBLISHED[name])
    config = get_preset(name)
    assert config == config_from_diffusers_wan(dict(ref.config))
    with torch.device("meta"):
        ours = DiT(config)
    assert count_parameters(ours) == sum(p.numel() for p in ref.parameters())
    assert count_parameters(ours) == {"wan2.1-t2v-1.3b": 1_418_996_800, "wan2.1-t2v-14b": 14_288_491_584}[name]


def test_published_wan_flops_per_clip():
    """FLOPs (2 per multiply-add) of one 81-frame 480×832 clip: Wan's VAE gives 16 × 21 × 60 × 104 latents
    (32,760 tokens after (1, 2, 2) patches), 512 umT5 tokens. The numbers MFU figures are computed from."""
    from models.registry import build_model

    x, t = torch.empty(1, 16, 21, 60, 104, device="meta"), torch.empty(1, device="meta")
    cond = Conditioning(context=torch.empty(1, 512, 4096, device="meta"))
    expected = {"wan2.1-t2v-1.3b": 283_001_787_777_024, "wan2.1-t2v-14b": 1_678_370_283_192_320}
    for name, flops in expected.items():
        assert count_flops(build_model(name, device="meta"), x, t, cond) == flops


def test_wan_flops_match_formula():
    """FLOPs per clip on the meta device: every matrix product of a Wan block, counted by hand."""
    config = wan_config(num_heads=4, mlp_hidden_size=96, depth=3, head_dim=16, in_channels=16, text_dim=40)
    with torch.device("meta"):
        model = DiT(config)
    frames, h, w, length = 5, 12, 16, 9
    n, d, f, c, dc = frames * (h // 2) * (w // 2), 64, 96, 16, 40
    block = n * (4 * d * d + 2 * d * d + 2 * d * f) + length * 2 * d * d + 2 * n * n * d + 2 * n * length * d
    embed = n * (4 * c) * d + (256 * d + d * d) + d * 6 * d + length * (dc * d + d * d) + n * d * 4 * c
    x = torch.empty(1, c, frames, h, w, device="meta")
    cond = Conditioning(context=torch.empty(1, length, dc, device="meta"))
    assert count_flops(model, x, torch.empty(1, device="meta"), cond) == 2 * (config.depth * block + embed)


# ---- checkpointing, safetensors, registry ----------------------------------------------------------------------


@pytest.mark.parametrize("build", [_wan_tiny, _latte_tiny, lambda: dataclasses.replace(_wan_tiny(), patch_size_t=2,
                                                                                       attention_layout="factorised")])
def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(build):
    config = build()
    model = perturbed(DiT(config))
    channels = config.in_channels
    x, t, cond = torch.randn(2, channels, 4, 4, 6), torch.tensor([5, 600]), text()
    results = []
    for enabled in (False, True):
        model.enable_gradient_checkpointing(enabled)
        model.zero_grad()
        out = model(x, t, cond)
        out.square().mean().backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for k, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][k], grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("build", [_wan_tiny, _latte_tiny])
def test_safetensors_round_trip(build, tmp_path):
    model = perturbed(DiT(build()))
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    loaded = DiT(build())
    loaded.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    x, t, cond = torch.randn(1, model.config.in_channels, 3, 4, 4), torch.tensor([7]), text(batch=1)
    assert torch.equal(loaded(x, t, cond), model(x, t, cond))
    assert not any("cache" in k for k in model.state_dict())  # position and rope tables are not state


def test_presets_and_blocks():
    from models.registry import build_model, get_architecture, get_preset, list_presets

    names = list_presets()
    for name in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan-tiny", "wan-small", "latte-tiny"):
        assert name in names
    big = get_preset("wan2.1-t2v-14b")
    assert (big.hidden_size, big.depth, big.num_heads, big.mlp_width, big.rope_axes) == (5120, 40, 40, 13824,
                                                                                         (44, 42, 42))
    arch = get_architecture("dit")
    assert arch.block_names == ("DiTBlock",) and tuple(arch.converters) == ("diffusers", "wan", "original")
    model = build_model("wan-tiny")
    assert model(torch.randn(1, 16, 2, 4, 4), torch.tensor([3]), text(batch=1)).shape == (1, 16, 2, 4, 4)
    with pytest.raises(ValueError, match="video DiT takes"):
        model(torch.randn(1, 16, 4, 4), torch.tensor([3]), text(batch=1))


def test_config_checks():
    with pytest.raises(ValueError, match="rope_axes_dims"):
        DiTConfig(hidden_size=64, num_heads=2, rope=True, rope_axes_dims=(10, 10, 10))
    with pytest.raises(ValueError, match="rope_axes_dims"):
        DiTConfig(hidden_size=64, num_heads=2, rope=True, rope_axes_dims=(11, 11, 10))
    assert DiTConfig(hidden_size=64, num_heads=2, rope=True, rope_axes_dims=(12, 10, 10)).rope_axes == (12, 10, 10)
    with pytest.raises(ValueError, match="patch_size_t"):
        DiTConfig(patch_size_t=0)
    with pytest.raises(ValueError, match="qk_norm_type"):
        DiTConfig(qk_norm_type="global")


@pytest.mark.parametrize("layout", ["model", "sharded", "pipeline"])
def test_wan_diffusers_folder_loads_through_load_weights(layout, tmp_path, one_thread):
    """``diffusion.weights`` may name a diffusers model folder (sharded or not) or a pipeline folder (its
    ``transformer/``): ``load_weights`` reads it and the converted DiT gives diffusers' outputs."""
    from training.weights import load_weights

    ref = diffusers_wan()
    folder = tmp_path / "transformer" if layout == "pipeline" else tmp_path
    ref.save_pretrained(folder, max_shard_size="100KB" if layout == "sharded" else "10GB")
    if layout == "sharded":
        assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ours = DiT(config_from_diffusers_wan(dict(ref.config))).eval()
    assert load_weights(ours, tmp_path) == "diffusers"
    g = torch.Generator().manual_seed(5)
    x, t, ctx = torch.randn(1, 4, 2, 4, 4, generator=g), torch.tensor([10.0]), torch.randn(1, 5, 16, generator=g)
    with torch.no_grad():
        assert (ours(x, t, Conditioning(context=ctx)) - ref(x, t, ctx).sample).abs().max() <= 1e-5
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.*transformer subfolder"):
        load_weights(ours, empty)
