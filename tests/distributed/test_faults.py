"""Faults of a shared cluster, on one machine with two ranks (launch/torchrun_multinode.sh, gloo, CPU):

* a rank that dies fails the job at once, and the failure names the rank and its error;
* a rank that hangs fails the job after ``train.collective_timeout_s``, not after the backend's 30 minutes;
* SIGTERM stops the run with a checkpoint, and running the same command again resumes it: the final weights equal
  those of a run that was never interrupted (the session's reference run, two nodes × one rank);
* with ``MAX_RESTARTS=1`` torchrun restarts the worker group after a crash and it resumes from the latest checkpoint,
  again to the reference run's weights;
* SIGTERM to every process of the job at once (SLURM's pre-emption and ``scancel``: the DataLoader workers get it
  too) still stops the run with a checkpoint, in one process and under two ranks, and the run resumes to the
  uninterrupted run's weights; no DataLoader worker outlives its process.

The faults come from ``fault_entry`` (loom with a fault injected into the diffusion stage's loss).
"""

from __future__ import annotations

import re
import signal
import sys
import time

import pytest
from harness import (
    CHECKPOINT_EVERY,
    STEPS,
    TORCHRUN_SCRIPT,
    assert_same_weights,
    checkpoints,
    descendants,
    final_weights,
    finish,
    free_port,
    kill_session,
    launch_env,
    python_processes,
    run_nodes,
    start,
    stop_job,
    tiny_config,
    wait_for,
)


def _one_node_env(**extra):
    port = free_port()
    return launch_env(NNODES=1, NODE_RANK=0, NPROC_PER_NODE=2, MASTER_PORT=port, RDZV_ID=f"test{port}", **extra)


@pytest.mark.distributed
def test_dead_rank_fails_fast_and_is_named(demo_shards, tmp_path):
    config = tiny_config(tmp_path / "tiny.yaml", demo_shards, tmp_path / "runs")
    t0 = time.monotonic()
    [status] = run_nodes(config, nodes=1, nproc=2, logs=tmp_path, timeout=180, TRAIN_MODULE="fault_entry",
                         LOOM_FAULT_RANK=1, LOOM_FAULT_AT=3)
    elapsed = time.monotonic() - t0
    out = (tmp_path / "launcher0.out").read_text()
    assert status != 0, out[-3000:]
    # our line, from the failing process itself
    assert re.search(r"rank 1/2 \(local 1 on \S+\) failed: RuntimeError: injected fault on rank 1", out), out[-3000:]
    # torchrun's summary: the root cause is rank 1, with its error message (from the error file the CLI wrote)
    root = out[out.index("Root Cause"):]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", root) and "injected fault on rank 1" in root, root
    assert "[node0] FAILED" in out
    assert elapsed < 120, elapsed  # start-up and a few steps; a hang would run into the timeout above


@pytest.mark.distributed
@pytest.mark.slow
def test_stuck_rank_fails_at_the_collective_timeout(demo_shards, tmp_path):
    config = tiny_config(tmp_path / "tiny.yaml", demo_shards, tmp_path / "runs", collective_timeout_s=5)
    t0 = time.monotonic()
    [status] = run_nodes(config, nodes=1, nproc=2, logs=tmp_path, timeout=240, TRAIN_MODULE="fault_entry",
                         LOOM_FAULT_RANK=1, LOOM_FAULT_AT=3, LOOM_FAULT_KIND="hang", LOOM_FAULT_HANG_S=900,
                         SHUTDOWN_TIMEOUT=5)
    elapsed = time.monotonic() - t0
    out = (tmp_path / "launcher0.out").read_text()
    assert status != 0, out[-3000:]
    assert "rank 1 hangs at micro-batch 3" in out
    # rank 0 gave up waiting for rank 1 after the configured 5 s (gloo's own default is 30 minutes)
    line = re.search(r"rank 0/2 \(local 0 on \S+\) failed: .*", out)
    assert line and re.search(r"[Tt]imed? ?out", line.group(0)), out[-3000:]
    assert elapsed < 150, elapsed


