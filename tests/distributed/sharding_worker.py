"""Runs the real Trainer with the diffusion stage on tiny digit shards under whatever strategy the launch set up.

Used by ``tests/distributed/test_sharding*.py``: in the test process (no distribution: the reference), and as a
subprocess with DeepSpeed chosen through Accelerate's environment (``ACCELERATE_USE_DEEPSPEED``, a DeepSpeed JSON),
one process or two under torchrun (gloo, CPU).

``python sharding_worker.py SHARDS OUT_DIR`` runs, in one process, three trainings of the same 4 steps
(2 micro-batches each, one of them poisoned with a NaN, warm-up LR, clipping, EMA, validation with a sample):

* ``full``: 4 steps uninterrupted;
* ``head``: the first 2 steps into another run directory (checkpoint at step 2);
* ``tail``: the same command again with 4 steps, resuming from that checkpoint;

and writes ``OUT_DIR/report_rank{r}.json`` with every loss, the step counters, the learning rate found in the torch
optimizer's own param groups, how each parameter is laid out on this rank, whether any frozen parameter was
sharded, and how far ``accelerator.get_state_dict`` is from our own gather of the live weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "data"))

from shardmaker import make_shards  # noqa: E402

from data_pipeline.data_config import DataConfig  # noqa: E402
from data_pipeline.loader import build_loader  # noqa: E402
from models.dit import DiTConfig  # noqa: E402
from models.text_encoder import TextEncoder, TextEncoderConfig  # noqa: E402
from training.builders import distributed_position, first_batches  # noqa: E402
from training.diffusion import DiffusionConfig  # noqa: E402
from training.sampling import SamplingConfig  # noqa: E402
from training.sharding import gather_full, innermost_optimizer, local_shard, strategy_name  # noqa: E402
from training.stages.diffusion import DiffusionStage, DiffusionStageConfig  # noqa: E402
from training.trainer import OptimConfig, TrainConfig, Trainer  # noqa: E402

# "cpu" (gloo; the default, CI) or "cuda" (NCCL, one GPU per process: launch/gpu_check.sh sets it)
DEVICE = os.environ.get("LATENTLOOM_SHARDING_DEVICE", "cpu")
STEPS = 3
GRAD_ACCUM = 2
BATCH = 4
CHECKPOINT = 2  # the split run stops here and resumes
POISONED_CALL = 4  # the second micro-batch of step 2 (loss calls count from 1): the first one has already
# back-propagated into the accumulation buffers, which the skipped step must discard
LR = 2e-3


class RecordingDiffusion(DiffusionStage):
    """The diffusion stage, recording each loss; the ``POISONED_CALL``-th micro-batch of the run has a NaN loss."""

    def __init__(self, *args: Any, first_call: int = 1, **kw: Any):
        super().__init__(*args, **kw)
        self.calls = first_call - 1
        self.losses: list[float] = []

    def loss(self, model, batch):
        self.calls += 1
        loss, logs = super().loss(model, batch)
        if self.calls == POISONED_CALL:
            loss = loss * float("nan")
        self.losses.append(float(loss.detach().float()))
        return loss, logs


def deepspeed_json(stage: int) -> dict:
    """What a user's JSON looks like: the batch, accumulation and clipping left "auto"."""
    zero = {"stage": stage}
    if stage == 3:  # partition even the tiny test parameters; the bucket sizes Accelerate derives from HF models
        zero.update(stage3_param_persistence_threshold=0, reduce_bucket_size="auto",
                    stage3_prefetch_bucket_size="auto")
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
            "fp16": {"enabled": "auto"}, "zero_optimization": zero}


def write_shards(directory: str | Path) -> Path:
    """Small image–caption shards (2 × 48 training samples, 16 validation), 16×16 images, the img2dataset layout."""
    make_shards(directory, "train", n_shards=2, per_shard=48, size=lambda i: (16, 16))
    make_shards(directory, "val", n_shards=1, per_shard=16, size=lambda i: (16, 16))
    return Path(directory)


