"""The ``cache`` stage: encode image–text (and video–text) shards once into latent + text-embedding shards.

Pre-training then streams these instead of running the frozen autoencoder and text encoder every step. Each cached
sample keeps its caption and json and adds, as ``.npy`` members (never pickles):

* ``latent.npy`` — the autoencoder posterior's moments, mean ‖ log-variance along channels ``(2C, h, w)`` for an
  image, ``(2C, T', h, w)`` for a clip (the per-frame and temporal-decoder autoencoders keep every frame: ``T' = T``;
  a causal 3-D one with temporal factor r: ``T' = 1 + (T-1)/r``), so the diffusion stage draws a fresh latent sample
  every time it sees the sample (as training on pixels would);
* ``context.npy`` ``(L, D)``, ``context_mask.npy`` ``(L,)`` and ``pooled.npy`` ``(P,)`` — the text encoding.

Shards go to ``<run>/cache/<prefix>-NNNNNN.tar`` with a shard index, written by the same atomic writer as
``loom shards``; every input sample is encoded exactly once (one full pass, no shuffling, centre crops, centred
clips). A video run's clips are read in their clip buckets (:class:`data_pipeline.buckets.ClipBucketSet`: each
batch one ``(T, H, W)``, an image a one-frame clip), so a cached clip keeps the frames and size it would have been
trained at; the json records the frames encoded (``clip_frames``) and, from the decoder, where the clip was
taken. The cached shards stream back like image caches: latents-only batches grouped by latent shape,
``Batch.latents`` ``(B, 2C, T, h, w)`` for clips. The alternative, ``diffusion.latents: encode``, runs the frozen
encoder on every training batch instead (no pass, no disk; the encoder's cost each step): ``loom data`` prints
both costs.

Temporal crops survive caching with ``cache.clip_frames``: a clip is then encoded with up to that many frames (its
centred window of them; a video too short for that gets the run's own clip length), and every time training reads
it the loader cuts a window of the training clip's length at ``data.video.clip_start`` — a fresh random window per
epoch, drawn from the sample's counter-based seed as a decoded clip's start is (so a resumed run cuts the same
ones; :func:`data_pipeline.video.cut_latent_window`). Without it the cache holds the centred clip only, and every
epoch trains on the same frames of each video whatever ``clip_start`` says. A window of cached latent frames is the
encoding of those frames only when the autoencoder encodes frame by frame (temporal factor 1: the image autoencoder,
the SVD temporal decoder); a causal 3-D autoencoder is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from data_pipeline.data_config import DataConfig
from data_pipeline.errors import SkipSample
from data_pipeline.loader import build_loader
from data_pipeline.sampletext import text_problem
from data_pipeline.sources import SkipLog
from data_pipeline.stats import format_counts
from data_pipeline.video import training_clip_frames
from data_pipeline.worker import clip_frames as bucket_frames
from data_pipeline.writer import ShardWriter, WriterOptions

log = logging.getLogger(__name__)

CACHE_EXTRA_KEYS = ["context.npy", "context_mask.npy", "pooled.npy"]


@dataclass
class CacheConfig:
    """Where and how latents and text embeddings are cached."""

    output: str = "cache"  # folder for the cached shards (relative paths are inside the run directory)
    batch_size: int = 64  # images encoded at once (clip buckets scale it by their token budget)
    dtype: Literal["float16", "float32"] = "float32"  # storage precision of the cached arrays
    max_samples_per_shard: int = 1000  # samples per cached tar
    # clips: frames kept per training clip (its centred window of this many; fewer when the video is shorter), from
    # which every read cuts a fresh training clip at data.video.clip_start; null: the training clip's frames (the
    # centred clip, the same every epoch). Needs an autoencoder that encodes frames one by one (temporal factor 1).
    clip_frames: Optional[int] = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: {self.batch_size} must be >= 1")
        if self.max_samples_per_shard < 1:
            raise ValueError(f"max_samples_per_shard: {self.max_samples_per_shard} must be >= 1")
        if self.clip_frames is not None and (not isinstance(self.clip_frames, int) or self.clip_frames < 1):
            raise ValueError(f"clip_frames: got {self.clip_frames!r}; expected an int >= 1 (or null)")

    def check_clip_frames(self, data: DataConfig, where: str = "cache.clip_frames") -> None:
        """Raise a ValueError naming ``where`` unless ``clip_frames`` (when set) suits ``data``: a video run whose
        training clips are no longer than it."""
        if self.clip_frames is None:
            return
        if not bucket_frames(data):
            raise ValueError(f"{where}={self.clip_frames}: the data reads no clips (image_keys "
                             f"{list(data.image_keys)}); remove it")
        need = training_clip_frames(data)
        if self.clip_frames < need:
            raise ValueError(f"{where}={self.clip_frames}: fewer than the {need} frames of a training clip "
                             "(data.video.num_frames / data.buckets.frames); give at least that many, or null")


def npy(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a ``.npy`` member."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def posterior_moments(autoencoder: nn.Module, pixels: Tensor) -> np.ndarray:
    """The autoencoder's posterior of ``pixels`` as stored in a cache: mean ‖ log-variance, ``(B, 2C, h, w)`` for
    images ``(B, C, H, W)``, ``(B, 2C, T, h, w)`` for clips ``(B, C, T, H, W)``."""
    posterior = autoencoder.encode(pixels.to(next(autoencoder.parameters()).dtype))
    return torch.cat([posterior.mean, posterior.logvar], dim=1).float().cpu().numpy()


def cache_data_config(cache_dir: Path, prefix: str, base: DataConfig,
                      extra_keys: Sequence[str] = CACHE_EXTRA_KEYS) -> DataConfig:
    """The data config that streams cached shards ``prefix`` (latents + ``extra_keys`` arrays, no images)."""
    return dataclasses.replace(
        base, urls=str(cache_dir / f"{prefix}-*.tar"), sources=[], image_keys=[], latent_key="latent.npy",
        extra_keys=list(extra_keys), buckets=dataclasses.replace(base.buckets, enabled=False),
    )


# what of a DataConfig decides which samples a cache holds and how their pixels look (loader settings do not)
_DATA_SIGNATURE_KEYS = ("urls", "sources", "caption_keys", "image_keys", "require_caption", "latent_key",
                        "extra_keys", "resolution", "jpeg_draft", "buckets", "video", "min_motion_score")


def data_signature(data: DataConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(data).items() if k in _DATA_SIGNATURE_KEYS}


def file_identity(path: Path) -> list:
    """Path and SHA-256 of the content: a retrained autoencoder differs, the same weights exported again do not."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return [str(path), digest.hexdigest()]


