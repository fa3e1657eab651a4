"""OpenCLIP text encoder wrapper: shapes, mask, layers, freezing, null conditioning, checkpoint loading."""

import open_clip
import pytest
import torch

from models.conditioning import Conditioning
from models.text_encoder import TextEncoder, TextEncoderConfig, TextEncoderLoadError

TINY = "openclip-tiny-text"
CAPTIONS = ["", "a photo of a cat", "an astronaut riding a horse on the moon, oil painting"]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder.from_config(TINY)


def tiny_clip() -> open_clip.CLIP:
    """A full (image + text) open_clip CLIP whose text tower matches the bundled tiny config."""
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 16, "layers": 1, "width": 32, "head_width": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    )


def test_shapes_and_types(encoder):
    cond = encoder.encode(CAPTIONS)
    assert isinstance(cond, Conditioning)
    assert cond.context.shape == (3, 77, 64) and encoder.context_dim == 64
    assert cond.pooled.shape == (3, 32) and encoder.pooled_dim == 32
    assert cond.context_mask.shape == (3, 77) and cond.context_mask.dtype == torch.bool
    assert cond.batch_size == 3


def test_mask_covers_start_caption_and_end_token(encoder):
    tokens = encoder.tokenize(CAPTIONS)
    mask = encoder.encode(CAPTIONS).context_mask
    for row in range(3):
        eot = int((tokens[row] == encoder.eot_token_id).nonzero()[0])
        assert mask[row, : eot + 1].all() and not mask[row, eot + 1 :].any()
    assert int(mask[0].sum()) == 2  # the empty prompt: start + end-of-text
    long = encoder.encode(["word " * 200]).context_mask
    assert bool(long.all())  # truncated to the context length, end-of-text in the last slot


def test_deterministic(encoder):
    a, b = encoder.encode(CAPTIONS), encoder.encode(CAPTIONS)
    assert torch.equal(a.context, b.context) and torch.equal(a.pooled, b.pooled)


def test_penultimate_and_last_differ_pooled_agrees(encoder):
    last = TextEncoder.from_config(TINY, layer="last")
    last.load_state_dict(encoder.state_dict())
    pen, fin = encoder.encode(CAPTIONS), last.encode(CAPTIONS)
    assert not torch.allclose(pen.context, fin.context)
    torch.testing.assert_close(pen.pooled, fin.pooled)  # pooled always comes from the last layer


def test_frozen_and_stays_in_eval(encoder):
    assert all(not p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not encoder.text.training
    assert not encoder.encode(["a dog"]).context.requires_grad
    trainable = TextEncoder.from_config(TINY, freeze=False)
    trainable.train()
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())
    assert trainable.encode(["a dog"]).context.requires_grad


def test_null_conditioning_is_empty_prompt_and_cached(encoder):
    null = encoder.null_conditioning(4)
    empty = encoder.encode([""])
    assert null.context.shape == (4, 77, 64)
    for i in range(4):
        assert torch.equal(null.context[i], empty.context[0])
        assert torch.equal(null.pooled[i], empty.pooled[0])
        assert torch.equal(null.context_mask[i], empty.context_mask[0])
    assert len(encoder._null_cache) == 1
    encoder.null_conditioning(2)
    assert len(encoder._null_cache) == 1


def test_safetensors_round_trip(encoder, tmp_path):
    path = tmp_path / "text.safetensors"
    encoder.save_checkpoint(path)
    loaded = TextEncoder.from_checkpoint(path, TINY)
    a, b = encoder.encode(CAPTIONS), loaded.encode(CAPTIONS)
    assert torch.equal(a.context, b.context) and torch.equal(a.pooled, b.pooled)
    assert all(not p.is_meta for p in loaded.parameters()) and not loaded.text.attn_mask.is_meta


def test_full_clip_checkpoint_matches_open_clip(tmp_path):
    """Load a whole open_clip CLIP .pt (image tower dropped) and compare with open_clip's own computations."""
    torch.manual_seed(1)
    clip = tiny_clip().eval()
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}, path)
    enc = TextEncoder.from_checkpoint(path, TINY, layer="penultimate", hidden_ln_final=True)
    assert not hasattr(enc.text, "visual")
    tokens = open_clip.tokenize(CAPTIONS)
    cond = enc.encode(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(cond.pooled, clip.encode_text(tokens))
        # Stable Diffusion 2.x FrozenOpenCLIPEmbedder(layer="penultimate"): all blocks but the last, then ln_final.
        x = clip.token_embedding(tokens) + clip.positional_embedding
        for block in clip.transformer.resblocks[:-1]:
            x = block(x, attn_mask=clip.attn_mask)
        torch.testing.assert_close(cond.context, clip.ln_final(x))
        raw = TextEncoder.from_checkpoint(path, TINY, hidden_ln_final=False).encode(CAPTIONS).context
        torch.testing.assert_close(raw, x)  # SDXL's OpenCLIP-G reading: no ln_final


def test_incompatible_checkpoint_fails_clearly(tmp_path, encoder):
    path = tmp_path / "text.safetensors"
    encoder.save_checkpoint(path)
    with pytest.raises(TextEncoderLoadError, match="does not match|does not fit"):
        TextEncoder.from_checkpoint(path, "ViT-B-32")
    with pytest.raises(TextEncoderLoadError, match="does not exist"):
        TextEncoder.from_checkpoint(tmp_path / "missing.pt", TINY)


def test_pretrained_download_failure_is_clear(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    with pytest.raises(TextEncoderLoadError, match="could not download.*checkpoint=PATH"):
        TextEncoder.from_pretrained("ViT-B-32", "laion2b_s34b_b79k")
    with pytest.raises(ValueError, match="no pretrained weights"):
        TextEncoder.from_pretrained("ViT-B-32", "no-such-tag")


def test_config_validation_and_named_architecture():
    with pytest.raises(ValueError, match="both set"):
        TextEncoderConfig(pretrained="x", checkpoint="y")
    with pytest.raises(ValueError, match="layer"):
        TextEncoderConfig(layer="middle")
    with pytest.raises(ValueError, match="unknown text-encoder model"):
        TextEncoder.from_config("no-such-model")
    # An open_clip built-in architecture resolves offline (SD 2.x's ViT-H-14 text tower: width 1024, 24 blocks).
    with torch.device("meta"):
        big = TextEncoder.from_config("ViT-H-14")
    assert big.context_dim == 1024 and big.pooled_dim == 1024 and len(big.text.transformer.resblocks) == 24


def test_drives_the_tiny_text_dit(encoder):
    from models.registry import build_model

    dit = build_model("dit-tiny-text")
    assert dit.config.context_dim == encoder.context_dim and dit.config.pooled_dim == encoder.pooled_dim
    cond = encoder.encode(["a red square", "a blue circle"])
    x = torch.randn(2, 4, 8, 8)
    assert dit(x, torch.tensor([10, 20]), cond).shape == x.shape
    assert dit(x, torch.tensor([10, 20]), encoder.null_conditioning(2)).shape == x.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_encoding_matches_cpu(encoder):
    gpu = TextEncoder.from_config(TINY)
    gpu.load_state_dict(encoder.state_dict())
    gpu.cuda()
    a, b = encoder.encode(CAPTIONS), gpu.encode(CAPTIONS)
    assert b.context.device.type == "cuda" and b.context_mask.device.type == "cuda"
    torch.testing.assert_close(b.context.cpu(), a.context, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.pooled.cpu(), a.pooled, atol=1e-4, rtol=1e-4)
    assert gpu.null_conditioning(2).context.device.type == "cuda"
