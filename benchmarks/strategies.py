"""Step time and peak memory of one distribution strategy, through the real Trainer, on one device.

One process is a world of one (as ``torchrun --nproc_per_node 1`` would start it): ``ddp`` wraps the model in
DistributedDataParallel, ``zero2`` / ``zero3`` hand it to DeepSpeed through Accelerate (the JSONs in
``launch/deepspeed/`` with their "auto" values filled by the trainer; a client torch AdamW, so no DeepSpeed op has to
be compiled), ``zero3_offload`` to ZeRO-3 with optimizer state and parameters in CPU memory (Accelerate swaps the
AdamW for DeepSpeed's CPU Adam, compiled on first use), ``fsdp2`` to PyTorch FSDP2 through Accelerate (each
``DiTBlock`` its own unit). Each strategy needs a fresh process (Accelerate's state is per process):
``launch/gpu_check.sh`` runs them one after the other.

The model is DiT-B/2 (Peebles & Xie 2023: width 768, depth 12, 12 heads, patch 2; ~130M parameters) on 32×32×4
latents (256 tokens) with cross-attention to the small OpenCLIP text tower's states, trained by the diffusion stage
on synthetic in-memory cached latents (no data loading), bf16, AdamW, clipping, EMA. A step's time is the median gap
between consecutive ``loss`` calls after the warm-up (forward, backward, optimizer, EMA, logging: all of a step); the
peak is ``torch.cuda.max_memory_allocated`` over the measured steps. The run then writes its checkpoint and the
consolidated export (timed separately, and checked: finite weights of the full shapes), and a second trainer resumes
from that checkpoint for one more step (``resume_ok``).

    python benchmarks/strategies.py --strategy zero3 [--steps 20 --warmup 5 --batch 32] [--json out.json]
    python benchmarks/strategies.py --strategy zero3 --cpu --steps 2   # the same code on a tiny DiT, CPU (tests)

Prints one ``RESULT`` line; exits 2 when the strategy Accelerate actually set up is not the one asked for.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
STRATEGIES = ("ddp", "zero2", "zero3", "zero3_offload", "fsdp2")
ENGINE = {"zero3_offload": "zero3"}  # what strategy_name reports for a strategy (offload is a ZeRO-3 option)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(strategy: str, cpu: bool) -> dict[str, str]:
    """What ``accelerate launch`` with the strategy's config file would export for a one-process world."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    if cpu:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    if strategy.startswith("zero"):
        path = REPO / "launch" / "deepspeed" / f"{strategy}.json"  # the file users launch with
        if not path.exists():
            raise FileNotFoundError(f"--strategy {strategy}: {path} is missing")
        env.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=str(path))
    elif strategy == "fsdp2":
        env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
                   FSDP_TRANSFORMER_CLS_TO_WRAP="DiTBlock", FSDP_RESHARD_AFTER_FORWARD="true",
                   FSDP_STATE_DICT_TYPE="SHARDED_STATE_DICT", FSDP_OFFLOAD_PARAMS="false",
                   FSDP_CPU_RAM_EFFICIENT_LOADING="false", FSDP_SYNC_MODULE_STATES="false")
    return env


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", required=True, choices=STRATEGIES)
    parser.add_argument("--cpu", action="store_true", help="tiny DiT on the CPU, fp32 (to test this script)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps")
    parser.add_argument("--warmup", type=int, default=5, help="steps before measuring")
    parser.add_argument("--batch", type=int, default=32, help="micro-batch (the process's batch)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--no-resume", action="store_true", help="skip the resume check")
    parser.add_argument("--width", type=int, default=None, help="DiT width (default: 768; 64 with --cpu)")
    parser.add_argument("--depth", type=int, default=None, help="DiT depth (default: 12; 2 with --cpu)")
    parser.add_argument("--profile", action="store_true",
                        help="run the training under torch.profiler and print the top operators (times inflated)")
    parser.add_argument("--precision", choices=["no", "bf16", "fp16"], default=None,
                        help="mixed precision (default: bf16 on the GPU, none with --cpu)")
    parser.add_argument("--ds-config", type=Path, default=None,
                        help="zero*: this DeepSpeed JSON instead of launch/deepspeed/<strategy>.json (option sweeps)")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix=f"strategy_{args.strategy}_"))
    os.environ.update(launcher_env(args.strategy, args.cpu))
    if args.ds_config is not None:
        if not args.strategy.startswith("zero") or not args.ds_config.is_file():
            raise SystemExit(f"--ds-config {args.ds_config}: needs a zero* strategy and an existing JSON file")
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(args.ds_config.resolve())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = run(args, tmp)
    line = " ".join(f"{k}={v}" for k, v in result.items())
    print(f"RESULT {line}", flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if result["strategy_used"] == ENGINE.get(args.strategy, args.strategy) else 2


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(REPO))
    from data_pipeline.memory import InMemoryLoader
    from models.autoencoder import AutoencoderKL, tiny_vae_config
    from models.dit import DiTConfig
    from models.text_encoder import TextEncoder, TextEncoderConfig
    from training.builders import distributed_position
    from training.diffusion import DiffusionConfig
    from training.sharding import innermost_optimizer, strategy_name
    from training.stages.diffusion import DiffusionStage, DiffusionStageConfig
    from training.trainer import OptimConfig, TrainConfig, Trainer

    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import make_batches, profiled

    cuda = torch.cuda.is_available() and not args.cpu
    distributed_position()  # the process group, created as `loom train` creates it (gloo where there is no GPU)
    if args.cpu:
        torch.set_num_threads(1)
        dit = DiTConfig(sample_size=8, patch_size=2, in_channels=4, hidden_size=args.width or 64,
                        depth=args.depth or 2, num_heads=2, context_dim=64, pooled_dim=32)
    else:  # DiT-B/2
        dit = DiTConfig(sample_size=32, patch_size=2, in_channels=4, hidden_size=args.width or 768,
                        depth=args.depth or 12, num_heads=12 if (args.width or 768) % 12 == 0 else 8,
                        context_dim=64, pooled_dim=32)
    side, batch = dit.sample_size, args.batch
    text = TextEncoder(TextEncoderConfig(model="openclip-tiny-text", layer="last"))
    batches = make_batches(text, 4, batch, torch.Generator().manual_seed(0), side)

    marks: list[float] = []
    peak = [0]

    class Timed(DiffusionStage):
        """The diffusion stage, noting the time (and the memory peak so far) at every loss call."""

        def loss(self, model, batch_):
            if cuda:
                torch.cuda.synchronize()
                if len(marks) == args.warmup:
                    torch.cuda.reset_peak_memory_stats()
                peak[0] = torch.cuda.max_memory_allocated()
            marks.append(time.perf_counter())
            return super().loss(model, batch_)

    steps = args.warmup + args.steps + 1  # the last loss call closes the last measured step
    cfg = DiffusionStageConfig(
        model={"dit": dit}, text_encoder=TextEncoderConfig(model="openclip-tiny-text", layer="last"),
        process=DiffusionConfig(schedule="cosine", prediction="v_prediction"), latents="cache",
        # cpu=False even with --cpu: Accelerate turns DeepSpeed off when asked for the CPU (the GPUs are hidden)
        train=TrainConfig(max_steps=steps, cpu=False, mixed_precision=args.precision or ("no" if args.cpu else "bf16"),
                          optim=OptimConfig(lr=1e-4, max_grad_norm=1.0), ema_decay=0.9999, progress=False,
                          log_every=10, checkpoint_every=steps, resume="none"),
    )
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(tiny_vae_config())  # frozen; only its latent scaling is used
    stage = Timed(cfg, text, autoencoder, (side * autoencoder.config.downsample_factor,) * 2)
    n_params = sum(p.numel() for p in stage.model.parameters())
    trainer = Trainer(cfg.train, stage, InMemoryLoader(batches), tmp / "run", micro_batch_size=batch, seed=0)
    started = time.perf_counter()
    with profiled(args.profile, f"{args.strategy}, {steps} steps (set-up, checkpoint and export included)", cuda, 20):
        result = trainer.fit()
    finished = time.perf_counter()
    acc = trainer.accelerator
    gaps = sorted(b - a for a, b in zip(marks[args.warmup:], marks[args.warmup + 1:]))
    step_s = gaps[len(gaps) // 2] if gaps else float("nan")

    from safetensors.torch import load_file

    exported = load_file(str(result.export_path)) if result.export_path else {}
    shapes = {n: tuple(p.shape) for n, p in trainer._skeleton.named_parameters()}
    export_ok = bool(exported) and all(
        k in exported and tuple(exported[k].shape) == s and bool(torch.isfinite(exported[k]).all())
        for k, s in shapes.items())

    resume_ok, resume_s = None, float("nan")
    if not args.no_resume:  # a second trainer loads the sharded checkpoint and takes one more step
        torch.manual_seed(0)
        again = DiffusionStage(cfg, text, autoencoder, (side * autoencoder.config.downsample_factor,) * 2)
        resumed_cfg = dataclasses.replace(cfg.train, max_steps=steps + 1, resume="latest")
        t0 = time.perf_counter()
        resumed = Trainer(resumed_cfg, again, InMemoryLoader(batches), tmp / "run", micro_batch_size=batch,
                          seed=0).fit()
        resume_s = time.perf_counter() - t0
        resume_ok = resumed.step == steps + 1 and math.isfinite(resumed.metrics.get("loss", math.nan))
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    inner = innermost_optimizer(acc._optimizers[-1])
    zero = (getattr(acc, "deepspeed_config", None) or {}).get("zero_optimization", {})
    return {
        "strategy": args.strategy, "strategy_used": strategy_name(acc), "device": device.replace(" ", "_"),
        "optimizer": type(inner).__name__,
        "offload": "/".join(zero.get(k, {}).get("device", "none") for k in ("offload_optimizer", "offload_param")),
        "params_M": round(n_params / 1e6, 1), "micro_batch": batch, "precision": cfg.train.mixed_precision,
        "steps_measured": len(gaps), "step_ms": round(step_s * 1e3, 1),
        "samples_per_s": round(batch / step_s, 1) if step_s > 0 else float("nan"),
        "peak_mem_GiB": round(peak[0] / 2**30, 2) if cuda else float("nan"),
        "final_loss": round(result.metrics.get("loss", math.nan), 4),
        "checkpoint_and_export_s": round(max(0.0, finished - marks[-1] - step_s), 1) if marks else float("nan"),
        "total_s": round(finished - started, 1), "export_ok": export_ok, "resume_ok": resume_ok,
        "resume_s": round(resume_s, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
