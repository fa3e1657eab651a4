"""models.image_encoder: the OpenCLIP vision tower of image-to-video conditioning (SVD's image embedding)."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from models.image_encoder import (
    ImageEncoder,
    ImageEncoderConfig,
    ImageEncoderLoadError,
    antialias_resize,
    build_vision_tower,
    resolve_vision_config,
)
from models.openclip_towers import CONFIG_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "openclip-tiny-vision"


def tiny_clip(seed: int = 0) -> open_clip.model.CLIP:
    """A whole open_clip CLIP (vision + text tower) of the tiny architecture, as open_clip itself builds it."""
    config = json.loads((CONFIG_DIR / f"{TINY}.json").read_text())
    text = json.loads((CONFIG_DIR / "openclip-tiny-text.json").read_text())
    torch.manual_seed(seed)
    return open_clip.model.CLIP(embed_dim=config["embed_dim"], vision_cfg=config["vision_cfg"],
                                text_cfg=text["text_cfg"]).eval()


def clip_input(images: torch.Tensor) -> torch.Tensor:
    """open_clip's own normalisation of [-1, 1] frames already at the tower's size."""
    mean = torch.tensor(OPENAI_DATASET_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).reshape(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def frames(batch: int = 3, size: tuple[int, int] = (32, 32), seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_random_init_is_open_clips_tower_and_reproduces_encode_image():
    torch.manual_seed(5)
    enc = ImageEncoder.from_config(TINY)
    torch.manual_seed(5)
    ref_tower = build_vision_tower(resolve_vision_config(TINY)[0])
    for (name, a), (_, b) in zip(enc.visual.state_dict().items(), ref_tower.state_dict().items()):
        assert torch.equal(a, b), name  # open_clip's own random init, same stream
    clip = tiny_clip()
    clip.visual.load_state_dict(enc.visual.state_dict())
    x = frames()
    out = enc.encode(x)
    assert out.shape == (3, 1, 32) and enc.num_tokens == 1 and enc.embed_dim == 32
    with torch.no_grad():
        ref = clip.encode_image(clip_input(x))  # (B, embed_dim), unnormalised
    torch.testing.assert_close(out[:, 0], ref, rtol=0, atol=1e-6)


def test_loads_open_clip_state_dicts(tmp_path):
    """A full CLIP state dict as open_clip names it (safetensors), and open_clip's training checkpoint layout
    (``{"state_dict": {"module.visual...": ...}}``, a .pt read weights-only), give open_clip's encode_image."""
    from safetensors.torch import save_file

    clip = tiny_clip(seed=3)
    state = clip.state_dict()
    assert any(k.startswith("visual.") for k in state) and any(k.startswith("transformer.") for k in state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "clip.safetensors"))
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "epoch_1.pt")
    x = frames(2, seed=4)
    with torch.no_grad():
        ref = clip.encode_image(clip_input(x))
    for name in ("clip.safetensors", "epoch_1.pt"):
        enc = ImageEncoder.from_checkpoint(tmp_path / name, model=TINY)
        torch.testing.assert_close(enc.encode(x)[:, 0], ref, rtol=0, atol=1e-6)
    bare = tmp_path / "visual.safetensors"  # a bare vision-tower state dict
    save_file({k: v.contiguous() for k, v in clip.visual.state_dict().items()}, str(bare))
    torch.testing.assert_close(ImageEncoder.from_checkpoint(bare, model=TINY).encode(x)[:, 0], ref, rtol=0, atol=1e-6)


def test_save_checkpoint_round_trip_and_open_clip_naming(tmp_path):
    enc = ImageEncoder.from_config(TINY)
    path = tmp_path / "image_encoder.safetensors"
    enc.save_checkpoint(path)
    from safetensors.torch import load_file

    saved = load_file(str(path))
    assert saved and all(k.startswith("visual.") for k in saved)
    clip = tiny_clip(seed=9)
    result = clip.load_state_dict(saved, strict=False)  # open_clip reads our file under its own names
    assert not result.unexpected_keys and not any(k.startswith("visual.") for k in result.missing_keys)
    back = ImageEncoder.from_checkpoint(path, model=TINY)
    x = frames(2)
    assert torch.equal(back.encode(x), enc.encode(x))


def test_tokens_output_is_open_clips_patch_tokens():
    enc = ImageEncoder.from_config(TINY, output="tokens")
    clip = tiny_clip()
    clip.visual.load_state_dict(enc.visual.state_dict())
    clip.visual.output_tokens = True
    x = frames(2)
    out = enc.encode(x)
    assert out.shape == (2, 16, 64) and enc.num_tokens == 16 and enc.embed_dim == 64  # (32 / 8)^2 patches, width
    with torch.no_grad():
        _, tokens = clip.visual(clip_input(x))
    torch.testing.assert_close(out, tokens, rtol=0, atol=1e-6)
    assert enc.null_embeds(4).shape == (4, 16, 64) and not enc.null_embeds(1).any()


