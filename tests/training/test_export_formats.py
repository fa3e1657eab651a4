"""``loom export`` (issue 14, point 4): a finished run written as a diffusers pipeline folder, an original-layout
single file, and LoRA adapters in the diffusers / kohya layouts, each loaded back by diffusers' and transformers'
own classes and compared with what the run computes (random tiny weights, fp32)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from models.autoencoder import AutoencoderConfig, AutoencoderKL
from models.unet import UNet, UNetConfig
from training.builders import build_text_encoder, open_run
from training.config_io import from_dict, save_config
from training.export_formats import (
    ExportError,
    export_diffusers,
    export_single_file,
    scheduler_config,
)
from training.run_config import RunConfig
from training.stages.autoencoder import export_module

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a handwritten digit four", "a red square"]
UNET = dict(in_channels=4, out_channels=4, block_out_channels=[16, 32], layers_per_block=1,
            attention_levels=[True, False], transformer_depth=[1, 1], num_heads=[2, 2], cross_attention_dim=64,
            norm_num_groups=8)
# SD's shipped DDIM settings (StableDiffusionPipeline forces steps_offset=1 on a DDIM/DDPM config)
SD_DDIM = {"sampler": "ddim", "steps": 4, "guidance": 3.0, "seed": 5, "steps_offset": 1, "set_alpha_to_one": False}
AE = dict(block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4,
          scaling_factor=0.5)


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.03) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def unet_run(tmp_path, layer: str = "penultimate", sampling: dict | None = None, process: dict | None = None,
             unet: dict | None = None) -> tuple:
    """A finished latent U-Net run directory (random weights): config.yaml, text encoder, autoencoder and
    diffusion exports, as `loom train` leaves them."""
    cfg = from_dict(RunConfig, {
        "run": {"output_dir": str(tmp_path), "name": "run", "seed": 3}, "data": {"resolution": 16},
        "pipeline": ["autoencoder", "cache", "diffusion"],
        "autoencoder": {"model": AE},
        "diffusion": {"denoiser": "unet", "latents": "cache",
                      "text_encoder": {"model": "openclip-tiny-text", "layer": layer, "mask_padding": False},
                      "model": {"unet": {**UNET, **(unet or {})}},
                      "process": process or {"schedule": "scaled_linear", "prediction": "v_prediction"},
                      "sampling": sampling or SD_DDIM},
    })
    run_dir = tmp_path / "run"
    save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(0)
    model = UNet(UNetConfig(**{**UNET, **(unet or {})})).eval()
    perturb(model, 1)
    export_module(model, cfg.diffusion.model_config, run_dir / "diffusion" / "export")
    ae = AutoencoderKL(AutoencoderConfig(**AE)).eval()
    perturb(ae, 2)
    export_module(ae, ae.config, run_dir / "autoencoder" / "export")
    build_text_encoder(cfg.diffusion.text_encoder, run_dir, cfg.run.seed)  # the run's random encoder, saved
    return cfg, run_dir


def test_diffusers_folder_loads_in_stable_diffusion_pipeline_with_our_images(tmp_path):
    import diffusers
    from transformers import CLIPTextModel, CLIPTokenizer

    cfg, run_dir = unet_run(tmp_path)
    out = export_diffusers(run_dir, tmp_path / "sd")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]

    pipe = open_run(run_dir, device="cpu")
    # tokenizer: the same ids as open_clip's for the same prompts (padded with "!" = 0, as open_clip pads)
    tok = CLIPTokenizer.from_pretrained(out / "tokenizer")
    ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, pipe.text_encoder.tokenize(PROMPTS))
    # text encoder: the penultimate block after ln_final (SD 2.x) is the exported model's last_hidden_state
    text, info = CLIPTextModel.from_pretrained(out / "text_encoder", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert text.config.num_hidden_layers == 1  # of 2: the last block removed as SD 2's text_encoder/ ships it
    with torch.no_grad():
        ours = pipe.text_encoder.encode(PROMPTS).context
        theirs = text.eval()(ids).last_hidden_state
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    sd = diffusers.StableDiffusionPipeline.from_pretrained(out)
    sd.set_progress_bar_config(disable=True)
    assert type(sd.scheduler).__name__ == "DDIMScheduler" and sd.scheduler.config.prediction_type == "v_prediction"
    s = pipe.sampling
    images = pipe.generate(PROMPTS)  # (2, 3, 16, 16) in [-1, 1]
    shape = (2, *pipe.latent_shape())
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(s.seed))  # sample_latents' draw
    with torch.no_grad():
        ref = sd(PROMPTS, latents=noise, num_inference_steps=s.steps, guidance_scale=s.guidance, height=16, width=16,
                 output_type="pt").images  # (2, 3, 16, 16) in [0, 1]
    assert (images - pipe.generate(PROMPTS, guidance=0.0)).abs().max() > 1e-3  # the prompt matters
    torch.testing.assert_close(ref, images * 0.5 + 0.5, rtol=0, atol=1e-4)


def test_single_file_loads_with_diffusers_from_single_file_and_our_loader(tmp_path):
    import diffusers

    from models.convert import LDM_UNET_PREFIX, LDM_VAE_PREFIX
    from models.text_encoder import TextEncoder
    from training.weights import load_weights

    cfg, run_dir = unet_run(tmp_path)
    folder = export_diffusers(run_dir, tmp_path / "sd")
    path = export_single_file(run_dir, tmp_path / "model.safetensors")
    from safetensors.torch import load_file

    keys = list(load_file(str(path)))
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    pipe = open_run(run_dir, device="cpu")
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)
    t = torch.tensor([10, 900])
    unet = diffusers.UNet2DConditionModel.from_single_file(str(path), config=str(folder), subfolder="unet").eval()
    from models.conditioning import Conditioning

    with torch.no_grad():
        ours = pipe.denoiser(x, t, Conditioning(context=ctx))
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=ctx).sample, ours, rtol=0, atol=1e-5)
        vae = diffusers.AutoencoderKL.from_single_file(str(path), config=str(folder), subfolder="vae").eval()
        z = torch.randn(1, 4, 8, 8, generator=g)
        torch.testing.assert_close(vae.decode(z).sample, pipe.autoencoder.decode(z), rtol=0, atol=1e-5)
    # ... and our own loaders read every part back (U-Net and autoencoder from their LDM prefixes, the text tower
    # from cond_stage_model.model. as an SD 2.x file keeps it)
    unet2 = UNet(pipe.denoiser.config).eval()
    assert load_weights(unet2, path) == "ldm"
    ae2 = AutoencoderKL(pipe.autoencoder.config).eval()
    assert load_weights(ae2, path) == "ldm"
    te = TextEncoder(dataclasses.replace(cfg.diffusion.text_encoder, checkpoint=str(path)))
    with torch.no_grad():
        torch.testing.assert_close(te.encode(PROMPTS).context, pipe.text_encoder.encode(PROMPTS).context)
        torch.testing.assert_close(unet2(x, t, Conditioning(context=ctx)), ours)
    assert all(k.startswith((LDM_UNET_PREFIX, LDM_VAE_PREFIX, "cond_stage_model.model.")) for k in keys)


def test_lora_export_command_writes_files_diffusers_and_kohya_load(tmp_path):
    import diffusers
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    from launch import cli
    from models.conditioning import Conditioning
    from training.finetune import LoraAdapterConfig, add_lora, save_adapter

    cfg, run_dir = unet_run(tmp_path)
    folder = export_diffusers(run_dir, tmp_path / "sd")
    pipe = open_run(run_dir, device="cpu")
    lcfg = LoraAdapterConfig(rank=4, alpha=8.0, targets=["attention", "feedforward", "projection"])
    model = add_lora(pipe.denoiser, lcfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    adapter = save_adapter(model, run_dir / "lora" / "export" / "adapter.safetensors", lcfg, denoiser="unet",
                           base_sha256=None)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        ours = model.eval()(x, t, Conditioning(context=ctx))
    for fmt in ("diffusers", "kohya"):
        assert cli.main(["export", f"lora={adapter}", f"format={fmt}"]) == 0
        path = adapter.with_name(f"adapter-{fmt}.safetensors")
        unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
        state, alphas, meta = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
        StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, unet, adapter_name="x", metadata=meta)
        assert sum(1 for n, _ in unet.named_parameters() if "lora_A" in n) == len(model.peft_config and [
            n for n, _ in model.named_modules() if n.endswith("lora_A.default")])  # every layer injected
        with torch.no_grad():
            torch.testing.assert_close(unet(x, t, encoder_hidden_states=ctx).sample, ours, rtol=0, atol=1e-5)
    assert cli.main(["export", f"lora={adapter}", "format=kohya"]) == 1  # exists: not overwritten silently


def test_lora_merged_into_export_and_cli_run_export(tmp_path, capsys):
    from launch import cli

    cfg, run_dir = unet_run(tmp_path)
    assert cli.main(["export", str(run_dir), "format=diffusers"]) == 0
    out = capsys.readouterr().out
    assert "StableDiffusionPipeline" in out and (run_dir / "export-diffusers" / "model_index.json").is_file()
    assert cli.main(["export", str(run_dir), "format=single-file", "dtype=float16"]) == 0
    from safetensors.torch import load_file

    single = load_file(str(run_dir / "export-single-file.safetensors"))
    assert {v.dtype for v in single.values()} == {torch.float16}
    assert cli.main(["export", str(run_dir), "format=kohya"]) == 2  # a LoRA layout for a run: a config error
    assert "format='kohya' is a LoRA layout" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ schedulers


@pytest.mark.parametrize("sampling,process", [
    ({"sampler": "dpm_solver_2m", "steps": 7}, {"schedule": "cosine", "prediction": "epsilon"}),
    ({"sampler": "ddim", "steps": 6, "spacing": "trailing"},
     {"schedule": "scaled_linear", "prediction": "v_prediction", "zero_terminal_snr": True}),
    ({"sampler": "ddpm", "steps": 5}, {"schedule": "quadratic", "prediction": "sample"}),
    ({"sampler": "euler", "steps": 6}, {"kind": "flow", "flow_shift": 3.0}),
])
def test_scheduler_config_gives_diffusers_our_timesteps_and_schedule(sampling, process):
    import diffusers

    from training.diffusion import DiffusionConfig, build_process
    from training.diffusion.samplers import (
        discrete_timesteps,
        dpm_solver_timesteps,
        flow_sigmas,
        karras_discrete_grid,
    )
    from training.sampling import SamplingConfig

    s, p = SamplingConfig(**sampling), DiffusionConfig(**process)
    config = scheduler_config(p, s)
    sched = getattr(diffusers, config["_class_name"]).from_config(config)
    sched.set_timesteps(s.steps)
    proc = build_process(p)
    if p.kind == "flow":
        torch.testing.assert_close(sched.sigmas.double(), flow_sigmas(s.steps, p.flow_shift), rtol=1e-6, atol=1e-6)
        return
    torch.testing.assert_close(sched.alphas_cumprod.double(), proc.schedule.alphas_cumprod, rtol=1e-5, atol=1e-6)
    if s.sampler == "dpm_solver_2m":
        ours = dpm_solver_timesteps(p.num_timesteps, s.steps)
        karras = getattr(diffusers, config["_class_name"]).from_config(
            scheduler_config(p, dataclasses.replace(s, karras_sigmas=True)))
        karras.set_timesteps(s.steps)  # diffusers' float32 table: the sigmas agree to its rounding
        torch.testing.assert_close(karras.sigmas[:-1].double(), karras_discrete_grid(proc, s.steps)[1], rtol=1e-3,
                                   atol=0)
    elif s.sampler == "ddim":
        ours = discrete_timesteps(p.num_timesteps, s.steps, s.spacing or "leading", s.steps_offset)
    else:
        ours = discrete_timesteps(p.num_timesteps, s.steps, "leading")
    assert sched.timesteps.tolist() == ours
    assert sched.config.prediction_type == p.prediction
    assert scheduler_config(p, SamplingConfig(sampler=s.sampler, steps=3))["_class_name"] == config["_class_name"]


def test_unexportable_runs_are_errors_naming_the_model(tmp_path):
    from training.diffusion import DiffusionConfig
    from training.sampling import SamplingConfig

    with pytest.raises(ExportError, match="token_shift"):
        scheduler_config(DiffusionConfig(token_shift=True), SamplingConfig())
    with pytest.raises(ExportError, match="flow_grid"):
        scheduler_config(DiffusionConfig(kind="flow"), SamplingConfig(sampler="euler", flow_grid="linear"))
    cfg, run_dir = unet_run(tmp_path / "a", unet={"transformer_depth_mid": 2})
    with pytest.raises(ExportError, match="transformer_depth_mid=2"):
        export_diffusers(run_dir, tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing half-written


# ------------------------------------------------------------------------------------------------ transformers


def test_pixart_shaped_dit_exports_as_diffusers_pixart_transformer_with_our_outputs():
    import diffusers

    from models.conditioning import Conditioning
    from models.dit import DiT, DiTConfig
    from models.dit_checkpoints import to_diffusers_dit_state_dict
    from training.export_formats import dit_diffusers_config

    cfg = DiTConfig(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, context_dim=24,
                    caption_projection=True, adaln_single=True, pos_embed_base_size=4, pos_embed_interpolation=1.0)
    torch.manual_seed(0)
    ours = DiT(cfg).eval()
    perturb(ours, 4)
    config = dit_diffusers_config(cfg)
    assert config["_class_name"] == "PixArtTransformer2DModel"
    theirs = diffusers.PixArtTransformer2DModel.from_config(config).eval()
    theirs.load_state_dict(to_diffusers_dit_state_dict(ours.state_dict(), cfg), strict=True)
    g = torch.Generator().manual_seed(1)
    x, ctx, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 24, generator=g), torch.tensor([3, 800])
    with torch.no_grad():
        ref = theirs(x, encoder_hidden_states=ctx, timestep=t, added_cond_kwargs={"resolution": None,
                                                                                  "aspect_ratio": None}).sample
        torch.testing.assert_close(ref, ours(x, t, Conditioning(context=ctx)), rtol=0, atol=1e-5)


def dit_run(tmp_path) -> tuple:
    """The quickstart's kind of run: a text DiT with a pooled-text embedding (no diffusers class)."""
    from models.dit import DiT, DiTConfig

    dit = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, context_dim=64,
               pooled_dim=32)
    cfg = from_dict(RunConfig, {
        "run": {"output_dir": str(tmp_path), "name": "run", "seed": 3}, "data": {"resolution": 16},
        "pipeline": ["autoencoder", "cache", "diffusion"], "autoencoder": {"model": AE},
        "diffusion": {"denoiser": "dit", "text_encoder": {"model": "openclip-tiny-text", "layer": "last"},
                      "model": {"dit": dit}, "sampling": SD_DDIM}})
    run_dir = tmp_path / "run"
    save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(0)
    model = DiT(DiTConfig(**dit)).eval()
    perturb(model, 1)
    export_module(model, cfg.diffusion.model_config, run_dir / "diffusion" / "export")
    ae = AutoencoderKL(AutoencoderConfig(**AE)).eval()
    export_module(ae, ae.config, run_dir / "autoencoder" / "export")
    build_text_encoder(cfg.diffusion.text_encoder, run_dir, cfg.run.seed)
    return cfg, run_dir, model


