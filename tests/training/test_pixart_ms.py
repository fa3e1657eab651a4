"""PixArt-α's multi-scale models (``PixArt-XL-2-1024-MS``: size and aspect-ratio conditioning) sample and train
(issue 14, point 1/3): ``diffusion.micro_conditioning: pixart``.

Everything is built with diffusers' / transformers' own classes at tiny sizes with random weights: a
``PixArtTransformer2DModel`` with ``use_additional_conditions`` in a ``PixArtAlphaPipeline`` (tiny T5 and VAE),
saved with ``save_pretrained``; our :class:`~training.inference.Inference` opened with ``diffusion.pretrained=``
draws the image the pipeline draws for the same prompts and noise (square and not), the same transformer in
PixArt's original ``.pth`` layout loads too, the diffusion stage trains with the size vector, and older configs'
boolean ``micro_conditioning`` still reads."""

from __future__ import annotations

import pytest
import torch
from sdmaker import t5_tokenizer, tiny_vae

from training.config_io import ConfigError, from_dict, to_dict
from training.pretrained import open_pretrained, read_pretrained
from training.sampling import SamplingConfig
from training.stages.diffusion import DiffusionStageConfig

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

PROMPTS = ["the cat sat on a mat", "a hat"]  # lower case: the pipeline lower-cases prompts (clean_caption off)
STEPS, GUIDANCE, SEED = 3, 4.5, 3


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Off diffusers' zero initialisations (output layers, adaLN), so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


def tiny_pixart_ms():
    """diffusers' PixArt-α classes at a tiny size: ``sample_size`` 128 as the 1024 px MS model has it (diffusers'
    pipeline passes the sizes only then), width 192 (3 heads of 64 as every published PixArt has them, which is
    what an original ``.pth`` tells of its heads; divisible by 3 for the size embedders), learned sigma."""
    torch.manual_seed(0)
    text = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=16, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        is_encoder_decoder=False, use_cache=False, feed_forward_proj="gated-gelu", pad_token_id=0,
        eos_token_id=1)).eval()
    transformer = perturbed(diffusers.PixArtTransformer2DModel(
        num_attention_heads=3, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=192, sample_size=128, patch_size=2, caption_channels=32, use_additional_conditions=True),
        seed=1)
    vae = tiny_vae(16)
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                                                      prediction_type="epsilon")
    return diffusers.PixArtAlphaPipeline(tokenizer=t5_tokenizer(120), text_encoder=text, vae=vae,
                                         transformer=transformer, scheduler=scheduler)


@pytest.fixture(scope="module")
def pixart_folder(tmp_path_factory):
    pipe = tiny_pixart_ms()
    root = tmp_path_factory.mktemp("pixart") / "PixArt-tiny-MS"
    pipe.save_pretrained(root)
    return root, pipe


