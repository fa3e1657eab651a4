"""Runs a chain of stages (``pipeline: [autoencoder, cache, diffusion]``) in one run directory.

Each stage's output is the next one's input: the autoencoder stage exports ``autoencoder/export/model.safetensors``
(+ its config), the cache stage encodes the data with it into ``cache/``, the diffusion stage streams the cache and
keeps the autoencoder (frozen) for decoding samples. A stage that already finished resumes at its last checkpoint,
so re-running the same command continues where it stopped.

Layout of a run directory::

    config.yaml                  the resolved config
    text_encoder.safetensors     the frozen text tower when it was randomly initialised (shared by every stage)
    autoencoder/ diffusion/      per trained stage: checkpoints/, logs/ (TensorBoard), validation/, export/
    cache/                       cached latent + text-embedding shards (train-*, val-*)
    report.md, report/           the end-of-run report
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any, Callable

import torch

from data_pipeline.data_config import DataConfig
from data_pipeline.loader import build_loader
from training.builders import (
    build_text_encoder,
    diffusion_stage,
    distributed_position,
    dpo_stage,
    encoder_signature,
    exported_autoencoder_path,
    first_batches,
    lora_stage,
    pick_device,
    resolve_autoencoder,
    with_batch,
)
from training.config_io import save_config, to_yaml
from training.run_config import RunConfig
from training.sequence_parallel import data_parallel_position
from training.sharding import wait_for_main_process
from training.stages.autoencoder import AutoencoderStage, validation_pixels
from training.stages.cache import CacheConfig, cache_dir, cache_shards, data_signature, reuse_or_build
from training.trainer import Trainer

log = logging.getLogger(__name__)


def run_autoencoder(cfg: RunConfig, run_dir: Path, config_yaml: str) -> Path:
    st = cfg.autoencoder
    rank, world = distributed_position()
    val_pixels = None
    if cfg.val_data.source_list():
        val_pixels = validation_pixels(first_batches(cfg.val_data, 256, 64), 256)
    torch.manual_seed(cfg.run.seed)
    stage = AutoencoderStage(st, val_pixels)
    data = with_batch(cfg.data, st.batch_size)
    loader = build_loader(data, rank=rank, world_size=world)
    result = Trainer(st.train, stage, loader, run_dir / "autoencoder", micro_batch_size=data.batch_size,
                     seed=cfg.run.seed, config_yaml=config_yaml).fit()
    log.info("autoencoder: %s", {k: round(v, 4) for k, v in result.metrics.items() if k.startswith("val/")})
    return exported_autoencoder_path(run_dir)


def run_cache(cfg: RunConfig, run_dir: Path, config_yaml: str = "") -> Path:
    out = cache_dir(run_dir, cfg.cache)
    distributed_position()  # the process group exists before the wait below

    def encode() -> None:
        device = pick_device(cfg.device)
        encoders: list = []  # loaded on first need: nothing is loaded when every cache is reused

        def build(data: DataConfig, prefix: str, settings: CacheConfig) -> None:
            if not encoders:
                ae = resolve_autoencoder(cfg, run_dir)
                if ae is None:
                    raise ValueError("pipeline has 'cache' but diffusion.latents=pixels: there is nothing to encode")
                encoders.extend([ae.to(device), build_text_encoder(cfg.diffusion.text_encoder, run_dir,
                                                                    cfg.run.seed).to(device)])
            cache_shards(data, prefix, out, encoders[0], encoders[1], settings, device)

        for prefix, data in (("train", cfg.data), ("val", cfg.val_data)):
            if prefix == "train" or data.source_list():
                # validation reads the centred clip: only the training cache keeps longer clips (cache.clip_frames)
                settings = cfg.cache if prefix == "train" else dataclasses.replace(cfg.cache, clip_frames=None)
                signature = {"data": data_signature(data), "cache": dataclasses.asdict(settings),
                             **encoder_signature(cfg, run_dir)}
                reuse_or_build(out, prefix, signature, functools.partial(build, data, prefix, settings))

    # rank 0 encodes; the others wait however long that takes (a plain barrier would hit the collective timeout)
    wait_for_main_process(encode)
    return out


# How each stage named in ``pipeline`` runs: ``runner(cfg, run_dir, config_yaml) -> what it produced``.
def trained_stage_runner(name: str, build: Callable[[RunConfig, Path], tuple[Any, DataConfig]]
                         ) -> Callable[[RunConfig, Path, str], Any]:
    """The runner of a denoiser-training stage: ``build`` it, stream its data on this rank (the same data on the ranks
    of a ``parallel.sequence_parallel`` group), fit it under ``cfg.<name>.train`` into ``<run>/<name>``."""

    def run(cfg: RunConfig, run_dir: Path, config_yaml: str) -> Any:
        sp = cfg.parallel.sequence_parallel
        rank, world = data_parallel_position(*distributed_position(), sp)  # a sequence-parallel group reads alike
        stage, data = build(cfg, run_dir)
        loader = build_loader(data, rank=rank, world_size=world)
        return Trainer(getattr(cfg, name).train, stage, loader, run_dir / name, micro_batch_size=data.batch_size,
                       seed=cfg.run.seed, config_yaml=config_yaml, sequence_parallel=sp).fit()

    return run


STAGE_RUNNERS: dict[str, Callable[[RunConfig, Path, str], Any]] = {
    "autoencoder": run_autoencoder,
    "cache": run_cache,
    "diffusion": trained_stage_runner("diffusion", diffusion_stage),
    "lora": trained_stage_runner("lora", lora_stage),
    "dpo": trained_stage_runner("dpo", dpo_stage),
}


def run_pipeline(cfg: RunConfig) -> dict[str, Any]:
    """Run every stage of ``cfg.pipeline`` in order, then the report; returns what each produced."""
    data_parallel_position(*distributed_position(), cfg.parallel.sequence_parallel)  # the world splits into groups
    run_dir = cfg.run.directory
    run_dir.mkdir(parents=True, exist_ok=True)
    config_yaml = to_yaml(cfg)
    if distributed_position()[0] == 0:  # what `loom sample` and a resumed run read back; one writer of it
        log.info("resolved config written to %s", save_config(cfg, run_dir / "config.yaml"))
    produced: dict[str, Any] = {}
    for name in cfg.pipeline:
        log.info("=== stage %s ===", name)
        produced[name] = STAGE_RUNNERS[name](cfg, run_dir, config_yaml)
        stopped = getattr(produced[name], "stopped_by_signal", None)
        if stopped is not None:  # pre-empted: the stage checkpointed; re-running the same command resumes it
            log.warning("stage %s stopped by signal %s after its checkpoint; later stages and the report are left "
                        "for the resumed run", name, stopped)
            return produced
    if cfg.report.enabled and distributed_position()[0] == 0:
        from training.report import write_report

        produced["report"] = write_report(cfg, run_dir)
    return produced
