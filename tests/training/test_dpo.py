"""The ``dpo`` stage: the Diffusion-DPO loss against a hand computation, shared noise and timestep for the pair, the
reference = base exactly (adapters disabled), one base copy in memory under LoRA, and short runs on digit pairs
ranked by a rule (more ink wins) where the held-out implicit accuracy and reward margin rise."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from data_pipeline.batch import Batch
from data_pipeline.demo import caption_for_digit, load_digits_split
from data_pipeline.memory import InMemoryLoader
from data_pipeline.preference import PreferenceSample, write_preference_shards
from data_pipeline.writer import WriterOptions
from models.dit import DiT, DiTConfig
from models.text_encoder import TextEncoder, TextEncoderConfig
from training.config_io import load_config
from training.diffusion import DiffusionConfig
from training.finetune import LoraAdapterConfig, base_state_dict, parameter_bytes
from training.run_config import RunConfig
from training.stages.diffusion import DiffusionStage, DiffusionStageConfig
from training.stages.dpo import DpoStageConfig, diffusion_dpo_terms, dpo_statistics, make_dpo_stage
from training.stages.lora import LoraStageConfig, make_lora_stage

TE = TextEncoderConfig(model="openclip-tiny-text", layer="last")


pytestmark = pytest.mark.usefixtures("one_thread")


def dit_config() -> DiTConfig:
    return DiTConfig(sample_size=4, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                     context_dim=64, pooled_dim=32)


def perturbed_dit(seed: int = 0) -> DiT:
    g = torch.Generator().manual_seed(seed)
    model = DiT(dit_config())
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


# --------------------------------------------------------------------------------------------------- loss


def test_dpo_loss_matches_a_hand_computation():
    err_w, err_l = torch.tensor([0.30, 0.10, 0.20]), torch.tensor([0.20, 0.25, 0.20])
    ref_w, ref_l = torch.tensor([0.28, 0.12, 0.20]), torch.tensor([0.21, 0.20, 0.20])
    beta = 10.0
    terms = diffusion_dpo_terms(err_w, err_l, ref_w, ref_l, beta)
    # pair 0: Δ = (0.30 - 0.28) - (0.20 - 0.21) = 0.03, z = -β/2·Δ = -0.15, loss = -log σ(-0.15) = log(1 + e^0.15)
    # pair 1: Δ = (0.10 - 0.12) - (0.25 - 0.20) = -0.07, z = 0.35, loss = log(1 + e^-0.35)
    # pair 2: Δ = 0, z = 0, loss = log 2
    expected_z = [-0.15, 0.35, 0.0]
    expected = [math.log1p(math.exp(0.15)), math.log1p(math.exp(-0.35)), math.log(2.0)]
    torch.testing.assert_close(terms.z, torch.tensor(expected_z), rtol=0, atol=1e-6)
    torch.testing.assert_close(terms.loss, torch.tensor(expected), rtol=0, atol=1e-6)
    torch.testing.assert_close(terms.reward_w, torch.tensor([-0.1, 0.1, 0.0]), rtol=0, atol=1e-6)
    stats = dpo_statistics(terms)
    assert stats["implicit_acc"] == pytest.approx(1 / 3)  # only pair 1 prefers the winner more than the reference
    assert stats["reward_margin"] == pytest.approx(sum(expected_z) / 3, abs=1e-6)
    # soft labels: a tie (p = 0.5) is symmetric in z and smallest at z = 0; p = 1 is the plain loss
    p = torch.tensor([1.0, 0.5, 0.5])
    soft = diffusion_dpo_terms(err_w, err_l, ref_w, ref_l, beta, p).loss
    assert soft[0] == pytest.approx(expected[0])
    assert soft[1] == pytest.approx(0.5 * (math.log1p(math.exp(-0.35)) + math.log1p(math.exp(0.35))))
    assert soft[2] == pytest.approx(math.log(2.0)) and soft[1] > soft[2]
    assert dpo_statistics(diffusion_dpo_terms(err_w, err_l, ref_w, ref_l, beta, p), p)["implicit_acc"] == 0.0


# --------------------------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(0)
    return TextEncoder(TE)


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("base") / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in perturbed_dit().state_dict().items()}, str(path))
    return str(path)


def diffusion_cfg(weights: str) -> DiffusionStageConfig:
    return DiffusionStageConfig(denoiser="dit", model={"dit": dit_config()}, weights=weights, text_encoder=TE,
                                latents="pixels", process=DiffusionConfig(schedule="cosine", prediction="v_prediction"))


def pair_batch(n: int = 4, same: bool = False) -> Batch:
    g = torch.Generator().manual_seed(9)
    w = torch.tanh(torch.randn(n, 3, 8, 8, generator=g))
    lo = w.clone() if same else torch.tanh(torch.randn(n, 3, 8, 8, generator=g))
    zeros = torch.zeros(n, 2, dtype=torch.int64)
    extras = {"latent_l": lo, "context": torch.randn(n, 5, 64, generator=g), "context_mask": torch.ones(n, 5),
              "pooled": torch.randn(n, 32, generator=g)}
    return Batch(None, ["x"] * n, [str(i) for i in range(n)], [{"preference": 1.0}] * n, zeros, zeros, zeros,
                 latents=w, extras=extras)


def dpo_stage(text_encoder, weights, **kw) -> DiffusionStage:
    torch.manual_seed(0)
    stage = make_dpo_stage(diffusion_cfg(weights), DpoStageConfig(**kw), text_encoder, None, (8, 8))
    stage.setup(torch.device("cpu"), torch.float32)
    return stage


def randomize_adapters(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_winner_and_loser_share_noise_and_timestep(text_encoder, base_weights):
    """Identical winner and loser → identical errors under shared noise/t → zero margin, loss log 2 — even though
    the policy (random adapters) differs from the reference."""
    stage = dpo_stage(text_encoder, base_weights, beta=1000.0, cond_dropout=0.0)
    randomize_adapters(stage.model)
    torch.manual_seed(1)
    loss, logs = stage.loss(stage.model, pair_batch(same=True))
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert logs["reward_margin"] == 0.0 and logs["model_mse"] != logs["ref_mse"]
    torch.manual_seed(1)
    loss, logs = stage.loss(stage.model, pair_batch(same=False))
    assert abs(logs["reward_margin"]) > 1e-3  # different images, random adapters: a margin appears


def test_reference_is_the_base_model_exactly(text_encoder, base_weights):
    stage = dpo_stage(text_encoder, base_weights)
    randomize_adapters(stage.model)
    base = perturbed_dit()
    batch = pair_batch()
    cond = stage.objective.pair_conditioning(batch)
    x, t = batch.latents, torch.tensor([3, 400, 700, 999])
    assert torch.equal(stage.objective.reference_output(stage.model, x, t, cond), base(x, t, cond))
    assert not torch.equal(stage.model(x, t, cond), base(x, t, cond))
    full = dpo_stage(text_encoder, base_weights, policy="full")
    assert torch.equal(full.objective.reference_output(full.model, x, t, cond), base(x, t, cond))
    # a fresh LoRA policy equals its reference: the loss starts at log 2 whatever the pairs
    fresh = dpo_stage(text_encoder, base_weights)
    loss, logs = fresh.loss(fresh.model, pair_batch())
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6) and logs["reward_margin"] == 0.0


def test_unet_policy_and_reference(text_encoder, tmp_path):
    """The same code path on a U-Net: adapters on its transformer blocks, reference = base exactly."""
    from models.unet import UNet, UNetConfig

    ucfg = UNetConfig(in_channels=3, out_channels=3, block_out_channels=[16, 32], layers_per_block=1,
                      attention_levels=[True, True], transformer_depth=[1, 1], num_heads=None, head_dim=16,
                      cross_attention_dim=64, use_linear_projection=True, norm_num_groups=8)
    g = torch.Generator().manual_seed(0)
    base = UNet(ucfg)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_file(base.state_dict(), str(tmp_path / "unet.safetensors"))
    dcfg = dataclasses.replace(diffusion_cfg(str(tmp_path / "unet.safetensors")), denoiser="unet", model={"unet": ucfg})
    stage = make_dpo_stage(dcfg, DpoStageConfig(adapter=LoraAdapterConfig(rank=4, targets=["attention", "projection"])),
                     text_encoder, None, (8, 8))
    stage.setup(torch.device("cpu"), torch.float32)
    randomize_adapters(stage.model)
    batch = pair_batch()
    cond = stage.objective.pair_conditioning(batch)
    x, t = batch.latents, torch.tensor([3, 400, 700, 999])
    with torch.no_grad():
        assert torch.equal(stage.objective.reference_output(stage.model, x, t, cond), base.eval()(x, t, cond))
    loss, logs = stage.loss(stage.model, batch)
    loss.backward()
    assert all(p.grad is not None for p in stage.model.parameters() if p.requires_grad)
    assert abs(logs["reward_margin"]) > 0


def test_lora_dpo_holds_one_copy_of_the_base_weights(text_encoder, base_weights):
    """Parameter memory of LoRA-DPO = the LoRA fine-tune's (base + adapters + frozen encoders), not twice the
    denoiser; full-weight DPO holds one more denoiser (its frozen reference)."""
    adapter = LoraAdapterConfig(rank=4)
    torch.manual_seed(0)
    lora = make_lora_stage(diffusion_cfg(base_weights), LoraStageConfig(adapter=adapter), text_encoder, None, (8, 8))
    dpo = dpo_stage(text_encoder, base_weights, adapter=adapter)
    full = dpo_stage(text_encoder, base_weights, policy="full")

    def held(stage) -> int:
        return parameter_bytes(stage.trainable(), *stage.frozen_modules().values())

    denoiser = parameter_bytes(perturbed_dit())
    adapters = sum(p.numel() * 4 for p in dpo.model.parameters() if p.requires_grad)
    encoder = parameter_bytes(text_encoder)
    assert held(dpo) == held(lora) == encoder + denoiser + adapters
    assert held(full) == encoder + 2 * denoiser


class PairLoader(InMemoryLoader):
    """Fixed cached-pair batches of 4 pairs, in order, with a position the trainer saves and restores."""

    def __init__(self, n: int = 3):
        super().__init__([pair_batch() for _ in range(n)])


def test_resumed_dpo_run_equals_uninterrupted(text_encoder, base_weights, tmp_path):
    from training.trainer import OptimConfig, TrainConfig, Trainer

    def fit(out: Path, steps: int) -> None:
        torch.manual_seed(0)  # the same adapter initialisation for every run
        stage = make_dpo_stage(diffusion_cfg(base_weights), DpoStageConfig(beta=500.0, cond_dropout=0.2,
                                                                      adapter=LoraAdapterConfig(rank=2)),
                         text_encoder, None, (8, 8))
        cfg = TrainConfig(max_steps=steps, cpu=True, progress=False, checkpoint_every=2, ema_decay=0.8,
                          optim=OptimConfig(lr=1e-2))
        Trainer(cfg, stage, PairLoader(), out, micro_batch_size=4, seed=0).fit()

    fit(tmp_path / "straight", 4)
    fit(tmp_path / "cut", 2)
    fit(tmp_path / "cut", 4)
    a = load_file(str(tmp_path / "straight" / "export" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "cut" / "export" / "adapter.safetensors"))
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state whose precision cannot change: start and leave it fresh."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("policy", ["lora", "full"])
def test_bf16_mixed_precision_dpo(text_encoder, base_weights, tmp_path, policy, fresh_accelerate_state):
    """Under bf16 autocast: the LoRA base (or the frozen reference) is held in bf16, the reference forward runs,
    the loss is finite, and held-out scoring (outside Accelerate's autocast) works on the evaluation copy."""
    from training.trainer import OptimConfig, TrainConfig, Trainer

    torch.manual_seed(0)
    stage = make_dpo_stage(diffusion_cfg(base_weights), DpoStageConfig(beta=500.0, policy=policy,
                                                                  adapter=LoraAdapterConfig(rank=2)),
                     text_encoder, None, (8, 8), val_pairs=[pair_batch()])
    cfg = TrainConfig(max_steps=2, cpu=True, progress=False, mixed_precision="bf16", ema_decay=None,
                      optim=OptimConfig(lr=1e-3))
    result = Trainer(cfg, stage, PairLoader(), tmp_path, micro_batch_size=4, seed=0).fit()
    assert np.isfinite(result.metrics["loss"]) and np.isfinite(result.metrics["val/dpo_loss"])
    frozen = stage.objective.reference if policy == "full" else stage.model
    assert {p.dtype for n, p in frozen.named_parameters() if not p.requires_grad} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------------ runs


def _ink(img: np.ndarray) -> float:
    return float(img.mean())


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One pair cache for the runs with the same data and tie policy (the stage reuses a matching cache)."""
    return tmp_path_factory.mktemp("dpo_cache")


@pytest.fixture(scope="module")
def ink_pairs(tmp_path_factory) -> Path:
    """Pick-a-Pic shards of demo digit pairs (same digit), ranked by the rule "more ink wins"; val from the held-out
    split. Pairs of near-equal ink are ties."""
    out = tmp_path_factory.mktemp("pairs")
    xtr, ytr, xva, yva = load_digits_split(0)
    rng = np.random.default_rng(0)
    for split, x, y, n in (("train", xtr, ytr, 384), ("val", xva, yva, 96)):
        samples = []
        for k in range(n):
            d = k % 10
            i, j = rng.choice(np.flatnonzero(y == d), 2, replace=False)
            gap = _ink(x[i]) - _ink(x[j])
            label = 0.5 if abs(gap) < 0.5 else float(gap > 0)
            samples.append(PreferenceSample(x[i], x[j], caption_for_digit(d), label, source_id=f"{split}/{k}"))
        write_preference_shards(samples, out, split, WriterOptions(image_format="png"))
    return out


def _run_cfg(tmp: Path, pairs: Path, weights: str, name: str, *overrides: str) -> RunConfig:
    return load_config(RunConfig, [], [
        "pipeline=[dpo]", "diffusion.denoiser=dit", "diffusion.latents=pixels", "diffusion.model.dit.sample_size=4",
        "diffusion.model.dit.patch_size=2", "diffusion.model.dit.in_channels=3", "diffusion.model.dit.hidden_size=32",
        "diffusion.model.dit.depth=2", "diffusion.model.dit.num_heads=2", "diffusion.model.dit.context_dim=64",
        "diffusion.model.dit.pooled_dim=32", "diffusion.text_encoder.model=openclip-tiny-text",
        "diffusion.text_encoder.layer=last", "diffusion.process.schedule=cosine",
        "diffusion.process.prediction=v_prediction", f"diffusion.weights={weights}", "diffusion.validation_prompts=[]",
        f"dpo.data.urls={pairs}/train-*.tar", "dpo.data.resolution=8", "dpo.data.batch_size=32",
        "dpo.data.num_workers=0", "dpo.data.shuffle_buffer=128", f"dpo.val_data.urls={pairs}/val-*.tar",
        "dpo.val_data.resolution=8", "dpo.validation_pairs=96", "dpo.train.cpu=true", "dpo.train.progress=false",
        "dpo.train.log_every=5", "dpo.train.optim.lr=3.0e-3", "dpo.train.optim.warmup_steps=0",
        f"run.output_dir={tmp}", f"run.name={name}", *overrides])


def test_lora_dpo_run_raises_held_out_implicit_accuracy(text_encoder, base_weights, ink_pairs, shared_cache,
                                                        tmp_path):
    from training.builders import dpo_stage as build_dpo_stage
    from training.runner import run_pipeline

    cfg = _run_cfg(tmp_path, ink_pairs, base_weights, "lora", "dpo.train.max_steps=30", "dpo.beta=2000",
                   "dpo.adapter.rank=8", "dpo.adapter.targets=[attention, feedforward]", f"dpo.cache={shared_cache}")
    result = run_pipeline(cfg)["dpo"]
    run = tmp_path / "lora"
    train_index = json.loads((shared_cache / "train.shardindex.json").read_text())
    assert train_index["skipped"].get("tie", 0) > 0 and train_index["total_samples"] + \
        train_index["skipped"]["tie"] == 384  # ties dropped and counted
    m = result.metrics
    assert m["val/implicit_acc"] > 0.6 and m["val/reward_margin"] > 0 and m["val/dpo_loss"] < math.log(2), m
    meta = json.loads((run / "dpo" / "export" / "adapter.json").read_text())
    assert meta["base_unchanged_verified"] is True and meta["objective"] == "dpo"

    # before training the same held-out pairs score exactly chance: policy == reference
    stage, _ = build_dpo_stage(cfg, run)
    stage.setup(torch.device("cpu"), torch.float32)
    before = stage.objective.validation_scores(stage.model)
    assert before["implicit_acc"] == 0.0 and before["reward_margin"] == 0.0
    assert before["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_full_policy_and_sft_runs(text_encoder, base_weights, ink_pairs, shared_cache, tmp_path):
    from training.runner import run_pipeline

    cfg = _run_cfg(tmp_path, ink_pairs, base_weights, "full", "dpo.train.max_steps=3", "dpo.policy=full",
                   "dpo.ties=keep", "dpo.validation_pairs=32")
    result = run_pipeline(cfg)["dpo"]
    assert np.isfinite(result.metrics["val/dpo_loss"])
    index = json.loads((tmp_path / "full" / "dpo_cache" / "train.shardindex.json").read_text())
    assert index["total_samples"] == 384 and "tie" not in index["skipped"]  # ties kept
    exported = load_file(str(tmp_path / "full" / "dpo" / "export" / "model.safetensors"))
    base = load_file(base_weights)
    assert exported.keys() == base.keys() and any(not torch.equal(exported[k], base[k]) for k in base)

    sft = _run_cfg(tmp_path, ink_pairs, base_weights, "sft", "dpo.train.max_steps=3", "dpo.objective=sft",
                   f"dpo.cache={shared_cache}")
    out = run_pipeline(sft)["dpo"]
    assert np.isfinite(out.metrics["loss"]) and (tmp_path / "sft" / "dpo" / "export" / "adapter.safetensors").exists()
    assert "implicit_acc" not in out.metrics  # the winner-only baseline has no preference terms


def test_dpo_config_checks():
    with pytest.raises(ValueError, match="beta"):
        DpoStageConfig(beta=0)
    with pytest.raises(Exception, match="dpo.data.urls"):
        load_config(RunConfig, [], ["pipeline=[dpo]"])
    with pytest.raises(Exception, match="out of order"):
        load_config(RunConfig, [], ["pipeline=[dpo, lora]", "dpo.data.urls=x.tar"])
    cfg = dataclasses.replace(DpoStageConfig(), policy="full")
    assert cfg.policy == "full"


def test_base_state_dict_names_match_the_plain_denoiser(text_encoder, base_weights):
    stage = dpo_stage(text_encoder, base_weights)
    plain = perturbed_dit().state_dict()
    state = base_state_dict(stage.model)
    assert state.keys() == plain.keys() and all(torch.equal(state[k], plain[k]) for k in plain)
    assert copy.deepcopy(stage.model) is not None