def test_preprocess_resizes_as_svd_and_normalises():
    """SVD's resize (kornia antialias: Gaussian blur, then bicubic with align_corners) equals diffusers' SVD pipeline
    helper; frames of the tower's size are only normalised."""
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
        _resize_with_antialiasing,
    )

    for shape, size in (((2, 3, 48, 40), (32, 32)), ((1, 3, 300, 500), (224, 224)), ((1, 3, 20, 30), (32, 32))):
        x = torch.rand(*shape) * 2 - 1
        torch.testing.assert_close(antialias_resize(x, size), _resize_with_antialiasing(x, size), rtol=0, atol=1e-5)
    enc = ImageEncoder.from_config(TINY)
    x = frames(2)
    torch.testing.assert_close(enc.preprocess(x), clip_input(x), rtol=0, atol=1e-6)
    big = frames(2, (64, 48))
    expected = clip_input(_resize_with_antialiasing(big, (32, 32)))
    torch.testing.assert_close(enc.preprocess(big), expected, rtol=0, atol=1e-5)
    assert enc.encode(big).shape == (2, 1, 32)
    plain = ImageEncoder.from_config(TINY, resize="bicubic")
    assert plain.preprocess(big).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="resize='none'"):
        ImageEncoder.from_config(TINY, resize="none").encode(big)
    with pytest.raises(ValueError, match=r"RGB frames \(B, 3, H, W\)"):
        enc.encode(torch.zeros(2, 3, 1, 32, 32))
    custom = ImageEncoder.from_config(TINY, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    torch.testing.assert_close(custom.preprocess(x), x, rtol=0, atol=1e-6)  # (x+1)/2 then (· - .5)/.5 = x


def test_frozen_by_default_and_trainable_when_asked():
    enc = ImageEncoder.from_config(TINY)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.visual.training
    x = frames(2)
    assert not enc.encode(x).requires_grad
    live = ImageEncoder.from_config(TINY, freeze=False).train()
    live.encode(x).sum().backward()
    assert live.visual.conv1.weight.grad is not None
    half = ImageEncoder.from_config(TINY, dtype="bfloat16")
    assert half.encode(x).dtype == torch.bfloat16


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="both set"):
        ImageEncoderConfig(model=TINY, pretrained="laion2b_s32b_b79k", checkpoint="x.safetensors")
    with pytest.raises(ValueError, match="output='logits'"):
        ImageEncoderConfig(output="logits")
    with pytest.raises(ValueError, match="unknown image-encoder model 'no-such-model'"):
        ImageEncoder.from_config("no-such-model")
    with pytest.raises(ValueError, match="no 'vision_cfg'"):
        ImageEncoder.from_config("openclip-tiny-text")
    with pytest.raises(ValueError, match="local config; use checkpoint="):
        ImageEncoder(ImageEncoderConfig(model=TINY, pretrained="laion2b_s32b_b79k"))
    with pytest.raises(ImageEncoderLoadError, match="does not exist"):
        ImageEncoder.from_checkpoint(tmp_path / "missing.safetensors", model=TINY)
    from safetensors.torch import save_file

    wrong = tmp_path / "text_only.safetensors"
    save_file({"token_embedding.weight": torch.zeros(4, 4)}, str(wrong))
    with pytest.raises(ImageEncoderLoadError, match="does not match vision tower"):
        ImageEncoder.from_checkpoint(wrong, model=TINY)
    bigger = json.loads((CONFIG_DIR / f"{TINY}.json").read_text())
    bigger["vision_cfg"]["width"] = 128
    (tmp_path / "wide.json").write_text(json.dumps(bigger))
    ckpt = tmp_path / "tiny.safetensors"
    ImageEncoder.from_config(TINY).save_checkpoint(ckpt)
    with pytest.raises(ImageEncoderLoadError, match="does not fit vision tower"):
        ImageEncoder.from_checkpoint(ckpt, model=str(tmp_path / "wide.json"))


def test_svd_image_encoder_size_on_meta():
    """SVD's image encoder is OpenCLIP ViT-H/14's vision tower: 632,076,800 parameters (open_clip's own count of a
    full CLIP's ``visual``), 1024-d pooled embedding, 224 px input."""
    config, builtin = resolve_vision_config("ViT-H-14")
    assert builtin
    with torch.device("meta"):
        ours = build_vision_tower(config)
        ref = open_clip.model.CLIP(**config).visual
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters()) == 632_076_800
    assert ours.proj.shape == (1280, 1024) and tuple(ours.image_size) == (224, 224)
