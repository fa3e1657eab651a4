"""diffusers' / transformers' own Stable Diffusion parts at tiny sizes with random weights, for the parity tests of
checkpoints, formats and LoRA files (``diffusion.pretrained``, text-encoder LoRA, PixArt): one definition of each."""

from __future__ import annotations

import torch

LENGTH = 16  # tokens per prompt of the tiny tokenizer (SD: 77)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SIZE = 16  # pixels (the tiny VAE halves once: 8×8 latents)
SD_DDIM = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
               set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")  # DDIM as SD 1.x ships it


def clip_tokenizer(pad: str = "<|endoftext|>"):
    """A CLIP BPE tokenizer over single letters and a few merges; SDXL's second tokenizer pads with ``!``."""
    import transformers

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for suffix in ("", "</w>"):
        vocab.update({c + suffix: len(vocab) + i for i, c in enumerate(LETTERS)})
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("a", "t</w>")]
    vocab.update({a + b: len(vocab) + i for i, (a, b) in enumerate(merges)})
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=LENGTH, pad_token=pad)


T5_WORDS = ["the", "cat", "a", "sat", "on", "mat", "with", "hat"]  # the tiny T5 tokenizer's vocabulary


def t5_tokenizer(max_length: int = LENGTH):
    """A word-level tokenizer with T5's special tokens (pad 0, end 1, unknown 2) that appends ``</s>``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: 3 + i for i, w in enumerate(T5_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>", model_max_length=max_length)


def clip_config(**overrides):
    """A two-layer CLIP text config over :func:`clip_tokenizer`'s vocabulary."""
    import transformers

    return transformers.CLIPTextConfig(**{**dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=LENGTH, bos_token_id=0, eos_token_id=1, pad_token_id=1), **overrides})


def tiny_vae(size: int = SIZE):
    """diffusers' AutoencoderKL halving once, 4 latent channels."""
    import diffusers

    return diffusers.AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, sample_size=size).eval()


def tiny_sd_pipeline(seed: int = 0, prediction: str = "epsilon"):
    """A StableDiffusionPipeline of diffusers' SD 1.x classes (norm groups 32 and 8-channel heads as SD 1.x), DDIM as
    SD ships it."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    text = transformers.CLIPTextModel(clip_config()).eval()
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8).eval()
    vae = tiny_vae()
    scheduler = diffusers.DDIMScheduler(**SD_DDIM, prediction_type=prediction)
    return diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
