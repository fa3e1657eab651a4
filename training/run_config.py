"""The root config of a run: the sections every command reads (later issues add model and training sections)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from data_pipeline.config import DataConfig


@dataclasses.dataclass
class RunSection:
    """Where and how a run is identified."""

    name: str = "run"  # run name; the run directory is output_dir/name
    output_dir: str = "runs"  # parent folder of run directories
    seed: int = 0  # global seed (data order, initialisation, noise)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name: {self.name!r} must be a non-empty folder name without '/'")

    @property
    def directory(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclasses.dataclass
class RunConfig:
    """The root config of a run: where it writes, what it reads (later issues add model and training sections)."""

    run: RunSection = dataclasses.field(default_factory=RunSection)  # run name, folder, seed
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # the streaming loader
    preview_batches: int = 4  # batches `loom data` streams and shows

    def __post_init__(self) -> None:
        if self.preview_batches < 1:
            raise ValueError(f"preview_batches: {self.preview_batches} must be >= 1")

