"""``loom train``: run the configured chain of stages (autoencoder → cache → diffusion) and the report.

    loom train --config quickstart
    loom train --config quickstart diffusion.train.max_steps=500 run.name=longer
    torchrun --nproc_per_node 8 -m launch train --config my_run.yaml      # one process per GPU

Re-running the same command resumes every stage from its latest checkpoint (``train.resume: auto``);
``--resume latest`` insists on one, ``--resume none`` starts over, ``--resume PATH`` takes a checkpoint folder.
"""

from __future__ import annotations

from launch.commands import Command
from training.run_config import RunConfig


def plan(cfg: RunConfig) -> str:
    lines = [f"run directory: {cfg.run.directory} (seed {cfg.run.seed})", f"stages: {' -> '.join(cfg.pipeline)}"]
    sources = cfg.data.source_list()
    lines.append(f"data: {', '.join(s.urls for s in sources) or '(none configured)'} at {cfg.data.resolution}px, "
                 f"batch {cfg.data.batch_size} per rank")
    if "autoencoder" in cfg.pipeline:
        a = cfg.autoencoder
        lines.append(f"autoencoder: {len(a.model.block_out_channels)} levels {a.model.block_out_channels} "
                     f"(f={a.model.downsample_factor}, {a.model.latent_channels} latent channels), "
                     f"{a.train.max_steps} steps, lr {a.train.optim.lr}, kl_weight {a.kl_weight}")
    if "cache" in cfg.pipeline:
        lines.append(f"cache: latents + text embeddings into {cfg.run.directory / cfg.cache.output} "
                     f"({cfg.cache.dtype})")
    if "diffusion" in cfg.pipeline:
        d = cfg.diffusion
        lines.append(f"diffusion: {d.denoiser} on {d.latents} latents, process {d.process.kind}/"
                     f"{d.process.prediction} ({d.process.schedule}), cond dropout {d.cond_dropout}, "
                     f"{d.train.max_steps} steps, lr {d.train.optim.lr}, EMA {d.train.ema_decay}")
        lines.append(f"text encoder: {d.text_encoder.model} "
                     f"({d.text_encoder.pretrained or d.text_encoder.checkpoint or 'random init, saved in the run'})")
        lines.append(f"sampling: {d.sampling.sampler} {d.sampling.steps} steps, guidance {d.sampling.guidance}")
    if cfg.report.enabled:
        lines.append(f"report: {cfg.run.directory / 'report.md'}"
                     + (" with the digit-classifier learning check" if cfg.report.digits_check else ""))
    return "\n".join(lines)


def run(cfg: RunConfig) -> int:
    from training.pipeline import run_pipeline

    produced = run_pipeline(cfg)
    if "report" in produced:
        print(produced["report"].read_text())
    return 0


COMMAND = Command(name="train", help="train the configured stages (autoencoder, cache, diffusion) and report",
                  config_cls=RunConfig, run=run, plan=plan, run_dir=lambda cfg: cfg.run.directory,
                  resume_keys=("autoencoder.train.resume", "diffusion.train.resume", "lora.train.resume",
                               "dpo.train.resume"))
