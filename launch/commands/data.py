"""``loom data``: stream a few batches and print what the pipeline will do.

    loom data data.urls='data/demo/train-{000000..000001}.tar' preview_batches=4
    loom data --config quickstart --dry-run

Prints the loader's plan (:meth:`StreamingLoader.describe`), streams ``preview_batches`` batches with a progress
bar (per batch: shape, bucket, first keys and captions), then throughput and the skip/drop counts, and saves a
grid of the first batch as ``<run.output_dir>/<run.name>/preview.png``. The data order seed is
``run.seed + data.seed``, as in training.

It also says what the diffusion stage will do with the pixels (:func:`latent_plan`): per bucket (frames, size,
batch) the latent shape, the bytes one cached sample takes (``diffusion.latents: cache``: ``latent.npy`` holds
the posterior moments, twice the latent channels, at ``cache.dtype``) and what encoding it online costs each step
(``diffusion.latents: encode``: frames through the frozen encoder, GFLOP counted on a meta-device copy).
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path
from typing import Iterator

from data_pipeline.batch import Batch
from data_pipeline.errors import DataError
from data_pipeline.loader import StreamingLoader, build_loader
from data_pipeline.stats import format_counts
from launch.commands import Command
from training.evaluation import save_grid
from training.run_config import RunConfig


def _autoencoder_config(cfg: RunConfig):
    """The autoencoder config the denoising stages will use, and where it comes from: the exported weights' json
    (``diffusion.autoencoder_weights``) when it exists, else the autoencoder stage's ``model`` (to be trained)."""
    from training.builders import exported_autoencoder_path
    from training.stages.autoencoder import read_autoencoder_export

    weights = cfg.diffusion.autoencoder_weights
    path = exported_autoencoder_path(cfg.run.directory) if weights == "auto" else Path(weights)
    config_file = path.with_suffix(".json")
    if config_file.exists():
        return read_autoencoder_export(path)[1], str(config_file)
    return cfg.autoencoder.model_config, "autoencoder.model (not exported yet)"


