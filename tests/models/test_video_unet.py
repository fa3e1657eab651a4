"""The SVD spatio-temporal U-Net: diffusers parity, original (SGM) naming, full-size parameter count, inflation of an
image U-Net (identity at initialisation), gradient checkpointing, safetensors round trip, input checks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from models.conditioning import Conditioning
from models.registry import build_model, get_architecture, resolve
from models.unet import UNet, UNetConfig, tiny_unet_config
from models.utils import count_parameters, repeated_blocks
from models.video_unet import (
    SpatioTemporalResBlock,
    TemporalResBlock,
    TemporalTransformerBlock,
    VideoUNet,
    VideoUNetConfig,
    config_from_diffusers,
    from_diffusers_state_dict,
    from_sgm_state_dict,
    svd_unet_config,
    svd_unet_tiny_config,
    to_diffusers_state_dict,
    to_sgm_state_dict,
)
from training.weights import load_weights

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5  # fp32 parity with diffusers
SVD_PARAMETERS = 1_524_623_082  # diffusers' UNetSpatioTemporalConditionModel() (stabilityai/stable-video-diffusion-*)

# reduced configs of diffusers' class: two levels with attention at the top only, deeper transformers at the bottom
# (mid block); and three levels, all with attention, one ResBlock per level
DIFFUSERS_CASES = {
    "attention-top-deep-mid": dict(
        block_out_channels=(32, 64), layers_per_block=2, num_attention_heads=(2, 4),
        transformer_layers_per_block=(1, 2),
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    ),
    "three-levels-all-attention": dict(
        block_out_channels=(32, 32, 64), layers_per_block=1, num_attention_heads=(1, 2, 2),
        down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3,
        up_block_types=("CrossAttnUpBlockSpatioTemporal",) * 3,
    ),
}  # fmt: skip
CTX = 24
TINY_CTX = svd_unet_tiny_config().cross_attention_dim


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Move every weight off its initial value (so no zero-initialised layer hides a mapping error)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def svd_cond(b: int, h: int, w: int, ctx: int = CTX, latent_channels: int = 4) -> Conditioning:
    g = torch.Generator().manual_seed(7)
    return Conditioning(
        image_latents=torch.randn(b, latent_channels, h, w, generator=g),
        image_embeds=torch.randn(b, 1, ctx, generator=g),
        fps=torch.tensor([7.0, 12.0])[:b],
        motion_bucket=torch.tensor([127.0, 30.0])[:b],
        aug_strength=torch.tensor([0.02, 0.1])[:b],
    )


def diffusers_svd(case: str):
    diffusers = pytest.importorskip("diffusers")
    config = dict(DIFFUSERS_CASES[case], in_channels=8, out_channels=4, cross_attention_dim=CTX,
                  addition_time_embed_dim=8, projection_class_embeddings_input_dim=3 * 8)  # fmt: skip
    model = diffusers.UNetSpatioTemporalConditionModel(**config).eval()
    perturb(model, seed=1)
    return model


def diffusers_forward(model, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """diffusers' call on our inputs: (B, T, C, H, W) with the image latent concatenated, fps - 1 as SVD's pipeline."""
    frames = x.shape[2]
    sample = torch.cat([x, cond.image_latents[:, :, None].expand(-1, -1, frames, -1, -1)], dim=1)
    ids = torch.stack([cond.fps - 1, cond.motion_bucket, cond.aug_strength], dim=1)
    out = model(sample.permute(0, 2, 1, 3, 4), t, cond.image_embeds, ids).sample  # (B, T, C, H, W)
    return out.permute(0, 2, 1, 3, 4)


# ----------------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", list(DIFFUSERS_CASES))
def test_diffusers_weights_load_and_give_diffusers_outputs(case):
    ref_model = diffusers_svd(case)
    config = config_from_diffusers(ref_model.config)
    ours = VideoUNet(config).eval()
    ours.load_state_dict(from_diffusers_state_dict(ref_model.state_dict(), config), strict=True)
    x = torch.randn(2, 4, 3, 16, 16)
    t = torch.tensor([10.0, 500.0])
    cond = svd_cond(2, 16, 16)
    with torch.no_grad():
        ref = diffusers_forward(ref_model, x, t, cond)
        out = ours(x, t, cond)
    assert out.shape == x.shape
    diff = (out - ref).abs().max().item()
    assert diff <= TOL, f"{case}: max |ours - diffusers| = {diff:.3g}"
    # and back: our state dict in diffusers' names is diffusers' state dict
    exported = to_diffusers_state_dict(ours.state_dict())
    assert set(exported) == set(ref_model.state_dict())
    assert all(torch.equal(exported[k], v) for k, v in ref_model.state_dict().items())


def test_original_sgm_checkpoint_naming_round_trip():
    """Diffusers weights → ours → SGM's ``model.diffusion_model.*`` names → ours: same network, same outputs."""
    ref_model = diffusers_svd("attention-top-deep-mid")
    config = config_from_diffusers(ref_model.config)
    ours = VideoUNet(config).eval()
    ours.load_state_dict(from_diffusers_state_dict(ref_model.state_dict(), config), strict=True)
    original = to_sgm_state_dict(ours.state_dict(), config, prefix="model.diffusion_model.")
    original["conditioner.embedders.0.open_clip.model.ln_final.weight"] = torch.zeros(3)  # other parts: ignored
    original["first_stage_model.decoder.conv_in.weight"] = torch.zeros(3)
    reloaded = VideoUNet(config).eval()
    reloaded.load_state_dict(from_sgm_state_dict(original, config), strict=True)
    x, t, cond = torch.randn(1, 4, 2, 8, 8), torch.tensor([30.0]), svd_cond(1, 8, 8)
    with torch.no_grad():
        assert torch.equal(reloaded(x, t, cond), ours(x, t, cond))
    missing = dict(original)
    missing.pop("model.diffusion_model.input_blocks.1.1.time_mixer.mix_factor")
    with pytest.raises(ValueError, match="time_mixer.mix_factor"):
        from_sgm_state_dict(missing, config)


