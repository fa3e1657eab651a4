"""One logical worker's pipeline: source streams → mixing → shuffle buffer → (buckets) → decode → Batch.

Everything between the tar and the batch holds *undecoded* samples (:class:`~data_pipeline.stream.Raw`), and all
randomness is counter based, so the pipeline's whole state is small (:meth:`WorkerPipeline.snapshot`):

* per source stream: pass, cycle, position in the share, open shard and offset, counters (see ``stream.py``);
* mixing and shuffle draw counters, the drain flag;
* REFERENCES ``(source, shard url, index in shard, visit, repeat)`` to the samples sitting in the shuffle buffer, the
  bucket queues (keyed by bucket shape, ``[h, w]``) and the packed-but-not-yet-emitted batches, never their bytes;
* the worker's counters (samples, skips by reason, drops, buckets).

:meth:`WorkerPipeline.restore` re-reads only the referenced samples (opening each of their shards once and
stopping after the last one needed) and reopens each stream's current shard, skipping ``offset`` samples
without decoding. Decoding is a pure function of the reference (augmentation draws are hashed from
``(seed, url, index, visit)``), so a sample decoded after a resume is bit-identical to the uninterrupted run.

Each pixel member is decoded by its entry in :mod:`data_pipeline.decoders`, once: when a bucket batch loses a
sample that will not decode, the others go back to the front of their queue with their decoded pixels kept
(in memory only; a resumed worker decodes them again, to the same values).

**Video runs** (:func:`clip_frames` non-empty): the buckets are a :class:`~data_pipeline.buckets.ClipBucketSet`
(always, square ``r x r`` ones when ``buckets.enabled`` is off), so every batch holds one ``(T, H, W)`` shape and
the queue's group sets its batch size. An image is decoded at the bucket's ``(H, W)`` and becomes a one-frame
clip ``(1, H, W, 3)``, so image and video sources mix (``data.sources`` weights) into ``(B, C, 1, H, W)`` and
``(B, C, T, H, W)`` batches (joint training, Imagen Video). With ``same_bucket_across_ranks`` the queue to serve
next is not the first one full but the scheduled bucket (see :mod:`data_pipeline.buckets`); nothing is packed.

Epoch modes (chosen by the main process, :mod:`data_pipeline.loader`):

``aligned``  one source, sample counts known, no ``epoch_samples``: epoch ``e`` is pass ``e``; the shuffle buffer
             drains at the end of the share; bucket leftovers are packed then; if the rank still needs batches
             its share is read again (wrap-around, counted as ``repeated``); at the next epoch whatever is
             left of the pass is dropped (``dropped.epoch_remainder``) so every epoch starts clean.
``nominal``  resampled, mixed sources, or ``epoch_samples`` set: endless streams (non-resampled sources step
             through passes by themselves), epochs are a batch count; buffers carry over epoch boundaries, where
             bucket leftovers are packed.
``exhaust``  ``full_pass``, or one source whose counts are unknown and no ``epoch_samples`` (then single rank
             only): the sources are read one after the other, each sample once; the epoch ends when the share is
             read, with a last partial batch unless ``drop_last``.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass
from typing import Optional

from data_pipeline.batch import Batch, collate
from data_pipeline.buckets import (
    BucketSet,
    ClipBucketSet,
    Shape,
    bucket_name,
    log_aspect,
    make_buckets,
    pack_clip_leftovers,
    pack_leftovers,
)
from data_pipeline.data_config import DataConfig
from data_pipeline.decoders import DecodeRequest, member_decoder
from data_pipeline.errors import DataError
from data_pipeline.shardlists import T_AUG, T_MIX, T_SHUFFLE, ResolvedSource, mix64, url_id
from data_pipeline.stats import Counters, format_counts
from data_pipeline.stream import PASS_END, Raw, SourceStream, _error_text, read_samples
from data_pipeline.transforms import array_name, load_array
from data_pipeline.video import clip_lengths, cut_latent_window, latent_window

MODES = ("aligned", "nominal", "exhaust")
SCHEDULE_PATIENCE = 32  # same_bucket_across_ranks: queued samples, in largest batches, before a bucket is starved


def clip_frames(cfg: DataConfig) -> list[int]:
    """Frame counts of a video run's clip buckets; ``[]`` for an image run (today's behaviour, bit for bit).

    A run reads clips when ``buckets.frames`` is set, or when one of ``image_keys`` is decoded by a decoder whose
    kind is not ``image`` (a clip member: mp4, webm...); without ``buckets.frames`` its clips have
    ``video.num_frames`` frames (16 without a ``video`` section). Latents-only configs (``image_keys: []``) are
    never a video run here: their batches are keyed by the latent shape."""
    if not cfg.image_keys:
        return []
    if cfg.buckets.frames or any(member_decoder(k).kind != "image" for k in cfg.image_keys):
        return clip_lengths(cfg)
    return []


def bucket_set(cfg: DataConfig) -> Optional[BucketSet]:
    """The buckets of a loader: None (plain batches), today's image aspect buckets, or clip buckets (video run)."""
    frames = clip_frames(cfg)
    b = cfg.buckets
    if frames:
        resolutions = list(b.resolutions) or [cfg.resolution]
        budget = b.token_budget or cfg.batch_size * max(frames) * max(resolutions) ** 2
        return ClipBucketSet(frames, resolutions, b.step, b.max_aspect, b.enabled, budget, b.max_batch_size,
                             b.min_fill)
    if b.enabled:
        return BucketSet(make_buckets(cfg.resolution, b.step, b.max_aspect))
    return None


