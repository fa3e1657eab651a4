"""The errors a user can act on, and reading files so that a bad one is named.

``loom`` (:func:`launch.cli.main`) prints these as one line and exits 1 (2 for
:class:`training.config_io.ConfigError`), without a traceback; anything else is a bug and keeps its traceback. The
other user errors the command line knows are :class:`training.config_io.ConfigError` (a bad config: exit 2) and
:class:`data_pipeline.errors.DataError` (data that cannot be streamed at all).

A file that is not what it should be (a text file given as weights, an empty adapter, a directory) fails where it is
read, with the file's name and what was expected, instead of the parser's own words (``SafetensorError: header too
large``, ``KeyError: 101``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class LoomError(Exception):
    """A failure the user can fix (a bad file, a full disk, a stuck loader, a diverging run): the message says
    which file, key or value, and what to do."""


class BadFileError(LoomError, ValueError):
    """A file that cannot be read as what it should be (not safetensors, not UTF-8, a directory, empty)."""


class NoSpaceError(LoomError, OSError):
    """The disk filled up while writing (a checkpoint): the message names the folder; nothing earlier was lost."""

    def __init__(self, message: str):
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0])


def _check_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise BadFileError(f"{what} {path}: is a directory, expected a file")
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.stat().st_size == 0:
        raise BadFileError(f"{what} {path}: the file is empty")


def read_safetensors(path: str | os.PathLike, what: str = "weights file") -> dict[str, Any]:
    """The tensors of a safetensors file; :class:`BadFileError` naming it when it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    _check_file(path, what)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BadFileError(f"{what} {path}: not a readable safetensors file ({e})") from e


def safetensors_metadata(path: str | os.PathLike, what: str = "weights file") -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header ({} when it has none)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _check_file(path, what)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise BadFileError(f"{what} {path}: not a readable safetensors file ({e})") from e


def torch_load_tensors(path: str | os.PathLike, what: str = "weights file") -> Any:
    """``torch.load(weights_only=True)`` of a ``.pt``/``.bin``/``.ckpt`` file (nothing in it can run code);
    :class:`BadFileError` naming it when it is not a torch file of plain tensors."""
    import pickle

    import torch

    path = Path(path)
    _check_file(path, what)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, IndexError, ValueError, TypeError,
            UnicodeDecodeError, AttributeError) as e:
        raise BadFileError(f"{what} {path}: not a torch weights file of plain tensors ({type(e).__name__}: {e}); "
                           "use .safetensors, or a .pt/.bin/.ckpt written by torch.save") from e
