"""The registry of ``loom`` commands.

A command is a config dataclass plus two functions: ``plan(cfg) -> str`` says what would be done (printed by
``--dry-run`` after the resolved config) and ``run(cfg) -> int`` does it. Each command lives in its own module
here and exposes ``COMMAND``; :data:`COMMAND_MODULES` lists them in the order ``loom --help`` shows.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

COMMAND_MODULES: tuple[str, ...] = ("shards", "data", "train", "sample")


@dataclass
class Command:
    name: str  # the word after `loom`
    help: str  # one line for `loom --help`
    config_cls: type  # the root config dataclass this command reads
    run: Callable[[Any], Optional[int]]  # does the work; returns an exit code (None means 0)
    plan: Callable[[Any], str]  # what would be done, for --dry-run
    positional: Optional[str] = None  # a config field the first bare argument sets (e.g. `loom shards demo`)
    default_presets: tuple[str, ...] = ()  # presets applied before the user's --config files
    resume_keys: tuple[str, ...] = ()  # config keys that `--resume X` sets (each trained stage's train.resume)
    list_flags: tuple[tuple[str, str, str], ...] = ()  # (flag, list config key, help): `--flag A --flag B` → key=[A, B]


def load_commands() -> dict[str, Command]:
    """Import every command module; a module that fails to import is reported, not hidden."""
    commands = {}
    for mod in COMMAND_MODULES:
        module = importlib.import_module(f"launch.commands.{mod}")
        cmd: Command = module.COMMAND
        commands[cmd.name] = cmd
    return commands
