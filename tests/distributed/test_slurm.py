"""launch/slurm/train.sbatch under a faked SLURM on one machine: the batch script runs with the variables SLURM sets
(job id, node list, node count), a fake ``srun`` starts the per-node command twice (SLURM_NODEID 0 and 1) and
forwards signals as srun does, a fake ``scontrol`` expands the node list and records requeues.

The job uses the Accelerate path (ACCELERATE_CONFIG=launch/accelerate/ddp_cpu_gloo.yaml), two nodes × one process.
It gets the time-limit warning (SIGUSR1 to the batch script, as ``--signal=B:USR1@120`` sends it) mid-training:
it must checkpoint, exit 0 and requeue itself; the requeued job (same command, SLURM_RESTART_COUNT=1) resumes and
ends with the weights of the uninterrupted reference run.
"""

from __future__ import annotations

import re
import signal

import pytest
from harness import (
    CHECKPOINT_EVERY,
    CPU_GLOO_CONFIG,
    SBATCH_SCRIPT,
    STEPS,
    assert_same_weights,
    checkpoints,
    fake_slurm,
    final_weights,
    finish,
    free_port,
    kill_session,
    slurm_env,
    start,
    tiny_config,
    trainer_state,
    wait_for,
)

JOB = 4242


@pytest.mark.distributed
@pytest.mark.slow
def test_sbatch_preempted_requeued_and_resumed(demo_shards, reference_run, tmp_path):
    config = tiny_config(tmp_path / "tiny.yaml", demo_shards, tmp_path / "runs")
    stage = tmp_path / "runs" / "tiny" / "diffusion"
    bin_dir = fake_slurm(tmp_path / "bin")
    logs = tmp_path / "logs"
    settings = dict(GPUS_PER_NODE=1, MASTER_PORT=free_port(), LOG_DIR=logs, ACCELERATE_CONFIG=CPU_GLOO_CONFIG)
    cmd = ["bash", str(SBATCH_SCRIPT), "--config", str(config)]

    env = slurm_env(bin_dir, JOB, nodes=2, TRAIN_MODULE="fault_entry", LOOM_STEP_SLEEP_S=0.05, **settings)
    proc = start(cmd, env, tmp_path / "job.out")
    try:
        wait_for(stage / "checkpoints" / f"step_{CHECKPOINT_EVERY:08d}" / "trainer_state.json", proc,
                 tmp_path / "job.out")
        proc.send_signal(signal.SIGUSR1)
        status = finish(proc, timeout=180)
    finally:
        if proc.poll() is None:
            kill_session(proc)
    out = (tmp_path / "job.out").read_text()
    assert status == 0, out[-4000:]
    assert (bin_dir / "requeued").read_text().split() == [str(JOB)]
    calls = (bin_dir / "calls.log").read_text()
    assert "scontrol show hostnames 127.0.0.1,localhost" in calls  # the rendezvous host from the allocation
    assert re.search(r"srun nodes=2 kill_on_bad_exit=True .*torchrun_multinode\.sh train --config", calls)
    stopped_at = checkpoints(stage)[-1]
    assert CHECKPOINT_EVERY <= stopped_at < STEPS
    assert trainer_state(stage, stopped_at)["world_size"] == 2
    node_logs = [(logs / f"node{n}.log").read_text() for n in (0, 1)]
    for n, text in enumerate(node_logs):
        assert f"[node{n}] received SIGUSR1" in text, text[-3000:]
        assert "accelerate config" in text
    assert f"received signal {int(signal.SIGUSR1)}: checkpoint saved at step {stopped_at}" in "".join(node_logs)

    # the requeued job: the same script and arguments
    proc = start(cmd, slurm_env(bin_dir, JOB, nodes=2, restart_count=1, **settings), tmp_path / "job2.out")
    status = finish(proc, timeout=240)
    out = (tmp_path / "job2.out").read_text()
    assert status == 0, out[-4000:]
    assert f"job {JOB} (restart 1): 2 node(s) x 1 GPU(s), rendezvous 127.0.0.1:" in out
    assert "resumed from" in "".join((logs / f"node{n}.log").read_text() for n in (0, 1))
    assert checkpoints(stage)[-1] == STEPS
    assert (bin_dir / "requeued").read_text().split() == [str(JOB)]  # a finished job does not requeue
    assert reference_run.statuses == [0, 0], "the reference run failed: see test_two_nodes_train_as_one_job"
    assert_same_weights(final_weights(stage), final_weights(reference_run.stage_dir))