def test_sgm_names_of_the_full_svd_u_net():
    """Names the released ``svd.safetensors`` is known to hold (positional, as in SGM's VideoUNet)."""
    config = svd_unet_config()
    with torch.device("meta"):
        names = set(to_sgm_state_dict(VideoUNet(config).state_dict(), config))
    for name in (
        "time_embed.0.weight", "time_embed.2.bias", "label_emb.0.0.weight", "label_emb.0.2.bias",
        "input_blocks.0.0.weight", "input_blocks.1.0.time_stack.in_layers.2.weight",
        "input_blocks.1.0.time_stack.emb_layers.1.weight", "input_blocks.1.0.time_stack.out_layers.3.bias",
        "input_blocks.1.1.time_stack.0.attn1.to_q.weight", "input_blocks.1.1.time_stack.0.ff_in.net.0.proj.weight",
        "input_blocks.1.1.time_pos_embed.0.weight", "input_blocks.1.1.time_pos_embed.2.bias",
        "input_blocks.1.1.time_mixer.mix_factor", "input_blocks.3.0.op.weight",
        "input_blocks.8.0.time_mixer.mix_factor", "input_blocks.11.0.time_stack.in_layers.0.weight",
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "middle_block.2.time_mixer.mix_factor",
        "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
        "output_blocks.11.1.time_stack.0.norm_in.weight", "output_blocks.3.0.skip_connection.weight",
        "out.0.weight", "out.2.bias",
    ):  # fmt: skip
        assert name in names, name
    assert len(names) == 1428


def test_full_svd_parameter_count_on_meta_equals_diffusers():
    with torch.device("meta"):
        ours = VideoUNet(svd_unet_config())
        same = VideoUNet(config_from_diffusers({
            "down_block_types": ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"],
            "up_block_types": ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
        }))  # fmt: skip
    assert count_parameters(ours) == SVD_PARAMETERS
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in same.state_dict().items()}
    diffusers = pytest.importorskip("diffusers")
    from accelerate import init_empty_weights

    with init_empty_weights():
        ref = diffusers.UNetSpatioTemporalConditionModel()
    assert sum(p.numel() for p in ref.parameters()) == SVD_PARAMETERS
    assert set(from_diffusers_state_dict(ref.state_dict(), svd_unet_config())) == set(ours.state_dict())


# -------------------------------------------------------------------------------------------------------- inflation


SD15_LIKE = dict(block_out_channels=[32, 64], layers_per_block=1, attention_levels=[True, False],
                 transformer_depth=[1, 1], num_heads=[2, 4], cross_attention_dim=CTX, norm_num_groups=8)  # fmt: skip


