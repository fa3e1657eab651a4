"""The streaming loader's configuration: :class:`DataConfig`, with nested :class:`SourceConfig`, :class:`BucketConfig`.

Plain dataclasses, filled from YAML by ``training.config_io``; every field has a one-line comment, and
``__post_init__`` rejects bad values with a ``ValueError`` that names the field, the value and what is allowed.
``DataConfig()`` with no arguments is valid (no data configured yet); :func:`data_pipeline.loader.build_loader`
then asks for ``urls`` or ``sources``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from data_pipeline.decoders import DECODERS, member_decoder
from data_pipeline.video import MAX_FRAMES, MAX_PIXELS

CROPS = ("center", "random")
CLIP_STARTS = ("random", "center")
SHORT_CLIPS = ("skip", "pad")


def _need(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}: got {value!r}; allowed: {allowed}")


@dataclass
class SourceConfig:
    """One shard set to stream from; several sources are mixed per sample by ``weight``."""

    urls: str = ""  # shard pattern: path, dir, brace (a-{000..009}.tar), glob, 'pipe:cmd', several joined by '::'
    weight: float = 1.0  # relative share of samples drawn from this source when mixing (> 0)
    name: str = ""  # label in logs, stats and errors ('' = derived from urls)
    index: str = ""  # explicit .shardindex.json for these shards ('' = look beside local tars)

    def __post_init__(self) -> None:
        _need(isinstance(self.urls, str), "urls", self.urls, "a string pattern")
        _need(isinstance(self.weight, (int, float)) and self.weight > 0, "weight", self.weight, "a number > 0")
        self.weight = float(self.weight)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        head = self.urls.split("::")[0]
        return head if len(head) <= 60 else "..." + head[-57:]


@dataclass
class BucketConfig:
    """Multi-aspect buckets (SDXL, Podell et al. 2023, sec. 2.3; NovelAI's aspect-ratio bucketing)."""

    enabled: bool = False  # group samples into fixed-size aspect buckets; every batch comes from one bucket
    step: int = 64  # bucket sides are multiples of this many pixels
    max_aspect: float = 2.0  # widest bucket ratio (long side / short side, >= 1); wider images are cropped
    merge_leftovers: bool = True  # at a pass/epoch end pack half-full buckets into full batches of the nearest bucket
    # clip buckets (Open-Sora's bucket config; data_pipeline.buckets.ClipBucketSet), used in video runs only:
    frames: list[int] = field(default_factory=list)  # clip lengths ([] = [video.num_frames]); set = a video run
    resolutions: list[int] = field(default_factory=list)  # spatial budgets (sides) of clip buckets ([] = [resolution])
    token_budget: Optional[int] = None  # T*H*W per batch: batch = budget // (T*r^2); None = batch_size*max T*max r^2
    max_batch_size: Optional[int] = None  # cap on a clip bucket's batch size (None = no cap)
    min_fill: float = 0.8  # a clip uses budget r only if its h*w >= min_fill * r^2 (else a smaller r)
    same_bucket_across_ranks: bool = False  # every rank's step draws the same clip bucket (sequence parallelism)

    def __post_init__(self) -> None:
        _need(isinstance(self.step, int) and self.step >= 8 and self.step % 8 == 0, "step", self.step,
              "an int >= 8, multiple of 8")
        _need(isinstance(self.max_aspect, (int, float)) and self.max_aspect >= 1.0, "max_aspect", self.max_aspect,
              "a number >= 1.0")
        self.max_aspect = float(self.max_aspect)
        for name in ("frames", "resolutions"):
            v = getattr(self, name)
            _need(isinstance(v, list) and all(isinstance(x, int) and x >= 1 for x in v), f"buckets.{name}", v,
                  "a list of ints >= 1")
        _need(all(r >= 8 for r in self.resolutions), "buckets.resolutions", self.resolutions, "sides >= 8")
        for name in ("token_budget", "max_batch_size"):
            v = getattr(self, name)
            _need(v is None or (isinstance(v, int) and v >= 1), f"buckets.{name}", v, "null or an int >= 1")
        _need(isinstance(self.min_fill, (int, float)) and 0 < self.min_fill <= 1, "buckets.min_fill", self.min_fill,
              "a number in (0, 1]")
        self.min_fill = float(self.min_fill)


@dataclass
class VideoConfig:
    """How clips are sampled from video members (:mod:`data_pipeline.video`); images ignore it."""

    num_frames: int = 16  # frames per clip (buckets may pick fewer for short videos)
    frame_stride: int = 1  # source frames from one sampled frame to the next (when fps is null)
    fps: Optional[float] = None  # sample at this rate by timestamps instead of by stride (null = use frame_stride)
    clip_start: Literal["random", "center"] = "random"  # random: from the sample's seeded draw (resumable); center
    short_clips: Literal["skip", "pad"] = "skip"  # a video too short for the clip: skip it, or repeat its last frame
    max_frames: int = MAX_FRAMES  # refuse videos whose header claims more frames (absurd metadata)
    max_pixels: int = MAX_PIXELS  # refuse videos with larger frames (h * w), before decoding any frame

    def __post_init__(self) -> None:
        _need(isinstance(self.num_frames, int) and self.num_frames >= 1, "video.num_frames", self.num_frames,
              "an int >= 1")
        _need(isinstance(self.frame_stride, int) and self.frame_stride >= 1, "video.frame_stride",
              self.frame_stride, "an int >= 1")
        _need(self.fps is None or (isinstance(self.fps, (int, float)) and 0 < self.fps < float("inf")),
              "video.fps", self.fps, "null or a number > 0")
        if self.fps is not None:
            self.fps = float(self.fps)
        _need(self.clip_start in CLIP_STARTS, "video.clip_start", self.clip_start, ", ".join(CLIP_STARTS))
        _need(self.short_clips in SHORT_CLIPS, "video.short_clips", self.short_clips, ", ".join(SHORT_CLIPS))
        _need(isinstance(self.max_frames, int) and self.max_frames >= 1, "video.max_frames", self.max_frames,
              "an int >= 1")
        _need(isinstance(self.max_pixels, int) and self.max_pixels >= 1, "video.max_pixels", self.max_pixels,
              "an int >= 1")


@dataclass
class DataConfig:
    """How the streaming WebDataset loader reads, splits, shuffles, decodes and batches image-text pairs."""

    urls: str = ""  # shorthand for a single source (same pattern syntax as SourceConfig.urls)
    sources: list[SourceConfig] = field(default_factory=list)  # weighted sources (use this or urls, not both)
    caption_keys: list[str] = field(default_factory=lambda: ["txt", "caption", "json:caption"])  # first non-empty wins
    # image_keys: pixel member priority; each extension needs a data_pipeline.decoders entry ([] = no pixels)
    image_keys: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])  # pixel member priority
    require_caption: bool = True  # skip samples without a caption (else caption '')
    latent_key: str = "latent.npy"  # member read into Batch.latents when every sample of a batch has it ('' = off)
    extra_keys: list[str] = field(default_factory=list)  # .npy/.safetensors members read into Batch.extras[name]
    resolution: int = 256  # output side (square), and the pixel budget resolution**2 of buckets
    crop: Literal["center", "random"] = "center"  # where to crop after resizing to cover the target
    flip: bool = False  # random horizontal flip with probability 0.5
    jpeg_draft: bool = True  # let PIL decode JPEGs at a reduced DCT scale that still covers the target
    batch_size: int = 32  # samples per batch on each rank
    num_workers: int = 2  # DataLoader worker processes (0 = read in the main process)
    prefetch_factor: int = 2  # batches each worker prepares ahead
    pin_memory: Optional[bool] = None  # pin batches in page-locked memory (fast, asynchronous GPU copies); null:
    # whenever CUDA is available
    shuffle_buffer: int = 1000  # samples held per worker for shuffling (0 or 1 = no sample shuffle)
    shard_shuffle: bool = True  # shuffle the shard order every epoch from (seed, epoch)
    resampled: bool = False  # endless mode: draw shards with replacement (seeded); needs epoch_samples
    epoch_samples: Optional[int] = None  # nominal samples per epoch over all ranks (None = from the shard index)
    seed: int = 0  # data order seed, added to the run's seed (shard order, shuffle buffer, mixing, crops, flips)
    full_pass: bool = False  # each epoch reads every sample once, source after source, last batch partial (cache/val)
    drop_last: bool = False  # when an epoch runs until the shards end: drop each worker's final partial batch
    buckets: BucketConfig = field(default_factory=BucketConfig)  # multi-aspect bucketing
    video: VideoConfig = field(default_factory=VideoConfig)  # clip sampling of video members (mp4, webm, ...)
    max_warnings: int = 5  # logged warnings per skip reason and worker before only counting
    max_consecutive_bad: int = 10000  # this many unusable samples in a row is an error, not a skip
    min_motion_score: Optional[float] = None  # skip samples whose json motion_score is below (low_motion); none: pass

    def __post_init__(self) -> None:
        _need(isinstance(self.urls, str), "urls", self.urls, "a string pattern")
        srcs = []
        for i, s in enumerate(self.sources):
            if isinstance(s, dict):
                s = SourceConfig(**s)
            _need(isinstance(s, SourceConfig) and bool(s.urls), f"sources[{i}]", s, "a SourceConfig with urls")
            srcs.append(s)
        self.sources = srcs
        if self.urls and self.sources:
            raise ValueError(f"urls: got {self.urls!r} together with {len(self.sources)} sources; "
                             "allowed: either urls (one source) or sources, not both")
        for name in ("caption_keys", "image_keys", "extra_keys"):
            v = getattr(self, name)
            _need(isinstance(v, list) and all(isinstance(k, str) and k for k in v), name, v,
                  "a list of non-empty strings")
        for k in self.image_keys:
            try:
                member_decoder(k)
            except ValueError:
                _need(False, "image_keys", k, f"a member extension with a decoder ({', '.join(sorted(DECODERS))})")
        _need(bool(self.caption_keys) or not self.require_caption, "caption_keys", self.caption_keys,
              "at least one key while require_caption is true")
        for k in self.caption_keys:
            _need(not k.startswith("json:") or len(k) > 5, "caption_keys", k, "'ext' or 'json:field'")
        _need(isinstance(self.resolution, int) and self.resolution >= 8, "resolution", self.resolution, "an int >= 8")
        _need(self.crop in CROPS, "crop", self.crop, ", ".join(CROPS))
        _need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", self.batch_size, "an int >= 1")
        _need(isinstance(self.num_workers, int) and self.num_workers >= 0, "num_workers", self.num_workers,
              "an int >= 0")
        _need(isinstance(self.prefetch_factor, int) and self.prefetch_factor >= 1, "prefetch_factor",
              self.prefetch_factor, "an int >= 1")
        _need(isinstance(self.shuffle_buffer, int) and self.shuffle_buffer >= 0, "shuffle_buffer",
              self.shuffle_buffer, "an int >= 0")
        _need(self.epoch_samples is None or (isinstance(self.epoch_samples, int) and self.epoch_samples >= 1),
              "epoch_samples", self.epoch_samples, "null or an int >= 1")
        _need(not self.resampled or self.epoch_samples is not None, "epoch_samples", self.epoch_samples,
              "an int >= 1 when resampled is true (endless streams need a nominal epoch length)")
        _need(not (self.full_pass and self.resampled), "full_pass", self.full_pass,
              "false when resampled is true (an endless stream has no full pass)")
        _need(isinstance(self.seed, int), "seed", self.seed, "an int")
        _need(isinstance(self.max_warnings, int) and self.max_warnings >= 0, "max_warnings", self.max_warnings,
              "an int >= 0")
        _need(isinstance(self.max_consecutive_bad, int) and self.max_consecutive_bad >= 1, "max_consecutive_bad",
              self.max_consecutive_bad, "an int >= 1")
        _need(self.min_motion_score is None or isinstance(self.min_motion_score, (int, float)), "min_motion_score",
              self.min_motion_score, "null or a number (mean optical-flow magnitude, pixels per frame)")
        if isinstance(self.buckets, dict):
            self.buckets = BucketConfig(**self.buckets)
        _need(isinstance(self.buckets, BucketConfig), "buckets", self.buckets, "a BucketConfig")
        if isinstance(self.video, dict):
            self.video = VideoConfig(**self.video)
        _need(isinstance(self.video, VideoConfig), "video", self.video, "a VideoConfig")
        if self.buckets.enabled:
            _need(bool(self.image_keys), "buckets", "enabled", "buckets only with image_keys (they bucket pixels)")
            _need(self.buckets.step <= self.resolution, "buckets", f"step={self.buckets.step}",
                  f"a step <= resolution ({self.resolution})")

    def source_list(self) -> list[SourceConfig]:
        """The configured sources (``urls`` becomes one source of weight 1)."""
        if self.sources:
            return list(self.sources)
        return [SourceConfig(urls=self.urls)] if self.urls else []

    def replace(self, **changes) -> "DataConfig":
        return dataclasses.replace(self, **changes)
