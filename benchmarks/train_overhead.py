"""Trainer overhead: latentloom's Trainer against a bare PyTorch loop doing the same work, in one process.

Same model (a small text-conditional DiT), same in-memory batches (cached latents + text states, so data loading
is not measured), same optimizer (AdamW, constant LR, clipping at 1.0), same EMA, fp32 on CPU (bf16 autocast on a
GPU with ``--device cuda``). The bare loop is what a user would write by hand: forward, loss, backward, clip, step,
EMA update. The trainer's fixed costs (Accelerate set-up, the checkpoint and export at the end) are cancelled by
timing two runs of different lengths and dividing the step difference by the time difference.

    python benchmarks/train_overhead.py                 # CPU
    python benchmarks/train_overhead.py --device cuda   # GPU
    python benchmarks/train_overhead.py --device cuda --model dit-b2 --batch 32 --profile 10
        # DiT-B/2 on 32x32x4 latents (the GPU check's model), and a torch.profiler table of 10 steps of each

Prints steps/s of each and the ratio trainer / bare (goal >= 0.95).

The trainer is also timed, in the same run, in the variants that isolate each speed change against a baseline:

* ``before``: the train step as it was before issue 15 (``LegacyStepTrainer``: per micro-batch a Python bool of
  ``isfinite(loss)``, ``float(loss)``, ``float(grad_norm)``, the optimizer step and EMA behind Python ``if`` tests;
  the per-parameter for-loop AdamW) — the baseline of every ratio printed;
* ``for_loop``: today's step (no synchronisation, on-device skip) with the for-loop AdamW (the sync removal alone;
  on a CPU a synchronisation costs nothing, so expect ~1.0 here and the gain on a GPU);
* ``foreach`` / ``fused`` (the default, ``auto``): the AdamW kernels;
* ``--variants`` adds ``selective`` / ``blocks`` (activation checkpointing: slower, less memory), ``compile``
  (``train.compile: blocks``; the first steps compile).

And the EMA update alone over the model's parameters: the per-parameter ``mul_/add_`` loop (DiT's train.py)
against the one ``torch._foreach_lerp_`` of :class:`training.ema.EMA`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_pipeline.batch import Batch  # noqa: E402
from data_pipeline.memory import InMemoryLoader  # noqa: E402
from models.autoencoder import AutoencoderKL, tiny_vae_config  # noqa: E402
from models.dit import DiTConfig  # noqa: E402
from models.text_encoder import TextEncoder, TextEncoderConfig  # noqa: E402
from training.diffusion import DiffusionConfig  # noqa: E402
from training.ema import EMA  # noqa: E402
from training.stages.diffusion import DiffusionStage, DiffusionStageConfig  # noqa: E402
from training.trainer import OptimConfig, TrainConfig, Trainer  # noqa: E402

VARIANTS = {  # name: (trainer class name, TrainConfig changes, OptimConfig changes)
    "before": ("legacy", {}, {"implementation": "for_loop"}),
    "for_loop": ("trainer", {}, {"implementation": "for_loop"}),
    "foreach": ("trainer", {}, {"implementation": "foreach"}),
    "fused": ("trainer", {}, {"implementation": "fused"}),
    "selective": ("trainer", {"activation_checkpointing": "selective"}, {}),
    "blocks": ("trainer", {"activation_checkpointing": "blocks"}, {}),
    "compile": ("trainer", {"compile": "blocks"}, {}),
}


class LegacyStepTrainer(Trainer):
    """The train step before issue 15 (re-stated from commit b528dff's ``Trainer.train_step``), for the baseline:
    three host synchronisations per micro-batch and the skip decided in Python."""

    def train_step(self, state):
        cfg, acc, model, opt = self.cfg, self.accelerator, state.model, state.opt
        state.lr = cfg.optim.lr * state.lr_at(state.step)
        for group in opt.param_groups:
            group["lr"] = state.lr
        bad, sums = False, {}
        for _ in range(cfg.grad_accum):
            batch = self._next_batch(state)
            with acc.accumulate(model):
                loss, logs = self.stage.loss(model, batch)
                if self._any_rank_true(not bool(torch.isfinite(loss.detach()).all())):
                    bad = True
                if not bad:
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.optim.max_grad_norm is not None:
                        grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
                        if grad_norm is not None:
                            logs["grad_norm"] = float(grad_norm)
                    opt.step()
                opt.zero_grad(set_to_none=True)
            for k, v in {"loss": float(loss.detach()), **logs}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum
        state.step += 1
        if bad:
            return None
        if state.ema is not None:
            state.ema.update()
        return sums

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_batches, profiled  # noqa: E402

MODELS = {  # name: (DiT config keywords, latent side)
    "tiny": (dict(sample_size=8, patch_size=2, hidden_size=128, depth=4, num_heads=4), 8),
    "dit-b2": (dict(sample_size=32, patch_size=2, hidden_size=768, depth=12, num_heads=12), 32),
}


def stage_config(device: str, model: str = "tiny") -> DiffusionStageConfig:
    return DiffusionStageConfig(
        model={"dit": DiTConfig(in_channels=4, context_dim=64, pooled_dim=32, **MODELS[model][0])},
        text_encoder=TextEncoderConfig(model="openclip-tiny-text", layer="last"),
        process=DiffusionConfig(schedule="cosine", prediction="v_prediction"),
        train=TrainConfig(cpu=device == "cpu", optim=OptimConfig(lr=1e-4, max_grad_norm=1.0), ema_decay=0.999,
                          progress=False, log_every=50, resume="none", mixed_precision="auto"),
    )


def build_stage(cfg: DiffusionStageConfig, text: TextEncoder, device: torch.device) -> DiffusionStage:
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(tiny_vae_config()).to(device).eval()  # only its latent scaling is used here
    side = cfg.model_config.sample_size
    stage = DiffusionStage(cfg, text, autoencoder, (side * autoencoder.config.downsample_factor,) * 2)
    stage.device = device
    return stage


def bare_loop(cfg: DiffusionStageConfig, text: TextEncoder, batches: list[Batch], steps: int,
              device: torch.device, profile: bool = False) -> float:
    """steps/s of the hand-written loop."""
    stage = build_stage(cfg, text, device)
    model = stage.model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.optim.lr)
    ema = EMA(model.named_parameters(), 0.999).to(device)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else contextlib.nullcontext())
    it = itertools.cycle(batches)

    def step() -> None:
        batch = next(it).to(device)
        with amp:
            loss, _ = stage.loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update()

    for _ in range(5):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with profiled(profile, f"bare loop, {steps} steps", device.type == "cuda"):
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def trainer_run(cfg: DiffusionStageConfig, text: TextEncoder, batches: list[Batch], steps: int,
                device: torch.device, profile: bool = False, variant: str = "fused") -> float:
    """Wall seconds of a full trainer run of ``steps`` steps (fixed costs included) in ``variant``."""
    stage = build_stage(cfg, text, device)
    run_cfg = copy.deepcopy(cfg.train)
    run_cfg.max_steps = steps
    run_cfg.checkpoint_every = steps
    kind, train_changes, optim_changes = VARIANTS[variant]
    for k, v in train_changes.items():
        setattr(run_cfg, k, v)
    for k, v in optim_changes.items():
        setattr(run_cfg.optim, k, v)
    trainer_cls = LegacyStepTrainer if kind == "legacy" else Trainer
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with profiled(profile, f"trainer, {steps} steps (set-up, checkpoint and export included)",
                      device.type == "cuda"):
            trainer_cls(run_cfg, stage, InMemoryLoader(batches), Path(tmp), micro_batch_size=len(batches[0])).fit()
        return time.perf_counter() - start


def ema_bench(model: torch.nn.Module, device: torch.device, repeats: int = 50) -> tuple[float, float]:
    """Milliseconds per EMA update over ``model``'s parameters: DiT train.py's per-parameter ``mul_/add_`` loop and
    :class:`EMA`'s one ``_foreach_lerp_`` (best of 3 rounds of ``repeats``)."""
    model = model.to(device)
    shadow = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = EMA(model.named_parameters(), 0.9999, warmup=False).to(device)

    @torch.no_grad()
    def loop() -> None:
        for n, p in model.named_parameters():
            shadow[n].mul_(0.9999).add_(p.data, alpha=1 - 0.9999)

    out = []
    for fn in (loop, ema.update):
        best = float("inf")
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(repeats):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t) / repeats)
        out.append(1e3 * best)
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=60, help="steps of the short run (the long run does 3x)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions; the best of each is kept")
    parser.add_argument("--model", default="tiny", choices=sorted(MODELS), help="tiny: DiT 4x128 on 8x8x4 latents; "
                        "dit-b2: DiT-B/2 on 32x32x4")
    parser.add_argument("--variants", default="before,for_loop,foreach,fused",
                        help=f"trainer variants, comma-separated, the first is the baseline: {', '.join(VARIANTS)}")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="afterwards, profile N steps of the bare loop and an N-step trainer run")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    torch.set_num_threads(min(torch.get_num_threads(), 2) if device.type == "cpu" else torch.get_num_threads())
    text = TextEncoder(TextEncoderConfig(model="openclip-tiny-text", layer="last"))
    batches = make_batches(text, 8, args.batch, torch.Generator().manual_seed(0), MODELS[args.model][1])
    text.to(device)
    cfg = stage_config(args.device, args.model)
    n1, n2 = args.steps, 3 * args.steps
    bares: list[float] = []
    trainers: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):  # interleaved, best of each: the machine's background load hits all alike
        bares.append(bare_loop(cfg, text, batches, n2 - n1, device))
        for v in variants:
            t1 = trainer_run(cfg, text, batches, n1, device, variant=v)
            t2 = trainer_run(cfg, text, batches, n2, device, variant=v)
            trainers[v].append((n2 - n1) / (t2 - t1))
    bare = max(bares)
    best = {v: max(r) for v, r in trainers.items()}
    side = MODELS[args.model][1]
    model = build_stage(cfg, text, device).model
    print(f"device {args.device}, batch {args.batch}, {args.model} on {side}x{side}x4 latents, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; steps/s from the difference of "
          f"{n1}- and {n2}-step runs, best of {args.repeats}")
    print(f"bare loop:            {bare:8.2f} steps/s  {1e3 / bare:8.1f} ms/step")
    base = variants[0]
    for v in variants:
        print(f"trainer {v:13s} {best[v]:8.2f} steps/s  {1e3 / best[v]:8.1f} ms/step  ratio to bare "
              f"{best[v] / bare:.3f}  to '{base}' {best[v] / best[base]:.3f}")
    loop_ms, foreach_ms = ema_bench(model, device)
    print(f"EMA update: per-parameter loop {loop_ms:.3f} ms, foreach lerp {foreach_ms:.3f} ms "
          f"(ratio loop/foreach {loop_ms / foreach_ms:.2f})")
    print("goal: trainer/bare >= 0.95", flush=True)
    if args.profile:
        bare_loop(cfg, text, batches, args.profile, device, profile=True)
        trainer_run(cfg, text, batches, args.profile, device, profile=True, variant=variants[-1])


if __name__ == "__main__":
    main()