def test_dit_without_diffusers_class_is_an_error_or_the_documented_layout(tmp_path):
    import diffusers
    from transformers import CLIPTextModelWithProjection

    from models.dit import DiT
    from training.weights import load_weights

    cfg, run_dir, model = dit_run(tmp_path)
    with pytest.raises(ExportError, match=r"pooled_dim=32.*custom_transformer=true"):
        export_diffusers(run_dir, tmp_path / "x")
    out = export_diffusers(run_dir, tmp_path / "custom", custom_transformer=True)
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["latentloom", "LatentLoomDiT"]
    config = json.loads((out / "transformer" / "config.json").read_text())
    again = DiT(from_dict(type(model.config), config["latentloom_config"]))
    assert load_weights(again, out / "transformer") == "ours"
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    # the other parts load with their own classes; the pooled embedding comes from the projection
    pipe = open_run(run_dir, device="cpu")
    text = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder").eval()
    ids = pipe.text_encoder.tokenize(PROMPTS)
    with torch.no_grad():
        enc, theirs = pipe.text_encoder.encode(PROMPTS), text(ids)
    torch.testing.assert_close(theirs.last_hidden_state, enc.context, rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs.text_embeds, enc.pooled, rtol=0, atol=1e-5)
    assert diffusers.AutoencoderKL.from_pretrained(out, subfolder="vae").config.scaling_factor == 0.5
    with pytest.raises(ExportError, match="single-file .*DiT"):
        export_single_file(run_dir, tmp_path / "m.safetensors")
