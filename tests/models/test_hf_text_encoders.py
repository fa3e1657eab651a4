"""Hugging Face text encoders through ``TextEncoder(config)``: transformers' CLIPTextModel /
CLIPTextModelWithProjection / T5EncoderModel built at tiny sizes with random weights and saved as Stable Diffusion /
SDXL / PixArt pipeline folders (with tiny tokenizers written here), compared with transformers' own outputs and
with diffusers' ``StableDiffusionXLPipeline.encode_prompt``; the SD 2 single-file text tower; per-model masking."""

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file
from sdmaker import LENGTH, clip_tokenizer, t5_tokenizer

from models.conditioning import trim_together
from models.hf_text_encoders import HFTextEncoder, published_text_encoder_config
from models.text_encoder import TextEncoder, TextEncoderConfig, TextEncoderLoadError

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["the cat", "a cat sat on the mat with the hat", ""]


# ---- tiny tokenizers -----------------------------------------------------------------------------------------


# ---- tiny models ---------------------------------------------------------------------------------------------


def clip_config(width: int, projection: int = 24, act: str = "quick_gelu"):
    return transformers.CLIPTextConfig(vocab_size=64, hidden_size=width, intermediate_size=2 * width,
                                       num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=LENGTH,
                                       hidden_act=act, projection_dim=projection, bos_token_id=0, eos_token_id=1,
                                       pad_token_id=1)


def clip_model(width: int = 32, projection: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(clip_config(width, act="gelu" if projection else "quick_gelu")).eval()


def t5_model(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=16, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, is_encoder_decoder=False, use_cache=False,
                                   feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)
    return transformers.T5EncoderModel(config).eval()


def pipeline_folder(root, parts):
    """Write (model, tokenizer) pairs as a diffusers pipeline folder's text_encoder[_2]/ and tokenizer[_2]/."""
    for i, (model, tokenizer) in enumerate(parts):
        suffix = "" if i == 0 else f"_{i + 1}"
        model.save_pretrained(root / f"text_encoder{suffix}")
        tokenizer.save_pretrained(root / f"tokenizer{suffix}")
    return root


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    model, tok = clip_model(), clip_tokenizer()
    return pipeline_folder(tmp_path_factory.mktemp("sd15"), [(model, tok)]), model, tok


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    parts = [(clip_model(32, seed=1), clip_tokenizer()), (clip_model(40, projection=True, seed=2), clip_tokenizer("!"))]
    return pipeline_folder(tmp_path_factory.mktemp("sdxl"), parts), parts


# ---- CLIP (SD 1.5 / 2.x) -------------------------------------------------------------------------------------


def test_sd_text_encoder_matches_transformers(sd_folder):
    root, model, tok = sd_folder
    enc = TextEncoder(published_text_encoder_config("sd15", str(root)))
    assert isinstance(enc, HFTextEncoder) and enc.frozen and not enc.training
    ids = tok(CAPTIONS, padding="max_length", max_length=LENGTH, truncation=True, return_tensors="pt").input_ids
    cond = enc.encode(CAPTIONS)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    assert cond.context.shape == (3, LENGTH, 32) and cond.pooled.shape == (3, 32)
    assert torch.equal(cond.context, out.last_hidden_state) and torch.equal(cond.pooled, out.pooler_output)
    assert cond.context_mask.all()  # SD attends to every position, padding included
    assert enc.context_dim == 32 and enc.pooled_dim == 32
    # penultimate block, then the final LayerNorm (SD 2.x's OpenCLIP reading), from the model folder itself
    pen = TextEncoder(TextEncoderConfig(format="hf-clip", pretrained=str(root / "text_encoder"),
                                        layer="penultimate", hidden_ln_final=True)).encode(CAPTIONS)
    with torch.no_grad():
        final_norm = getattr(model, "text_model", model).final_layer_norm  # transformers 4 / 5
        assert torch.equal(pen.context, final_norm(out.hidden_states[-2]))


def test_masking_is_a_per_model_setting_that_trimming_honours(sd_folder):
    root, _, tok = sd_folder
    unmasked = TextEncoder(published_text_encoder_config("sd15", str(root)))
    masked = TextEncoder(published_text_encoder_config("sd15", str(root), mask_padding=True))
    a, b = unmasked.encode(CAPTIONS[:1]), masked.encode(CAPTIONS[:1])
    assert torch.equal(a.context, b.context)
    # what training (trim_context) and generate() (trim_together) do with each
    assert trim_together(a, unmasked.null_conditioning(1))[0].context.shape[1] == LENGTH
    trimmed = trim_together(b, masked.null_conditioning(1))[0]
    n = len(tok(CAPTIONS[0]).input_ids)  # start, tokens, end
    assert trimmed.context.shape[1] == n and trimmed.context_mask.all()
    # the OpenCLIP encoder takes the same setting
    openclip = TextEncoder(TextEncoderConfig(model="openclip-tiny-text", mask_padding=False)).encode(["a cat"])
    assert openclip.context_mask.all() and openclip.context_mask.shape == (1, 77)


# ---- SDXL ----------------------------------------------------------------------------------------------------


def test_sdxl_dual_encoder_matches_diffusers_encode_prompt(sdxl_folder):
    diffusers = pytest.importorskip("diffusers")
    root, ((te1, tok1), (te2, tok2)) = sdxl_folder
    enc = TextEncoder(published_text_encoder_config("sdxl", str(root)))
    pipe = diffusers.StableDiffusionXLPipeline(vae=None, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                               tokenizer_2=tok2, unet=None, scheduler=None,
                                               force_zeros_for_empty_prompt=False)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            CAPTIONS[:2], device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=["", ""])
    cond, empty = enc.encode(CAPTIONS[:2]), enc.encode(["", ""])
    assert cond.context.shape == (2, LENGTH, 32 + 40) and cond.pooled.shape == (2, 24)
    assert torch.equal(cond.context, embeds) and torch.equal(cond.pooled, pooled)
    assert torch.equal(empty.context, negative) and torch.equal(empty.pooled, negative_pooled)
    null = enc.null_conditioning(2)  # one "" encoded, repeated: equal up to batched-matmul rounding
    torch.testing.assert_close(null.context, negative, atol=1e-6, rtol=0)
    torch.testing.assert_close(null.pooled, negative_pooled, atol=1e-6, rtol=0)
    assert cond.context_mask.all() and enc.context_dim == 72 and enc.pooled_dim == 24


