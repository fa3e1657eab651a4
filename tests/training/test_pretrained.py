"""``diffusion.pretrained=PATH`` (issue 14, point 3): a diffusers pipeline folder, an original SD single file or an
original DiT checkpoint becomes a run's text encoder, autoencoder, denoiser and process settings.

Everything is built with diffusers' / transformers' own classes at tiny sizes with random weights: our
:class:`~training.inference.Inference` opened from the files draws the image diffusers' own pipeline draws for the
same prompt, noise and scheduler (fp32); the diffusion stage fine-tunes from the folder; missing parts, unknown
layouts and YAML settings that contradict the files are refused by name."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from sdmaker import SD_DDIM, SIZE, tiny_sd_pipeline, tiny_vae

from training.config_io import ConfigError, from_dict
from training.pretrained import PretrainedError, open_pretrained, read_pretrained
from training.sampling import SamplingConfig
from training.stages.diffusion import DiffusionStageConfig

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

PROMPTS = ["the cat", "a hat"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    pipe = tiny_sd_pipeline()
    root = tmp_path_factory.mktemp("sd") / "pipeline"
    pipe.save_pretrained(root)
    return root, pipe


def diffusers_images(pipe, prompts, steps: int, guidance: float, seed: int) -> torch.Tensor:
    """diffusers' own pipeline from the noise our sampler draws for ``seed``, in [-1, 1]."""
    noise = torch.randn((len(prompts), 4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = pipe(prompt=list(prompts), latents=noise, num_inference_steps=steps, guidance_scale=guidance,
                   height=SIZE, width=SIZE, output_type="pt").images
    return out * 2 - 1


def sampling(steps: int = 4, guidance: float = 3.0, seed: int = 7) -> SamplingConfig:
    return SamplingConfig(steps=steps, guidance=guidance, seed=seed)


# ---------------------------------------------------------------------------------------------- diffusers folder


def test_folder_reads_every_part_and_the_process(sd_folder):
    root, pipe = sd_folder
    p = read_pretrained(root)
    assert (p.layout, p.family, p.architecture) == ("diffusers", "sd15", "unet")
    assert p.denoiser_config.block_out_channels == [32, 64] and p.denoiser_config.cross_attention_dim == 32
    assert p.autoencoder_config.scaling_factor == pytest.approx(pipe.vae.config.scaling_factor)
    assert p.text_encoder.format == "hf-clip" and p.text_encoder.pretrained == str(root)
    assert dict(p.process) == dict(kind="discrete", schedule="scaled_linear", num_timesteps=1000, beta_start=0.00085,
                                   beta_end=0.012, prediction="epsilon", zero_terminal_snr=False)
    st = DiffusionStageConfig(pretrained=str(root))
    assert st.denoiser == "unet" and st.model_config == p.denoiser_config
    assert (st.sampling.sampler, st.sampling.spacing, st.sampling.steps_offset, st.sampling.set_alpha_to_one) == (
        "ddim", "leading", 1, False)
    assert st.autoencoder_weights == str(root / "vae")
    # the resolved config reads back to itself (a run's config.yaml keeps pretrained= and the filled fields)
    from training.config_io import to_dict

    again = from_dict(DiffusionStageConfig, to_dict(st))
    assert again.model_config == st.model_config and again.process == st.process and again.sampling == st.sampling


def test_folder_draws_what_diffusers_pipeline_draws(sd_folder):
    root, pipe = sd_folder
    ours = open_pretrained(root, device="cpu", sampling=sampling())
    got = ours.generate(PROMPTS, height=SIZE, width=SIZE)
    expected = diffusers_images(pipe, PROMPTS, 4, 3.0, 7)
    assert got.shape == expected.shape == (2, 3, SIZE, SIZE)
    err = (got - expected).abs().max().item()
    assert err <= 1e-4, err
    # a different prompt draws something else (the text reaches the U-Net)
    assert (ours.generate(["a hat", "the cat"], height=SIZE, width=SIZE) - got).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- original single file


def ldm_single_file(folder, out, text_prefix: str = "cond_stage_model.transformer."):
    """The pipeline's U-Net, VAE and CLIP as an original SD 1.x file (``model.diffusion_model.*``,
    ``first_stage_model.*`` by models.convert's LDM writers, the CLIP under ``cond_stage_model.transformer``)."""
    from models.convert import LDM_UNET_PREFIX, LDM_VAE_PREFIX, to_ldm_unet_state_dict, to_ldm_vae_state_dict

    st = DiffusionStageConfig(pretrained=str(folder))
    from training.pretrained import load_autoencoder_any
    from training.stages.diffusion import build_denoiser

    unet, vae = build_denoiser(st), load_autoencoder_any(folder / "vae")
    state = {**to_ldm_unet_state_dict(unet.state_dict(), unet.config, LDM_UNET_PREFIX),
             **to_ldm_vae_state_dict(vae.state_dict(), vae.config, LDM_VAE_PREFIX)}
    text = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder")
    state.update({text_prefix + k: v for k, v in text.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, out)
    return out


def test_single_file_draws_what_diffusers_pipeline_draws(sd_folder, tmp_path):
    root, pipe = sd_folder
    single = ldm_single_file(root, tmp_path / "sd15-tiny.safetensors")
    p = read_pretrained(single)
    assert (p.layout, p.family) == ("single-file", "sd15")
    assert p.denoiser_config == read_pretrained(root).denoiser_config  # every size read off the shapes
    assert p.autoencoder_config == dataclasses.replace(read_pretrained(root).autoencoder_config, scaling_factor=0.18215)
    # the file's own CLIP is its text encoder (test_single_file_builds_its_own_clip_text_encoder); a
    # diffusion.text_encoder given replaces it (this tiny CLIP has no 64-channel heads: its folder is named)
    assert (p.text_encoder.format, p.text_encoder.pretrained) == ("hf-clip", str(single))
    te = {"text_encoder": {"format": "hf-clip", "pretrained": str(root)}}  # layer/LN: SD 1.x's, from the family
    ours = open_pretrained(single, device="cpu", sampling=sampling(seed=3), diffusion=te)
    assert ours.text_encoder.config.layer == "last" and ours.text_encoder.config.hidden_ln_final
    err = (ours.generate(PROMPTS, height=SIZE, width=SIZE) - diffusers_images(pipe, PROMPTS, 4, 3.0, 3)).abs().max()
    assert err <= 1e-4, err


def published_clip_folder(root):
    """A tiny SD 1.x pipeline whose CLIP has the published vocabulary, positions and 64-channel heads, with the
    CLIP BPE tokenizer open_clip bundles (what a single file's encoder is read with), saved as a diffusers folder."""
    from training.export_formats import write_clip_tokenizer

    torch.manual_seed(4)
    write_clip_tokenizer(root / "bpe", 77)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(root / "bpe", pad_token="<|endoftext|>")  # SD 1.x pads so
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)).eval()
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8).eval()
    vae = tiny_vae()
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                             scheduler=diffusers.DDIMScheduler(**SD_DDIM), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline", pipe


