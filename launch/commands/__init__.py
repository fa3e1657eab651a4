"""The registry of ``loom`` commands, imported lazily.

A command is a config dataclass plus two functions: ``plan(cfg) -> str`` says what would be done (printed by
``--dry-run`` after the resolved config) and ``run(cfg) -> int`` does it. Each command lives in its own module
here, named like the command, and exposes ``COMMAND``. :data:`COMMAND_HELP` lists the commands in the order
``loom --help`` shows, with the line it shows for each, so the command line is built without importing any command:
a command's module (and whatever it imports: the training stack for ``train``, ``data`` and ``sample``) loads only
when that command is used, and ``loom shards`` starts without torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

COMMAND_HELP: dict[str, str] = {  # command (= its module under launch/commands) -> its line in `loom --help`
    "shards": "write WebDataset shards (images, videos) from a folder, a JSONL/CSV table, the demo sets, or pairs",
    "data": "stream a few batches and print what the pipeline will do",
    "train": "train the configured stages (autoencoder, cache, diffusion, lora, dpo), report",
    "sample": "draw images from a trained run for prompts into a PNG grid",
    "export": "write a run as a diffusers folder or an original single file, or a LoRA in diffusers/kohya layout",
}


@dataclass
class Command:
    name: str  # the word after `loom` (and the module's name)
    config_cls: type  # the root config dataclass this command reads
    run: Callable[[Any], Optional[int]]  # does the work; returns an exit code (None means 0)
    plan: Callable[[Any], str]  # what would be done, for --dry-run
    help: str = field(default="", kw_only=True)  # one line for `loom --help` ('' = its COMMAND_HELP line)
    positional: Optional[str] = None  # a config field the first bare argument sets (e.g. `loom shards demo`)
    default_presets: tuple[str, ...] = ()  # presets applied before the user's --config files
    resume_keys: tuple[str, ...] = ()  # config keys that `--resume X` sets (each trained stage's train.resume)
    list_flags: tuple[tuple[str, str, str], ...] = ()  # (flag, list config key, help): `--flag A --flag B` → key=[A, B]

    def __post_init__(self) -> None:
        if not self.help:
            self.help = COMMAND_HELP.get(self.name, "")


def load_command(name: str) -> Command:
    """Import ``launch.commands.<name>`` and return its ``COMMAND`` (import errors are raised, not hidden)."""
    if name not in COMMAND_HELP:
        raise KeyError(f"no loom command {name!r}; commands: {', '.join(COMMAND_HELP)}")
    cmd: Command = importlib.import_module(f"launch.commands.{name}").COMMAND
    if cmd.name != name:
        raise ValueError(f"launch/commands/{name}.py defines command {cmd.name!r}, expected {name!r}")
    return cmd


class CommandTable(Mapping[str, Command]):
    """Every command by name (in :data:`COMMAND_HELP` order); a command's module is imported the first time the
    command is looked up, and the same :class:`Command` is returned after that."""

    def __init__(self, names: tuple[str, ...]):
        self._names = names
        self._loaded: dict[str, Command] = {}

    def __getitem__(self, name: str) -> Command:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._loaded:
            self._loaded[name] = load_command(name)
        return self._loaded[name]

    def __contains__(self, name: object) -> bool:  # without importing the command
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def load_commands() -> CommandTable:
    """The command table; nothing is imported until a command is looked up."""
    return CommandTable(tuple(COMMAND_HELP))
