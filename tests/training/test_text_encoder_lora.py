"""Text-encoder layers of LoRA files (issue 14, point 5): the ``text_encoder.`` / ``text_encoder_2.`` (diffusers/PEFT)
and ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` (kohya) tensors many published SD 1.5 / SDXL LoRAs carry are merged
into our text encoder(s) at load, with the file's alpha / rank and the user's scale, and give the hidden states and
images of diffusers' own ``load_lora_weights``; a key that lands on no layer is an error naming it.

Everything is built with diffusers' / transformers' / peft's own classes at tiny sizes with random weights (fp32).
diffusers hands a text encoder's LoRA to transformers' ``load_adapter``, which needs peft >= 0.22; with an older peft
:func:`diffusers_load` runs diffusers' own steps (its kohya conversion, its ``LoraConfig`` from the file's metadata
or alphas and ranks) and lets peft inject the layers, which is what ``load_adapter`` does with them."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from sdmaker import LENGTH, SIZE, clip_config, clip_tokenizer, tiny_sd_pipeline

from training.lora_formats import merge_text_encoder_layers, read_kohya
from training.pretrained import open_pretrained
from training.sampling import SamplingConfig

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

PROMPTS = ["the cat", "a hat"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]
TOL = 1e-5


def perturb(model: torch.nn.Module, seed: int, scale: float, only_lora: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not only_lora or "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny SD 1.x pipeline of diffusers' classes, saved as a diffusers folder."""
    pipe = tiny_sd_pipeline()
    root = tmp_path_factory.mktemp("sd") / "pipeline"
    pipe.save_pretrained(root)
    return root


def fresh_pipe(root):
    return diffusers.StableDiffusionPipeline.from_pretrained(root, safety_checker=None, feature_extractor=None,
                                                             requires_safety_checker=False)


def lora_on_both(root, out_dir):
    """A LoRA made with peft on the U-Net and the text encoder (one text layer at its own rank and alpha), saved by
    ``StableDiffusionPipeline.save_lora_weights`` with both adapter configs in the header."""
    pipe = fresh_pipe(root)
    unet_cfg = peft.LoraConfig(r=4, lora_alpha=6, init_lora_weights="gaussian", target_modules=UNET_TARGETS)
    te_cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=TE_TARGETS,
                             rank_pattern={"encoder.layers.1.mlp.fc2": 2},
                             alpha_pattern={"encoder.layers.1.mlp.fc2": 3})
    pipe.unet.add_adapter(unet_cfg, adapter_name="made")
    peft.inject_adapter_in_model(te_cfg, pipe.text_encoder, adapter_name="made")
    perturb(pipe.unet, 9, 0.2, only_lora=True)
    perturb(pipe.text_encoder, 10, 0.3, only_lora=True)
    unet_state = peft.get_peft_model_state_dict(pipe.unet, adapter_name="made")
    te_state = published_names(peft.get_peft_model_state_dict(pipe.text_encoder, adapter_name="made"))
    assert any(k.endswith("layers.1.mlp.fc2.lora_A.weight") and v.shape[0] == 2 for k, v in te_state.items())
    diffusers.StableDiffusionPipeline.save_lora_weights(
        out_dir, unet_lora_layers=unet_state, text_encoder_lora_layers=te_state,
        unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=te_cfg.to_dict(),
        weight_name="both.safetensors")
    return out_dir / "both.safetensors", unet_state, te_state, unet_cfg, te_cfg


def published_names(state):
    """CLIP text-model LoRA tensors under the names published files use (``text_model.encoder.layers...``):
    transformers 5's ``CLIPTextModel`` drops the ``text_model.`` level, ``CLIPTextModelWithProjection`` keeps it."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in state.items()}


def to_kohya(unet_state, te_state, unet_cfg, te_cfg, te_prefix: str = "lora_te_"):
    """kohya's names (sd-scripts networks/lora.py): ``lora_unet_`` / ``lora_te_`` + the module path with ``_``,
    ``lora_down`` = A, ``lora_up`` = B, a scalar ``alpha`` per layer."""
    out = {}
    for prefix, state, cfg in (("lora_unet_", unet_state, unet_cfg), (te_prefix, te_state, te_cfg)):
        for key, tensor in state.items():
            module, _, which = key.rpartition(".lora_")
            name = prefix + module.replace(".", "_")
            out[f"{name}.lora_{'down' if which.startswith('A') else 'up'}.weight"] = tensor.contiguous()
            alpha = next((a for pat, a in cfg.alpha_pattern.items() if module.endswith(pat)), cfg.lora_alpha)
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def diffusers_load(pipe, path, scale: float = 1.0, name: str = "x"):
    """``pipe.load_lora_weights(path)`` then ``set_adapters([name], [scale])`` (see the module docstring)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    if peft_new_enough():
        pipe.load_lora_weights(str(path), adapter_name=name)
        pipe.set_adapters([name], adapter_weights=[scale])
        return pipe
    state, alphas, meta = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, pipe.unet, adapter_name=name, metadata=meta)
    inject_text_lora(state, alphas, meta, pipe.text_encoder, "text_encoder", name)
    pipe.unet.set_adapters([name], weights=[scale])
    from diffusers.utils.peft_utils import scale_lora_layers

    scale_lora_layers(pipe.text_encoder, scale)
    return pipe


