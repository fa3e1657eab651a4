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
        ema.update(model.named_parameters())

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
                device: torch.device, profile: bool = False) -> float:
    """Wall seconds of a full trainer run of ``steps`` steps (fixed costs included)."""
    stage = build_stage(cfg, text, device)
    run_cfg = copy.deepcopy(cfg.train)
    run_cfg.max_steps = steps
    run_cfg.checkpoint_every = steps
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with profiled(profile, f"trainer, {steps} steps (set-up, checkpoint and export included)",
                      device.type == "cuda"):
            Trainer(run_cfg, stage, InMemoryLoader(batches), Path(tmp), micro_batch_size=len(batches[0])).fit()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=60, help="steps of the short run (the long run does 3x)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions; the best of each is kept")
    parser.add_argument("--model", default="tiny", choices=sorted(MODELS), help="tiny: DiT 4x128 on 8x8x4 latents; "
                        "dit-b2: DiT-B/2 on 32x32x4")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="afterwards, profile N steps of the bare loop and an N-step trainer run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    torch.set_num_threads(min(torch.get_num_threads(), 2) if device.type == "cpu" else torch.get_num_threads())
    text = TextEncoder(TextEncoderConfig(model="openclip-tiny-text", layer="last"))
    batches = make_batches(text, 8, args.batch, torch.Generator().manual_seed(0), MODELS[args.model][1])
    text.to(device)
    cfg = stage_config(args.device, args.model)
    n1, n2 = args.steps, 3 * args.steps
    bares, trainers = [], []
    for _ in range(args.repeats):  # interleaved, best of each: the machine's background load hits both alike
        bares.append(bare_loop(cfg, text, batches, n2 - n1, device))
        t1 = trainer_run(cfg, text, batches, n1, device)
        t2 = trainer_run(cfg, text, batches, n2, device)
        trainers.append((n2 - n1) / (t2 - t1))
    bare, trainer = max(bares), max(trainers)
    side = MODELS[args.model][1]
    print(f"device {args.device}, batch {args.batch}, {args.model} on {side}x{side}x4 latents, "
          f"{sum(p.numel() for p in build_stage(cfg, text, device).model.parameters()) / 1e6:.1f}M parameters")
    print(f"bare loop: {bare:.2f} steps/s")
    print(f"trainer:   {trainer:.2f} steps/s  (difference of {n1}- and {n2}-step runs; best of {args.repeats})")
    print(f"ratio trainer/bare: {trainer / bare:.3f}  (goal >= 0.95)")
    print(f"step time: bare {1e3 / bare:.1f} ms, trainer {1e3 / trainer:.1f} ms", flush=True)
    if args.profile:
        bare_loop(cfg, text, batches, args.profile, device, profile=True)
        trainer_run(cfg, text, batches, args.profile, device, profile=True)


if __name__ == "__main__":
    main()
