"""Runs the ``lora`` and the ``dpo`` stage with the real Trainer under whatever strategy the launch set up.

Used by ``tests/distributed/test_finetune_distributed.py``: as one plain process (the reference), as two DDP ranks
(gloo, CPU), and as one process that Accelerate hands to DeepSpeed ZeRO-2 (a JSON with "auto" values).

    python finetune_worker.py OUT_DIR [SCENARIOS] [PRECISION]

SCENARIOS is a comma list of ``full`` (4 optimizer steps), ``head`` (the first 2, checkpoint) and ``tail`` (the same
4-step command again: resumes from that checkpoint) — default ``full``. PRECISION is ``no`` (default) or ``bf16``.

Why the runs can be compared step by step: every global batch holds ``GLOBAL_BATCH`` samples; rank r of w trains on
samples r, r+w, r+2w, ... of it (one process: all of them). The noise and timestep of a sample are drawn from a
generator seeded by the sample's key, not from the process's RNG, and conditioning dropout is off, so a sample's
loss depends on the weights alone, whichever rank sees it. The stage's loss is the mean over its micro-batch and DDP
averages over ranks, so 2 ranks × b samples give the gradient of 1 process × 2b. Gradient accumulation (2
micro-batches per step), clipping and an EMA of the adapters are on.

Each rank writes ``OUT_DIR/<stage>_<scenario>_rank<r>.json``: its rank, world size, strategy, the loss of each of its
micro-batches, the names of the parameters the optimizer holds, a digest of its live adapter weights (equal on every
rank after DDP's all-reduce) and whether the base weights are bit-identical to the file they came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from safetensors.torch import load_file, save_file  # noqa: E402

from data_pipeline.batch import Batch  # noqa: E402
from data_pipeline.memory import InMemoryLoader  # noqa: E402
from models.dit import DiT, DiTConfig  # noqa: E402
from models.text_encoder import TextEncoder, TextEncoderConfig  # noqa: E402
from training.builders import distributed_position  # noqa: E402
from training.diffusion import DiffusionConfig  # noqa: E402
from training.finetune import LoraAdapterConfig, base_state_dict, is_adapter_name, unwrap  # noqa: E402
from training.sharding import strategy_name  # noqa: E402
from training.stages.diffusion import DiffusionStageConfig  # noqa: E402
from training.stages.dpo import DpoStageConfig, make_dpo_stage  # noqa: E402
from training.stages.lora import LoraStageConfig, make_lora_stage  # noqa: E402
from training.trainer import OptimConfig, TrainConfig, Trainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sharding_worker import optimizer_numel  # noqa: E402

DEVICE = os.environ.get("LATENTLOOM_SHARDING_DEVICE", "cpu")
STEPS = 4
CHECKPOINT = 2
GRAD_ACCUM = 2
GLOBAL_BATCH = 8  # samples (LoRA) or pairs (DPO) per micro-batch, over all ranks
N_BATCHES = STEPS * GRAD_ACCUM  # one epoch is the whole run
SIZE = 8
STAGES = ("lora", "dpo")
TE = TextEncoderConfig(model="openclip-tiny-text", layer="last")
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def dit_config() -> DiTConfig:
    return DiTConfig(sample_size=SIZE, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                     context_dim=64, pooled_dim=32, attention_backend="math" if DEVICE == "cuda" else "sdpa")


def base_model() -> DiT:
    """A "trained" base: every weight random but seeded (a fresh DiT's zero-initialised output layers would make
    the adapters' gradients vanish)."""
    g = torch.Generator().manual_seed(0)
    model = DiT(dit_config())
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def write_base(path: Path) -> str:
    save_file({k: v.contiguous() for k, v in base_model().state_dict().items()}, str(path))
    return str(path)


def key_seed(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16)


class KeyedNoise:
    """Per-sample noise and timesteps drawn from generators seeded by the current micro-batch's keys (training
    only: calls with an explicit generator, i.e. validation, keep the process's own draws)."""

    def __init__(self, process: Any):
        self.process = process
        self.keys: list[str] = []
        self._noise, self._timesteps = process.sample_noise, process.sample_timesteps
        process.sample_noise, process.sample_timesteps = self.sample_noise, self.sample_timesteps

    def sample_noise(self, x0: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if generator is not None or len(self.keys) != x0.shape[0]:
            return self._noise(x0, generator)
        draws = [torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(key_seed(k))) for k in self.keys]
        return torch.stack(draws).to(x0.device, x0.dtype)

    def sample_timesteps(self, batch_size: int, generator: Optional[torch.Generator] = None,
                         device: Any = "cpu") -> torch.Tensor:
        if generator is not None or len(self.keys) != batch_size:
            return self._timesteps(batch_size, generator, device)
        draws = [self._timesteps(1, torch.Generator().manual_seed(key_seed(k) + 1), "cpu") for k in self.keys]
        return torch.cat(draws).to(device)


def recording(stage: Any) -> Any:
    """``stage`` whose ``loss`` sets the keyed noise's keys and records each micro-batch's loss."""
    stage.keyed = KeyedNoise(stage.process)
    stage.losses = []
    objective_loss = stage.loss

    def loss(model, batch):
        stage.keyed.keys = list(batch.keys)
        value, logs = objective_loss(model, batch)
        stage.losses.append(float(value.detach().float()))
        return value, logs

    stage.loss = loss
    return stage


def global_batches(stage: str) -> list[Batch]:
    """``N_BATCHES`` batches of ``GLOBAL_BATCH`` samples (pixels + captions) or pairs (cached-pair layout)."""
    g = torch.Generator().manual_seed(5 if stage == "lora" else 9)
    torch.manual_seed(1234)
    text = TextEncoder(TE) if stage == "dpo" else None  # the stage's own text encoder (same seed)
    out = []
    for b in range(N_BATCHES):
        n = GLOBAL_BATCH
        keys = [f"{stage}{b:03d}_{i:02d}" for i in range(n)]
        captions = [f"a handwritten digit {DIGITS[(b + i) % 10]}" for i in range(n)]
        zeros = torch.zeros(n, 2, dtype=torch.int64)
        sizes = torch.full((n, 2), SIZE, dtype=torch.int64)
        pixels = torch.tanh(torch.randn(n, 3, SIZE, SIZE, generator=g))
        if stage == "lora":
            out.append(Batch(pixels, captions, keys, [{}] * n, sizes, zeros, sizes))
            continue
        loser = torch.tanh(torch.randn(n, 3, SIZE, SIZE, generator=g) - 0.5)
        with torch.no_grad():
            cond = text.encode(captions)  # what the pair cache stores
        extras = {"latent_l": loser, "context": cond.context.float(), "context_mask": cond.context_mask.float(),
                  "pooled": cond.pooled.float()}
        out.append(Batch(None, captions, keys, [{"preference": 1.0}] * n, sizes, zeros, sizes, latents=pixels,
                         extras=extras))
    return out


def rank_slice(batch: Batch, rank: int, world: int) -> Batch:
    idx = list(range(rank, len(batch), world))
    pick = torch.tensor(idx)
    return dataclasses.replace(batch._map(lambda t: t[pick]), captions=[batch.captions[i] for i in idx],
                               keys=[batch.keys[i] for i in idx], metadata=[batch.metadata[i] for i in idx])


def rank_loader(stage: str, rank: int, world: int) -> InMemoryLoader:
    """This rank's share of every fixed global batch (samples ``rank::world`` of each), in order."""
    return InMemoryLoader([rank_slice(b, rank, world) for b in global_batches(stage)])


def build_stage(stage: str, weights: str) -> Any:
    cfg = DiffusionStageConfig(denoiser="dit", model={"dit": dit_config()}, weights=weights, text_encoder=TE,
                               latents="pixels", cond_dropout=0.0, validation_prompts=[],
                               process=DiffusionConfig(schedule="cosine", prediction="v_prediction"))
    adapter = LoraAdapterConfig(rank=4, alpha=4.0, targets=["attention", "feedforward"])
    torch.manual_seed(1234)
    text_encoder = TextEncoder(TE)
    torch.manual_seed(0)  # the same adapter initialisation in every process
    if stage == "lora":
        return recording(make_lora_stage(cfg, LoraStageConfig(adapter=adapter), text_encoder, None, (SIZE, SIZE)))
    return recording(make_dpo_stage(cfg, DpoStageConfig(adapter=adapter, beta=200.0, cond_dropout=0.0), text_encoder,
                                    None, (SIZE, SIZE)))


def train_config(steps: int, precision: str, deepspeed: bool) -> TrainConfig:
    """``cpu`` stays off under DeepSpeed (Accelerate ignores DeepSpeed when asked for the CPU; without a visible GPU
    the device is the CPU anyway)."""
    return TrainConfig(max_steps=steps, grad_accum=GRAD_ACCUM, mixed_precision=precision,
                       cpu=DEVICE == "cpu" and not deepspeed, optim=OptimConfig(lr=5e-3, max_grad_norm=0.5),
                       ema_decay=0.5, ema_warmup=False, log_every=1, checkpoint_every=CHECKPOINT, keep_checkpoints=3,
                       progress=False)


def adapter_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(unwrap(model).named_parameters()):
        if is_adapter_name(name):
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run(stage_name: str, out: Path, scenario: str, precision: str) -> dict[str, Any]:
    rank, world = distributed_position()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    weights = write_base(out / f"base_rank{rank}.safetensors")  # each rank its own file: no write races
    stage = build_stage(stage_name, weights)
    initial = adapter_digest(stage.model)
    steps = CHECKPOINT if scenario == "head" else STEPS
    run_dir = out / f"{stage_name}_{'full' if scenario == 'full' else 'split'}"
    trainer = Trainer(train_config(steps, precision, deepspeed), stage, rank_loader(stage_name, rank, world), run_dir,
                      micro_batch_size=GLOBAL_BATCH // world, seed=0)
    result = trainer.fit()
    acc = trainer.accelerator
    model = acc._models[-1]
    original = load_file(weights)
    live_base = {k: v.detach().float().cpu() for k, v in base_state_dict(model).items()}
    trainable = {n: p.numel() for n, p in unwrap(model).named_parameters() if p.requires_grad}
    return {
        "rank": rank, "world": world, "strategy": strategy_name(acc), "step": result.step,
        "losses": stage.losses, "loss_logged": result.metrics.get("loss"),
        "trainable": sorted(trainable), "trainable_numel": sum(trainable.values()),
        "optimizer_numel": optimizer_numel(acc._optimizers[-1]),
        "adapter_digest": adapter_digest(model), "adapter_digest_initial": initial,
        "base_keys_match": set(live_base) == set(original),
        "base_unchanged": all(torch.equal(live_base[k], original[k].float()) for k in original if k in live_base)
        if precision == "no" else None,  # under bf16 the frozen base is held in bf16: compare after rounding
        "base_unchanged_bf16": all(torch.equal(live_base[k], original[k].to(torch.bfloat16).float())
                                   for k in original if k in live_base) if precision != "no" else None,
        "export": str(result.export_path) if result.export_path else None,
    }


def main(out_dir: str, scenarios: str = "full", precision: str = "no") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, _ = distributed_position()
    for stage in STAGES:
        for scenario in scenarios.split(","):
            report = run(stage, out, scenario, precision)
            (out / f"{stage}_{scenario}_rank{rank}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    from worker_setup import prepare_worker

    prepare_worker(DEVICE)
    main(*sys.argv[1:])
