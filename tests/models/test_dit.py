"""DiT: shapes (image, non-square, video), layouts, adaLN-Zero init, conditioning paths, checkpointing,
save/load, position embeddings and their cache."""

import copy
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from models.conditioning import Conditioning
from models.dit import DiT, DiTConfig, sincos_1d, sincos_2d, spatiotemporal_sincos
from models.registry import get_preset


def tiny_text_config(**overrides) -> DiTConfig:
    base = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, context_dim=12,
                pooled_dim=6)
    base.update(overrides)
    return DiTConfig(**base)


def perturbed(model: DiT, scale: float = 0.05) -> DiT:
    """Move every weight off its initial value, so zero-initialised paths carry signal."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def text_cond(batch: int = 2, length: int = 5, dim: int = 12, pooled: int = 6) -> Conditioning:
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 2:] = False
    return Conditioning(context=torch.randn(batch, length, dim), context_mask=mask, pooled=torch.randn(batch, pooled))


# ---- shapes ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adaln_single", [False, True])
def test_image_shapes_square_and_non_square(adaln_single):
    model = DiT(tiny_text_config(adaln_single=adaln_single, caption_projection=adaln_single))
    cond = text_cond()
    for h, w in [(8, 8), (6, 10), (12, 4)]:
        x = torch.randn(2, 4, h, w)
        assert model(x, torch.tensor([1, 999]), cond).shape == (2, 4, h, w)


def test_video_shapes_and_one_layout():
    model = perturbed(DiT(tiny_text_config()))
    cond = text_cond()
    video = torch.randn(2, 4, 3, 6, 8)  # (B, C, T, H, W)
    out = model(video, torch.tensor([5, 50]), cond)
    assert out.shape == video.shape
    # A video model takes the same clips, gives the same numbers (same weights), and takes only clips.
    video_model = DiT(tiny_text_config(video=True))
    video_model.load_state_dict(model.state_dict())
    torch.testing.assert_close(video_model(video, torch.tensor([5, 50]), cond), out)
    with pytest.raises(ValueError, match=r"video DiT takes \(B, C, T, H, W\) clips; got x_t of shape \(6, 4, 6, 8\)"):
        video_model(video.transpose(1, 2).reshape(6, 4, 6, 8), torch.tensor([5, 50]), cond)  # frames in the batch


def test_one_frame_clip_equals_image():
    model = perturbed(DiT(tiny_text_config()))
    cond, x = text_cond(), torch.randn(2, 4, 8, 6)
    clip = model(x[:, :, None], torch.tensor([3, 4]), cond)  # (B, C, 1, H, W)
    torch.testing.assert_close(clip[:, :, 0], model(x, torch.tensor([3, 4]), cond))


def test_video_attention_mixes_frames():
    model = perturbed(DiT(tiny_text_config()))
    cond, video = text_cond(), torch.randn(2, 4, 3, 4, 4)
    out = model(video, torch.tensor([5, 50]), cond)
    changed = video.clone()
    changed[:, :, 0] += 1.0  # only frame 0 changes
    out2 = model(changed, torch.tensor([5, 50]), cond)
    assert not torch.allclose(out[:, :, 2], out2[:, :, 2])  # frame 2 sees frame 0


def test_learn_sigma_doubles_channels_and_splits():
    model = DiT(get_preset("dit-tiny"))
    x = torch.randn(3, 4, 8, 8)
    out = model(x, torch.tensor([1, 2, 3]), Conditioning(class_labels=torch.tensor([0, 5, 10])))
    assert out.shape == (3, 8, 8, 8)
    pred, var = DiT.split_learned_sigma(out)
    assert pred.shape == var.shape == x.shape


def test_scalar_timestep_broadcasts():
    model = perturbed(DiT(tiny_text_config()))
    cond, x = text_cond(), torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(model(x, 7, cond), model(x, torch.tensor([7, 7]), cond))


def test_bad_inputs_raise_clear_errors():
    model = DiT(tiny_text_config())
    cond = text_cond()
    with pytest.raises(ValueError, match="divisible by patch_size"):
        model(torch.randn(2, 4, 7, 8), torch.tensor([1, 2]), cond)
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), cond)
    with pytest.raises(ValueError, match="cond.context"):
        model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), Conditioning(pooled=torch.randn(2, 6)))
    with pytest.raises(ValueError, match="class_labels"):
        DiT(get_preset("dit-tiny"))(torch.randn(1, 4, 8, 8), torch.tensor([1]), Conditioning())
    for bad in (torch.randn(4, 8, 8), torch.randn(1, 2, 4, 3, 8, 8)):
        with pytest.raises(ValueError, match=rf"image DiT takes \(B, C, H, W\) images or \(B, C, T, H, W\) clips; "
                                             rf"got x_t of shape \({', '.join(map(str, bad.shape))}\)"):
            model(bad, torch.tensor([1, 2]), cond)
    with pytest.raises(ValueError, match="hidden_size"):
        DiTConfig(hidden_size=30, num_heads=3)


# ---- initialisation and conditioning ---------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["dit-tiny", "dit-tiny-text"])
def test_adaln_zero_init_gives_zero_output(preset):
    config = get_preset(preset)
    model = DiT(config)
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    if not config.adaln_single:
        assert all(torch.count_nonzero(b.adaLN_modulation[-1].weight) == 0 for b in model.blocks)
    cond = Conditioning(class_labels=torch.tensor([1, 2]), context=torch.randn(2, 77, 64),
                        pooled=torch.randn(2, 32))
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), cond)
    assert torch.equal(out, torch.zeros_like(out))
    # Once the zero-initialised final layer moves, the output does too: the zero came from the init, not the wiring.
    with torch.no_grad():
        model.final_layer.linear.weight.normal_()
    assert model(torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), cond).abs().sum() > 0


def test_context_pooled_and_timestep_are_used():
    model = perturbed(DiT(tiny_text_config(adaln_single=True, caption_projection=True)))
    cond, x, t = text_cond(), torch.randn(2, 4, 8, 8), torch.tensor([100, 200])
    ref = model(x, t, cond)
    other_context = Conditioning(context=torch.randn_like(cond.context), context_mask=cond.context_mask,
                                 pooled=cond.pooled)
    assert not torch.allclose(model(x, t, other_context), ref)
    other_pooled = Conditioning(context=cond.context, context_mask=cond.context_mask, pooled=torch.randn(2, 6))
    assert not torch.allclose(model(x, t, other_pooled), ref)
    assert not torch.allclose(model(x, torch.tensor([101, 201]), cond), ref)


def test_context_mask_hides_masked_tokens():
    model = perturbed(DiT(tiny_text_config()))
    cond, x, t = text_cond(), torch.randn(2, 4, 8, 8), torch.tensor([100, 200])
    ref = model(x, t, cond)
    context = cond.context.clone()
    context[:, 3] += 3.0  # token 3 is masked for sample 0 only
    out = model(x, t, Conditioning(context=context, context_mask=cond.context_mask, pooled=cond.pooled))
    torch.testing.assert_close(out[0], ref[0])
    assert not torch.allclose(out[1], ref[1])


def test_class_conditional_path_and_null_class():
    model = perturbed(DiT(get_preset("dit-tiny")))
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([5, 5, 5])
    out = model(x[:1].expand(3, -1, -1, -1), t, Conditioning(class_labels=torch.tensor([0, 3, 10])))  # 10 = null
    assert model.y_embedder.num_embeddings == 11
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])


# ---- determinism, save/load, checkpointing ---------------------------------------------------------------------


def test_deterministic_build_and_forward():
    torch.manual_seed(3)
    a = perturbed(DiT(tiny_text_config()))
    torch.manual_seed(3)
    b = perturbed(DiT(tiny_text_config()))
    cond, x = text_cond(), torch.randn(2, 4, 8, 8)
    out_a = a(x, torch.tensor([1, 2]), cond)
    assert torch.equal(out_a, a(x, torch.tensor([1, 2]), cond))
    assert torch.equal(out_a, b(x, torch.tensor([1, 2]), cond))


def test_safetensors_round_trip(tmp_path):
    model = perturbed(DiT(tiny_text_config(adaln_single=True, caption_projection=True)))
    path = tmp_path / "dit.safetensors"
    save_file(model.state_dict(), str(path))
    fresh = DiT(tiny_text_config(adaln_single=True, caption_projection=True))
    fresh.load_state_dict(load_file(str(path)))
    cond, x = text_cond(), torch.randn(2, 4, 6, 8)
    assert torch.equal(fresh(x, torch.tensor([3, 9]), cond), model(x, torch.tensor([3, 9]), cond))


def test_gradient_checkpointing_same_loss_and_grads():
    model = perturbed(DiT(tiny_text_config()))
    cond, x, t = text_cond(), torch.randn(2, 4, 8, 8), torch.tensor([10, 20])
    target = torch.randn(2, 4, 8, 8)

    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))

    def loss_and_grads(enabled):
        model.zero_grad()
        calls.clear()
        model.enable_gradient_checkpointing(enabled)
        loss = (model(x, t, cond) - target).pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_plain, grads_plain = loss_and_grads(False)
    assert len(calls) == 1
    loss_ckpt, grads_ckpt = loss_and_grads(True)
    assert len(calls) == 2  # the block ran again in backward: checkpointing is really on
    torch.testing.assert_close(loss_ckpt, loss_plain)
    assert grads_plain.keys() == grads_ckpt.keys()
    assert any(g.abs().sum() > 0 for g in grads_plain.values())
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], msg=name)


# ---- position embeddings ---------------------------------------------------------------------------------------


def reference_2d_sincos(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Independent float64 NumPy version of the MAE/DiT 2-D sin-cos table for a (possibly non-square) grid."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))
    return np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1)  # raster order


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (6, 2)])
def test_sincos_2d_matches_reference_non_square(grid):
    h, w = grid
    ours = sincos_2d(h, w, 16)
    assert ours.shape == (h * w, 16)
    np.testing.assert_allclose(ours.numpy(), reference_2d_sincos(16, h, w), atol=1e-5)
    assert torch.unique(ours, dim=0).shape[0] == h * w  # every patch position is distinct


def test_pos_embed_interpolation_and_base_size():
    # PixArt rescaling: positions i * (base / n) / interpolation along each axis.
    scaled = sincos_2d(4, 8, 16, base_size=4, interpolation=2.0)
    cols = torch.arange(8) * (4 / 8) / 2.0
    rows = torch.arange(4) * (4 / 4) / 2.0
    expected = torch.cat([sincos_1d(cols, 8)[None].expand(4, 8, 8), sincos_1d(rows, 8)[:, None].expand(4, 8, 8)],
                         dim=-1).reshape(32, 16)
    torch.testing.assert_close(scaled, expected)
    assert not torch.allclose(scaled, sincos_2d(4, 8, 16))


def test_spatiotemporal_embedding_is_separable():
    emb = spatiotemporal_sincos(3, 2, 4, 16).view(3, 8, 16)
    spatial = sincos_2d(2, 4, 16)
    temporal = sincos_1d(torch.arange(3.0), 16)
    for f in range(3):
        torch.testing.assert_close(emb[f], spatial + temporal[f])
    assert torch.equal(spatiotemporal_sincos(1, 2, 4, 16), spatial)
    assert math.isclose(float(sincos_1d(torch.tensor([0.0]), 4)[0, 2]), 1.0)  # cos(0) in the second half


def test_position_table_is_cached_per_grid_device_and_dtype():
    model = perturbed(DiT(tiny_text_config()))
    cond, t = text_cond(), torch.tensor([3, 300])
    calls = []
    import models.dit as dit_module

    real = dit_module.spatiotemporal_sincos

    def counting(*args, **kwargs):
        calls.append(args[:3])
        return real(*args, **kwargs)

    x, clip = torch.randn(2, 4, 8, 6), torch.randn(2, 4, 3, 4, 4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dit_module, "spatiotemporal_sincos", counting)
        first = model(x, t, cond)
        again = model(x, t, cond)
        model(clip, t, cond)
        model(clip, t, cond)
        with torch.inference_mode():  # a table first built under inference mode still works under autograd
            model(torch.randn(2, 4, 6, 6), t, cond)
        model(torch.randn(2, 4, 6, 6, requires_grad=True), t, cond).sum().backward()
        model.to(torch.float64)(x.double(), t, cond.to(dtype=torch.float64))  # another dtype: another table
    assert calls == [(1, 4, 3), (3, 2, 2), (1, 3, 3), (1, 4, 3)]  # once per (grid, device, dtype)
    assert torch.equal(first, again)
    # the cached table is exactly the one built from scratch: outputs are bit-identical to an uncached model
    uncached = copy.deepcopy(model).to(torch.float32)
    uncached._pos_cache.clear()
    model.to(torch.float32)
    torch.testing.assert_close(uncached(x, t, cond), first, rtol=0, atol=0)
    table = model.position_table(3, 2, 2, torch.device("cpu"), torch.float32)
    assert torch.equal(table, spatiotemporal_sincos(3, 2, 2, 32))
    assert "_pos_cache" not in str(model.state_dict().keys())  # not state: never saved or loaded


def test_unpatchify_matches_dit_layout():
    model = DiT(DiTConfig(sample_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2))
    tokens = torch.randn(2, 3 * 4, 2 * 2 * 3)  # (B, h*w, p*p*C) with h=3, w=4
    ours = model.unpatchify(tokens, 1, 3, 4)[:, :, 0]
    # The DiT reference: reshape to (N, h, w, p, q, c), einsum nhwpqc->nchpwq.
    ref = torch.einsum("nhwpqc->nchpwq", tokens.reshape(2, 3, 4, 2, 2, 3)).reshape(2, 3, 6, 8)
    assert torch.equal(ours, ref)


# ---- CUDA (marked gpu; skipped without a GPU) ------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_cuda_bf16_sdpa_matches_math_image_and_video():
    from models.attention import set_attention_backend

    torch.manual_seed(0)
    model = perturbed(DiT(tiny_text_config(hidden_size=128, num_heads=4, depth=3))).cuda()
    cond = text_cond().to("cuda")
    for x in (torch.randn(2, 4, 16, 24, device="cuda"), torch.randn(2, 4, 3, 8, 8, device="cuda")):
        t = torch.tensor([10, 900], device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            set_attention_backend(model, "sdpa")
            fast = model(x, t, cond).float()
            set_attention_backend(model, "math")
            ref = model(x, t, cond).float()
        assert fast.shape == x.shape
        torch.testing.assert_close(fast, ref, atol=3e-2, rtol=3e-2)
        with torch.no_grad():
            on_gpu = model(x, t, cond).cpu()  # float32 on CUDA
            on_cpu = copy.deepcopy(model).cpu()(x.cpu(), t.cpu(), cond.to("cpu"))
        torch.testing.assert_close(on_gpu, on_cpu, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@cuda
def test_cuda_gradient_checkpointing_saves_memory_same_grads():
    torch.manual_seed(0)
    model = perturbed(DiT(tiny_text_config(hidden_size=256, num_heads=4, depth=6))).cuda()
    cond, x = text_cond().to("cuda"), torch.randn(8, 4, 32, 32, device="cuda")
    cond = Conditioning(context=cond.context.repeat(4, 1, 1), context_mask=cond.context_mask.repeat(4, 1),
                        pooled=cond.pooled.repeat(4, 1))
    t = torch.arange(8, device="cuda") * 100

    def run(enabled):
        model.zero_grad(set_to_none=True)
        model.enable_gradient_checkpointing(enabled)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(x, t, cond).square().mean().backward()
        return torch.cuda.max_memory_allocated() - base, [p.grad.clone() for p in model.parameters()]

    mem_plain, grads_plain = run(False)
    mem_ckpt, grads_ckpt = run(True)
    assert mem_ckpt < 0.8 * mem_plain
    for a, b in zip(grads_plain, grads_ckpt):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