# ---- T5 (PixArt, Wan) ----------------------------------------------------------------------------------------


def test_t5_encoder_matches_transformers_and_masks_padding(tmp_path):
    model, tok = t5_model(), t5_tokenizer()
    root = pipeline_folder(tmp_path / "pixart", [(model, tok)])
    enc = TextEncoder(published_text_encoder_config("pixart-alpha", str(root), max_length=10))
    batch = tok(CAPTIONS, padding="max_length", max_length=10, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    cond = enc.encode(CAPTIONS)
    assert cond.context.shape == (3, 10, 32) and cond.pooled is None and enc.pooled_dim is None
    assert torch.equal(cond.context, expected)
    assert torch.equal(cond.context_mask, batch.attention_mask.bool())  # through </s>, padding masked
    assert cond.context_mask.sum(dim=1).tolist() == [3, 10, 1]  # "" is just </s>; the long one is truncated


# ---- SD 2 single file (OpenCLIP tower) -----------------------------------------------------------------------


def test_sd2_single_file_text_tower_loads(tmp_path):
    torch.manual_seed(3)
    clip = open_clip.CLIP(embed_dim=32, vision_cfg={"image_size": 32, "patch_size": 16, "layers": 1, "width": 32,
                                                     "head_width": 16},
                          text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2})
    text = {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}  # SD 2 drops the image tower
    single = {f"cond_stage_model.model.{k}": v.contiguous() for k, v in text.items()}
    single["model.diffusion_model.conv_in.weight"] = torch.zeros(4, 4, 3, 3)  # the rest of the file is ignored
    single["first_stage_model.decoder.conv_out.bias"] = torch.zeros(3)
    save_file(single, tmp_path / "sd2.safetensors")
    enc = TextEncoder.from_checkpoint(tmp_path / "sd2.safetensors", "openclip-tiny-text", mask_padding=False)
    with torch.no_grad():
        assert torch.equal(enc.encode(["a cat"]).pooled, clip.encode_text(open_clip.tokenize(["a cat"])))


# ---- errors --------------------------------------------------------------------------------------------------


def test_bad_folders_and_configs_are_refused_clearly(sd_folder, tmp_path):
    root, model, tok = sd_folder
    with pytest.raises(TextEncoderLoadError, match="does not exist"):
        TextEncoder(TextEncoderConfig(format="hf-clip", pretrained=str(tmp_path / "nowhere")))
    with pytest.raises(TextEncoderLoadError, match="text_encoder_2"):
        TextEncoder(TextEncoderConfig(format="hf-sdxl", pretrained=str(root), layer="penultimate"))
    broken = pipeline_folder(tmp_path / "broken", [(model, tok)])
    weights = broken / "text_encoder" / "model.safetensors"
    state = {k.removeprefix("text_model."): v for k, v in load_file(weights).items()}
    # the published SD folders name the weights text_model.* (transformers 4): they load the same
    save_file({f"text_model.{k}": v for k, v in state.items()}, weights)
    reference = TextEncoder(published_text_encoder_config("sd15", str(root))).encode(CAPTIONS)
    assert torch.equal(TextEncoder(published_text_encoder_config("sd15", str(broken))).encode(CAPTIONS).context,
                       reference.context)
    save_file({k: v for k, v in state.items() if k != "final_layer_norm.weight"}, weights)
    with pytest.raises(TextEncoderLoadError, match=r"text_encoder.*final_layer_norm\.weight"):
        TextEncoder(TextEncoderConfig(format="hf-clip", pretrained=str(broken)))
    with pytest.raises(ValueError, match="pretrained="):
        TextEncoderConfig(format="hf-clip")
    with pytest.raises(ValueError, match="layer='last'"):
        TextEncoderConfig(format="hf-t5", pretrained=str(root))
    with pytest.raises(ValueError, match="format='hf-bert'"):
        TextEncoderConfig(format="hf-bert", pretrained=str(root))
    with pytest.raises(ValueError, match="exceeds the encoder's 16 positions"):
        TextEncoder(published_text_encoder_config("sd15", str(root), max_length=77))
    with pytest.raises(TextEncoderLoadError, match="expects T5EncoderModel"):
        TextEncoder(TextEncoderConfig(format="hf-t5", pretrained=str(root), layer="last"))
