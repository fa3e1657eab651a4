"""Test helper: start N local processes with the environment torchrun would give them (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT), without torchrun's agent (seconds saved per test), and wait for all of them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
EXTENSIONS = Path.home() / ".cache" / "latentloom" / "torch_extensions"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sharding_device() -> str:
    """``cpu`` (default: gloo, GPUs hidden) or ``cuda`` (``LATENTLOOM_SHARDING_DEVICE=cuda``: NCCL, one GPU)."""
    return os.environ.get("LATENTLOOM_SHARDING_DEVICE", "cpu")


def base_env(extra: Optional[dict[str, str]] = None, device: Optional[str] = None) -> dict[str, str]:
    """The test's environment without any launcher or Accelerate settings inherited from outside, plus ``extra``.
    On ``cpu`` the GPUs are hidden and DeepSpeed is told to use its CPU accelerator."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "FSDP_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                "MASTER_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(EXTENSIONS)),
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if (device or sharding_device()) == "cpu":
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", LATENTLOOM_SHARDING_DEVICE="cpu")
    else:
        env.update(CUBLAS_WORKSPACE_CONFIG=":4096:8", LATENTLOOM_SHARDING_DEVICE="cuda")
    env.update(extra or {})
    return env


class Ranks:
    """``python script *args`` started as ``world`` ranks (see the module docstring); :meth:`wait` collects them."""

    def __init__(self, script: str | Path, args: Sequence[str], world: int, env: dict[str, str], log_dir: Path,
                 launched: bool = True):
        """``launched=False``: one process with no launcher variables at all (not even a world of one)."""
        self.script = script
        port = str(free_port())
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs, self.logs = [], []
        for rank in range(world):
            rank_env = dict(env)
            if launched:
                rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                                LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            log = open(log_dir / f"rank{rank}.log", "w+")
            self.logs.append(log)
            self.procs.append(subprocess.Popen([sys.executable, str(script), *map(str, args)], env=rank_env,
                                               cwd=REPO, stdout=log, stderr=subprocess.STDOUT))

    def wait(self, timeout: float) -> list[str]:
        """Each rank's combined output. Raises AssertionError (with the outputs) when a rank fails or the timeout
        passes; the other ranks are then killed."""
        deadline = time.monotonic() + timeout
        failed = None
        while any(p.poll() is None for p in self.procs):
            if time.monotonic() > deadline:
                failed = f"timeout after {timeout} s"
                break
            if any(p.poll() not in (None, 0) for p in self.procs):
                failed = "a rank failed"
                break
            time.sleep(0.2)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        outputs = []
        for log in self.logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
        codes = [p.returncode for p in self.procs]
        if failed or any(codes):
            tails = "\n".join(f"--- rank {r} (exit {c}) ---\n{out[-4000:]}"
                              for r, (c, out) in enumerate(zip(codes, outputs)))
            raise AssertionError(f"{self.script}: {failed or 'non-zero exit'}\n{tails}")
        return outputs


def run_ranks(script: str | Path, args: Sequence[str], world: int, env: dict[str, str], timeout: float,
              log_dir: Path) -> list[str]:
    """Start ``world`` ranks and wait for them (see :class:`Ranks`)."""
    return Ranks(script, args, world, env, log_dir).wait(timeout)