def data_config(shards: str | Path, split: str = "train") -> DataConfig:
    n = "{000000..000001}" if split == "train" else "000000"
    return DataConfig(urls=f"{shards}/{split}-{n}.tar", resolution=8, batch_size=BATCH, num_workers=0,
                      shuffle_buffer=16, seed=0)


def build_stage(shards: str | Path, first_call: int = 1) -> RecordingDiffusion:
    """A pixel-space DiT with cross-attention to the tiny OpenCLIP tower (both seeded: identical in every process)."""
    cfg = DiffusionStageConfig(
        denoiser="dit",
        model={"dit": DiTConfig(sample_size=8, patch_size=1, in_channels=3, hidden_size=32, depth=1, num_heads=2,
                                context_dim=64, pooled_dim=32,
                                attention_backend="math" if DEVICE == "cuda" else "sdpa")},
        text_encoder=TextEncoderConfig(model="openclip-tiny-text", layer="last"),
        process=DiffusionConfig(kind="discrete", schedule="cosine", prediction="v_prediction"),
        latents="pixels", cond_dropout=0.2, validation_loss_batches=1,
        sampling=SamplingConfig(sampler="ddim", steps=2, guidance=2.0, seed=0),
        validation_prompts=["a picture of a train"],
    )
    torch.manual_seed(1234)
    text_encoder = TextEncoder(cfg.text_encoder)
    val = first_batches(data_config(shards, "val"), 8, 8)
    torch.manual_seed(0)
    return RecordingDiffusion(cfg, text_encoder, None, (8, 8), val, first_call=first_call)


def train_config(steps: int, cpu: bool = False) -> TrainConfig:
    """``cpu=False`` under DeepSpeed even on the CPU: Accelerate ignores DeepSpeed when asked for the CPU (the
    device is the CPU anyway where no GPU is visible)."""
    return TrainConfig(max_steps=steps, grad_accum=GRAD_ACCUM, mixed_precision="no", cpu=cpu,
                       optim=OptimConfig(lr=LR, warmup_steps=3, max_grad_norm=0.2), ema_decay=0.5, ema_warmup=False,
                       log_every=1, checkpoint_every=CHECKPOINT, keep_checkpoints=3, progress=False)


def optimizer_numel(opt: Any) -> int:
    """Elements of the fp32 master weights the optimizer updates on this rank (DeepSpeed's flat partitions, or
    the torch optimizer's parameters)."""
    zero = getattr(opt, "optimizer", opt)
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        flat = getattr(zero, attr, None)
        if flat:
            return sum(int(t.numel()) for t in flat)
    return sum(int(p.numel()) for g in innermost_optimizer(opt).param_groups for p in g["params"])


def layout(module: torch.nn.Module) -> dict[str, list]:
    """``name: [full shape, numel held by this rank, ds partition size or None]``."""
    out = {}
    for name, p in module.named_parameters():
        full = list(p.ds_shape) if hasattr(p, "ds_shape") else list(p.shape)
        out[name] = [full, int(local_shard(p).numel()), int(p.numel())]
    return out