def test_single_file_builds_its_own_clip_text_encoder(tmp_path):
    """An SD 1.x single file with its CLIP (``cond_stage_model.transformer.text_model.*``, as published) and no
    text-encoder setting: the same text conditioning and images as the diffusers folder it came from."""
    root, pipe = published_clip_folder(tmp_path)
    single = ldm_single_file(root, tmp_path / "sd15-bpe.safetensors", "cond_stage_model.transformer.text_model.")
    ours = open_pretrained(single, device="cpu", sampling=sampling(seed=5))
    te = ours.text_encoder.config
    assert (te.format, te.pretrained, te.layer, te.hidden_ln_final, te.masks_padding) == (
        "hf-clip", str(single), "last", True, False)
    prompts = ["a photo of a cat", "an astronaut riding a horse, oil painting"]
    with torch.no_grad():
        expected = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
        got = ours.text_encoder.encode(prompts)
    assert got.context.shape == expected.shape == (2, 77, 64)
    assert (got.context - expected).abs().max() <= 1e-5
    err = (ours.generate(PROMPTS, height=SIZE, width=SIZE) - diffusers_images(pipe, PROMPTS, 4, 3.0, 5)).abs().max()
    assert err <= 1e-4, err


def test_sdxl_text_encoders_from_a_single_file_match_the_pipeline_folders(tmp_path):
    """SDXL's CLIP-L (``conditioner.embedders.0.transformer.*``, transformers names) and OpenCLIP bigG
    (``conditioner.embedders.1.model.*``, open_clip names) read from a single file give the conditioning the
    pipeline folder's ``text_encoder/`` + ``text_encoder_2/`` (CLIPTextModelWithProjection) give."""
    from models.text_encoder import TextEncoder, TextEncoderConfig
    from training.export_formats import openclip_hf_config, openclip_to_hf_clip_state_dict, write_clip_tokenizer

    torch.manual_seed(6)
    clip_l = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)).eval()
    (tmp_path / "bigg.json").write_text(json.dumps({"embed_dim": 96, "text_cfg": {
        "context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}}))
    bigg = TextEncoder(TextEncoderConfig(model=str(tmp_path / "bigg.json")))
    config = {k: v for k, v in openclip_hf_config(bigg, 2, True).items() if k not in ("architectures", "torch_dtype")}
    twin = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**config)).eval()
    twin.load_state_dict(openclip_to_hf_clip_state_dict(bigg.text.state_dict(), 2, True), strict=True)
    folder = tmp_path / "sdxl"
    clip_l.save_pretrained(folder / "text_encoder")
    twin.save_pretrained(folder / "text_encoder_2")
    write_clip_tokenizer(tmp_path / "bpe", 77)
    transformers.CLIPTokenizer.from_pretrained(tmp_path / "bpe", pad_token="<|endoftext|>").save_pretrained(
        folder / "tokenizer")
    transformers.CLIPTokenizer.from_pretrained(tmp_path / "bpe").save_pretrained(folder / "tokenizer_2")  # pads "!"
    state = {"conditioner.embedders.0.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: v
             for k, v in clip_l.state_dict().items()}
    state.update({"conditioner.embedders.1.model." + k: v for k, v in bigg.text.state_dict().items()})
    state["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)  # the image-text scale SDXL files keep
    single = tmp_path / "sdxl-text.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, single)
    settings = dict(format="hf-sdxl", layer="penultimate", hidden_ln_final=False)
    from_file = TextEncoder(TextEncoderConfig(pretrained=str(single), **settings))
    from_folder = TextEncoder(TextEncoderConfig(pretrained=str(folder), **settings))
    prompts = ["a photo of a cat", "an astronaut riding a horse"]
    with torch.no_grad():
        got, want = from_file.encode(prompts), from_folder.encode(prompts)
    assert got.context.shape == want.context.shape == (2, 77, 64 + 128) and got.pooled.shape == (2, 96)
    assert (got.context - want.context).abs().max() <= 1e-5
    assert (got.pooled - want.pooled).abs().max() <= 1e-5
    # the padding is each tokenizer's: end-of-text for CLIP-L, "!" for bigG (SDXL's tokenizer / tokenizer_2)
    assert [t.pad_token for t in from_file.tokenizers] == ["<|endoftext|>", "!"]


# ---------------------------------------------------------------------------------------------- the override rule


def test_settings_that_contradict_the_files_are_refused_by_name(sd_folder):
    root, _ = sd_folder
    cases = [({"process": {"prediction": "v_prediction"}}, "process.prediction='v_prediction'", "'epsilon'"),
             ({"process": {"schedule": "cosine"}}, "process.schedule='cosine'", "'scaled_linear'"),
             ({"model": {"unet": {"block_out_channels": [64, 64]}}}, "model.unet.block_out_channels", "[32, 64]"),
             ({"denoiser": "unet", "model": {"unet": {"cross_attention_dim": 768}}}, "cross_attention_dim=768", "32"),
             ({"denoiser": "tiny-unet"}, "denoiser='tiny-unet'", "'unet'"),
             ({"text_encoder": {"hidden_ln_final": False}}, "text_encoder.hidden_ln_final=False", "True"),
             ({"text_encoder": {"checkpoint": "clip.pt"}}, "text_encoder.checkpoint='clip.pt'", "None"),
             ({"latents": "pixels"}, "latents='pixels'", "latent model"),
             ({"micro_conditioning": True}, "micro_conditioning=True", "False")]
    for fields, named, file_value in cases:
        with pytest.raises(ConfigError) as info:
            from_dict(DiffusionStageConfig, {"pretrained": str(root), **fields}, "diffusion")
        assert named in str(info.value) and file_value in str(info.value) and str(root) in str(info.value), fields
    # what the files do not decide stays the YAML's; values equal to the files' are accepted
    st = from_dict(DiffusionStageConfig, {
        "pretrained": str(root), "denoiser": "unet", "process": {"prediction": "epsilon", "loss_weighting": "min_snr"},
        "model": {"unet": {"gradient_checkpointing": True, "block_out_channels": [32, 64]}},
        "sampling": {"sampler": "dpm_solver_2m", "steps": 9}, "cond_dropout": 0.3}, "diffusion")
    assert st.process.loss_weighting == "min_snr" and st.model_config.gradient_checkpointing
    assert (st.sampling.sampler, st.sampling.steps, st.sampling.spacing, st.sampling.steps_offset) == (
        "dpm_solver_2m", 9, "leading", 1)  # the user's sampler, with the shipped spacing it reads
    assert not st.sampling.karras_sigmas and st.cond_dropout == 0.3


def test_missing_parts_and_unknown_layouts_name_the_file(sd_folder, tmp_path):
    root, _ = sd_folder
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(PretrainedError, match=r"lists 'vae' but .*broken/vae/config.json is missing"):
        read_pretrained(broken)
    index = json.loads((root / "model_index.json").read_text())
    no_denoiser = tmp_path / "no-unet"
    no_denoiser.mkdir()
    (no_denoiser / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "unet"}))
    with pytest.raises(PretrainedError, match=r"no-unet/model_index.json lists no 'unet' nor 'transformer'"):
        read_pretrained(no_denoiser)
    with pytest.raises(PretrainedError, match=r"model_index.json is missing"):
        read_pretrained(root / "unet")  # a model folder, not a pipeline
    strange = tmp_path / "strange.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, strange)
    with pytest.raises(PretrainedError, match=r"strange.safetensors has neither an original Stable Diffusion"):
        read_pretrained(strange)
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        DiffusionStageConfig(pretrained=str(tmp_path / "nowhere.ckpt"))
    flux = dict(json.loads((root / "scheduler" / "scheduler_config.json").read_text()), beta_schedule="exponential")
    from training.pretrained import process_from_scheduler

    with pytest.raises(PretrainedError, match="sched.json: beta_schedule='exponential'"):
        process_from_scheduler(flux, "sched.json")


# ---------------------------------------------------------------------------------------------- stages


def pixel_batches(n: int = 3, batch: int = 4):
    from data_pipeline.batch import Batch
    from data_pipeline.memory import InMemoryLoader

    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        zeros = torch.zeros(batch, 2, dtype=torch.int64)
        pixels = torch.tanh(torch.randn(batch, 3, SIZE, SIZE, generator=g))
        out.append(Batch(pixels, ["the cat", "a hat"] * (batch // 2), [str(j) for j in range(batch)], [{}] * batch,
                         zeros, zeros, zeros))
    return InMemoryLoader(out)


def run_config(root, tmp_path, pipeline, **diffusion):
    from training.run_config import RunConfig

    return from_dict(RunConfig, {"run": {"output_dir": str(tmp_path), "name": "ft"}, "data": {"resolution": SIZE},
                                 "pipeline": pipeline,
                                 "diffusion": {"pretrained": str(root), "latents": "encode", "validation_prompts": [],
                                               **diffusion}})


def test_diffusion_and_lora_stages_start_from_the_folder(sd_folder, tmp_path):
    from models.convert import from_diffusers_unet_state_dict
    from training.builders import diffusion_stage, lora_stage, open_run
    from training.config_io import save_config
    from training.trainer import OptimConfig, TrainConfig, Trainer

    root, pipe = sd_folder
    cfg = run_config(root, tmp_path, ["diffusion"])
    run_dir = tmp_path / "ft"
    stage, _ = diffusion_stage(cfg, run_dir, with_validation_data=False)
    start = from_diffusers_unet_state_dict(pipe.unet.state_dict(), stage.cfg.model_config)
    assert all(torch.equal(v, start[k]) for k, v in stage.model.state_dict().items())  # the checkpoint's U-Net
    assert type(stage.text_encoder).__name__ == "HFTextEncoder" and stage.autoencoder is not None
    train = TrainConfig(max_steps=3, cpu=True, progress=False, log_every=1, ema_decay=None,
                        optim=OptimConfig(lr=1e-3, max_grad_norm=1.0))
    result = Trainer(train, stage, pixel_batches(), run_dir / "diffusion", micro_batch_size=4, seed=0).fit()
    assert result.step == 3 and result.export_path is not None
    moved = max((v - start[k]).abs().max().item() for k, v in stage.model.state_dict().items())
    assert moved > 1e-5  # fine-tuned
    # the run's config.yaml keeps pretrained= and reopens: the fine-tuned weights, the checkpoint's other parts
    save_config(cfg, run_dir / "config.yaml")
    pipe_run = open_run(run_dir, device="cpu", sampling=sampling())
    assert torch.isfinite(pipe_run.generate(["the cat"], height=SIZE, width=SIZE)).all()
    # a LoRA stage straight from the checkpoint (no diffusion stage in the pipeline): its U-Net is the base
    lora_cfg = run_config(root, tmp_path, ["lora"])
    lora, _ = lora_stage(lora_cfg, tmp_path / "lora-run", with_validation_data=False)
    assert lora.cfg.weights == str(root)
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in lora.model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k], v) for k, v in start.items())


