"""Checkpoints that never lose work.

A checkpoint is a folder ``<run>/checkpoints/step_00001000/`` holding

* Accelerate's state: the model and optimizer, RNG states per rank. Single-process and DDP runs write the model as
  safetensors and the rest as tensors loaded back with ``torch.load(weights_only=True)``, so nothing in them can
  run code. Sharded strategies keep their engine's own sharded format, one piece per rank: DeepSpeed writes
  ``pytorch_model/`` (each rank's ZeRO partition of the optimizer, and of the weights under ZeRO-3; DeepSpeed
  loads these pickles with ``weights_only=False``), FSDP2 a ``torch.distributed.checkpoint`` folder (pickled
  metadata) — resume those only from checkpoints you wrote;
* ``ema.safetensors`` (the EMA shadow weights, always consolidated to whole tensors, whatever the strategy),
* ``trainer_state.json`` (step, counters, strategy, world size) and ``loader_rank{r}.json`` (each rank's
  data-loader position),
* ``config.yaml`` (the resolved run config).

A sharded checkpoint resumes only under the strategy family and the world size that wrote it
(:func:`check_resumable` says so before Accelerate fails on missing files); the consolidated export and EMA are
portable.

It is written under a temporary name (``.tmp-step_...``) and renamed when complete, so a crash mid-save leaves the
previous checkpoint as the latest one; leftovers of an interrupted save are removed by the next save. A disk that
fills up mid-save ends the run with :class:`training.errors.NoSpaceError` ("no space left ... while writing
checkpoint ...", naming the folder and the checkpoint that stays the latest); the partial folder is removed at once.

**Trust.** Resuming reads the checkpoint folder named by ``train.resume`` (or the latest one under the run). The
whole-weights formats cannot run code; DeepSpeed's ``pytorch_model/`` pickles are loaded with
``weights_only=False`` and FSDP2's metadata is pickled, so such a checkpoint folder from an untrusted source is
code: resume only from checkpoints you wrote.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from training.errors import NoSpaceError
from training.sharding import strategy_name

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8,})$")
TRAINER_STATE = "trainer_state.json"


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def resolve_resume(resume: str, run_dir: str | os.PathLike) -> Optional[Path]:
    """``"auto"`` (latest if any, else start fresh), ``"latest"`` (must exist), ``"none"``, or a folder path."""
    if resume == "none":
        return None
    if resume in ("auto", "latest"):
        path = latest_checkpoint(run_dir)
        if path is None and resume == "latest":
            raise FileNotFoundError(f"resume=latest: no complete checkpoint under {checkpoint_root(run_dir)}")
        return path
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"resume={resume!r}: not a complete checkpoint folder (no {TRAINER_STATE})")
    return path


def save_checkpoint(
    accelerator: Any,
    run_dir: str | os.PathLike,
    step: int,
    trainer_state: dict[str, Any],
    loader_state: Optional[dict[str, Any]],
    ema_state: Optional[dict[str, torch.Tensor]],
    config_yaml: Optional[str],
    keep: int,
) -> Path:
    """Write a checkpoint atomically on every rank (collective: call it on all ranks) and prune old ones."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        rank = accelerator.process_index
        if loader_state is not None:
            (tmp / f"loader_rank{rank}.json").write_text(json.dumps(loader_state))
        if accelerator.is_main_process:
            if ema_state is not None:
                save_file(ema_state, str(tmp / "ema.safetensors"))
            if config_yaml is not None:
                (tmp / "config.yaml").write_text(config_yaml)
            state = dict(trainer_state, step=step, world_size=accelerator.num_processes,
                         strategy=strategy_name(accelerator))
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))  # written last: marks completeness
    except Exception as e:
        if not _out_of_space(e, root):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the previous checkpoint is untouched
        kept = latest_checkpoint(run_dir)
        raise NoSpaceError(
            f"no space left on the device of {root} while writing checkpoint step {step} ({type(e).__name__}: {e}); "
            f"the partial checkpoint was removed and {kept or 'no earlier checkpoint'} stays the latest: free some "
            "space (or lower train.keep_checkpoints) and run the same command to resume") from e
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # re-saving a step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
    accelerator.wait_for_everyone()
    return final


_NO_SPACE_WORDS = ("no space left", "os error 28", "disk quota exceeded", "file write failed", "unexpected pos")


def _out_of_space(exc: BaseException, folder: Path) -> bool:
    """Whether a write failed for want of space: ENOSPC/EDQUOT anywhere in the exception's chain, the words
    safetensors and torch's writer use for it, or (torch's writer says only "unexpected pos") less than 1 MiB left
    on ``folder``'s device."""
    seen: set[int] = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e).lower()
        if any(w in text for w in _NO_SPACE_WORDS[:3]):
            return True
        if any(w in text for w in _NO_SPACE_WORDS[3:]):
            try:
                return shutil.disk_usage(folder).free < 2**20
            except OSError:
                return False
        e = e.__cause__ or e.__context__
    return False


def _family(strategy: str) -> str:
    """Which strategies share a checkpoint format: whole weights (single/DDP), ZeRO-1/2, ZeRO-3, FSDP1, FSDP2."""
    return {"single": "whole", "ddp": "whole", "zero1": "zero12", "zero2": "zero12"}.get(strategy, strategy)


def check_resumable(saved: dict[str, Any], strategy: str, world_size: int, path: Path) -> None:
    """Raise ``ValueError`` when a checkpoint cannot be resumed under ``strategy`` with ``world_size`` processes."""
    old = saved.get("strategy")
    old_world = int(saved.get("world_size", world_size))
    if old is None:  # written before strategies were recorded: single-process or DDP
        old = "ddp" if old_world > 1 else "single"
    hint = ("resume with the same strategy and number of processes, or start a new run from the consolidated "
            "weights (export/model.safetensors or the checkpoint's ema.safetensors)")
    if _family(old) != _family(strategy):
        raise ValueError(f"checkpoint {path} was written under {old} and cannot be resumed under {strategy}: {hint}")
    if _family(old) != "whole" and old_world != world_size:
        raise ValueError(f"checkpoint {path} holds {old} shards of {old_world} processes, this run has {world_size}: "
                         f"{hint}")
    if old_world != world_size:
        log.warning("checkpoint %s was written by %d processes, resuming with %d: the data order changes",
                    path, old_world, world_size)


def load_checkpoint(accelerator: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Restore Accelerate's state from ``path``; return trainer state, this rank's loader state and the EMA
    (consolidated: whole tensors, to be split by :meth:`training.ema.EMA.load_full_state_dict`)."""
    path = Path(path)
    state = json.loads((path / TRAINER_STATE).read_text())
    check_resumable(state, strategy_name(accelerator), accelerator.num_processes, path)
    accelerator.load_state(str(path))
    loader_file = path / f"loader_rank{accelerator.process_index}.json"
    ema_file = path / "ema.safetensors"
    return {
        "trainer": state,
        "loader": json.loads(loader_file.read_text()) if loader_file.exists() else None,
        "ema": load_file(str(ema_file)) if ema_file.exists() else None,
    }