def train(shards: str | Path, run_dir: Path, steps: int, first_call: int = 1,
          cpu: bool = False) -> tuple[dict, Trainer]:
    rank, world = distributed_position()
    stage = build_stage(shards, first_call)
    loader = build_loader(data_config(shards), rank=rank, world_size=world)
    trainer = Trainer(train_config(steps, cpu), stage, loader, run_dir, micro_batch_size=BATCH, seed=0)
    result = trainer.fit()
    acc = trainer.accelerator
    model, opt = acc._models[-1], acc._optimizers[-1]
    ema = trainer.state.ema
    if not ema.tracks(acc.unwrap_model(model).named_parameters()):  # resolved once after prepare: still the same
        raise RuntimeError(f"{strategy_name(acc)}: the module's parameter objects changed after the EMA was built")
    inner = innermost_optimizer(opt)
    report: dict[str, Any] = {
        "rank": rank, "world": world, "strategy": strategy_name(acc), "step": result.step,
        "losses": stage.losses, "nonfinite": result.metrics.get("nonfinite_steps"),
        "val_loss": result.metrics.get("val/loss"), "lr_logged": result.metrics.get("lr"),
        "grad_norm": result.metrics.get("grad_norm"),
        "ds_config": {k: v for k, v in (getattr(acc, "deepspeed_config", None) or {}).items()
                      if k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                               "gradient_clipping")},
        "inner_optimizer": type(inner).__name__, "inner_lr": [g["lr"] for g in inner.param_groups],
        "optimizer_numel": optimizer_numel(opt),
        "layout": layout(acc.unwrap_model(model)),
        "frozen_shapes": {n: list(p.shape) for n, p in stage.text_encoder.named_parameters()},
        "frozen_ds_attrs": sorted(n for n, p in stage.text_encoder.named_parameters()
                                  if hasattr(p, "ds_id") or hasattr(p, "ds_tensor")),
        "export": str(result.export_path) if result.export_path else None,
    }
    # our gather of the live weights against Accelerate's consolidation (DeepSpeed's own gather under ZeRO-3)
    theirs = acc.get_state_dict(model)
    unwrapped = acc.unwrap_model(model)
    mine = {name: gather_full(p, local_shard(p).detach(), dst=0) for name, p in unwrapped.named_parameters()}
    if acc.is_main_process:
        report["gather_max_diff"] = max(float((mine[k].float() - theirs[k].float().cpu()).abs().max())
                                        for k in mine)
        report["gather_keys_match"] = set(mine) <= set(theirs)
    return report, trainer


def zero3_padding_check() -> dict[str, Any]:
    """DeepSpeed driven directly: a Linear(3, 5) partitioned by ZeRO-3 over the ranks (15 and 5 elements: the last
    partition is zero-padded) against its known weights — our gather, ``shard_of`` and the EMA's consolidation."""
    import deepspeed
    import torch.distributed as dist

    from training.ema import EMA
    from training.sharding import shard_of

    torch.manual_seed(7)
    net = torch.nn.Linear(3, 5)
    known = {n: p.detach().clone() for n, p in net.named_parameters()}
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3,
              "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=net, config=config)
    params = dict(engine.module.named_parameters())
    ema = EMA(engine.module.named_parameters(), decay=0.9, warmup=False)
    full_ema = ema.full_weights(dst=None)
    out: dict[str, Any] = {"shard_numel": {}, "gather_ok": True, "shard_of_ok": True, "ema_ok": True}
    for name, p in params.items():
        local = local_shard(p)
        out["shard_numel"][name] = [int(local.numel()), int(p.ds_numel), int(p.numel())]
        whole = gather_full(p, local.detach(), dst=None)
        out["gather_ok"] &= torch.equal(whole, known[name])
        # the valid part of this rank's partition (the padding's content is undefined in DeepSpeed's buffer)
        valid = max(0, min(local.numel(), p.ds_numel - dist.get_rank() * local.numel()))
        mine = shard_of(p, known[name])
        out["shard_of_ok"] &= torch.equal(mine[:valid], local.detach()[:valid]) and not mine[valid:].any()
        out["ema_ok"] &= torch.equal(full_ema[name], known[name].float())
    return out


def main(shards: str, out_dir: str, scenarios: Optional[list[str]] = None) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = distributed_position()
    reports: dict[str, Any] = {}
    for name in scenarios or ["full", "head", "tail"]:
        run_dir = out / ("run_full" if name == "full" else "run_split")
        steps = STEPS if name in ("full", "tail") else CHECKPOINT
        first_call = 1 if name != "tail" else CHECKPOINT * GRAD_ACCUM + 1
        reports[name], _ = train(shards, run_dir, steps, first_call)
    if world > 1 and os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        reports["padding"] = zero3_padding_check()
    (out / f"report_rank{rank}.json").write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    from worker_setup import prepare_worker

    prepare_worker(DEVICE)
    main(sys.argv[1], sys.argv[2], sys.argv[3].split(",") if len(sys.argv) > 3 else None)