def test_loom_sample_from_a_checkpoint_without_a_run(sd_folder, tmp_path, monkeypatch):
    from PIL import Image

    from launch import cli

    root, _ = sd_folder
    monkeypatch.chdir(tmp_path)
    code = cli.main(["sample", f"pretrained={root}", "prompts=[the cat, a hat]", "num_per_prompt=2",
                     "sampling.steps=2", "height=16", "width=16", "output=cats.png", "device=cpu"])
    assert code == 0
    with Image.open(tmp_path / "cats.png") as grid:
        assert grid.size == (2 * (2 + 2 * (SIZE + 2)), 2 * (2 + 2 * (SIZE + 2)))  # 2 × 2 images, ×2
    assert cli.main(["sample", f"pretrained={tmp_path / 'nowhere'}", "prompts=[a]"]) == 1


# ---------------------------------------------------------------------------------------------- original DiT .pt


def test_original_dit_checkpoint_draws_what_diffusers_dit_pipeline_draws(tmp_path, sd_folder):
    """A class-conditional DiT with a learned variance, saved in the facebookresearch layout (``.pt``): our
    Inference (prompts are class ids) against diffusers' ``DiTPipeline`` with the same weights (diffusers' DiT set to
    the original's timestep frequencies and LayerNorm eps, as the published weights were trained)."""
    import re

    from models.dit_checkpoints import (
        config_from_diffusers_transformer,
        from_diffusers_dit_state_dict,
        to_original_state_dict,
    )

    root, pipe = sd_folder
    torch.manual_seed(4)
    ref = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=8,
                                          num_layers=2, sample_size=SIZE // 2, patch_size=2, num_embeds_ada_norm=1000)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():  # off the zero init, so every path carries signal
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        state = ref.state_dict()
        for k, v in state.items():  # one timestep/label embedder (the copies of a converted checkpoint are equal)
            if ".norm1.emb." in k and not k.startswith("transformer_blocks.0."):
                v.copy_(state[re.sub(r"^transformer_blocks\.\d+\.", "transformer_blocks.0.", k)])
    for block in ref.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm3.eps = 1e-6
    config = config_from_diffusers_transformer(dict(ref.config))
    original = to_original_state_dict(from_diffusers_dit_state_dict(ref.state_dict(), config), config)
    torch.save({k: v.contiguous() for k, v in original.items()}, tmp_path / "DiT-tiny-2.pt")

    p = read_pretrained(tmp_path / "DiT-tiny-2.pt")
    assert (p.layout, p.family, p.learned_sigma, p.num_classes) == ("original", "dit", True, 1000)
    with pytest.raises(PretrainedError, match="holds no autoencoder: set diffusion.autoencoder_weights"):
        DiffusionStageConfig(pretrained=str(tmp_path / "DiT-tiny-2.pt"))
    ours = open_pretrained(tmp_path / "DiT-tiny-2.pt", device="cpu", sampling=sampling(steps=3, guidance=4.0, seed=2),
                           diffusion={"autoencoder_weights": str(root / "vae")})  # a diffusers VAE folder
    got = ours.generate(["207", "3"], height=SIZE, width=SIZE)
    scheduler = diffusers.DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)
    dit = diffusers.DiTPipeline(transformer=ref.eval(), vae=pipe.vae, scheduler=scheduler)
    with torch.no_grad():
        expected = dit(class_labels=[207, 3], guidance_scale=4.0, generator=torch.Generator().manual_seed(2),
                       num_inference_steps=3, output_type="np").images
    expected = torch.from_numpy(expected).permute(0, 3, 1, 2) * 2 - 1
    err = (got - expected).abs().max().item()
    assert err <= 1e-4, err
    assert (got[0] - got[1]).abs().max() > 1e-2  # the class reaches the DiT
    with pytest.raises(ValueError, match="class id in"):
        ours.generate(["a cat"])
