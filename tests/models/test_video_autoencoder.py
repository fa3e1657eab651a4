"""Video autoencoders (models/video_autoencoder.py): diffusers parity (SVD temporal decoder, Wan 2.1 causal 3-D),
full-size parameter counts, chunked causal passes equal to whole-clip ones, spatial tiling, flat peak memory over
clip length, inflation of the image autoencoder, and the interface the stages use.

Parity: the diffusers model is built at a reduced config with seeded random weights, every weight is perturbed (so
no unit-norm or zero-initialised layer hides a mapping error), the weights are converted with our converter under
``strict=True`` and the outputs compared in fp32: max |diff| ≤ 1e-5.
"""

from __future__ import annotations

import dataclasses
import weakref

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from models.autoencoder import AutoencoderKL, tiny_vae_config
from models.registry import build_model, get_architecture, list_architectures
from models.utils import block_class_names, count_parameters
from models.video_autoencoder import (
    CausalAutoencoder3D,
    CausalAutoencoderConfig,
    CausalCache,
    TemporalAutoencoderConfig,
    TemporalDecoderAutoencoder,
    from_diffusers_svd_vae_state_dict,
    from_diffusers_wan_vae_state_dict,
    inflate_autoencoder,
    svd_vae_config,
    tiny_wan_vae_config,
    to_diffusers_svd_vae_state_dict,
    to_diffusers_wan_vae_state_dict,
    wan_vae_config,
)

TOL = 1e-5


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def smooth_clip(b: int, t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A clip in [-1, 1] with some spatial smoothness (closer to pixels than white noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, t, h, w, generator=g) * 2 - 1
    return F.avg_pool3d(F.pad(x, (1, 1, 1, 1, 0, 0), mode="replicate"), (1, 3, 3), 1)


# ---------------------------------------------------------------------------------------------------- (a) SVD


def test_svd_temporal_decoder_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, layers_per_block=2).eval()
    perturb(ref, 1)
    cfg = TemporalAutoencoderConfig(block_out_channels=[32, 64], layers_per_block=2)
    ours = TemporalDecoderAutoencoder(cfg).eval()
    ours.load_state_dict(from_diffusers_svd_vae_state_dict(ref.state_dict(), cfg), strict=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 5, 16, 16, generator=g)
    z = torch.randn(2, 4, 5, 8, 8, generator=g)
    frames = lambda v: v.permute(0, 2, 1, 3, 4).reshape(-1, *v.shape[1:2], *v.shape[3:])  # noqa: E731
    with torch.no_grad():
        post_ref = ref.encode(frames(x)).latent_dist
        post = ours.encode(x)
        assert (post_ref.mean - frames(post.mean)).abs().max() <= TOL
        assert (post_ref.logvar - frames(post.logvar)).abs().max() <= TOL
        dec_ref = ref.decode(frames(z), num_frames=5).sample
        dec = ours.decode(z)
        assert dec.shape == (2, 3, 5, 16, 16)
        assert (dec_ref - frames(dec)).abs().max() <= TOL
        # an image is a one-frame clip
        assert torch.equal(ours.encode(x[:, :, 0]).mean, post.mean[:, :, 0])
        one = ref.decode(z[:, :, 0], num_frames=1).sample
        assert (ours.decode(z[:, :, 0]) - one).abs().max() <= TOL
    # export goes back into diffusers under strict loading
    back = diffusers.AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, layers_per_block=2)
    back.load_state_dict(to_diffusers_svd_vae_state_dict(ours.state_dict()), strict=True)


def test_svd_full_parameter_count_equals_diffusers():
    diffusers = pytest.importorskip("diffusers")
    from accelerate import init_empty_weights

    with init_empty_weights():
        ref = diffusers.AutoencoderKLTemporalDecoder(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4, layers_per_block=2)
    with torch.device("meta"):
        ours = TemporalDecoderAutoencoder(svd_vae_config())
    assert count_parameters(ours) == sum(p.numel() for p in ref.parameters()) == 97_742_847


# ----------------------------------------------------------------------------------------------- (b) Wan 2.1

WAN_REDUCED = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1, latents_mean=[0.0] * 4,
                   latents_std=[1.0] * 4)


def _wan_pair():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLWan(**WAN_REDUCED).eval()
    perturb(ref, 1)
    with torch.no_grad():  # keep most decoded pixels inside Wan's [-1, 1] clamp, so the clamp hides nothing
        ref.decoder.conv_out.weight.mul_(0.3)
    cfg = tiny_wan_vae_config()
    ours = CausalAutoencoder3D(cfg).eval()
    ours.load_state_dict(from_diffusers_wan_vae_state_dict(ref.state_dict(), cfg), strict=True)
    return ref, ours