def diffusers_images(pipe, height: int, width: int) -> torch.Tensor:
    """diffusers' own pipeline at the requested size (no resolution binning) from the noise our sampler draws."""
    noise = torch.randn((len(PROMPTS), 4, height // 2, width // 2), generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        out = pipe(prompt=list(PROMPTS), latents=noise, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   height=height, width=width, use_resolution_binning=False, clean_caption=False,
                   output_type="pt").images
    return out * 2 - 1


def sampling(**kw) -> SamplingConfig:
    return SamplingConfig(**{"steps": STEPS, "guidance": GUIDANCE, "seed": SEED, **kw})


# ---------------------------------------------------------------------------------------------- diffusers folder


def test_folder_sets_the_pixart_kind(pixart_folder):
    root, _ = pixart_folder
    p = read_pretrained(root)
    assert (p.family, p.micro_conditioning, p.denoiser_config.vector_dim) == ("pixart", "pixart", 768)
    st = DiffusionStageConfig(pretrained=str(root))
    assert st.micro_conditioning == "pixart"
    again = from_dict(DiffusionStageConfig, to_dict(st))  # a run's resolved config.yaml reads back
    assert again.micro_conditioning == "pixart"
    for asked, named in ((True, "micro_conditioning=True"), ("sdxl", "micro_conditioning='sdxl'")):
        with pytest.raises(ConfigError, match=f"{named}.*files say 'pixart'"):
            from_dict(DiffusionStageConfig, {"pretrained": str(root), "micro_conditioning": asked}, "diffusion")


@pytest.mark.parametrize("height,width", [(16, 16), (16, 24)])
def test_folder_draws_what_the_pixart_pipeline_draws(pixart_folder, height, width):
    root, pipe = pixart_folder
    ours = open_pretrained(root, device="cpu", sampling=sampling())
    assert ours.size_conditioning == "pixart" and ours.sampling.sampler.startswith("dpm_solver")
    got = ours.generate(PROMPTS, height=height, width=width)
    expected = diffusers_images(pipe, height, width)
    assert got.shape == expected.shape == (2, 3, height, width)
    err = (got - expected).abs().max().item()
    assert err <= 1e-4, err
    # the transformer needs the size vector: without it, a clear error
    ours.size_conditioning = "none"
    with pytest.raises(ValueError, match="vector_dim=768: pass cond.vector"):
        ours.generate(PROMPTS, height=height, width=width)


def test_the_drawn_size_is_what_the_vector_says(pixart_folder):
    from models.dit_checkpoints import pixart_size_vector

    root, _ = pixart_folder
    ours = open_pretrained(root, device="cpu", sampling=sampling())
    cond, null = ours.conditioning(PROMPTS, "", 16, 24)
    expected = pixart_size_vector(torch.tensor([[16.0, 24.0]] * 2), torch.tensor([[16 / 24]] * 2))
    assert torch.equal(cond.vector, expected) and torch.equal(null.vector, expected)  # both branches, as diffusers
    # and it reaches the transformer: the transposed size's vector gives another prediction
    x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0, 500.0])
    other, _ = ours.conditioning(PROMPTS, "", 24, 16)
    with torch.no_grad():
        moved = (ours.denoiser(x, t, cond) - ours.denoiser(x, t, other)).abs().max().item()
    assert moved > 1e-3, moved


# ---------------------------------------------------------------------------------------------- original .pth


def test_original_multiscale_pth_loads_and_draws_the_folders_image(pixart_folder, tmp_path):
    from models.dit_checkpoints import (
        config_from_diffusers_transformer,
        from_diffusers_state_dict,
        to_original_state_dict,
    )

    root, pipe = pixart_folder
    config = config_from_diffusers_transformer(dict(pipe.transformer.config))
    original = to_original_state_dict(from_diffusers_state_dict(pipe.transformer.state_dict(), config), config)
    assert "csize_embedder.mlp.0.weight" in original and "ar_embedder.mlp.0.weight" in original
    path = tmp_path / "PixArt-tiny-2-1024-MS.pth"
    torch.save({"state_dict": {k: v.contiguous() for k, v in original.items()}}, path)
    p = read_pretrained(path)  # no "multi-scale ... does not feed yet" refusal
    assert (p.layout, p.family, p.micro_conditioning, p.learned_sigma) == ("original", "pixart", "pixart", True)
    parts = {"text_encoder": {"format": "hf-t5", "pretrained": str(root), "layer": "last"},
             "autoencoder_weights": str(root / "vae")}
    st = from_dict(DiffusionStageConfig, {"pretrained": str(path), **parts}, "diffusion")
    assert st.micro_conditioning == "pixart" and st.text_encoder.max_length == 120
    # the same transformer from either layout, the same sampler: the same image
    same = sampling(sampler="dpm_solver_2m", spacing="linspace")
    from_pth = open_pretrained(path, device="cpu", sampling=same, diffusion=parts)
    from_folder = open_pretrained(root, device="cpu", sampling=same)
    assert from_pth.size_conditioning == "pixart"
    a = from_pth.generate(PROMPTS, height=16, width=24)
    b = from_folder.generate(PROMPTS, height=16, width=24)
    err = (a - b).abs().max().item()
    assert err <= 1e-5, err


# ---------------------------------------------------------------------------------------------- configs


