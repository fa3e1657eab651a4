"""The ``lora`` stage and the adapter helpers: targets on U-Net and DiT, save/load/merge/unmerge/scale/combine round
trips, disabled adapters = base exactly, only adapters train (base provably unchanged), gradient checkpointing, bf16
mixed precision, exact resume, and ``loom sample lora=[...]``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data_pipeline.batch import Batch
from data_pipeline.memory import InMemoryLoader
from models.attention import LORA_TARGETS
from models.conditioning import Conditioning
from models.dit import DiT, DiTConfig
from models.text_encoder import TextEncoder, TextEncoderConfig
from models.unet import UNet, UNetConfig
from training.diffusion import DiffusionConfig
from training.finetune import (
    AdapterSpec,
    LoraAdapterConfig,
    adapters_disabled,
    add_lora,
    attach_adapters,
    base_state_dict,
    held_dtype,
    is_adapter_name,
    load_adapter,
    lora_target_names,
    merge_adapters,
    save_adapter,
    unmerge_adapters,
    weights_fingerprint,
)
from training.stages.diffusion import DiffusionStage, DiffusionStageConfig
from training.stages.lora import LoraStageConfig, make_lora_stage
from training.trainer import OptimConfig, TrainConfig, Trainer

TE = TextEncoderConfig(model="openclip-tiny-text", layer="last")  # width 64, pooled 32


pytestmark = pytest.mark.usefixtures("one_thread")


def dit_config() -> DiTConfig:
    return DiTConfig(sample_size=4, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                     context_dim=64, pooled_dim=32)


def unet_config() -> UNetConfig:
    return UNetConfig(in_channels=3, out_channels=3, block_out_channels=[16, 32], layers_per_block=1,
                      attention_levels=[True, True], transformer_depth=[1, 1], num_heads=None, head_dim=16,
                      cross_attention_dim=64, use_linear_projection=True, norm_num_groups=8)


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random non-zero weights everywhere (DiT's adaLN-Zero init makes a fresh model output exactly 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def build(kind: str, seed: int = 0) -> nn.Module:
    return perturbed(DiT(dit_config()) if kind == "dit" else UNet(unet_config()), seed)


def inputs(batch: int = 3, size: int = 8) -> tuple:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g)
    t = torch.tensor([5, 300, 900][:batch])
    cond = Conditioning(context=torch.randn(batch, 6, 64, generator=g), context_mask=torch.ones(batch, 6, dtype=bool),
                        pooled=torch.randn(batch, 32, generator=g))
    return x, t, cond


def randomize_adapters(model: nn.Module, seed: int = 2, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


# ----------------------------------------------------------------------------------------------- targets


def test_target_groups_on_dit_and_unet():
    dit = DiT(dit_config())
    attn = lora_target_names(dit, ["attention"])
    assert len(attn) == 2 * 2 * 4 and all(n.rsplit(".", 1)[-1] in LORA_TARGETS for n in attn)  # self + cross
    ff = lora_target_names(dit, ["feedforward"])
    assert ff == ["blocks.0.ff.proj_in", "blocks.0.ff.proj_out", "blocks.1.ff.proj_in", "blocks.1.ff.proj_out"]
    proj = lora_target_names(dit, ["projection"])
    assert proj == ["x_embedder", "final_layer.linear"]  # the feed-forward's proj_in/out are not "projections"
    unet = UNet(unet_config())
    u_proj = lora_target_names(unet, ["projection"])
    assert u_proj and all(n.endswith((".proj_in", ".proj_out")) and ".ff." not in n for n in u_proj)
    u_all = lora_target_names(unet, ["attention", "feedforward", "projection"])
    assert len(u_all) == len(set(u_all)) == len(lora_target_names(unet, ["attention"])) + \
        len(lora_target_names(unet, ["feedforward"])) + len(u_proj)
    with pytest.raises(ValueError, match="targets"):
        LoraAdapterConfig(targets=["attention", "mlp"])


# -------------------------------------------------------------------------------------- files and merging


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_adapter_save_load_merge_unmerge_scale_combine(kind: str, tmp_path: Path):
    x, t, cond = inputs()
    base = build(kind)
    y_base = base(x, t, cond)
    fp = weights_fingerprint(base.state_dict())
    cfg = LoraAdapterConfig(rank=4, alpha=8, targets=["attention", "feedforward", "projection"])
    model = add_lora(copy.deepcopy(base), cfg)
    randomize_adapters(model)
    y = model(x, t, cond)
    assert (y - y_base).abs().max() > 1e-2  # the adapter does something
    path = save_adapter(model, tmp_path / "a.safetensors", cfg, denoiser=kind, base_sha256=fp)
    meta = json.loads(path.with_suffix(".json").read_text())
    n_adapter = sum(p.numel() for n, p in model.named_parameters() if is_adapter_name(n))
    assert meta["parameters"] == n_adapter and meta["base_sha256"] == fp
    from safetensors.torch import load_file

    stored = load_file(str(path))  # only the adapter tensors are in the file
    assert all(".lora_A." in k or ".lora_B." in k for k in stored)
    assert sum(v.numel() for v in stored.values()) == n_adapter
    assert path.stat().st_size < 4 * n_adapter + 64 * 1024

    adapter = load_adapter(path)
    assert adapter.config == cfg
    loaded = attach_adapters(copy.deepcopy(base), [(adapter, 1.0)])
    torch.testing.assert_close(loaded(x, t, cond), y, rtol=0, atol=1e-5)
    merge_adapters(loaded)
    torch.testing.assert_close(loaded(x, t, cond), y, rtol=0, atol=1e-5)  # merged == unmerged
    unmerge_adapters(loaded)
    torch.testing.assert_close(loaded(x, t, cond), y, rtol=0, atol=1e-5)
    for k, v in base_state_dict(loaded).items():  # unmerge restores the base weights (to float rounding)
        torch.testing.assert_close(v, base.state_dict()[k], rtol=0, atol=1e-6)

    halves = attach_adapters(copy.deepcopy(base), [(adapter, 0.5), (adapter, 0.5)])
    torch.testing.assert_close(halves(x, t, cond), y, rtol=0, atol=1e-5)  # combined: updates add up
    merge_adapters(halves)
    torch.testing.assert_close(halves(x, t, cond), y, rtol=0, atol=1e-5)
    off = attach_adapters(copy.deepcopy(base), [(adapter, 0.0)])
    assert torch.equal(off(x, t, cond), y_base)
    double = attach_adapters(copy.deepcopy(base), [(adapter, 2.0)])  # scale 2: twice the (first-order) change
    assert (double(x, t, cond) - y_base).abs().mean() > 1.5 * (y - y_base).abs().mean()


def test_adapter_spec_and_bad_files(tmp_path: Path):
    assert AdapterSpec.parse("runs/x/adapter.safetensors:0.8") == AdapterSpec("runs/x/adapter.safetensors", 0.8)
    assert AdapterSpec.parse("adapter.safetensors") == AdapterSpec("adapter.safetensors", 1.0)
    assert AdapterSpec.parse("C:/a.safetensors") == AdapterSpec("C:/a.safetensors", 1.0)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="latentloom"):
        load_adapter(tmp_path / "plain.safetensors")
    dit_adapter = add_lora(build("dit"), LoraAdapterConfig(rank=2))
    save_adapter(dit_adapter, tmp_path / "dit.safetensors", LoraAdapterConfig(rank=2), denoiser="dit",
                 base_sha256=None)
    with pytest.raises(ValueError, match="does not have"):
        attach_adapters(build("unet"), [(load_adapter(tmp_path / "dit.safetensors"), 1.0)])


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_disabled_adapters_give_the_base_output_exactly(kind: str):
    x, t, cond = inputs()
    base = build(kind)
    y_base = base(x, t, cond)
    model = add_lora(copy.deepcopy(base), LoraAdapterConfig(rank=4, targets=["attention", "feedforward"]))
    randomize_adapters(model)
    assert not torch.equal(model(x, t, cond), y_base)
    with adapters_disabled(model) as reference:
        assert torch.equal(reference(x, t, cond), y_base)
    assert not torch.equal(model(x, t, cond), y_base)  # and they are back on afterwards


# ------------------------------------------------------------------------------------------------ training


class BatchLoader(InMemoryLoader):
    """Fixed pixel batches with captions (``.batches``), in order, with a position the trainer saves and restores."""

    def __init__(self, n_batches: int = 4, batch: int = 8, size: int = 8):
        g = torch.Generator().manual_seed(5)
        self.batches = []
        for _ in range(n_batches):
            pixels = torch.tanh(torch.randn(batch, 3, size, size, generator=g))
            captions = [f"a handwritten digit {['one', 'two', 'three'][j % 3]}" for j in range(batch)]
            zeros = torch.zeros(batch, 2, dtype=torch.int64)
            self.batches.append(Batch(pixels, captions, [str(j) for j in range(batch)], [{}] * batch, zeros,
                                      zeros, zeros))
        super().__init__(self.batches)


@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(0)
    return TextEncoder(TE)


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory) -> str:
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("base") / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in build("dit").state_dict().items()}, str(path))
    return str(path)


def make_stage(text_encoder, weights: str, val_batches=None, checkpointing: bool = False, **lora_kw) -> DiffusionStage:
    dcfg = DiffusionStageConfig(denoiser="dit",
                                model={"dit": dict_replace(dit_config(), gradient_checkpointing=checkpointing)},
                                weights=weights, text_encoder=TE, latents="pixels", cond_dropout=0.1,
                                process=DiffusionConfig(schedule="cosine", prediction="v_prediction"),
                                validation_prompts=[])
    torch.manual_seed(0)
    return make_lora_stage(dcfg, LoraStageConfig(**lora_kw), text_encoder, None, (8, 8), val_batches)


def dict_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def fit(stage, tmp: Path, steps: int, **train_kw):
    cfg = TrainConfig(max_steps=steps, cpu=True, progress=False, log_every=1,
                      optim=OptimConfig(lr=3e-3, max_grad_norm=1.0), **{"ema_decay": None, **train_kw})
    return Trainer(cfg, stage, BatchLoader(), tmp, micro_batch_size=8, seed=0).fit()


def test_lora_stage_trains_only_adapters_leaves_base_unchanged_and_learns(text_encoder, base_weights, tmp_path):
    val = BatchLoader(n_batches=2).batches
    stage = make_stage(text_encoder, base_weights, val_batches=val, adapter=LoraAdapterConfig(rank=4),
                       export_merged=True)
    initial_base = {k: v.clone() for k, v in base_state_dict(stage.model).items()}
    adapters_before = {n: p.detach().clone() for n, p in stage.model.named_parameters() if is_adapter_name(n)}
    stage.setup(torch.device("cpu"), torch.float32)
    val_before = stage.objective.validation_loss(stage.model)
    assert [n for n, p in stage.model.named_parameters() if p.requires_grad] == list(adapters_before)
    result = fit(stage, tmp_path, 40, ema_decay=0.9)

    after = base_state_dict(stage.model)
    assert after.keys() == initial_base.keys()
    assert all(torch.equal(after[k], initial_base[k]) for k in after)  # every base weight bit-identical
    trained = {n: p for n, p in stage.model.named_parameters() if n in adapters_before}
    assert any(not torch.equal(p, adapters_before[n]) for n, p in trained.items())
    assert result.metrics["val/loss"] < 0.9 * val_before, (val_before, result.metrics)
    ema = json.loads((tmp_path / "export" / "adapter.json").read_text())
    assert ema["base_unchanged_verified"] is True and ema["parameters"] == sum(v.numel() for v in
                                                                             adapters_before.values())
    from safetensors.torch import load_file

    shadow = load_file(str(tmp_path / "checkpoints" / "step_00000040" / "ema.safetensors"))
    assert {k for k in shadow if k.startswith("shadow.")} == {f"shadow.{n}" for n in adapters_before}
    # the merged export is a plain denoiser computing base + (EMA) adapter
    merged = DiT(dit_config())
    merged.load_state_dict(load_file(str(tmp_path / "export" / "model.safetensors")), strict=True)
    adapted = attach_adapters(build("dit"), [(load_adapter(tmp_path / "export" / "adapter.safetensors"), 1.0)])
    x, t, cond = inputs()
    torch.testing.assert_close(merged.eval()(x, t, cond), adapted(x, t, cond), rtol=0, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_adapter_gradients(text_encoder, base_weights):
    grads = []
    for ckpt in (False, True):
        stage = make_stage(text_encoder, base_weights, checkpointing=ckpt, adapter=LoraAdapterConfig(rank=4))
        randomize_adapters(stage.model)
        stage.setup(torch.device("cpu"), torch.float32)
        stage.model.train()
        torch.manual_seed(3)
        loss, _ = stage.loss(stage.model, BatchLoader().batches[0])
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in stage.model.named_parameters() if p.requires_grad})
        assert all(g.abs().sum() > 0 for n, g in grads[-1].items() if "lora_A" in n)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state whose precision cannot change: start and leave it fresh."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision_holds_the_base_in_bf16(text_encoder, base_weights, tmp_path, fresh_accelerate_state):
    stage = make_stage(text_encoder, base_weights, val_batches=BatchLoader(n_batches=1).batches,
                       adapter=LoraAdapterConfig(rank=4))
    result = fit(stage, tmp_path, 4, mixed_precision="bf16")
    dtypes = {p.dtype for n, p in stage.model.named_parameters() if not is_adapter_name(n)}
    assert dtypes == {torch.bfloat16}
    assert {p.dtype for n, p in stage.model.named_parameters() if is_adapter_name(n)} == {torch.float32}
    assert np.isfinite(result.metrics["loss"]) and np.isfinite(result.metrics["val/loss"])
    meta = json.loads((tmp_path / "export" / "adapter.json").read_text())
    assert meta["base_unchanged_verified"] is True  # checked against the base's bf16-rounded fingerprint
    # the check compares in the precision the base is held in: bf16 here, fp32 copies of bf16 values (what an
    # engine's consolidated 16-bit weights become in an evaluation copy), and catches a one-ulp change in bf16
    base = {k: v for k, v in base_state_dict(stage.model).items()}
    assert held_dtype(base) == torch.bfloat16
    assert held_dtype({k: v.float() for k, v in base.items()}) == torch.bfloat16
    assert held_dtype({"w": torch.tensor([1.0, 1.0 + 2**-20])}) == torch.float32
    assert held_dtype({"a": torch.zeros(1, dtype=torch.bfloat16), "b": torch.zeros(1, dtype=torch.float16)}) is None
    assert stage.adapters.check_base_unchanged(stage.model) is True
    with torch.no_grad():
        w = next(p for n, p in stage.model.named_parameters() if not is_adapter_name(n) and p.numel() > 1)
        flat = w.view(-1)
        i = int(flat.float().abs().argmax())
        flat[i] = flat[i] * 1.01  # one or two bf16 steps (8 bits of mantissa)
    with pytest.raises(RuntimeError, match="base weights changed.*bfloat16"):
        stage.adapters.check_base_unchanged(stage.model)


def test_resumed_lora_run_equals_uninterrupted(text_encoder, base_weights, tmp_path):
    from safetensors.torch import load_file

    kw = dict(adapter=LoraAdapterConfig(rank=4, dropout=0.1))
    fit(make_stage(text_encoder, base_weights, **kw), tmp_path / "straight", 4, ema_decay=0.8, checkpoint_every=2)
    fit(make_stage(text_encoder, base_weights, **kw), tmp_path / "cut", 2, ema_decay=0.8, checkpoint_every=2)
    fit(make_stage(text_encoder, base_weights, **kw), tmp_path / "cut", 4, ema_decay=0.8, checkpoint_every=2)
    a = load_file(str(tmp_path / "straight" / "export" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "cut" / "export" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# ------------------------------------------------------------------------------------------- loom sample


def test_loom_sample_with_adapters(text_encoder, base_weights, tmp_path):
    """A run directory with a base DiT; ``loom sample lora=[...]`` draws with adapters: two at 0.5 merged give the
    images of one at 1.0 unmerged, and differ from the base's."""
    from PIL import Image
    from safetensors.torch import save_file

    from launch import cli
    from training.config_io import load_config, save_config
    from training.run_config import RunConfig

    run = tmp_path / "run"
    cfg = load_config(RunConfig, [], [
        "pipeline=[diffusion]", "diffusion.denoiser=dit", "diffusion.latents=pixels", "data.resolution=8",
        "diffusion.model.dit.sample_size=4", "diffusion.model.dit.patch_size=2", "diffusion.model.dit.in_channels=3",
        "diffusion.model.dit.hidden_size=32", "diffusion.model.dit.depth=2", "diffusion.model.dit.num_heads=2",
        "diffusion.model.dit.context_dim=64", "diffusion.model.dit.pooled_dim=32",
        "diffusion.text_encoder.model=openclip-tiny-text", "diffusion.text_encoder.layer=last",
        f"run.output_dir={tmp_path}", "run.name=run"])
    save_config(cfg, run / "config.yaml")
    (run / "diffusion" / "export").mkdir(parents=True)
    save_file(build("dit").state_dict(), str(run / "diffusion" / "export" / "model.safetensors"))
    adapter_model = add_lora(build("dit"), LoraAdapterConfig(rank=4))
    randomize_adapters(adapter_model, std=0.5)
    save_adapter(adapter_model, tmp_path / "style.safetensors", LoraAdapterConfig(rank=4), denoiser="dit",
                 base_sha256=None)
    common = ["sample", f"run_dir={run}", "prompts=[a handwritten digit four]", "num_per_prompt=2",
              "sampling.steps=4", "device=cpu"]
    style = str(tmp_path / "style.safetensors")
    runs = {"base": [], "one": [f"lora=[{style}:1.0]", "lora_merge=false"],
            "halves": [f"lora=[{style}:0.5, {style}:0.5]", "lora_merge=true"],
            "flags": ["--lora", f"{style}:0.5", "--lora", f"{style}:0.5"]}  # the same, as `loom sample --lora`
    images = {}
    for name, extra in runs.items():
        assert cli.main([*common, *extra, f"output={name}.png"]) == 0
        images[name] = np.asarray(Image.open(run / f"{name}.png")).astype(int)
    assert np.abs(images["one"] - images["halves"]).max() <= 1  # same images up to rounding
    assert np.array_equal(images["flags"], images["halves"])
    assert np.abs(images["one"] - images["base"]).max() > 10
    assert cli.main([*common, "lora=[nowhere.safetensors]"]) == 1


