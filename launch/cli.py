"""``loom``: the command line.

    loom <command> [POSITIONAL] [--config PRESET_OR_YAML ...] [--dry-run] [dotted.key=value ...]

Every command reads one typed config (see :mod:`training.config_io`): its defaults, then the command's default
presets, then each ``--config`` (a preset name from ``configs/`` or a YAML path), then the ``key=value``
overrides. A bad config stops here, before any work, with the key, the value and what is allowed.
``--dry-run`` prints the resolved config and the plan, then exits.

**The error boundary** (:func:`main`): what a user can fix ends the command with one line on stderr naming the file,
key or value, and no traceback — exit status 2 for a config error (:class:`training.config_io.ConfigError`), 1 for
the others (:data:`USER_ERRORS`: :class:`training.errors.LoomError` — a bad file, a full disk, a stuck loader, a
diverging run —, :class:`data_pipeline.errors.DataError`, a missing file or folder). ``--log-level DEBUG`` adds the
traceback. Anything else is a bug and keeps its traceback. Under a launcher (torchrun, SLURM) the line names the rank
and the error goes to torchelastic's error file, so the launcher's summary shows it.

Only the command used is imported (:mod:`launch.commands`): its options are added to its sub-parser when argparse
reaches it, so ``loom shards`` does not load the training stack.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from typing import Callable, Mapping, Optional, Sequence

from data_pipeline.errors import DataError
from launch.commands import COMMAND_HELP, Command, load_commands
from training.config_io import ConfigError, load_config, to_yaml
from training.errors import LoomError

# what a user can fix: one line and exit status 1 (ConfigError: 2), no traceback
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, LoomError, DataError, FileNotFoundError,
                                                 NotADirectoryError, IsADirectoryError, PermissionError)


def _add_command_arguments(p: argparse.ArgumentParser, cmd: Command) -> None:
    if cmd.positional:
        p.add_argument("positional", nargs="?", metavar=cmd.positional.upper(), help=f"sets {cmd.positional}=...")
    p.add_argument("--config", "-c", action="append", default=[], metavar="PRESET",
                   help="a preset name from configs/ or a YAML file; repeat to layer several")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan, then exit")
    if cmd.resume_keys:
        p.add_argument("--resume", metavar="WHERE",
                       help="auto (latest checkpoint if any; the default), latest (must exist), none, or a "
                            f"checkpoint folder; sets {', '.join(cmd.resume_keys)}")
    for flag, key, text in cmd.list_flags:
        p.add_argument(f"--{flag}", action="append", default=[], dest=f"list_{key}", metavar=flag.upper(),
                       help=f"{text}; repeat for several (sets {key})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.batch_size=64")


class _CommandParser(argparse.ArgumentParser):
    """A command's sub-parser: it imports its command and adds the command's options only when argparse hands it
    the rest of the command line (so the other commands are never imported)."""

    def __init__(self, *args, command: Optional[Callable[[], Command]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._command = command

    def parse_known_args(self, args=None, namespace=None):
        if self._command is not None:
            _add_command_arguments(self, self._command())
            self._command = None
        return super().parse_known_args(args, namespace)


def _parser(commands: Mapping[str, Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loom",
        description="latentloom: train latent image and video diffusion models on WebDataset shards.",
        epilog="Options are dotted key=value overrides of the command's config; see `loom <command> --dry-run`.",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True, parser_class=_CommandParser)
    for name in commands:  # names only: a command is imported when its sub-parser runs
        text = COMMAND_HELP.get(name, "")
        sub.add_parser(name, help=text, description=text, command=lambda name=name: commands[name])
    return parser


def build_config(cmd: Command, positional: Optional[str], configs: Sequence[str], overrides: Sequence[str]):
    """The command's resolved config (raises ConfigError)."""
    overrides = list(overrides)
    if positional is not None:
        if "=" in positional:  # `loom data key=value`: argparse cannot tell; treat it as an override
            overrides.insert(0, positional)
        else:
            overrides.insert(0, f"{cmd.positional}={positional}")
    return load_config(cmd.config_cls, [*cmd.default_presets, *configs], overrides)


def main(argv: Optional[Sequence[str]] = None) -> int:
    commands = load_commands()
    parser = _parser(commands)
    args, extra = parser.parse_known_args(argv)
    # overrides may come after flags (`loom sample --lora a.safetensors output=x.png`): argparse leaves those over
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cmd = commands[args.command]
    try:
        overrides = list(args.overrides)
        if getattr(args, "resume", None):
            overrides += [f"{key}={args.resume}" for key in cmd.resume_keys]
        for _, key, _ in cmd.list_flags:
            values = getattr(args, f"list_{key}")
            if values:
                overrides.append(f"{key}={json.dumps(values)}")  # a JSON list is a YAML flow sequence
        cfg = build_config(cmd, getattr(args, "positional", None), args.config, overrides)
    except USER_ERRORS as e:
        return _user_error(cmd.name, e)
    if args.dry_run:
        print("# resolved config")
        print(to_yaml(cfg), end="")
        print("# plan")
        print(cmd.plan(cfg))
        return 0
    try:
        code = cmd.run(cfg)
    except USER_ERRORS as exc:
        return _user_error(cmd.name, exc)
    except Exception as exc:
        report_rank_failure(exc)
        raise
    return int(code or 0)


def _user_error(command: str, exc: BaseException) -> int:
    """One line for an error the user can fix (see the module docstring); its exit status."""
    config = isinstance(exc, ConfigError)
    if process_label() != "process":  # launched as one of several: name the rank, tell torchrun
        report_rank_failure(exc)
    else:
        print(f"loom {command}: {'config error: ' if config else ''}{exc}", file=sys.stderr)
    logging.getLogger("loom").debug("traceback of the error above", exc_info=exc)
    return 2 if config else 1


def process_label() -> str:
    """``rank R/W (local L on HOST)`` from the launcher's environment (torchrun, accelerate, SLURM), or ``process``
    when nothing launched several."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID"))
    if rank is None:
        return "process"
    world = os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "?"))
    local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "?"))
    return f"rank {rank}/{world} (local {local} on {socket.gethostname()})"


def report_rank_failure(exc: BaseException) -> None:
    """Name the failing rank in one log line before the traceback, and hand the exception to torchelastic's error
    file (``TORCHELASTIC_ERROR_FILE``, set by torchrun) so the launcher's failure summary shows its message and
    traceback, not only an exit code. The other ranks then fail at their next collective (or at the collective
    timeout, ``train.collective_timeout_s``) and torchrun stops the job."""
    logging.getLogger("loom").error("%s failed: %s: %s", process_label(), type(exc).__name__, exc)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        try:
            from torch.distributed.elastic.multiprocessing.errors import get_error_handler

            get_error_handler().record_exception(exc)
        except Exception:  # never mask the original failure
            pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