def _encoder_gflop_per_frame(ae_cfg, sizes: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
    """GFLOP of one frame through the encoder at each ``(H, W)``, counted on a meta-device copy (no memory, no
    compute); {} when it cannot be counted."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models.registry import build_model

    out = {}
    try:
        with torch.device("meta"):
            ae = build_model(ae_cfg)
        for h, w in sizes:
            with FlopCounterMode(display=False) as counter:
                ae.encode(torch.zeros(1, ae_cfg.in_channels, h, w, device="meta"))
            out[(h, w)] = counter.get_total_flops() / 1e9
    except Exception:  # noqa: BLE001 - an estimate only
        return {}
    return out


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def latent_plan(cfg: RunConfig, loader: StreamingLoader) -> list[str]:
    """What ``diffusion.latents`` will do with this data, per bucket (see the module docstring)."""
    from data_pipeline.buckets import ClipBucketSet, bucket_name
    from models.autoencoder import latent_shape_for

    mode = cfg.diffusion.latents
    if not cfg.data.image_keys:
        return ["latents: the shards hold latents already (no pixel members)"]
    if mode == "pixels":
        return ["latents: none (diffusion.latents=pixels): the denoiser sees the pixels as they are"]
    buckets, res, B = loader.ctx.buckets, cfg.data.resolution, cfg.data.batch_size
    if isinstance(buckets, ClipBucketSet):  # one line per group, at its square size
        rows = [((t, r, r), buckets.batch_size(next(s for s in buckets.members[(t, r)].sizes
                                                    if buckets.group_of[s] == (t, r))))
                for t, r in buckets.groups if any(buckets.group_of[s] == (t, r) for s in buckets.members[(t, r)].sizes)]
    else:
        rows = [((res, res), B)]  # image buckets share the budget res^2: the square one stands for them all
    ae_cfg, where = _autoencoder_config(cfg)
    f, C = ae_cfg.spatial_factor, ae_cfg.latent_channels
    r = getattr(ae_cfg, "temporal_factor", 1)  # a causal 3-D autoencoder: 1 + (T-1)/r latent frames

    def latent_frames(t: int) -> int:
        return 1 + (t - 1) // r

    item = 2 if cfg.cache.dtype == "float16" else 4
    longest = max((s[0] for s, _ in rows if len(s) == 3), default=0)
    keep = cfg.cache.clip_frames if mode == "cache" else None

    def cached_frames(t: int) -> int:
        """Frames a cached clip of a training bucket of ``t`` frames holds (cache.clip_frames: the longest keep more)."""
        return max(t, keep) if keep and t > 1 and t == longest else t

    gflop = _encoder_gflop_per_frame(ae_cfg, sorted({s[-2:] for s, _ in rows}))
    time_note = ("every frame encoded on its own (T' = T)" if r == 1
                 else f"{r}x fewer frames, causally (T' = 1 + (T-1)/{r})")
    lines = [f"latents (diffusion.latents={mode}): autoencoder from {where}: {C} latent channels, {f}x smaller "
             f"per side, {time_note}"]
    for shape, n in rows:
        t = shape[0] if len(shape) == 3 else None
        frames = t or 1
        try:
            lat = latent_shape_for(C, shape[-2], shape[-1], t, f)
        except ValueError as e:
            lines.append(f"  {bucket_name(shape)}: {e}")
            continue
        if t is not None and r > 1:
            lat = (lat[0], latent_frames(t), *lat[2:])
        kept = cached_frames(frames)
        moments = (2 * C, latent_frames(kept), *lat[2:]) if t else (2 * C, *lat[1:])
        per = 2 * C * latent_frames(kept) * (shape[-2] // f) * (shape[-1] // f) * item
        cost = gflop.get(shape[-2:])
        enc = f", ~{cost * frames * n:,.0f} GFLOP" if cost is not None else ""
        what = "clip" if t and t > 1 else "image"  # a one-frame bucket holds the images of a video run
        lines.append(f"  {bucket_name(shape)} (batch {n}): latent {tuple(lat)} per {what}; cache: latent.npy "
                     f"{moments} {cfg.cache.dtype} = {_size(per)} per {what} (+ its text encoding); online: "
                     f"{frames * n} frame(s) through the encoder per step{enc}")
    total = sum(s.total or 0 for s in loader.sources)
    if mode == "cache":
        biggest = max((2 * C * latent_frames(cached_frames(s[0] if len(s) == 3 else 1)) * (s[-2] // f) * (s[-1] // f)
                       * item
                       for s, _ in rows),
                      default=0)
        disk = f", at most {_size(biggest * total)} for {total:,} samples" if total else ""
        lines.append(f"  mode cache: the cache stage encodes every sample once (one pass) into {cfg.cache.output}/"
                     f"{disk}; training then reads the moments and draws a latent per step (no encoder)")
        if keep:
            lines.append(f"  cache.clip_frames={keep}: {longest}-frame clips are cached with up to {keep} frames; "
                         f"every read cuts a {longest}-frame window (video.clip_start={cfg.data.video.clip_start})")
    else:
        lines.append("  mode encode: no cache on disk; the frozen encoder runs on every training batch (the cost "
                     "above, each step)")
    return lines


def _loader(cfg: RunConfig) -> StreamingLoader:
    return build_loader(cfg.data, rank=0, world_size=1, seed=cfg.run.seed)


def plan(cfg: RunConfig) -> str:
    """The loader's plan (resolves the shard patterns and reads the shard indexes; decodes nothing)."""
    try:
        loader = _loader(cfg)
        return "\n".join([loader.describe()] + latent_plan(cfg, loader))
    except DataError as e:
        return f"data: {e}"


def _endless(loader: StreamingLoader) -> Iterator[Batch]:
    while True:
        got = False
        for batch in loader:
            got = True
            yield batch
        if not got:
            return


def run(cfg: RunConfig) -> int:
    """Stream the preview batches; exit code 1 when the data cannot be streamed."""
    from tqdm import tqdm

    try:
        loader = _loader(cfg)
    except (DataError, ValueError) as e:
        print(f"loom data: {e}", file=sys.stderr)
        return 1
    print("\n".join([loader.describe()] + latent_plan(cfg, loader)))
    out_dir = cfg.run.directory
    out_dir.mkdir(parents=True, exist_ok=True)
    n, samples, first = cfg.preview_batches, 0, None
    lines = []
    t0 = time.perf_counter()
    try:
        with tqdm(total=n, unit="batch", desc="loom data", file=sys.stderr) as bar:
            for i, batch in enumerate(itertools.islice(_endless(loader), n)):
                if first is None:
                    first = batch
                samples += len(batch)
                shape = "none" if batch.pixels is None else "x".join(map(str, batch.pixels.shape))
                h, w = batch.target_size[0].tolist()
                caps = " | ".join(c[:60] for c in batch.captions[:2])
                bucket = f"{batch.num_frames}x{h}x{w}" if batch.pixels is not None and batch.pixels.ndim == 5 \
                    else f"{h}x{w}"
                lines.append(f"batch {i}: pixels {shape}, bucket {bucket}, keys {batch.keys[:2]}, captions: {caps}")
                bar.update(1)
    except DataError as e:
        print(f"loom data: {e}", file=sys.stderr)
        return 1
    dt = time.perf_counter() - t0
    print("\n".join(lines))
    st = loader.stats()
    print(f"streamed {samples} samples in {len(lines)} batches in {dt:.2f}s ({samples / max(dt, 1e-9):.1f} "
          f"samples/s, including worker start-up)")
    print(f"skipped: {format_counts(st['skipped'])}; dropped: {format_counts(st['dropped'])}"
          + (f"; buckets: {st['buckets']}" if st["buckets"] else ""))
    if first is not None and first.pixels is not None:
        path = out_dir / "preview.png"
        save_grid(first.pixels, path)  # clips: one row of frames per clip
        print(f"preview of the first batch: {path}")
    if first is None:
        print("loom data: no batch could be streamed", file=sys.stderr)
        return 1
    return 0


COMMAND = Command(name="data", config_cls=RunConfig, run=run, plan=plan)
