"""The root config of a run: where it writes, what it reads, which stages it chains, and each stage's settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Optional

from data_pipeline.data_config import DataConfig
from training.sequence_parallel import ParallelConfig, check_model_config
from training.stages.autoencoder import AutoencoderStageConfig
from training.stages.cache import CacheConfig
from training.stages.diffusion import DiffusionStageConfig
from training.stages.dpo import DpoStageConfig
from training.stages.lora import LoraStageConfig

StageName = Literal["autoencoder", "cache", "diffusion", "lora", "dpo"]
STAGE_ORDER = {"autoencoder": 0, "cache": 1, "diffusion": 2, "lora": 3, "dpo": 4}  # the order stages run in


@dataclasses.dataclass
class RunSection:
    """Where and how a run is identified."""

    name: str = "run"  # run name; the run directory is output_dir/name
    output_dir: str = "runs"  # parent folder of run directories
    seed: int = 0  # global seed (initialisation, noise, dropout; the data order has data.seed)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name: {self.name!r} must be a non-empty folder name without '/'")

    @property
    def directory(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclasses.dataclass
class ReportConfig:
    """The end-of-run report (markdown + PNG grids)."""

    enabled: bool = False  # write report.md after the last stage
    digits_check: bool = False  # the demo learning check: a digit classifier reads samples for each digit
    samples_per_digit: int = 10  # samples per digit prompt for the check
    guidance_scales: list[float] = dataclasses.field(default_factory=lambda: [0.0, 3.0])  # 0 = unconditional
    # the moving-digits learning check (training.motion_check): every digit × direction prompt drawn as clips and
    # read for direction, digit and temporal consistency; image-to-video models also from still first frames
    motion_check: bool = False
    samples_per_prompt: int = 5  # clips per digit × direction prompt (40 prompts) and guidance scale
    first_frames_per_digit: int = 2  # image-to-video: still validation digits per digit, each animated 4 ways
    num_frames: Optional[int] = None  # frames per checked clip; null: data.video.num_frames


@dataclasses.dataclass
class RunConfig:
    """A run: data, the chain of stages (``pipeline``), each stage's config, and the report."""

    run: RunSection = dataclasses.field(default_factory=RunSection)  # run name, folder, seed
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # training images (image–text shards)
    val_data: DataConfig = dataclasses.field(default_factory=DataConfig)  # validation shards (urls '' = none)
    pipeline: list[StageName] = dataclasses.field(default_factory=lambda: ["diffusion"])  # stages, in order
    autoencoder: AutoencoderStageConfig = dataclasses.field(default_factory=AutoencoderStageConfig)
    cache: CacheConfig = dataclasses.field(default_factory=CacheConfig)  # latent + text-embedding shards
    diffusion: DiffusionStageConfig = dataclasses.field(default_factory=DiffusionStageConfig)
    lora: LoraStageConfig = dataclasses.field(default_factory=LoraStageConfig)  # LoRA fine-tune of the denoiser
    dpo: DpoStageConfig = dataclasses.field(default_factory=DpoStageConfig)  # Diffusion-DPO on preference pairs
    report: ReportConfig = dataclasses.field(default_factory=ReportConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)  # sequence parallelism (denoisers)
    preview_batches: int = 4  # batches `loom data` streams and shows
    device: Optional[Literal["cpu", "cuda"]] = None  # for jobs outside the trainer (cache, report); null: auto

    def __post_init__(self) -> None:
        if self.preview_batches < 1:
            raise ValueError(f"preview_batches: {self.preview_batches} must be >= 1")
        if not self.pipeline:
            raise ValueError("pipeline: empty; list the stages to run, e.g. [autoencoder, cache, diffusion]")
        if len(set(self.pipeline)) != len(self.pipeline):
            raise ValueError(f"pipeline: {self.pipeline} names a stage twice")
        order = STAGE_ORDER
        if [order[s] for s in self.pipeline] != sorted(order[s] for s in self.pipeline):
            raise ValueError(f"pipeline: {self.pipeline} is out of order; stages run autoencoder → cache → diffusion "
                             "→ lora → dpo")
        trains_on_data = "diffusion" in self.pipeline or "lora" in self.pipeline
        if "cache" in self.pipeline and self.diffusion.latents != "cache" and trains_on_data:
            raise ValueError("pipeline: has 'cache' but diffusion.latents is not 'cache'; the cache would go unused")
        if self.parallel.sequence_parallel > 1 and {"diffusion", "lora", "dpo"} & set(self.pipeline):
            check_model_config(self.diffusion.model_config, self.parallel.sequence_parallel)
        if "cache" in self.pipeline:
            self.cache.check_clip_frames(self.data)
            if (self.cache.clip_frames is not None and "autoencoder" in self.pipeline
                    and self.autoencoder.architecture_name == "autoencoder-causal-3d"):
                raise ValueError(f"cache.clip_frames={self.cache.clip_frames}: the autoencoder stage trains "
                                 f"{self.autoencoder.architecture!r}, which compresses time; cache.clip_frames needs a "
                                 "per-frame encoder (autoencoder-kl, autoencoder-kl-temporal) - set it null")
        if "autoencoder" in self.pipeline:  # a causal video autoencoder keeps 1 + r·k frames of a clip
            from data_pipeline.worker import clip_frames

            for key, data in (("data", self.data), ("val_data", self.val_data)):
                where = "buckets.frames" if data.buckets.frames else "video.num_frames"
                self.autoencoder.check_clip_lengths(clip_frames(data), f"{key}.{where}")
        if "dpo" in self.pipeline and not self.dpo.data.source_list():
            raise ValueError("pipeline: has 'dpo' but dpo.data.urls is empty; point it at preference shards "
                             "(loom shards pairs input=pairs.jsonl output_dir=...)")