def scheduled_buckets(cfg: DataConfig, buckets: Optional[BucketSet], mode: str) -> bool:
    """Whether batches follow the shared bucket schedule (``same_bucket_across_ranks``, clip buckets, and an
    epoch of a known batch count: in ``exhaust`` mode ranks do not run in lockstep anyway)."""
    return cfg.buckets.same_bucket_across_ranks and isinstance(buckets, ClipBucketSet) and mode != "exhaust"


@dataclass(frozen=True)
class Context:
    """What every worker of one rank shares (picklable; built once by the loader)."""

    cfg: DataConfig
    sources: tuple[ResolvedSource, ...]
    seed: int
    rank: int
    world_size: int
    workers: int  # logical workers of this rank (max(1, num_workers))
    mode: str
    buckets: Optional[BucketSet]
    float_pixels: bool = False  # batches carry float32 pixels made in the worker (the former path; benchmarks)

    def slot(self, worker: int) -> int:
        return self.rank + self.world_size * worker

    @property
    def n_slots(self) -> int:
        return self.world_size * self.workers


class WorkerPipeline:
    """The resumable sample pipeline of one logical worker (see the module docstring)."""

    def __init__(self, ctx: Context, worker: int):
        self.ctx, self.cfg, self.worker = ctx, ctx.cfg, worker
        self.slot = ctx.slot(worker)
        multi = ctx.n_slots > 1
        self.where = f" (rank {ctx.rank} worker {worker})" if multi else ""
        self.counters = Counters(self.cfg.max_warnings, f"[rank {ctx.rank} worker {worker}] " if multi else "")
        endless = ctx.mode == "nominal"
        self.streams = [SourceStream(self.cfg, s, i, ctx.seed, self.slot, ctx.n_slots, self.counters, endless,
                                     self.where) for i, s in enumerate(ctx.sources)]
        weights = [s.weight for s in ctx.sources]
        self._cum = [sum(weights[: i + 1]) / sum(weights) for i in range(len(weights))]
        self.epoch: Optional[int] = None
        self.finished = False  # exhaust mode: share read and leftovers emitted
        self.mix_draws = 0
        self.seq = 0  # exhaust mode: the source being read
        self.buf: list[Raw] = []
        self.buf_draws = 0
        self.draining = False
        self.queues: dict[Shape, list[Raw]] = {}  # bucket shape (or latent shape) -> undecoded samples
        self.ready: list[tuple[Shape, list[Raw]]] = []  # packed leftovers: (bucket shape, samples)
        self.kept: dict[Raw, tuple[Shape, tuple]] = {}  # re-queued samples of a failed batch: (target, decoded)
        self.bad_run = 0
        self.scheduled = scheduled_buckets(self.cfg, ctx.buckets, ctx.mode)
        self.sched_draws = 0  # batches formed under the shared bucket schedule (the draw of the next one)

    # ------------------------------------------------------------------------------------------------ epochs

    def begin_epoch(self, epoch: int) -> None:
        """Prepare for loader epoch ``epoch`` (no-op when resuming inside it)."""
        if self.epoch == epoch:
            return
        fresh = self.epoch is None
        if self.ctx.mode == "nominal":
            if not fresh and self.ctx.buckets is not None and not self.scheduled:
                self._pack()
        else:
            if not fresh:
                left = len(self.buf) + sum(map(len, self.queues.values())) + sum(len(r) for _, r in self.ready)
                left += sum(s.remaining_known() for s in self.streams if s.cycle == 0)
                self.counters.drop("epoch_remainder", left)
            self.buf, self.queues, self.ready, self.kept = [], {}, [], {}
            self.draining = self.finished = False
            self.seq = 0
            for s in self.streams:
                s.begin_pass(epoch)
        self.epoch = epoch

    # --------------------------------------------------------------------------------------------- sampling

    def _pull_upstream(self):
        if self.ctx.mode == "exhaust":  # one pass: the sources one after the other
            while True:
                raw = self.streams[self.seq].pull()
                if raw is not PASS_END or self.seq + 1 == len(self.streams):
                    return raw
                self.seq += 1
        if len(self.streams) == 1:
            return self.streams[0].pull()
        u = mix64(self.ctx.seed, T_MIX, self.slot, self.mix_draws) / 2.0**64
        self.mix_draws += 1
        return self.streams[min(bisect.bisect_right(self._cum, u), len(self.streams) - 1)].pull()

    def _pull_shuffled(self):
        """Next sample through the shuffle buffer; :data:`PASS_END` once the buffer has drained at a pass end."""
        size = self.cfg.shuffle_buffer
        if size <= 1:
            return self._pull_upstream()
        if not self.draining:
            while len(self.buf) < size:
                raw = self._pull_upstream()
                if raw is PASS_END:
                    self.draining = True
                    break
                self.buf.append(raw)
        if not self.buf:
            self.draining = False
            return PASS_END
        j = mix64(self.ctx.seed, T_SHUFFLE, self.slot, self.buf_draws) % len(self.buf)
        self.buf_draws += 1
        raw = self.buf[j]
        self.buf[j] = self.buf[-1]
        self.buf.pop()
        return raw

    # -------------------------------------------------------------------------------------------- decoding

    def _decode(self, raw: Raw, target: Shape):
        """``(Decoded or None, {ext: array})``, or None after counting the sample as skipped."""
        cfg = self.cfg
        kept = self.kept.pop(raw, None)
        if kept is not None and kept[0] == target:  # decoded already, for a batch another sample spoiled
            self.bad_run = 0
            return kept[1]
        dec = None
        if raw.pixel_bytes is not None:
            rand = 0
            if cfg.flip or cfg.crop == "random" or len(target) == 3:  # clips: the draw also places the clip start
                rand = mix64(self.ctx.seed, T_AUG, url_id(raw.url), raw.index, raw.visit)
            decoder = member_decoder(raw.pixel_member)  # type: ignore[arg-type]
            one_frame = len(target) == 3 and raw.shape is not None and len(raw.shape) == 2  # image in a video run
            want = target[1:] if one_frame else target
            try:
                dec = decoder.decode(raw.pixel_bytes, DecodeRequest(want, cfg.crop, cfg.flip, rand, cfg.jpeg_draft,
                                                                    video=cfg.video))
            except Exception as e:  # noqa: BLE001 - truncated / damaged pixel data
                # a decoder may name the reason itself (an exception with a str ``reason``: short_clip, too_large...)
                reason = getattr(e, "reason", None)
                return self._bad(reason if isinstance(reason, str) and reason else f"corrupt_{decoder.kind}", raw,
                                 _error_text(e))
            if one_frame:  # (H, W, 3) -> (1, H, W, 3): a one-frame clip
                dec = dataclasses.replace(dec, pixels=dec.pixels[None])
        arrays = {}
        for ext, data in raw.arrays.items():
            try:
                arrays[ext] = load_array(data, ext)
            except Exception as e:  # noqa: BLE001
                return self._bad("bad_array", raw, f"{ext}: {str(e)[:100]}")
        latent = arrays.get(cfg.latent_key) if cfg.latent_key and raw.pixel_bytes is None else None
        window = latent_window(cfg, latent.shape) if latent is not None else None
        if window is not None:  # a cached clip with more frames than a training clip: a fresh window each visit
            rand = mix64(self.ctx.seed, T_AUG, url_id(raw.url), raw.index, raw.visit)
            arrays[cfg.latent_key], start = cut_latent_window(latent, window, cfg.video.clip_start, rand)
            raw.meta = {**raw.meta, "latent_window_start": start, "clip_frames": window}
        self.bad_run = 0
        return dec, arrays

    def _bad(self, reason: str, raw: Raw, detail: str) -> None:
        if not raw.repeat:
            self.counters.skip(reason, raw.url, raw.key, detail)
        self.bad_run += 1
        if self.bad_run >= self.cfg.max_consecutive_bad:
            raise DataError(f"{self.bad_run} samples in a row could not be decoded{self.where}; skipped so far: "
                            f"{format_counts(dict(self.counters.skipped))}")
        return None

    def _collate(self, items: list[tuple[Raw, tuple]]) -> Batch:
        cfg = self.cfg
        decoded = [d for _, (d, _) in items]
        latents = [a.get(cfg.latent_key) for _, (_, a) in items] if cfg.latent_key else []
        extras = {array_name(ext): [a.get(ext) for _, (_, a) in items] for ext in cfg.extra_keys}
        batch = collate(decoded, [r.caption for r, _ in items], [r.key for r, _ in items],
                        [r.meta for r, _ in items], [self.ctx.sources[r.src].name for r, _ in items],
                        latents, extras, float_pixels=self.ctx.float_pixels)
        self.counters.samples += len(items)
        self.counters.batches += 1
        return batch

    # --------------------------------------------------------------------------------------------- batching

    def next_batch(self) -> Optional[Batch]:
        """The next batch, or None when this worker's stream is over (exhaust mode only)."""
        if self.epoch is None:
            raise RuntimeError("begin_epoch() first")
        if self.ctx.buckets is not None or not self.cfg.image_keys:
            return self._next_keyed()
        return self._next_plain()

    def _pass_end(self) -> bool:
        """At the end of the share: wrap around (aligned; True = keep going) or finish (exhaust; False)."""
        if self.ctx.mode == "aligned":
            self.streams[0].next_cycle()
            return True
        self.finished = True
        return False

    def _next_plain(self) -> Optional[Batch]:
        if self.finished:
            return None
        res = self.cfg.resolution
        items: list[tuple[Raw, tuple]] = []
        while len(items) < self.cfg.batch_size:
            raw = self._pull_shuffled()
            if raw is PASS_END:
                if self._pass_end():
                    continue
                if items and not self.cfg.drop_last:
                    return self._collate(items)
                self.counters.drop("last_partial", len(items))
                return None
            clip = raw.shape is not None and len(raw.shape) == 3  # a video member: (num_frames, res, res)
            d = self._decode(raw, (self.cfg.video.num_frames, res, res) if clip else (res, res))
            if d is not None:
                items.append((raw, d))
        return self._collate(items)

    def _log_ar(self, raw: Raw) -> float:
        return log_aspect(raw.shape)  # type: ignore[arg-type]

    def _key(self, raw: Raw):
        """The queue a sample waits in: its bucket's shape (pixels), or its latent shape (latents-only shards)."""
        if self.ctx.buckets is not None:
            return self.ctx.buckets.assign(raw.shape)  # type: ignore[arg-type]
        return raw.shape

    def _form(self, key, raws: list[Raw], partial: bool = False) -> Optional[Batch]:
        """Decode ``raws`` for queue ``key``; a batch if all decode (or ``partial``), else re-queue the survivors,
        keeping what they decoded to (so a sample is decoded once)."""
        target = key if self.ctx.buckets is not None else (0, 0)
        items = []
        for raw in raws:
            d = self._decode(raw, target)
            if d is not None:
                items.append((raw, d))
        if items and (partial or len(items) == len(raws)):
            self.counters.buckets[bucket_name(key) if key is not None else "none"] += len(items)
            return self._collate(items)
        if not partial:
            self.queues[key] = [r for r, _ in items] + self.queues.get(key, [])
            self.kept.update((r, (target, d)) for r, d in items)
        return None

    def _batch_size(self, key) -> int:
        """Samples per batch of queue ``key``: the clip bucket's own size, else ``batch_size``."""
        if isinstance(self.ctx.buckets, ClipBucketSet):
            return self.ctx.buckets.batch_size(key)
        return self.cfg.batch_size

    def _take_full(self, key) -> Optional[Batch]:
        q = self.queues.get(key, [])
        n = self._batch_size(key)
        while len(q) >= n:
            raws = q[:n]
            del q[:n]
            if not q:
                self.queues.pop(key, None)
            out = self._form(key, raws)
            if out is not None:
                return out
            q = self.queues.get(key, [])
        return None

    def _pack(self) -> None:
        buckets = self.ctx.buckets
        if buckets is None or not self.cfg.buckets.merge_leftovers or not self.queues or self.scheduled:
            return  # latent shapes cannot be merged: their leftovers wait
        if isinstance(buckets, ClipBucketSet):
            batches, rest = pack_clip_leftovers(self.queues, self._log_ar, buckets)
        else:
            batches, rest = pack_leftovers(self.queues, self._log_ar, self.cfg.batch_size, buckets)
        for b, raws in batches:
            self.counters.merged += sum(buckets.assign(r.shape) != b for r in raws)  # type: ignore[arg-type]
        self.ready.extend(batches)
        self.queues = rest

    def _flush_partial(self) -> Optional[Batch]:
        """Exhaust mode, stream over: the leftovers as a final partial batch (image buckets: merged into the
        bucket nearest their mean aspect; latent shapes: one partial batch per shape)."""
        buckets = self.ctx.buckets
        if isinstance(buckets, ClipBucketSet):  # one group at a time: clips never gain frames or size
            first = min(self.queues, key=buckets.order.__getitem__)
            group = buckets.group_of[first]
            keys = [k for k in sorted(self.queues, key=buckets.order.__getitem__) if buckets.group_of[k] == group]
            left = [r for k in keys for r in self.queues.pop(k)]
            key = buckets.members[group].nearest_log(sum(map(self._log_ar, left)) / len(left))
        elif buckets is not None:
            left = [r for k in sorted(self.queues, key=self.ctx.buckets.order.__getitem__) for r in self.queues[k]]
            self.queues = {}
            key = self.ctx.buckets.nearest_log(sum(map(self._log_ar, left)) / len(left))
        else:
            key = min(self.queues, key=str)
            left = self.queues.pop(key)
        if self.cfg.drop_last:
            self.counters.drop("last_partial", len(left))
            return None
        return self._form(key, left, partial=True)

    def _next_keyed(self) -> Optional[Batch]:
        if self.scheduled:
            return self._next_scheduled()
        while True:
            while self.ready:
                b, raws = self.ready.pop(0)
                out = self._form(b, raws)
                if out is not None:
                    return out
                out = self._take_full(b)
                if out is not None:
                    return out
            if self.finished:
                if not self.queues:
                    return None
                out = self._flush_partial()
                if out is not None:
                    return out
                continue
            raw = self._pull_shuffled()
            if raw is PASS_END:
                self._pack()
                self._pass_end()
                continue
            key = self._key(raw)
            self.queues.setdefault(key, []).append(raw)
            out = self._take_full(key)
            if out is not None:
                return out

    def _next_scheduled(self) -> Optional[Batch]:
        """The batch of the scheduled bucket (``same_bucket_across_ranks``; see :mod:`data_pipeline.buckets`)."""
        buckets: ClipBucketSet = self.ctx.buckets  # type: ignore[assignment]
        want = buckets.scheduled(self.ctx.seed, self.worker, self.sched_draws)
        group, n = buckets.group_of[want], buckets.batch_size(want)
        patience = SCHEDULE_PATIENCE * max(buckets.batch_size(s) for s in buckets.sizes)
        while True:
            fits = [r for k, q in self.queues.items() if buckets.dominates(buckets.group_of[k], group) for r in q]
            if len(fits) >= n:
                own = list(self.queues.get(want, []))  # the scheduled bucket's own samples first, in arrival order
                mine, target_ar = {id(r) for r in own}, log_aspect(want)
                order = {id(r): i for i, r in enumerate(fits)}
                others = sorted((r for r in fits if id(r) not in mine),  # then the nearest aspects
                                key=lambda r: (abs(self._log_ar(r) - target_ar), order[id(r)]))
                raws = (own + others)[:n]
                taken = {id(r) for r in raws}
                for k in list(self.queues):
                    self.queues[k] = [r for r in self.queues[k] if id(r) not in taken]
                    if not self.queues[k]:
                        del self.queues[k]
                self.counters.merged += sum(self._key(r) != want for r in raws)
                out = self._form(want, raws)
                if out is not None:
                    self.sched_draws += 1
                    return out
                continue  # a sample would not decode: the survivors went back to queue `want`
            if sum(map(len, self.queues.values())) > patience:
                raise DataError(f"same_bucket_across_ranks: the scheduled bucket {bucket_name(want)} (batch {n}) "
                                f"found {len(fits)} fitting samples among {patience} queued{self.where}: the data "
                                f"has too few clips of {group[0]} frames at budget {group[1]}^2; drop that "
                                "frame count / resolution from data.buckets")
            raw = self._pull_shuffled()
            if raw is PASS_END:
                if not self._pass_end():
                    return None
                continue
            key = self._key(raw)
            self.queues.setdefault(key, []).append(raw)

    # ------------------------------------------------------------------------------------------------ state

    def snapshot(self) -> dict:
        """This worker's position, JSON-serialisable (see the module docstring)."""
        urls: dict[str, int] = {}

        def ref(r: Raw) -> list:
            return [r.src, urls.setdefault(r.url, len(urls)), r.index, r.visit, int(r.repeat)]

        return {
            "epoch": self.epoch, "finished": self.finished, "mix_draws": self.mix_draws, "seq": self.seq,
            "buf_draws": self.buf_draws, "draining": self.draining, "bad_run": self.bad_run,
            "sched_draws": self.sched_draws,
            "buf": [ref(r) for r in self.buf],
            "queues": [[list(k) if isinstance(k, tuple) else k, [ref(r) for r in q]]
                       for k, q in sorted(self.queues.items(), key=lambda kq: str(kq[0]))],
            "ready": [[list(b), [ref(r) for r in raws]] for b, raws in self.ready],
            "streams": [s.snapshot() for s in self.streams],
            "stats": self.counters.to_dict(),
            "urls": list(urls),
        }

    def restore(self, d: dict, epoch: Optional[int] = None) -> None:
        """Continue from a :meth:`snapshot`: re-read the referenced samples, reopen shards at their offsets.

        ``epoch``: the epoch about to begin; when it starts a new pass of an epoch-aligned stream, whatever the
        snapshot still buffered is dropped anyway (:meth:`begin_epoch`), so it is counted, not re-read."""
        self.epoch = d["epoch"]
        self.finished, self.draining, self.seq = bool(d["finished"]), bool(d["draining"]), int(d["seq"])
        self.mix_draws, self.buf_draws, self.bad_run = int(d["mix_draws"]), int(d["buf_draws"]), int(d["bad_run"])
        self.sched_draws = int(d.get("sched_draws", 0))
        self.counters.load(d["stats"])
        if len(d["streams"]) != len(self.streams):
            raise DataError(f"saved worker state has {len(d['streams'])} source streams, this loader "
                            f"{len(self.streams)}")
        for s, sd in zip(self.streams, d["streams"]):
            s.restore(sd)
        table = d["urls"]
        refs = list(d["buf"]) + [r for _, q in d["queues"] for r in q] + [r for _, rs in d["ready"] for r in rs]
        self.kept = {}
        if self.ctx.mode != "nominal" and epoch is not None and self.epoch is not None and epoch > self.epoch:
            self.counters.drop("epoch_remainder", len(refs))
            self.buf, self.queues, self.ready = [], {}, []
            return
        wanted: dict[str, dict[int, list[tuple[int, int, bool]]]] = {}
        for src, ui, index, visit, repeat in refs:
            wanted.setdefault(table[ui], {}).setdefault(index, []).append((src, visit, bool(repeat)))
        found: dict[tuple[str, int, int], Raw] = {}
        for url, want in wanted.items():
            for (g, visit), raw in read_samples(self.cfg, url, want, self.counters).items():
                found[(url, g, visit)] = raw

        def load(rs: list) -> list[Raw]:
            out = []
            for _src, ui, index, visit, _repeat in rs:
                raw = found.get((table[ui], index, visit))
                if raw is not None:
                    out.append(raw)
            return out

        self.buf = load(d["buf"])
        self.queues = {}
        for k, rs in d["queues"]:
            q = load(rs)
            if q:
                self.queues[self._saved_key(k)] = q
        self.ready = []
        for b, rs in d["ready"]:
            raws = load(rs)
            if len(raws) == self._batch_size(self._saved_key(b)):
                self.ready.append((self._saved_key(b), raws))
            elif raws:  # some referenced samples vanished: let the bucket queue refill the batch
                self.queues.setdefault(self._saved_key(b), []).extend(raws)

    def _saved_key(self, k):
        """A queue key as JSON holds it: a shape list (or null), or a bucket index from a state written before
        buckets were keyed by shape."""
        if isinstance(k, int) and self.ctx.buckets is not None:
            return self.ctx.buckets.sizes[k]
        return tuple(k) if isinstance(k, list) else k