def reuse_or_build(out_dir: Path, prefix: str, signature: dict[str, Any], build: Callable[[], Any]) -> bool:
    """Build the cached shards ``out_dir/<prefix>-*`` with ``build()`` unless a complete set made from the same
    ``signature`` (what went into it: data, encoders, settings) is already there; True when it built. Re-running or
    resuming a pipeline then does not encode its data set again. The signature is stored beside the shards once they
    are complete, and removed before a rebuild starts, so an interrupted build is never reused."""
    stamp, index = out_dir / f"{prefix}.cache.json", out_dir / f"{prefix}.shardindex.json"
    signature = json.loads(json.dumps(signature, default=str))  # as it reads back from the stamp
    if index.exists() and stamp.exists() and json.loads(stamp.read_text()) == signature:
        log.info("reusing the cached %r shards in %s (same data, encoders and settings)", prefix, out_dir)
        return False
    stamp.unlink(missing_ok=True)
    build()
    stamp.write_text(json.dumps(signature, indent=1))
    return True


@torch.no_grad()
def cache_shards(
    data: DataConfig,
    prefix: str,
    out_dir: Path,
    autoencoder: nn.Module,
    text_encoder: nn.Module,
    cfg: CacheConfig,
    device: torch.device,
    progress: bool = True,
) -> int:
    """Encode every sample of ``data`` into ``out_dir/<prefix>-*.tar``; returns the number of samples written.

    With ``cfg.clip_frames``, clips are encoded with up to that many frames (a clip bucket of that length beside the
    run's own, so a shorter video still gives a clip of the run's length) for training to cut windows from; the
    autoencoder must encode frames one by one (temporal factor 1), so a window of the cached latent equals the
    encoding of that window of frames."""
    cfg.check_clip_frames(data)
    video = dataclasses.replace(data.video, clip_start="center")  # the clip a validation pass would take
    buckets = data.buckets
    if cfg.clip_frames is not None:
        factor = int(getattr(autoencoder, "temporal_factor", 1))
        if factor != 1:
            raise ValueError(
                f"cache.clip_frames={cfg.clip_frames}: the autoencoder ({type(autoencoder).__name__}) compresses "
                f"time {factor}x, so a window of its latent frames is not the encoding of those frames; "
                "cache.clip_frames needs a per-frame encoder (autoencoder-kl, autoencoder-kl-temporal) - set it null")
        frames = sorted(set(bucket_frames(data)) | {cfg.clip_frames}, reverse=True)
        video = dataclasses.replace(video, num_frames=max(frames))
        buckets = dataclasses.replace(buckets, frames=frames)
    one_pass = dataclasses.replace(
        data, batch_size=cfg.batch_size, shuffle_buffer=0, shard_shuffle=False, resampled=False, epoch_samples=None,
        crop="center", flip=False, full_pass=True, video=video, buckets=buckets,
    )
    loader = build_loader(one_pass, rank=0, world_size=1)
    np_dtype = np.float16 if cfg.dtype == "float16" else np.float32
    written = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"cache {prefix}", unit="sample", dynamic_ncols=True)
    skips = SkipLog()  # samples the cache could not write (and, at the end, what the loader skipped)
    with ShardWriter(out_dir, prefix, WriterOptions(cfg.max_samples_per_shard, overwrite=True), skips) as writer:
        for batch in loader:
            pixels = batch.to(device).pixels  # uint8 moved, float [-1, 1] made on the device
            moments = posterior_moments(autoencoder, pixels)  # (B, 2C, h, w) or (B, 2C, T, h, w)
            cond = text_encoder.encode(list(batch.captions))
            context = cond.context.float().cpu().numpy()  # (B, L, D)
            mask = cond.context_mask.cpu().numpy().astype(np.uint8)  # (B, L)
            pooled = cond.pooled.float().cpu().numpy() if cond.pooled is not None else None  # (B, P)
            for i in range(len(batch)):
                caption = batch.captions[i]
                if text_problem(caption):  # the loader skips these as bad_caption; a guard, never a crash
                    _skip_cached(skips, "bad_caption", batch, i, f"caption {text_problem(caption)}")
                    continue
                members = {
                    "latent.npy": npy(moments[i].astype(np_dtype)),
                    "context.npy": npy(context[i].astype(np_dtype)),
                    "context_mask.npy": npy(mask[i]),
                    "txt": caption.encode("utf-8"),
                }
                if pooled is not None:
                    members["pooled.npy"] = npy(pooled[i].astype(np_dtype))
                meta = dict(batch.metadata[i])
                meta.update(source_key=batch.keys[i], original_size=batch.original_size[i].tolist(),
                            crop_top_left=batch.crop_top_left[i].tolist(), target_size=batch.target_size[i].tolist())
                if pixels.ndim == 5:  # a clip (an image in a video run: one frame)
                    meta["clip_frames"] = batch.num_frames
                try:
                    writer.write_members(members, meta)
                except SkipSample as e:  # json that cannot be written: counted, nothing of it in the tar
                    _skip_cached(skips, e.reason, batch, i, e.detail)
                    continue
                written += 1
            if bar is not None:
                bar.update(len(batch))
        stats = loader.stats()
        skips.add_counts(stats.get("skipped", {}))  # the cache's index records what reading its input skipped
    if bar is not None:
        bar.close()
    log.info("cached %d samples of %r into %s (skipped: %s)", written, prefix, out_dir,
             format_counts(dict(skips.counts)))
    return written


def _skip_cached(skips: SkipLog, reason: str, batch: Any, i: int, detail: str) -> None:
    """Count one sample the cache cannot write, and say which (source and key) and why."""
    source = batch.sources[i] if i < len(batch.sources) else "?"
    where = f"sample {batch.keys[i]!r} of source {source!r}"
    skips.add(reason, where)
    log.warning("cache: skipped %s: %s (%s)", where, reason, detail)


def in_run_dir(run_dir: Path, path: str) -> Path:
    """``path``, relative paths taken inside the run directory."""
    p = Path(path)
    return p if p.is_absolute() else run_dir / p


def cache_dir(run_dir: Path, cfg: CacheConfig) -> Path:
    return in_run_dir(run_dir, cfg.output)


__all__ = ["CacheConfig", "cache_shards", "cache_data_config", "cache_dir", "data_signature", "file_identity",
           "in_run_dir", "npy", "posterior_moments", "reuse_or_build", "CACHE_EXTRA_KEYS"]
