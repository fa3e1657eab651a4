"""Helpers for the multi-process tests: a tiny run config, the launch scripts' environment, fake SLURM commands,
and reading a run's results.

Every run here is ``loom train`` (``python -m launch``) on the digits demo shards: ``pipeline: [diffusion]``, a
pixel-space DiT with one block on 8×8 images, CPU and gloo (``train.cpu: true``), ``num_workers: 0``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TORCHRUN_SCRIPT = REPO / "launch" / "torchrun_multinode.sh"
SBATCH_SCRIPT = REPO / "launch" / "slurm" / "train.sbatch"
CPU_GLOO_CONFIG = REPO / "launch" / "accelerate" / "ddp_cpu_gloo.yaml"

STEPS = 24  # optimizer steps of every run that is compared with the reference run
CHECKPOINT_EVERY = 2


def tiny_config(path: Path, demo: Path, output_dir: Path, name: str = "tiny", data: Optional[dict] = None,
                **train: object) -> Path:
    """Write the tiny run config; ``data`` overrides ``data`` keys, ``train`` overrides ``diffusion.train`` keys."""
    cfg = {
        "run": {"name": name, "output_dir": str(output_dir), "seed": 0},
        "data": {"urls": f"{demo}/train-{{000000..000001}}.tar", "resolution": 8, "batch_size": 8,
                 "num_workers": 0, "shuffle_buffer": 64, "seed": 0, **(data or {})},
        "pipeline": ["diffusion"],
        "diffusion": {
            "denoiser": "dit", "latents": "pixels",
            "model": {"dit": {"sample_size": 8, "patch_size": 2, "in_channels": 3, "hidden_size": 32, "depth": 1,
                              "num_heads": 2, "context_dim": 64, "pooled_dim": 32}},
            "text_encoder": {"model": "openclip-tiny-text", "layer": "last"},
            "process": {"kind": "discrete", "schedule": "cosine", "prediction": "v_prediction"},
            "train": {"max_steps": STEPS, "cpu": True, "progress": False, "log_every": 1,
                      "checkpoint_every": CHECKPOINT_EVERY, "keep_checkpoints": 50, "ema_decay": 0.9,
                      "optim": {"lr": 1.0e-3, "max_grad_norm": 1.0}, **train},
            "validation_prompts": [],
            "validation_loss_batches": 1,
        },
        "report": {"enabled": False},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra: object) -> dict[str, str]:
    """The environment of a launch script run: the repo and this folder importable (fault_entry), one thread per
    process (2-core CI), no GPU, the loopback rendezvous."""
    env = dict(os.environ)
    for key in list(env):
        if key.startswith(("SLURM_", "PET_", "TORCHELASTIC_", "LOOM_FAULT")) or key in (
                "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOG_DIR", "ACCELERATE_CONFIG"):
            del env[key]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), env.get("PYTHONPATH", "")])
    env.update({"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
                "TOKENIZERS_PARALLELISM": "false",
                "CUDA_VISIBLE_DEVICES": ""})  # CPU tests: gloo even on a GPU machine (two ranks cannot share one)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own (so that everything it starts can be killed together), output to
    ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> int:
    """Its exit status; kills its whole session (launcher, workers) when it outlives ``timeout``."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        raise


def kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_nodes(config: Path, nodes: int, nproc: int, logs: Path, timeout: float = 240, **env: object) -> list[int]:
    """``torchrun_multinode.sh train --config CONFIG`` once per node (NODE_RANK 0..nodes-1) on 127.0.0.1; the
    exit status of each."""
    port = free_port()
    procs = []
    for node in range(nodes):
        e = launch_env(NNODES=nodes, NODE_RANK=node, NPROC_PER_NODE=nproc, MASTER_PORT=port,
                       RDZV_ID=f"test{port}", **env)
        procs.append(start(["bash", str(TORCHRUN_SCRIPT), "train", "--config", str(config)], e,
                           logs / f"launcher{node}.out"))
    try:
        return [finish(p, timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                kill_session(p)


def _process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, state letter) of every live process, from ``/proc``."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        table[int(stat.parent.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def descendants(root: int) -> list[int]:
    """The live (not zombie) processes under ``root``, ``root`` included."""
    table = _process_table()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in table and table[pid][2] != "Z":
            found.append(pid)
        todo.extend(p for p, (ppid, _, _) in table.items() if ppid == pid)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie does not)."""
    entry = _process_table().get(pid)
    return entry is not None and entry[2] != "Z"


def job_process_groups(root: int) -> list[int]:
    """The process groups of ``root`` and of all its descendants (torchrun starts each rank in a session of its
    own), read from ``/proc``."""
    table = _process_table()
    return list(dict.fromkeys(table[p][1] for p in descendants(root) if p in table))


def signal_job(proc: subprocess.Popen, sig: int) -> list[int]:
    """Send ``sig`` to every process of the job ``proc`` started, as SLURM does at pre-emption or ``scancel``:
    ``os.killpg`` on its process group and on that of every descendant (the ranks, their DataLoader workers).
    Returns the groups signalled."""
    groups = job_process_groups(proc.pid)
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
    return groups


def python_processes(pids: list[int]) -> list[int]:
    """The processes of ``pids`` that run a Python interpreter (ranks, DataLoader workers, torchrun's agent)."""
    return [p for p in pids if b"python" in open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")[0]]


def stop_job(proc: subprocess.Popen, job: list[int], sig: int, timeout: float = 120,
             linger: float = 15) -> tuple[int, list[int]]:
    """Signal the whole job (:func:`signal_job`), wait up to ``timeout`` s for ``proc`` to end and up to ``linger``
    s more for the processes ``job`` listed before; returns ``proc``'s exit status and those still alive."""
    signal_job(proc, sig)
    status = finish(proc, timeout=timeout)
    deadline = time.monotonic() + linger
    while any(alive(p) for p in job) and time.monotonic() < deadline:
        time.sleep(0.1)
    return status, [p for p in job if alive(p)]


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Until ``path`` exists (fails, with the end of ``log`` and of any node logs beside it, if ``proc`` ended first
    or the time ran out)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            why = (f"the run ended (status {proc.returncode})" if proc.poll() is not None
                   else f"still running after {timeout} s")
            tails = [f"--- {f}\n{f.read_text(errors='replace')[-3000:]}"
                     for f in [log, *sorted(log.parent.rglob("node*.log"))] if f.exists()]
            raise AssertionError(f"{why}, and {path} did not appear\n" + "\n".join(tails))
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ results


def checkpoints(stage_dir: Path) -> list[int]:
    root = stage_dir / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in root.glob("step_*") if (p / "trainer_state.json").exists())


def trainer_state(stage_dir: Path, step: int) -> dict:
    return json.loads((stage_dir / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").read_text())


def final_weights(stage_dir: Path) -> dict:
    """The exported (EMA) weights and the last checkpoint's live weights."""
    from safetensors.torch import load_file

    last = checkpoints(stage_dir)[-1]
    return {"export": load_file(str(stage_dir / "export" / "model.safetensors")),
            "live": load_file(str(stage_dir / "checkpoints" / f"step_{last:08d}" / "model.safetensors"))}


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    for kind in ("export", "live"):
        assert a[kind].keys() == b[kind].keys()
        for k in a[kind]:
            torch.testing.assert_close(a[kind][k], b[kind][k], rtol=0, atol=0, msg=f"{kind} {k}")


def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir)).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


# --------------------------------------------------------------------------------------------- fake SLURM

FAKE_SRUN = r'''#!/usr/bin/env python3
"""srun on one machine: start the command once per "node" (SLURM_NODEID/SLURM_PROCID = 0..N-1), pass on the
signals srun forwards, and with --kill-on-bad-exit stop the others when one fails."""
import os, signal, subprocess, sys, time

args, nodes, kill_on_bad_exit = sys.argv[1:], 1, False
while args and args[0].startswith("-"):
    key, _, value = args.pop(0).partition("=")
    if key in ("--nodes", "-N"):
        nodes = int(value)
    elif key == "--kill-on-bad-exit":
        kill_on_bad_exit = value != "0"
with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
    f.write("srun nodes=%d kill_on_bad_exit=%s %s\n" % (nodes, kill_on_bad_exit, " ".join(args)))
procs = []
for node in range(nodes):
    env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_LOCALID="0",
               SLURM_STEP_NUM_NODES=str(nodes), SLURM_NTASKS=str(nodes))
    procs.append(subprocess.Popen(args, env=env))

def forward(sig, frame):
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)

for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, forward)
status = 0
while any(p.poll() is None for p in procs):
    bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
    if bad and kill_on_bad_exit:
        for p in procs:
            if p.poll() is None:
                p.terminate()
    time.sleep(0.1)
codes = [p.returncode for p in procs]
sys.exit(next((c if c > 0 else 128 - c for c in codes if c != 0), 0))
'''

FAKE_SCONTROL = r'''#!/usr/bin/env bash
# scontrol on one machine: "show hostnames a,b" prints a and b; "requeue ID" is recorded.
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
case "$1" in
    show) tr ',' '\n' <<< "$3" ;;
    requeue) echo "$2" >> "$FAKE_SLURM_REQUEUED" ;;
    *) echo "fake scontrol: unsupported: $*" >&2; exit 1 ;;
esac
'''


def fake_slurm(bin_dir: Path) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def slurm_env(bin_dir: Path, job_id: int, nodes: int, restart_count: Optional[int] = None,
              **extra: object) -> dict[str, str]:
    """The environment SLURM gives a batch script on the first node of ``nodes`` (all of them 127.0.0.1 here)."""
    env = launch_env(**extra)
    env.pop("MASTER_ADDR")  # the script must take it from the allocation
    env.update({
        "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}",
        "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NAME": "loomtest",
        "SLURM_JOB_NODELIST": ",".join(["127.0.0.1"] + ["localhost"] * (nodes - 1)),
        "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NNODES": str(nodes), "SLURM_SUBMIT_DIR": str(REPO),
        "FAKE_SLURM_LOG": str(bin_dir / "calls.log"), "FAKE_SLURM_REQUEUED": str(bin_dir / "requeued"),
    })
    if restart_count is not None:
        env["SLURM_RESTART_COUNT"] = str(restart_count)
    return env