def test_older_boolean_configs_still_read_and_bad_kinds_are_named():
    import yaml

    from training.run_config import RunConfig

    assert from_dict(DiffusionStageConfig, {"micro_conditioning": True}).micro_conditioning == "sdxl"
    assert from_dict(DiffusionStageConfig, {"micro_conditioning": False}).micro_conditioning == "none"
    assert DiffusionStageConfig(micro_conditioning=True).micro_conditioning == "sdxl"  # Python callers
    old = yaml.safe_load("run: {name: old}\ndiffusion:\n  micro_conditioning: true\n")  # a saved config.yaml
    cfg = from_dict(RunConfig, old)
    assert cfg.diffusion.micro_conditioning == "sdxl"
    assert from_dict(RunConfig, to_dict(cfg)).diffusion.micro_conditioning == "sdxl"  # and writes the new name
    with pytest.raises(ConfigError, match="micro_conditioning: got 'pixar'.*'none', 'sdxl', 'pixart' or bool"):
        from_dict(RunConfig, {"diffusion": {"micro_conditioning": "pixar"}})
    with pytest.raises(ConfigError, match="micro_conditioning: 'pixart' feeds a 768-wide cond.vector.*vector_dim"):
        from_dict(DiffusionStageConfig, {"micro_conditioning": "pixart"}, "diffusion")
    st = from_dict(DiffusionStageConfig, {"micro_conditioning": "pixart", "model": {"dit": {"vector_dim": 768}}})
    assert st.micro_conditioning == "pixart"


# ---------------------------------------------------------------------------------------------- training


def pixel_batches(n: int = 2, batch: int = 2):
    """Non-square 16 × 24 pixel batches cut from larger originals (what the bucketing loader records)."""
    from data_pipeline.batch import Batch
    from data_pipeline.memory import InMemoryLoader

    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        pixels = torch.tanh(torch.randn(batch, 3, 16, 24, generator=g))
        original = torch.tensor([[480 + 16 * i, 720], [512, 768 + 8 * i]])
        out.append(Batch(pixels, PROMPTS[:batch], [str(j) for j in range(batch)], [{}] * batch, original,
                         torch.zeros(batch, 2, dtype=torch.int64), torch.tensor([[16, 24]] * batch)))
    return InMemoryLoader(out)


def test_a_diffusion_step_trains_with_the_size_vector(pixart_folder, tmp_path):
    from models.embeddings import size_conditioning_vector
    from training.builders import diffusion_stage
    from training.run_config import RunConfig
    from training.trainer import OptimConfig, TrainConfig, Trainer

    root, _ = pixart_folder
    cfg = from_dict(RunConfig, {"run": {"output_dir": str(tmp_path), "name": "ms"}, "data": {"resolution": 16},
                                "pipeline": ["diffusion"],
                                "diffusion": {"pretrained": str(root), "latents": "encode", "validation_prompts": []}})
    run_dir = tmp_path / "ms"
    stage, _ = diffusion_stage(cfg, run_dir, with_validation_data=False)
    assert stage.cfg.micro_conditioning == "pixart"
    batch = next(iter(pixel_batches()))
    cond = stage.conditioning_of(batch)
    # PixArt's training data: the original image's (height, width), the bucket's aspect ratio height / width
    expected = size_conditioning_vector("pixart", batch.original_size, batch.crop_top_left, batch.target_size)
    assert cond.vector.shape == (2, 768) and torch.equal(cond.vector, expected)
    assert not torch.equal(expected, size_conditioning_vector("pixart", batch.target_size, batch.crop_top_left,
                                                              batch.target_size))  # the original size counts
    # the vector reaches the model: the original size changes its prediction
    x, t = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(1)), torch.tensor([300.0, 700.0])
    other = stage.conditioning_of(batch)
    other.vector = size_conditioning_vector("pixart", torch.tensor([[256, 256]] * 2), batch.crop_top_left,
                                            batch.target_size)
    with torch.no_grad():
        moved = (stage.model(x, t, cond) - stage.model(x, t, other)).abs().max().item()
    assert moved > 1e-3, moved
    start = {k: v.clone() for k, v in stage.model.state_dict().items()}
    train = TrainConfig(max_steps=2, cpu=True, progress=False, log_every=1, ema_decay=None,
                        optim=OptimConfig(lr=1e-3, max_grad_norm=1.0))
    result = Trainer(train, stage, pixel_batches(), run_dir / "diffusion", micro_batch_size=2, seed=0).fit()
    assert result.step == 2
    assert max((v - start[k]).abs().max().item() for k, v in stage.model.state_dict().items()) > 1e-5
    trained = stage.model.vector_embedder.linear_1.weight
    assert not torch.equal(trained, start["vector_embedder.linear_1.weight"])  # the size embedder learns too