@pytest.mark.parametrize("image_config", [tiny_unet_config(), UNetConfig(**SD15_LIKE)], ids=["tiny", "sd15-like"])
@pytest.mark.parametrize("svd_inputs", [False, True], ids=["text-only", "with-image-latents-and-ids"])
def test_inflated_u_net_is_the_image_u_net_per_frame_at_init(image_config, svd_inputs):
    image = UNet(image_config).eval()
    perturb(image, seed=3)
    extra = dict(concat_image_latents=True, add_time_ids=("fps", "motion_bucket", "aug_strength")) if svd_inputs else {}
    video = VideoUNet.from_image_unet(image, **extra).eval()
    x = torch.randn(2, 4, 5, 16, 16)
    t = torch.tensor([3.0, 700.0])
    ctx = torch.randn(2, 7, image_config.cross_attention_dim)
    cond = Conditioning(context=ctx)
    if svd_inputs:
        cond = Conditioning(
            context=ctx, image_latents=torch.randn(2, 4, 16, 16), fps=torch.tensor([7.0, 24.0]),
            motion_bucket=torch.tensor([127.0, 3.0]), aug_strength=torch.tensor([0.02, 0.5]),
        )  # fmt: skip
    with torch.no_grad():
        ref = image(x, t, Conditioning(context=ctx))  # the image U-Net on the clip: frame by frame (test_unet)
        per_frame = torch.stack([image(x[:, :, f], t, Conditioning(context=ctx)) for f in range(5)], dim=2)
        out = video(x, t, cond)
    assert (out - ref).abs().max().item() <= 1e-6
    assert (out - per_frame).abs().max().item() <= TOL  # frames one at a time: other GEMM sizes, same maths
    # the temporal layers are live: they receive gradients at once, and once changed they change the output
    video.train()
    video(x, t, cond).square().mean().backward()
    temporal = [m for m in video.modules() if isinstance(m, (TemporalResBlock, TemporalTransformerBlock))]
    assert all(m.conv2.weight.grad.abs().sum() > 0 for m in temporal if isinstance(m, TemporalResBlock))
    blocks = [m for m in temporal if isinstance(m, TemporalTransformerBlock)]
    assert blocks and all(m.self_attn.to_out.weight.grad.abs().sum() > 0 for m in blocks)
    perturb(video, seed=4, scale=0.01)
    with torch.no_grad():
        frame_changed = x.clone()
        frame_changed[:, :, 0] += 1.0
        moved = (video.eval()(frame_changed, t, cond) - video(x, t, cond))[:, :, 1:].abs().max()
    assert moved > 1e-4  # frames now exchange information


def test_inflation_from_a_diffusers_sd15_checkpoint_loaded_into_ours():
    """An SD 1.5-layout diffusers UNet2DConditionModel → our UNet (models.convert) → video U-Net: per-frame output
    of the diffusers model at initialisation."""
    diffusers = pytest.importorskip("diffusers")
    from models.convert import config_from_diffusers_unet, from_diffusers_unet_state_dict

    ref = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=CTX, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()  # fmt: skip
    perturb(ref, seed=5)
    config = config_from_diffusers_unet(ref.config)
    image = UNet(config).eval()
    image.load_state_dict(from_diffusers_unet_state_dict(ref.state_dict(), config), strict=True)
    video = VideoUNet.from_image_unet(image).eval()
    x, t, ctx = torch.randn(1, 4, 3, 16, 16), torch.tensor([250.0]), torch.randn(1, 5, CTX)
    with torch.no_grad():
        expected = torch.stack([ref(x[:, :, f], t, ctx).sample for f in range(3)], dim=2)
        out = video(x, t, Conditioning(context=ctx))
    assert (out - expected).abs().max().item() <= TOL


def test_inflation_rejects_what_the_video_u_net_lacks():
    image = UNet(UNetConfig(**{**SD15_LIKE, "num_classes": 3}))
    with pytest.raises(ValueError, match="num_classes"):
        VideoUNet.from_image_unet(image)


# ---------------------------------------------------------------------------------------- behaviour and plumbing


def tiny(**overrides) -> VideoUNetConfig:
    return VideoUNetConfig(**{**svd_unet_tiny_config().__dict__, **overrides})


def test_frames_interact_and_4d_latents_equal_broadcast_5d():
    model = VideoUNet(tiny()).eval()
    perturb(model, seed=6)
    x, t = torch.randn(2, 4, 3, 8, 8), torch.tensor([5.0, 900.0])
    cond = svd_cond(2, 8, 8, ctx=TINY_CTX)
    with torch.no_grad():
        out = model(x, t, cond)
        lat5 = cond.image_latents[:, :, None].expand(-1, -1, 3, -1, -1)
        assert torch.equal(model(x, t, Conditioning(**{**cond.__dict__, "image_latents": lat5})), out)
        x2 = x.clone()
        x2[:, :, 0] += 1.0
        assert (model(x2, t, cond) - out)[:, :, 2].abs().max() > 1e-4  # frame 0 reaches frame 2
        for name in ("fps", "motion_bucket", "aug_strength", "image_embeds", "image_latents"):
            changed = Conditioning(**{**cond.__dict__, name: getattr(cond, name) + 1.0})
            assert (model(x, t, changed) - out).abs().max() > 1e-5, name


