"""``loom train``: run the configured chain of stages (autoencoder → cache → diffusion → lora / dpo) and the report.

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
        try:
            m = a.model_config  # with inflate_from: read from the image autoencoder's model.json
            time_f = f", {m.temporal_factor}x in time" if m.temporal_factor > 1 else ""
            what = (f"{len(m.block_out_channels)} levels {m.block_out_channels} (f={m.spatial_factor}{time_f}, "
                    f"{m.latent_channels} latent channels)")
        except FileNotFoundError:
            what = f"from {a.inflate_from} (not there yet)"
        video = "" if a.architecture_name == "autoencoder-kl" else f"{a.architecture_name} "
        lines.append(f"autoencoder: {video}{what}{', inflated' if a.inflate_from else ''}"
                     f"{'' if a.train_encoder else ', decoder only'}, "
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
    for name in ("lora", "dpo"):
        if name not in cfg.pipeline:
            continue
        stage = getattr(cfg, name)
        a = stage.adapter
        base = cfg.diffusion.weights or ("the diffusion stage's export" if "diffusion" in cfg.pipeline else "(none)")
        if name == "dpo" and stage.policy == "full":
            policy = "every denoiser weight (reference: a frozen copy of the base)"
        else:
            policy = (f"LoRA rank {a.rank}, alpha {a.alpha if a.alpha is not None else a.rank}, on "
                      f"{'+'.join(a.targets)}" + (" (reference: the base with the adapter disabled)"
                                                  if name == "dpo" else ""))
        lines.append(f"{name}: {policy}; base weights {base}; {stage.train.max_steps} steps, "
                     f"lr {stage.train.optim.lr}, EMA {stage.train.ema_decay}")
        if name == "dpo":
            lines.append(f"dpo data: {stage.data.urls or '(none configured)'}; objective {stage.objective}, "
                         f"beta {stage.beta}, ties {stage.ties}")
    if cfg.report.enabled:
        lines.append(f"report: {cfg.run.directory / 'report.md'}"
                     + (" with the digit-classifier learning check" if cfg.report.digits_check else ""))
    return "\n".join(lines)


def run(cfg: RunConfig) -> int:
    from training.runner import run_pipeline

    produced = run_pipeline(cfg)
    if "report" in produced:
        print(produced["report"].read_text())
    return 0


COMMAND = Command(name="train", config_cls=RunConfig, run=run, plan=plan,
                  resume_keys=("autoencoder.train.resume", "diffusion.train.resume", "lora.train.resume",
                               "dpo.train.resume"))
