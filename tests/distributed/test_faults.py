"""Faults of a shared cluster, on one machine with two ranks (launch/torchrun_multinode.sh, gloo, CPU):

* a rank that dies fails the job at once, and the failure names the rank and its error;
* a rank that hangs fails the job after ``train.collective_timeout_s``, not after the backend's 30 minutes;
* SIGTERM stops the run with a checkpoint, and running the same command again resumes it: the final weights equal
  those of a run that was never interrupted (the session's reference run, two nodes × one rank);
* with ``MAX_RESTARTS=1`` torchrun restarts the worker group after a crash and it resumes from the latest checkpoint,
  again to the reference run's weights.

The faults come from ``fault_entry`` (loom with a fault injected into the diffusion stage's loss).
"""

from __future__ import annotations

import re
import signal
import time

import pytest
from harness import (
    CHECKPOINT_EVERY,
    STEPS,
    TORCHRUN_SCRIPT,
    assert_same_weights,
    checkpoints,
    final_weights,
    finish,
    free_port,
    kill_session,
    launch_env,
    run_nodes,
    start,
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