@pytest.mark.distributed
@pytest.mark.slow
def test_stalled_loader_fails_naming_the_rank(demo_shards, tmp_path):
    """Rank 1's DataLoader worker stalls for longer than the collective timeout: rank 1 fails under its own name
    after ``0.75 × collective_timeout_s`` of waiting (``train.data_timeout_s``), before rank 0's collective times
    out, and torchrun's summary names rank 1 as the root cause."""
    config = tiny_config(tmp_path / "tiny.yaml", demo_shards, tmp_path / "runs", data={"num_workers": 1},
                         collective_timeout_s=5)
    t0 = time.monotonic()
    [status] = run_nodes(config, nodes=1, nproc=2, logs=tmp_path, timeout=240, TRAIN_MODULE="fault_entry",
                         LOOM_FAULT_RANK=1, LOOM_FAULT_AT=3, LOOM_FAULT_KIND="stall", LOOM_FAULT_HANG_S=900,
                         SHUTDOWN_TIMEOUT=5)
    elapsed = time.monotonic() - t0
    out = (tmp_path / "launcher0.out").read_text()
    assert status != 0, out[-3000:]
    assert "rank 1's loader stalls at batch 3" in out, out[-3000:]
    assert re.search(r"rank 1/2 \(local 1 on \S+\) failed: DataStallError: rank 1/2: no batch from the data "
                     r"loader for 3.75 s", out), out[-3000:]
    root = out[out.index("Root Cause"):]
    first = re.search(r"rank\s*: (\d+) \(local_rank: \d+\)", root)  # the root cause's own rank line
    assert first and first.group(1) == "1" and "no batch from the data loader" in root, root
    assert elapsed < 150, elapsed


@pytest.mark.distributed
@pytest.mark.slow
def test_sigterm_checkpoints_and_the_same_command_resumes(demo_shards, reference_run, tmp_path):
    config = tiny_config(tmp_path / "tiny.yaml", demo_shards, tmp_path / "runs")
    stage = tmp_path / "runs" / "tiny" / "diffusion"
    cmd = ["bash", str(TORCHRUN_SCRIPT), "train", "--config", str(config)]
    # slowed down (50 ms a step, no effect on any number) so that the signal surely lands mid-training
    proc = start(cmd, _one_node_env(TRAIN_MODULE="fault_entry", LOOM_STEP_SLEEP_S=0.05), tmp_path / "first.out")
    try:
        wait_for(stage / "checkpoints" / f"step_{CHECKPOINT_EVERY:08d}" / "trainer_state.json", proc,
                 tmp_path / "first.out")
        proc.send_signal(signal.SIGTERM)
        status = finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            kill_session(proc)
    first = (tmp_path / "first.out").read_text()
    assert status == 0, first[-3000:]
    stopped_at = checkpoints(stage)[-1]
    assert CHECKPOINT_EVERY <= stopped_at < STEPS, checkpoints(stage)
    assert f"received signal {int(signal.SIGTERM)}: checkpoint saved at step {stopped_at}" in first
    assert not (stage / "export").exists()  # stopped, not finished

    proc = start(cmd, _one_node_env(), tmp_path / "second.out")
    status = finish(proc, timeout=240)
    second = (tmp_path / "second.out").read_text()
    assert status == 0, second[-3000:]
    assert f"resumed from {stage / 'checkpoints' / f'step_{stopped_at:08d}'} at step {stopped_at}" in second
    assert checkpoints(stage)[-1] == STEPS
    assert reference_run.statuses == [0, 0], "the reference run failed: see test_two_nodes_train_as_one_job"
    assert_same_weights(final_weights(stage), final_weights(reference_run.stage_dir))


@pytest.mark.distributed
@pytest.mark.slow
def test_elastic_restart_after_a_crash_resumes(demo_shards, reference_run, tmp_path):
    config = tiny_config(tmp_path / "tiny.yaml", demo_shards, tmp_path / "runs")
    stage = tmp_path / "runs" / "tiny" / "diffusion"
    crash_at = 3 * CHECKPOINT_EVERY + 1  # the first micro-batch after the checkpoint at step 6
    [status] = run_nodes(config, nodes=1, nproc=2, logs=tmp_path, timeout=300, MAX_RESTARTS=1,
                         TRAIN_MODULE="fault_entry", LOOM_FAULT_RANK=1, LOOM_FAULT_AT=crash_at,
                         LOOM_FAULT_ONCE=tmp_path / "fault-fired")
    out = (tmp_path / "launcher0.out").read_text()
    assert status == 0, out[-3000:]
    assert (tmp_path / "fault-fired").exists() and "injected fault on rank 1" in out
    resumed = 3 * CHECKPOINT_EVERY
    assert f"resumed from {stage / 'checkpoints' / f'step_{resumed:08d}'} at step {resumed}" in out
    assert checkpoints(stage)[-1] == STEPS
    assert reference_run.statuses == [0, 0], "the reference run failed: see test_two_nodes_train_as_one_job"
    assert_same_weights(final_weights(stage), final_weights(reference_run.stage_dir))


