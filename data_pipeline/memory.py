"""A training loader over batches held in memory: :class:`InMemoryLoader`.

For data that fits in memory (small experiments, tests, benchmarks, pre-computed latents), without shards or worker
processes. It satisfies :class:`data_pipeline.protocol.TrainLoader`: its position (epoch, batch within the epoch) is
exact and resumable, so a run stopped after any step and resumed yields the same batches as an uninterrupted one.

Order: the batches in the given order, or — with ``shuffle`` — a permutation per epoch drawn from
``numpy.random.default_rng([seed, epoch])`` (the same on every rank and after a resume). Under data parallelism each
rank takes every ``world_size``-th batch of that order, starting at its ``rank`` (disjoint shares, like
``torch.utils.data.DistributedSampler`` at batch granularity); the ``num_batches % world_size`` last ones of each
epoch's order are left out so that every rank takes the same number of steps.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, Optional, Sequence, TypeVar, Union

import numpy as np

T = TypeVar("T")


class InMemoryLoader(Generic[T]):
    """Batches from a list, or from ``make(i)`` for ``i`` in ``range(num_batches)``, epoch after epoch.

    Each ``iter(loader)`` yields the rest of the current epoch from the saved position; when it is exhausted the
    position moves to the start of the next epoch. ``make`` must be deterministic in ``i`` (it is called again for
    the same ``i`` in every epoch and after a resume).
    """

    def __init__(self, batches: Union[Sequence[T], Callable[[int], T]], num_batches: Optional[int] = None, *,
                 shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1):
        if callable(batches):
            if num_batches is None or num_batches < 1:
                raise ValueError(f"InMemoryLoader: num_batches={num_batches!r} must be >= 1 with a batch function")
            self._make: Callable[[int], T] = batches
            self.num_batches = int(num_batches)
        else:
            if num_batches is not None and num_batches != len(batches):
                raise ValueError(f"InMemoryLoader: num_batches={num_batches} but {len(batches)} batches were given")
            items = list(batches)
            self._make = items.__getitem__
            self.num_batches = len(items)
        if not 0 <= rank < world_size:
            raise ValueError(f"InMemoryLoader: rank {rank} is not in [0, world_size={world_size})")
        if self.num_batches < world_size:
            raise ValueError(f"InMemoryLoader: {self.num_batches} batches cannot give each of {world_size} ranks one")
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.epoch, self.index = 0, 0  # position: batches of this rank's share of `epoch` already yielded
        self._cached: tuple[int, list[int]] = (-1, [])

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self.num_batches // self.world_size

    def order(self, epoch: int) -> list[int]:
        """The batch indices this rank yields in ``epoch``."""
        if self._cached[0] != epoch:
            everything = (np.random.default_rng([self.seed, epoch]).permutation(self.num_batches).tolist()
                          if self.shuffle else list(range(self.num_batches)))
            self._cached = (epoch, everything[self.rank::self.world_size][: len(self)])
        return self._cached[1]

    def __iter__(self) -> Iterator[T]:
        if self.index >= len(self):  # saved right after the last batch of an epoch: the next one starts
            self.epoch, self.index = self.epoch + 1, 0
        order = self.order(self.epoch)
        while self.index < len(order):
            i = order[self.index]
            self.index += 1
            yield self._make(i)
        self.epoch, self.index = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "batches_per_epoch": len(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"epoch", "index", "batches_per_epoch"} - set(state)
        if missing:
            raise ValueError(f"InMemoryLoader.load_state_dict: not an in-memory loader state (missing "
                             f"{sorted(missing)}): {state!r}")
        if int(state["batches_per_epoch"]) != len(self):
            raise ValueError(f"InMemoryLoader.load_state_dict: the state has batches_per_epoch="
                             f"{state['batches_per_epoch']}, this loader {len(self)} (other data or world size)")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def stats(self) -> dict[str, Any]:
        """In-memory batches are never skipped: an empty ``skipped``, and the position."""
        return {"skipped": {}, "epoch": self.epoch, "batches_in_epoch": self.index}
