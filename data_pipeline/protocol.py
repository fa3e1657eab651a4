"""What the trainer needs from a data loader: the :class:`TrainLoader` protocol.

A loader is an iterable of batches (one ``iter(loader)`` is one epoch) that can say where it is
(``state_dict``, saved per rank in every checkpoint), go back there (``load_state_dict``, on resume) and report
what it counted (``stats``, logged). :class:`data_pipeline.loader.StreamingLoader` and
:class:`data_pipeline.memory.InMemoryLoader` satisfy it; any other object with these four methods does too
(structural typing, PEP 544: no base class to inherit).

This module imports nothing heavy, so :mod:`training.trainer` can name the protocol without loading the streaming
stack.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol, runtime_checkable

LOADER_METHODS = ("__iter__", "state_dict", "load_state_dict", "stats")


@runtime_checkable
class TrainLoader(Protocol):
    """An epoch-wise, resumable iterable of batches."""

    def __iter__(self) -> Iterator[Any]:
        """The rest of the current epoch, from the loader's position; the next call starts the next epoch."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """This rank's position, as JSON-serialisable values (written to ``loader_rank{r}.json``)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly from a :meth:`state_dict` of the same rank."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counts since the start; ``stats()["skipped"]`` (``{reason: count}``, may be absent) is logged as
        ``data/skipped_<reason>``."""
        ...


def check_loader(loader: Any) -> None:
    """Raise ``TypeError`` naming the methods of :class:`TrainLoader` that ``loader`` lacks."""
    missing = [name for name in LOADER_METHODS if not callable(getattr(loader, name, None))]
    if missing:
        raise TypeError(f"loader {type(loader).__name__}: missing {', '.join(missing)} (a training loader needs "
                        f"{', '.join(LOADER_METHODS)}: see data_pipeline.protocol.TrainLoader, or wrap in-memory "
                        "batches in data_pipeline.memory.InMemoryLoader)")