def peft_new_enough() -> bool:
    from packaging import version

    return version.parse(peft.__version__) >= version.parse("0.22.0")


def inject_text_lora(state, alphas, meta, encoder, prefix: str, name: str) -> None:
    """diffusers' ``_load_lora_into_text_encoder`` (loaders/lora_base.py) with peft's injection in place of
    transformers' ``load_adapter``."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config

    part = {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}
    part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    if not hasattr(encoder, "text_model"):  # transformers 5's flattened CLIPTextModel
        part = {k.removeprefix("text_model."): v for k, v in part.items()}
    if meta is not None:
        meta = {k.removeprefix(f"{prefix}."): v for k, v in meta.items() if k.startswith(f"{prefix}.")} or None
    if alphas is not None:
        alphas = {k.removeprefix(f"{prefix}."): v for k, v in alphas.items() if k.split(".")[0] == prefix}
    rank = {k: v.shape[1] for k, v in part.items() if k.endswith("lora_B.weight")}
    config = _create_lora_config(part, alphas, meta, rank, is_unet=False)
    peft.inject_adapter_in_model(config, encoder, adapter_name=name)
    result = peft.set_peft_model_state_dict(encoder, part, adapter_name=name)
    assert not [k for k in result.unexpected_keys if "lora" in k]


def their_context(pipe):
    with torch.no_grad():
        return pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]


def their_images(pipe, seed: int = 7):
    noise = torch.randn((len(PROMPTS), 4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return pipe(prompt=PROMPTS, latents=noise, num_inference_steps=3, guidance_scale=3.0, height=SIZE,
                    width=SIZE, output_type="pt").images * 2 - 1


def ours(root, adapters):
    return open_pretrained(root, device="cpu", sampling=SamplingConfig(steps=3, guidance=3.0, seed=7),
                           adapters=adapters)


def our_context(pipe):
    with torch.no_grad():
        return pipe.text_encoder.encode(PROMPTS).context


# ------------------------------------------------------------------------------------------------ SD 1.x


def test_diffusers_file_with_text_encoder_layers_matches_load_lora_weights(sd_folder, tmp_path):
    path, _, te_state, _, _ = lora_on_both(sd_folder, tmp_path)
    assert any(k.startswith("text_encoder.") for k in load_file(str(path)))
    ref = fresh_pipe(sd_folder)
    base_context = their_context(ref)
    diffusers_load(ref, path)
    n_te = sum(1 for n, _ in ref.text_encoder.named_parameters() if "lora_A" in n)
    assert n_te == len(te_state) // 2  # diffusers injected every text layer of the file
    expected = their_context(ref)
    assert (expected - base_context).abs().max() > 1e-2  # the text-encoder part changes the conditioning
    pipe = ours(sd_folder, [str(path)])
    assert (our_context(pipe) - expected).abs().max() <= TOL
    got, want = pipe.generate(PROMPTS, height=SIZE, width=SIZE), their_images(ref)
    assert (got - want).abs().max() <= 1e-4
    # without the text part (the denoiser part alone, as before) the images differ: the text layers count
    unet_only = {k: v for k, v in load_file(str(path)).items() if k.startswith("unet.")}
    save_file(unet_only, str(tmp_path / "unet-only.safetensors"))
    partial = ours(sd_folder, [str(tmp_path / "unet-only.safetensors")])
    assert (partial.generate(PROMPTS, height=SIZE, width=SIZE) - want).abs().max() > 1e-3


def test_kohya_file_with_lora_te_layers_matches_load_lora_weights_at_a_scale(sd_folder, tmp_path):
    _, unet_state, te_state, unet_cfg, te_cfg = lora_on_both(sd_folder, tmp_path)
    kohya = to_kohya(unet_state, te_state, unet_cfg, te_cfg)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    # one alpha for the text encoder, as kohya's trainer writes it (network_alpha; the fc2 of block 1 has rank 2):
    # diffusers 0.42 drops a kohya file's per-layer text-encoder alphas on transformers 5's flattened CLIPTextModel
    # (its alpha names keep "text_model."), so per-layer alphas are checked against an equivalent file below
    kohya = {k: torch.tensor(8.0) if k.startswith("lora_te_") and k.endswith(".alpha") else v for k, v in kohya.items()}
    path = tmp_path / "kohya.safetensors"
    save_file(kohya, str(path))
    ref = diffusers_load(fresh_pipe(sd_folder), path, scale=0.7)
    pipe = ours(sd_folder, [f"{path}:0.7"])
    expected = their_context(ref)
    assert (our_context(pipe) - expected).abs().max() <= TOL
    assert (pipe.generate(PROMPTS, height=SIZE, width=SIZE) - their_images(ref)).abs().max() <= 1e-4
    # a layer's own alpha: alpha 3 with B is alpha 8 with B · 8/3
    fc2 = "lora_te_text_model_encoder_layers_1_mlp_fc2"
    own = dict(kohya, **{f"{fc2}.alpha": torch.tensor(3.0),
                         f"{fc2}.lora_up.weight": kohya[f"{fc2}.lora_up.weight"] * 8 / 3})
    save_file(own, str(tmp_path / "own-alpha.safetensors"))
    again = ours(sd_folder, [f"{tmp_path / 'own-alpha.safetensors'}:0.7"])
    assert (our_context(again) - expected).abs().max() <= TOL


def test_text_encoder_keys_that_match_no_layer_are_errors_naming_them(sd_folder, tmp_path):
    _, unet_state, te_state, unet_cfg, te_cfg = lora_on_both(sd_folder, tmp_path)
    kohya = to_kohya(unet_state, te_state, unet_cfg, te_cfg)
    bad = dict(kohya, **{"lora_te_text_model_encoder_layers_9_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32),
                         "lora_te_text_model_encoder_layers_9_self_attn_q_proj.lora_up.weight": torch.zeros(32, 4)})
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"bad\.safetensors: LoRA key 'lora_te_text_model_encoder_layers_9_self_attn_"
                                         r"q_proj' matches no layer of the HFTextEncoder"):
        ours(sd_folder, [str(tmp_path / "bad.safetensors")])
    te2 = {k.replace("lora_te_", "lora_te2_"): v for k, v in kohya.items() if k.startswith("lora_te_")}
    save_file(te2, str(tmp_path / "te2.safetensors"))  # an SDXL file's bigG layers on an SD 1.x pipeline
    with pytest.raises(ValueError, match="LoRA key 'lora_te2_text_model_.*' matches no layer of a second text "
                                         "encoder"):
        ours(sd_folder, [str(tmp_path / "te2.safetensors")])
    wide = {k: (torch.zeros(4, 48) if k.endswith("q_proj.lora_down.weight") else v) for k, v in te2.items()}
    save_file({k.replace("lora_te2_", "lora_te_"): v for k, v in wide.items()}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=r"'lora_te_text_model_encoder_layers_0_self_attn_q_proj' makes an update "
                                         r"of shape \(32, 48\)"):
        ours(sd_folder, [str(tmp_path / "wide.safetensors")])


# ------------------------------------------------------------------------------------------------ SDXL, OpenCLIP


def test_sdxl_lora_te1_and_te2_land_on_the_two_encoders(tmp_path):
    """SDXL's CLIP-L (``lora_te1_``) and bigG (``lora_te2_``, with projection) in our ``hf-sdxl`` encoder, against
    the same models with the file injected by diffusers' SDXL loader."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    from models.text_encoder import TextEncoder, TextEncoderConfig

    torch.manual_seed(1)
    root = tmp_path / "sdxl"
    transformers.CLIPTextModel(clip_config()).save_pretrained(root / "text_encoder")
    big = clip_config(hidden_size=48, intermediate_size=96, projection_dim=48, num_attention_heads=3)
    transformers.CLIPTextModelWithProjection(big).save_pretrained(root / "text_encoder_2")
    clip_tokenizer().save_pretrained(root / "tokenizer")
    clip_tokenizer("!").save_pretrained(root / "tokenizer_2")
    cfg = TextEncoderConfig(format="hf-sdxl", pretrained=str(root), layer="penultimate", hidden_ln_final=False)
    reference, encoder = TextEncoder(cfg), TextEncoder(cfg)
    kohya = {}
    for i, prefix in enumerate(("lora_te1_", "lora_te2_")):
        model = copy.deepcopy(encoder.encoders[i])
        config = peft.LoraConfig(r=2 + i, lora_alpha=5, init_lora_weights="gaussian", target_modules=TE_TARGETS)
        peft.inject_adapter_in_model(config, model, adapter_name="tmp")
        perturb(model, 20 + i, 0.1, only_lora=True)
        state = published_names(peft.get_peft_model_state_dict(model, adapter_name="tmp"))
        kohya.update(to_kohya({}, state, config, config, prefix))
    path = tmp_path / "sdxl-kohya.safetensors"
    save_file(kohya, str(path))
    state, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(str(path))  # diffusers' kohya conversion
    for i, prefix in enumerate(("text_encoder", "text_encoder_2")):
        if peft_new_enough():
            StableDiffusionXLLoraLoaderMixin.load_lora_into_text_encoder(state, alphas, reference.encoders[i],
                                                                         prefix=prefix, adapter_name="k")
        else:
            inject_text_lora(state, alphas, None, reference.encoders[i], prefix, "k")
    base = encoder.encode(PROMPTS)
    layers = read_kohya(load_file(str(path)), str(path))
    assert merge_text_encoder_layers(encoder, layers, 1.0, str(path)) == len(layers) == 24
    with torch.no_grad():
        want, got = reference.encode(PROMPTS), encoder.encode(PROMPTS)
    assert got.context.shape == (2, LENGTH, 32 + 48)
    assert (got.context - base.context)[..., 32:].abs().max() > 1e-2  # bigG's layers moved its half
    assert (got.context - want.context).abs().max() <= TOL * want.context.abs().max()  # fp32, merged vs unmerged
    assert (got.pooled - want.pooled).abs().max() <= TOL * want.pooled.abs().max()


