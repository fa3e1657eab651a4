"""Checkpoints that never lose work.

A checkpoint is a folder ``<run>/checkpoints/step_00001000/`` holding

* Accelerate's state (model as safetensors, optimizer, LR scheduler, RNG states — all loaded back with
  ``torch.load(weights_only=True)``, so nothing in them can run code),
* ``ema.safetensors`` (the EMA shadow weights),
* ``trainer_state.json`` (step, counters) and ``loader_rank{r}.json`` (each rank's data-loader position),
* ``config.yaml`` (the resolved run config).

It is written under a temporary name (``.tmp-step_...``) and renamed when complete, so a crash mid-save leaves the
previous checkpoint as the latest one; leftovers of an interrupted save are removed by the next save.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

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
    accelerator.save_state(str(tmp), safe_serialization=True)
    rank = accelerator.process_index
    if loader_state is not None:
        (tmp / f"loader_rank{rank}.json").write_text(json.dumps(loader_state))
    if accelerator.is_main_process:
        if ema_state is not None:
            save_file(ema_state, str(tmp / "ema.safetensors"))
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
        state = dict(trainer_state, step=step, world_size=accelerator.num_processes)
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))  # written last: marks completeness
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


def load_checkpoint(accelerator: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Restore Accelerate's state from ``path``; return trainer state, this rank's loader state and the EMA."""
    path = Path(path)
    state = json.loads((path / TRAINER_STATE).read_text())
    if state.get("world_size", accelerator.num_processes) != accelerator.num_processes:
        log.warning("checkpoint %s was written by %d processes, resuming with %d: the data order changes",
                    path, state["world_size"], accelerator.num_processes)
    accelerator.load_state(str(path))
    loader_file = path / f"loader_rank{accelerator.process_index}.json"
    ema_file = path / "ema.safetensors"
    return {
        "trainer": state,
        "loader": json.loads(loader_file.read_text()) if loader_file.exists() else None,
        "ema": load_file(str(ema_file)) if ema_file.exists() else None,
    }
