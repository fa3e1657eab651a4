"""The streaming WebDataset loader: ``build_loader(cfg, rank, world_size) -> StreamingLoader``.

    loader = build_loader(cfg.data, rank=rank, world_size=world_size, seed=cfg.run.seed)
    print(loader.describe())
    for epoch in range(n):
        for batch in loader:          # exactly loader.batches_per_epoch batches on every rank
            ...
        log(loader.stats())           # {"samples": n, "skipped": {"corrupt_image": k, ...}, ...}
    ckpt["data"] = loader.state_dict()   # per rank; small and JSON-serialisable
    ...
    loader.load_state_dict(ckpt["data"])  # continues with no replayed and no skipped sample

**Splitting.** Rank ``r`` of ``W`` with ``N`` workers owns the *slots* ``r + W * w`` (``w < N``); per pass a
source's shards are shuffled from ``(seed, source, pass)`` and dealt to slots (:mod:`data_pipeline.shardlists`;
fewer shards than slots: every slot reads all shards and keeps every ``W*N``-th sample). No sample is read by
two slots in one pass. ``torch.distributed`` is never touched: the caller passes ``rank`` and ``world_size``.

**Epoch length** (see :mod:`data_pipeline.worker` for the three modes). With a shard index (one source, not
resampled) ``batches_per_epoch = total_samples // (world_size * batch_size)``; each worker's share of the
batches is proportional to its share of samples (so an even split reads every sample exactly once); a rank
that runs short wraps around its own share; what is left when a rank's batches are done is dropped. With
``epoch_samples`` (needed for ``resampled``, for mixing sources without indexes, and for shards without an
index on more than one rank) ``batches_per_epoch = epoch_samples // (world_size * batch_size)``. Without
either, a single rank streams its shards until they run out (``batches_per_epoch`` is None); on several ranks
that could leave them with unequal batch counts and hang DDP, so it is refused with a :class:`DataError`.
``full_pass=True`` (caching, validation) reads every sample exactly once per epoch, source after source, with a
final partial batch, on any number of ranks (their batch counts may then differ: not for DDP training).

**Batching.** Plain: ``batch_size`` samples as they leave the shuffle buffer. With buckets: per-bucket queues
(:mod:`data_pipeline.buckets`). Latents-only shards (``image_keys: []``): per-latent-shape queues, so a cache
written with buckets still gives batches of one shape. A video run (:func:`data_pipeline.worker.clip_frames`): clip
buckets ``(T, H, W)`` with a batch size per bucket (images are one-frame clips); the epoch length still counts
batches (of nominally ``batch_size``: smaller buckets hold more samples per batch, so an epoch may wrap around its
share; set ``epoch_samples`` to choose it), equal on every rank; ``same_bucket_across_ranks`` also gives every
rank's step the same bucket (equal quotas per worker, a shared schedule).

**Resume.** Each batch travels from its worker with that worker's state snapshot, taken right after the batch
was formed (:meth:`WorkerPipeline.snapshot`). The main process keeps the latest snapshot per worker, how many
batches each worker delivered this epoch and which worker is due next. DataLoader serves workers round-robin
from worker 0, skipping workers that are done; on resume the worker processes are rotated so that the due
logical worker is process 0, and each is told how many batches it still owes. A different world size,
worker count, batch size or shard set changes the order: ``load_state_dict`` refuses it (``strict=False``
starts the next epoch afresh instead). ``num_workers=0`` reads in the main process as one logical worker, so
its state is interchangeable with ``num_workers=1``.

**Persistent workers.** When the epoch length is known (``batches_per_epoch``), the worker processes live across
epochs: the loader asks them for batches through a map-style dataset, one request per batch, from an endless
schedule computed in the main process (:class:`_Schedule`) — request ``k`` goes to process ``k mod N``
(DataLoader's strict round-robin), the schedule names the logical worker and epoch of each and pads with empty
"idle" requests where the order of a fresh start would skip a process (a worker whose quota is spent, the first
worker of the next epoch). So the batches come in exactly the order that restarting the workers every epoch
would give (an epoch boundary is still an ordinary resume, and a resumed run equals an uninterrupted one), with
no fork, no worker start-up and, in endless (``nominal``) mode, no re-reading of the carried-over shuffle buffer
at each epoch. The processes are started on the first ``iter()`` and closed by ``load_state_dict``, by a consumer
that abandons an epoch half-way (then the next ``iter()`` restarts them from the recorded states) and at exit.
Without a known epoch length (``exhaust`` mode: caching, validation) workers are started for each epoch.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import sys
import weakref
import zlib
from functools import partial
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from data_pipeline.batch import Batch
from data_pipeline.buckets import ClipBucketSet
from data_pipeline.data_config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.shardlists import resolve_sources, shard_order, slot_samples, slot_share
from data_pipeline.stats import format_counts, merge
from data_pipeline.worker import Context, WorkerPipeline, bucket_set, clip_frames, scheduled_buckets

log = logging.getLogger("data_pipeline.loader")

STATE_KIND = "latentloom-stream-state"
STATE_VERSION = 1


class _Delivery:
    """A batch on its way from a worker, with the worker's id, its state snapshot, and whether it is its last."""

    __slots__ = ("batch", "worker", "state", "last")

    def __init__(self, batch: Optional[Batch], worker: int, state: Optional[dict], last: bool = False):
        self.batch, self.worker, self.state, self.last = batch, worker, state, last

    def pin_memory(self) -> "_Delivery":
        if self.batch is not None:
            self.batch = self.batch.pin_memory()
        return self