@pytest.mark.parametrize("chunk", [1, 0])
def test_wan_vae_matches_diffusers(chunk):
    ref, ours = _wan_pair()
    ours.config.chunk_latent_frames = chunk  # 1: diffusers' own chunk schedule; 0: the whole clip at once
    x = smooth_clip(1, 9, 32, 32)
    with torch.no_grad():
        post_ref = ref.encode(x).latent_dist
        post = ours.encode(x)
        assert post.mean.shape == (1, 4, 3, 4, 4) == (1, *ours.latent_shape(32, 32, 9))
        assert (post_ref.mean - post.mean).abs().max() <= TOL
        assert (post_ref.logvar - post.logvar).abs().max() <= TOL
        dec_ref = ref.decode(post_ref.mean).sample
        dec = ours.decode(post_ref.mean)
    assert dec.shape == x.shape
    assert (dec_ref.abs() < 1).float().mean() > 0.8
    assert (dec_ref - dec).abs().max() <= TOL


def test_wan_state_dict_exports_back_to_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ref, ours = _wan_pair()
    back = diffusers.AutoencoderKLWan(**WAN_REDUCED)
    back.load_state_dict(to_diffusers_wan_vae_state_dict(ours.state_dict(), ours.config), strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_wan21_full_parameter_count_equals_diffusers():
    diffusers = pytest.importorskip("diffusers")
    from accelerate import init_empty_weights

    with init_empty_weights():
        ref = diffusers.AutoencoderKLWan()  # its defaults are the Wan 2.1 autoencoder
    with torch.device("meta"):
        ours = CausalAutoencoder3D(wan_vae_config())
    assert count_parameters(ours) == sum(p.numel() for p in ref.parameters()) == 126_892_531


# ------------------------------------------------------------------------------------ (c) chunking and tiling


def _tiny_causal(**overrides) -> CausalAutoencoder3D:
    torch.manual_seed(0)
    model = CausalAutoencoder3D(dataclasses.replace(tiny_wan_vae_config(), **overrides)).eval()
    perturb(model, 3)
    return model


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_temporal_chunking_equals_whole_clip(chunk):
    model = _tiny_causal()
    x = smooth_clip(2, 13, 16, 16, seed=4)  # 13 = 1 + 4·3 frames → 4 latent frames
    with torch.no_grad():
        model.config.chunk_latent_frames = 0
        z_whole = model.encode(x).mean
        y_whole = model.decode(z_whole)
        model.config.chunk_latent_frames = chunk
        z = model.encode(x).mean
        y = model.decode(z_whole)
    assert z.shape == (2, 4, 4, 2, 2) and y.shape == x.shape
    assert (z - z_whole).abs().max() <= TOL
    assert (y - y_whole).abs().max() <= TOL


def test_causality_and_cache_by_hand():
    """Later frames never change earlier latents, and a CausalCache handed from chunk to chunk continues a clip."""
    model = _tiny_causal()
    x = smooth_clip(1, 9, 16, 16, seed=5)
    with torch.no_grad():
        model.config.chunk_latent_frames = 0
        whole = model.encoder(x)  # (1, 8, 3, 2, 2)
        changed = x.clone()
        changed[:, :, 5:] = -changed[:, :, 5:]
        assert (model.encoder(changed)[:, :, :2] - whole[:, :, :2]).abs().max() <= TOL
        assert not torch.allclose(model.encoder(changed)[:, :, 2], whole[:, :, 2])
        cache = CausalCache()
        parts = [model.encoder(x[:, :, :1], cache), model.encoder(x[:, :, 1:5], cache),
                 model.encoder(x[:, :, 5:9], cache)]
    assert (torch.cat(parts, dim=2) - whole).abs().max() <= TOL
    # an image is the first frame of a clip
    assert (model.encode(x[:, :, 0]).mean - model.encode(x).mean[:, :, 0]).abs().max() <= TOL


def _make_local(model: CausalAutoencoder3D) -> None:
    """Keep only the centre tap of every spatial 3×3 kernel: each output pixel then depends on one input pixel
    (per frame), so tiling must be exact."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) and m.weight.shape[-1] == 3:
                centre = m.weight[..., 1:2, 1:2].clone()
                m.weight.zero_()
                m.weight[..., 1:2, 1:2] = centre


def test_spatial_tiling_blends_exactly_on_a_local_network():
    model = _tiny_causal(mid_block_attention=False)
    _make_local(model)
    x = smooth_clip(1, 5, 80, 64, seed=6)  # latents 10×8: 3 × 2 tiles of 4 with overlap ≥ 2
    with torch.no_grad():
        z0, y0 = model.encode(x).mean, None
        y0 = model.decode(z0)
        model.config.tile_latent_size, model.config.tile_latent_overlap = 4, 2
        z, y = model.encode(x).mean, model.decode(z0)
    assert (z - z0).abs().max() <= TOL
    assert (y - y0).abs().max() <= TOL


def test_spatial_tiling_is_close_to_untiled():
    """Tolerance, stated: on this random-weight tiny Wan model (per-frame attention included) with 8-latent tiles
    and a 4-latent overlap on 12×12 latents, the mean |Δ| of the tiled result is below 20% of the mean |value| on
    encoding and 30% on decoding (measured: 16.7% and 24.1%). Random weights spread tile-border effects through
    the whole receptive field and the mid-block attention sees one tile only, so this is a loose bound; the
    blending itself is exact (see the local-network test above)."""
    model = _tiny_causal()
    x = smooth_clip(1, 5, 96, 96, seed=7)  # latents 12×12
    with torch.no_grad():
        z0 = model.encode(x).mean
        y0 = model.decode(z0)
        model.config.tile_latent_size, model.config.tile_latent_overlap = 8, 4
        z, y = model.encode(x).mean, model.decode(z0)
        assert z.shape == z0.shape and y.shape == y0.shape
        gaps = ((z - z0).abs().mean() / z0.abs().mean(), (y - y0).abs().mean() / y0.abs().mean())
        assert gaps[0] < 0.2 and gaps[1] < 0.3, gaps
        model.config.tile_latent_size = 12  # one tile covers the frame: the untiled result
        assert torch.equal(model.decode(z0), y0)


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once among the tensors created inside the mode.

    Why this method: CPU tensors are invisible to tracemalloc, and maxrss is blurred by the allocator and the
    interpreter; here every aten op's outputs are counted by storage when created and released (weakref
    finalisers run as soon as the last Python/C++ reference drops), so the figure is exact, deterministic and
    independent of other processes. Storages that existed before (inputs, parameters) are ignored."""

    def __init__(self, existing: set[int]):
        super().__init__()
        self.existing, self.live, self.now, self.peak = existing, {}, 0, 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage().data_ptr()
            if key == 0 or key in self.existing:
                continue
            if key in self.live:
                self.live[key][1] += 1
            else:
                self.live[key] = [t.untyped_storage().nbytes(), 1]
                self.now += self.live[key][0]
                self.peak = max(self.peak, self.now)
            weakref.finalize(t, self._release, key)
        return out


def _working_bytes(model: torch.nn.Module, fn, inp: torch.Tensor) -> int:
    """Peak live bytes of ``fn(inp)`` minus the bytes of its result: the working set beyond the output."""
    existing = {p.untyped_storage().data_ptr() for p in model.parameters()} | {inp.untyped_storage().data_ptr()}
    with torch.no_grad(), LiveTensorBytes(existing) as mem:
        out = fn(inp)
    return mem.peak - out.numel() * out.element_size()


def test_peak_memory_stays_flat_as_the_clip_grows():
    """Working memory (peak minus the output) of chunked encode/decode at 9, 33 and 129 frames is the same, while
    the whole-clip pass grows with the clip. Measured on 16×16 pixels with the tiny Wan model."""
    model = _tiny_causal()
    encode = lambda v: model.encode(v).mean  # noqa: E731
    chunked = {}
    for frames in (9, 33, 129):
        x = smooth_clip(1, frames, 16, 16, seed=frames)
        model.config.chunk_latent_frames = 1
        enc = _working_bytes(model, encode, x)
        z = encode(x).detach()
        dec = _working_bytes(model, model.decode, z)
        chunked[frames] = (enc, dec)
    for frames in (33, 129):
        for i in range(2):
            assert chunked[frames][i] <= 1.05 * chunked[9][i], chunked
    model.config.chunk_latent_frames = 0
    whole = {f: _working_bytes(model, encode, smooth_clip(1, f, 16, 16)) for f in (9, 33)}
    assert whole[33] > 2.5 * whole[9] and whole[33] > 2 * chunked[33][0], (whole, chunked)


# ------------------------------------------------------------------------------------------------ (d) inflation


def test_inflated_image_autoencoder_reconstructs_like_the_image_one():
    torch.manual_seed(0)
    image = AutoencoderKL(tiny_vae_config()).eval()
    perturb(image, 8)
    video = inflate_autoencoder(image).eval()
    assert video.temporal_factor == 4 and video.spatial_factor == image.spatial_factor
    g = torch.Generator().manual_seed(9)
    frame = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        ref_z = image.encode(frame).mean
        ref_x = image.decode(ref_z)
        # a one-frame clip, and an image through the video model's image path
        clip = frame[:, :, None]
        assert (video.encode(clip).mean[:, :, 0] - ref_z).abs().max() <= TOL
        assert (video.decode(ref_z[:, :, None])[:, :, 0] - ref_x).abs().max() <= TOL
        assert (video.encode(frame).mean - ref_z).abs().max() <= TOL
        # a static clip: the first frame (and, with these inits, every frame) reconstructs as the image does
        static = frame[:, :, None].expand(-1, -1, 9, -1, -1).contiguous()
        z = video.encode(static).mean
        recon = video.decode(z)
        assert recon.shape == static.shape
        assert (recon[:, :, 0] - ref_x).abs().max() <= TOL
        assert (recon - ref_x[:, :, None]).abs().max() <= TOL
        assert (video.scale_latents(z)[:, :, 0] - image.scale_latents(ref_z)).abs().max() <= TOL


# ------------------------------------------------------------------------------------------------- interface


def test_registry_presets_interface_and_latent_shapes():
    assert {"autoencoder-kl-temporal", "autoencoder-causal-3d"} <= set(list_architectures(role="autoencoder"))
    for name in ("svd-vae", "wan-vae"):
        with torch.device("meta"):
            model = build_model(name, device="meta")
        assert get_architecture(model).role == "autoencoder"
        assert block_class_names(model)
    svd = build_model("tiny-svd-vae")
    assert (svd.latent_channels, svd.spatial_factor, svd.temporal_factor) == (4, 2, 1)
    assert svd.latent_shape(16, 16, 7) == (4, 7, 8, 8) and svd.latent_shape(16, 16) == (4, 8, 8)
    wan = build_model("tiny-wan-vae")
    assert (wan.latent_channels, wan.spatial_factor, wan.temporal_factor) == (4, 8, 4)
    assert wan.latent_shape(64, 32, 33) == (4, 9, 8, 4) and wan.latent_shape(64, 32, 1) == (4, 1, 8, 4)
    assert wan.latent_shape(64, 32, 12) == (4, 3, 8, 4)  # T' = 1 + (T-1)//4
    assert wan.latent_shape(64, 32) == (4, 8, 4)
    with pytest.raises(ValueError, match="multiple"):
        wan.latent_shape(60, 32, 9)
    causal = build_model("tiny-causal-vae")
    assert (causal.spatial_factor, causal.temporal_factor, causal.config.norm) == (4, 4, "group")
    full = wan_vae_config()
    assert (full.spatial_factor, full.temporal_factor, full.latent_channels) == (8, 4, 16)
    with pytest.raises(ValueError, match="temporal_downsample"):
        CausalAutoencoderConfig(block_out_channels=[8, 16], temporal_downsample=[True, True])
    with pytest.raises(ValueError, match="norm_num_groups"):
        TemporalAutoencoderConfig(block_out_channels=[16, 48], norm_num_groups=32)


def test_wan_latent_normalisation_is_per_channel():
    model = CausalAutoencoder3D(dataclasses.replace(tiny_wan_vae_config(), latents_mean=[0.0, 1.0, 2.0, 3.0],
                                                    latents_std=[1.0, 2.0, 4.0, 8.0]))
    z = torch.randn(1, 4, 2, 3, 3)
    scaled = model.scale_latents(z)
    assert torch.allclose(scaled[:, 3], (z[:, 3] - 3.0) / 8.0)
    assert torch.allclose(model.unscale_latents(scaled), z, atol=1e-6)
    assert model.latents_from_pixels(smooth_clip(1, 5, 16, 16), sample=False).shape == (1, 4, 2, 2, 2)


@pytest.mark.parametrize("name", ["tiny-svd-vae", "tiny-wan-vae"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = build_model(name)
    if isinstance(model, CausalAutoencoder3D):
        model.config.chunk_latent_frames = 0  # the training configuration
    x = smooth_clip(1, 5, 16, 16)

    def grads():
        model.zero_grad()
        recon, post = model(x, sample_posterior=False)
        (recon.square().mean() + 1e-3 * post.kl().mean()).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    model.gradient_checkpointing = True
    assert model.gradient_checkpointing
    ckpt = grads()
    assert len(plain) == len(ckpt) > 0
    for a, b in zip(plain, ckpt):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-svd-vae", "tiny-wan-vae", "tiny-causal-vae"])
def test_safetensors_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(name).eval()
    path = tmp_path / "vae.safetensors"
    save_file(model.state_dict(), str(path))
    other = build_model(name).eval()
    other.load_state_dict(load_file(str(path)), strict=True)
    x = smooth_clip(1, 5, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.encode(x).mean, other.encode(x).mean)