def test_single_frame_as_image_skips_the_temporal_layers():
    model = VideoUNet(tiny(single_frame_is_image=True)).eval()
    perturb(model, seed=8)
    x, cond = torch.randn(2, 4, 1, 8, 8), svd_cond(2, 8, 8, ctx=TINY_CTX)
    with torch.no_grad():
        out = model(x, 10, cond)
        for m in model.modules():  # the temporal layers do not take part
            if isinstance(m, (TemporalResBlock, TemporalTransformerBlock)):
                for p in m.parameters():
                    p.add_(1.0)
        assert torch.equal(model(x, 10, cond), out)


def test_inputs_are_checked():
    model = VideoUNet(tiny()).eval()
    cond = svd_cond(2, 8, 8, ctx=TINY_CTX)
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        model(torch.randn(2, 4, 8, 8), 1, cond)
    for name in ("image_latents", "image_embeds", "fps"):
        with pytest.raises(ValueError, match=f"cond.{name}"):
            model(torch.randn(2, 4, 2, 8, 8), 1, Conditioning(**{**cond.__dict__, name: None}))
    with pytest.raises(ValueError, match="image_latents"):
        small = Conditioning(**{**cond.__dict__, "image_latents": torch.randn(2, 4, 4, 4)})
        model(torch.randn(2, 4, 2, 8, 8), 1, small)
    with pytest.raises(ValueError, match="context_source"):
        tiny(context_source="text")
    with pytest.raises(ValueError, match="heads"):
        tiny(block_out_channels=[32, 96], head_dim=64)


def test_text_context_source_uses_context_and_mask():
    model = VideoUNet(tiny(context_source="context", concat_image_latents=False, in_channels=4, add_time_ids=[]))
    model.eval()
    perturb(model, seed=9)
    x, ctx = torch.randn(2, 4, 2, 8, 8), torch.randn(2, 6, TINY_CTX)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    with torch.no_grad():
        full = model(x, 1, Conditioning(context=ctx, context_mask=mask))
        garbled = ctx.clone()
        garbled[1, 3:] = 100.0  # masked tokens: no effect
        assert torch.allclose(model(x, 1, Conditioning(context=garbled, context_mask=mask)), full, atol=1e-6)
        assert (model(x, 1, Conditioning(context=ctx)) - full)[1].abs().max() > 1e-5


def test_gradient_checkpointing_same_loss_and_gradients():
    torch.manual_seed(0)
    model = VideoUNet(tiny(dropout=0.0))
    perturb(model, seed=10)
    x, cond = torch.randn(2, 4, 3, 8, 8), svd_cond(2, 8, 8, ctx=TINY_CTX)

    def loss_and_grads(checkpointing: bool):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        loss = model(x, torch.tensor([3.0, 600.0]), cond).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_a, grads_a = loss_and_grads(False)
    loss_b, grads_b = loss_and_grads(True)
    assert torch.allclose(loss_a, loss_b, rtol=0, atol=1e-6)
    for name, g in grads_a.items():
        assert torch.allclose(g, grads_b[name], rtol=1e-4, atol=1e-6), name
    assert VideoUNet(tiny(gradient_checkpointing=True)).gradient_checkpointing
    flags = [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    assert flags and all(flags)


def test_safetensors_round_trip_and_foreign_namings(tmp_path):
    model = build_model("svd-unet-tiny").eval()
    perturb(model, seed=11)
    x, cond = torch.randn(1, 4, 2, 8, 8), svd_cond(1, 8, 8, ctx=TINY_CTX)
    with torch.no_grad():
        expected = model(x, 42, cond)
    config = model.config
    files = {
        "ours": model.state_dict(),
        "diffusers": to_diffusers_state_dict(model.state_dict()),
        "ldm": to_sgm_state_dict(model.state_dict(), config, prefix="model.diffusion_model."),
    }
    for naming, state in files.items():
        path = tmp_path / f"{naming}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        fresh = build_model("svd-unet-tiny").eval()
        assert load_weights(fresh, path) == naming
        with torch.no_grad():
            assert torch.equal(fresh(x, 42, cond), expected), naming


def test_registry_presets_and_blocks():
    arch, config = resolve("svd-unet")
    assert arch is get_architecture(VideoUNetConfig) and config == svd_unet_config()
    assert set(arch.converters) == {"diffusers", "ldm"}
    assert isinstance(resolve("svd-unet-tiny")[1], VideoUNetConfig)
    model = VideoUNet(tiny())
    names = {type(m).__name__ for m in repeated_blocks(model)}
    assert names == {"SpatioTemporalResBlock", "TransformerBlock", "TemporalTransformerBlock"}
    assert sum(isinstance(m, SpatioTemporalResBlock) for m in model.modules()) == 2 * 1 + 2 + 2 * 2