def _stop_and_resume(cmd, env_first, env_second, stage, tmp_path, workers_per_rank, ranks):
    """Start ``cmd``; once the first checkpoint is written, SIGTERM every process of the job (``os.killpg`` on each
    process group, DataLoader workers included); then the same command again. Returns (first output, second
    output, the step the first run stopped at)."""
    proc = start(cmd, env_first, tmp_path / "first.out")
    try:
        wait_for(stage / "checkpoints" / f"step_{CHECKPOINT_EVERY:08d}" / "trainer_state.json", proc,
                 tmp_path / "first.out")
        job = descendants(proc.pid)
        pythons = python_processes(job)
        # the ranks and their DataLoader workers (and torchrun's agent) are all there to be signalled
        assert len(pythons) >= ranks * (1 + workers_per_rank), pythons
        status, left = stop_job(proc, job, signal.SIGTERM)
    finally:
        if proc.poll() is None:
            kill_session(proc)
    first = (tmp_path / "first.out").read_text()
    assert status == 0, first[-3000:]
    assert "killed by signal" not in first, first[-3000:]
    assert not left, f"processes of the job still alive after it ended: {left}"
    stopped_at = checkpoints(stage)[-1]
    assert CHECKPOINT_EVERY <= stopped_at < STEPS, checkpoints(stage)
    assert f"received signal {int(signal.SIGTERM)}: checkpoint saved at step {stopped_at}" in first, first[-3000:]
    assert not (stage / "export").exists()  # stopped, not finished

    proc = start(cmd, env_second, tmp_path / "second.out")
    status = finish(proc, timeout=240)
    second = (tmp_path / "second.out").read_text()
    assert status == 0, second[-3000:]
    assert f"resumed from {stage / 'checkpoints' / f'step_{stopped_at:08d}'} at step {stopped_at}" in second
    assert checkpoints(stage)[-1] == STEPS
    return first, second, stopped_at


@pytest.mark.distributed
@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_one_process(demo_shards, single_reference_run, tmp_path):
    """One process, one DataLoader worker (the same data order as none): ``os.killpg`` reaches the worker too."""
    config = tiny_config(tmp_path / "tiny.yaml", demo_shards, tmp_path / "runs", data={"num_workers": 1})
    stage = tmp_path / "runs" / "tiny" / "diffusion"
    cmd = [sys.executable, "-m", "fault_entry", "train", "--config", str(config)]
    _stop_and_resume(cmd, launch_env(LOOM_STEP_SLEEP_S=0.05), launch_env(), stage, tmp_path, workers_per_rank=1,
                     ranks=1)
    assert single_reference_run.statuses == [0], (single_reference_run.logs / "run.out").read_text()[-3000:]
    assert_same_weights(final_weights(stage), final_weights(single_reference_run.stage_dir))


@pytest.mark.distributed
@pytest.mark.slow
def test_sigterm_to_every_process_group_with_loader_workers_two_ranks(demo_shards, reference_run, tmp_path):
    """Two ranks under torchrun (each in a session of its own), one DataLoader worker each: every process of the
    job gets SIGTERM at once, as under SLURM."""
    config = tiny_config(tmp_path / "tiny.yaml", demo_shards, tmp_path / "runs", data={"num_workers": 1})
    stage = tmp_path / "runs" / "tiny" / "diffusion"
    cmd = ["bash", str(TORCHRUN_SCRIPT), "train", "--config", str(config)]
    _stop_and_resume(cmd, _one_node_env(TRAIN_MODULE="fault_entry", LOOM_STEP_SLEEP_S=0.05), _one_node_env(),
                     stage, tmp_path, workers_per_rank=1, ranks=2)
    assert reference_run.statuses == [0, 0], "the reference run failed: see test_two_nodes_train_as_one_job"
    assert_same_weights(final_weights(stage), final_weights(reference_run.stage_dir))