def test_micro_conditioning_uses_the_unets_own_fourier_width(text_encoder):
    """SDXL-style size/crop conditioning on a U-Net whose ``addition_time_embed_dim`` is not SDXL's 256: the stage
    builds the vector at the U-Net's width (it used a fixed 256 and the U-Net refused the vector)."""
    from models.unet import UNetConfig as _UNetConfig
    from training.stages.diffusion import DiffusionStage, micro_fourier_dim

    unet = _UNetConfig(in_channels=3, out_channels=3, block_out_channels=[16, 16], layers_per_block=1,
                       attention_levels=[False, True], transformer_depth=[1, 1], num_heads=[2, 2],
                       cross_attention_dim=64, norm_num_groups=8, addition_embed_type="text_time",
                       addition_time_embed_dim=4, addition_embed_input_dim=32 + 6 * 4)
    cfg = DiffusionStageConfig(denoiser="unet", model={"unet": unet}, text_encoder=TE, latents="pixels",
                               micro_conditioning=True, validation_prompts=[],
                               process=DiffusionConfig(schedule="cosine"))
    assert micro_fourier_dim(unet) == 4 and micro_fourier_dim(dit_config()) == 256
    torch.manual_seed(0)
    stage = DiffusionStage(cfg, text_encoder, None, (8, 8))
    stage.setup(torch.device("cpu"), torch.float32)
    loss, _ = stage.loss(stage.model, BatchLoader(n_batches=1).batches[0])
    assert torch.isfinite(loss)
    loss.backward()
    assert stage.model.add_embed.linear_1.weight.grad.abs().sum() > 0  # the vector reached the model