def test_openclip_tower_takes_clip_named_layers_like_its_transformers_twin():
    """Our OpenCLIP tower (q/k/v inside one in_proj_weight, c_fc/c_proj, a projection matrix) takes CLIP-named
    layers as transformers' CLIPTextModelWithProjection holding the same weights does with peft's LoRA."""
    from models.text_encoder import TextEncoder, TextEncoderConfig
    from training.export_formats import openclip_hf_config, openclip_to_hf_clip_state_dict

    torch.manual_seed(2)
    encoder = TextEncoder(TextEncoderConfig(model="openclip-tiny-text", layer="last"))
    perturb(encoder.text, 3, 0.02)
    blocks = len(encoder.text.transformer.resblocks)
    config = openclip_hf_config(encoder, blocks, projection=True)
    twin = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**{
        k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")})).eval()
    twin.load_state_dict(openclip_to_hf_clip_state_dict(encoder.text.state_dict(), blocks, True), strict=True)
    lora = peft.LoraConfig(r=3, lora_alpha=4, init_lora_weights="gaussian",
                           target_modules=TE_TARGETS + ["text_projection"])
    twin = peft.get_peft_model(twin, lora).eval()
    perturb(twin, 4, 0.3, only_lora=True)
    state = {k.removeprefix("base_model.model."): v for k, v in peft.get_peft_model_state_dict(twin).items()}
    kohya = to_kohya({}, state, lora, lora)
    assert "lora_te_text_projection.alpha" in kohya
    tokens = encoder.tokenize(PROMPTS)
    with torch.no_grad():
        base = encoder.encode_tokens(tokens).context
    merged = merge_text_encoder_layers(encoder, read_kohya(kohya, "kohya"), 1.0, "kohya")
    assert merged == 6 * blocks + 1
    with torch.no_grad():
        theirs = twin(input_ids=tokens)
        got = encoder.encode_tokens(tokens)
    want = theirs.last_hidden_state
    assert (got.context - base).abs().max() > 1e-2
    # fp32 (torch's fused MultiheadAttention against transformers' attention, merged against unmerged)
    assert (got.context - want).abs().max() <= TOL * want.abs().max()
    assert (got.pooled - theirs.text_embeds).abs().max() <= TOL * theirs.text_embeds.abs().max()