def _identity(x):
    return x


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what the trainer answers with a checkpoint (SLURM pre-emption)


def _worker_init(parent: int, worker_id: int) -> None:
    """``worker_init_fn`` of every DataLoader worker: the stop signals are the main process's to answer.

    SLURM's pre-emption and ``scancel`` signal every process of the job, the workers included; a worker that died
    of it would take the main process down (``DataLoader worker ... is killed by signal``) before its handler could
    checkpoint. So a worker ignores SIGTERM and SIGUSR1 (``SIG_IGN``); the main process decides, stops at the end of
    the step and shuts its workers down (:func:`_close_workers`, which also ends a stuck one with SIGKILL, since
    SIGTERM no longer does). The worker asks the kernel for a SIGKILL when its parent ends (``PR_SET_PDEATHSIG``,
    Linux), so that it is never left orphaned, whatever ended the main process.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the main process ended before the request was in place
        os._exit(0)


_OPEN_WORKER_ITERATORS: "weakref.WeakSet[Any]" = weakref.WeakSet()  # DataLoader iterators whose workers may run


def _close_workers(it: Any, wait: bool = True) -> None:
    """Shut down a DataLoader iterator's workers: the DataLoader's own shutdown (an end-of-work message, up to a
    few seconds' wait per worker), then SIGKILL for any still alive — a stuck worker ignores the SIGTERM the
    DataLoader would send. ``wait=False`` (an error is on its way out): SIGKILL at once, after unregistering their
    pids so that the main process's SIGCHLD check does not report the kill as the failure."""
    _OPEN_WORKER_ITERATORS.discard(it)
    workers = list(getattr(it, "_workers", None) or [])
    if not wait:
        if getattr(it, "_worker_pids_set", False):
            from torch.utils.data._utils import signal_handling

            signal_handling._remove_worker_pids(id(it))
            it._worker_pids_set = False
        for w in workers:
            if w.is_alive():
                w.kill()
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join(timeout=5)


_WORKER_PROCESSES: list[Any] = []  # every worker process started, until seen dead (they ignore SIGTERM)


def _close_all_workers() -> None:
    """At interpreter exit (before multiprocessing's own exit handler would wait for the workers for ever: they
    ignore its SIGTERM, see :func:`_worker_init`): close the workers of iterators still open, e.g. held by a
    traceback, and kill any worker still alive whose iterator was dropped without closing them (a finished loader's
    persistent workers)."""
    for it in list(_OPEN_WORKER_ITERATORS):
        _close_workers(it)
    for w in _WORKER_PROCESSES:
        if w.is_alive():
            w.kill()
            w.join(timeout=5)
    _WORKER_PROCESSES.clear()


atexit.register(_close_all_workers)  # registered again by each _track_workers, to stay the last one registered


def _track_workers(it: Any) -> None:
    """Remember a worker-holding iterator for :func:`_close_all_workers`, and (re-)register that hook so it is the
    last exit handler registered: exit handlers run last-in first-out, and multiprocessing registers its own (which
    joins every live child) when it is first used — possibly after this module was imported. Registered once at
    import only, the hook could run after that join, which then waits for persistent workers for ever."""
    _OPEN_WORKER_ITERATORS.add(it)
    _WORKER_PROCESSES[:] = [w for w in _WORKER_PROCESSES if w.is_alive()] + list(getattr(it, "_workers", []))
    atexit.unregister(_close_all_workers)
    atexit.register(_close_all_workers)


def _run_worker(pipe: WorkerPipeline, epoch: int, owed: Optional[int], snapshots: bool) -> Iterator[_Delivery]:
    """Batches of one worker for (the rest of) ``epoch``: ``owed`` of them, or (None) until its stream ends, in
    which case each batch is formed one ahead so that the last one says so (the main process then knows the
    epoch is over without waiting for the stream to be asked again)."""
    pipe.begin_epoch(epoch)
    if owed is not None:
        for _ in range(owed):
            batch = pipe.next_batch()
            if batch is None:
                return
            yield _Delivery(batch, pipe.worker, pipe.snapshot() if snapshots else None)
        return
    batch = pipe.next_batch()
    if batch is None:  # nothing at all: still report the counts (a batch-less delivery the main process eats)
        yield _Delivery(None, pipe.worker, pipe.snapshot(), last=True)
        return
    state = pipe.snapshot()
    while True:
        nxt = pipe.next_batch()
        if nxt is None:  # the final state (stream over) goes with the last batch
            yield _Delivery(batch, pipe.worker, pipe.snapshot(), last=True)
            return
        nxt_state = pipe.snapshot()
        yield _Delivery(batch, pipe.worker, state)
        batch, state = nxt, nxt_state


class _Schedule:
    """The endless request order of persistent workers (see the module docstring): ``(epoch, logical worker)``
    per batch, ``(epoch, -1)`` for an idle request, such that request ``k`` is for process ``k mod N`` and the real
    requests follow a fresh start's order — from the due worker, round-robin over the workers whose quota for the
    epoch is not yet spent; each new epoch from worker 0."""

    def __init__(self, quotas: Any, workers: int, epoch: int, consumed: list[int], due: int, rotation: int):
        self.quotas, self.workers = quotas, workers
        self.epoch, self.consumed, self.due, self.rotation = epoch, list(consumed), due, rotation

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n, proc = self.workers, 0
        epoch, consumed, due = self.epoch, self.consumed, self.due
        while True:
            q = self.quotas(epoch)
            while any(c < k for c, k in zip(consumed, q)):
                w = next((due + i) % n for i in range(n) if consumed[(due + i) % n] < q[(due + i) % n])
                target = (w - self.rotation) % n  # the process that serves logical worker w
                while proc != target:
                    yield epoch, -1
                    proc = (proc + 1) % n
                yield epoch, w
                proc = (proc + 1) % n
                consumed[w] += 1
                due = (w + 1) % n
            epoch, consumed, due = epoch + 1, [0] * n, 0


class _PersistentDataset(Dataset):
    """What a persistent worker process runs: one batch of its logical worker per request, its pipeline kept
    from one request (and epoch) to the next."""

    def __init__(self, ctx: Context, states: list, rotation: int):
        super().__init__()
        self.ctx, self.states, self.rotation = ctx, states, rotation
        self._pipe: Optional[WorkerPipeline] = None

    def __getitem__(self, request: tuple[int, int]) -> _Delivery:
        epoch, worker = request
        if worker < 0:
            return _Delivery(None, -1, None)
        info = get_worker_info()
        proc = info.id if info is not None else 0
        if worker != (self.rotation + proc) % self.ctx.workers:
            raise DataError(f"internal: process {proc} asked for logical worker {worker}'s batch")
        if self._pipe is None:
            torch.set_num_threads(1)
            self._pipe = WorkerPipeline(self.ctx, worker)
            if self.states[worker] is not None:
                self._pipe.restore(self.states[worker], epoch)
        self._pipe.begin_epoch(epoch)
        batch = self._pipe.next_batch()
        return _Delivery(batch, worker, self._pipe.snapshot(), last=batch is None)


class _EpochDataset(IterableDataset):
    """What each DataLoader worker process runs for one (rest of an) epoch."""

    def __init__(self, ctx: Context, epoch: int, states: list, owed: list[Optional[int]], rotation: int):
        super().__init__()
        self.ctx, self.epoch, self.states, self.owed, self.rotation = ctx, epoch, states, owed, rotation

    def __iter__(self) -> Iterator[_Delivery]:
        info = get_worker_info()
        worker = (self.rotation + (info.id if info is not None else 0)) % self.ctx.workers
        owed = self.owed[worker]
        if owed == 0:
            return
        torch.set_num_threads(1)
        pipe = WorkerPipeline(self.ctx, worker)
        if self.states[worker] is not None:
            pipe.restore(self.states[worker], self.epoch)
        yield from _run_worker(pipe, self.epoch, owed, snapshots=True)


class StreamingLoader:
    """An iterable of :class:`Batch` over WebDataset shards, one epoch per ``iter()`` (see the module docstring)."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, seed: Optional[int] = None,
                 float_pixels: bool = False):
        """See :func:`build_loader`."""
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank/world_size: got {rank}/{world_size}; need 0 <= rank < world_size")
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.seed = cfg.seed if seed is None else int(seed) + cfg.seed
        self.sources = resolve_sources(cfg.source_list())
        self.workers = max(1, cfg.num_workers)
        B, W = cfg.batch_size, world_size
        totals = [s.total for s in self.sources]
        if cfg.full_pass:
            mode = "exhaust"
            self.epoch_size_from = "one full pass (every sample once)"
            K = None
        elif cfg.resampled or len(self.sources) > 1 or cfg.epoch_samples is not None:
            mode = "nominal"
            nominal = cfg.epoch_samples
            if nominal is None:  # several sources, every shard indexed
                if any(t is None for t in totals):
                    missing = [s.name for s in self.sources if s.total is None]
                    raise DataError(f"mixing {len(self.sources)} sources needs data.epoch_samples: no shard index "
                                    f"counts every shard of {', '.join(map(repr, missing))}")
                nominal = sum(totals)  # type: ignore[arg-type]
            self.epoch_size_from = "epoch_samples" if cfg.epoch_samples is not None else "sum of the shard indexes"
            K: Optional[int] = nominal // (W * B)
            if K == 0:
                raise DataError(f"epoch of {nominal} samples is less than one batch per rank "
                                f"(world_size {W} x batch_size {B}); raise epoch_samples")
        elif totals[0] is not None:
            mode = "aligned"
            self.epoch_size_from = "the shard index"
            K = totals[0] // (W * B)
            if K == 0:
                raise DataError(f"source {self.sources[0].name!r} has {totals[0]} samples (from its shard index), "
                                f"less than one batch per rank (world_size {W} x batch_size {B})")
        else:
            mode = "exhaust"
            self.epoch_size_from = "until the shards run out"
            K = None
            if W > 1:
                src = self.sources[0]
                raise DataError(f"source {src.name!r}: no shard index counts {len(src.urls) - src.known} of its "
                                f"{len(src.urls)} shards, so ranks cannot agree on an epoch length (DDP would "
                                f"hang at uneven ends): set data.epoch_samples, or write a .shardindex.json")
        self.mode = mode
        self.batches_per_epoch: Optional[int] = K
        buckets = bucket_set(cfg)  # None, image aspect buckets, or clip buckets (a video run)
        self.scheduled = scheduled_buckets(cfg, buckets, mode)  # every rank's step has the same clip bucket
        self.ctx = Context(cfg, tuple(self.sources), self.seed, rank, world_size, self.workers, mode, buckets,
                           float_pixels)
        self._plan = self._plan_fingerprint()
        self._states: list[Optional[dict]] = [None] * self.workers
        self._reset_progress(epoch=0)
        self._base_stats: Optional[dict] = None
        self._live: Optional[WorkerPipeline] = None  # num_workers == 0: the in-process pipeline
        self._stream: Optional[Iterator[_Delivery]] = None  # persistent workers' DataLoader iterator (when open)

    # --------------------------------------------------------------------------------------------- progress

    def _reset_progress(self, epoch: int) -> None:
        self.epoch = epoch
        self._in_epoch = 0
        self._consumed = [0] * self.workers
        self._done = [False] * self.workers  # workers whose stream ended this epoch (exhaust mode)
        self._due = 0

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("this loader's epoch length is unknown (no shard index, no epoch_samples)")
        return self.batches_per_epoch

    def quotas(self, epoch: int) -> Optional[list[int]]:
        """Batches each logical worker of this rank delivers in ``epoch`` (None: until its shards run out)."""
        K, N, B = self.batches_per_epoch, self.workers, self.cfg.batch_size
        if K is None:
            return None
        if self.mode == "nominal" or self.scheduled:  # equal on every rank: step i is worker i % N's batch i // N
            return [K // N + (w < K % N) for w in range(N)]
        src = self.sources[0]
        order = shard_order(len(src.urls), self.seed, 0, epoch, self.cfg.shard_shuffle)
        n_slots = self.ctx.n_slots
        counts = [int(c) for c in src.counts]  # type: ignore[arg-type]
        have = [slot_samples(counts, *slot_share(order, self.ctx.slot(w), n_slots), self.ctx.slot(w), n_slots)
                for w in range(N)]
        q = [h // B for h in have]
        diff = K - sum(q)
        if diff > 0:  # the rank is short: workers with the fullest partial batch wrap around first
            order_w = sorted(range(N), key=lambda w: (-(have[w] % B), -have[w], w))
            for i in range(diff):
                q[order_w[i % N]] += 1
        while diff < 0:  # the rank has more than its share of batches: the busiest workers give some up
            w = max(range(N), key=lambda w: (q[w], -w))
            q[w] -= 1
            diff += 1
        return q

    def _end_epoch(self) -> None:
        st = self.stats()
        msg = (f"data epoch {self.epoch} done on rank {self.rank}: {st['samples']} samples delivered in total; "
               f"skipped {format_counts(st['skipped'])}")
        (log.warning if st["skipped"] else log.info)(msg)
        self._reset_progress(self.epoch + 1)

    def _record(self, d: _Delivery) -> Optional[Batch]:
        if d.state is not None:
            self._states[d.worker] = d.state
        if d.batch is not None:
            self._consumed[d.worker] += 1
            self._in_epoch += 1
        self._due = (d.worker + 1) % self.workers
        self._done[d.worker] = self._done[d.worker] or d.last
        if self.batches_per_epoch is not None and self._in_epoch >= self.batches_per_epoch:
            self._end_epoch()
        elif all(self._done):
            if self._in_epoch == 0:
                raise self._nothing_usable()
            self._end_epoch()
        return d.batch

    # -------------------------------------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        q = self.quotas(epoch)
        if q is None:  # until the streams end; a worker already done this epoch owes nothing
            owed = [0 if done else None for done in self._done]
        else:
            owed = [max(0, a - b) for a, b in zip(q, self._consumed)]
        if self.cfg.num_workers == 0:
            source = self._iter_local(epoch, owed)
        elif self.batches_per_epoch is not None:
            yield from self._iter_persistent(epoch)
            return
        else:
            ds = _EpochDataset(self.ctx, epoch, list(self._states), owed, self._due)
            # A DataLoader draws its workers' base seed from the given generator; without one it would draw from
            # the global torch RNG and so shift every random number the training step draws after a resume.
            # Our workers' randomness comes from (seed, counters) alone, so a fixed generator is enough.
            source = iter(DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers, collate_fn=_identity,
                                     pin_memory=self._pin_memory(), prefetch_factor=self.cfg.prefetch_factor,
                                     generator=torch.Generator().manual_seed(self.seed),
                                     worker_init_fn=partial(_worker_init, os.getpid())))
            _track_workers(source)
        try:
            for d in source:
                batch = self._record(d)
                if batch is not None:
                    yield batch
        except GeneratorExit:  # closed by the consumer (a stop at a signal, the end of training)
            if self.cfg.num_workers > 0:
                _close_workers(source)
            raise
        except BaseException:  # an error (a data stall): no time for the graceful wait
            if self.cfg.num_workers > 0:
                _close_workers(source, wait=False)
            raise
        if self.cfg.num_workers > 0:
            _close_workers(source)
        if self.epoch != epoch:  # the epoch's batches were all delivered (_record advanced it)
            return
        if self.batches_per_epoch is not None:
            raise DataError(f"internal: epoch {epoch} ended after {self._in_epoch} of {self.batches_per_epoch} "
                            "batches")
        if self._in_epoch == 0:
            raise self._nothing_usable()
        self._end_epoch()

    def _open_stream(self) -> Iterator[_Delivery]:
        """Start the persistent worker processes at the current position (see the module docstring)."""
        ds = _PersistentDataset(self.ctx, list(self._states), self._due)
        schedule = _Schedule(self.quotas, self.workers, self.epoch, self._consumed, self._due, self._due)
        # A fixed generator for the workers' base seed: see __iter__'s non-persistent path.
        it = iter(DataLoader(ds, batch_size=None, sampler=schedule, num_workers=self.cfg.num_workers,
                             collate_fn=_identity, pin_memory=self._pin_memory(),
                             prefetch_factor=self.cfg.prefetch_factor,
                             generator=torch.Generator().manual_seed(self.seed),
                             worker_init_fn=partial(_worker_init, os.getpid())))
        _track_workers(it)
        return it

    def close(self) -> None:
        """Stop the persistent worker processes (the next ``iter()`` starts them again where the loader is)."""
        if self._stream is not None:
            stream, self._stream = self._stream, None
            _close_workers(stream)

    def __del__(self) -> None:  # a loader dropped without close(): its persistent workers go with it
        # at once (SIGKILL, no end-of-work message and join): the garbage collector may run this in the middle of an
        # import, where the graceful shutdown's queue threads wait on the import lock for seconds per worker
        try:
            if self._stream is not None:
                stream, self._stream = self._stream, None
                _close_workers(stream, wait=False)
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down what closing needs
            pass

    def _iter_persistent(self, epoch: int) -> Iterator[Batch]:
        if self._stream is None:
            self._stream = self._open_stream()
        source = self._stream
        try:
            while self.epoch == epoch:
                d = next(source)
                if d.worker < 0:  # an idle request (see _Schedule)
                    continue
                if d.batch is None:
                    raise DataError(f"internal: logical worker {d.worker} ran out of batches in epoch {epoch} "
                                    f"after {self._in_epoch} of {self.batches_per_epoch}")
                yield self._record(d)
        except GeneratorExit:  # the consumer left the epoch half-way: the next iter() restarts from the states
            self._stream = None
            _close_workers(source)
            raise
        except BaseException:  # an error (a data stall): no time for the graceful wait
            self._stream = None
            _close_workers(source, wait=False)
            raise

    def _pin_memory(self) -> bool:
        """``data.pin_memory``; null: pinned whenever CUDA is available (faster, asynchronous host-to-GPU copies)."""
        pin = getattr(self.cfg, "pin_memory", None)
        return torch.cuda.is_available() if pin is None else bool(pin)

    def _nothing_usable(self) -> DataError:
        st = self.stats()
        names = ", ".join(f"{len(s.urls)} shards of source {s.name!r}" for s in self.sources)
        why = f"; dropped {format_counts(st['dropped'])}" if st["dropped"] else ""
        return DataError(f"all {names} produced 0 usable samples (epoch {self.epoch}, rank {self.rank}): "
                         f"{format_counts(st['skipped'])}{why}")

    def _iter_local(self, epoch: int, owed: list[Optional[int]]) -> Iterator[_Delivery]:
        if self.batches_per_epoch is None:  # formed one batch ahead: restart from the last delivered state
            pipe = WorkerPipeline(self.ctx, 0)
            if self._states[0] is not None:
                pipe.restore(self._states[0], epoch)
            if owed[0] is None:
                yield from _run_worker(pipe, epoch, None, snapshots=True)
            return
        if self._live is None:  # otherwise keep the pipeline alive across epochs; snapshot it only when asked
            self._live = WorkerPipeline(self.ctx, 0)
            if self._states[0] is not None:
                self._live.restore(self._states[0], epoch)
        yield from _run_worker(self._live, epoch, owed[0], snapshots=False)

    # ------------------------------------------------------------------------------------------------- state

    def _worker_states(self) -> list[Optional[dict]]:
        if self._live is not None and self._live.epoch is not None:
            return [self._live.snapshot()]
        return list(self._states)

    def _plan_fingerprint(self) -> dict:
        """What fixes the sample order: a state only resumes exactly under the same values."""
        cfg = self.cfg
        crc = lambda obj: zlib.crc32(json.dumps(obj).encode())  # noqa: E731
        return {
            "seed": self.seed, "world_size": self.world_size, "workers": self.workers, "batch_size": cfg.batch_size,
            "mode": self.mode, "shards": [len(s.urls) for s in self.sources],
            "urls_crc": crc([list(s.urls) for s in self.sources]),
            "counts_crc": crc([list(s.counts) for s in self.sources]),
            "weights": [s.weight for s in self.sources], "shuffle_buffer": cfg.shuffle_buffer,
            "shard_shuffle": cfg.shard_shuffle, "resampled": cfg.resampled, "epoch_samples": cfg.epoch_samples,
            "buckets": [cfg.buckets.enabled, cfg.buckets.step, cfg.buckets.max_aspect, cfg.buckets.merge_leftovers,
                        cfg.resolution],
            **({"clip_buckets": [clip_frames(cfg), cfg.buckets.resolutions, cfg.buckets.token_budget,
                                 cfg.buckets.max_batch_size, cfg.buckets.min_fill,
                                 cfg.buckets.same_bucket_across_ranks]} if clip_frames(cfg) else {}),
        }

    def state_dict(self) -> dict:
        """This rank's position: epoch, batches delivered per worker, the due worker, per-worker snapshots."""
        return {
            "kind": STATE_KIND, "version": STATE_VERSION, "rank": self.rank, "plan": self._plan,
            "epoch": self.epoch, "batches_in_epoch": self._in_epoch, "consumed": list(self._consumed),
            "done": list(self._done), "next_worker": self._due, "workers": self._worker_states(),
            "base_stats": self._base_stats,
        }

    def load_state_dict(self, sd: dict, strict: bool = True) -> None:
        """Continue from :meth:`state_dict` (of this rank). ``strict=False``: if the plan changed (other world
        size, workers, batch size, shards...), start the epoch after the saved one afresh instead of failing."""
        if not isinstance(sd, dict) or sd.get("kind") != STATE_KIND:
            raise DataError("load_state_dict: not a streaming-loader state (no 'kind': "
                            f"{STATE_KIND!r})")
        if sd.get("version") != STATE_VERSION:
            raise DataError(f"load_state_dict: state version {sd.get('version')}, this loader reads {STATE_VERSION}")
        if sd.get("rank") != self.rank:
            raise DataError(f"load_state_dict: the state was saved by rank {sd.get('rank')}, this is rank "
                            f"{self.rank}: save and load one state per rank")
        self._live = None
        self.close()  # persistent workers hold the old position
        old = sd.get("plan", {})
        diffs = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in self._plan.items() if old.get(k) != v]
        if diffs:
            if strict:
                raise DataError("load_state_dict: the saved state cannot resume this loader exactly ("
                                + "; ".join(diffs) + "); pass strict=False to start the next epoch afresh")
            log.warning("data state does not fit this loader (%s): starting epoch %d afresh", "; ".join(diffs),
                        sd["epoch"] + 1)
            self._base_stats = merge([sd.get("base_stats")] + [w["stats"] for w in sd["workers"] if w])
            self._states = [None] * self.workers
            self._reset_progress(int(sd["epoch"]) + (1 if sd["batches_in_epoch"] else 0))
            return
        self._base_stats = sd.get("base_stats")
        self._states = [None if w is None else dict(w) for w in sd["workers"]]
        self.epoch = int(sd["epoch"])
        self._in_epoch = int(sd["batches_in_epoch"])
        self._consumed = [int(c) for c in sd["consumed"]]
        self._done = [bool(x) for x in sd.get("done", [False] * self.workers)]
        self._due = int(sd["next_worker"])

    def stats(self) -> dict:
        """Counts over all workers of this rank since the start (carried through resumes): ``samples``,
        ``batches``, ``skipped`` and ``dropped`` by reason, ``buckets``, ``merged``, ``repeated``, ``epoch``."""
        if self._live is not None and self._live.epoch is not None:  # in-process: its counters, no snapshot
            workers = [self._live.counters.to_dict()]
        else:
            workers = [w["stats"] if w else None for w in self._states]
        out = merge([self._base_stats] + workers)
        out["epoch"] = self.epoch
        out["batches_in_epoch"] = self._in_epoch
        return out

    # ---------------------------------------------------------------------------------------------- describe

    def describe(self) -> str:
        """A human-readable plan: sources, shards, samples, the split, epoch length, batches, buckets, transforms."""
        cfg, W, N, B = self.cfg, self.world_size, self.workers, self.cfg.batch_size
        lines = [f"streaming loader, rank {self.rank} of {W}, seed {self.seed}"]
        for s in self.sources:
            total = f"{s.total:,} samples" if s.total is not None else \
                f"samples unknown ({s.known} of {len(s.urls)} shards in an index)"
            w = f", weight {s.weight:g}" if len(self.sources) > 1 else ""
            lines.append(f"  source {s.name!r}{w}: {s.pattern} -> {len(s.urls)} shards, {total}")
        modes = {"aligned": "one pass over the shards per epoch (shard order reshuffled every epoch)"
                 if cfg.shard_shuffle else "one pass over the shards per epoch, fixed shard order",
                 "nominal": "endless streams" + (" (shards drawn with replacement)" if cfg.resampled else
                                                 " (passes reshuffled as each ends)") + ", nominal epochs",
                 "exhaust": "one pass, until the shards run out"}
        lines.append(f"  epochs: {modes[self.mode]}; length from {self.epoch_size_from}")
        slots = W * N
        for s in self.sources:
            order = list(range(len(s.urls)))
            share, modulo = slot_share(order, self.ctx.slot(0), slots)
            if cfg.resampled:
                how = f"each of the {slots} slots draws its own shards"
            elif modulo:
                how = (f"{len(s.urls)} shards < {slots} slots (ranks x workers): every slot reads all shards "
                       f"and keeps every {slots}-th sample")
            else:
                per = [len(slot_share(order, self.ctx.slot(w), slots)[0]) for w in range(N)]
                how = f"by shard over {W} rank(s) x {N} worker(s): this rank reads {sum(per)} shards " \
                      f"({min(per)}-{max(per)} per worker) per pass"
            lines.append(f"  split{'' if len(self.sources) == 1 else f' of {s.name!r}'}: {how}")
        if self.batches_per_epoch is not None:
            q = self.quotas(self.epoch)
            lines.append(f"  batches per epoch (every rank): {self.batches_per_epoch:,} of {B} "
                         f"(per worker this epoch: {', '.join(map(str, q))})")  # type: ignore[arg-type]
        else:
            lines.append(f"  batches per epoch: until the shards run out, batch size {B}"
                         f"{', last partial batch dropped' if cfg.drop_last else ', last batch may be partial'}")
        lines.append(f"  shuffle: shard order {'on' if cfg.shard_shuffle else 'off'}, sample buffer "
                     f"{cfg.shuffle_buffer if cfg.shuffle_buffer > 1 else 'off'} per worker; "
                     f"{cfg.num_workers} DataLoader worker(s), prefetch {cfg.prefetch_factor}")
        if isinstance(self.ctx.buckets, ClipBucketSet):
            b = self.ctx.buckets
            lines.append(f"  clip buckets ({len(b)}; token budget {b.token_budget:,} pixel-frames per batch, "
                         f"{'multi-aspect, step ' + str(cfg.buckets.step) if cfg.buckets.enabled else 'square'}; a "
                         f"clip takes the largest bucket it fits, images are 1-frame clips; "
                         + ("the same bucket on every rank at each step (shared schedule)" if self.scheduled else
                            "each rank fills its own buckets") + f"): {b.describe()}")
        elif self.ctx.buckets is not None:
            lines.append(f"  buckets ({len(self.ctx.buckets)}, step {cfg.buckets.step}, budget {cfg.resolution}^2, "
                         f"max aspect {cfg.buckets.max_aspect:g}): {self.ctx.buckets.describe()}; leftovers "
                         f"{'packed into the nearest bucket' if cfg.buckets.merge_leftovers else 'wait'} at "
                         "pass/epoch ends")
        if cfg.min_motion_score is not None:
            lines.append(f"  motion filter: clips with json motion_score < {cfg.min_motion_score:g} skipped "
                         "(low_motion); samples without a score pass")
        if isinstance(self.ctx.buckets, ClipBucketSet):
            lines.append(f"  transforms: decode {'|'.join(cfg.image_keys)} -> RGB frames at the bucket's (T, H, W) "
                         f"(the same resize, {cfg.crop} crop and flip {'p=0.5' if cfg.flip else 'off'} on every "
                         "frame) -> uint8 (B, 3, T, H, W), images (B, 3, 1, H, W); float [-1, 1] where read "
                         "(on the device)")
        elif cfg.image_keys:
            size = "bucket size" if self.ctx.buckets is not None else f"{cfg.resolution}x{cfg.resolution}"
            lines.append(f"  transforms: decode {'|'.join(cfg.image_keys)} -> RGB (JPEG draft "
                         f"{'on' if cfg.jpeg_draft else 'off'}), resize to cover {size} (bicubic, antialiased), "
                         f"{cfg.crop} crop, flip {'p=0.5' if cfg.flip else 'off'} -> uint8 (B, 3, H, W); float "
                         "[-1, 1] where read (on the device)")
        else:
            lines.append("  transforms: none (no image members: pixels is None); batches grouped by latent shape")
        cap = " > ".join(cfg.caption_keys) or "none"
        lines.append(f"  captions: {cap}{' (required)' if cfg.require_caption else ' (may be empty)'}; arrays: "
                     f"{', '.join(filter(None, [cfg.latent_key] + cfg.extra_keys)) or 'none'}")
        return "\n".join(lines)


def build_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1, seed: Optional[int] = None,
                 float_pixels: bool = False) -> StreamingLoader:
    """The loader for this rank. ``seed`` is the run's seed: the data order seed is ``seed + cfg.seed``
    (``cfg.seed`` alone when None), so a new run seed reshuffles the data and ``cfg.seed`` can vary it alone.

    Batches carry uint8 pixels (``Batch.pixel_data``), normalised where ``Batch.pixels`` is read — on the device
    after ``batch.to(device)``. ``float_pixels=True`` is the former behaviour (float32 in [-1, 1] made in the
    workers, 4x the bytes through shared memory, pinning and the host-to-device copy), kept for
    ``benchmarks/data_throughput.py``'s before/after; the values read from ``pixels`` are the same either way."""
    return StreamingLoader(cfg, rank=rank, world_size=world_size, seed=seed, float_pixels=float_pixels)
